// starkv phase-1 attention for Hopper (sm_90a only), compiled by NVRTC after common.cuh
// and attn_common.cuh with -DHEAD_DIM=128 for target compute_90a, on first use (see
// kernels.rs). Same contract as attn_fwd_m32 in attention.cu (item table, splits, masks,
// 16-bit output or f32 partial with the natural-log lse), different machinery:
//
// - wgmma (warpgroup MMA): S = Q.K^T with both operands read from shared memory through
//   matrix descriptors, O += P.V with P in registers (the S accumulator layout of a
//   16-key slice is the A-fragment layout, so P never touches shared memory);
// - warp specialisation as in FlashAttention-3: warpgroup 0 is the producer filling a
//   two-stage K/V ring, each stage behind a "full" and an "empty" mbarrier: one thread
//   issuing bulk tensor copies (TMA, the `_tma` kernels, through per-item tensor maps:
//   tma.rs) or 128 threads issuing cp.async whose completion arrives on the barrier
//   (cp.async.mbarrier.arrive.noinc); warpgroups 1 and 2 are consumers, 64 query rows
//   each, each computing the softmax of tile t while the tensor cores add
//   P(t-1).V(t-1) (FlashAttention-3's intra-warpgroup overlap);
// - PINGPONG (FlashAttention-3's inter-warpgroup schedule): two named barriers hand the
//   tensor cores from one consumer warpgroup to the other, so that each issues its two
//   products of a tile only after the other has issued its own: the products of the
//   two alternate on the tensor cores and one's softmax runs under the other's products
//   (without it both tend to reach their softmax at once, and the tensor cores idle);
// - setmaxnreg: the producer gives registers back (24 with TMA, 40 with cp.async) so
//   that each consumer thread can hold S, P, the next P and O (240 or 232);
// - shared-memory tiles in the 128-byte swizzled layout wgmma reads (the one TMA writes):
//   a tile of R rows x 128 dims is two halves of R rows x 128 bytes (64 dims), and the
//   16-byte chunk c of row r sits at r * 128 + ((c ^ (r % 8)) * 16) in its half.
//
// Rows are (token, query head) pairs of one KV head as in attention.cu; a CTA holds 128
// of them (S9_BM) and walks its split's keys in tiles of BN keys (128 or 176), heaviest
// CTAs first. Measurements: PERF_NOTES.md and the README ("Phase-1 attention on Hopper").

#if HEAD_DIM != 128
#error "attention_sm90.cu is written for head_dim 128"
#endif
// Measurements only (env STARKV_SM90_DIAG): 1 loads only the first tiles of a CTA (the
// rest reuse them: the compute alone), 2 skips the consumers' products (the loads alone).
#ifndef S9_DIAG
#define S9_DIAG 0
#endif

#define S9_BM 128               // query rows per CTA (two consumer warpgroups)
#define S9_QHALF (S9_BM * 128)  // bytes of one 64-dim half of the Q tile
#define S9_NS 2                 // stages in the K/V ring
// Shared-memory layout for BN-key tiles (mirrors sm90_smem in attention.rs): the Q
// tile, then per stage a K tile and its V tile (each two halves of BN rows x 128 bytes),
// then four mbarriers a stage (K full, V full, K free, V free), then 1024 bytes of slack
// to align the base to 1024 (the swizzle repeats every 1024 bytes, and wgmma and the
// copies agree on it only from an aligned base).
__host__ __device__ constexpr u32 s9_half(int bn) { return (u32)bn * 128; }
__host__ __device__ constexpr u32 s9_tile(int bn) { return 2 * s9_half(bn); }
__host__ __device__ constexpr u32 s9_kv(int bn, int s) { return 2 * S9_QHALF + (u32)s * 2 * s9_tile(bn); }
__host__ __device__ constexpr u32 s9_bar(int bn) { return s9_kv(bn, S9_NS); }
// Named barriers: 1 and 2 order each consumer warpgroup's Q tile; 3 + w is consumer w's
// turn at the tensor cores (PINGPONG).
#define S9_BAR_Q 1
#define S9_BAR_TURN 3
// Bytes per item in the tensor-map table (mirrors tma.rs): K and V maps with 128-key
// boxes, then K and V maps with 176-key boxes.
#define ITEM_MAP_BYTES 512

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

// Blocks until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}

