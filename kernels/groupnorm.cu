// groupnorm.cu: GroupNorm over G groups with SiLU optionally fused, on a two-source input (the
// UNet's ResnetBlock after a skip concat normalises concat(h, skip): the concat is read in place).
//
//   out[n, p, c] = silu?((x[n, p, c] - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c]),  g = c / (C/G)
//   x[n, p, c] = a[n, p, c] for c < Ca, b[n, p, c - Ca] otherwise
//
// Layout: NHWC (p the pixel index y*W + x); gamma, beta f32 (C); stats f32 (N x G x 2: mean, 1/std),
// saved for the backward; partials f32 scratch (N x G x chunks x 3), allocated once by the backend.
// Precision: any storage type for a, b and out (run-time codes); statistics in f32 per chunk, two
// passes (mean, then the sum of squared deviations), the chunks merged with Chan's formula in f64,
// so a large mean does not cancel the variance; eps added in f64 as on the CPU.
// Three kernels, the fast and only version:
//   groupnorm_partial_stats  grid (chunks, G, N): each block reduces a slice of pixels of one group,
//                            so batch 1 (32 groups) still fills every SM: the host picks chunks;
//   groupnorm_finalize       one thread per (n, g): merges the chunks into stats;
//   groupnorm_apply          one thread per `vec` channels of a pixel (one access each: every byte of
//                            a sector used): normalise, affine, SiLU, one rounding.
//
// Backward (src/backend/cpu/norm.rs `backward` is the reference), on one-source x (the caller splits
// a concat's gradient), stats from the forward, dx written or accumulated (`accumulate`):
//   xhat = (x - mean) rstd,  g = dout * silu'(xhat gamma + beta)? * gamma,
//   dx (+)= rstd (g - mean_group(g) - xhat mean_group(g xhat))
// Three kernels, the same chunking as the forward (batch 1 fills the device):
//   groupnorm_backward_partial   grid (chunks, G, N): f32 sums of g and g xhat over a slice of pixels;
//   groupnorm_backward_finalize  one thread per (n, g): the chunks summed in f64, divided by the group
//                                size; the two means written over the group's first chunk slot;
//   groupnorm_backward_apply     one thread per `vec` channels of a pixel: dx (+)= ..., one rounding.
#include "common.cuh"

struct GroupNormShape {
    int batch, pixels, ca, cb, groups, chunks;
};

// Every index is 32-bit (the launcher checks that the tensors hold fewer than 2^31 elements): a
// 64-bit division is a long software routine, and these kernels once spent most of their time in
// three of them per element.

__device__ __forceinline__ float load_two_source(const void* a, int dt_a, const void* b, int dt_b, int pixel, int c,
                                                 const GroupNormShape& s) {
    return c < s.ca ? load_dyn(a, dt_a, (long long)pixel * s.ca + c)
                    : load_dyn(b, dt_b, (long long)pixel * s.cb + (c - s.ca));
}

// f(pixel, channel in group) over pixels [p0, p1) of one group, spread over the block. The launcher
// makes the block a multiple of the group's channel count where it can: each thread then keeps one
// channel and steps over pixels with no division.
template <typename F>
__device__ __forceinline__ void for_each_in_slice(int p0, int p1, int cpg, F&& f) {
    if (blockDim.x % cpg == 0) {
        const int ch = threadIdx.x % cpg, step = blockDim.x / cpg;
        for (int p = p0 + threadIdx.x / cpg; p < p1; p += step) f(p, ch);
    } else {
        const int count = (p1 - p0) * cpg;
        for (int j = threadIdx.x; j < count; j += blockDim.x) f(p0 + j / cpg, j % cpg);
    }
}

// The pixels [p0, p1) of `chunk`.
__device__ __forceinline__ int2 chunk_pixels(int chunk, const GroupNormShape& s) {
    const int per_chunk = (s.pixels + s.chunks - 1) / s.chunks;
    const int p0 = min(chunk * per_chunk, s.pixels);
    return make_int2(p0, min(p0 + per_chunk, s.pixels));
}

extern "C" __global__ void __launch_bounds__(1024) groupnorm_partial_stats(const void* a, int dt_a, const void* b,
                                                                           int dt_b, float* partials,
                                                                           GroupNormShape s) {
    __shared__ float scratch[32];
    const int chunk = blockIdx.x, g = blockIdx.y, n = blockIdx.z;
    const int cpg = (s.ca + s.cb) / s.groups;
    const int2 range = chunk_pixels(chunk, s);
    const int count = (range.y - range.x) * cpg;
    const int first_pixel = n * s.pixels;

    float sum = 0.0f;
    for_each_in_slice(range.x, range.y, cpg, [&](int p, int ch) {
        sum += load_two_source(a, dt_a, b, dt_b, first_pixel + p, g * cpg + ch, s);
    });
    const float mean = count > 0 ? block_sum(sum, scratch) / (float)count : 0.0f;
    float m2 = 0.0f;
    for_each_in_slice(range.x, range.y, cpg, [&](int p, int ch) {
        const float d = load_two_source(a, dt_a, b, dt_b, first_pixel + p, g * cpg + ch, s) - mean;
        m2 += d * d;
    });
    m2 = count > 0 ? block_sum(m2, scratch) : 0.0f;
    if (threadIdx.x == 0) {
        float* out = partials + ((n * s.groups + g) * s.chunks + chunk) * 3;
        out[0] = (float)count;
        out[1] = mean;
        out[2] = m2;
    }
}

