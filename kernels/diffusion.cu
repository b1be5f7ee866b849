// diffusion.cu: the sampler's per-element arithmetic (METHOD.md section 2) and its noise.
//
//   fill_gaussian:        noise keyed per image, src/backend/cpu/rng.rs bit for bit: element e
//                         (logical NCHW index within the sample) of sample s = normal e % 4 of
//                         Philox block (seed, stream, image_indices[s], e / 4); written at its
//                         NHWC position for 4-D tensors;
//   step table ops:       the per-step scalars come from row cursor[0] of a step table (columns as
//                         src/backend/mod.rs `StepColumn` numbers them), so a reverse step's
//                         launches have the same arguments at every step and can be replayed as a
//                         graph; `advance_step_cursor` (one thread) moves the cursor, launched
//                         after the step's other kernels (stream order), never inside them;
//   step_unet_indices:    t[n] = row.unet_step;
//   axpby_step:           out = row[a] x + row[b] y;
//   q_sample:             x_t = sqrt(abar) x + sqrt(1-abar) z, z generated here as fill_gaussian does;
//   reverse_step:         the fused reverse step, in place: x0_hat = clip((x_t - sqrt(1-abar) eps) /
//                         sqrt(abar), -1, 1), x_t = c0 x0_hat + ct x_t (+ delta) (+ sigma z);
//   predict_x0_and_mean:  x0_hat as above, mu = c0 x0_hat + ct x_t (the guided modes need both);
//   mask_clipped:         u = 0 where the unclipped x0 estimate lies outside [-1, 1];
//   constrain_guidance:   delta[n] *= min(1, kappa ||x_t[n] - mu[n]|| / ||delta[n]||);
//   guidance_objective_grad, cross_entropy_grad: the logit and feature gradients of the guidance
//                         objective and of the summed cross-entropy (softmax in f64, as on the CPU).
// Layout: element-wise ops see flat tensors (every operand has the same layout); per-sample ops
// see N rows of `sample_len` elements; the noise-drawing ops place logical element e at its NHWC
// position. Precision: any storage type (run-time codes), f32 arithmetic; tables, cursors and
// image indices f32. Versions: one each; constrain_guidance is one block per sample (a block sum
// per norm); the noise-drawing ops run one thread per (sample, Philox block of 4 elements).
#include "common.cuh"

struct StepCoefficients {
    float sqrt_abar, sqrt_one_minus_abar, c0, ct;
};

// Step table columns: src/backend/mod.rs `StepColumn` (64-bit values as four 16-bit pieces).
enum StepColumn {
    COL_SQRT_ABAR = 0,
    COL_SQRT_ONE_MINUS_ABAR = 1,
    COL_C0 = 2,
    COL_CT = 3,
    COL_NOISE_STD = 4,
    COL_UNET_STEP = 5,
    COL_SEED = 6,
    COL_STREAM = 10,
    STEP_COLUMNS = 20
};

// Fault bits of the backend's fault word (src/backend/cuda/mod.rs reads them at synchronize).
#define STEP_CURSOR_FAULT 1u

// The row cursor[0] names, or null when the cursor lies outside the table's `rows` rows: the op
// then writes nothing and sets STEP_CURSOR_FAULT, which the host reports as an error (the CPU
// reference refuses such a call). One thread of the grid sets it: a single writer, no race.
__device__ __forceinline__ const float* step_row(const float* table, int rows, const float* cursor,
                                                 unsigned* faults) {
    const float c = cursor[0];
    if (!(c >= 0.0f && c < (float)rows && c == floorf(c))) {
        if (blockIdx.x == 0 && threadIdx.x == 0) faults[0] |= STEP_CURSOR_FAULT;
        return nullptr;
    }
    return table + (long long)c * STEP_COLUMNS;
}

__device__ __forceinline__ unsigned long long row_u64(const float* row, int first) {
    unsigned long long v = 0;
    for (int k = 0; k < 4; ++k) v |= (unsigned long long)(unsigned)row[first + k] << (16 * k);
    return v;
}

__device__ __forceinline__ StepCoefficients row_coefficients(const float* row) {
    StepCoefficients k;
    k.sqrt_abar = row[COL_SQRT_ABAR];
    k.sqrt_one_minus_abar = row[COL_SQRT_ONE_MINUS_ABAR];
    k.c0 = row[COL_C0];
    k.ct = row[COL_CT];
    return k;
}

__device__ __forceinline__ float x0_unclipped(float x_t, float eps, const StepCoefficients& k) {
    return (x_t - k.sqrt_one_minus_abar * eps) / k.sqrt_abar;
}

// Where logical element e (row-major within the sample) of sample s is stored: NHWC for 4-D tensors.
__device__ __forceinline__ long long noise_element_index(long long s, long long e, long long sample_len, int nhwc,
                                                         int channels, int height, int width) {
    if (!nhwc) return s * sample_len + e;
    const long long plane = (long long)height * width;
    const long long x = e % width, y = (e / width) % height, c = e / plane;
    return ((s * height + y) * width + x) * channels + c;
}

