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
    int subpixel;               // 1: the sub-pixel form of an upsample convolution (below)
    int weight_row;             // elements from one output channel's weights to the next's (the
                                // forward's; a kernel parameter, not a register, in the K loop)
};

// ---------------------------------------------------------------------------------------------
// The sub-pixel form of the UNet's Upsample (`subpixel`: a 3x3, pad-1 convolution of the nearest x2
// upsampling of x). Output pixel (2i + py, 2j + px) reads x only at rows i - 1 + py .. i + py and
// columns j - 1 + px .. j + px, each through the sum of the 3x3 taps that land on it; so each phase
// (py, px) is a 2x2 convolution of x itself with its own weights, stored [Co][phase][tap][Ci] (phase
// 2 py + px, tap 2 ty + tx; src/backend/mod.rs `subpixel_weights` folds them): 16 taps an output
// quad where the folded upsample reads 36, and no upsampled tensor.
//   Forward: the GEMM of phase blockIdx.z % 4 (grid z = 4 x the split-K slices) over x's grid:
//            M = N * H * W, K = 4 Ci (kh = kw = 2, pads 1 the phase-0 values, upsample_shift 0);
//            out_h, out_w the real output's (2H x 2W), where its epilogue stores.
//   Input gradient: one GEMM, M = x's pixels, K = 16 taps x Co (kh = kw = 4: ky the phase, kx the
//            tap); out_h, out_w dout's (2H x 2W), pads 0 (transposed_tap_source).
__device__ __forceinline__ int conv_phases(const ConvParams& p) { return p.subpixel ? 4 : 1; }
// The forward's phase (0 without sub-pixel).
__device__ __forceinline__ int conv_phase(const ConvParams& p) { return p.subpixel ? (int)(blockIdx.z & 3) : 0; }
// The forward GEMM's rows: output positions, or x's (one phase's) in the sub-pixel form.
__device__ __forceinline__ int conv_gemm_rows(const ConvParams& p) {
    return p.batch * (p.out_h >> p.subpixel) * (p.out_w >> p.subpixel);
}
// The output pixel (n * out_h + oy) * out_w + ox of forward GEMM row m.
__device__ __forceinline__ int conv_output_pixel(int m, const ConvParams& p) {
    if (!p.subpixel) return m;
    const int gw = p.out_w >> 1, plane = (p.out_h >> 1) * gw;
    const int n = m / plane, rest = m - n * plane, oy = rest / gw, ox = rest - oy * gw;
    const int phase = conv_phase(p);
    return (n * p.out_h + 2 * oy + (phase >> 1)) * p.out_w + 2 * ox + (phase & 1);
}
// Where the forward block's phase starts in an output channel's weights (`weight_row` apart: K, or
// the 4 phases' 4 K).
__device__ __forceinline__ int conv_weight_phase_offset(int k_total, const ConvParams& p) {
    return conv_phase(p) * k_total;
}

// ---------------------------------------------------------------------------------------------
// The epilogue of one output element: bias, time-embedding bias, residual, ReLU, one rounding.
// Its terms come from memory. A tile over a small grid loads all of a row's terms before it adds any
// (conv_epilogue_load, then conv_epilogue_sum), so that a thread's loads are in flight together:
// loaded and added one element at a time, each load waited out before its store, they took most of
// an unsplit batch-1 launch's time in the latency model (examples/emulator_launch_depth.rs:
// cifar10's 1x1 nin_shortcut at 16x16, 17.1 -> 4.5 us). Over grids that fill the GPU, where other
// blocks hide that latency, conv_epilogue_value loads each term where it adds it: fewer
// instructions.
struct EpilogueTerms {
    float bias, channel_bias, residual;  // 0 where absent
};

// The terms of output (m, co), co < Co.
template <typename OutT>
__device__ __forceinline__ EpilogueTerms conv_epilogue_load(int m, int n, int co, const ConvParams& p,
                                                            const float* __restrict__ bias,
                                                            const float* __restrict__ channel_bias,
                                                            const OutT* __restrict__ residual) {
    EpilogueTerms t{0.0f, 0.0f, 0.0f};
    if (bias) t.bias = bias[co];
    if (channel_bias) t.channel_bias = channel_bias[n * p.channel_bias_stride + co];
    if (residual) t.residual = to_float(residual[m * p.out_channels + co]);
    return t;
}

