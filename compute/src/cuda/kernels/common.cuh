// starkv CUDA kernels: what every kernel source shares (types, 16-bit conversions,
// warp and block reductions). kernels.rs prepends it to each source (elementwise.cu,
// attention.cu) before NVRTC compiles them at run time (no CUDA headers needed).
//
// Compile-time parameters (given as -D options by kernels.rs):
//   DT_BF16     when defined the 16-bit type is bfloat16, otherwise IEEE half
//   HEAD_DIM    head dimension of the attention kernels (a multiple of 16, <= 256)
//
// 16-bit values are carried as `unsigned short` and converted with PTX instructions, so
// that neither cuda_fp16.h nor cuda_bf16.h is needed.

typedef unsigned short h16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

#ifdef DT_BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif

__device__ __forceinline__ float h2f(h16 h) {
#ifdef DT_BF16
    return __uint_as_float(((u32)h) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ h16 f2h(float f) {
    h16 h;
#ifdef DT_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// Two floats as a pair of 16-bit values: `lo` in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#ifdef DT_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float t = lane < nw ? part[lane] : 0.f;
    return warp_sum(t);
}

// Programmatic dependent launch (sm_90; `Gpu::launch_dependent`): a kernel launched with
// the attribute may start while the kernel before it in the stream still runs.
// pdl_trigger lets the kernel after this one start early (it still waits for this one
// to complete before reading what it writes); pdl_wait blocks until the kernel before
// this one has completed and its writes are visible. Every kernel launched with the
// attribute calls pdl_wait before reading anything an earlier kernel writes. Launched
// without the attribute (or before sm_90) both are no-ops.
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