// The four normals of Philox block `block` of sample s's image (rng.rs's key and counter).
__device__ __forceinline__ void noise_block(const float* image_indices, long long s, long long block,
                                            unsigned long long seed, unsigned long long stream, float values[4]) {
    const uint2 key = split_u64(seed);
    const uint2 stream_words = split_u64(stream);
    const unsigned image = (unsigned)image_indices[s];
    const uint4 bits = philox4x32_10(make_uint4((unsigned)block, image, stream_words.x, stream_words.y), key);
    const float4 normals = gaussian4_from_bits(bits);
    values[0] = normals.x;
    values[1] = normals.y;
    values[2] = normals.z;
    values[3] = normals.w;
}

// One thread per (sample, Philox block): key = seed, counter = (block within the image, the
// image's index in the whole input, stream). `image_indices` (samples) is always f32 storage:
// integers below 2^24, exact. An image's noise does not depend on the batch it is in.
extern "C" __global__ void fill_gaussian(void* out, int dt_out, const float* image_indices, long long samples,
                                         long long sample_len, int nhwc, int channels, int height, int width,
                                         unsigned long long seed, unsigned long long stream) {
    const long long blocks_per_sample = (sample_len + 3) / 4;
    GRID_STRIDE_LOOP(i, samples * blocks_per_sample) {
        const long long s = i / blocks_per_sample, block = i % blocks_per_sample;
        float values[4];
        noise_block(image_indices, s, block, seed, stream, values);
        for (int k = 0; k < 4; ++k) {
            const long long e = block * 4 + k;
            if (e >= sample_len) break;
            store_dyn(out, dt_out, noise_element_index(s, e, sample_len, nhwc, channels, height, width), values[k]);
        }
    }
}

extern "C" __global__ void step_unet_indices(const float* table, int rows, const float* cursor, unsigned* faults,
                                              float* t, int n) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    GRID_STRIDE_LOOP(i, n) t[i] = row[COL_UNET_STEP];
}

// One thread: launched alone, after every kernel of the step that reads the cursor.
extern "C" __global__ void advance_step_cursor(float* cursor, int by) {
    if (blockIdx.x == 0 && threadIdx.x == 0) cursor[0] += (float)by;
}

extern "C" __global__ void axpby_step(const float* table, int rows, const float* cursor, unsigned* faults,
                                      int a_column, const void* x, int dt_x, int b_column, const void* y, int dt_y,
                                      void* out, int dt_out, long long n) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    const float a = row[a_column], b = row[b_column];
    GRID_STRIDE_LOOP(i, n) store_dyn(out, dt_out, i, a * load_dyn(x, dt_x, i) + b * load_dyn(y, dt_y, i));
}

extern "C" __global__ void q_sample(const void* x, int dt_x, const float* image_indices, const float* table, int rows,
                                    const float* cursor, unsigned* faults, void* x_t, int dt_xt, long long samples,
                                    long long sample_len, int nhwc, int channels, int height, int width) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    const float a = row[COL_SQRT_ABAR], s_noise = row[COL_SQRT_ONE_MINUS_ABAR];
    const unsigned long long seed = row_u64(row, COL_SEED), stream = row_u64(row, COL_STREAM);
    const long long blocks_per_sample = (sample_len + 3) / 4;
    GRID_STRIDE_LOOP(i, samples * blocks_per_sample) {
        const long long s = i / blocks_per_sample, block = i % blocks_per_sample;
        float z[4];
        noise_block(image_indices, s, block, seed, stream, z);
        for (int k = 0; k < 4; ++k) {
            const long long e = block * 4 + k;
            if (e >= sample_len) break;
            const long long at = noise_element_index(s, e, sample_len, nhwc, channels, height, width);
            store_dyn(x_t, dt_xt, at, a * load_dyn(x, dt_x, at) + s_noise * z[k]);
        }
    }
}

// Each thread one Philox block of one sample: the four elements it draws noise for (delta: 0 = none).
extern "C" __global__ void reverse_step(void* x_t, int dt_x, const void* eps, int dt_eps, const void* delta, int dt_d,
                                        const float* image_indices, const float* table, int rows, const float* cursor,
                                        unsigned* faults, long long samples, long long sample_len, int nhwc,
                                        int channels, int height, int width) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    const StepCoefficients k = row_coefficients(row);
    const float sigma = row[COL_NOISE_STD];
    const unsigned long long seed = row_u64(row, COL_SEED), stream = row_u64(row, COL_STREAM);
    const long long blocks_per_sample = (sample_len + 3) / 4;
    GRID_STRIDE_LOOP(i, samples * blocks_per_sample) {
        const long long s = i / blocks_per_sample, block = i % blocks_per_sample;
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (sigma != 0.0f) noise_block(image_indices, s, block, seed, stream, z);
        for (int j = 0; j < 4; ++j) {
            const long long e = block * 4 + j;
            if (e >= sample_len) break;
            const long long at = noise_element_index(s, e, sample_len, nhwc, channels, height, width);
            const float xt = load_dyn(x_t, dt_x, at);
            const float x0 = fminf(fmaxf(x0_unclipped(xt, load_dyn(eps, dt_eps, at), k), -1.0f), 1.0f);
            float mu = k.c0 * x0 + k.ct * xt;
            if (delta) mu += load_dyn(delta, dt_d, at);
            store_dyn(x_t, dt_x, at, sigma != 0.0f ? mu + sigma * z[j] : mu);
        }
    }
}

