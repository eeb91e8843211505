// starkv one-row matrix products for decode steps, compiled by NVRTC after common.cuh.
//
// y = W x for ONE input row x, with W 16-bit [n][k] row-major (the weight layout the
// cuBLAS path gets too) and f32 accumulation. At one row cuBLAS runs a tiny grid per
// product and the element-wise kernels around it (RMSNorm before, RoPE or SwiGLU after,
// the residual add) are launches of their own; a decode step is a chain of ~10 dependent
// kernels per layer, each bound by its own latency. These kernels fold that chain:
//
//   gemv_qkv_rope  RMSNorm(x) -> fused Q/K/V rows -> RoPE -> Q out, K/V to the cache row
//   gemv_swiglu    RMSNorm(x) -> gate and up rows -> silu(gate) * up (16-bit)
//   gemv_rows      plain product: added to a f32 residual (o and down projections) or
//                  stored as f32 (the LM head)
//
// Layout of the work: each CTA of GEMV_THREADS threads first stages x in shared memory in
// the 16-bit type (RMS-normalised on the way when given a norm weight, with the same loop
// and reduction as rms_norm_h, so the staged vector is the one the cuBLAS path multiplies).
// Then the CTA's warps take units of two rows (adjacent rows, or gate row j with up row
// ffn + j), `wpu` warps per unit (1, 2, 4 or 8; the launcher picks more when there are too
// few units to keep every SM streaming, as for the 8B shape's down projection: 2048 units
// over rows of 14336 values): each warp streams every wpu-th 512-byte slice of both rows,
// GEMV_UNROLL chunks of 16 bytes per lane and row in flight, multiplies them with the
// staged x, adds its lanes by shuffles, and the unit's warps add up in shared memory.
// k must be a multiple of 8 (16-byte chunks), checked by the launcher.
//
// Programmatic dependent launch (sm_90): the launcher lets each of these kernels start
// while the kernel before it in the stream is still running. Until griddepcontrol.wait
// returns (the previous kernel complete, its writes visible) a kernel only triggers its
// own dependents and prefetches its first rows of weights into L2 (weights never depend
// on an earlier kernel); every read of activations and every write comes after the wait.
// Launched without the attribute (or before sm_90) both instructions are no-ops.

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
// Matrices up to this size have their first rows prefetched into L2 before the wait;
// larger ones would only push each other's lines out of it (the 8B shape's gate/up
// projection ran 7% slower with every warp's first rows prefetched).
#define GEMV_PREFETCH_MAX (24ull << 20)
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4  // chunks of each row in flight per lane (env STARKV_GEMV_UNROLL)
#endif

struct alignas(16) v4 {
    u32 x, y, z, w;
};