// The barrier receives one arrival once every cp.async this thread issued so far has
// landed (counted in the barrier's expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

// Counts `bytes` more expected from the copy engine in the barrier's current phase, and
// arrives.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

// One box of a 3-d tensor map (in global memory, generic address `map`) at coordinates
// (c0, c1, c2) into shared memory at `dst`, completing `bytes` on the barrier.
__device__ __forceinline__ void tma_load_3d(u32 dst, u64 map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, "
        "{%2, %3, %4}], [%5];" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// Orders this thread's view of shared memory written through the generic proxy (the
// copies) before its wgmma reads (the async proxy).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of an accumulator across a wgmma wait.
template <int R>
__device__ __forceinline__ void reg_fence(float (&d)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Named barrier `id` over `n` threads: wait for all of them, or only count this warp in.
__device__ __forceinline__ void named_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// A shared-memory matrix descriptor for the 128-byte swizzle: start address, leading
// byte offset (N-major operands: the distance between 64-element column blocks; unused
// for K-major ones), stride byte offset 1024 (between groups of 8 rows).
__device__ __forceinline__ u64 sw128_desc(u32 addr, u32 lbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(1024 >> 4) << 32) |
           (1ull << 62);
}

// The accumulator operands of an m64nNk16 wgmma: N / 2 f32 registers per thread, as
// d[N / 8][4].
#define S9_F4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define S9_F16(i) S9_F4(i), S9_F4(i + 1), S9_F4(i + 2), S9_F4(i + 3)
// m64n128k16: 64 accumulator registers per thread.
#define S9_ACC128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define S9_OUT128 S9_F16(0), S9_F16(4), S9_F16(8), S9_F16(12)
// m64n176k16: 88 accumulator registers per thread.
#define S9_ACC176 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}"
#define S9_OUT176 S9_F16(0), S9_F16(4), S9_F16(8), S9_F16(12), S9_F16(16), S9_F4(20), S9_F4(21)

// S (+)= A . B^T over one 16-deep step: A (64 x 16, K-major) and B (N x 16, K-major)
// from shared memory through descriptors; `accumulate` = 0 overwrites D.
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], u64 da, u64 db, int accumulate);
template <>
__device__ __forceinline__ void wgmma_ss<128>(float (&d)[16][4], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " " S9_ACC128
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : S9_OUT128
                 : "l"(da), "l"(db), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_ss<176>(float (&d)[22][4], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n176k16.f32." MMA_TYPE "." MMA_TYPE " " S9_ACC176
                 ", %88, %89, p, 1, 1, 0, 0;\n}\n"
                 : S9_OUT176
                 : "l"(da), "l"(db), "r"(accumulate));
}

