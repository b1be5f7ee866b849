// conv2d_mma.cu: the convolution of conv2d.cu (same semantics, layout and parameters, the sub-pixel
// upsample included: read its head comment) on the tensor cores. THE FAST ONE for f16/bf16 weights.
//
// Kernels (extern "C" names; <in>/<w>/<out> are the storage types of x, w and out/residual):
//   conv2d_mma_<in>_<w>_<out>         mma.sync.aligned.m16n8k16 (f16 or bf16 operands, f32 accumulation),
//                                      ldmatrix from swizzled (conflict-free) shared tiles, a 3-stage
//                                      cp.async pipeline; 128 positions x 64 channels x 32 k per block,
//                                      4 warps of 64 x 32. Inputs in the operand type with Ca, Cb
//                                      multiples of 8 and 16-byte aligned tensors (the launcher checks):
//                                      16-byte cp.async, 8 channels at a time.
//   conv2d_mma_wide_<in>_<w>_<out>    the same with 128 x 128 blocks, 4 warps of 64 x 64: fewer
//                                      instructions per mma but half the warps an SM, and slower on an
//                                      H200 (dddc2c9), so the launcher takes it only when asked
//                                      (PURIFIER_CONV_WIDE=on, src/switches.rs).
//   conv2d_mma_gather_<in>_<w>_<out>  the same with element-wise loads, rounded once to the operand
//                                      type and stored to shared: f32 inputs (conv_in reads x_t in
//                                      f32), channel counts like 3.
//   conv2d_backward_input_mma_<dout>_<w>
//                                      the input gradient, dx = (or +=) the transposed convolution of dout
//                                      (conv2d.cu's conv2d_backward_input_simt on the tensor cores):
//                                      the same tiles, warps and pipeline over M = dx positions,
//                                      N = Ci, K = taps x Co; dout f32 (the plans' gradients: staged
//                                      through registers, rounded once) or the weights' type
//                                      (cp.async), dx's type a run-time code (f32 or the weights');
//                                      Co a multiple of 4 (f32 dout) or 8, Ci a multiple of 8.
//   conv2d_backward_input_mma_wide_<dout>_<w>
//                                      the same (cp.async loaders) with the wide 128 x 128 blocks: THE
//                                      FAST ONE for grids that still give every SM a block (faster
//                                      than the narrow tile on an H200 with f32 dout; the launcher picks).
//   conv2d_backward_input_mma_gather_<dout>_<w>
//                                      the same with element-wise loads (conv_out's Co = 3).
//   conv2d_backward_input_mma_gather_w_<dout>_<w>
//                                      dout by the vector loader, the weights element-wise (conv_in's
//                                      Ci = 3 with its 128-channel dout: the dout tile is 97% of
//                                      what a k-step loads, and element by element it bounded the
//                                      launch).
//   conv2d_mma[_gather]_partial_<in>_<w>, conv2d_backward_input_mma[_gather[_w]]_partial_<dout>_<w>
//                                      split-K (version 3): the same blocks over slice z of the
//                                      k-tiles (grid z = the slices, slice z = tiles [zT/Z, (z+1)T/Z)),
//                                      raw f32 sums to a workspace partials[z][m][n]; for grids too
//                                      small to fill the GPU (batch 1: a 4x4 level is 4 blocks of 72
//                                      k-steps). Then
//   conv2d_split_reduce, conv2d_backward_input_split_reduce (in conv2d.cu, plain instructions)
//                                      add the slices in order z = 0, 1, ... (deterministic, no
//                                      atomics) and apply the whole epilogue (bias, channel bias,
//                                      residual, ReLU; dx = or +=), one rounding to the output type.
// Precision: inputs rounded once to bf16/f16 (the operand type), f32 accumulation, the epilogue in
// f32, one rounding to the output's type (f32 output for conv_out's eps). The input gradient rounds
// f32 dout to the weights' type once, as it is staged in shared memory; dx = or += in f32, one rounding.
// Split-K keeps the products and the f32 accumulation and changes only the order of the sums.
// Hot kernels (ptxas report, no spills allowed): conv2d_mma_bf16_bf16_bf16, conv2d_mma_f16_f16_f16,
// conv2d_backward_input_mma_f32_bf16, conv2d_backward_input_mma_f32_f16, their _partial and _wide
// forms (the wide ones hold 64 x 64 f32 accumulators a warp: 218-254 registers, two blocks an SM).
#include "common.cuh"
#include "conv_common.cuh"  // ConvParams and the index helpers, shared with conv2d.cu

// ---------------------------------------------------------------------------------------------
// Version 2: tensor cores (ldmatrix, mma.sync and cp.async: common.cuh).
// Two block tiles, the same 4 warps (2 x 2) and pipeline: NARROW, 128 positions x 64 channels
// (warps of 64 x 32), and WIDE, 128 x 128 (warps of 64 x 64), which per mma.sync needs a third
// fewer shared-memory wavefronts and about half the loader's instructions (the emulator's SmWork
// counts: examples/emulator_memory_traffic.rs) but half as many blocks and warps; the launcher takes
// it for grids that still give every SM a block, by default in the input gradient only
// (src/backend/cuda/conv.rs, tensor_core_version; src/switches.rs has the GPU's figures). K is
// summed in the same order by both, so they give the same bits.
namespace mma {
constexpr int BM = 128, BK = 32, STAGES = 3, THREADS = 128;
constexpr int WARP_M = 64;  // 2 warps along M
constexpr int M_TILES = WARP_M / 16;
}  // namespace mma

