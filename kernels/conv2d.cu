// conv2d.cu: 2-D convolution as an implicit GEMM, with its epilogue, upsample and concat fused.
//
// What it computes (src/backend/cpu/conv.rs is the reference):
//   out[n, oy, ox, co] = relu?( sum_{ky, kx, ci} w[co, ky, kx, ci] * x[n, oy*s - pad_top + ky, ox*s - pad_left + kx, ci]
//                               + bias[co] + channel_bias[n, co] + residual[n, oy, ox, co] )
// with x zero outside the image. Every term of the epilogue is optional (a null pointer), ReLU is a flag.
// Two foldings, so that neither tensor is ever written:
//   - upsample: x is the nearest x2 upsampling of the stored input (logical size 2H x 2W, pixel
//     (iy, ix) read at (iy/2, ix/2)): the UNet's Upsample is upsample-then-3x3-conv. THE FAST ONE
//     for it is the sub-pixel form (`subpixel`, conv_common.cuh: four 2x2 convolutions of the
//     stored input, one per output phase, with the 3x3 taps folded into their weights: 16 taps an
//     output quad instead of 36), what the UNet runs; the folded indexing takes any kernel;
//   - concat: input channels [0, Ca) come from tensor a, [Ca, Ca+Cb) from tensor b (the UNet's skip
//     concat, h first); Cb = 0 is a plain convolution.
//
// Layout: activations NHWC (a: N x H x W x Ca, b: N x H x W x Cb, residual and out: N x OH x OW x Co),
// weights [Co][kh][kw][Ci] (Ci = Ca + Cb), bias (Co) and channel_bias (N rows of Co, rows
// ConvParams::channel_bias_stride apart: the UNet's time-embedding projections of every
// ResnetBlock share one N x total tensor) f32.
// GEMM view: M = N*OH*OW output positions, N = Co, K = kh*kw*Ci, k = (ky*kw + kx)*Ci + ci; A is
// gathered from x on the fly (implicit im2col), B is the weight matrix as stored (K contiguous per
// output channel: the "col" operand of mma.sync).
//
// Two modules (a module is one file): this one, version 1, plain instructions only, so it loads on
// any driver (the PTX emulator ran it before it had tensor cores); conv2d_mma.cu, version 2 (tensor
// cores, cp.async, ldmatrix), is THE FAST ONE for bf16/f16 and is loaded on its own. Both take their
// parameters and index helpers from conv_common.cuh.
//
// Kernels (extern "C" names; <in>/<w>/<out> are the storage types of x, w and out/residual):
//   conv2d_simt_<in>_<w>_<out>   version 1, any shape, any storage type: shared-memory tiles of
//                                 64 positions x 64 channels x 16 k, 256 threads, 4x4 register blocking,
//                                 f32 arithmetic (fma). Two shared stages: the next k-tile's loads are
//                                 in registers, in flight, while the product reads this one; f32 with
//                                 channels in fours loads a float4 of 4 k a thread (one gather a
//                                 tile), k cursors instead of divisions. The f32 path, and the
//                                 reference for version 2. Also conv2d_simt_f32_<w>_<w>: an f32
//                                 input (x_t) to 16-bit weights, conv_in of a 16-bit plan on grids
//                                 too small for the tensor cores' gather (batch 1; conv.rs says why),
//                                 the input rounded to the weights' type as the gather rounds it.
//                                 conv2d_backward_input_simt_<dout>_<w>_f32 is its counterpart for
//                                 an f32 dx (conv_out's gradient), an f32 dout rounded the same way.
//   conv2d_backward_input_simt_<T>  the input gradient (dx = or += the transposed convolution of dout), same
//                                 tiles, storage type T throughout, f32 arithmetic; see its comment.
//   conv2d_backward_input_narrow_<dout>_<w>
//                                 version 4, the input gradient of layers with at most 4 input
//                                 channels and kernels up to 3x3 (conv_in's dx): a warp a dx pixel,
//                                 lanes along dout's channels, the weights in shared memory; dx's
//                                 type a run-time code. THE FAST ONE for those layers, whatever the
//                                 weights' type.
//   conv2d_simt_partial_<T>, conv2d_backward_input_simt_partial_<T>
//                                 split-K: the same blocks over slice z of the k-tiles (grid z), raw
//                                 f32 sums to the workspace; for grids short of the GPU's SMs (the
//                                 f32 UNet at batch 1: a 4x4 level's 4 blocks, each 144 k-tiles deep).
//   conv2d_split_reduce[_v4], conv2d_backward_input_split_reduce[_v4]
//                                 add the slices in a fixed order and apply the epilogue: split-K's
//                                 second launch in both modules' kernels (conv2d_mma.cu's too).
// Hot kernel (ptxas report, no spills allowed): conv2d_simt_f32_f32_f32.
#include "common.cuh"
#include "conv_common.cuh"

// ---------------------------------------------------------------------------------------------
// Version 1: SIMT tiles, f32 arithmetic.
namespace simt {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
// Rows padded by 4 floats: 16-byte aligned float4 reads, fewer bank conflicts on the transposed stores.
constexpr int PAD = 4;
}  // namespace simt

