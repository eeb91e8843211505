// starkv attention kernels, compiled by NVRTC after common.cuh and attn_common.cuh
// with -DHEAD_DIM.
//
// Attention: tiled, online softmax, tensor cores (mma.sync m16n8k16, f32 accumulate).
//
// Rows of a CTA are (token, query head within the GQA group) pairs of one KV head,
// folded as row = token * group + j, so that the K/V tiles loaded for a KV head serve
// every query head that reads it (decoding fills the group's rows instead of one).
// The key items, their walk and the output rows are in attn_common.cuh.

#define BM 64                 // rows per CTA (4 warps x 16)
#define BN 64                 // keys per tile
#define SROW (HEAD_DIM + 8)   // padded smem row (16 bytes) against bank conflicts
#define NKT (HEAD_DIM / 16)   // 16-deep k steps over the head dim

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// Not volatile: a pure register operation, so the compiler may interleave it with the
// (volatile, shared-memory reading) ldmatrix loads of the next fragments.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads rows j0 .. j0 + R of one KV head (n of them valid, the rest zero-filled) into
// the shared tile at shared-space address `s` (rows of SROW values), with NT threads. Each
// thread keeps its 16-byte column and first row for every iteration, so a copy costs an
// address add and a compare: the generic per-chunk index arithmetic (and a generic to
// shared address conversion per copy) was a third of the attention loop's instructions.
template <int NT, int R>
__device__ __forceinline__ void load_rows(u32 s, const h16* base, long long row_stride, int j0, int n) {
    constexpr int CPR = HEAD_DIM / 8;  // 16-byte chunks per row
    if constexpr (NT % CPR == 0 && R % (NT / CPR) == 0) {
        constexpr int RPI = NT / CPR;  // rows per iteration
        const int r0 = threadIdx.x / CPR, col = (threadIdx.x % CPR) * 8;
        const h16* g = base + (long long)(j0 + r0) * row_stride + col;
        const long long step = (long long)RPI * row_stride;
        const u32 sa = s + (u32)(r0 * SROW + col) * 2;
#pragma unroll
        for (int i = 0; i < R / RPI; i++) {
            const bool valid = r0 + i * RPI < n;
            cp_async16(sa + (u32)(i * RPI * SROW * 2), valid ? g : base, valid);
            g += step;
        }
    } else {
        for (int c = threadIdx.x; c < R * CPR; c += NT) {
            int r = c / CPR, col = (c % CPR) * 8;
            bool valid = r < n;
            const h16* g = valid ? base + (long long)(j0 + r) * row_stride + col : base;
            cp_async16(s + (u32)(r * SROW + col) * 2, g, valid);
        }
    }
}

// Loads the CTA's ROWS query rows (row R = token R / group, head kvh * group + R % group;
// rows past `rows` zero-filled) into the shared tile at `dst`, with NT threads, as one
// commit group.
template <int NT, int ROWS>
__device__ __forceinline__ void load_q_rows(u32 dst, const h16* q, int row0, int rows, int group,
                                            int kvh, int nh) {
    for (int c = threadIdx.x; c < ROWS * HEAD_DIM / 8; c += NT) {
        int r = c / (HEAD_DIM / 8), col = (c % (HEAD_DIM / 8)) * 8;
        int R = row0 + r;
        bool valid = R < rows;
        const h16* gp = q;
        if (valid) {
            int t = R / group, head = kvh * group + R % group;
            gp = q + (u64)t * nh * HEAD_DIM + head * HEAD_DIM + col;
        }
        cp_async16(dst + (u32)(r * SROW + col) * 2, gp, valid);
    }
    cp_commit();
}

// This warp's 16 query rows (from row warp * 16 of the shared tile at `src`) as mma A
// fragments, one per 16-deep step over the head dim.
__device__ __forceinline__ void q_fragments(u32 (&qf)[NKT][4], u32 src, int warp, int lane) {
    const int mi = lane >> 3;
    const u32 a = src + (u32)((warp * 16 + (mi & 1) * 8 + (lane & 7)) * SROW + (mi >> 1) * 8) * 2;
#pragma unroll
    for (int kk = 0; kk < NKT; kk++) ldm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], a + kk * 32);
}


// The A fragments of q_fragments loaded from global memory: this thread's rows `ra` and
// ra + 8 (zero past `rows`), columns 2 tig (+1) and 2 tig + 8 (+1) of each 16-deep step.
__device__ __forceinline__ void q_fragments_global(u32 (&qf)[NKT][4], const h16* q, int ra,
                                                   int rows, int group, int kvh, int nh,
                                                   int tig) {
    const h16* p[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int R = ra + 8 * h;
        p[h] = R < rows ? q + ((u64)(R / group) * nh + kvh * group + R % group) * HEAD_DIM + tig * 2
                        : nullptr;
    }
#pragma unroll
    for (int kk = 0; kk < NKT; kk++) {
        qf[kk][0] = p[0] ? *(const u32*)(p[0] + kk * 16) : 0u;
        qf[kk][1] = p[1] ? *(const u32*)(p[1] + kk * 16) : 0u;
        qf[kk][2] = p[0] ? *(const u32*)(p[0] + kk * 16 + 8) : 0u;
        qf[kk][3] = p[1] ? *(const u32*)(p[1] + kk * 16 + 8) : 0u;
    }
}

// 16 bytes, for vector loads and stores (no CUDA headers here).
struct __align__(16) u32x4 {
    u32 x, y, z, w;
};