// The k-major tiles (the forward's A and B, the input gradient's A): rows of BK halves (64 bytes,
// four 16-byte chunks), chunk c of row r stored at chunk c ^ ((r / 2) % 4). Then the 8 rows one
// ldmatrix matrix reads (8 consecutive rows, one logical chunk) fall in 8 distinct 16-byte bank
// groups, and so do a quarter-warp's cp.async writes (two rows' four chunks): one shared-memory
// wavefront each. (Rows padded to 40 halves, as before, kept ldmatrix conflict-free but made every
// cp.async write phase take two: 3 wavefronts per mma in the narrow forward, 2.25 now; the
// emulator's SmWork counts them.) The offset in halves of (row, col):
__device__ __forceinline__ int swizzled(int row, int col) {
    return row * mma::BK + ((((col >> 3) ^ (row >> 1)) & 3) << 3) + (col & 7);
}
// Rows 8 apart share their swizzle: swizzled(row + 8 q, col) = swizzled(row, col) + 8 q BK. So each
// lane computes its offsets once, for its first row, and steps by whole rows (immediates) from
// there; computing swizzled() at every access cost ptxas 40 more registers in the input gradient.

template <int BN_>
struct MmaTile {
    static constexpr int BN = BN_;
    static constexpr int WARP_N = BN / 2;  // 2 warps along N
    static constexpr int N_TILES = WARP_N / 8;
    // The forward's dynamic shared memory: STAGES A tiles (BM x BK halves), then STAGES B tiles
    // (BN x BK); src/backend/cuda/conv.rs computes the same size.
    static constexpr int FORWARD_A_STAGE = mma::BM * mma::BK, FORWARD_B_STAGE = BN * mma::BK;
    // The input gradient's B rows (k-major): BN + 8 halves, so the 8 rows of one ldmatrix.trans
    // start in distinct bank groups ((BN + 8) / 2 words apart: 36 or 68) and stay 16-byte aligned.
    static constexpr int B_ROW = BN + 8;
    // Blocks an SM must fit by registers (__launch_bounds__' second argument), the most each
    // kernel takes without spilling: the narrow forward 4 (128 registers), the narrow input
    // gradient 3 (168; left free, ptxas took 210 for f32 dout: 2 blocks), the wide tile's 64 x 64
    // accumulators 2 (255). The split-K entries (small grids) get no minimum.
    static constexpr int FORWARD_MIN_BLOCKS = BN == 64 ? 4 : 2;
    static constexpr int BACKWARD_MIN_BLOCKS = BN == 64 ? 3 : 2;
};
using NarrowTile = MmaTile<64>;
using WideTile = MmaTile<128>;

// ---- shared by the forward and the input gradient (same tiles, warps and pipeline) ----
// The warp's A fragments of one k16 step: M m16k16 tiles by ldmatrix.x4 from a swizzled stage, from
// this lane's address in the first tile (`lane_at`: stage + swizzled(its row, its column)), the
// others 16 rows apart.
template <int M>
__device__ __forceinline__ void load_a_fragments(unsigned (&a_frag)[M][4], const unsigned short* lane_at) {
#pragma unroll
    for (int i = 0; i < M; ++i) ldmatrix_x4(a_frag[i], shared_address(lane_at + 16 * i * mma::BK));
}

// This lane's ldmatrix offsets for the two k16 steps of a k-tile, in a swizzled stage: row `row`,
// columns `col` and `col` + 16.
struct LaneOffsets {
    int step[2];
};

__device__ __forceinline__ LaneOffsets lane_offsets(int row, int col) {
    return LaneOffsets{{swizzled(row, col), swizzled(row, col + 16)}};
}

// The warp's M x N tiles of m16n8k16 products on one k16 step, accumulated in f32.
template <typename WT, int M, int N>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[M][N][4], const unsigned (&a_frag)[M][4],
                                              const unsigned (&b_frag)[N][2]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) mma_m16n8k16<WT>(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
}

// The pixels a vector loader's A rows read at one tap (-1: padding, skipped, or past M), kept while
// its cursor stays on that tap: the window arithmetic runs once a tap (every channels / BK
// k-tiles), not at every k-tile. (Forward: input pixels; input gradient: dout pixels.)
template <int ROWS>
struct TapPixels {
    int tap;
    int pixel[ROWS];
};

// One k-tile (BK wide) of A and B into a pipeline stage. VECTOR: inputs in the operand type with
// 8-channel groups that never straddle a tap or the a/b boundary (Ca, Cb multiples of 8): 16-byte
// cp.async, at this thread's cursor `at` (k0 + its chunk's 8 (tid % 4)), which it advances by BK,
// its rows' pixels in `px`. Otherwise element-wise loads, rounded to the operand type, stored to
// shared.
template <bool VECTOR, typename Tile, typename InT, typename WT>
__device__ __forceinline__ void conv_mma_load_tile(unsigned short* a_stage, unsigned short* b_stage, int k0,
                                                   KCursor& at, TapPixels<4>& px, const ConvRow (&rows)[4], int tid,
                                                   int m_local0, int n_block, const ConvParams& p, const InT* __restrict__ a,
                                                   const InT* __restrict__ b, const WT* __restrict__ w) {
    using namespace mma;
    const int ci_total = p.ca + p.cb;
    const int k_total = p.kh * p.kw * ci_total;
    const int logical_h = p.in_h << p.upsample_shift, logical_w = p.in_w << p.upsample_shift;
    if constexpr (VECTOR) {
        // A: 128 rows x 4 chunks of 8; thread: chunk tid % 4, rows tid / 4 + 32 i.
        const int chunk = tid % 4;
        const int k = at.k;
        const bool k_valid = k < k_total;
        const int ci = at.c;
        if (at.tap != px.tap) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const ConvRow& r = rows[i];
                const int iy = r.iy0 + at.ky, ix = r.ix0 + at.kx;
                const bool inside = r.valid && iy >= 0 && ix >= 0 && iy < logical_h && ix < logical_w;
                px.pixel[i] = inside ? (r.n * p.in_h + (iy >> p.upsample_shift)) * p.in_w + (ix >> p.upsample_shift) : -1;
            }
            px.tap = at.tap;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int pixel = px.pixel[i];
            const bool inside = k_valid && pixel >= 0;
            const void* src = a;
            if (inside)
                src = ci < p.ca ? (const void*)(a + pixel * p.ca + ci) : (const void*)(b + pixel * p.cb + (ci - p.ca));
            cp_async_16(shared_address(a_stage + swizzled(m_local0, chunk * 8) + 32 * i * BK), src, inside ? 16 : 0);
        }
        // B: BN rows (output channels) x 4 chunks; thread: chunk tid % 4, rows tid / 4 + 32 i.