// D += A . B over one 16-deep step: A (64 x 16) in registers (the m16n8k16 A-fragment
// layout per warp), B (16 x 128, N-major: rows of keys, columns of head dims) from shared
// memory through a descriptor.
__device__ __forceinline__ void wgmma_rs(float (&d)[16][4], const u32 (&a)[4], u64 db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " " S9_ACC128
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : S9_OUT128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// The online softmax of one S tile of NT * 8 keys (this thread's rows a and b = a + 8),
// S only read: the compiler makes any write to a wgmma accumulator register wait for
// every product in flight, which would put the wait for P(t-1).V(t-1) before the
// exponentials and serialise them. Keys at or past `lim_a` (`lim_b`) are masked for row
// a (b) when MASK, as the values are read (one branch per tile, not per element). Folds
// the tile's row maxima into the running max `mr` (log2 units) with deferred rescaling
// (the max moves only when a row's max grows by more than 8, so that most tiles skip
// rescaling O); adds the tile's exponentials to `lr` and packs them as 16-bit A fragments
// `pn` (the S accumulator of 16 keys is the A-fragment layout of P.V). Returns whether O
// must be multiplied by `corr` (per row) before the tile's P.V is added.
template <int NT, bool MASK>
__device__ __forceinline__ float masked(const float (&sacc)[NT][4], int nt, int e, int lim_a,
                                        int lim_b, int tig) {
    const float x = sacc[nt][e];
    if (!MASK) return x;
    const int jl = nt * 8 + tig * 2 + (e & 1);
    return jl < (e < 2 ? lim_a : lim_b) ? x : NEG_INF;
}

template <int NT, bool MASK, bool INPLACE>
__device__ __forceinline__ bool softmax_tile(float (&sacc)[NT][4], u32 (&pn)[NT / 2][4],
                                             float (&mr)[2], float (&lr)[2], float (&corr)[2],
                                             int lim_a, int lim_b, int tig, float scale_log2) {
    constexpr float RESCALE_SLACK = 8.f;
    float mx_a = NEG_INF, mx_b = NEG_INF, mx_c = NEG_INF, mx_d = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
        mx_a = fmaxf(mx_a, fmaxf(masked<NT, MASK>(sacc, nt, 0, lim_a, lim_b, tig),
                                 masked<NT, MASK>(sacc, nt, 1, lim_a, lim_b, tig)));
        mx_b = fmaxf(mx_b, fmaxf(masked<NT, MASK>(sacc, nt, 2, lim_a, lim_b, tig),
                                 masked<NT, MASK>(sacc, nt, 3, lim_a, lim_b, tig)));
        mx_c = fmaxf(mx_c, fmaxf(masked<NT, MASK>(sacc, nt + 1, 0, lim_a, lim_b, tig),
                                 masked<NT, MASK>(sacc, nt + 1, 1, lim_a, lim_b, tig)));
        mx_d = fmaxf(mx_d, fmaxf(masked<NT, MASK>(sacc, nt + 1, 2, lim_a, lim_b, tig),
                                 masked<NT, MASK>(sacc, nt + 1, 3, lim_a, lim_b, tig)));
    }
    mx_a = fmaxf(mx_a, mx_c);
    mx_b = fmaxf(mx_b, mx_d);
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    mx_a *= scale_log2;  // scale_log2 > 0: the max commutes with the scaling
    mx_b *= scale_log2;
    const bool grow = mx_a > mr[0] + RESCALE_SLACK || mx_b > mr[1] + RESCALE_SLACK;
    const bool rescale = __any_sync(0xffffffffu, grow);
    if (rescale) {
        const float mn_a = fmaxf(mr[0], mx_a), mn_b = fmaxf(mr[1], mx_b);
        corr[0] = mn_a == NEG_INF ? 1.f : fast_exp2(mr[0] - mn_a);
        corr[1] = mn_b == NEG_INF ? 1.f : fast_exp2(mr[1] - mn_b);
        mr[0] = mn_a;
        mr[1] = mn_b;
        lr[0] *= corr[0];
        lr[1] *= corr[1];
    }
    // exp2(s * scale - max) as one FMA; rows that saw no key yet have max -inf.
    const float nb_a = mr[0] == NEG_INF ? 0.f : -mr[0];
    const float nb_b = mr[1] == NEG_INF ? 0.f : -mr[1];
    float sum_a = 0.f, sum_b = 0.f, sum_c = 0.f, sum_d = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        // exp2(-inf) = 0 for masked keys.
        const float p0 = fast_exp2(fmaf(masked<NT, MASK>(sacc, nt, 0, lim_a, lim_b, tig), scale_log2, nb_a));
        const float p1 = fast_exp2(fmaf(masked<NT, MASK>(sacc, nt, 1, lim_a, lim_b, tig), scale_log2, nb_a));
        const float p2 = fast_exp2(fmaf(masked<NT, MASK>(sacc, nt, 2, lim_a, lim_b, tig), scale_log2, nb_b));
        const float p3 = fast_exp2(fmaf(masked<NT, MASK>(sacc, nt, 3, lim_a, lim_b, tig), scale_log2, nb_b));
        if (nt & 1) {
            sum_c += p0 + p1;
            sum_d += p2 + p3;
        } else {
            sum_a += p0 + p1;
            sum_b += p2 + p3;
        }
        if (INPLACE) {
            sacc[nt][0] = p0;
            sacc[nt][1] = p1;
            sacc[nt][2] = p2;
            sacc[nt][3] = p3;
        } else {
            // Slice nt / 2: (row a, keys +0..7), (row b, +0..7), (row a, +8..15), (row b, +8..15).
            pn[nt >> 1][(nt & 1) * 2 + 0] = pack2(p0, p1);
            pn[nt >> 1][(nt & 1) * 2 + 1] = pack2(p2, p3);
        }
    }
    lr[0] += sum_a + sum_c;
    lr[1] += sum_b + sum_d;
    return rescale;
}