// A read-only 16-byte global load.
__device__ __forceinline__ u32x4 ldg16(const void* p) {
    u32x4 r;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ h16 ldg_h16(const h16* p) {
    h16 r;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

// IEEE half to float, whatever the kernels' 16-bit type (8-bit scales are f16).
__device__ __forceinline__ float f16_to_f32(h16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Four int8 values (x's bytes) as four 16-bit values (exact: |v| <= 128 fits both 16-bit
// types): byte + 128 is put in the mantissa of 2^23 (a byte permute) and 2^23 + 128
// subtracted, all full-rate instructions (int-to-float conversion runs at a quarter rate).
__device__ __forceinline__ void i8x4_to_h16(u32 x, u32& lo, u32& hi) {
    const u32 u = x ^ 0x80808080u;
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.f;
    lo = pack2(f0, f1);
    hi = pack2(f2, f3);
}

// Four OCP FP8 E4M3 values (x's bytes, e4m3fn: no infinities, codes 0x7f/0xff NaN and
// never written) as four 16-bit values (exact: every e4m3 value is an f16 and a bf16
// value). sm_89 and newer convert pairs in hardware (cvt.rn.f16x2.e4m3x2, then f16 ->
// f32 -> bf16 for a bf16 build, exact); older GPUs place the code's bits in an f16
// (sign at bit 15, exponent and mantissa at bits 7..14: the e4m3 value / 256 exactly,
// subnormals included) and scale by 256 in f32.
__device__ __forceinline__ u32 e4m3x2_to_h16x2(u32 pair) {
#if __CUDA_ARCH__ >= 890
    u32 h;
    asm("{.reg .b16 lo;\n"
        " cvt.u16.u32 lo, %1;\n"
        " cvt.rn.f16x2.e4m3x2 %0, lo;}"
        : "=r"(h) : "r"(pair));
#ifdef DT_BF16
    float f0, f1;
    asm("{.reg .b16 l, h;\n"
        " mov.b32 {l, h}, %2;\n"
        " cvt.f32.f16 %0, l;\n"
        " cvt.f32.f16 %1, h;}"
        : "=f"(f0), "=f"(f1) : "r"(h));
    return pack2(f0, f1);
#else
    return h;
#endif
#else
    // Byte 0 of `pair` to bits 8..15, byte 1 to bits 24..31.
    const u32 t = __byte_perm(pair, 0u, 0x1404);
    const u32 h = (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);
    float f0, f1;
    asm("{.reg .b16 l, h;\n"
        " mov.b32 {l, h}, %2;\n"
        " cvt.f32.f16 %0, l;\n"
        " cvt.f32.f16 %1, h;}"
        : "=f"(f0), "=f"(f1) : "r"(h));
    return pack2(f0 * 256.f, f1 * 256.f);
#endif
}

__device__ __forceinline__ void e4m3x4_to_h16(u32 x, u32& lo, u32& hi) {
    lo = e4m3x2_to_h16x2(x & 0xffffu);
    hi = e4m3x2_to_h16x2(x >> 16);
}

// The 8-bit kernels' dynamic shared memory with TBN-key tiles (mirrors kv8_smem in
// attention.rs): the 16-bit K and V tiles the tensor cores read, the staging of the next
// 8-bit tile (K then V, TBN rows of HEAD_DIM bytes each) and the tile's per-key scales
// (K then V, f32).
#define KV8_STAGE_OFF(TBN) (2 * (TBN) * SROW * 2)
#define KV8_SCALE_OFF(TBN) (KV8_STAGE_OFF(TBN) + 2 * (TBN) * HEAD_DIM)

// Starts loading rows j0 .. j0 + TBN of KV head kvh of 8-bit item `item` (n valid, the rest
// zero-filled) into the staging at shared-space address `st` (one commit group), and
// their scales into this thread's registers (rows threadIdx.x + i * NT).
template <int NT, int TBN, int SC>
__device__ __forceinline__ void stage_i8(u32 st, const AttnItem& item, int kvh, int j0, int n,
                                         h16 (&ks)[SC], h16 (&vs)[SC]) {
    constexpr int CPR = HEAD_DIM / 16;  // 16-byte chunks per row
    const long long hs = kvh * item.head_stride;
    const char* k8 = (const char*)item.k + hs;
    const char* v8 = (const char*)item.v + hs;
    for (int c = threadIdx.x; c < TBN * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 16;
        const bool valid = r < n;
        const long long off = valid ? (long long)(j0 + r) * HEAD_DIM + col : 0;
        cp_async16(st + (u32)(r * HEAD_DIM + col), k8 + off, valid);
        cp_async16(st + (u32)(TBN * HEAD_DIM + r * HEAD_DIM + col), v8 + off, valid);
    }
    cp_commit();
    const long long sbase = (long long)kvh * (item.head_stride / item.row_stride) + j0;
    const long long soff = item.scale_off & ~1LL;  // the low bit marks fp8 values
    const h16* ksc = (const h16*)((const char*)item.k + soff) + sbase;
    const h16* vsc = (const h16*)((const char*)item.v + soff) + sbase;
#pragma unroll
    for (int i = 0; i < SC; i++) {
        const int r = threadIdx.x + i * NT;
        const bool valid = r < TBN && r < n;
        ks[i] = valid ? ldg_h16(ksc + r) : (h16)0;
        vs[i] = valid ? ldg_h16(vsc + r) : (h16)0;
    }
}

// The staged 8-bit tile (landed) into the 16-bit tiles sK and sV as its int8 or e4m3
// (`fp8`) values (exact either way), and its scales into sKs and sVs: the scales are
// applied to the scores (K) and to P (V), so the dequantisation adds no rounding.
template <int NT, int TBN, int SC>
__device__ __forceinline__ void unstage_i8(h16* sK, h16* sV, const signed char* st, float* sKs,
                                           float* sVs, const h16 (&ks)[SC], const h16 (&vs)[SC],
                                           bool fp8) {
    constexpr int CPR = HEAD_DIM / 16;
    for (int c = threadIdx.x; c < 2 * TBN * CPR; c += NT) {
        const int kv = c / (TBN * CPR), r = (c / CPR) % TBN, col = (c % CPR) * 16;
        const u32x4 x = *(const u32x4*)(st + kv * TBN * HEAD_DIM + r * HEAD_DIM + col);
        u32x4 a, b;
        if (fp8) {
            e4m3x4_to_h16(x.x, a.x, a.y);
            e4m3x4_to_h16(x.y, a.z, a.w);
            e4m3x4_to_h16(x.z, b.x, b.y);
            e4m3x4_to_h16(x.w, b.z, b.w);
        } else {
            i8x4_to_h16(x.x, a.x, a.y);
            i8x4_to_h16(x.y, a.z, a.w);
            i8x4_to_h16(x.z, b.x, b.y);
            i8x4_to_h16(x.w, b.z, b.w);
        }
        u32x4* d = (u32x4*)((kv ? sV : sK) + r * SROW + col);
        d[0] = a;
        d[1] = b;
    }
#pragma unroll
    for (int i = 0; i < SC; i++) {
        const int r = threadIdx.x + i * NT;
        if (r < TBN) {
            sKs[r] = f16_to_f32(ks[i]);
            sVs[r] = f16_to_f32(vs[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fused split merge (decode: the one-warp kernels' `_fm` variants, Gpu::attention with
// SplitTuning::fused_merge). Each split CTA writes its partial (O, lse) as for
// attn_merge, then counts itself in: the CTAs of a (row block, KV head) are cut into
// groups of `G` consecutive splits, and the last CTA of a group to arrive (a counter per
// group) merges the group's partials into the slot of its first split; the last group
// merger to arrive (one more counter) merges the groups' results into the output. With
// one group the group's merger writes the output. Each last arriver puts its counter
// back to zero, so the next launch (a graph replay) starts from zeros: the counters are
// zeroed once, when allocated. The host keeps G and the group count at most 32 (one
// split per lane when the weights are computed). This takes one launch (and its kernel
// boundary) per attention off a decode step, but measured slower than the separate merge
// (the tail is a chain of dependent global round trips in one warp; PERF_NOTES.md), so
// it is off unless STARKV_FUSED_MERGE=1.

// Counters per (row block, KV head): one per group (at most 32), the groups' at FM_TOP.
#define FM_COUNTERS 64
#define FM_TOP (FM_COUNTERS - 1)

// Adds 1 to a counter with acquire-release semantics at GPU scope (lane 0 of a warp, after
// __syncwarp: the warp's earlier writes are released with it; what the other CTAs
// released before their increments is acquired); returns the old value.
__device__ __forceinline__ u32 fm_arrive(u32* c) {
    u32 old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
    return old;
}

// Merges k <= 32 partials of this CTA's rows, those of splits s0, s0 + sstride, ...,
// with the weights exp(lse_s - lse) (`wsh`: 32 floats per row of shared memory), into
// the partial slot `dst` (f32 O and lse), or, when dst < 0, into the output: 16-bit
// (out_h) or f32 with its lse (out_f, lse_f; the layout of attn_merge's outputs).
template <int ROWS>
__device__ __forceinline__ void fm_merge(float* wsh, int k, int s0, int sstride, int dst, int m,
                                         int group, int nh, int rows, int row0, int kvh,
                                         float* part_o, float* part_lse, h16* out_h, float* out_f,
                                         float* lse_f) {
    constexpr int CU = 4;  // output quads per lane per pass
    constexpr int IU = 8;  // partials per pass
    const int lane = threadIdx.x & 31;
    const int nrows = min(ROWS, rows - row0);
    const u64 qw = (u64)nh * HEAD_DIM;
    // Every row's lse of split s0 + lane * sstride, loaded before any is used.
    float l[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        const int R = row0 + r, t = R / group, head = kvh * group + R % group;
        l[r] = r < nrows && lane < k
                   ? __ldcg(part_lse + ((u64)(s0 + lane * sstride) * nh + head) * m + t)
                   : NEG_INF;
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        if (r >= nrows) break;
        const int R = row0 + r, t = R / group, head = kvh * group + R % group;
        const float mx = warp_max(l[r]);
        const float e = l[r] == NEG_INF ? 0.f : expf(l[r] - mx);
        const float tot = warp_sum(e);
        wsh[r * 32 + lane] = tot > 0.f ? e / tot : 0.f;
        if (lane == 0) {
            const float lse = tot > 0.f ? mx + logf(tot) : NEG_INF;
            if (dst >= 0) part_lse[((u64)dst * nh + head) * m + t] = lse;
            else if (lse_f) lse_f[(u64)head * m + t] = lse;
        }
    }
    __syncwarp();
    constexpr int C4 = HEAD_DIM / 4;  // quads per row
    const int nch = nrows * C4;
    const u64 sstep = (u64)sstride * m * qw;  // floats from one source partial to the next
    for (int c0 = 0; c0 < nch; c0 += 32 * CU) {
        float4 acc[CU];
        const float* src[CU];
        u64 off[CU];
        int wr[CU];
        bool ok[CU];
#pragma unroll
        for (int u = 0; u < CU; u++) {
            const int c = c0 + lane + 32 * u;
            ok[u] = c < nch;
            const int r = ok[u] ? c / C4 : 0, col = (c % C4) * 4;
            const int R = row0 + r, t = R / group, head = kvh * group + R % group;
            off[u] = ((u64)t * nh + head) * HEAD_DIM + col;
            src[u] = part_o + (u64)s0 * m * qw + off[u];
            wr[u] = r * 32;
            acc[u].x = acc[u].y = acc[u].z = acc[u].w = 0.f;
        }
        for (int i = 0; i < k; i += IU) {
            float4 v[CU][IU];
#pragma unroll
            for (int u = 0; u < CU; u++)
#pragma unroll
                for (int j = 0; j < IU; j++) {
                    if (ok[u] && i + j < k) {
                        v[u][j] = __ldcg((const float4*)(src[u] + (u64)(i + j) * sstep));
                    } else {
                        v[u][j].x = v[u][j].y = v[u][j].z = v[u][j].w = 0.f;
                    }
                }
#pragma unroll
            for (int u = 0; u < CU; u++)
#pragma unroll
                for (int j = 0; j < IU; j++) {
                    const float w = wsh[wr[u] + i + j];
                    acc[u].x += w * v[u][j].x;
                    acc[u].y += w * v[u][j].y;
                    acc[u].z += w * v[u][j].z;
                    acc[u].w += w * v[u][j].w;
                }
        }
#pragma unroll
        for (int u = 0; u < CU; u++) {
            if (!ok[u]) continue;
            if (dst >= 0) {
                *(float4*)(part_o + (u64)dst * m * qw + off[u]) = acc[u];
            } else if (out_h) {
                uint2 h;
                h.x = pack2(acc[u].x, acc[u].y);
                h.y = pack2(acc[u].z, acc[u].w);
                *(uint2*)(out_h + off[u]) = h;
            } else {
                *(float4*)(out_f + off[u]) = acc[u];
            }
        }
    }
}

// The fused merge after this CTA (split `split` of `n_splits`, groups of G) has written
// its partial: count in, and merge when last (see above). One warp.
template <int ROWS>
__device__ __forceinline__ void fm_tail(float* wsh, int split, int n_splits, int G, int m,
                                        int group, int nh, int rows, int row0, int kvh,
                                        float* part_o, float* part_lse, u32* counters,
                                        h16* out_h, float* out_f, float* lse_f) {
    const int lane = threadIdx.x & 31;
    const int ngroups = (n_splits + G - 1) / G;
    u32* cnt = counters + ((u64)blockIdx.y * gridDim.x + blockIdx.x) * FM_COUNTERS;
    const int g = split / G, g0 = g * G, gsize = min(G, n_splits - g0);
    // Every lane's partial is written before lane 0 counts the CTA in (the barrier orders
    // them before its release); the last arrival acquires every other CTA's partial and
    // its lanes read after the barrier.
    __syncwarp();
    u32 last = 0;
    if (lane == 0) {
        last = fm_arrive(cnt + g) == (u32)(gsize - 1);
        if (last) atomicExch(cnt + g, 0u);
    }
    if (!__shfl_sync(0xffffffffu, last, 0)) return;
    __syncwarp();
    if (ngroups == 1) {
        fm_merge<ROWS>(wsh, n_splits, 0, 1, -1, m, group, nh, rows, row0, kvh, part_o, part_lse,
                       out_h, out_f, lse_f);
        return;
    }
    if (gsize > 1)
        fm_merge<ROWS>(wsh, gsize, g0, 1, g0, m, group, nh, rows, row0, kvh, part_o, part_lse,
                       nullptr, nullptr, nullptr);
    __syncwarp();
    last = 0;
    if (lane == 0) {
        last = fm_arrive(cnt + FM_TOP) == (u32)(ngroups - 1);
        if (last) atomicExch(cnt + FM_TOP, 0u);
    }
    if (!__shfl_sync(0xffffffffu, last, 0)) return;
    __syncwarp();
    fm_merge<ROWS>(wsh, ngroups, 0, G, -1, m, group, nh, rows, row0, kvh, part_o, part_lse, out_h,
                   out_f, lse_f);
}

// Unpipelined: K and V of a tile load together, then Q.K^T, softmax and P.V. Runs 17 to
// 64 rows (4 warps x 16) and decoding (1 warp, below); at one warp, many small CTAs per
// SM keep more tile loads in flight than the pipelined one-warp variants (PERF_NOTES.md).
// KV8: items may be 8-bit (scale_off != 0, see AttnItem; int8, or fp8 e4m3 when its low
// bit is set): each 8-bit tile is staged
// into shared memory (cp.async, no registers held) while the tile before it is
// computed, widened in shared memory (stage_i8, unstage_i8), and its scales applied to
// the scores and to P; 16-bit items take the usual path. Dynamic shared memory.
// FM (one warp): the fused split merge (fm_tail): the splits' partials go to part_o and
// part_lse, the merged result to out_h, or out_f and lse_out.
template <int NW, bool KV8 = false, int TBN = BN, bool QREG = false, bool FM = false>
__device__ __forceinline__ void attn_simple_body(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out, h16* dyn_smem = nullptr,
    float* part_o = nullptr, float* part_lse = nullptr, u32* counters = nullptr,
    int merge_group = 0) {
    static_assert(!FM || NW == 1, "the fused merge runs in one-warp CTAs");
    // Launched as a dependent (decode): Q, the plan and the KV row come from earlier kernels.
    pdl_trigger();
    pdl_wait();
    constexpr int NT = 32 * NW;
    constexpr int ROWS = 16 * NW;
    h16 *sK, *sV;
    // Per-key scales of the tile (8-bit items; 1 for 16-bit ones) and the 8-bit staging.
    float *sKs = nullptr, *sVs = nullptr;
    const signed char* st8 = nullptr;
    if constexpr (KV8) {
        sK = dyn_smem;
        sV = dyn_smem + TBN * SROW;
        st8 = (const signed char*)dyn_smem + KV8_STAGE_OFF(TBN);
        sKs = (float*)((char*)dyn_smem + KV8_SCALE_OFF(TBN));
        sVs = sKs + TBN;
    } else {
        __shared__ __align__(16) h16 sK_s[TBN * SROW];
        __shared__ __align__(16) h16 sV_s[TBN * SROW];
        sK = sK_s;
        sV = sV_s;
    }
    constexpr int SC = (TBN + NT - 1) / NT;  // scale rows per thread
    h16 pks[SC], pvs[SC];                   // the staged tile's scales
    int st_it = -1, st_j0 = 0;              // the staged tile (item, first key)
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int rows = m * group;
    const int row0 = blockIdx.x * ROWS;
    // An empty split (a decode graph's padding): its zero partial without loading Q.
    if (split_begin[split] == split_begin[split + 1]) {
        float z[NDT][4];
#pragma unroll
        for (int i = 0; i < NDT; i++) z[i][0] = z[i][1] = z[i][2] = z[i][3] = 0.f;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int R = row0 + warp * 16 + g + half * 8;
            if (R < rows)
                store_row(z, half, 0.f, NEG_INF, R, m, group, nh, kvh, split, tig,
                          FM ? nullptr : out_h, FM ? part_o : out_f, FM ? part_lse : lse_out);
        }
        if constexpr (FM)
            fm_tail<ROWS>((float*)sK, split, gridDim.z, merge_group, m, group, nh, rows, row0, kvh,
                          part_o, part_lse, counters, out_h, out_f, lse_out);
        return;
    }
    // Shared-space addresses; this lane's ldmatrix row and column within a K fragment
    // (x4: keys +0..7 | +8..15, dims +0 | +8) and a transposed V fragment.
    const u32 sK_a = smem_addr(sK), sV_a = smem_addr(sV);
    const int lm = lane >> 3;
    const u32 k_lane = sK_a + (u32)(((lm >> 1) * 8 + (lane & 7)) * SROW + (lm & 1) * 8) * 2;
    const u32 v_lane = sV_a + (u32)(((lm & 1) * 8 + (lane & 7)) * SROW + (lm >> 1) * 8) * 2;

    // Q as A fragments: straight from global memory into registers (QREG: the first K/V
    // tile is requested without waiting for Q), or staged through shared memory (in sK).
    u32 qf[NKT][4];
    if constexpr (QREG) {
        q_fragments_global(qf, q, row0 + warp * 16 + g, rows, group, kvh, nh, tig);
    } else {
        load_q_rows<NT, ROWS>(sK_a, q, row0, rows, group, kvh, nh);
        cp_wait<0>();
        __syncthreads();
        q_fragments(qf, sK_a, warp, lane);
        __syncthreads();
    }

    // This thread's two rows and their tokens.
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
    const int ta = ra / group, tb = rb / group;
    // Last token any row of the CTA holds (bounds causal tiles).
    const int t_last = min(rows - 1, row0 + ROWS - 1) / group;

    float o[NDT][4];
#pragma unroll
    for (int i = 0; i < NDT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;

    const int it_begin = split_begin[split], it_end = split_begin[split + 1];
    const int t_first = row0 / group;
    const bool warp_active = row0 + warp * 16 < rows;
    const u32 st8_a = KV8 ? smem_addr(st8) : 0;
    if (KV8 && it_begin < it_end && items[it_begin].scale_off != 0) {
        const AttnItem& f = items[it_begin];
        if (f.key_begin < f.key_end) {
            stage_i8<NT, TBN, SC>(st8_a, f, kvh, f.key_begin, min(TBN, f.key_end - f.key_begin), pks,
                             pvs);
            st_it = it_begin;
            st_j0 = f.key_begin;
        }
    }
    for (int it = it_begin; it < it_end; it++) {
        const AttnItem item = items[it];
        const h16* kb = (const h16*)item.k + kvh * item.head_stride;
        const h16* vb = (const h16*)item.v + kvh * item.head_stride;
        int kend = item.key_end;
        if (item.causal_offset >= 0) kend = min(kend, t_last + item.causal_offset + 1);
        for (int j0 = item.key_begin; j0 < kend; j0 += TBN) {
            int n = min(TBN, kend - j0);
            if (KV8 && item.scale_off != 0) {
                if (st_it != it || st_j0 != j0) stage_i8<NT, TBN, SC>(st8_a, item, kvh, j0, n, pks, pvs);
                cp_wait<0>();
                // The staged tile landed for every thread, and every warp is done with
                // the previous tile's sK and sV (the barrier closing each tile).
                __syncthreads();
                unstage_i8<NT, TBN, SC>(sK, sV, st8, sKs, sVs, pks, pvs, (item.scale_off & 1) != 0);
                __syncthreads();
                // Stage the next tile (this item's, or the next item's first when that
                // is 8-bit too) while this one is computed.
                int nit = it, nj0 = j0 + TBN;
                if (nj0 >= kend) {
                    nit = it + 1;
                    nj0 = nit < it_end ? items[nit].key_begin : 0;
                }
                st_it = -1;
                if (nit < it_end && items[nit].scale_off != 0 && nj0 < items[nit].key_end) {
                    stage_i8<NT, TBN, SC>(st8_a, items[nit], kvh, nj0, min(TBN, items[nit].key_end - nj0),
                                     pks, pvs);
                    st_it = nit;
                    st_j0 = nj0;
                }
            } else {
                load_rows<NT, TBN>(sK_a, kb, item.row_stride, j0, n);
                cp_commit();
                load_rows<NT, TBN>(sV_a, vb, item.row_stride, j0, n);
                cp_commit();
                if (KV8)
                    for (int r = tid; r < TBN; r += NT) sKs[r] = sVs[r] = 1.f;
                cp_wait<1>();
            }
            __syncthreads();
            float s[TBN / 8][4];
#pragma unroll
            for (int i = 0; i < TBN / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            if (warp_active) {
#pragma unroll
                for (int np = 0; np < TBN / 16; np++) {
#pragma unroll
                    for (int kk = 0; kk < NKT; kk++) {
                        u32 b0, b1, b2, b3;
                        ldm_x4(b0, b1, b2, b3, k_lane + (u32)(np * 16 * SROW + kk * 16) * 2);
                        mma16816(s[2 * np], qf[kk], b0, b1);
                        mma16816(s[2 * np + 1], qf[kk], b2, b3);
                    }
                }
            }
            const bool need_mask = n < TBN || (item.causal_offset >= 0 && j0 + TBN - 1 > t_first + item.causal_offset);
            float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < TBN / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[nt][e] * scale_log2;
                    if (KV8) x *= sKs[nt * 8 + tig * 2 + (e & 1)];
                    x += item.log2_weight;
                    if (need_mask) {
                        int jl = nt * 8 + tig * 2 + (e & 1);
                        int t = e < 2 ? ta : tb;
                        bool ok = jl < n && (item.causal_offset < 0 || j0 + jl <= t + item.causal_offset);
                        x = ok ? x : NEG_INF;
                    }
                    s[nt][e] = x;
                    if (e < 2) mx_a = fmaxf(mx_a, x); else mx_b = fmaxf(mx_b, x);
                }
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
            float base_a = mn_a == NEG_INF ? 0.f : mn_a;
            float base_b = mn_b == NEG_INF ? 0.f : mn_b;
            float corr_a = fast_exp2(m_a - base_a), corr_b = fast_exp2(m_b - base_b);
            m_a = mn_a;
            m_b = mn_b;
            float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
            for (int nt = 0; nt < TBN / 8; nt++) {
                s[nt][0] = fast_exp2(s[nt][0] - base_a);
                s[nt][1] = fast_exp2(s[nt][1] - base_a);
                s[nt][2] = fast_exp2(s[nt][2] - base_b);
                s[nt][3] = fast_exp2(s[nt][3] - base_b);
                sum_a += s[nt][0] + s[nt][1];
                sum_b += s[nt][2] + s[nt][3];
            }
            l_a = l_a * corr_a + sum_a;
            l_b = l_b * corr_b + sum_b;
#pragma unroll
            for (int i = 0; i < NDT; i++) {
                o[i][0] *= corr_a;
                o[i][1] *= corr_a;
                o[i][2] *= corr_b;
                o[i][3] *= corr_b;
            }
            // V landed (16-bit tiles; an 8-bit tile's V is in sV already, and the wait
            // would drain the next tile's staging).
            if (!(KV8 && item.scale_off != 0)) {
                cp_wait<0>();
                __syncthreads();
            }
            if (warp_active) {
#pragma unroll
                for (int kk = 0; kk < TBN / 16; kk++) {
                    u32 a[4];
                    if (KV8) {
                        // P times the V rows' scales (keys 16 kk + 2 tig (+1), and + 8).
                        const int j = kk * 16 + tig * 2;
                        const float v0 = sVs[j], v1 = sVs[j + 1], v8 = sVs[j + 8], v9 = sVs[j + 9];
                        a[0] = pack2(s[2 * kk][0] * v0, s[2 * kk][1] * v1);
                        a[1] = pack2(s[2 * kk][2] * v0, s[2 * kk][3] * v1);
                        a[2] = pack2(s[2 * kk + 1][0] * v8, s[2 * kk + 1][1] * v9);
                        a[3] = pack2(s[2 * kk + 1][2] * v8, s[2 * kk + 1][3] * v9);
                    } else {
                        a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
                        a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
                        a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                        a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                    }
#pragma unroll
                    for (int dp = 0; dp < HEAD_DIM / 16; dp++) {
                        u32 b0, b1, b2, b3;
                        ldm_x4_t(b0, b1, b2, b3, v_lane + (u32)(kk * 16 * SROW + dp * 16) * 2);
                        mma16816(o[2 * dp], a, b0, b1);
                        mma16816(o[2 * dp + 1], a, b2, b3);
                    }
                }
            }
            __syncthreads();
        }
    }
    // Row sums over the quad, then write.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int R = half ? rb : ra;
        if (R >= rows) continue;
        store_row(o, half, half ? l_b : l_a, half ? m_b : m_a, R, m, group, nh, kvh, split, tig,
                  FM ? nullptr : out_h, FM ? part_o : out_f, FM ? part_lse : lse_out);
    }
    if constexpr (FM) {
        // Every tile ended with a barrier: sK is free for the merge weights.
        __syncthreads();
        fm_tail<ROWS>((float*)sK, split, gridDim.z, merge_group, m, group, nh, rows, row0, kvh,
                      part_o, part_lse, counters, out_h, out_f, lse_out);
    }
}

extern "C" __global__ void __launch_bounds__(128) attn_fwd_simple(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out) {
    attn_simple_body<4>(q, m, group, nh, items, split_begin, scale_log2, out_h, out_f, lse_out);
}

// One warp per CTA (16 rows): for decoding, where a KV head's rows are the GQA group of
// one or a few tokens; many small CTAs per SM keep more tile loads in flight. Q goes
// straight into registers (QREG).
extern "C" __global__ void __launch_bounds__(32) attn_fwd_w1(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out) {
    attn_simple_body<1, false, BN, true>(q, m, group, nh, items, split_begin, scale_log2, out_h,
                                         out_f, lse_out);
}

// attn_fwd_w1 with the fused split merge (fm_tail): partials to part_o and part_lse,
// the merged result to out_h, or out_f and lse_out.
extern "C" __global__ void __launch_bounds__(32) attn_fwd_w1_fm(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out, float* part_o, float* part_lse,
    u32* counters, int merge_group) {
    attn_simple_body<1, false, BN, true, true>(q, m, group, nh, items, split_begin, scale_log2,
                                               out_h, out_f, lse_out, nullptr, part_o, part_lse,
                                               counters, merge_group);
}

// attn_fwd_w1 with Q staged through shared memory (the earlier version; A/B runs).
extern "C" __global__ void __launch_bounds__(32) attn_fwd_w1_qsmem(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out) {
    attn_simple_body<1>(q, m, group, nh, items, split_begin, scale_log2, out_h, out_f, lse_out);
}

// The same two kernels for plans with 8-bit items (issue 13: a block kept in 8 bits in
// the GPU tier is read in 8 bits, half the bytes of a decode step's context).
#define ATTN_KV8_KERNEL(NAME, NW, TBN)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * NW) NAME(                                     \
        const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,    \
        const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,             \
        float* __restrict__ out_f, float* __restrict__ lse_out) {                                   \
        extern __shared__ __align__(16) h16 dyn_smem[];                                             \
        attn_simple_body<NW, true, TBN>(q, m, group, nh, items, split_begin, scale_log2, out_h,     \
                                        out_f, lse_out, dyn_smem);                                  \
    }

// 32-key tiles (the default: twice the resident CTAs of 64-key ones) and 64-key tiles.
ATTN_KV8_KERNEL(attn_fwd_simple_kv8, 4, 32)
ATTN_KV8_KERNEL(attn_fwd_w1_kv8, 1, 32)
ATTN_KV8_KERNEL(attn_fwd_simple_kv8_n64, 4, 64)
ATTN_KV8_KERNEL(attn_fwd_w1_kv8_n64, 1, 64)

// The one-warp 8-bit kernels with the fused split merge (see attn_fwd_w1_fm).
#define ATTN_KV8_FM_KERNEL(NAME, TBN)                                                               \
    extern "C" __global__ void __launch_bounds__(32) NAME(                                          \
        const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,    \
        const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,             \
        float* __restrict__ out_f, float* __restrict__ lse_out, float* part_o, float* part_lse,     \
        u32* counters, int merge_group) {                                                           \
        extern __shared__ __align__(16) h16 dyn_smem[];                                             \
        attn_simple_body<1, true, TBN, false, true>(q, m, group, nh, items, split_begin,            \
                                                    scale_log2, out_h, out_f, lse_out, dyn_smem,    \
                                                    part_o, part_lse, counters, merge_group);       \
    }

ATTN_KV8_FM_KERNEL(attn_fwd_w1_kv8_fm, 32)
ATTN_KV8_FM_KERNEL(attn_fwd_w1_kv8_n64_fm, 64)

// ---------------------------------------------------------------------------------------
// Decode attention with the operands swapped (attn_fwd_swap; AttnKernels::swap): up to 8
// rows per KV head (a decode's GQA group), one warp per CTA. The tensor cores compute
// S^T = K Q^T and O^T = V^T P^T, so the 16-row side of m16n8k16 is 16 keys or 16 output
// dims and the 8-column side the rows: half the products of the row-major kernels, which
// fill 16 rows with 4 (the 8B shape's group). K and V fragments come straight from the
// staged tile (8-bit values widened in registers: no 16-bit copy in shared memory, no
// barrier pair per tile): Q's and K's head dims are permuted alike so that a lane's four
// dims of a k-step are contiguous (one 16-byte load feeds four k-steps), and the output
// dims so that a lane's four dims of V are contiguous (one 4-byte load per key feeds two
// 16-dim products; pairs of keys gathered by byte permutes). P^T is the transpose of the
// S^T fragments (movmatrix). SWAP_STAGES tiles are staged ahead (cp.async): 32 keys of an
// 8-bit item or 16 of a 16-bit one per tile.
#ifndef SWAP_STAGES
#define SWAP_STAGES 2
#endif
// Staged row strides in bytes, chosen against bank conflicts (see PERF_NOTES.md): 8-bit K
// rows = 64 mod 128 (16-byte loads by lanes g, g + 1), V rows and 16-bit rows = 16 mod 64
// (loads by lanes 2 tig apart).
#define SW_K8 (HEAD_DIM % 128 == 0 ? HEAD_DIM + 64 : HEAD_DIM)
#define SW_V8 (HEAD_DIM + 16)
#define SW_16 (2 * HEAD_DIM + 16)
#define SW_SLOT8 (32 * (SW_K8 + SW_V8))
#define SW_SLOT16 (16 * 2 * SW_16)
#define SW_SLOT (SW_SLOT8 > SW_SLOT16 ? SW_SLOT8 : SW_SLOT16)

__device__ __forceinline__ u32 movm_trans(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

__device__ __forceinline__ void lds128(u32 addr, u32& a, u32& b, u32& c, u32& d) {
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(addr));
}
__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 r;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(addr));
    return r;
}
__device__ __forceinline__ void lds64(u32 addr, u32& a, u32& b) {
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(a), "=r"(b) : "r"(addr));
}

// The 8-bit tiles multiply in f16 whatever the model's 16-bit type: int8 and e4m3 values
// are exact in f16 and widen with two byte permutes and one f16x2 subtraction per four
// values (bf16 needs a trip through f32: ~11 instructions per four), and Q, cast to f16
// once per CTA, loses nothing a bf16 value holds above f16's normal range floor.
__device__ __forceinline__ void mma16816_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 pack2_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Four int8 values as two f16 pairs (exact): byte + 128 in the mantissa of 1024, minus 1152.
__device__ __forceinline__ void i8x4_to_f16(u32 x, u32& lo, u32& hi) {
    const u32 u = x ^ 0x80808080u, bias = 0x64806480u;
    const u32 a = __byte_perm(u, 0x64646464u, 0x4140), b = __byte_perm(u, 0x64646464u, 0x4342);
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(a), "r"(bias));
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(b), "r"(bias));
}
// Four e4m3 values as two f16 pairs (exact).
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 pair) {
#if __CUDA_ARCH__ >= 890
    u32 h;
    asm("{.reg .b16 lo;\n"
        " cvt.u16.u32 lo, %1;\n"
        " cvt.rn.f16x2.e4m3x2 %0, lo;}"
        : "=r"(h) : "r"(pair));
    return h;
#else
    const u32 t = __byte_perm(pair, 0u, 0x1404);
    const u32 h = (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h), "r"(0x5c005c00u));  // x 256
    return r;
#endif
}
__device__ __forceinline__ void w8_to_f16(u32 x, bool fp8, u32& lo, u32& hi) {
    if (fp8) {
        lo = e4m3x2_to_f16x2(x & 0xffffu);
        hi = e4m3x2_to_f16x2(x >> 16);
    } else {
        i8x4_to_f16(x, lo, hi);
    }
}
// A pair of the model's 16-bit values as f16.
__device__ __forceinline__ u32 h16x2_to_f16x2(u32 x) {
#ifdef DT_BF16
    return pack2_f16(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
#else
    return x;
#endif
}

// One staged tile: its item's fields and where it starts.
struct SwapTile {
    int it, j0, n;  // item, first key, valid keys (it < 0: none)
};

// Starts loading tile `t` into the slot at shared address `slot` (one commit group, also
// when there is nothing to load) and this lane's key scales (8-bit: key j0 + lane).
__device__ __forceinline__ void swap_stage(u32 slot, const AttnItem* items, SwapTile t, int kvh,
                                           h16& ks, h16& vs) {
    const int lane = threadIdx.x & 31;
    if (t.it >= 0) {
        const AttnItem& item = items[t.it];
        const long long hs = kvh * item.head_stride;
        if (item.scale_off != 0) {
            constexpr int CPR = HEAD_DIM / 16;
            const char* k8 = (const char*)item.k + hs;
            const char* v8 = (const char*)item.v + hs;
#pragma unroll
            for (int i = 0; i < 32 * CPR / 32; i++) {
                const int c = lane + 32 * i, r = c / CPR, col = (c % CPR) * 16;
                const bool valid = r < t.n;
                const long long off = valid ? (long long)(t.j0 + r) * HEAD_DIM + col : 0;
                cp_async16(slot + (u32)(r * SW_K8 + col), k8 + off, valid);
                cp_async16(slot + (u32)(32 * SW_K8 + r * SW_V8 + col), v8 + off, valid);
            }
            const long long sbase = (long long)kvh * (item.head_stride / item.row_stride) + t.j0;
            const long long soff = item.scale_off & ~1LL;
            const bool valid = lane < t.n;
            ks = valid ? ldg_h16((const h16*)((const char*)item.k + soff) + sbase + lane) : (h16)0;
            vs = valid ? ldg_h16((const h16*)((const char*)item.v + soff) + sbase + lane) : (h16)0;
        } else {
            constexpr int CPR = HEAD_DIM / 8;
            const h16* kb = (const h16*)item.k + hs;
            const h16* vb = (const h16*)item.v + hs;
#pragma unroll
            for (int i = 0; i < 16 * CPR / 32; i++) {
                const int c = lane + 32 * i, r = c / CPR, col = (c % CPR) * 8;
                const bool valid = r < t.n;
                const long long off = valid ? (long long)(t.j0 + r) * item.row_stride + col : 0;
                cp_async16(slot + (u32)(r * SW_16 + col * 2), kb + off, valid);
                cp_async16(slot + (u32)(16 * SW_16 + r * SW_16 + col * 2), vb + off, valid);
            }
        }
    }
    cp_commit();
}

// The next tile after cursor `c` (advanced past it): 32 keys of an 8-bit item, 16 of a
// 16-bit one.
__device__ __forceinline__ SwapTile swap_next(Cursor& c, const AttnItem* items, int it_end,
                                              int t_last) {
    settle(c, items, it_end, t_last);
    if (c.it >= it_end) return SwapTile{-1, 0, 0};
    const int keys = items[c.it].scale_off != 0 ? 32 : 16;
    SwapTile t{c.it, c.j0, min(keys, c.kend - c.j0)};
    c.j0 += keys;
    return t;
}

// Attends tile `t` (staged in `slot`): KC chunks of 16 keys (2: 8-bit, 1: 16-bit).
template <int KC, bool E8>
__device__ __forceinline__ void swap_tile(u32 slot, const AttnItem& item, SwapTile t, h16 ks_l,
                                          h16 vs_l, const u32 (&qb)[NKT][2],
                                          const u32 (&qh)[NKT][2], float scale_log2,
                                          int rows, int group, float (&m)[2], float (&l)[2],
                                          float (&oc)[NKT][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const bool fp8 = (item.scale_off & 1) != 0;
    // S^T: keys 16 kc + g (+ 8) x rows 2 tig (+ 1).
    float sc[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        sc[kc][0] = sc[kc][1] = sc[kc][2] = sc[kc][3] = 0.f;
#pragma unroll
        for (int h = 0; h < HEAD_DIM / 64; h++) {
            u32 ka[8], kb[8];
            if constexpr (E8) {
                u32 x[4], y[4];
                lds128(slot + (u32)((16 * kc + g) * SW_K8 + 64 * h + 16 * tig), x[0], x[1], x[2], x[3]);
                lds128(slot + (u32)((16 * kc + g + 8) * SW_K8 + 64 * h + 16 * tig), y[0], y[1], y[2],
                       y[3]);
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    w8_to_f16(x[w], fp8, ka[2 * w], ka[2 * w + 1]);
                    w8_to_f16(y[w], fp8, kb[2 * w], kb[2 * w + 1]);
                }
            } else {
                const u32 ra = slot + (u32)((16 * kc + g) * SW_16 + 2 * (64 * h + 16 * tig));
                const u32 rb = ra + 8 * SW_16;
                lds128(ra, ka[0], ka[1], ka[2], ka[3]);
                lds128(ra + 16, ka[4], ka[5], ka[6], ka[7]);
                lds128(rb, kb[0], kb[1], kb[2], kb[3]);
                lds128(rb + 16, kb[4], kb[5], kb[6], kb[7]);
            }
#pragma unroll
            for (int w = 0; w < 4; w++) {
                const u32 a[4] = {ka[2 * w], kb[2 * w], ka[2 * w + 1], kb[2 * w + 1]};
                if constexpr (E8)
                    mma16816_f16(sc[kc], a, qh[4 * h + w][0], qh[4 * h + w][1]);
                else
                    mma16816(sc[kc], a, qb[4 * h + w][0], qb[4 * h + w][1]);
            }
        }
    }
    // Scores in log2 units, masked; this tile's maxima per row (2 tig + e).
    const int t0 = (2 * tig) / group, t1 = (2 * tig + 1) / group;
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        float kscale[2] = {1.f, 1.f};
        if constexpr (E8) {
            kscale[0] = f16_to_f32((h16)__shfl_sync(0xffffffffu, (u32)ks_l, 16 * kc + g));
            kscale[1] = f16_to_f32((h16)__shfl_sync(0xffffffffu, (u32)ks_l, 16 * kc + g + 8));
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = 16 * kc + g + 8 * (e >> 1);
            const int tok = (e & 1) ? t1 : t0;
            float x = sc[kc][e] * scale_log2 * kscale[e >> 1] + item.log2_weight;
            const bool ok =
                key < t.n && (item.causal_offset < 0 || t.j0 + key <= tok + item.causal_offset);
            x = ok ? x : NEG_INF;
            sc[kc][e] = x;
            mx[e & 1] = fmaxf(mx[e & 1], x);
        }
    }
    float corr[2], base[2];
#pragma unroll
    for (int e = 0; e < 2; e++) {
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 4));
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 8));
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 16));
        const float mn = fmaxf(m[e], mx[e]);
        base[e] = mn == NEG_INF ? 0.f : mn;
        corr[e] = fast_exp2(m[e] - base[e]);
        m[e] = mn;
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int kc = 0; kc < KC; kc++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            sc[kc][e] = fast_exp2(sc[kc][e] - base[e & 1]);
            sum[e & 1] += sc[kc][e];
        }
    l[0] = l[0] * corr[0] + sum[0];
    l[1] = l[1] * corr[1] + sum[1];