// One k-tile of the block's product: this thread's 4 x 4 register block (rows ty * 4.., columns
// tx * 4..) += A tile^T x B tile, fma in f32. The forward and the input gradient share it.
__device__ __forceinline__ void simt_tile_product(const float (&a_tile)[simt::BK][simt::BM + simt::PAD],
                                                  const float (&b_tile)[simt::BK][simt::BN + simt::PAD], int ty,
                                                  int tx, float (&acc)[4][4]) {
    using namespace simt;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        const float4 av = *reinterpret_cast<const float4*>(&a_tile[kk][ty * 4]);
        const float4 bv = *reinterpret_cast<const float4*>(&b_tile[kk][tx * 4]);
        const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
}

// Four consecutive k of row r (one tap, channels ci..ci + 3, all in a or all in b: the vector
// loader's channel counts are multiples of 4) as one float4; zeros in the padding and past K.
__device__ __forceinline__ float4 conv_gather4(const ConvRow& r, int ky, int kx, int ci, bool k_valid,
                                               const ConvParams& p, const float* __restrict__ a,
                                               const float* __restrict__ b) {
    const int iy = r.iy0 + ky, ix = r.ix0 + kx;
    const int logical_h = p.in_h << p.upsample_shift, logical_w = p.in_w << p.upsample_shift;
    if (!r.valid || !k_valid || iy < 0 || ix < 0 || iy >= logical_h || ix >= logical_w) return make_float4(0.f, 0.f, 0.f, 0.f);
    const int pixel = (r.n * p.in_h + (iy >> p.upsample_shift)) * p.in_w + (ix >> p.upsample_shift);
    return ci < p.ca ? *reinterpret_cast<const float4*>(a + pixel * p.ca + ci)
                     : *reinterpret_cast<const float4*>(b + pixel * p.cb + (ci - p.ca));
}

// Split-K's store of a thread's 4 x 4 raw sums: row i into row `rows[i]` (-1: none) of an M x C
// slice at `slice` in partials, columns c0..: four columns in one access where the row holds them
// all and is aligned.
__device__ __forceinline__ void store_partial_block(float* __restrict__ partials, long long slice,
                                                    const int (&rows)[4], int c0, int columns,
                                                    const float (&acc)[4][4]) {
    const bool quads = columns % 4 == 0;  // the workspace is 16-byte aligned, and so is every row then
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (rows[i] < 0 || c0 >= columns) continue;
        const long long at = slice + (long long)rows[i] * columns + c0;
        if (quads) {
            *reinterpret_cast<float4*>(partials + at) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (c0 + j < columns) partials[at + j] = acc[i][j];
        }
    }
}