#pragma unroll
        for (int i = 0; i < Tile::BN / 32; ++i) {
            const int co = n_block + tid / 4 + 32 * i;
            const bool inside = k_valid && co < p.out_channels;
            const void* src = inside ? (const void*)(w + co * p.weight_row + k) : (const void*)w;
            cp_async_16(shared_address(b_stage + swizzled(tid / 4, chunk * 8) + 32 * i * BK), src, inside ? 16 : 0);
        }
        advance_k(at, BK, ci_total, p.kw);
    } else {
        // Element-wise: thread handles k column tid % 32 for rows tid / 32 + 4 i.
        const int kc = tid % BK;
        const int k = k0 + kc;
        const bool k_valid = k < k_total;
        const int tap = k_valid ? k / ci_total : 0;
        const int ci = k_valid ? k - tap * ci_total : 0;
        const int ky = tap / p.kw, kx = tap - (tap / p.kw) * p.kw;
        for (int row = tid / BK; row < BM; row += THREADS / BK) {
            const ConvRow r = conv_row(blockIdx.x * BM + row, p);
            a_stage[swizzled(row, kc)] = from_float<WT>(conv_gather(r, ky, kx, ci, k_valid, p, a, b)).bits;
        }
        for (int row = tid / BK; row < Tile::BN; row += THREADS / BK) {
            const int co = n_block + row;
            const bool inside = k_valid && co < p.out_channels;
            b_stage[swizzled(row, kc)] = inside ? w[co * p.weight_row + k].bits : (unsigned short)0;
        }
    }
}

// PARTIAL (split-K): block z sums its slice of the k-tiles only (grid z = the slices) and stores
// its raw f32 sums to partials[z][m][co]; conv2d_split_reduce adds the slices and applies the
// epilogue. Otherwise the whole K and the epilogue here (bias, channel_bias, residual, out;
// partials unused).
template <bool VECTOR, bool PARTIAL, typename Tile, typename InT, typename WT, typename OutT>
__device__ __forceinline__ void conv2d_mma(const InT* __restrict__ a, const InT* __restrict__ b,
                                           const WT* __restrict__ w, const float* __restrict__ bias,
                                           const float* __restrict__ channel_bias,
                                           const OutT* __restrict__ residual, OutT* __restrict__ out,
                                           float* __restrict__ partials, const ConvParams p) {
    using namespace mma;
    constexpr int WARP_N = Tile::WARP_N, N_TILES = Tile::N_TILES;
    constexpr int A_STAGE = Tile::FORWARD_A_STAGE, B_STAGE = Tile::FORWARD_B_STAGE;
    extern __shared__ __align__(128) unsigned char conv_shared[];
    unsigned short* a_tiles = reinterpret_cast<unsigned short*>(conv_shared);
    unsigned short* b_tiles = a_tiles + STAGES * A_STAGE;

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
    const int m_block = blockIdx.x * BM, n_block = blockIdx.y * Tile::BN;
    const int k_total = p.kh * p.kw * (p.ca + p.cb);
    const KTiles tiles = block_k_tiles<PARTIAL>(k_total, BK, conv_phases(p));
    const int first_tile = tiles.first, k_tiles = tiles.count;
    w += conv_weight_phase_offset(k_total, p);

    // The vector loader's rows, fixed for the whole K loop, and its k cursor.
    const int m_local0 = tid / 4;
    ConvRow rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) rows[i] = conv_row(m_block + m_local0 + 32 * i, p);
    KCursor at = k_cursor(first_tile * BK + (tid % 4) * 8, p.ca + p.cb, p.kw);
    TapPixels<4> px;
    px.tap = -1;

    float acc[M_TILES][N_TILES][4] = {};

    // Prologue: the first STAGES - 1 tiles in flight.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles)
            conv_mma_load_tile<VECTOR, Tile>(a_tiles + s * A_STAGE, b_tiles + s * B_STAGE, (first_tile + s) * BK, at,
                                             px, rows, tid, m_local0, n_block, p, a, b, w);
        cp_async_commit();
    }

    // ldmatrix lane addresses within a stage: A m16k16 tile = 4 8x8 matrices (rows 0-7 / 8-15,
    // k 0-7 / 8-15) in the order of mma's a0..a3; B two n8 tiles x (k 0-7, k 8-15) = b0, b1 each.
    const LaneOffsets a_lane = lane_offsets(warp_m * WARP_M + (lane % 16), (lane / 16) * 8);
    const LaneOffsets b_lane = lane_offsets(warp_n * WARP_N + (lane / 16) * 8 + (lane % 8), ((lane / 8) % 2) * 8);

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for every thread; stage (kt - 1) % STAGES is free
        const int next = kt + STAGES - 1;
        if (next < k_tiles)
            conv_mma_load_tile<VECTOR, Tile>(a_tiles + (next % STAGES) * A_STAGE, b_tiles + (next % STAGES) * B_STAGE,
                                             (first_tile + next) * BK, at, px, rows, tid, m_local0, n_block, p, a, b,
                                             w);
        cp_async_commit();

        const unsigned short* a_stage = a_tiles + (kt % STAGES) * A_STAGE;
        const unsigned short* b_stage = b_tiles + (kt % STAGES) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a_frag[M_TILES][4];
            unsigned b_frag[N_TILES][2];
            load_a_fragments(a_frag, a_stage + a_lane.step[kk / 16]);