// Weights are read once per step: a non-coherent load that does not keep them in L1.
__device__ __forceinline__ v4 ld_weights(const v4* p) {
    v4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ float lo16(u32 v) { return h2f((h16)(v & 0xffffu)); }
__device__ __forceinline__ float hi16(u32 v) { return h2f((h16)(v >> 16)); }

// acc + sum of the 8 products of one 16-byte chunk of weights and of x.
__device__ __forceinline__ float dot8(const v4& w, const v4& x, float acc) {
    acc = fmaf(lo16(w.x), lo16(x.x), acc);
    acc = fmaf(hi16(w.x), hi16(x.x), acc);
    acc = fmaf(lo16(w.y), lo16(x.y), acc);
    acc = fmaf(hi16(w.y), hi16(x.y), acc);
    acc = fmaf(lo16(w.z), lo16(x.z), acc);
    acc = fmaf(hi16(w.z), hi16(x.z), acc);
    acc = fmaf(lo16(w.w), lo16(x.w), acc);
    acc = fmaf(hi16(w.w), hi16(x.w), acc);
    return acc;
}

// The staged input vector, 16-bit, k values (dynamic shared memory of k * 2 bytes).
extern __shared__ v4 gemv_x[];

// Stages x into gemv_x: a 16-bit vector as is (xh), or an f32 vector (xf) converted, or
// an f32 vector RMS-normalised with norm_w (when not null) then converted.
__device__ __forceinline__ void gemv_stage(const h16* xh, const float* xf, const float* norm_w, int k,
                                           float eps) {
    h16* xs = (h16*)gemv_x;
    if (xh) {
        const v4* src = (const v4*)xh;
        for (int c = threadIdx.x; c < k / 8; c += blockDim.x) gemv_x[c] = src[c];
    } else if (norm_w) {
        float s = 0.f;
        for (int i = threadIdx.x; i < k; i += blockDim.x) s += xf[i] * xf[i];
        s = block_sum(s);
        float scale = rsqrtf(s / k + eps);
        for (int i = threadIdx.x; i < k; i += blockDim.x) xs[i] = f2h(xf[i] * scale * norm_w[i]);
    } else {
        for (int i = threadIdx.x; i < k; i += blockDim.x) xs[i] = f2h(xf[i]);
    }
    __syncthreads();
}

// Dot products of rows wa and wb (16-bit, k = 8 * k8 values each) with the staged x, over
// this warp's slices (`part` of `wpu`: chunks part * 32 + 32 wpu i + lane), summed over
// the warp: every lane returns both sums. Each round issues GEMV_UNROLL chunks of both
// rows before it multiplies any (chunks past the row's end are skipped), so a short row
// (SmolLM2's 576 values: at most 3 chunks a lane) is one round trip, not one a chunk.
__device__ __forceinline__ void gemv_pair(const h16* wa, const h16* wb, int k8, int part, int wpu,
                                          float& ya, float& yb) {
    const v4* A = (const v4*)wa;
    const v4* B = (const v4*)wb;
    const int lane = threadIdx.x & 31, step = 32 * wpu;
    float a = 0.f, b = 0.f;
    for (int c = part * 32 + lane; c < k8; c += step * GEMV_UNROLL) {
        v4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            if (c + step * u < k8) {
                ra[u] = ld_weights(A + c + step * u);
                rb[u] = ld_weights(B + c + step * u);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            if (c + step * u < k8) {
                v4 xv = gemv_x[c + step * u];
                a = dot8(ra[u], xv, a);
                b = dot8(rb[u], xv, b);
            }
        }
    }
    ya = warp_sum(a);
    yb = warp_sum(b);
}

// The shared body of the one-row kernels: w [n][k] 16-bit, `units` row pairs (`rows(u, ra,
// rb)` names them), `wpu` warps per unit. Before the PDL wait: trigger the next kernel and
// prefetch this warp's part of its first unit into L2 (small matrices only); then stage x
// (xh, or xf with or without norm_w) and walk the units; `epi(u, a, b)` runs on one
// thread per unit with both rows' sums. Every warp of a CTA makes the same number of
// passes (units past the end compute nothing), so the barriers are uniform.
template <class Rows, class Epi>
__device__ __forceinline__ void gemv_run(const h16* __restrict__ w, int n, int k, int units, int wpu,
                                         const h16* xh, const float* xf, const float* norm_w,
                                         float eps, Rows rows, Epi epi) {
    __shared__ float red[GEMV_WARPS][2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int upb = GEMV_WARPS / wpu, group = warp / wpu, part = warp % wpu;
    pdl_trigger();
    {
        const int u0 = blockIdx.x * upb + group;
        if (u0 < units && (u64)n * k * 2 <= GEMV_PREFETCH_MAX) {
            int ra, rb;
            rows(u0, ra, rb);
            for (int line = part * 32 + lane; line * 64 < k; line += 32 * wpu) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (u64)ra * k + line * 64));
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (u64)rb * k + line * 64));
            }
        }
    }
    pdl_wait();
    gemv_stage(xh, xf, norm_w, k, eps);
    for (int base = blockIdx.x * upb; base < units; base += gridDim.x * upb) {
        const int u = base + group;
        float a = 0.f, b = 0.f;
        if (u < units) {
            int ra, rb;
            rows(u, ra, rb);
            gemv_pair(w + (u64)ra * k, w + (u64)rb * k, k / 8, part, wpu, a, b);
        }
        if (wpu > 1) {
            if (lane == 0) {
                red[warp][0] = a;
                red[warp][1] = b;
            }
            __syncthreads();
            if (part == 0) {
                for (int p = 1; p < wpu; p++) {
                    a += red[warp + p][0];
                    b += red[warp + p][1];
                }
            }
            __syncthreads();
        }
        if (u < units && part == 0 && lane == 0) epi(u, a, b);
    }
}