#pragma unroll
    for (int i = 0; i < NKT; i++) {
        oc[i][0] *= corr[0];
        oc[i][1] *= corr[1];
        oc[i][2] *= corr[0];
        oc[i][3] *= corr[1];
    }
    // O^T += V^T P^T per chunk of 16 keys: P^T as B fragments (the transposes of the
    // S^T fragments, scaled by V's key scales), V^T as A fragments.
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        float vscale[2] = {1.f, 1.f};
        if constexpr (E8) {
            vscale[0] = f16_to_f32((h16)__shfl_sync(0xffffffffu, (u32)vs_l, 16 * kc + g));
            vscale[1] = f16_to_f32((h16)__shfl_sync(0xffffffffu, (u32)vs_l, 16 * kc + g + 8));
        }
        const u32 p0 = E8 ? pack2_f16(sc[kc][0] * vscale[0], sc[kc][1] * vscale[0])
                          : pack2(sc[kc][0], sc[kc][1]);
        const u32 p1 = E8 ? pack2_f16(sc[kc][2] * vscale[1], sc[kc][3] * vscale[1])
                          : pack2(sc[kc][2], sc[kc][3]);
        const u32 b0 = movm_trans(p0), b1 = movm_trans(p1);
        const int k0 = 16 * kc + 2 * tig;  // keys k0, k0 + 1, k0 + 8, k0 + 9