extern "C" __global__ void predict_x0_and_mean(const void* x_t, int dt_x, const void* eps, int dt_eps, void* x0_hat,
                                               int dt_x0, void* mu, int dt_mu, long long n, const float* table,
                                               int rows, const float* cursor, unsigned* faults) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    const StepCoefficients k = row_coefficients(row);
    GRID_STRIDE_LOOP(i, n) {
        const float xt = load_dyn(x_t, dt_x, i);
        const float x0 = fminf(fmaxf(x0_unclipped(xt, load_dyn(eps, dt_eps, i), k), -1.0f), 1.0f);
        store_dyn(x0_hat, dt_x0, i, x0);
        store_dyn(mu, dt_mu, i, k.c0 * x0 + k.ct * xt);
    }
}

extern "C" __global__ void mask_clipped(const void* x_t, int dt_x, const void* eps, int dt_eps, void* u, int dt_u,
                                        long long n, const float* table, int rows, const float* cursor,
                                        unsigned* faults) {
    const float* row = step_row(table, rows, cursor, faults);
    if (!row) return;
    const StepCoefficients k = row_coefficients(row);
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

// The softmax of one row, in f64 as src/backend/cpu/elementwise.rs computes it: its max and the sum
// of exp(z - max) here, and each p_j = exp(z_j - max) / sum recomputed where it is used (a p[classes]
// array would be thread-local memory, which the driver reserves for every thread the GPU can hold:
// 8 KB each for 1000 classes, gigabytes on a large GPU).
struct SoftmaxRow {
    double max, sum;
};

__device__ SoftmaxRow softmax_row(const void* logits, int dt_l, long long row, int classes) {
    double max = -1e300;
    for (int j = 0; j < classes; ++j) max = fmax(max, (double)load_dyn(logits, dt_l, row * classes + j));
    double sum = 0.0;
    for (int j = 0; j < classes; ++j) sum += exp((double)load_dyn(logits, dt_l, row * classes + j) - max);
    return {max, sum};
}

__device__ double softmax_at(SoftmaxRow s, const void* logits, int dt_l, long long row, int classes, int j) {
    return exp((double)load_dyn(logits, dt_l, row * classes + j) - s.max) / s.sum;
}

// dlogits[n] = lambda_c (onehot(y) - softmax(z)) and dfeatures = -2 lambda_f (f - f_ref) / F; one
// thread per sample. A label that is not a class index writes NaN: the host checks labels when it
// uploads them.
extern "C" __global__ void guidance_objective_grad(const void* features, int dt_f, const void* reference, int dt_r,
                                                   const void* logits, int dt_l, const float* labels, float lambda_f,
                                                   float lambda_c, void* dfeatures, int dt_df, void* dlogits,
                                                   int dt_dl, int batch, int feature_len, int classes) {
    const float scale = -2.0f * lambda_f / (float)feature_len;
    GRID_STRIDE_LOOP(i, (long long)batch * feature_len)
    store_dyn(dfeatures, dt_df, i, scale * (load_dyn(features, dt_f, i) - load_dyn(reference, dt_r, i)));
    GRID_STRIDE_LOOP(n, batch) {
        const SoftmaxRow s = softmax_row(logits, dt_l, n, classes);
        const int y = (int)labels[n];
        for (int j = 0; j < classes; ++j) {
            const float p = (float)softmax_at(s, logits, dt_l, n, classes, j);
            store_dyn(dlogits, dt_dl, n * classes + j, lambda_c * ((j == y ? 1.0f : 0.0f) - p));
        }
    }
}

extern "C" __global__ void cross_entropy_grad(const void* logits, int dt_l, const float* labels, void* dlogits,
                                              int dt_dl, int batch, int classes) {
    GRID_STRIDE_LOOP(n, batch) {
        const SoftmaxRow s = softmax_row(logits, dt_l, n, classes);
        const int y = (int)labels[n];
        for (int j = 0; j < classes; ++j) {
            const float p = (float)softmax_at(s, logits, dt_l, n, classes, j);
            store_dyn(dlogits, dt_dl, n * classes + j, p - (j == y ? 1.0f : 0.0f));
        }
    }
}