__device__ __forceinline__ void scale_rows(float (&o)[16][4], const float (&corr)[2]) {
#pragma unroll
    for (int d = 0; d < 16; d++) {
        o[d][0] *= corr[0];
        o[d][1] *= corr[0];
        o[d][2] *= corr[1];
        o[d][3] *= corr[1];
    }
}

// Uses (without redefining) values, so that they are computed before this point and
// their registers stay theirs until it: a redefinition of a wgmma operand register by
// other code while a product is in flight makes the compiler serialise every wgmma.
template <int R>
__device__ __forceinline__ void keep_f(const float (&d)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" ::"f"(d[i][e]) : "memory");
}
template <int R>
__device__ __forceinline__ void keep_u(const u32 (&a)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" ::"r"(a[i][e]) : "memory");
}
template <int R>
__device__ __forceinline__ void reg_fence_u(u32 (&a)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(a[i][e])::"memory");
}

// S = Q.K^T of the BN-key K tile at `k_at`: 8 steps of 16 dims (4 in each 64-dim half,
// 32 bytes apart); committed as one wgmma group, not waited for.
template <int BN>
__device__ __forceinline__ void issue_qk(float (&sacc)[BN / 8][4], u32 q_at, u32 k_at) {
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < HEAD_DIM / 16; k++)
        wgmma_ss<BN>(sacc, sw128_desc(q_at + (k >> 2) * S9_QHALF + (k & 3) * 32, 16),
                     sw128_desc(k_at + (k >> 2) * s9_half(BN) + (k & 3) * 32, 16), k > 0);
    wgmma_commit();
}

// O += P.V of the BN-key V tile at `v_at`: BN / 16 steps of 16 keys; V is N-major (rows
// of keys, 64-dim column blocks s9_half(BN) apart), a 16-key step is two 8-row groups
// (2048 bytes). Committed as one wgmma group, not waited for.
template <int BN>
__device__ __forceinline__ void issue_pv(float (&o)[16][4], const u32 (&pf)[BN / 16][4], u32 v_at) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) wgmma_rs(o, pf[kk], sw128_desc(v_at + kk * 2048, s9_half(BN)));
    wgmma_commit();
}

