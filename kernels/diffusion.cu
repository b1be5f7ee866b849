// diffusion.cu: the sampler's per-element arithmetic (METHOD.md section 2) and its noise.
//
//   fill_gaussian:        noise keyed per image, src/backend/cpu/rng.rs bit for bit: element e
//                         (logical NCHW index within the sample) of sample s = normal e % 4 of
//                         Philox block (seed, stream, image_indices[s], e / 4); written at its
//                         NHWC position for 4-D tensors;
//   predict_x0_and_mean:  x0_hat = clip((x_t - sqrt(1-abar) eps) / sqrt(abar), -1, 1),
//                         mu = c0 x0_hat + ct x_t;
//   mask_clipped:         u = 0 where the unclipped x0 estimate lies outside [-1, 1];
//   constrain_guidance:   delta[n] *= min(1, kappa ||x_t[n] - mu[n]|| / ||delta[n]||);
//   guidance_objective_grad, cross_entropy_grad: the logit and feature gradients of the guidance
//                         objective and of the summed cross-entropy (softmax in f64, as on the CPU).
// Layout: element-wise ops see flat tensors (every operand has the same layout); per-sample ops
// see N rows of `sample_len` elements. Precision: any storage type (run-time codes), f32 arithmetic.
// Versions: one each; constrain_guidance is one block per sample (a block sum per norm).
#include "common.cuh"

struct StepCoefficients {
    float sqrt_abar, sqrt_one_minus_abar, c0, ct;
};

// One thread per (sample, Philox block): key = seed, counter = (block within the image, the
// image's index in the whole input, stream). `image_indices` (samples) is always f32 storage:
// integers below 2^24, exact. An image's noise does not depend on the batch it is in.
extern "C" __global__ void fill_gaussian(void* out, int dt_out, const float* image_indices, long long samples,
                                         long long sample_len, int nhwc, int channels, int height, int width,
                                         unsigned long long seed, unsigned long long stream) {
    const long long blocks_per_sample = (sample_len + 3) / 4;
    const uint2 key = split_u64(seed);
    const uint2 stream_words = split_u64(stream);
    GRID_STRIDE_LOOP(i, samples * blocks_per_sample) {
        const long long s = i / blocks_per_sample, block = i % blocks_per_sample;
        const unsigned image = (unsigned)image_indices[s];
        const uint4 bits = philox4x32_10(make_uint4((unsigned)block, image, stream_words.x, stream_words.y), key);
        const float4 normals = gaussian4_from_bits(bits);
        const float values[4] = {normals.x, normals.y, normals.z, normals.w};
        for (int k = 0; k < 4; ++k) {
            const long long e = block * 4 + k;
            if (e >= sample_len) break;
            long long stored = s * sample_len + e;
            if (nhwc) {
                const long long plane = (long long)height * width;
                const long long x = e % width, y = (e / width) % height, c = e / plane;
                stored = ((s * height + y) * width + x) * channels + c;
            }
            store_dyn(out, dt_out, stored, values[k]);
        }
    }
}

__device__ __forceinline__ float x0_unclipped(float x_t, float eps, const StepCoefficients& k) {
    return (x_t - k.sqrt_one_minus_abar * eps) / k.sqrt_abar;
}

extern "C" __global__ void predict_x0_and_mean(const void* x_t, int dt_x, const void* eps, int dt_eps, void* x0_hat,
                                               int dt_x0, void* mu, int dt_mu, long long n, StepCoefficients k) {
    GRID_STRIDE_LOOP(i, n) {
        const float xt = load_dyn(x_t, dt_x, i);
        const float x0 = fminf(fmaxf(x0_unclipped(xt, load_dyn(eps, dt_eps, i), k), -1.0f), 1.0f);
        store_dyn(x0_hat, dt_x0, i, x0);
        store_dyn(mu, dt_mu, i, k.c0 * x0 + k.ct * xt);
    }
}