// PARTIAL (split-K, as version 3): the block sums slice blockIdx.z of the k-tiles and stores its raw
// f32 sums to partials[z][m][co]; conv2d_split_reduce adds the slices and applies the epilogue.
// Otherwise the whole K and the epilogue here (partials unused).
template <bool PARTIAL, typename InT, typename WT, typename OutT>
__device__ __forceinline__ void conv2d_simt(const InT* __restrict__ a, const InT* __restrict__ b,
                                            const WT* __restrict__ w, const float* __restrict__ bias,
                                            const float* __restrict__ channel_bias,
                                            const OutT* __restrict__ residual, OutT* __restrict__ out,
                                            float* __restrict__ partials, const ConvParams p) {
    using namespace simt;
    // Two stages: the next k-tile goes from registers into one while the product reads the other.
    __shared__ __align__(16) float a_tiles[2][BK][BM + PAD];
    __shared__ __align__(16) float b_tiles[2][BK][BN + PAD];

    const int tid = threadIdx.x;
    const int m_block = blockIdx.x * BM, n_block = blockIdx.y * BN;
    const int ci_total = p.ca + p.cb;
    const int k_total = p.kh * p.kw * ci_total;
    const KTiles tiles = block_k_tiles<PARTIAL>(k_total, BK, conv_phases(p));
    // Output channel co's weights of this block's phase: w + co * p.weight_row, K of them.
    w += conv_weight_phase_offset(k_total, p);

    // Loading. Vector (f32 storage, both sources' channels multiples of 4, 16-byte aligned tensors:
    // uniform over the launch): a thread loads 4 consecutive k of one row as a float4, from the
    // input (row tid / 4) and from the weights (output channel n_block + tid / 4): one gather a tile
    // instead of 4. Otherwise element by element: a thread loads one k column, rows load_row + 16 i.
    bool vector = false;
    if constexpr (sizeof(InT) == 4 && sizeof(WT) == 4)
        vector = p.ca % 4 == 0 && p.cb % 4 == 0 && (unsigned long long)a % 16 == 0 &&
                 (unsigned long long)b % 16 == 0 && (unsigned long long)w % 16 == 0;
    const int load_k = vector ? 4 * (tid % 4) : tid % BK, load_row = vector ? tid / 4 : tid / BK;
    ConvRow rows[BM / 16];
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) rows[i] = conv_row(m_block + load_row + 16 * i, p);
    // This thread's k (first tile + load_k) as a cursor, moved BK a tile: no division in the loop.
    KCursor at = k_cursor(tiles.first * BK + load_k, ci_total, p.kw);

    // The loads of the cursor's tile into registers (A then B: 4 values each, zero outside)...
    float a_regs[4], b_regs[4];
    auto fetch = [&]() {
        const bool k_valid = at.k < k_total;
        const int ky = k_valid ? at.ky : 0, kx = k_valid ? at.kx : 0, k = at.k;
        if (vector) {
            const float4 av = conv_gather4(rows[0], ky, kx, at.c, k_valid, p, reinterpret_cast<const float*>(a),
                                           reinterpret_cast<const float*>(b));
            const int co = n_block + load_row;
            const float4 bv = k_valid && co < p.out_channels
                                  ? *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(w) + co * p.weight_row + k)
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
            a_regs[0] = av.x, a_regs[1] = av.y, a_regs[2] = av.z, a_regs[3] = av.w;
            b_regs[0] = bv.x, b_regs[1] = bv.y, b_regs[2] = bv.z, b_regs[3] = bv.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // (An f32 input to 16-bit weights is rounded to their type, as the tensor cores' gather does.)
                a_regs[i] = as_stored(dtype_code_of(w), conv_gather(rows[i], ky, kx, at.c, k_valid, p, a, b));
                const int co = n_block + load_row + 16 * i;
                b_regs[i] = (k_valid && co < p.out_channels) ? to_float(w[co * p.weight_row + k]) : 0.0f;
            }
        }
        advance_k(at, BK, ci_total, p.kw);
    };
    // ...and their store into stage s (k-major, as the product reads them).
    auto stash = [&](int s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int kk = vector ? load_k + i : load_k, row = vector ? load_row : load_row + 16 * i;
            a_tiles[s][kk][row] = a_regs[i];
            b_tiles[s][kk][row] = b_regs[i];
        }
    };

    // Computing: a 4 x 4 register block, positions along ty, channels along tx (stores coalesce on co).
    const int tx = tid % 16, ty = tid / 16;
    float acc[4][4] = {};

    fetch();
    stash(0);
    __syncthreads();
    for (int t = 0; t < tiles.count; ++t) {
        const bool more = t + 1 < tiles.count;
        if (more) fetch();  // in flight during the product
        simt_tile_product(a_tiles[t % 2], b_tiles[t % 2], ty, tx, acc);
        // Stage (t + 1) % 2 was last read in tile t - 1, before the barrier that ended it.
        if (more) stash((t + 1) % 2);
        __syncthreads();
    }

    // GEMM row m is output pixel conv_output_pixel(m) (itself but in the sub-pixel form).
    const int gemm_rows = conv_gemm_rows(p);
    const int plane = p.out_h * p.out_w;
    const int co0 = n_block + tx * 4;
    int out_rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m_block + ty * 4 + i;
        out_rows[i] = m < gemm_rows ? conv_output_pixel(m, p) : -1;
    }
    if constexpr (PARTIAL) {
        const long long slice = partial_slice((long long)p.batch * plane * p.out_channels, conv_phases(p));
        store_partial_block(partials, slice, out_rows, co0, p.out_channels, acc);
        return;
    }
    // A thread's four channels in one access where all exist and they are aligned (channels a
    // multiple of 4, the tensor aligned to 4 elements): a half-warp then stores 16 whole rows' worth
    // of contiguous bytes instead of one element of each in turn.
    const bool quads = p.out_channels % 4 == 0 && (unsigned long long)out % (4 * sizeof(OutT)) == 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = out_rows[i];
        if (m < 0 || co0 >= p.out_channels) continue;
        const int n = m / plane;
        // The row's terms first, all in flight at once (conv_common.cuh; a column past Co loads
        // column Co - 1's, never stored).
        EpilogueTerms terms[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            terms[j] = conv_epilogue_load(m, n, min(co0 + j, p.out_channels - 1), p, bias, channel_bias, residual);
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = conv_epilogue_sum(acc[i][j], terms[j], p, bias, channel_bias, residual);
        const long long at = (long long)m * p.out_channels + co0;
        if (quads && co0 + 3 < p.out_channels) {
            store_dyn_n<4>(out, dtype_code_of(out), at, v);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (co0 + j < p.out_channels) out[at + j] = from_float<OutT>(v[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The input gradient (version 1): dx = (or += where `accumulate`) the transposed convolution of
// dout, as an implicit GEMM over the input positions: M = N*H*W (dx rows, the logical input: the
// caller splits a concat and sums a folded upsample's copies), N = Ci, K = kh*kw*Co, k = tap*Co + co:
//   dx[n, iy, ix, ci] += sum_{ky, kx, co} dout[n, oy, ox, co] * w[co, ky, kx, ci],
//   oy = (iy + pad_top - ky) / s, ox = (ix + pad_left - kx) / s, where those divide exactly and land
//   inside the output (transposed_tap_source; the sub-pixel form's 16 taps there too, dx the stored
//   input). Each dx element has one owner thread (read, add, write: no atomics).
// The same ConvParams as the forward: in_h/in_w/ca the logical input (cb 0, no upsample), kh/kw,
// stride, pads, out_h/out_w/out_channels the forward's output (dout).
// PARTIAL: split-K as the forward's (partials[z][m][ci], then conv2d_backward_input_split_reduce).
template <bool PARTIAL, typename DoutT, typename WT, typename DxT>
__device__ __forceinline__ void conv2d_backward_input_simt(const DoutT* __restrict__ dout, const WT* __restrict__ w,
                                                           DxT* __restrict__ dx, float* __restrict__ partials,
                                                           const ConvParams p, int accumulate) {
    using namespace simt;
    // Two stages, as the forward's.
    __shared__ __align__(16) float a_tiles[2][BK][BM + PAD];
    __shared__ __align__(16) float b_tiles[2][BK][BN + PAD];

    const int tid = threadIdx.x;
    const int m_block = blockIdx.x * BM, n_block = blockIdx.y * BN;
    const int ci_total = p.ca;
    const int taps = p.kh * p.kw;
    const int k_total = taps * p.out_channels;
    const KTiles tiles = block_k_tiles<PARTIAL>(k_total, BK, 1);
    const int plane = p.in_h * p.in_w;
    const int positions = p.batch * plane;

    // Loading. Vector (f32, Co and Ci multiples of 4, 16-byte aligned dout and weights): A, 4
    // consecutive k (4 output channels at one tap: contiguous in dout) of row tid / 4 as a float4;
    // B, 4 consecutive input channels of k row tid / 16 (contiguous in w). Otherwise element by
    // element: A one k column, rows load_row + 16 i; B lanes along ci (a warp reads whole sectors).
    bool vector = false;
    if constexpr (sizeof(DoutT) == 4 && sizeof(WT) == 4)
        vector = p.out_channels % 4 == 0 && ci_total % 4 == 0 && (unsigned long long)dout % 16 == 0 &&
                 (unsigned long long)w % 16 == 0;
    const int load_k = vector ? 4 * (tid % 4) : tid % BK, load_row = vector ? tid / 4 : tid / BK;
    // This thread's dx rows: sample and padded coordinates (iy + pad_top, ix + pad_left).
    int row_n[BM / 16], row_y[BM / 16], row_x[BM / 16];
    bool row_ok[BM / 16];
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
        const int m = m_block + load_row + 16 * i;
        row_ok[i] = m < positions;
        const int mm = row_ok[i] ? m : 0;
        row_n[i] = mm / plane;
        const int rest = mm - row_n[i] * plane;
        row_y[i] = rest / p.in_w + p.pad_top;
        row_x[i] = rest % p.in_w + p.pad_left;
    }
    // The cursors of A's k (this thread's column) and of the vector B's k row, moved BK a tile.
    const int b_row = tid / 16, b_col = 4 * (tid % 16);
    KCursor a_at = k_cursor(tiles.first * BK + load_k, p.out_channels, p.kw);
    KCursor b_at = k_cursor(tiles.first * BK + b_row, p.out_channels, p.kw);
    // Where dout holds row i's value at (tap ky, kx, channel co): -1 where the tap skips the row.
    auto dout_at = [&](int i, int ky, int kx, int co) -> long long {
        const int source = row_ok[i] ? transposed_tap_source(row_y[i], row_x[i], ky, kx, p) : -1;
        return source < 0 ? -1 : ((long long)row_n[i] * p.out_h * p.out_w + source) * p.out_channels + co;
    };

    // The loads of tile `kt` into registers...
    float a_regs[4], b_regs[4];
    auto fetch = [&](int kt) {
        const bool k_valid = a_at.k < k_total;
        if (vector) {
            const long long source = k_valid ? dout_at(0, a_at.ky, a_at.kx, a_at.c) : -1;
            const float4 av = source >= 0 ? *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(dout) + source)
                                          : make_float4(0.f, 0.f, 0.f, 0.f);
            const int ci = n_block + b_col;
            const bool b_valid = b_at.k < k_total && ci < ci_total;
            const float4 bv =
                b_valid ? *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(w) +
                                                            (b_at.c * taps + b_at.tap) * ci_total + ci)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
            a_regs[0] = av.x, a_regs[1] = av.y, a_regs[2] = av.z, a_regs[3] = av.w;
            b_regs[0] = bv.x, b_regs[1] = bv.y, b_regs[2] = bv.z, b_regs[3] = bv.w;
            advance_k(b_at, BK, p.out_channels, p.kw);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const long long source = k_valid ? dout_at(i, a_at.ky, a_at.kx, a_at.c) : -1;
                // (f32 dout to 16-bit weights is rounded to their type, as the tensor cores round it.)
                a_regs[i] = source >= 0 ? as_stored(dtype_code_of(w), to_float(dout[source])) : 0.0f;
                // B element tid + THREADS i of the tile: k row e / BN, input channel e % BN.
                const int e = tid + THREADS * i, kb = kt * BK + e / BN, ci = n_block + e % BN;
                const int tap_b = kb / p.out_channels, co_b = kb - tap_b * p.out_channels;
                b_regs[i] = (kb < k_total && ci < ci_total) ? to_float(w[(co_b * taps + tap_b) * ci_total + ci]) : 0.0f;
            }
        }
        advance_k(a_at, BK, p.out_channels, p.kw);
    };
    // ...and their store into stage s.
    auto stash = [&](int s) {
        if (vector) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a_tiles[s][load_k + i][load_row] = a_regs[i];
            *reinterpret_cast<float4*>(&b_tiles[s][b_row][b_col]) = make_float4(b_regs[0], b_regs[1], b_regs[2], b_regs[3]);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a_tiles[s][load_k][load_row + 16 * i] = a_regs[i];
                const int e = tid + THREADS * i;
                b_tiles[s][e / BN][e % BN] = b_regs[i];
            }
        }
    };

    const int tx = tid % 16, ty = tid / 16;
    float acc[4][4] = {};

    fetch(tiles.first);
    stash(0);
    __syncthreads();
    for (int t = 0; t < tiles.count; ++t) {
        const bool more = t + 1 < tiles.count;
        if (more) fetch(tiles.first + t + 1);  // in flight during the product
        simt_tile_product(a_tiles[t % 2], b_tiles[t % 2], ty, tx, acc);
        // Stage (t + 1) % 2 was last read in tile t - 1, before the barrier that ended it.
        if (more) stash((t + 1) % 2);
        __syncthreads();
    }

    const int ci0 = n_block + tx * 4;
    if constexpr (PARTIAL) {
        int rows[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) rows[i] = m_block + ty * 4 + i < positions ? m_block + ty * 4 + i : -1;
        store_partial_block(partials, partial_slice((long long)positions * ci_total, 1), rows, ci0, ci_total, acc);
        return;
    }
    // As the forward's epilogue: four channels in one access where they can be.
    const bool quads = ci_total % 4 == 0 && (unsigned long long)dx % (4 * sizeof(DxT)) == 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m_block + ty * 4 + i;
        if (m >= positions || ci0 >= ci_total) continue;
        const long long at = (long long)m * ci_total + ci0;
        if (quads && ci0 + 3 < ci_total) {
            store_grad_n<4>(dx, dtype_code_of(dx), at, acc[i], accumulate);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (ci0 + j < ci_total)
                    dx[at + j] = from_float<DxT>(accumulate ? to_float(dx[at + j]) + acc[i][j] : acc[i][j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The narrow input gradient (version 4): the same dx for a layer with at most 4 input channels,
// conv_in's (Ci = 3 under a 128-channel dout). As a GEMM its N is 3, and the tiles above and the
// tensor cores' are 64 channels wide: 61 columns of 64 padding, every k-step loading a weight tile
// it mostly discards (on the H200 at dddc2c9, batch 64: 0.31 ms, 1.5 TFLOP/s, 7 times conv_out's
// forward, a GEMM of the same size). Here a warp takes one dx pixel at a time: lane l reads dout
// channels 4l .. 4l + 3 (then 128 further, chunk by chunk) of every tap that reaches the pixel (up
// to 3x3), all taps' loads in flight together, one 256- or 512-byte row a warp access; multiplies
// them by the weights a block holds in shared memory, f32, [tap][4 dx channels][Co] (a lane's four
// channels one float4 a dx channel, conflict-free; Co a multiple of 4 and dout aligned to 4
// elements, the launcher checks); and the lanes' sums meet by shuffles. A block of 8 warps stages
// the weights once for 8 x `pixels_per_warp` consecutive pixels (the launcher picks the count:
// blocks for the whole GPU first, then fewer stagings). The products are the tensor cores' (an f32
// dout rounded once to the weights' type), summed in f32 in an order that depends on nothing but
// Co: a sample's dx has the same bits at every batch size and grid.
namespace narrow {
constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr int CHANNELS = 4;  // dx channels at most (the launcher checks)
constexpr int K = 3;         // kh and kw at most (the launcher checks)
constexpr int CHUNK = 4 * 32;  // dout channels a warp reads a tap
}  // namespace narrow

template <typename DoutT, typename WT>
__device__ __forceinline__ void conv2d_backward_input_narrow(const DoutT* __restrict__ dout, const WT* __restrict__ w,
                                                             void* __restrict__ dx, int dx_dtype, const ConvParams p,
                                                             int accumulate, int pixels_per_warp) {
    using namespace narrow;
    extern __shared__ __align__(16) float w_rows[];  // dynamic: taps x 4 rows of Co (conv.rs sizes it)
    const int taps = p.kh * p.kw, co_total = p.out_channels, ci_total = p.ca;
    // Row (tap * 4 + c), column co = w[co][tap][c]; zero for c >= Ci. The threads walk rows and
    // columns without a division a step.
    {
        int row = threadIdx.x / co_total, co = threadIdx.x - row * co_total;
        while (row < taps * CHANNELS) {
            const int tap = row >> 2, c = row & 3;
            w_rows[row * co_total + co] = c < ci_total ? to_float(w[(co * taps + tap) * ci_total + c]) : 0.0f;
            co += THREADS;
            while (co >= co_total) {
                co -= co_total;
                ++row;
            }
        }
    }
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int positions = p.batch * p.in_h * p.in_w;
    const int first = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * pixels_per_warp;
    const int end = min(first + pixels_per_warp, positions);
    // The warp's pixel (n, y, x): divided out once, then stepped.
    int n = first / (p.in_h * p.in_w), y = first - n * p.in_h * p.in_w, x = y % p.in_w;
    y /= p.in_w;
#pragma unroll 1
    for (int m = first; m < end; ++m) {
        // The dout row and column each tap row and column meets (-1: none), then where each tap's
        // dout row starts in the sample's (-1: the tap skips this pixel). The same for the whole
        // warp: the branches below do not diverge.
        int oy[K], ox[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            oy[k] = k < p.kh ? transposed_axis_source(y + p.pad_top, k, p.stride, p.out_h) : -1;
            ox[k] = k < p.kw ? transposed_axis_source(x + p.pad_left, k, p.stride, p.out_w) : -1;
        }
        int rows[K][K];
#pragma unroll
        for (int ky = 0; ky < K; ++ky)
#pragma unroll
            for (int kx = 0; kx < K; ++kx)
                rows[ky][kx] = oy[ky] < 0 || ox[kx] < 0 ? -1 : (oy[ky] * p.out_w + ox[kx]) * co_total;
        const DoutT* sample = dout + (long long)n * p.out_h * p.out_w * co_total;

        float acc[CHANNELS] = {};
#pragma unroll 1
        for (int chunk = 0; chunk < co_total; chunk += CHUNK) {
            const int co = chunk + 4 * lane;
            const bool active = co < co_total;
            float d[K][K][4];
#pragma unroll
            for (int ky = 0; ky < K; ++ky)
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    float(&v)[4] = d[ky][kx];
#pragma unroll
                    for (int j = 0; j < 4; ++j) v[j] = 0.0f;
                    const int row = rows[ky][kx];
                    if (row < 0 || !active) continue;
                    load_dyn_n<4>(sample, dtype_code_of(dout), row + co, v);
                    // (An f32 dout to 16-bit weights is rounded to their type, as the tensor cores round it.)
                    if constexpr (sizeof(DoutT) == 4 && sizeof(WT) == 2) {
#pragma unroll
                        for (int j = 0; j < 4; ++j) v[j] = as_stored(dtype_code_of(w), v[j]);
                    }
                }
            if (!active) continue;
#pragma unroll
            for (int ky = 0; ky < K; ++ky)
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    if (rows[ky][kx] < 0) continue;
                    const float* tap_rows = w_rows + (ky * p.kw + kx) * CHANNELS * co_total + co;
                    const float(&v)[4] = d[ky][kx];
#pragma unroll
                    for (int c = 0; c < CHANNELS; ++c) {  // (all four: rows past Ci are zeros)
                        const float4 wv = *reinterpret_cast<const float4*>(tap_rows + c * co_total);
                        acc[c] = fmaf(v[0], wv.x, acc[c]);
                        acc[c] = fmaf(v[1], wv.y, acc[c]);
                        acc[c] = fmaf(v[2], wv.z, acc[c]);
                        acc[c] = fmaf(v[3], wv.w, acc[c]);
                    }
                }
        }
        // Lane c stores dx channel c of the warp's sums.
        float g = 0.0f;
#pragma unroll
        for (int c = 0; c < CHANNELS; ++c) {
            if (c < ci_total) {
                const float sum = warp_sum(acc[c]);
                if (lane == c) g = sum;
            }
        }
        if (lane < ci_total) store_grad(dx, dx_dtype, (long long)m * ci_total + lane, g, accumulate);
        if (++x == p.in_w) {
            x = 0;
            if (++y == p.in_h) {
                y = 0;
                ++n;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points. The launcher (src/backend/cuda/conv.rs) picks the name from the storage types.
#define CONV_PARAMS_DECL(InT, WT, OutT)                                                                     \
    const InT *__restrict__ a, const InT *__restrict__ b, const WT *__restrict__ w,                          \
        const float *__restrict__ bias, const float *__restrict__ channel_bias,                              \
        const OutT *__restrict__ residual, OutT *__restrict__ out, const ConvParams p
#define CONV_PARAMS_PASS a, b, w, bias, channel_bias, residual, out

#define CONV_SIMT_ENTRY(in_name, InT, w_name, WT, out_name, OutT)                                           \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                             \
        conv2d_simt_##in_name##_##w_name##_##out_name(CONV_PARAMS_DECL(InT, WT, OutT)) {                    \
        conv2d_simt<false, InT, WT, OutT>(CONV_PARAMS_PASS, nullptr, p);                                    \
    }
// Split-K: `conv2d_simt_partial_<t>`, grid z = the slices.
#define CONV_SIMT_PARTIAL_ENTRY(name, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                             \
        conv2d_simt_partial_##name(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, \
                                   float* __restrict__ partials, const ConvParams p) {                      \
        conv2d_simt<true, T, T, T>(a, b, w, nullptr, nullptr, nullptr, nullptr, partials, p);                \
    }


CONV_SIMT_ENTRY(f32, float, f32, float, f32, float)
CONV_SIMT_ENTRY(bf16, bf16, bf16, bf16, bf16, bf16)
CONV_SIMT_ENTRY(f16, f16, f16, f16, f16, f16)
CONV_SIMT_ENTRY(f32, float, bf16, bf16, bf16, bf16)
CONV_SIMT_ENTRY(f32, float, f16, f16, f16, f16)
CONV_SIMT_PARTIAL_ENTRY(f32, float)
CONV_SIMT_PARTIAL_ENTRY(bf16, bf16)
CONV_SIMT_PARTIAL_ENTRY(f16, f16)

#define CONV_BACKWARD_INPUT_ENTRY(name, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                             \
        conv2d_backward_input_simt_##name(const T* __restrict__ dout, const T* __restrict__ w,              \
                                          T* __restrict__ dx, const ConvParams p, int accumulate) {         \
        conv2d_backward_input_simt<false, T, T, T>(dout, w, dx, nullptr, p, accumulate);                    \
    }
// An f32 dx with 16-bit weights and dout in f32 or their type: conv_out's gradient in a 16-bit plan,
// on grids too small for the tensor cores' gather (src/backend/cuda/conv.rs, small_gather). Both
// dout types, so that the kernel a launch runs never depends on dout's type (a rounded dout gives
// the same bits: tests/backend_ops.rs, narrow_dout_gives_the_same_bits).
#define CONV_BACKWARD_INPUT_F32_DX_ENTRY(dout_name, DoutT, w_name, WT)                                      \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                             \
        conv2d_backward_input_simt_##dout_name##_##w_name##_f32(                                            \
            const DoutT* __restrict__ dout, const WT* __restrict__ w, float* __restrict__ dx, const ConvParams p, \
            int accumulate) {                                                                               \
        conv2d_backward_input_simt<false, DoutT, WT, float>(dout, w, dx, nullptr, p, accumulate);          \
    }
#define CONV_BACKWARD_INPUT_PARTIAL_ENTRY(name, T)                                                          \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                             \
        conv2d_backward_input_simt_partial_##name(const T* __restrict__ dout, const T* __restrict__ w,      \
                                                  float* __restrict__ partials, const ConvParams p) {       \
        conv2d_backward_input_simt<true, T, T, T>(dout, w, nullptr, partials, p, 0);                        \
    }

