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
//   groupnorm_apply          one thread per output element: normalise, affine, SiLU, one rounding.
#include "common.cuh"

struct GroupNormShape {
    int batch, pixels, ca, cb, groups, chunks;
};

__device__ __forceinline__ float load_two_source(const void* a, int dt_a, const void* b, int dt_b, long long pixel,
                                                 int c, const GroupNormShape& s) {
    return c < s.ca ? load_dyn(a, dt_a, pixel * s.ca + c) : load_dyn(b, dt_b, pixel * s.cb + (c - s.ca));
}

extern "C" __global__ void __launch_bounds__(256) groupnorm_partial_stats(const void* a, int dt_a, const void* b,
                                                                          int dt_b, float* partials,
                                                                          GroupNormShape s) {
    __shared__ float scratch[32];
    const int chunk = blockIdx.x, g = blockIdx.y, n = blockIdx.z;
    const int cpg = (s.ca + s.cb) / s.groups;
    const int per_chunk = (s.pixels + s.chunks - 1) / s.chunks;
    const int p0 = min(chunk * per_chunk, s.pixels), p1 = min(p0 + per_chunk, s.pixels);
    const long long count = (long long)(p1 - p0) * cpg;
    const long long first_pixel = (long long)n * s.pixels + p0;

    float sum = 0.0f;
    for (long long j = threadIdx.x; j < count; j += blockDim.x)
        sum += load_two_source(a, dt_a, b, dt_b, first_pixel + j / cpg, g * cpg + (int)(j % cpg), s);
    const float mean = count > 0 ? block_sum(sum, scratch) / (float)count : 0.0f;
    float m2 = 0.0f;
    for (long long j = threadIdx.x; j < count; j += blockDim.x) {
        const float d = load_two_source(a, dt_a, b, dt_b, first_pixel + j / cpg, g * cpg + (int)(j % cpg), s) - mean;
        m2 += d * d;
    }
    m2 = count > 0 ? block_sum(m2, scratch) : 0.0f;
    if (threadIdx.x == 0) {
        float* out = partials + (((long long)n * s.groups + g) * s.chunks + chunk) * 3;
        out[0] = (float)count;
        out[1] = mean;
        out[2] = m2;
    }
}

extern "C" __global__ void groupnorm_finalize(const float* partials, float* stats, GroupNormShape s, float eps) {
    const long long ng = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= (long long)s.batch * s.groups) return;
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

extern "C" __global__ void groupnorm_apply(const void* a, int dt_a, const void* b, int dt_b, const float* stats,
                                           const float* gamma, const float* beta, void* out, int dt_out, int silu,
                                           GroupNormShape s) {
    const int channels = s.ca + s.cb, cpg = channels / s.groups;
    GRID_STRIDE_LOOP(i, (long long)s.batch * s.pixels * channels) {
        const int c = (int)(i % channels);
        const long long pixel = i / channels;
        const long long n = pixel / s.pixels;
        const float* st = stats + (n * s.groups + c / cpg) * 2;
        float y = (load_two_source(a, dt_a, b, dt_b, pixel, c, s) - st[0]) * st[1] * gamma[c] + beta[c];
        if (silu) y = y / (1.0f + expf(-y));
        store_dyn(out, dt_out, i, y);
    }
}
