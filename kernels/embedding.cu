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
// Versions: linear is a warp per output element and tile of up to 8 samples (lanes stride over the
// inputs, staged in shared memory with SiLU applied; a warp sum), the right shape for these small
// matrices (N <= 256, 512 inputs, a few thousand outputs at most); linear_backward one thread per
// input element (the classifiers' last layer only: the UNet's input gradient stops short of the
// time embedding). A UNet forward spends well under 1% of its FLOPs here, but at batch 64 linear
// took 1.6% of its time when it was a warp per output element and sample (dddc2c9).
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

// linear: a block of LINEAR_WARPS warps shares a tile of samples (grid y; `tile`, 8, 4, 2 or 1, the
// host's choice: src/backend/cuda/mod.rs `linear_tile`): it stages their inputs in shared memory
// once, SiLU applied, in f32, then each warp takes outputs o = blockIdx.x * LINEAR_WARPS + warp,
// o + gridDim.x * LINEAR_WARPS, ..., its lanes striding over the inputs: a weight row is read once
// for the tile's samples, and an input's SiLU computed once a block. (One warp per output element
// read its weight row and computed SiLU again for every sample: at batch 64 on an H200 the three
// launches of a UNet forward took 0.27 ms, 90 us each, for a few hundred MFLOP: dddc2c9.) Each lane
// sums its inputs in order, then the warp sum: the order of before.
constexpr int LINEAR_WARPS = 8;

template <int TILE, typename WT>
__device__ __forceinline__ void linear_outputs(const float* xs, const WT* w, const float* bias, void* out, int dt_out,
                                               int n0, int samples, int in_features, int out_features) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = blockIdx.x * LINEAR_WARPS + warp; o < out_features; o += gridDim.x * LINEAR_WARPS) {
        const WT* row = w + (long long)o * in_features;
        float sum[TILE];
#pragma unroll
        for (int s = 0; s < TILE; ++s) sum[s] = 0.0f;
#pragma unroll 4
        for (int i = lane; i < in_features; i += 32) {
            const float wv = to_float(row[i]);
#pragma unroll
            for (int s = 0; s < TILE; ++s) sum[s] += xs[s * in_features + i] * wv;
        }
        const float b = bias ? bias[o] : 0.0f;
#pragma unroll
        for (int s = 0; s < TILE; ++s) {
            const float v = warp_sum(sum[s]);
            if (lane == 0 && s < samples) store_dyn(out, dt_out, (long long)(n0 + s) * out_features + o, v + b);
        }
    }
}

template <int TILE>
__device__ __forceinline__ void linear_tile_of(const void* x, int dt_x, const void* w, int dt_w, const float* bias,
                                               void* out, int dt_out, int batch, int in_features, int out_features,
                                               int silu_input, float* xs) {
    const int n0 = blockIdx.y * TILE, samples = min(TILE, batch - n0);
    for (int k = threadIdx.x; k < TILE * in_features; k += blockDim.x) {
        float v = 0.0f;  // (rows past the batch: zeros, their sums never stored)
        if (k < samples * in_features) {
            v = load_dyn(x, dt_x, (long long)n0 * in_features + k);
            if (silu_input) v = silu_f(v);
        }
        xs[k] = v;
    }
    __syncthreads();
    if (dt_w == DTYPE_F32)
        linear_outputs<TILE>(xs, static_cast<const float*>(w), bias, out, dt_out, n0, samples, in_features, out_features);
    else if (dt_w == DTYPE_F16)
        linear_outputs<TILE>(xs, static_cast<const f16*>(w), bias, out, dt_out, n0, samples, in_features, out_features);
    else
        linear_outputs<TILE>(xs, static_cast<const bf16*>(w), bias, out, dt_out, n0, samples, in_features, out_features);
}

extern "C" __global__ void __launch_bounds__(LINEAR_WARPS * 32)
    linear(const void* x, int dt_x, const void* w, int dt_w, const float* bias, void* out, int dt_out, int batch,
           int in_features, int out_features, int silu_input, int tile) {
    extern __shared__ __align__(16) float xs[];  // tile x in_features
#define TILE_OF(T) \
    linear_tile_of<T>(x, dt_x, w, dt_w, bias, out, dt_out, batch, in_features, out_features, silu_input, xs)
    switch (tile) {
        case 8: TILE_OF(8); break;
        case 4: TILE_OF(4); break;
        case 2: TILE_OF(2); break;
        default: TILE_OF(1);
    }
#undef TILE_OF
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