#pragma unroll
        for (int c = 0; c < HEAD_DIM / 32; c++) {
            u32 a0[4], a1[4];  // dims 32 c + 4 g + (0, 1) | (2, 3)
            if constexpr (E8) {
                const u32 vb = slot + 32 * SW_K8 + (u32)(32 * c + 4 * g);
                const u32 w0 = lds32(vb + k0 * SW_V8), w1 = lds32(vb + (k0 + 1) * SW_V8);
                const u32 w8 = lds32(vb + (k0 + 8) * SW_V8), w9 = lds32(vb + (k0 + 9) * SW_V8);
                w8_to_f16(__byte_perm(w0, w1, 0x5140), fp8, a0[0], a0[1]);
                w8_to_f16(__byte_perm(w8, w9, 0x5140), fp8, a0[2], a0[3]);
                w8_to_f16(__byte_perm(w0, w1, 0x7362), fp8, a1[0], a1[1]);
                w8_to_f16(__byte_perm(w8, w9, 0x7362), fp8, a1[2], a1[3]);
            } else {
                const u32 vb = slot + 16 * SW_16 + (u32)(2 * (32 * c + 4 * g));
                u32 x0, x1, y0, y1, z0, z1, u0, u1;
                lds64(vb + k0 * SW_16, x0, x1);
                lds64(vb + (k0 + 1) * SW_16, y0, y1);
                lds64(vb + (k0 + 8) * SW_16, z0, z1);
                lds64(vb + (k0 + 9) * SW_16, u0, u1);
                a0[0] = __byte_perm(x0, y0, 0x5410);
                a0[1] = __byte_perm(x0, y0, 0x7632);
                a0[2] = __byte_perm(z0, u0, 0x5410);
                a0[3] = __byte_perm(z0, u0, 0x7632);
                a1[0] = __byte_perm(x1, y1, 0x5410);
                a1[1] = __byte_perm(x1, y1, 0x7632);
                a1[2] = __byte_perm(z1, u1, 0x5410);
                a1[3] = __byte_perm(z1, u1, 0x7632);
            }
            if constexpr (E8) {
                mma16816_f16(oc[2 * c], a0, b0, b1);
                mma16816_f16(oc[2 * c + 1], a1, b0, b1);
            } else {
                mma16816(oc[2 * c], a0, b0, b1);
                mma16816(oc[2 * c + 1], a1, b0, b1);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(32) attn_fwd_swap(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out) {
    extern __shared__ __align__(16) h16 dyn_smem[];
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int rows = m * group;
    const u32 smem = smem_addr(dyn_smem);
    // Q^T as B fragments: row g, dims 64 h + 16 tig + 4 w + (0, 1) | (2, 3) for k-step
    // 4 h + w (the permutation K's fragments use too).
    u32 qb[NKT][2];
    {
        const h16* qr = g < rows
                            ? q + ((u64)(g / group) * nh + kvh * group + g % group) * HEAD_DIM
                            : nullptr;
#pragma unroll
        for (int h = 0; h < HEAD_DIM / 64; h++) {
            u32x4 a = {0u, 0u, 0u, 0u}, b = {0u, 0u, 0u, 0u};
            if (qr) {
                a = *(const u32x4*)(qr + 64 * h + 16 * tig);
                b = *(const u32x4*)(qr + 64 * h + 16 * tig + 8);
            }
            qb[4 * h + 0][0] = a.x; qb[4 * h + 0][1] = a.y;
            qb[4 * h + 1][0] = a.z; qb[4 * h + 1][1] = a.w;
            qb[4 * h + 2][0] = b.x; qb[4 * h + 2][1] = b.y;
            qb[4 * h + 3][0] = b.z; qb[4 * h + 3][1] = b.w;
        }
    }
    u32 qh[NKT][2];  // the same in f16, for 8-bit tiles
#pragma unroll
    for (int i = 0; i < NKT; i++) {
        qh[i][0] = h16x2_to_f16x2(qb[i][0]);
        qh[i][1] = h16x2_to_f16x2(qb[i][1]);
    }
    float oc[NKT][4];
#pragma unroll
    for (int i = 0; i < NKT; i++) oc[i][0] = oc[i][1] = oc[i][2] = oc[i][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};
    const int it_begin = split_begin[split], it_end = split_begin[split + 1];
    const int t_last = (rows - 1) / group;
    Cursor cur{it_begin, it_begin < it_end ? items[it_begin].key_begin : 0, 0};
    SwapTile tl[SWAP_STAGES];
    h16 ks[SWAP_STAGES], vs[SWAP_STAGES];
#pragma unroll
    for (int s = 0; s < SWAP_STAGES; s++) {
        tl[s] = swap_next(cur, items, it_end, t_last);
        swap_stage(smem + s * SW_SLOT, items, tl[s], kvh, ks[s], vs[s]);
    }
    bool more = tl[0].it >= 0;
    while (more) {
#pragma unroll
        for (int s = 0; s < SWAP_STAGES; s++) {
            if (tl[s].it < 0) {
                more = false;
                break;
            }
            cp_wait<SWAP_STAGES - 1>();
            __syncwarp();
            const u32 slot = smem + s * SW_SLOT;
            const AttnItem& item = items[tl[s].it];
            if (item.scale_off != 0)
                swap_tile<2, true>(slot, item, tl[s], ks[s], vs[s], qb, qh, scale_log2, rows,
                                   group, mrow, lrow, oc);
            else
                swap_tile<1, false>(slot, item, tl[s], ks[s], vs[s], qb, qh, scale_log2, rows,
                                    group, mrow, lrow, oc);
            __syncwarp();
            tl[s] = swap_next(cur, items, it_end, t_last);
            swap_stage(slot, items, tl[s], kvh, ks[s], vs[s]);
        }
    }
    cp_wait<0>();
    // Row sums over the 8 lanes of a tig, then each row's dims 32 c + 4 g + (0..3).
#pragma unroll
    for (int e = 0; e < 2; e++) {
        lrow[e] += __shfl_xor_sync(0xffffffffu, lrow[e], 4);
        lrow[e] += __shfl_xor_sync(0xffffffffu, lrow[e], 8);
        lrow[e] += __shfl_xor_sync(0xffffffffu, lrow[e], 16);
    }
    const float LN2 = 0.6931471805599453f;
    const int qw = nh * HEAD_DIM;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int R = 2 * tig + e;
        if (R >= rows) continue;
        const float lv = lrow[e];
        const float inv = lv > 0.f ? 1.f / lv : 0.f;
        const int t = R / group, head = kvh * group + R % group;
#pragma unroll
        for (int c = 0; c < HEAD_DIM / 32; c++) {
            const int col = 32 * c + 4 * g;
            const float v0 = oc[2 * c][e] * inv, v1 = oc[2 * c][2 + e] * inv;
            const float v2 = oc[2 * c + 1][e] * inv, v3 = oc[2 * c + 1][2 + e] * inv;
            if (out_h) {
                h16* dst = out_h + (u64)t * qw + head * HEAD_DIM + col;
                uint2 h;
                h.x = pack2(v0, v1);
                h.y = pack2(v2, v3);
                *(uint2*)dst = h;
            } else {
                float* dst = out_f + ((u64)split * m + t) * qw + head * HEAD_DIM + col;
                float4 f;
                f.x = v0;
                f.y = v1;
                f.z = v2;
                f.w = v3;
                *(float4*)dst = f;
            }
        }
        if (lse_out && g == 0)
            lse_out[((u64)split * nh + head) * m + t] =
                lv > 0.f ? (mrow[e] + __log2f(lv)) * LN2 : NEG_INF;
    }
}

// Merges n_splits partials (O f32 [split][m][nh d], lse [split][nh][m]) exactly:
// M = max lse_s, lse = M + ln sum exp(lse_s - M), O = sum exp(lse_s - lse) O_s.
// Writes a 16-bit output (out_h) or an f32 output with its lse (out_f, lse_f).
// One CTA per (token, head, dc-column chunk: blockIdx.z) of blockDim = dc * G threads: G
// groups each sum every G-th split with eight loads in flight, then the groups are added
// in shared memory (a decode step merges ~100 splits of one token: a single thread per
// column walking all of them was latency-bound at ~10 us, 6% of an 8B decode step over
// 128K keys). Column chunks (dc < d) spread one token's merge over more SMs, so that each
// thread has fewer splits to read (every chunk recomputes the splits' weights).
extern "C" __global__ void attn_merge(h16* out_h, float* out_f, float* lse_f, const float* part_o,
                                      const float* part_lse, int n_splits, int m, int nh, int d,
                                      int dc) {
    // Weights of the splits in shared memory (n_splits <= 1024), computed in parallel.
    __shared__ float w[1024];
    __shared__ float red[32];
    __shared__ float part[1024];
    // Launched as a dependent: the partials come from the attention kernel before it.
    pdl_trigger();
    pdl_wait();
    int t = blockIdx.x, head = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int qw = nh * d, G = blockDim.x / dc;
    const int c = threadIdx.x % dc, i = blockIdx.z * dc + c, grp = threadIdx.x / dc;
    const float* p = part_o + (u64)t * qw + head * d + i;
    const u64 stride = (u64)m * qw;
    // This thread's first eight partials, read before the weights exist (they do not
    // depend on them), so that the reads of O overlap those of the lse.
    float first[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int sk = grp + k * G;
        first[k] = sk < n_splits ? p[sk * stride] : 0.f;
    }
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) {
        float l = part_lse[((u64)s * nh + head) * m + t];
        w[s] = l;
        mx = fmaxf(mx, l);
    }
    mx = warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = lane < nw ? red[lane] : NEG_INF;
    mx = warp_max(mx);
    __syncthreads();
    float total = 0.f;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) {
        float e = w[s] == NEG_INF ? 0.f : expf(w[s] - mx);
        w[s] = e;
        total += e;
    }
    total = warp_sum(total);
    if (lane == 0) red[warp] = total;
    __syncthreads();
    total = lane < nw ? red[lane] : 0.f;
    total = warp_sum(total);
    float inv = total > 0.f ? 1.f / total : 0.f;
    float lse = total > 0.f ? mx + logf(total) : NEG_INF;
    float acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int sk = grp + k * G;
        acc[k] = sk < n_splits ? w[sk] * first[k] : 0.f;
    }
    // Eight predicated loads in flight per pass, also for the last, partial pass.
    for (int s = grp + 8 * G; s < n_splits; s += 8 * G) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int sk = s + k * G;
            if (sk < n_splits) acc[k] += w[sk] * p[sk * stride];
        }
    }
    part[threadIdx.x] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    __syncthreads();
    if (grp == 0) {
        float sum = 0.f;
        for (int g2 = 0; g2 < G; g2++) sum += part[g2 * dc + c];
        sum *= inv;
        if (out_h) out_h[(u64)t * qw + head * d + i] = f2h(sum);
        else out_f[(u64)t * qw + head * d + i] = sum;
    }
    if (lse_f && threadIdx.x == 0 && blockIdx.z == 0) lse_f[(u64)head * m + t] = lse;
}

