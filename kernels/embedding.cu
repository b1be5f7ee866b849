// embedding.cu: the UNet's timestep embedding and the dense layers (its two MLP layers, the
// ResnetBlocks' time-embedding projections, every block's in one launch over their weights
// concatenated at load (src/model/unet.rs TembProjections), the classifiers' final linear layer).
//
//   timestep_embedding: out[n, j] = sin(t[n] f_j) for j < dim/2, cos(t[n] f_{j - dim/2}) after,
//                       f_i = exp(-ln(10000) i / (dim/2 - 1)), in f64 as on the CPU (sin/cos from
//                       common.cuh's sincos_f64), rounded once;
//   linear:             out[n, o] = sum_i w[o, i] silu?(x[n, i]) + bias[o];
//   linear_backward:    dx[n, i] = (or +=) silu'?(x[n, i]) sum_o dout[n, o] w[o, i].
// Layout: row-major (N x features); w (out x in). Precision: any storage type (run-time codes),
// f32 accumulation; t and bias f32.
// Versions: linear is one warp per output element (lanes stride over the inputs, a warp sum), the
// right shape for these small matrices (N <= 256, 512 inputs, a few thousand outputs at most);
// linear_backward one thread per input element. Neither is hot: a UNet forward spends well under 1% of its FLOPs here.
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

// One lane's share of out[n, o]'s dot product with the storage types known at compile time, four
// of its steps unrolled so that their loads issue together. (load_dyn branched on the type at
// every load, which ends ptxas's scheduling region there: each load was waited out before the
// next issued, and at batch 1 a ResnetBlock's projection, one warp's 16 steps over 512 inputs,
// spent most of its time so; examples/emulator_launch_depth.rs's latency model.)
template <typename XT, typename WT>
__device__ __forceinline__ float linear_lane_sum(const XT* x, const WT* w, int in_features, int silu_input) {
    float sum = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x & 31; i < in_features; i += 32) {
        float v = to_float(x[i]);
        if (silu_input) v = silu_f(v);
        sum += v * to_float(w[i]);
    }
    return sum;
}

template <typename XT>
__device__ __forceinline__ float linear_lane_sum(const XT* x, const void* w, int dt_w, int in_features,
                                                 int silu_input) {
    if (dt_w == DTYPE_F32) return linear_lane_sum(x, static_cast<const float*>(w), in_features, silu_input);
    if (dt_w == DTYPE_F16) return linear_lane_sum(x, static_cast<const f16*>(w), in_features, silu_input);
    return linear_lane_sum(x, static_cast<const bf16*>(w), in_features, silu_input);
}

extern "C" __global__ void linear(const void* x, int dt_x, const void* w, int dt_w, const float* bias, void* out,
                                  int dt_out, int batch, int in_features, int out_features, int silu_input) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (long long)batch * out_features) return;  // whole warps leave together
    const long long n = warp / out_features, o = warp % out_features;
    const long long x0 = n * in_features, w0 = o * in_features;
    const void* w_row = static_cast<const char*>(w) + w0 * (dt_w == DTYPE_F32 ? 4 : 2);
    float sum;
    if (dt_x == DTYPE_F32)
        sum = linear_lane_sum(static_cast<const float*>(x) + x0, w_row, dt_w, in_features, silu_input);
    else if (dt_x == DTYPE_F16)
        sum = linear_lane_sum(static_cast<const f16*>(x) + x0, w_row, dt_w, in_features, silu_input);
    else
        sum = linear_lane_sum(static_cast<const bf16*>(x) + x0, w_row, dt_w, in_features, silu_input);
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