#pragma unroll
            for (int j = 0; j < N_TILES; j += 2) {
                unsigned r[4];
                ldmatrix_x4(r, shared_address(b_stage + b_lane.step[kk / 16] + 8 * j * BK));
                b_frag[j][0] = r[0];
                b_frag[j][1] = r[1];
                b_frag[j + 1][0] = r[2];
                b_frag[j + 1][1] = r[3];
            }
            warp_tile_mma<WT>(acc, a_frag, b_frag);
        }
    }
    cp_async_wait<0>();

    // Epilogue from the accumulator layout: d0, d1 at (row g, cols 2t, 2t+1), d2, d3 at row g + 8.
    // GEMM row m is output pixel conv_output_pixel(m) (itself but in the sub-pixel form).
    const int gemm_rows = conv_gemm_rows(p);
    const int plane = p.out_h * p.out_w;
    const long long slice = PARTIAL ? partial_slice((long long)p.batch * plane * p.out_channels, conv_phases(p)) : 0;
    const int g = lane / 4, t = lane % 4;
    const unsigned long long pair_bytes = PARTIAL ? 8 : 2 * sizeof(OutT);
    const bool pairs =
        p.out_channels % 2 == 0 && (unsigned long long)(PARTIAL ? (void*)partials : (void*)out) % pair_bytes == 0;
#pragma unroll
    for (int i = 0; i < M_TILES; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = m_block + warp_m * WARP_M + 16 * i + g + 8 * half;
            if (row >= gemm_rows) continue;
            const int m = conv_output_pixel(row, p);
            const int n = m / plane;
            // A narrow tile (small grids) loads its row's epilogue terms first, all in flight at
            // once; the wide one loads each where it adds it (conv_common.cuh says why). (A column
            // past Co loads column Co - 1's, never stored.)
            constexpr bool TERMS_FIRST = !PARTIAL && Tile::BN == 64;
            EpilogueTerms terms[N_TILES][2];
            if constexpr (TERMS_FIRST) {
#pragma unroll
                for (int j = 0; j < N_TILES; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int co = min(n_block + warp_n * WARP_N + 8 * j + 2 * t + e, p.out_channels - 1);
                        terms[j][e] = conv_epilogue_load(m, n, co, p, bias, channel_bias, residual);
                    }
            }
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                const int co = n_block + warp_n * WARP_N + 8 * j + 2 * t;
                if (co >= p.out_channels) continue;
                float v[2] = {acc[i][j][2 * half], acc[i][j][2 * half + 1]};
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (PARTIAL || co + e >= p.out_channels) continue;
                    v[e] = TERMS_FIRST ? conv_epilogue_sum(v[e], terms[j][e], p, bias, channel_bias, residual)
                                       : conv_epilogue_value(v[e], m, n, co + e, p, bias, channel_bias, residual);
                }
                const long long at = slice + (long long)m * p.out_channels + co;
                // Channels co and co + 1 in one access where both exist and the pair is aligned (Co
                // even, the tensor aligned to two elements): a row's four lanes store 16 (f32: 32)
                // contiguous bytes.
                if (co + 1 < p.out_channels && pairs) {
                    if constexpr (PARTIAL)
                        store_float2(partials, at, make_float2(v[0], v[1]));
                    else
                        store_float2(out, at, make_float2(v[0], v[1]));
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (co + e >= p.out_channels) continue;
                        if constexpr (PARTIAL)
                            partials[at + e] = v[e];
                        else
                            out[at + e] = from_float<OutT>(v[e]);
                    }
                }
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

// Tensor-core entries: `conv2d_mma_*` loads with 16-byte cp.async (inputs in the operand type, Ca
// and Cb multiples of 8: the launcher checks); `conv2d_mma_gather_*` element by element (any input
// type, any channel count).
#define CONV_MMA_ENTRY(prefix, VECTOR, Tile, in_name, InT, w_name, WT, out_name, OutT)                      \
    extern "C" __global__ void __launch_bounds__(mma::THREADS, Tile::FORWARD_MIN_BLOCKS)                    \
        prefix##_##in_name##_##w_name##_##out_name(CONV_PARAMS_DECL(InT, WT, OutT)) {                       \
        conv2d_mma<VECTOR, false, Tile, InT, WT, OutT>(a, b, w, bias, channel_bias, residual, out, nullptr, p); \
    }
// Split-K entries: `<prefix>_partial_<in>_<w>`, grid z = the slices; the partial sums are f32 whatever
// the output's type (conv2d_split_reduce rounds once).
#define CONV_MMA_PARTIAL_ENTRY(prefix, VECTOR, in_name, InT, w_name, WT)                                    \
    extern "C" __global__ void __launch_bounds__(mma::THREADS)                                              \
        prefix##_partial_##in_name##_##w_name(const InT* __restrict__ a, const InT* __restrict__ b,         \
                                              const WT* __restrict__ w, float* __restrict__ partials,       \
                                              const ConvParams p) {                                         \
        conv2d_mma<VECTOR, true, NarrowTile, InT, WT, float>(a, b, w, nullptr, nullptr, nullptr, nullptr, partials, \
                                                             p);                                            \
    }