// The kernel body, BN keys a tile. Each consumer issues S(t) = Q.K(t)^T and O +=
// P(t-1).V(t-1) back to back and computes the softmax of S(t) while the second product
// runs (FlashAttention-3's intra-warpgroup overlap); PINGPONG: the two consumers take
// turns at issuing (see the top of the file). The wait for P(t-1).V(t-1) comes after
// the last exponential of S(t): S is only read, P(t) goes to `pn` (kept, keep_u, before
// the wait; at 176 keys S is overwritten by its exponentials and packed after the wait),
// and S stays S's until after it (keep_f; ptxas would otherwise serialise the products,
// warning C7513).
// K and V have their own barriers (as in FlashAttention-3): K(t) is released as soon as
// S(t) is done, mid-iteration, so that the producer loads K(t + 2) while the tensor
// cores still add P(t-1).V(t-1); with one barrier per K+V stage the next tile's load
// could start only when an iteration ended, and every iteration waited for it.
// TMA: one producer thread loads each tile with four bulk tensor copies (the copy engine
// writes the 128-byte swizzle itself) through the tensor maps at `tmaps` (item i's maps
// at byte ITEM_MAP_BYTES * i, those with BN-key boxes first or second: see tma.rs);
// otherwise the producer warpgroup copies 16 bytes a thread with cp.async.
template <int BN, bool PINGPONG, bool TMA>
__device__ __forceinline__ void attn_sm90_body(const h16* __restrict__ q, int m, int group, int nh,
                                               const AttnItem* __restrict__ items,
                                               const int* __restrict__ split_begin,
                                               float scale_log2, h16* __restrict__ out_h,
                                               float* __restrict__ out_f,
                                               float* __restrict__ lse_out, const char* tmaps,
                                               unsigned char* smem) {
    constexpr int NT = BN / 8;  // 8-key column tiles of S
    constexpr bool INPLACE = BN > 128;
    constexpr u32 HALF = s9_half(BN), TILE = s9_tile(BN);
    const u32 base = (smem_addr(smem) + 1023u) & ~1023u;
    // mbarriers of stage s: K landed, V landed, K free, V free.
    const u32 full_k = base + s9_bar(BN), full_v = full_k + 8 * S9_NS;
    const u32 free_k = full_v + 8 * S9_NS, free_v = free_k + 8 * S9_NS;
    const int tid = threadIdx.x, wg = tid >> 7;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int rows = m * group;
    const int row0 = (gridDim.x - 1 - blockIdx.x) * S9_BM;
    const int t_last = min(rows - 1, row0 + S9_BM - 1) / group;
    const int t_first = row0 / group;
    const int it_end = split_begin[split + 1];
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < S9_NS; s++) {
            mbar_init(full_k + 8 * s, TMA ? 1 : 128);
            mbar_init(full_v + 8 * s, TMA ? 1 : 128);
            mbar_init(free_k + 8 * s, 256);
            mbar_init(free_v + 8 * s, 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    Cursor c;
    c.it = split_begin[split];
    c.j0 = c.it < it_end ? items[c.it].key_begin : 0;
    c.kend = 0;
    settle(c, items, it_end, t_last);

    if (wg == 0) {
        if (TMA) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
        } else {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        }
        // Producer. cp.async: thread pt copies 16-byte chunk ch of rows r0, r0 + 8, ...
        // of each K and V tile; every row it writes has r % 8 == r0, so its swizzled
        // column is fixed. TMA: thread 0 alone.
        if (TMA && tid != 0) return;
        const int ch = tid & 15, r0 = tid >> 4;
        const u32 dst0 = (u32)((ch >> 3) * HALF + r0 * 128 + (((ch & 7) ^ r0) << 4));
        int s = 0, phase = 0;  // stage of tile i, and the number of times it wrapped (mod 2)
        for (int i = 0; c.it < it_end; i++) {
            const u32 dk = base + s9_kv(BN, s), dv = dk + TILE;
            const bool diag = S9_DIAG == 1 && i >= S9_NS;  // measurements: no loads
            const AttnItem& it = items[c.it];
            const int n = min(BN, c.kend - c.j0);
            const long long off =
                kvh * it.head_stride + (long long)(c.j0 + r0) * it.row_stride + ch * 8;
            const long long step = 8LL * it.row_stride;
            const u64 map = (u64)(tmaps + (u64)c.it * ITEM_MAP_BYTES + (BN == 128 ? 0 : 256));
            // K, then V, each into its half of stage s once both consumers freed it
            // (the K of tile i - NS early, its V at the end of the iteration after).
#pragma unroll
            for (int kv = 0; kv < 2; kv++) {
                const u32 full = (kv ? full_v : full_k) + 8 * s, dst = kv ? dv : dk;
                if (i >= S9_NS) mbar_wait((kv ? free_v : free_k) + 8 * s, phase ^ 1);
                if (diag) {
                    if (TMA) mbar_arrive(full); else cp_async_arrive(full);
                } else if (TMA) {
                    mbar_expect_tx(full, TILE);
                    tma_load_3d(dst, map + kv * 128, 0, c.j0, kvh, full);
                    tma_load_3d(dst + HALF, map + kv * 128, 64, c.j0, kvh, full);
                } else {
                    const h16* src = (const h16*)(kv ? it.v : it.k);
                    const h16* g = src + off;
#pragma unroll
                    for (int r = 0; r < BN / 8; r++) {
                        const bool valid = r0 + 8 * r < n;
                        cp_async16(dst + dst0 + r * 1024, valid ? (const void*)g : (const void*)src, valid);
                        g += step;
                    }
                    cp_async_arrive(full);
                }
            }
            c.j0 += BN;
            settle(c, items, it_end, t_last);
            if (++s == S9_NS) {
                s = 0;
                phase ^= 1;
            }
        }
        if (!TMA) asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }

    // Consumers: warpgroup cw (0 or 1) owns rows row0 + 64 cw .. + 63.
    if (TMA) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    }
    const int cw = wg - 1, wt = tid & 127;
    const int warp = wt >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    {
        // This warpgroup's 64 Q rows (zero past the end) into the swizzled Q tile.
        const int ch = wt & 15, r0 = wt >> 4;
        const u32 dst0 =
            base + (u32)((ch >> 3) * S9_QHALF + (cw * 64 + r0) * 128 + (((ch & 7) ^ r0) << 4));
#pragma unroll
        for (int r = 0; r < 8; r++) {
            const int R = row0 + cw * 64 + r0 + 8 * r;
            const bool valid = R < rows;
            const h16* src = q;
            if (valid)
                src = q + (u64)(R / group) * nh * HEAD_DIM + (kvh * group + R % group) * HEAD_DIM + ch * 8;
            cp_async16(dst0 + r * 1024, src, valid);
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        fence_proxy_async();
        named_sync(S9_BAR_Q + cw, 128);
    }
    const u32 q_at = base + (u32)(cw * 64 * 128);
    const int ra = row0 + cw * 64 + warp * 16 + g;  // this thread's rows: ra, ra + 8
    const int ta = ra / group, tb = (ra + 8) / group;  // and their tokens

    // O is zero for a CTA without keys (its rows' lse is -inf).
    float o[16][4];
#pragma unroll
    for (int i = 0; i < 16; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mr[2] = {NEG_INF, NEG_INF}, lr[2] = {0.f, 0.f}, corr[2] = {1.f, 1.f};
    float sacc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
    // P of the tile whose P.V is still to be added. The first tile's iteration adds an
    // undefined P times V (of its own stage) and then zeroes O, instead of branching
    // around the product: with the P.V issue behind a branch, the hand-over between the
    // issues and the waits made ptxas serialise every product (C7514), and so did P
    // zeroed beforehand (C7513). The extra product is one of ~100 per CTA.
    u32 pf[NT / 2][4];
#pragma unroll
    for (int i = 0; i < NT / 2; i++)
        asm volatile("" : "=r"(pf[i][0]), "=r"(pf[i][1]), "=r"(pf[i][2]), "=r"(pf[i][3]));

    // Consumer 0 takes the first turn; each turn ends with a hand-over to the other.
    if (PINGPONG && cw == 0) named_arrive(S9_BAR_TURN, 256);
    int s = 0, phase = 0;           // the stage of tile t, and its wraps (mod 2)
    int prev = -1, prev_phase = 0;  // those of tile t - 1, whose P.V is still to be added
    while (c.it < it_end) {
        const int j0 = c.j0, n = min(BN, c.kend - j0);
        const int causal = items[c.it].causal_offset;
        const u32 k_at = base + s9_kv(BN, s);
        // The V read next: tile t - 1's, or for the first tile its own (see pf).
        const int vs = prev < 0 ? s : prev, vphase = prev < 0 ? phase : prev_phase;
        mbar_wait(full_k + 8 * s, phase);
        mbar_wait(full_v + 8 * vs, vphase);
        if (!TMA) fence_proxy_async();
        if (S9_DIAG == 2) {  // measurements: the loads alone
            mbar_wait(full_v + 8 * s, phase);
            mbar_arrive(free_k + 8 * s);
            mbar_arrive(free_v + 8 * s);
            c.j0 = j0 + BN;
            settle(c, items, it_end, t_last);
            if (++s == S9_NS) {
                s = 0;
                phase ^= 1;
            }
            continue;
        }
        if (PINGPONG) named_sync(S9_BAR_TURN + cw, 256);
        issue_qk<BN>(sacc, q_at, k_at);
        issue_pv<BN>(o, pf, base + s9_kv(BN, vs) + TILE);
        if (PINGPONG) named_arrive(S9_BAR_TURN + (cw ^ 1), 256);
        // S(t) is done when at most the P.V group is still pending: K(t) is free.
        wgmma_wait<1>();
        reg_fence(sacc);
        mbar_arrive(free_k + 8 * s);
        const bool need_mask = n < BN || (causal >= 0 && j0 + BN - 1 > t_first + causal);
        // Keys j0 + jl visible to token t: jl < n and, causal, j0 + jl <= t + causal.
        const int lim_a = causal < 0 ? n : min(n, ta + causal - j0 + 1);
        const int lim_b = causal < 0 ? n : min(n, tb + causal - j0 + 1);
        u32 pn[NT / 2][4];
        const bool rescale =
            need_mask ? softmax_tile<NT, true, INPLACE>(sacc, pn, mr, lr, corr, lim_a, lim_b, tig, scale_log2)
                      : softmax_tile<NT, false, INPLACE>(sacc, pn, mr, lr, corr, lim_a, lim_b, tig, scale_log2);
        if (INPLACE) {
            keep_f(sacc);
        } else {
            keep_u(pn);  // the exponentials before the wait below, not after it
        }
        wgmma_wait<0>();
        reg_fence(o);
        reg_fence_u(pf);
        if (INPLACE) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                pn[nt >> 1][(nt & 1) * 2 + 0] = pack2(sacc[nt][0], sacc[nt][1]);
                pn[nt >> 1][(nt & 1) * 2 + 1] = pack2(sacc[nt][2], sacc[nt][3]);
            }
        } else {
            keep_f(sacc);  // S's registers stay S's until here
        }
        if (prev >= 0) {
            mbar_arrive(free_v + 8 * prev);
            if (rescale) scale_rows(o, corr);
        } else {
#pragma unroll
            for (int i = 0; i < 16; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < NT / 2; kk++)
#pragma unroll
            for (int e = 0; e < 4; e++) pf[kk][e] = pn[kk][e];
        prev = s;
        prev_phase = phase;
        c.j0 = j0 + BN;
        settle(c, items, it_end, t_last);
        if (++s == S9_NS) {
            s = 0;
            phase ^= 1;
        }
    }
    if (prev >= 0) {
        issue_pv<BN>(o, pf, base + s9_kv(BN, prev) + TILE);
        wgmma_wait<0>();
        reg_fence(o);
        mbar_arrive(free_v + 8 * prev);
    }
    // Consumer 1's last hand-over, so that no arrival is left on a named barrier.
    if (PINGPONG && cw == 0) named_sync(S9_BAR_TURN, 256);

#pragma unroll
    for (int half = 0; half < 2; half++) {
        float l = lr[half];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int R = ra + half * 8;
        if (R < rows)
            store_row(o, half, l, mr[half], R, m, group, nh, kvh, split, tig, out_h, out_f, lse_out);
    }
}

