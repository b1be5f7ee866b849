// conv_common.cuh: what conv2d.cu (version 1) and conv2d_mma.cu (versions 2 and 3) share: the
// kernel parameters of one convolution, where an output position reads its input, the implicit
// im2col gather and the epilogue of one output element (conv2d.cu's head comment says what is
// computed). Handed to NVRTC as an in-memory header like common.cuh (src/backend/cuda/compile.rs).
#pragma once
#include "common.cuh"

// Everything one convolution needs, as kernel parameters (all 32-bit: the launcher checks that
// every tensor has fewer than 2^31 elements).
struct ConvParams {
    int batch, in_h, in_w;      // stored input size (before the folded upsample)
    int ca, cb;                 // channels from a and from b (cb = 0: no concat)
    int upsample_shift;         // 1: nearest x2 upsample folded in, 0: none
    int out_channels, kh, kw;   // weights [out_channels][kh][kw][ca + cb]
    int stride, pad_top, pad_left;
    int out_h, out_w;
    int relu;
    int channel_bias_stride;    // channel_bias[n * channel_bias_stride + co] (>= out_channels)
};

// ---------------------------------------------------------------------------------------------
// The epilogue of one output element: bias, time-embedding bias, residual, ReLU, one rounding.
template <typename OutT>
__device__ __forceinline__ float conv_epilogue_value(float acc, int m, int n, int co, const ConvParams& p,
                                                     const float* __restrict__ bias,
                                                     const float* __restrict__ channel_bias,
                                                     const OutT* __restrict__ residual) {
    float v = acc;
    if (bias) v += bias[co];
    if (channel_bias) v += channel_bias[n * p.channel_bias_stride + co];
    if (residual) v += to_float(residual[m * p.out_channels + co]);
    if (p.relu) v = fmaxf(v, 0.0f);
    return v;
}

// Where output position m reads its input: sample, and the top-left input pixel of its window
// (in the logical, possibly upsampled, input; may be negative: padding).
struct ConvRow {
    int n, iy0, ix0;
    bool valid;
};

__device__ __forceinline__ ConvRow conv_row(int m, const ConvParams& p) {
    ConvRow r;
    const int plane = p.out_h * p.out_w;
    const int positions = p.batch * plane;
    r.valid = m < positions;
    const int mm = r.valid ? m : 0;
    r.n = mm / plane;
    const int rest = mm - r.n * plane;
    const int oy = rest / p.out_w;
    const int ox = rest - oy * p.out_w;
    r.iy0 = oy * p.stride - p.pad_top;
    r.ix0 = ox * p.stride - p.pad_left;
    return r;
}

// Element (row, k) of the implicit A matrix, as float; zero in the padding and past K.
template <typename InT>
__device__ __forceinline__ float conv_gather(const ConvRow& r, int ky, int kx, int ci, bool k_valid,
                                             const ConvParams& p, const InT* __restrict__ a,
                                             const InT* __restrict__ b) {
    const int iy = r.iy0 + ky, ix = r.ix0 + kx;
    const int logical_h = p.in_h << p.upsample_shift, logical_w = p.in_w << p.upsample_shift;
    if (!r.valid || !k_valid || iy < 0 || ix < 0 || iy >= logical_h || ix >= logical_w) return 0.0f;
    const int pixel = (r.n * p.in_h + (iy >> p.upsample_shift)) * p.in_w + (ix >> p.upsample_shift);
    return ci < p.ca ? to_float(a[pixel * p.ca + ci]) : to_float(b[pixel * p.cb + (ci - p.ca)]);
}

// ---------------------------------------------------------------------------------------------
// Where one k of the implicit GEMM is (k = tap * channels + c, tap = ky * kw + kx), kept by a loader
// thread as its K loop moves BK at a time: two divisions when the block starts instead of two (one
// per B row in the input gradient) at every k-tile. A division by a run-time value is about 20
// instructions on the GPU, and the loaders' instructions are what bounds these kernels' issue
// (examples/emulator_memory_traffic.rs); the vector loaders and conv2d.cu's SIMT loader use it.
struct KCursor {
    int k, c, tap, ky, kx;
};

__device__ __forceinline__ KCursor k_cursor(int k, int channels, int kw) {
    const int tap = k / channels;
    const int ky = tap / kw;
    return KCursor{k, k - tap * channels, tap, ky, tap - ky * kw};
}

// Moves the cursor `step` further along K (past K's end it keeps counting; k says so).
__device__ __forceinline__ void advance_k(KCursor& at, int step, int channels, int kw) {
    at.k += step;
    at.c += step;
    while (at.c >= channels) {
        at.c -= channels;
        ++at.tap;
        if (++at.kx == kw) {
            at.kx = 0;
            ++at.ky;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Split-K (versions 1 and 3): a block's k-tiles of `bk`, [first, first + count): all T of them, or
// (PARTIAL) slice z of gridDim.z: [z T / Z, (z + 1) T / Z) (the launcher keeps Z <= T: none empty).
struct KTiles {
    int first, count;
};

template <bool PARTIAL>
__device__ __forceinline__ KTiles block_k_tiles(int k_total, int bk) {
    const int all_tiles = (k_total + bk - 1) / bk;
    if (!PARTIAL) return KTiles{0, all_tiles};
    const int first = (int)(blockIdx.z * all_tiles / gridDim.z);
    return KTiles{first, (int)((blockIdx.z + 1) * all_tiles / gridDim.z) - first};
}