// One block per 16-bit type (a backend compiles its own only: KERNELS_BF16/KERNELS_F16 in common.cuh).
// The wide tile is for the cp.async loaders only (the big grids; gather and split-K launches are small).
#if KERNELS_BF16
CONV_MMA_ENTRY(conv2d_mma, true, NarrowTile, bf16, bf16, bf16, bf16, bf16, bf16)
CONV_MMA_ENTRY(conv2d_mma, true, NarrowTile, bf16, bf16, bf16, bf16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, bf16, bf16, bf16, bf16, bf16, bf16)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, bf16, bf16, bf16, bf16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f32, float, bf16, bf16, bf16, bf16)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f32, float, bf16, bf16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_wide, true, WideTile, bf16, bf16, bf16, bf16, bf16, bf16)
CONV_MMA_ENTRY(conv2d_mma_wide, true, WideTile, bf16, bf16, bf16, bf16, f32, float)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma, true, bf16, bf16, bf16, bf16)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma_gather, false, bf16, bf16, bf16, bf16)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma_gather, false, f32, float, bf16, bf16)
#endif
#if KERNELS_F16
CONV_MMA_ENTRY(conv2d_mma, true, NarrowTile, f16, f16, f16, f16, f16, f16)
CONV_MMA_ENTRY(conv2d_mma, true, NarrowTile, f16, f16, f16, f16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f16, f16, f16, f16, f16, f16)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f16, f16, f16, f16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f32, float, f16, f16, f16, f16)
CONV_MMA_ENTRY(conv2d_mma_gather, false, NarrowTile, f32, float, f16, f16, f32, float)
CONV_MMA_ENTRY(conv2d_mma_wide, true, WideTile, f16, f16, f16, f16, f16, f16)
CONV_MMA_ENTRY(conv2d_mma_wide, true, WideTile, f16, f16, f16, f16, f32, float)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma, true, f16, f16, f16, f16)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma_gather, false, f16, f16, f16, f16)
CONV_MMA_PARTIAL_ENTRY(conv2d_mma_gather, false, f32, float, f16, f16)
#endif

// ---------------------------------------------------------------------------------------------
// The input gradient on the tensor cores: dx = (or +=) the transposed convolution of dout, the implicit
// GEMM of conv2d.cu's conv2d_backward_input_simt (read its comment) with mma.sync:
//   M = N*H*W dx positions, N = Ci, K = kh*kw*Co with k = tap*Co + co,
//   A[m, k] = dout[n, oy, ox, co] where (y + pad_top - ky) / s = oy exactly (and the same in x),
//             zero elsewhere;
//   B[k, ci] = w[co, ky, kx, ci]: the stored weights read as a K x Ci row-major matrix (ci
//             contiguous per (co, tap): the transposed filter), whose "col" fragments ldmatrix.trans
//             gives straight from those rows.
// A is staged in shared memory in the weights' 16-bit type, so its fragments come by ldmatrix as in
// the forward: 16-bit dout by 16-byte cp.async; f32 dout (what the plans hold) through registers:
// the next tile's 16-byte loads are issued before this tile's mma work and rounded (cvt.rn, once)
// and stored to shared after it, so their latency hides behind the tensor cores. (Staging f32 in
// shared and converting at each fragment, as this kernel first did, cost 4 loads and 4 conversions
// per fragment and 75 KB of shared memory; the H200 ran it at 45 TFLOP/s against the forward's 106.)
// B by cp.async. Tiles (narrow and wide), warps and the 3-stage pipeline are the forward's; shared
// memory is dynamic: STAGES A tiles (BM x BK halves, swizzled), then STAGES B tiles (BK x Tile::B_ROW
// halves); src/backend/cuda/conv.rs computes the same size.

// One dx row of the A tile: the offset of its sample in dout (n * out_h * out_w; -1 past M) and its
// padded coordinates packed as (y << 16) | x.
struct DxRow {
    int sample_base, yx;
};

__device__ __forceinline__ DxRow dx_row(int m, const ConvParams& p) {
    const int plane = p.in_h * p.in_w;
    if (m >= p.batch * plane) return DxRow{-1, 0};
    const int n = m / plane;
    const int rest = m - n * plane;
    const int iy = rest / p.in_w, ix = rest - (rest / p.in_w) * p.in_w;
    return DxRow{n * p.out_h * p.out_w, ((iy + p.pad_top) << 16) | (ix + p.pad_left)};
}

// The dout pixel row r of A reads through the tap at cursor `at`, or -1 where the tap skips the row
// (or the row is past M).
__device__ __forceinline__ int transposed_pixel(const DxRow& r, const KCursor& at, const ConvParams& p) {
    if (r.sample_base < 0) return -1;
    const int source = transposed_tap_source(r.yx >> 16, r.yx & 0xffff, at.ky, at.kx, p);
    return source < 0 ? -1 : r.sample_base + source;
}

// Where row r of A reads the k at cursor `at` (a tap and an output channel): the element offset in
// dout, or -1 where the tap skips the row or k is past K.
// From the row's pixel at the cursor's tap (TapPixels keeps it) ...
__device__ __forceinline__ int tap_pixel_source(int pixel, const KCursor& at, const ConvParams& p) {
    return at.k < p.kh * p.kw * p.out_channels && pixel >= 0 ? pixel * p.out_channels + at.c : -1;
}

// ... or from the row itself (the element-wise loader).
__device__ __forceinline__ int transposed_source(const DxRow& r, const KCursor& at, const ConvParams& p) {
    return tap_pixel_source(transposed_pixel(r, at, p), at, p);
}

// Brings a vector loader's row pixels to its cursor's tap (once a tap).
template <int ROWS>
__device__ __forceinline__ void refresh_tap_pixels(TapPixels<ROWS>& px, const DxRow* rows, const KCursor& at,
                                                   const ConvParams& p) {
    if (at.tap == px.tap) return;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) px.pixel[i] = transposed_pixel(rows[i], at, p);
    px.tap = at.tap;
}

