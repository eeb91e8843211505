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
// Then each warp takes a unit of two rows at a time (adjacent rows, or gate row j with up
// row ffn + j): every lane streams 16-byte chunks of both rows, GEMV_UNROLL chunks of each
// in flight, multiplies them with the staged x, and the warp adds its lanes by shuffles.
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

__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Before the wait: lets the next kernel launch, and starts the warp's first unit's rows
// (k 16-bit values each) on their way into L2, one 128-byte line per lane at a time.
__device__ __forceinline__ void gemv_prologue(const h16* wa, const h16* wb, bool valid, int k) {
    pdl_trigger();
    if (valid) {
        const int lane = threadIdx.x & 31;
        for (int off = lane * 64; off < k; off += 32 * 64) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wa + off));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wb + off));
        }
    }
    pdl_wait();
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

// Dot products of rows wa and wb (16-bit, k = 8 * k8 values each) with the staged x, summed
// over the warp: every lane returns both sums. Each round issues GEMV_UNROLL chunks of
// both rows before it multiplies any (chunks past the row's end are skipped), so a short
// row (SmolLM2's 576 values: at most 3 chunks a lane) is one round trip, not one a chunk.
__device__ __forceinline__ void gemv_pair(const h16* wa, const h16* wb, int k8, float& ya, float& yb) {
    const v4* A = (const v4*)wa;
    const v4* B = (const v4*)wb;
    const int lane = threadIdx.x & 31;
    float a = 0.f, b = 0.f;
    for (int c = lane; c < k8; c += 32 * GEMV_UNROLL) {
        v4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            if (c + 32 * u < k8) {
                ra[u] = ld_weights(A + c + 32 * u);
                rb[u] = ld_weights(B + c + 32 * u);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            if (c + 32 * u < k8) {
                v4 xv = gemv_x[c + 32 * u];
                a = dot8(ra[u], xv, a);
                b = dot8(rb[u], xv, b);
            }
        }
    }
    ya = warp_sum(a);
    yb = warp_sum(b);
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
    long long head_stride, int row_stride, int t0_arg, const int* t0_dev) {
    const int units = (nh + 2 * nkv) * d / 2, half_d = d / 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    {
        const int u0 = blockIdx.x * GEMV_WARPS + warp;
        gemv_prologue(w + (u64)2 * u0 * k, w + (u64)(2 * u0 + 1) * k, u0 < units, k);
    }
    gemv_stage(nullptr, x, norm_w, k, eps);
    const int t0 = t0_dev ? *t0_dev : t0_arg;
    for (int u = blockIdx.x * GEMV_WARPS + warp; u < units; u += gridDim.x * GEMV_WARPS) {
        const int row = 2 * u;
        float a, b;
        gemv_pair(w + (u64)row * k, w + (u64)(row + 1) * k, k / 8, a, b);
        if (lane != 0) continue;
        const int head = u / half_d, p = u % half_d;
        float r0 = a, r1 = b;
        if (head < nh + nkv && p < pairs) {
            r0 = a * cos_t[p] - b * sin_t[p];
            r1 = a * sin_t[p] + b * cos_t[p];
        }
        const u32 packed = pack2(r0, r1);
        if (head < nh) {
            *(u32*)(q + (u64)head * d + 2 * p) = packed;
        } else if (head < nh + nkv) {
            *(u32*)(k_dst + (head - nh) * head_stride + (long long)t0 * row_stride + 2 * p) = packed;
        } else {
            *(u32*)(v_dst + (head - nh - nkv) * head_stride + (long long)t0 * row_stride + 2 * p) = packed;
        }
    }
}

// Gate/up rows and SwiGLU of a decode step: x f32 [k] RMS-normalised with norm_w,
// multiplied by w [2 ffn][k] (gate rows, then up rows); act[j] = silu(gate_j) * up_j
// (16-bit), as swiglu_h computes it. One unit = gate row j with up row ffn + j.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_swiglu(
    h16* act, const h16* __restrict__ w, const float* x, const float* norm_w, float eps, int k, int ffn) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    {
        const int j0 = blockIdx.x * GEMV_WARPS + warp;
        gemv_prologue(w + (u64)j0 * k, w + (u64)(ffn + j0) * k, j0 < ffn, k);
    }
    gemv_stage(nullptr, x, norm_w, k, eps);
    for (int j = blockIdx.x * GEMV_WARPS + warp; j < ffn; j += gridDim.x * GEMV_WARPS) {
        float g, up;
        gemv_pair(w + (u64)j * k, w + (u64)(ffn + j) * k, k / 8, g, up);
        if (lane == 0) act[j] = f2h(g / (1.f + __expf(-g)) * up);
    }
}

// y[r] (+)= sum_i w[r][i] x[i] for r < n: x 16-bit (xh) or f32 converted to 16-bit (xf,
// when xh is null), y f32, added to (accumulate != 0: a residual add) or stored. One unit
// = rows 2u and 2u + 1 (a last odd row is paired with itself and written once).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rows(
    float* y, int accumulate, const h16* __restrict__ w, const h16* xh, const float* xf, int k, int n) {
    const int units = (n + 1) / 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    {
        const int u0 = blockIdx.x * GEMV_WARPS + warp;
        gemv_prologue(w + (u64)2 * u0 * k, w + (u64)min(2 * u0 + 1, n - 1) * k, u0 < units, k);
    }
    gemv_stage(xh, xf, nullptr, k, 0.f);
    for (int u = blockIdx.x * GEMV_WARPS + warp; u < units; u += gridDim.x * GEMV_WARPS) {
        const int ra = 2 * u, rb = min(2 * u + 1, n - 1);
        float a, b;
        gemv_pair(w + (u64)ra * k, w + (u64)rb * k, k / 8, a, b);
        if (lane != 0) continue;
        if (accumulate) {
            y[ra] += a;
            if (rb != ra) y[rb] += b;
        } else {
            y[ra] = a;
            if (rb != ra) y[rb] = b;
        }
    }
}