CONV_BACKWARD_INPUT_ENTRY(f32, float)
CONV_BACKWARD_INPUT_ENTRY(bf16, bf16)
CONV_BACKWARD_INPUT_ENTRY(f16, f16)
CONV_BACKWARD_INPUT_F32_DX_ENTRY(f32, float, bf16, bf16)
CONV_BACKWARD_INPUT_F32_DX_ENTRY(bf16, bf16, bf16, bf16)
CONV_BACKWARD_INPUT_F32_DX_ENTRY(f32, float, f16, f16)
CONV_BACKWARD_INPUT_F32_DX_ENTRY(f16, f16, f16, f16)
CONV_BACKWARD_INPUT_PARTIAL_ENTRY(f32, float)
CONV_BACKWARD_INPUT_PARTIAL_ENTRY(bf16, bf16)
CONV_BACKWARD_INPUT_PARTIAL_ENTRY(f16, f16)

// The narrow input gradient (version 4), dx's type a run-time code: every weight type with dout in
// f32 or the weights' type. (A minimum of one block an SM: with the bare bound, ptxas held the f32
// dout, f16 weights entry to 80 registers and spilled on sm_80 and sm_87.)
#define CONV_BACKWARD_INPUT_NARROW_ENTRY(dout_name, DoutT, w_name, WT)                                      \
    extern "C" __global__ void __launch_bounds__(narrow::THREADS, 1)                                        \
        conv2d_backward_input_narrow_##dout_name##_##w_name(const DoutT* __restrict__ dout,                 \
                                                             const WT* __restrict__ w, void* __restrict__ dx, \
                                                             int dx_dtype, const ConvParams p, int accumulate, \
                                                             int pixels_per_warp) {                         \
        conv2d_backward_input_narrow<DoutT, WT>(dout, w, dx, dx_dtype, p, accumulate, pixels_per_warp);    \
    }

