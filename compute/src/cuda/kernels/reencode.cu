// Selective global re-encoding (issue 14; reencode.rs): the selected tokens' new K/V rows
// scattered to their positions in the document's KV, and their attention with a limit
// per row (token t sees the document's keys 0..=pos[t]), which the segment kernels of
// attention.cu cannot express (their mask is one causal offset for all rows).
//
// Layouts: document K/V head-major [nkv][len][HEAD_DIM]; the new rows [nkv][m][HEAD_DIM];
// q and out [m][nh * HEAD_DIM]; all 16-bit (h16).

// grid (m, nkv), HEAD_DIM threads: doc[h][pos[t]] = fresh[h][t].
extern "C" __global__ void reencode_scatter(h16* doc_k, h16* doc_v, const h16* new_k,
                                            const h16* new_v, const int* pos, int m, int len) {
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    if (i >= HEAD_DIM) return;
    const long long src = ((long long)h * m + t) * HEAD_DIM + i;
    const long long dst = ((long long)h * len + pos[t]) * HEAD_DIM + i;
    doc_k[dst] = new_k[src];
    doc_v[dst] = new_v[src];
}

#define RE_WARPS 4
#define RE_PER ((HEAD_DIM + 31) / 32)

// grid (m, nh), 32 * RE_WARPS threads: one query row and head. Warps take tiles of 32
// keys in turn; in a tile each lane scores one key, then the warp accumulates the tile's
// V rows with lane-owned dimensions (online softmax in base 2, f32); the warps' partial
// results are merged at the end.
extern "C" __global__ void __launch_bounds__(32 * RE_WARPS) reencode_attn(
    h16* out, const h16* q, const h16* k, const h16* v, const int* pos, int m, int nh, int nkv,
    int len, float scale_log2) {
    const int t = blockIdx.x, head = blockIdx.y;
    const int kvh = head / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ float qs[HEAD_DIM];
    __shared__ float w_max[RE_WARPS], w_sum[RE_WARPS];
    __shared__ float w_acc[RE_WARPS][HEAD_DIM];
    const h16* qr = q + ((long long)t * nh + head) * HEAD_DIM;
    for (int i = threadIdx.x; i < HEAD_DIM; i += 32 * RE_WARPS) qs[i] = h2f(qr[i]) * scale_log2;
    __syncthreads();
    const int n = min(pos[t] + 1, len);
    const h16* kb = k + (long long)kvh * len * HEAD_DIM;
    const h16* vb = v + (long long)kvh * len * HEAD_DIM;
    float acc[RE_PER];
#pragma unroll
    for (int r = 0; r < RE_PER; ++r) acc[r] = 0.f;
    float mx = NEG_INF, sum = 0.f;
    for (int base = warp * 32; base < n; base += 32 * RE_WARPS) {
        const int j = base + lane;
        float s = NEG_INF;
        if (j < n) {
            const h16* kr = kb + (long long)j * HEAD_DIM;
            float dot = 0.f;
#pragma unroll 8
            for (int i = 0; i < HEAD_DIM; ++i) dot += qs[i] * h2f(kr[i]);
            s = dot;
        }
        const float new_mx = fmaxf(mx, warp_max(s));  // finite: lane 0's key is valid
        const float corr = exp2f(mx - new_mx);        // 0 on the first tile
        const float p = j < n ? exp2f(s - new_mx) : 0.f;
        sum = sum * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < RE_PER; ++r) acc[r] *= corr;
        const int cnt = min(32, n - base);
        for (int kk = 0; kk < cnt; ++kk) {
            const float pk = __shfl_sync(0xffffffffu, p, kk);
            const h16* vr = vb + (long long)(base + kk) * HEAD_DIM;
#pragma unroll
            for (int r = 0; r < RE_PER; ++r) {
                const int i = lane + 32 * r;
                if (i < HEAD_DIM) acc[r] += pk * h2f(vr[i]);
            }
        }
        mx = new_mx;
    }
    if (lane == 0) {
        w_max[warp] = mx;
        w_sum[warp] = sum;
    }
#pragma unroll
    for (int r = 0; r < RE_PER; ++r) {
        const int i = lane + 32 * r;
        if (i < HEAD_DIM) w_acc[warp][i] = acc[r];
    }
    __syncthreads();
    float most = NEG_INF;
#pragma unroll
    for (int w = 0; w < RE_WARPS; ++w) most = fmaxf(most, w_max[w]);
    h16* orow = out + ((long long)t * nh + head) * HEAD_DIM;
    for (int i = threadIdx.x; i < HEAD_DIM; i += 32 * RE_WARPS) {
        float total = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < RE_WARPS; ++w) {
            const float c = w_max[w] == NEG_INF ? 0.f : exp2f(w_max[w] - most);
            total += w_sum[w] * c;
            o += w_acc[w][i] * c;
        }
        orow[i] = f2h(o / total);
    }
}