// ---------------------------------------------------------------------------------------
// Pipelined attention: two-stage K/V buffers on mma.sync.
//
// Each warp owns MT m16 tiles (MT = 2: 32 rows), so every K or V fragment read from
// shared memory feeds MT tensor-core products: at MT = 1 the fragment reads, not the
// tensor cores, bound the kernel on an H100. Q stays in shared memory (in registers
// when MT = 1). K and V have two buffers each: the loads of tile t + 1 are issued right
// after the one barrier of tile t, so a whole tile of compute hides each load's latency
// (an earlier version that loaded V(t) during Q.K(t)^T and K(t+1) during P.V(t) waited
// on its loads at both of its barriers and ran 20-45% slower than the unpipelined
// kernel; two barriers a tile with loads two tiles ahead ran 3-5% slower than this).
// CTAs walk their rows heaviest first (causal rows further down see more keys), which
// shortens the tail of the last wave.
//
// Shared memory (dynamic): sK [2][TBN][SROW], sV [2][TBN][SROW], then sQ [ROWS][SROW]
// unless Q lives in registers.

template <int NW, int MT, int TBN>
__device__ __forceinline__ void attn_pipe_body(
    const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,
    const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,
    float* __restrict__ out_f, float* __restrict__ lse_out, h16* smem) {
    // Launched as a dependent: Q, the plan and the KV rows come from earlier kernels.
    pdl_trigger();
    pdl_wait();
    constexpr int NT = 32 * NW;
    constexpr int WROWS = 16 * MT;
    constexpr int ROWS = WROWS * NW;
    constexpr bool Q_REGS = MT == 1;
    constexpr int NST = TBN / 8;  // 8-key score tiles
    constexpr int STAGE = TBN * SROW;  // one K or V buffer
    h16* sK0 = smem;
    h16* sV0 = sK0 + 2 * STAGE;
    h16* sQ = sV0 + 2 * STAGE;
    const u32 sK0_a = smem_addr(sK0), sV0_a = smem_addr(sV0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3, mi = lane >> 3;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int rows = m * group;
    const int row0 = (gridDim.x - 1 - blockIdx.x) * ROWS;

    // Q tile -> shared memory (zero rows past the end); with MT = 1 staged through stage
    // 0 of K into registers.
    load_q_rows<NT, ROWS>(Q_REGS ? sK0_a : smem_addr(sQ), q, row0, rows, group, kvh, nh);
    u32 qf[NKT][4];
    if constexpr (Q_REGS) {
        cp_wait<0>();
        __syncthreads();
        q_fragments(qf, sK0_a, warp, lane);
        __syncthreads();
    }

    // This thread's first row; its rows are ra + 16 mt and ra + 16 mt + 8.
    const int ra = row0 + warp * WROWS + g;
    const int t_last = min(rows - 1, row0 + ROWS - 1) / group;
    const int t_first = row0 / group;
    const bool warp_active = row0 + warp * WROWS < rows;
    // This lane's ldmatrix addresses in stage 0: Q (x4: rows +0..7 | +8..15, dims +0 |
    // +8), K (keys +0..7 | +8..15, dims +0 | +8) and transposed V fragments.
    const u32 q_lane = smem_addr(sQ) + (u32)((warp * WROWS + (mi & 1) * 8 + (lane & 7)) * SROW + (mi >> 1) * 8) * 2;
    const u32 k_lane0 = sK0_a + (u32)(((mi >> 1) * 8 + (lane & 7)) * SROW + (mi & 1) * 8) * 2;
    const u32 v_lane0 = sV0_a + (u32)(((mi & 1) * 8 + (lane & 7)) * SROW + (mi >> 1) * 8) * 2;

    float o[MT][NDT][4];
    float mr[MT][2], lr[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < NDT; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
        mr[mt][0] = mr[mt][1] = NEG_INF;
        lr[mt][0] = lr[mt][1] = 0.f;
    }

    const int it_end = split_begin[split + 1];
    // `ld`: the next tile to load; `cur`: the tile to compute, one behind.
    Cursor ld;
    ld.it = split_begin[split];
    ld.j0 = ld.it < it_end ? items[ld.it].key_begin : 0;
    ld.kend = 0;
    settle(ld, items, it_end, t_last);
    const Cursor first = ld;
    // Loads tile `ld` into stage `st` (one commit group, empty past the end), then
    // advances `ld`.
    auto issue = [&](int st) {
        if (ld.it < it_end) {
            const AttnItem& it = items[ld.it];
            const long long hs = kvh * it.head_stride;
            const int n = min(TBN, ld.kend - ld.j0);
            load_rows<NT, TBN>(sK0_a + st * STAGE * 2, (const h16*)it.k + hs, it.row_stride, ld.j0, n);
            load_rows<NT, TBN>(sV0_a + st * STAGE * 2, (const h16*)it.v + hs, it.row_stride, ld.j0, n);
            ld.j0 += TBN;
            settle(ld, items, it_end, t_last);
        }
        cp_commit();
    };
    issue(0);
    Cursor cur = first;
    int st = 0;
    while (cur.it < it_end) {
        const int j0 = cur.j0, n = min(TBN, cur.kend - j0);
        const int causal = items[cur.it].causal_offset;
        const u32 k_lane = k_lane0 + st * STAGE * 2, v_lane = v_lane0 + st * STAGE * 2;
        cp_wait<0>();
        // One barrier a tile: tile t (and Q) landed for every thread, and every warp is
        // done with tile t - 1, whose stage now receives tile t + 1.
        __syncthreads();
        issue(st ^ 1);

        float s[MT][NST][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int i = 0; i < NST; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
        if (warp_active) {
#pragma unroll
            for (int kk = 0; kk < NKT; kk++) {
                u32 qa[MT][4];
                if constexpr (Q_REGS) {
                    qa[0][0] = qf[kk][0];
                    qa[0][1] = qf[kk][1];
                    qa[0][2] = qf[kk][2];
                    qa[0][3] = qf[kk][3];
                } else {
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
                        ldm_x4(qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3],
                               q_lane + (u32)(mt * 16 * SROW + kk * 16) * 2);
                }
#pragma unroll
                for (int np = 0; np < TBN / 16; np++) {
                    u32 b0, b1, b2, b3;
                    ldm_x4(b0, b1, b2, b3, k_lane + (u32)(np * 16 * SROW + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(s[mt][2 * np], qa[mt], b0, b1);
                        mma16816(s[mt][2 * np + 1], qa[mt], b2, b3);
                    }
                }
            }
        }

        // Mask, online softmax (P packed to 16 bits as soon as it exists), rescale O.
        // The running max `mr` (log2 units) moves only when a row's max grows by more
        // than RESCALE_SLACK: exponentials stay below 2^RESCALE_SLACK, the result is
        // unchanged (O and l share the stale max), and most tiles skip rescaling O. The
        // decision is per warp so that the rescale never diverges.
        constexpr float RESCALE_SLACK = 8.f;
        u32 pf[MT][NST][2];
        const bool need_mask = n < TBN || (causal >= 0 && j0 + TBN - 1 > t_first + causal);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NST; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[mt][nt][e];
                    if (need_mask) {
                        int jl = nt * 8 + tig * 2 + (e & 1);
                        int t = (ra + mt * 16 + (e < 2 ? 0 : 8)) / group;
                        bool ok = jl < n && (causal < 0 || j0 + jl <= t + causal);
                        x = ok ? x : NEG_INF;
                        s[mt][nt][e] = x;
                    }
                    if (e < 2) mx_a = fmaxf(mx_a, x); else mx_b = fmaxf(mx_b, x);
                }
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            mx_a *= scale_log2;  // scale_log2 > 0: the max commutes with the scaling
            mx_b *= scale_log2;
            const bool grow = mx_a > mr[mt][0] + RESCALE_SLACK || mx_b > mr[mt][1] + RESCALE_SLACK;
            if (__any_sync(0xffffffffu, grow)) {
                float mn_a = fmaxf(mr[mt][0], mx_a), mn_b = fmaxf(mr[mt][1], mx_b);
                float corr_a = mn_a == NEG_INF ? 1.f : fast_exp2(mr[mt][0] - mn_a);
                float corr_b = mn_b == NEG_INF ? 1.f : fast_exp2(mr[mt][1] - mn_b);
                mr[mt][0] = mn_a;
                mr[mt][1] = mn_b;
                lr[mt][0] *= corr_a;
                lr[mt][1] *= corr_b;
#pragma unroll
                for (int i = 0; i < NDT; i++) {
                    o[mt][i][0] *= corr_a;
                    o[mt][i][1] *= corr_a;
                    o[mt][i][2] *= corr_b;
                    o[mt][i][3] *= corr_b;
                }
            }
            // exp2(s * scale - max) as one FMA; rows that saw no key yet have max -inf.
            const float nb_a = mr[mt][0] == NEG_INF ? 0.f : -mr[mt][0];
            const float nb_b = mr[mt][1] == NEG_INF ? 0.f : -mr[mt][1];
            float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
            for (int nt = 0; nt < NST; nt++) {
                float p0 = fast_exp2(fmaf(s[mt][nt][0], scale_log2, nb_a));
                float p1 = fast_exp2(fmaf(s[mt][nt][1], scale_log2, nb_a));
                float p2 = fast_exp2(fmaf(s[mt][nt][2], scale_log2, nb_b));
                float p3 = fast_exp2(fmaf(s[mt][nt][3], scale_log2, nb_b));
                sum_a += p0 + p1;
                sum_b += p2 + p3;
                // P as the A operand of P.V: 16-bit pairs (row g, row g + 8).
                pf[mt][nt][0] = pack2(p0, p1);
                pf[mt][nt][1] = pack2(p2, p3);
            }
            lr[mt][0] += sum_a;
            lr[mt][1] += sum_b;
        }

        if (warp_active) {
#pragma unroll
            for (int kk = 0; kk < TBN / 16; kk++) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    a[mt][0] = pf[mt][2 * kk][0];
                    a[mt][1] = pf[mt][2 * kk][1];
                    a[mt][2] = pf[mt][2 * kk + 1][0];
                    a[mt][3] = pf[mt][2 * kk + 1][1];
                }
#pragma unroll
                for (int dp = 0; dp < HEAD_DIM / 16; dp++) {
                    u32 b0, b1, b2, b3;
                    ldm_x4_t(b0, b1, b2, b3, v_lane + (u32)(kk * 16 * SROW + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(o[mt][2 * dp], a[mt], b0, b1);
                        mma16816(o[mt][2 * dp + 1], a[mt], b2, b3);
                    }
                }
            }
        }
        cur.j0 = j0 + TBN;
        settle(cur, items, it_end, t_last);
        st ^= 1;
    }
    cp_wait<0>();

    // Row sums over the quad, then write.
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float l = lr[mt][half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            int R = row0 + warp * WROWS + mt * 16 + g + half * 8;
            if (R >= rows) continue;
            store_row(o[mt], half, l, mr[mt][half], R, m, group, nh, kvh, split, tig, out_h, out_f,
                      lse_out);
        }
    }
}

#define ATTN_PIPE_KERNEL(NAME, NW, MT, TBN, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB) NAME(                               \
        const h16* __restrict__ q, int m, int group, int nh, const AttnItem* __restrict__ items,    \
        const int* __restrict__ split_begin, float scale_log2, h16* __restrict__ out_h,             \
        float* __restrict__ out_f, float* __restrict__ lse_out) {                                   \
        extern __shared__ __align__(16) h16 dyn_smem[];                                             \
        attn_pipe_body<NW, MT, TBN>(q, m, group, nh, items, split_begin, scale_log2, out_h, out_f,  \
                                    lse_out, dyn_smem);                                             \
    }

// Long query runs (phase 1, phase-2 prefill): 4 warps x 32 rows, 64-key tiles.
ATTN_PIPE_KERNEL(attn_fwd_m32, 4, 2, 64, 2)
// The same with 32-key tiles (fewer score registers).
ATTN_PIPE_KERNEL(attn_fwd_m32n32, 4, 2, 32, 2)
// Decoding: one warp of 16 rows (a GQA group), Q in registers, pipelined 32-key tiles.
ATTN_PIPE_KERNEL(attn_fwd_p1n32, 1, 1, 32, 8)
