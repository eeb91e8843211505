// starkv element-wise kernels (embedding, RMSNorm, RoPE, SwiGLU, conversions, fills,
// greedy sampling, layout changes), compiled by NVRTC after common.cuh.

// x[t][:] = table[tokens[t]][:] (16-bit table, f32 rows).
extern "C" __global__ void embed_rows(float* x, const h16* table, const u32* tokens, int hidden) {
    int t = blockIdx.x;
    const h16* row = table + (u64)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(u64)t * hidden + i] = h2f(row[i]);
}

// out[r][:] = x[r][:] / rms(x[r]) * w (f32 in, 16-bit or f32 out).
extern "C" __global__ void rms_norm_h(h16* out, const float* x, const float* w, int n, float eps) {
    int r = blockIdx.x;
    const float* row = x + (u64)r * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s);
    float scale = rsqrtf(s / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(u64)r * n + i] = f2h(row[i] * scale * w[i]);
}

extern "C" __global__ void rms_norm_f(float* out, const float* x, const float* w, int n, float eps) {
    int r = blockIdx.x;
    const float* row = x + (u64)r * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s);
    float scale = rsqrtf(s / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(u64)r * n + i] = row[i] * scale * w[i];
}

// cos/sin tables [m][pairs], angles in double precision as on the CPU.
extern "C" __global__ void rope_table(float* cos_t, float* sin_t, const int* pos, const double* inv_freq,
                                      int m, int pairs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * pairs) return;
    int t = i / pairs, p = i % pairs;
    double a = (double)pos[t] * inv_freq[p];
    double s, c;
    sincos(a, &s, &c);
    cos_t[i] = (float)c;
    sin_t[i] = (float)s;
}

// Splits fused projections qkv f32 [m][(nh + 2 nkv) d] into rotated Q (16-bit, [m][nh d]),
// rotated K and plain V written to a destination layout: element (kv head h, token t, i)
// at dst + h * head_stride + (t0 + t) * row_stride + i. t0 is read from t0_dev when that
// is not null (a decode step replayed from a CUDA graph: the row moves every step).
extern "C" __global__ void rope_split(h16* q, h16* k_dst, h16* v_dst, const float* qkv,
                                      const float* cos_t, const float* sin_t, int nh, int nkv, int d,
                                      int pairs, long long head_stride, int row_stride, int t0_arg,
                                      const int* t0_dev) {
    const int t0 = t0_dev ? *t0_dev : t0_arg;
    int t = blockIdx.x;
    int width = (nh + 2 * nkv) * d;
    const float* src = qkv + (u64)t * width;
    const float* c = cos_t + (u64)t * pairs;
    const float* s = sin_t + (u64)t * pairs;
    int half_d = d / 2;
    // Q and K: one thread per pair of dims.
    for (int j = threadIdx.x; j < (nh + nkv) * half_d; j += blockDim.x) {
        int head = j / half_d, p = j % half_d;
        int base = head * d + 2 * p;
        float a = src[base], b = src[base + 1];
        float r0 = a, r1 = b;
        if (p < pairs) {
            r0 = a * c[p] - b * s[p];
            r1 = a * s[p] + b * c[p];
        }
        u32 packed = pack2(r0, r1);
        if (head < nh) {
            *(u32*)(q + (u64)t * nh * d + base) = packed;
        } else {
            int h = head - nh;
            *(u32*)(k_dst + h * head_stride + (long long)(t0 + t) * row_stride + 2 * p) = packed;
        }
    }
    for (int j = threadIdx.x; j < nkv * half_d; j += blockDim.x) {
        int h = j / half_d, p = j % half_d;
        int base = (nh + nkv) * d + h * d + 2 * p;
        *(u32*)(v_dst + h * head_stride + (long long)(t0 + t) * row_stride + 2 * p) =
            pack2(src[base], src[base + 1]);
    }
}