// Fused Q/K/V rows of a decode step: x f32 [k] (the residual stream) RMS-normalised with
// norm_w, multiplied by w [(nh + 2 nkv) d][k]; then RoPE on Q and K (interleaved pairs,
// cos/sin tables of the one position, `pairs` rotated pairs per head) and the split:
// Q to q (16-bit [nh d]), K and V to their cache row as rope_split writes them (element
// (kv head h, i) at dst + h * head_stride + t0 * row_stride + i; t0 from t0_dev when not
// null). One unit = the two rows of one pair (2u, 2u + 1).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_qkv_rope(
    h16* q, h16* k_dst, h16* v_dst, const h16* __restrict__ w, const float* x, const float* norm_w,
    float eps, int k, const float* cos_t, const float* sin_t, int nh, int nkv, int d, int pairs,
    long long head_stride, int row_stride, int t0_arg, const int* t0_dev, int wpu) {
    const int units = (nh + 2 * nkv) * d / 2, half_d = d / 2;
    gemv_run(
        w, 2 * units, k, units, wpu, nullptr, x, norm_w, eps,
        [](int u, int& ra, int& rb) {
            ra = 2 * u;
            rb = 2 * u + 1;
        },
        [&](int u, float a, float b) {
            const int head = u / half_d, p = u % half_d;
            float r0 = a, r1 = b;
            if (head < nh + nkv && p < pairs) {
                r0 = a * cos_t[p] - b * sin_t[p];
                r1 = a * sin_t[p] + b * cos_t[p];
            }
            const u32 packed = pack2(r0, r1);
            const int t0 = t0_dev ? *t0_dev : t0_arg;
            if (head < nh) {
                *(u32*)(q + (u64)head * d + 2 * p) = packed;
            } else if (head < nh + nkv) {
                *(u32*)(k_dst + (head - nh) * head_stride + (long long)t0 * row_stride + 2 * p) = packed;
            } else {
                *(u32*)(v_dst + (head - nh - nkv) * head_stride + (long long)t0 * row_stride + 2 * p) = packed;
            }
        });
}

// Gate/up rows and SwiGLU of a decode step: x f32 [k] RMS-normalised with norm_w,
// multiplied by w [2 ffn][k] (gate rows, then up rows); act[j] = silu(gate_j) * up_j
// (16-bit), as swiglu_h computes it. One unit = gate row j with up row ffn + j.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_swiglu(
    h16* act, const h16* __restrict__ w, const float* x, const float* norm_w, float eps, int k, int ffn,
    int wpu) {
    gemv_run(
        w, 2 * ffn, k, ffn, wpu, nullptr, x, norm_w, eps,
        [=](int j, int& ra, int& rb) {
            ra = j;
            rb = ffn + j;
        },
        [=](int j, float g, float up) { act[j] = f2h(g / (1.f + __expf(-g)) * up); });
}

// y[r] (+)= sum_i w[r][i] x[i] for r < n: x 16-bit (xh) or f32 converted to 16-bit (xf,
// when xh is null), y f32, added to (accumulate != 0: a residual add) or stored. One unit
// = rows 2u and 2u + 1 (a last odd row is paired with itself and written once).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rows(
    float* y, int accumulate, const h16* __restrict__ w, const h16* xh, const float* xf, int k, int n,
    int wpu) {
    gemv_run(
        w, n, k, (n + 1) / 2, wpu, xh, xf, nullptr, 0.f,
        [=](int u, int& ra, int& rb) {
            ra = 2 * u;
            rb = min(2 * u + 1, n - 1);
        },
        [=](int u, float a, float b) {
            const int ra = 2 * u, rb = min(2 * u + 1, n - 1);
            if (accumulate) {
                y[ra] += a;
                if (rb != ra) y[rb] += b;
            } else {
                y[ra] = a;
                if (rb != ra) y[rb] = b;
            }
        });
}