// acc plus the terms present, in that order, then ReLU (f32; the caller rounds once).
__device__ __forceinline__ float conv_epilogue_sum(float acc, const EpilogueTerms& t, const ConvParams& p,
                                                   bool bias, bool channel_bias, bool residual) {
    float v = acc;
    if (bias) v += t.bias;
    if (channel_bias) v += t.channel_bias;
    if (residual) v += t.residual;
    if (p.relu) v = fmaxf(v, 0.0f);
    return v;
}

// Both at once, for output (m, co), co < Co: the same additions in the same order, each term loaded
// as it is added (written out: composed of the two above, the wide tile issued 5% more
// instructions an mma in the emulator's count).
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
    const int grid_w = p.out_w >> p.subpixel;
    const int plane = (p.out_h >> p.subpixel) * grid_w;
    r.valid = m < p.batch * plane;
    const int mm = r.valid ? m : 0;
    r.n = mm / plane;
    const int rest = mm - r.n * plane;
    const int oy = rest / grid_w;
    const int ox = rest - oy * grid_w;
    // (A sub-pixel phase (py, px) starts its window py rows lower and px columns to the right.)
    const int phase = conv_phase(p);
    r.iy0 = oy * p.stride - p.pad_top + (phase >> 1);
    r.ix0 = ox * p.stride - p.pad_left + (phase & 1);
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
// The input gradient's taps, one axis (not the sub-pixel form): the dout row (or column) of `size`
// that padded dx coordinate y meets through kernel offset k with `stride`; -1 where none does.
__device__ __forceinline__ int transposed_axis_source(int y, int k, int stride, int size) {
    const int t = y - k;
    if (t < 0) return -1;
    int o = t;
    if (stride == 2) {
        if (t & 1) return -1;
        o = t >> 1;
    } else if (stride != 1) {
        if (t % stride != 0) return -1;
        o = t / stride;
    }
    return o < size ? o : -1;
}

// The input gradient's taps (both versions): the dout position (oy * out_w + ox) that dx position
// (y, x), in padded coordinates (iy + pad_top, ix + pad_left), meets through tap (ky, kx); -1 when
// that tap skips it (not an exact multiple of the stride, or outside the output). In the sub-pixel
// form, ky is the phase (py, px) and kx the tap (ty, tx) of a 2x2 window that starts at x's pixel
// (i - 1 + py, j - 1 + px) for output pixel (2i + py, 2j + px).
__device__ __forceinline__ int transposed_tap_source(int y, int x, int ky, int kx, const ConvParams& p) {
    if (p.subpixel) {
        const int py = ky >> 1, px = ky & 1;
        const int oy = y + 1 - py - (kx >> 1), ox = x + 1 - px - (kx & 1);  // the low-res window's row
        if (oy < 0 || ox < 0 || 2 * oy >= p.out_h || 2 * ox >= p.out_w) return -1;
        return (2 * oy + py) * p.out_w + 2 * ox + px;
    }
    const int oy = transposed_axis_source(y, ky, p.stride, p.out_h);
    const int ox = transposed_axis_source(x, kx, p.stride, p.out_w);
    return oy < 0 || ox < 0 ? -1 : oy * p.out_w + ox;
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
// (PARTIAL) slice z of the Z slices: [z T / Z, (z + 1) T / Z) (the launcher keeps Z <= T: none
// empty), where grid z holds `phases` blocks a slice (the sub-pixel forward's; else 1).
struct KTiles {
    int first, count;
};

template <bool PARTIAL>
__device__ __forceinline__ KTiles block_k_tiles(int k_total, int bk, int phases) {
    const int all_tiles = (k_total + bk - 1) / bk;
    if (!PARTIAL) return KTiles{0, all_tiles};
    const int z = (int)blockIdx.z / phases, slices = (int)gridDim.z / phases;
    const int first = z * all_tiles / slices;
    return KTiles{first, (z + 1) * all_tiles / slices - first};
}

// Split-K's partial sums of a thread's 4 x 4 block (version 1) or its pairs (version 3): the slice
// of the block (grid z over `phases`) times the M x C slice size.
__device__ __forceinline__ long long partial_slice(long long slice_elements, int phases) {
    return (long long)(blockIdx.z / phases) * slice_elements;
}