// The vector loaders' A layout: 16-byte chunks of dout (4 f32 or 8 halves), CHUNKS_PER_ROW across a
// row of BK, the block's threads over ROWS rows each, ROW_STEP apart.
template <typename DoutT>
struct AChunks {
    static constexpr int CHUNK = 16 / (int)sizeof(DoutT);
    static constexpr int CHUNKS_PER_ROW = mma::BK / CHUNK;
    static constexpr int ROW_STEP = mma::THREADS / CHUNKS_PER_ROW;
    static constexpr int ROWS = mma::BM / ROW_STEP;
};

// The vector B loader's layout: a k-tile's 32 rows of BN input channels in CHUNKS chunks of 8; a
// thread loads chunk tid % CHUNKS of ROWS rows, tid / CHUNKS + ROW_STEP i.
template <typename Tile>
struct BRows {
    static constexpr int CHUNKS = Tile::BN / 8, ROW_STEP = mma::THREADS / CHUNKS, ROWS = mma::BK / ROW_STEP;
};

// B, one k-tile (BK rows of K x Ci) into a pipeline stage. VECTOR: Ci a multiple of 8, 16-byte
// aligned weights: cp.async, 8 input channels at a time, each row at its cursor (`at`: k0 + the
// row), advanced by BK. Otherwise element-wise.

template <bool VECTOR, typename Tile, typename WT>
__device__ __forceinline__ void conv_backward_load_b(unsigned short* b_stage, int k0, KCursor (&at)[BRows<Tile>::ROWS],
                                                     int tid, int n_block, const ConvParams& p,
                                                     const WT* __restrict__ w) {
    using namespace mma;
    constexpr int BN = Tile::BN, B_ROW = Tile::B_ROW;
    const int taps = p.kh * p.kw;
    const int k_total = taps * p.out_channels;
    const int ci_total = p.ca;
    if constexpr (VECTOR) {
        using R = BRows<Tile>;
        const int chunk = tid % R::CHUNKS;
        const int ci = n_block + chunk * 8;
#pragma unroll
        for (int i = 0; i < R::ROWS; ++i) {
            const int row = tid / R::CHUNKS + R::ROW_STEP * i;
            const bool inside = at[i].k < k_total && ci < ci_total;
            const WT* src = inside ? w + (at[i].c * taps + at[i].tap) * ci_total + ci : w;
            cp_async_16(shared_address(b_stage + row * B_ROW + chunk * 8), src, inside ? 16 : 0);
            advance_k(at[i], BK, p.out_channels, p.kw);
        }
    } else {
        // Input channel tid % BN, k rows tid / BN + THREADS / BN i.
        const int cc = tid % BN;
        const int ci = n_block + cc;
        for (int row = tid / BN; row < BK; row += THREADS / BN) {
            const int kb = k0 + row;
            const bool inside = kb < k_total && ci < ci_total;
            const int tap_b = inside ? kb / p.out_channels : 0;
            const int co_b = inside ? kb - tap_b * p.out_channels : 0;
            b_stage[row * B_ROW + cc] = inside ? w[(co_b * taps + tap_b) * ci_total + ci].bits : (unsigned short)0;
        }
    }
}

// A, one k-tile straight into a stage: 16-bit dout by cp.async (VECTOR: Co a multiple of 8, 16-byte
// aligned), or element by element, rounded to WT (the gather entries: conv_in's Ci = 3, conv_out's
// Co = 3, any dout type).
template <bool VECTOR, typename DoutT, typename WT, int ROWS>
__device__ __forceinline__ void conv_backward_load_a(unsigned short* a_stage, int k0, const KCursor& at,
                                                     const TapPixels<ROWS>& px, int tid, int m_block,
                                                     const ConvParams& p, const DoutT* __restrict__ dout) {
    using namespace mma;
    if constexpr (VECTOR) {
        // At this thread's cursor (k0 + its chunk's CHUNK k), its rows' pixels at that tap in px.
        using L = AChunks<DoutT>;
        const int chunk = tid % L::CHUNKS_PER_ROW;
#pragma unroll
        for (int i = 0; i < L::ROWS; ++i) {
            const int source = tap_pixel_source(px.pixel[i], at, p);
            const int dst = swizzled(tid / L::CHUNKS_PER_ROW, chunk * L::CHUNK) + L::ROW_STEP * i * BK;
            cp_async_16(shared_address(a_stage + dst), source >= 0 ? dout + source : dout, source >= 0 ? 16 : 0);
        }
    } else {
        // k column tid % 32, rows tid / 32 + 4 i.
        const int kc = tid % BK;
        const KCursor cursor = k_cursor(k0 + kc, p.out_channels, p.kw);
        for (int row = tid / BK; row < BM; row += THREADS / BK) {
            const int source = transposed_source(dx_row(m_block + row, p), cursor, p);
            const float v = source >= 0 ? to_float(dout[source]) : 0.0f;
            a_stage[swizzled(row, kc)] = from_float<WT>(v).bits;
        }
    }
}