extern "C" __global__ void mask_clipped(const void* x_t, int dt_x, const void* eps, int dt_eps, void* u, int dt_u,
                                        long long n, StepCoefficients k) {
    GRID_STRIDE_LOOP(i, n) {
        const float x0 = x0_unclipped(load_dyn(x_t, dt_x, i), load_dyn(eps, dt_eps, i), k);
        if (!(x0 >= -1.0f && x0 <= 1.0f)) store_dyn(u, dt_u, i, 0.0f);
    }
}

// One block per sample (blockDim.x a multiple of 32).
extern "C" __global__ void constrain_guidance(void* delta, int dt_d, const void* x_t, int dt_x, const void* mu,
                                              int dt_mu, long long sample_len, float kappa) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * sample_len;
    float dd = 0.0f, ss = 0.0f;
    for (long long j = threadIdx.x; j < sample_len; j += blockDim.x) {
        const float d = load_dyn(delta, dt_d, base + j);
        const float s = load_dyn(x_t, dt_x, base + j) - load_dyn(mu, dt_mu, base + j);
        dd += d * d;
        ss += s * s;
    }
    const float delta_norm = sqrtf(block_sum(dd, scratch));
    const float step_norm = sqrtf(block_sum(ss, scratch));
    if (delta_norm == 0.0f) return;
    const float factor = fminf(kappa * step_norm / delta_norm, 1.0f);
    for (long long j = threadIdx.x; j < sample_len; j += blockDim.x)
        store_dyn(delta, dt_d, base + j, load_dyn(delta, dt_d, base + j) * factor);
}

// p = softmax(z) of one row, in f64 as src/backend/cpu/elementwise.rs computes it.
__device__ void softmax_row(const void* logits, int dt_l, long long row, int classes, double* p) {
    double max = -1e300;
    for (int j = 0; j < classes; ++j) max = fmax(max, (double)load_dyn(logits, dt_l, row * classes + j));
    double sum = 0.0;
    for (int j = 0; j < classes; ++j) sum += exp((double)load_dyn(logits, dt_l, row * classes + j) - max);
    for (int j = 0; j < classes; ++j) p[j] = exp((double)load_dyn(logits, dt_l, row * classes + j) - max) / sum;
}

// dlogits[n] = lambda_c (onehot(y) - softmax(z)) and dfeatures = -2 lambda_f (f - f_ref) / F; one
// thread per sample (classes <= 1000). A label that is not a class index writes NaN: the host
// checks labels when it uploads them.
extern "C" __global__ void guidance_objective_grad(const void* features, int dt_f, const void* reference, int dt_r,
                                                   const void* logits, int dt_l, const float* labels, float lambda_f,
                                                   float lambda_c, void* dfeatures, int dt_df, void* dlogits,
                                                   int dt_dl, int batch, int feature_len, int classes) {
    const float scale = -2.0f * lambda_f / (float)feature_len;
    GRID_STRIDE_LOOP(i, (long long)batch * feature_len)
    store_dyn(dfeatures, dt_df, i, scale * (load_dyn(features, dt_f, i) - load_dyn(reference, dt_r, i)));
    GRID_STRIDE_LOOP(n, batch) {
        double p[1000];
        softmax_row(logits, dt_l, n, classes, p);
        const int y = (int)labels[n];
        for (int j = 0; j < classes; ++j)
            store_dyn(dlogits, dt_dl, n * classes + j, lambda_c * ((j == y ? 1.0f : 0.0f) - (float)p[j]));
    }
}

extern "C" __global__ void cross_entropy_grad(const void* logits, int dt_l, const float* labels, void* dlogits,
                                              int dt_dl, int batch, int classes) {
    GRID_STRIDE_LOOP(n, batch) {
        double p[1000];
        softmax_row(logits, dt_l, n, classes, p);
        const int y = (int)labels[n];
        for (int j = 0; j < classes; ++j)
            store_dyn(dlogits, dt_dl, n * classes + j, (float)p[j] - (j == y ? 1.0f : 0.0f));
    }
}
