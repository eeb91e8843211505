// starkv attention: what the mma.sync kernels (attention.cu) and the Hopper kernel
// (attention_sm90.cu) share, compiled after common.cuh: the key table's items, the walk
// over them, shared-memory addressing and the output rows with their log-sum-exp.

// Keys come as a table of items; item = a key range of one KV segment with its own
// layout and mask (none, or causal with an offset: query token t sees key j iff
// j <= t + offset). A split (grid z) walks a contiguous range of items with one running
// softmax and writes either the final normalised output (16-bit, when there is one
// split) or its partial (O, lse) for attn_merge.

struct AttnItem {
    u64 k;              // element (h, j, i) at k + h * head_stride + j * row_stride + i
    u64 v;
    long long head_stride;
    int row_stride;
    int key_begin;      // keys key_begin..key_end of the segment
    int key_end;
    int causal_offset;  // -1: no mask
    // 0: 16-bit K/V. Otherwise an 8-bit segment (only the *_kv8 kernels read it): int8
    // (or, when scale_off is odd, fp8 e4m3) element (h, j, i) at byte k + h * head_stride
    // + j * row_stride + i (row_stride == HEAD_DIM), and its row's IEEE f16 scale at byte
    // k + (scale_off & ~1) + 2 * (h * len + j), len = head_stride / row_stride (the same
    // for v).
    long long scale_off;
    // Added to every score of the item's keys, in log2 units: log2 S for the keys of
    // APE's tempered group at T = 1, whose weight S is the same as a bias of ln S on each
    // of its keys (0 elsewhere). Only attn_simple_body reads it; the planner gives
    // weighted items to its kernels only (AttnKernels::reads_weights).
    float log2_weight;
    int pad_;
};

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#define NDT (HEAD_DIM / 8)    // 8-wide output column tiles

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(u32 saddr, const void* g, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(saddr), "l"(g), "r"(n));
}

// Position in a split's key tiles: item index, first key of the tile, end of the item's
// visible keys (causal items end after the last key any row of the CTA sees).
struct Cursor {
    int it, j0, kend;
};

__device__ __forceinline__ void settle(Cursor& c, const AttnItem* items, int it_end, int t_last) {
    while (c.it < it_end) {
        const AttnItem& item = items[c.it];
        int ke = item.key_end;
        if (item.causal_offset >= 0) ke = min(ke, t_last + item.causal_offset + 1);
        if (c.j0 < ke) {
            c.kend = ke;
            return;
        }
        c.it++;
        if (c.it < it_end) c.j0 = items[c.it].key_begin;
    }
}

// Writes row R's output from its accumulator tile `o` (this thread's columns of the
// row in half `half` of the m16 tile), normalised by its quad-summed `l`, and its natural
// log-sum-exp: 16-bit to out_h, or the f32 partial of `split` to out_f (for attn_merge).
__device__ __forceinline__ void store_row(const float (&o)[NDT][4], int half, float l, float mm,
                                          int R, int m, int group, int nh, int kvh, int split,
                                          int tig, h16* out_h, float* out_f, float* lse_out) {
    const float LN2 = 0.6931471805599453f;
    const int qw = nh * HEAD_DIM;
    float inv = l > 0.f ? 1.f / l : 0.f;
    float lse = l > 0.f ? (mm + __log2f(l)) * LN2 : NEG_INF;
    int t = R / group, head = kvh * group + R % group;
    if (out_h) {
        h16* dst = out_h + (u64)t * qw + head * HEAD_DIM;
#pragma unroll
        for (int dt = 0; dt < NDT; dt++) {
            int col = dt * 8 + tig * 2;
            *(u32*)(dst + col) = pack2(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
        }
    } else {
        float* dst = out_f + ((u64)split * m + t) * qw + head * HEAD_DIM;
#pragma unroll
        for (int dt = 0; dt < NDT; dt++) {
            int col = dt * 8 + tig * 2;
            dst[col] = o[dt][2 * half] * inv;
            dst[col + 1] = o[dt][2 * half + 1] * inv;
        }
    }
    if (lse_out && tig == 0) lse_out[((u64)split * nh + head) * m + t] = lse;
}