// out[t][i] = silu(gu[t][i]) * gu[t][ffn + i], 16-bit out.
extern "C" __global__ void swiglu_h(h16* out, const float* gu, int m, int ffn) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)m * ffn) return;
    u64 t = i / ffn, j = i % ffn;
    float g = gu[t * 2 * ffn + j], u = gu[t * 2 * ffn + ffn + j];
    out[i] = f2h(g / (1.f + __expf(-g)) * u);
}

// f32 -> 16-bit and back.
extern "C" __global__ void to_h16(h16* out, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2h(x[i]);
}

extern "C" __global__ void to_f32(float* out, const h16* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = h2f(x[i]);
}

// Deterministic uniform values in [-bound, bound) from a hash of (seed, index).
__device__ __forceinline__ float hash_uniform(u64 seed, u64 i) {
    u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
}

extern "C" __global__ void fill_uniform_h(h16* out, u64 n, u64 seed, float bound) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2h(hash_uniform(seed, i) * bound);
}

extern "C" __global__ void fill_uniform_f(float* out, u64 n, u64 seed, float lo, float hi) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = lo + (hash_uniform(seed, i) * 0.5f + 0.5f) * (hi - lo);
}

// Greedy sampling support: per row of logits [rows][n], the index of the largest value
// (the lowest index on ties) and the row's log-sum-exp.
extern "C" __global__ void argmax_rows(u32* idx, float* lse, const float* logits, int n) {
    int r = blockIdx.x;
    const float* row = logits + (u64)r * n;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    __shared__ float sv[1024];
    __shared__ int si[1024];
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sv[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    float mx = sv[0];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += __expf(row[i] - mx);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        idx[r] = si[0];
        lse[r] = mx + logf(s);
    }
}

// A running (max, first index of the max, sum of exp(v - max)) merged with another.
struct MaxSum {
    float m;
    int i;
    float s;
};

__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    if (b.m > a.m || (b.m == a.m && b.i < a.i)) {
        MaxSum t = a;
        a = b;
        b = t;
    }
    // a has the larger max (or the same max and the smaller index).
    if (b.m != NEG_INF) a.s += b.s * expf(b.m - a.m);
    return a;
}

__device__ __forceinline__ MaxSum maxsum_warp(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum w;
        w.m = __shfl_xor_sync(0xffffffffu, v.m, o);
        w.i = __shfl_xor_sync(0xffffffffu, v.i, o);
        w.s = __shfl_xor_sync(0xffffffffu, v.s, o);
        v = maxsum_merge(v, w);
    }
    return v;
}

// The block's merged MaxSum, valid in every thread (blockDim.x a multiple of 32).
__device__ MaxSum maxsum_block(MaxSum v) {
    __shared__ MaxSum red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = maxsum_warp(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    MaxSum e = {NEG_INF, 0x7fffffff, 0.f};
    v = lane < nw ? red[lane] : e;
    return maxsum_warp(v);
}

// Argmax (the first index of the largest logit) and log-sum-exp of ONE row of n logits,
// over gridDim.x CTAs of `per` logits each: every CTA reduces its chunk in one pass (a
// running max with its rescaled sum of exponentials) to a MaxSum in part[blockIdx.x];
// the last CTA to finish (a device counter; it sets the counter back to zero for the
// next launch or graph replay) merges the partials. A decode step's pick: argmax_rows
// runs one CTA per row, which reads a 128K-entry vocabulary twice from one SM.
extern "C" __global__ void argmax_wide(u32* idx, float* lse, const float* logits, int n, int per,
                                       MaxSum* part, u32* counter) {
    __shared__ bool last;
    const int c0 = blockIdx.x * per, c1 = min(n, c0 + per);
    MaxSum v = {NEG_INF, 0x7fffffff, 0.f};
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const float x = logits[i];
        if (x > v.m) {
            v.s = (v.m == NEG_INF ? 0.f : v.s * __expf(v.m - x)) + 1.f;
            v.m = x;
            v.i = i;
        } else {
            v.s += __expf(x - v.m);
        }
    }
    v = maxsum_block(v);
    if (threadIdx.x == 0) {
        part[blockIdx.x] = v;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    MaxSum w = {NEG_INF, 0x7fffffff, 0.f};
    for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        MaxSum p;
        p.m = __ldcg(&part[b].m);
        p.i = __ldcg(&part[b].i);
        p.s = __ldcg(&part[b].s);
        w = maxsum_merge(w, p);
    }
    w = maxsum_block(w);
    if (threadIdx.x == 0) {
        idx[0] = (u32)w.i;
        lse[0] = w.s > 0.f ? w.m + logf(w.s) : NEG_INF;
        *counter = 0u;
    }
}