// One configuration, as two kernels: NAME loads by cp.async, NAME_tma by TMA (one extra
// parameter: the items' tensor maps).
#define ATTN_SM90_KERNELS(NAME, BN, PINGPONG)                                                      \
    extern "C" __global__ void __launch_bounds__(384, 1)                                           \
        NAME(const h16* __restrict__ q, int m, int group, int nh,                                  \
             const AttnItem* __restrict__ items, const int* __restrict__ split_begin,              \
             float scale_log2, h16* __restrict__ out_h, float* __restrict__ out_f,                 \
             float* __restrict__ lse_out) {                                                        \
        extern __shared__ __align__(1024) unsigned char s9_smem[];                                 \
        attn_sm90_body<BN, PINGPONG, false>(q, m, group, nh, items, split_begin, scale_log2,       \
                                            out_h, out_f, lse_out, nullptr, s9_smem);              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(384, 1)                                           \
        NAME##_tma(const h16* __restrict__ q, int m, int group, int nh,                            \
                   const AttnItem* __restrict__ items, const int* __restrict__ split_begin,        \
                   float scale_log2, h16* __restrict__ out_h, float* __restrict__ out_f,           \
                   float* __restrict__ lse_out, const char* __restrict__ tmaps) {                  \
        extern __shared__ __align__(1024) unsigned char s9_smem[];                                 \
        attn_sm90_body<BN, PINGPONG, true>(q, m, group, nh, items, split_begin, scale_log2,        \
                                           out_h, out_f, lse_out, tmaps, s9_smem);                 \
    }

// The configurations (measured: README, "Phase-1 attention on Hopper"): 128-key tiles
// with the consumers overlapping freely, with ping-pong, and 176-key tiles with ping-pong
// (the default). S9_ONLY = n (set by kernels.rs, SM90_CONFIGS) instantiates only the
// n-th, so that a process compiles the one it launches (NVRTC takes ~2 s for each).
#ifndef S9_ONLY
#define S9_ONLY 0
#endif
#if S9_ONLY == 0 || S9_ONLY == 1
ATTN_SM90_KERNELS(attn_fwd_sm90_v2, 128, false)
#endif
#if S9_ONLY == 0 || S9_ONLY == 2
ATTN_SM90_KERNELS(attn_fwd_sm90_pp, 128, true)
#endif
#if S9_ONLY == 0 || S9_ONLY == 3
ATTN_SM90_KERNELS(attn_fwd_sm90_pp176, 176, true)
#endif
