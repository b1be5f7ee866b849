// embedding.cu: the UNet's timestep embedding and the dense layers (its two MLP layers, the
// ResnetBlocks' time-embedding projections, the classifiers' final linear layer).
//
//   timestep_embedding: out[n, j] = sin(t[n] f_j) for j < dim/2, cos(t[n] f_{j - dim/2}) after,
//                       f_i = exp(-ln(10000) i / (dim/2 - 1)), in f64 as on the CPU (sin/cos from
//                       common.cuh's sincos_f64), rounded once;
//   linear:             out[n, o] = sum_i w[o, i] silu?(x[n, i]) + bias[o];
//   linear_backward:    dx[n, i] = (or +=) silu'?(x[n, i]) sum_o dout[n, o] w[o, i].
// Layout: row-major (N x features); w (out x in). Precision: any storage type (run-time codes),
// f32 accumulation; t and bias f32.
// Versions: linear is one warp per output element (lanes stride over the inputs, a warp sum), the
// right shape for these small matrices (N <= 256, 512 x 512 at most); linear_backward one thread per
// input element. Neither is hot: a UNet forward spends well under 1% of its FLOPs here.
#include "common.cuh"

extern "C" __global__ void timestep_embedding(const float* t, void* out, int dt_out, int batch, int dim) {
    const int half = dim / 2;
    GRID_STRIDE_LOOP(k, (long long)batch * dim) {
        const int n = (int)(k / dim), j = (int)(k % dim);
        const int i = j < half ? j : j - half;
        const double frequency = exp(-log(10000.0) * (double)i / (double)(half - 1));
        const double angle = (double)t[n] * frequency;
        double s, c;
        sincos_f64(angle, &s, &c);
        store_dyn(out, dt_out, k, (float)(j < half ? s : c));
    }
}

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

__device__ __forceinline__ float silu_grad_f(float v) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
}

extern "C" __global__ void linear(const void* x, int dt_x, const void* w, int dt_w, const float* bias, void* out,
                                  int dt_out, int batch, int in_features, int out_features, int silu_input) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (long long)batch * out_features) return;  // whole warps leave together
    const long long n = warp / out_features, o = warp % out_features;
    float sum = 0.0f;
    for (int i = lane; i < in_features; i += 32) {
        float v = load_dyn(x, dt_x, n * in_features + i);
        if (silu_input) v = silu_f(v);
        sum += v * load_dyn(w, dt_w, o * in_features + i);
    }
    sum = warp_sum(sum);
    if (lane == 0) store_dyn(out, dt_out, warp, sum + (bias ? bias[o] : 0.0f));
}

extern "C" __global__ void linear_backward(const void* x, int dt_x, const void* w, int dt_w, const void* dout,
                                           int dt_dout, void* dx, int dt_dx, int batch, int in_features,
                                           int out_features, int silu_input, int accumulate) {
    GRID_STRIDE_LOOP(k, (long long)batch * in_features) {
        const long long n = k / in_features, i = k % in_features;
        float g = 0.0f;
        for (int o = 0; o < out_features; ++o)
            g += load_dyn(dout, dt_dout, n * out_features + o) * load_dyn(w, dt_w, (long long)o * in_features + i);
        if (silu_input) g *= silu_grad_f(load_dyn(x, dt_x, k));
        store_grad(dx, dt_dx, k, g, accumulate);
    }
}