// Token-major 16-bit rows [len][nkv * d] -> head-major [nkv][len][d].
extern "C" __global__ void rows_to_heads(h16* dst, const h16* src, int len, int nkv, int d) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 n = (u64)len * nkv * d;
    if (i >= n) return;
    u64 t = i / ((u64)nkv * d), r = i % ((u64)nkv * d);
    u64 h = r / d, j = r % d;
    dst[(h * len + t) * d + j] = src[i];
}

// An f32 as OCP e4m3 (round to nearest even, saturated to +-448: what the `float8`
// crate's `F8E4M3::from_f32` writes; no NaN input). In software on every device so the
// one path the selftest checks is the one that runs.
__device__ __forceinline__ unsigned char f32_to_e4m3(float y) {
    const u32 sign = (__float_as_uint(y) >> 24) & 0x80u;
    const float a = fabsf(y);
    if (a >= 448.f) return (unsigned char)(sign | 0x7eu);
    if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (8 steps: the first normal)
        return (unsigned char)(sign | (u32)rintf(a * 512.f));
    }
    const u32 bits = __float_as_uint(a);
    int e = (int)(bits >> 23) - 127;
    u32 m = (bits >> 20) & 7u;
    const u32 rest = bits & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (m & 1u))) m++;
    if (m == 8u) {
        m = 0;
        e++;
    }
    return (unsigned char)(sign | ((u32)(e + 7) << 3) | m);
}

// 16-bit rows [rows][d] into an 8-bit device buffer: [rows][d] values, then one IEEE f16
// scale per row. The store's quantiser bit for bit (cache `quantize_row_i8` / `_f8`):
// scale = f16(amax / 127) (e4m3: / 448), q = round(x / scale) half away from zero,
// clamped to +-127 (e4m3: nearest even, saturated); an all-zero row gets scale 0.
// One warp per row.
extern "C" __global__ void quantize_rows(unsigned char* dst, const h16* src, int rows, int d,
                                         int fp8) {
    const int row = (int)(((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const h16* x = src + (u64)row * d;
    float amax = 0.f;
    for (int j = lane; j < d; j += 32) amax = fmaxf(amax, fabsf(h2f(x[j])));
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float scaled = fminf(__fdiv_rn(amax, fp8 ? 448.f : 127.f), 65504.f);
    unsigned short sh;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(sh) : "f"(scaled));
    float s;
    asm("cvt.f32.f16 %0, %1;" : "=f"(s) : "h"(sh));
    unsigned char* q = dst + (u64)row * d;
    const bool zero = !(s > 0.f);
    for (int j = lane; j < d; j += 32) {
        unsigned char out = 0;
        if (!zero) {
            const float y = __fdiv_rn(h2f(x[j]), s);
            out = fp8 ? f32_to_e4m3(y)
                      : (unsigned char)(signed char)(int)fminf(fmaxf(roundf(y), -127.f), 127.f);
        }
        q[j] = out;
    }
    if (lane == 0) ((unsigned short*)(dst + (u64)rows * d))[row] = zero ? (unsigned short)0 : sh;
}