// A from f32 dout through registers: the loads of one k-tile (zeros where the tap skips a row)...
__device__ __forceinline__ void conv_backward_fetch_a(float4 (&regs)[AChunks<float>::ROWS], const KCursor& at,
                                                      const TapPixels<AChunks<float>::ROWS>& px, const ConvParams& p,
                                                      const float* __restrict__ dout) {
    using L = AChunks<float>;
#pragma unroll
    for (int i = 0; i < L::ROWS; ++i) {
        const int source = tap_pixel_source(px.pixel[i], at, p);
        regs[i] = source >= 0 ? *reinterpret_cast<const float4*>(dout + source) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// ...and, once the tensor cores have the current tile, rounded to WT and stored to their stage.
template <typename WT>
__device__ __forceinline__ void conv_backward_store_a(unsigned short* a_stage,
                                                      const float4 (&regs)[AChunks<float>::ROWS], int tid) {
    using L = AChunks<float>;
    const int chunk = tid % L::CHUNKS_PER_ROW;
#pragma unroll
    for (int i = 0; i < L::ROWS; ++i) {
        const int dst = swizzled(tid / L::CHUNKS_PER_ROW, chunk * L::CHUNK) + L::ROW_STEP * i * mma::BK;
        const uint2 packed = make_uint2(pack_x2<WT>(regs[i].x, regs[i].y), pack_x2<WT>(regs[i].z, regs[i].w));
        *reinterpret_cast<uint2*>(a_stage + dst) = packed;
    }
}

// PARTIAL (split-K): as the forward's, block z sums its slice of the k-tiles and stores raw f32
// sums to partials[z][m][ci]; conv2d_backward_input_split_reduce adds the slices and stores dx.
// VECTOR_A / VECTOR_B: dout / the weights by the cp.async loaders (else element by element).
template <bool VECTOR_A, bool VECTOR_B, bool PARTIAL, typename Tile, typename DoutT, typename WT>
__device__ __forceinline__ void conv2d_backward_input_mma(const DoutT* __restrict__ dout, const WT* __restrict__ w,
                                                          void* __restrict__ dx, int dx_dtype,
                                                          float* __restrict__ partials, const ConvParams p,
                                                          int accumulate) {
    using namespace mma;
    constexpr int BN = Tile::BN, WARP_N = Tile::WARP_N, N_TILES = Tile::N_TILES, B_ROW = Tile::B_ROW;
    constexpr int A_STAGE = BM * BK, B_STAGE = BK * B_ROW;
    // f32 dout with the vector loader goes through registers (the head comment says why).
    constexpr bool THROUGH_REGISTERS = VECTOR_A && sizeof(DoutT) == 4;
    extern __shared__ __align__(128) unsigned char backward_shared[];
    unsigned short* a_tiles = reinterpret_cast<unsigned short*>(backward_shared);
    unsigned short* b_tiles = a_tiles + STAGES * A_STAGE;

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
    const int m_block = blockIdx.x * BM, n_block = blockIdx.y * BN;
    const int k_total = p.kh * p.kw * p.out_channels;
    const KTiles tiles = block_k_tiles<PARTIAL>(k_total, BK, 1);
    const int first_tile = tiles.first, k_tiles = tiles.count;

    // The vector loaders' A rows, fixed for the whole K loop.
    using L = AChunks<DoutT>;
    constexpr int ROWS = VECTOR_A ? L::ROWS : 1;
    DxRow rows[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) rows[i] = dx_row(m_block + tid / L::CHUNKS_PER_ROW + L::ROW_STEP * i, p);
    float4 staged[AChunks<float>::ROWS];
    // The vector loaders' k cursors (A: this thread's chunk; B: each of its rows), moved BK a tile.
    const int k_start = first_tile * BK;
    KCursor a_at = k_cursor(k_start + (tid % L::CHUNKS_PER_ROW) * L::CHUNK, p.out_channels, p.kw);
    TapPixels<ROWS> a_px;
    a_px.tap = -1;
    using R = BRows<Tile>;
    KCursor b_at[R::ROWS];
#pragma unroll
    for (int i = 0; i < R::ROWS; ++i) b_at[i] = k_cursor(k_start + tid / R::CHUNKS + R::ROW_STEP * i, p.out_channels, p.kw);

    // A and B of tile `kt` into stage `kt % STAGES`, except (THROUGH_REGISTERS) A's store. Tiles
    // are issued in order, kt = 0, 1, ...: the cursors move one tile a call.
    auto issue = [&](int kt) {
        const int stage = kt % STAGES;
        const int k0 = (first_tile + kt) * BK;
        conv_backward_load_b<VECTOR_B, Tile, WT>(b_tiles + stage * B_STAGE, k0, b_at, tid, n_block, p, w);
        if constexpr (VECTOR_A) refresh_tap_pixels(a_px, rows, a_at, p);
        if constexpr (THROUGH_REGISTERS)
            conv_backward_fetch_a(staged, a_at, a_px, p, reinterpret_cast<const float*>(dout));
        else
            conv_backward_load_a<VECTOR_A, DoutT, WT>(a_tiles + stage * A_STAGE, k0, a_at, a_px, tid, m_block, p, dout);
        if constexpr (VECTOR_A) advance_k(a_at, BK, p.out_channels, p.kw);
    };

    float acc[M_TILES][N_TILES][4] = {};

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) {
            issue(s);
            if constexpr (THROUGH_REGISTERS) conv_backward_store_a<WT>(a_tiles + s * A_STAGE, staged, tid);
        }
        cp_async_commit();
    }

    // ldmatrix lane addresses: A as the forward; B by ldmatrix.trans, matrices (k 0-7, n j),
    // (k 8-15, n j), (k 0-7, n j+1), (k 8-15, n j+1) = b0, b1 of n-tile j, b0, b1 of n-tile j + 1.
    const LaneOffsets a_lane = lane_offsets(warp_m * WARP_M + (lane % 16), (lane / 16) * 8);
    const int b_k = ((lane / 8) % 2) * 8 + (lane % 8), b_n = warp_n * WARP_N + (lane / 16) * 8;

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for every thread; stage (kt - 1) % STAGES is free
        const int next = kt + STAGES - 1;
        if (next < k_tiles) issue(next);
        cp_async_commit();

        const unsigned short* a_stage = a_tiles + (kt % STAGES) * A_STAGE;
        const unsigned short* b_stage = b_tiles + (kt % STAGES) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a_frag[M_TILES][4];
            unsigned b_frag[N_TILES][2];
            load_a_fragments(a_frag, a_stage + a_lane.step[kk / 16]);
#pragma unroll
            for (int j = 0; j < N_TILES; j += 2) {
                unsigned r[4];
                ldmatrix_x4_trans(r, shared_address(b_stage + (kk + b_k) * B_ROW + b_n + 8 * j));
                b_frag[j][0] = r[0];
                b_frag[j][1] = r[1];
                b_frag[j + 1][0] = r[2];
                b_frag[j + 1][1] = r[3];
            }
            warp_tile_mma<WT>(acc, a_frag, b_frag);
        }
        // Stage `next` was free since the barrier above; the barriers before tile `next` is read
        // make this store visible.
        if constexpr (THROUGH_REGISTERS)
            if (next < k_tiles) conv_backward_store_a<WT>(a_tiles + (next % STAGES) * A_STAGE, staged, tid);
    }
    cp_async_wait<0>();

    // Epilogue: dx = acc (or += where `accumulate`), each element owned by one thread (no atomics);
    // dx's storage type is a run-time code (f32 in the plans, the activations' type where a caller
    // keeps it so).
    const int positions = p.batch * p.in_h * p.in_w;
    const int g = lane / 4, t = lane % 4;
    const unsigned long long pair_bytes = PARTIAL ? 8 : (dx_dtype == DTYPE_F32 ? 8 : 4);
    const bool pairs = p.ca % 2 == 0 && (unsigned long long)(PARTIAL ? (void*)partials : dx) % pair_bytes == 0;