CONV_BACKWARD_INPUT_NARROW_ENTRY(f32, float, f32, float)
CONV_BACKWARD_INPUT_NARROW_ENTRY(f32, float, bf16, bf16)
CONV_BACKWARD_INPUT_NARROW_ENTRY(bf16, bf16, bf16, bf16)
CONV_BACKWARD_INPUT_NARROW_ENTRY(f32, float, f16, f16)
CONV_BACKWARD_INPUT_NARROW_ENTRY(f16, f16, f16, f16)

// ---------------------------------------------------------------------------------------------
// Split-K's reductions, for version 1's partial kernels above and version 3's (conv2d_mma.cu):
// plain instructions, so they live here, in the module every driver loads.
// The split-K reduction of the forward: out[m][co] = epilogue(sum over slices s = 0, 1, ... of
// partials[s][m][co]), the slices added in that fixed order (the same bits every run: no atomics),
// then bias, channel_bias, residual and ReLU as conv_epilogue_sum, one rounding to out's type
// (a run-time code; residual has out's type). A thread takes VEC consecutive channels of a row:
// 4 (`_v4`) where Co, the channel-bias stride and every pointer allow vector accesses and the
// outputs are many (the launcher decides: `REDUCE_VECTOR_OUTPUTS`), else 1. Grid-stride over the
// vectors, whose count the launcher keeps under 2^31 (a split's outputs fit its workspace), so a
// vector's row is one 32-bit division. The epilogue's operands are loaded first and the slices'
// loop is unrolled, so a thread's loads, all independent, issue together; the additions keep
// their order. It took a thread an element, a 64-bit division for each and four slices' loads at a
// time: in the latency model of examples/emulator_launch_depth.rs (cifar10 bf16) its 56 calls at
// batch 16 went 103.6 -> 61.5 us, its 75 at batch 1 72.3 -> 61.7 us.
template <int VEC>
__device__ __forceinline__ void split_reduce_forward(const float* __restrict__ partials, int slices,
                                                    const float* __restrict__ bias,
                                                    const float* __restrict__ channel_bias,
                                                    const void* __restrict__ residual, void* __restrict__ out,
                                                    int out_dtype, const ConvParams p) {
    const int plane = p.out_h * p.out_w;
    const int row_vectors = p.out_channels / VEC;
    const int total = p.batch * plane * p.out_channels;
    const int vectors = total / VEC;
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors; v += gridDim.x * blockDim.x) {
        const int m = v / row_vectors;
        const int co = (v - m * row_vectors) * VEC;
        const int i = m * p.out_channels + co;
        float b[VEC], c[VEC], r[VEC], sum[VEC];
        if (bias) load_dyn_n<VEC>(bias, DTYPE_F32, co, b);
        if (channel_bias) load_dyn_n<VEC>(channel_bias, DTYPE_F32, (long long)(m / plane) * p.channel_bias_stride + co, c);
        if (residual) load_dyn_n<VEC>(residual, out_dtype, i, r);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] = 0.0f;