extern "C" __global__ void groupnorm_finalize(const float* partials, float* stats, GroupNormShape s, float eps) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= s.batch * s.groups) return;
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int k = 0; k < s.chunks; ++k) {
        const float* p = partials + (ng * s.chunks + k) * 3;
        const double nb = p[0];
        if (nb == 0.0) continue;
        const double delta = (double)p[1] - mean, total = count + nb;
        mean += delta * nb / total;
        m2 += (double)p[2] + delta * delta * count * nb / total;
        count = total;
    }
    const double var = m2 / count;
    stats[ng * 2] = (float)mean;
    stats[ng * 2 + 1] = (float)(1.0 / sqrt(var + (double)eps));
}

// The element-wise kernels take VEC consecutive channels of one pixel per thread (VEC divides Ca,
// Cb and the group size, and the tensors are aligned to VEC elements: the launcher picks 8, 4, 2 or
// 1), so the index arithmetic is paid once per VEC elements, a vector never leaves its source
// tensor or its group, and it moves in one access (load_dyn_n): a warp's loads and stores use
// every byte of the sectors they touch.
struct ChannelVector {
    int pixel, c0, ng;  // global pixel, first channel, n * groups + group
};

template <int VEC>
__device__ __forceinline__ ChannelVector channel_vector(int v, int channels, const GroupNormShape& s) {
    const int per_pixel = channels / VEC;
    ChannelVector r;
    r.pixel = v / per_pixel;
    r.c0 = (v - r.pixel * per_pixel) * VEC;
    r.ng = (r.pixel / s.pixels) * s.groups + r.c0 / (channels / s.groups);
    return r;
}

#define VECTOR_LOOP(v, channels, vec, s)                                                            \
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < (s).batch * (s).pixels * ((channels) / (vec)); \
         v += gridDim.x * blockDim.x)

// The kernel body for each vector width (`vec` is uniform over the grid).
#define DISPATCH_VEC(vec, call) \
    switch (vec) {              \
        case 8: call(8); break; \
        case 4: call(4); break; \
        case 2: call(2); break; \
        default: call(1);       \
    }

template <int VEC>
__device__ __forceinline__ void groupnorm_apply_vec(const void* a, int dt_a, const void* b, int dt_b,
                                                    const float* stats, const float* gamma, const float* beta,
                                                    void* out, int dt_out, int silu, const GroupNormShape& s) {
    const int channels = s.ca + s.cb;
    VECTOR_LOOP(v, channels, VEC, s) {
        const ChannelVector cv = channel_vector<VEC>(v, channels, s);
        const float mean = stats[cv.ng * 2], rstd = stats[cv.ng * 2 + 1];
        float y[VEC], gs[VEC], bs[VEC];
        if (cv.c0 < s.ca)
            load_dyn_n<VEC>(a, dt_a, (long long)cv.pixel * s.ca + cv.c0, y);
        else
            load_dyn_n<VEC>(b, dt_b, (long long)cv.pixel * s.cb + (cv.c0 - s.ca), y);
        load_dyn_n<VEC>(gamma, DTYPE_F32, cv.c0, gs);
        load_dyn_n<VEC>(beta, DTYPE_F32, cv.c0, bs);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            y[k] = (y[k] - mean) * rstd * gs[k] + bs[k];
            if (silu) y[k] = y[k] / (1.0f + expf(-y[k]));
        }
        store_dyn_n<VEC>(out, dt_out, (long long)cv.pixel * channels + cv.c0, y);
    }
}

extern "C" __global__ void groupnorm_apply(const void* a, int dt_a, const void* b, int dt_b, const float* stats,
                                           const float* gamma, const float* beta, void* out, int dt_out, int silu,
                                           int vec, GroupNormShape s) {
#define APPLY(VEC) groupnorm_apply_vec<VEC>(a, dt_a, b, dt_b, stats, gamma, beta, out, dt_out, silu, s)
    DISPATCH_VEC(vec, APPLY)
#undef APPLY
}

// ---- backward ----