#pragma unroll
    for (int i = 0; i < M_TILES; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m_block + warp_m * WARP_M + 16 * i + g + 8 * half;
            if (m >= positions) continue;
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                const int ci = n_block + warp_n * WARP_N + 8 * j + 2 * t;
                if (ci >= p.ca) continue;
                const float v[2] = {acc[i][j][2 * half], acc[i][j][2 * half + 1]};
                const long long at = (long long)m * p.ca + ci;
                // ci and ci + 1 in one access where both exist and the pair is aligned (as the forward).
                if (ci + 1 < p.ca && pairs) {
                    if constexpr (PARTIAL)
                        store_float2(partials, (long long)blockIdx.z * positions * p.ca + at, make_float2(v[0], v[1]));
                    else
                        store_grad_n<2>(dx, dx_dtype, at, v, accumulate);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (ci + e >= p.ca) continue;
                        if constexpr (PARTIAL)
                            partials[(long long)blockIdx.z * positions * p.ca + at + e] = v[e];
                        else
                            store_grad(dx, dx_dtype, at + e, v[e], accumulate);
                    }
                }
            }
        }
    }
}

// Entries: conv2d_backward_input_mma_<dout>_<w> (cp.async loaders),
// conv2d_backward_input_mma_gather_<dout>_<w> (element-wise) and
// conv2d_backward_input_mma_gather_w_<dout>_<w> (weights element-wise); dx's type is the
// `dx_dtype` code.
#define CONV_BACKWARD_MMA_ENTRY(prefix, VECTOR_A, VECTOR_B, Tile, dout_name, DoutT, w_name, WT)             \
    extern "C" __global__ void __launch_bounds__(mma::THREADS, Tile::BACKWARD_MIN_BLOCKS)                   \
        prefix##_##dout_name##_##w_name(const DoutT* __restrict__ dout, const WT* __restrict__ w,           \
                                        void* __restrict__ dx, int dx_dtype, const ConvParams p,            \
                                        int accumulate) {                                                   \
        conv2d_backward_input_mma<VECTOR_A, VECTOR_B, false, Tile, DoutT, WT>(dout, w, dx, dx_dtype, nullptr, \
                                                                            p, accumulate);                 \
    }
// Split-K entries: `<prefix>_partial_<dout>_<w>`, grid z = the slices.
#define CONV_BACKWARD_MMA_PARTIAL_ENTRY(prefix, VECTOR_A, VECTOR_B, dout_name, DoutT, w_name, WT)           \
    extern "C" __global__ void __launch_bounds__(mma::THREADS)                                              \
        prefix##_partial_##dout_name##_##w_name(const DoutT* __restrict__ dout, const WT* __restrict__ w,   \
                                                float* __restrict__ partials, const ConvParams p) {         \
        conv2d_backward_input_mma<VECTOR_A, VECTOR_B, true, NarrowTile, DoutT, WT>(dout, w, nullptr, 0,     \
                                                                                 partials, p, 0);           \
    }

#if KERNELS_BF16
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma, true, true, NarrowTile, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma, true, true, NarrowTile, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather, false, false, NarrowTile, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather, false, false, NarrowTile, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather_w, true, false, NarrowTile, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather_w, true, false, NarrowTile, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_wide, true, true, WideTile, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_wide, true, true, WideTile, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma, true, true, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma, true, true, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather, false, false, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather, false, false, bf16, bf16, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather_w, true, false, f32, float, bf16, bf16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather_w, true, false, bf16, bf16, bf16, bf16)
#endif
#if KERNELS_F16
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma, true, true, NarrowTile, f32, float, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma, true, true, NarrowTile, f16, f16, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather, false, false, NarrowTile, f32, float, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather, false, false, NarrowTile, f16, f16, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather_w, true, false, NarrowTile, f32, float, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_gather_w, true, false, NarrowTile, f16, f16, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_wide, true, true, WideTile, f32, float, f16, f16)
CONV_BACKWARD_MMA_ENTRY(conv2d_backward_input_mma_wide, true, true, WideTile, f16, f16, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma, true, true, f32, float, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma, true, true, f16, f16, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather, false, false, f32, float, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather, false, false, f16, f16, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather_w, true, false, f32, float, f16, f16)
CONV_BACKWARD_MMA_PARTIAL_ENTRY(conv2d_backward_input_mma_gather_w, true, false, f16, f16, f16, f16)
#endif