#pragma unroll 8
        for (int s = 0; s < slices; ++s) {
            float part[VEC];
            load_dyn_n<VEC>(partials, DTYPE_F32, (long long)s * total + i, part);
#pragma unroll
            for (int k = 0; k < VEC; ++k) sum[k] += part[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (bias) sum[k] += b[k];
            if (channel_bias) sum[k] += c[k];
            if (residual) sum[k] += r[k];
            if (p.relu) sum[k] = fmaxf(sum[k], 0.0f);
        }
        store_dyn_n<VEC>(out, out_dtype, i, sum);
    }
}

// The split-K reduction of the input gradient: dx[i] = (or +=, `accumulate`) the sum over slices
// s = 0, 1, ... of partials[s][i], in that fixed order; dx's type a run-time code (store_grad, as the
// unsplit kernel stores). A thread takes VEC consecutive elements (4, `_v4`, where the `total` = M x
// Ci elements and dx allow it and they are many; else 1), grid-stride; dx's old value (where
// accumulating) is loaded after the slices, their loop unrolled, as in conv2d_split_reduce (at batch 16 its 56 calls 81.9 ->
// 38.2 us; at batch 1 its 73 60.9 -> 45.8 us).
template <int VEC>
__device__ __forceinline__ void split_reduce_input_gradient(const float* __restrict__ partials, int slices,
                                                                   long long total, void* __restrict__ dx,
                                                                   int dx_dtype, int accumulate) {
    GRID_STRIDE_LOOP(v, total / VEC) {
        const long long i = v * VEC;
        float sum[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] = 0.0f;
#pragma unroll 8
        for (int s = 0; s < slices; ++s) {
            float part[VEC];
            load_dyn_n<VEC>(partials, DTYPE_F32, s * total + i, part);
#pragma unroll
            for (int k = 0; k < VEC; ++k) sum[k] += part[k];
        }
        store_grad_n<VEC>(dx, dx_dtype, i, sum, accumulate);
    }
}

#define CONV_SPLIT_REDUCE_ENTRIES(suffix, VEC)                                                              \
    extern "C" __global__ void conv2d_split_reduce##suffix(                                                 \
        const float* __restrict__ partials, int slices, const float* __restrict__ bias,                     \
        const float* __restrict__ channel_bias, const void* __restrict__ residual, void* __restrict__ out, \
        int out_dtype, const ConvParams p) {                                                                \
        split_reduce_forward<VEC>(partials, slices, bias, channel_bias, residual, out, out_dtype, p);       \
    }                                                                                                       \
    extern "C" __global__ void conv2d_backward_input_split_reduce##suffix(                                  \
        const float* __restrict__ partials, int slices, long long total, void* __restrict__ dx,             \
        int dx_dtype, int accumulate) {                                                                     \
        split_reduce_input_gradient<VEC>(partials, slices, total, dx, dx_dtype, accumulate);              \
    }

CONV_SPLIT_REDUCE_ENTRIES(, 1)
CONV_SPLIT_REDUCE_ENTRIES(_v4, 4)