// (xhat, g) of an element of channel c with input x and output gradient dy: the normalised input
// recomputed from x and the saved stats, and the gradient at xhat (through SiLU's derivative when
// fused).
__device__ __forceinline__ float2 groupnorm_grad_at(float x, float dy, float mean, float rstd, float gamma,
                                                    float beta, int silu) {
    const float xhat = (x - mean) * rstd;
    if (silu) {
        const float y = xhat * gamma + beta;
        const float sig = 1.0f / (1.0f + expf(-y));
        dy *= sig * (1.0f + y * (1.0f - sig));
    }
    return make_float2(xhat, dy * gamma);
}

extern "C" __global__ void __launch_bounds__(1024) groupnorm_backward_partial(
    const void* x, int dt_x, const void* dout, int dt_dout, const float* stats, const float* gamma,
    const float* beta, int silu, float* partials, GroupNormShape s) {
    __shared__ float scratch[32];
    const int chunk = blockIdx.x, g = blockIdx.y, n = blockIdx.z;
    const int channels = s.ca, cpg = channels / s.groups;
    const int2 range = chunk_pixels(chunk, s);
    const int first_pixel = n * s.pixels;
    const float* st = stats + (n * s.groups + g) * 2;
    const float mean = st[0], rstd = st[1];

    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for_each_in_slice(range.x, range.y, cpg, [&](int p, int ch) {
        const int c = g * cpg + ch;
        const long long i = (long long)(first_pixel + p) * channels + c;
        const float2 at =
            groupnorm_grad_at(load_dyn(x, dt_x, i), load_dyn(dout, dt_dout, i), mean, rstd, gamma[c], beta[c], silu);
        sum_g += at.y;
        sum_g_xhat += at.y * at.x;
    });
    sum_g = block_sum(sum_g, scratch);
    sum_g_xhat = block_sum(sum_g_xhat, scratch);
    if (threadIdx.x == 0) {
        float* out = partials + ((n * s.groups + g) * s.chunks + chunk) * 3;
        out[0] = sum_g;
        out[1] = sum_g_xhat;
    }
}

extern "C" __global__ void groupnorm_backward_finalize(float* partials, GroupNormShape s) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= s.batch * s.groups) return;
    double sum_g = 0.0, sum_g_xhat = 0.0;
    for (int k = 0; k < s.chunks; ++k) {
        const float* p = partials + (ng * s.chunks + k) * 3;
        sum_g += p[0];
        sum_g_xhat += p[1];
    }
    const double len = (double)s.pixels * (s.ca / s.groups);
    float* means = partials + ng * s.chunks * 3;
    means[0] = (float)(sum_g / len);
    means[1] = (float)(sum_g_xhat / len);
}

template <int VEC>
__device__ __forceinline__ void groupnorm_backward_apply_vec(const void* x, int dt_x, const void* dout, int dt_dout,
                                                             const float* stats, const float* gamma,
                                                             const float* beta, int silu, const float* partials,
                                                             void* dx, int dt_dx, int accumulate,
                                                             const GroupNormShape& s) {
    const int channels = s.ca;
    VECTOR_LOOP(v, channels, VEC, s) {
        const ChannelVector cv = channel_vector<VEC>(v, channels, s);
        const float mean = stats[cv.ng * 2], rstd = stats[cv.ng * 2 + 1];
        const float* means = partials + cv.ng * s.chunks * 3;
        const float mean_g = means[0], mean_g_xhat = means[1];
        const long long first = (long long)cv.pixel * channels + cv.c0;
        float xs[VEC], grad[VEC], gs[VEC], bs[VEC];
        load_dyn_n<VEC>(x, dt_x, first, xs);
        load_dyn_n<VEC>(dout, dt_dout, first, grad);
        load_dyn_n<VEC>(gamma, DTYPE_F32, cv.c0, gs);
        load_dyn_n<VEC>(beta, DTYPE_F32, cv.c0, bs);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float2 at = groupnorm_grad_at(xs[k], grad[k], mean, rstd, gs[k], bs[k], silu);
            grad[k] = rstd * (at.y - mean_g - at.x * mean_g_xhat);
        }
        store_grad_n<VEC>(dx, dt_dx, first, grad, accumulate);
    }
}

extern "C" __global__ void groupnorm_backward_apply(const void* x, int dt_x, const void* dout, int dt_dout,
                                                    const float* stats, const float* gamma, const float* beta,
                                                    int silu, const float* partials, void* dx, int dt_dx, int vec,
                                                    int accumulate, GroupNormShape s) {
#define APPLY(VEC)                                                                                              \
    groupnorm_backward_apply_vec<VEC>(x, dt_x, dout, dt_dout, stats, gamma, beta, silu, partials, dx, dt_dx, \
                                      accumulate, s)
    DISPATCH_VEC(vec, APPLY)
#undef APPLY
}
