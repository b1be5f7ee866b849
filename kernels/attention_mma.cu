// attention_mma.cu: the attention of attention.cu (same semantics and layout: read its head
// comment) on the tensor cores, for bf16 and f16 storage. THE FAST ONE for 16-bit activations.
// A module of its own so that attention.cu loads where mma/ldmatrix do not (the PTX emulator today).
//
// Kernels: attention_forward_mma_<T>_d<D>, T in {bf16, f16}, D in {64, 128, 256} (the padded head
// dim: C <= D, C a multiple of 8; columns past C are zeros in shared memory).
// FlashAttention-2 style: a block of 4 warps owns 64 queries, each warp 16, as mma A fragments
// loaded once into registers; keys and values stream through shared memory 32 at a time, each
// tile's K and V in buffers of their own, so the next tile's keys load (cp.async) while this
// tile's softmax and P V run, and its values while the next scores run. S = Q K^T with
// mma.sync.m16n8k16 (f32 accumulation, K's B fragments by ldmatrix); online softmax in f32 on the
// accumulator registers (each thread holds 2 rows x 8 keys; row max and sum over the 4 threads of
// a quad), in log2 units so that each probability is one ex2; P is rounded to T and reused in
// registers as the A operand of O += P V, with V's B fragments from ldmatrix.trans. The per-query
// log-sum-exp is written in f32 (natural log). Grids too small to fill the GPU (batch 1: 16x16
// positions are 4 blocks) split the keys over grid z instead: each part's normalised rows and
// log-sum-exp go in f32 to a workspace, and attention_split_combine (attention.cu) merges them (the latency
// model of examples/emulator_launch_depth.rs, cifar10 at batch 1 on 132 SMs: its 6 attentions
// 42.7 -> 19.2 us, the combines included).
// Precision: products of T values exact in f32, f32 accumulation and softmax; P rounded to T once.
// Shared memory (dynamic): 64 query rows and 2 x 32 key/value rows of D + 8 halves (the pad keeps
// the 8 rows one ldmatrix reads in distinct banks): 66 KiB at D = 256, 34 at 128, 18 at 64.
// The backward (attention_backward_row_terms_<T>, then attention_backward_mma_<T>_d<D>: the dq and
// the dk/dv kernels in one launch) is at the end of the file, with its own comment.
// Hot kernels (no spills allowed): attention_forward_mma_<T>_d128 and _d256, and the bf16 backward
// at d128 and d256 (src/backend/cuda/attention.rs lists them).
#include "common.cuh"

namespace attention_mma {
constexpr int KEYS = 32;  // keys per tile
constexpr int WARPS = 4;  // warps per block, 16 queries each
}

// ROWS x D tile of an N x L x C tensor of T, rows `row_stride` elements apart (C, or 3C for the
// thirds of a q/k/v tensor), into shared (row stride D + 8) by cp.async, zeros past L and past C
// (C and the row stride multiples of 8, the tensor 16-byte aligned: the launcher checks), by a
// block of THREADS threads; `sample` is the sample's first element. Each thread keeps one 16-byte
// column and steps down the rows, its source moved a fixed stride at a time: no division, one
// 64-bit multiply a call.
template <int D, int THREADS, int ROWS, typename T>
__device__ __forceinline__ void attention_copy_rows(unsigned short* tile, const T* __restrict__ src, long long sample,
                                                    int row0, int positions, int channels, int row_stride) {
    constexpr int CHUNKS = D / 8, ROW_STEP = THREADS / CHUNKS;
    static_assert(THREADS % CHUNKS == 0, "a thread's column stays the same down the rows");
    const int c = (threadIdx.x % CHUNKS) * 8, first = threadIdx.x / CHUNKS;
    const bool column_inside = c < channels;
    const T* from = src + sample + (long long)(row0 + first) * row_stride + c;
    const long long stride = (long long)ROW_STEP * row_stride;
#pragma unroll
    for (int row = first; row < ROWS; row += ROW_STEP, from += stride) {
        const bool inside = column_inside && row0 + row < positions;
        cp_async_16(shared_address(tile + row * (D + 8) + c), inside ? from : src, inside ? 16 : 0);
    }
}

// Split over the keys (gridDim.z > 1, for grids too small to fill the GPU: batch 1 at 16x16 is 4
// blocks): block z takes key tiles [z T / Z, (z + 1) T / Z) of the T and stores its own normalised
// rows and log-sum-exp in f32 to partial_out[z][n][query][c] and partial_lse[z][n][query];
// attention_split_combine then merges the Z parts. Each part has a key below `positions` (the
// launcher keeps Z <= T), so its rows have a finite max.
template <typename T, int D>
__device__ __forceinline__ void attention_forward_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, T* __restrict__ out,
                                                      float* __restrict__ logsumexp, int positions, int channels,
                                                      int qkv_stride, float scale, float* __restrict__ partial_out,
                                                      float* __restrict__ partial_lse) {
    using namespace attention_mma;
    constexpr int ROW = D + 8, QUERIES = 16 * WARPS, THREADS = 32 * WARPS;
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
    extern __shared__ __align__(16) unsigned short attention_shared[];
    unsigned short* q_tile = attention_shared;        // QUERIES x ROW
    unsigned short* k_tile = q_tile + QUERIES * ROW;  // KEYS x ROW
    unsigned short* v_tile = k_tile + KEYS * ROW;     // KEYS x ROW

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int n = blockIdx.y;
    const int query0 = blockIdx.x * QUERIES;
    const long long sample = (long long)n * positions * channels;      // out's
    const long long qkv_sample = (long long)n * positions * qkv_stride;  // q's, k's, v's
    const int all_tiles = (positions + KEYS - 1) / KEYS;
    const int first_tile = (int)(blockIdx.z * all_tiles / gridDim.z);
    const int tiles = (int)((blockIdx.z + 1) * all_tiles / gridDim.z);  // one past this block's last
    const float scale_log2 = scale * LOG2E;  // scores in log2 units: exp(x) = exp2(x log2 e)

    // Two groups in flight from here on: {queries, keys 0}, then {values 0}; each tile then
    // commits its successor's keys, then its values (empty groups past the end keep the count).
    attention_copy_rows<D, THREADS, QUERIES>(q_tile, q, qkv_sample, query0, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, KEYS>(k_tile, k, qkv_sample, first_tile * KEYS, positions, channels, qkv_stride);
    cp_async_commit();
    attention_copy_rows<D, THREADS, KEYS>(v_tile, v, qkv_sample, first_tile * KEYS, positions, channels, qkv_stride);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // queries and the first keys are in shared for every warp

    // This warp's 16 queries as A fragments, for every k-step of the scores.
    unsigned qa[D / 16][4];
    const int q_row = warp * 16 + (lane % 16), q_col = (lane / 16) * 8;
#pragma unroll
    for (int kc = 0; kc < D; kc += 16) ldmatrix_x4(qa[kc / 16], shared_address(q_tile + q_row * ROW + kc + q_col));

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
    // Rows g and g + 8 of this warp's 16 queries: running max (log2 units), and this thread's part
    // of the sum.
    float row_max[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};
    float row_sum[2] = {0.0f, 0.0f};

    const int k_row = (lane / 16) * 8 + (lane % 8), k_col = ((lane / 8) % 2) * 8;
    const int v_row = (lane % 8) + ((lane / 8) % 2) * 8, v_col = (lane / 16) * 8;

    for (int tile = first_tile; tile < tiles; ++tile) {
        const int key0 = tile * KEYS;
        if (tile > first_tile) {
            cp_async_wait<1>();  // this tile's keys (its values may still be in flight)
            __syncthreads();
        }
        // S (16 queries x 32 keys): four n8 tiles of keys.
        float s[KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < KEYS / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D; kc += 16)
#pragma unroll
            for (int n0 = 0; n0 < KEYS; n0 += 16) {
                unsigned b[4];
                ldmatrix_x4(b, shared_address(k_tile + (n0 + k_row) * ROW + kc + k_col));
                mma_m16n8k16<T>(s[n0 / 8], qa[kc / 16], b[0], b[1]);
                mma_m16n8k16<T>(s[n0 / 8 + 1], qa[kc / 16], b[2], b[3]);
            }
        __syncthreads();  // every warp is done with these keys: the next ones may land
        if (tile + 1 < tiles)
            attention_copy_rows<D, THREADS, KEYS>(k_tile, k, qkv_sample, key0 + KEYS, positions, channels, qkv_stride);
        cp_async_commit();

        // Online softmax; element e of tile j is key key0 + 8 j + 2 t + (e % 2), row g + 8 (e / 2).
        float tile_max[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};
#pragma unroll
        for (int j = 0; j < KEYS / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool valid = key0 + 8 * j + 2 * t + (e % 2) < positions;
                s[j][e] = valid ? s[j][e] * scale_log2 : -__int_as_float(0x7f800000);
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
            }
        float correction[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: the tile has a valid key
            correction[r] = exp2f(row_max[r] - new_max);          // 0 on the first tile
            row_max[r] = new_max;
            row_sum[r] *= correction[r];
        }
#pragma unroll
        for (int j = 0; j < KEYS / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = exp2f(s[j][e] - row_max[e / 2]);  // 0 for masked keys
                row_sum[e / 2] += s[j][e];
            }
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[j][e] *= correction[e / 2];

        cp_async_wait<1>();  // this tile's values (the next keys may still be in flight)
        __syncthreads();
        // O += P V, 16 keys a k-step: the accumulator layout of key tiles 2 kk and 2 kk + 1 is the
        // m16k16 A fragment layout.
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; ++kk) {
            const unsigned p[4] = {pack_x2<T>(s[2 * kk][0], s[2 * kk][1]), pack_x2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack_x2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_x2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int c0 = 0; c0 < D; c0 += 16) {
                unsigned b[4];
                ldmatrix_x4_trans(b, shared_address(v_tile + (16 * kk + v_row) * ROW + c0 + v_col));
                mma_m16n8k16<T>(o[c0 / 8], p, b[0], b[1]);
                mma_m16n8k16<T>(o[c0 / 8 + 1], p, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with these values
        if (tile + 1 < tiles)
            attention_copy_rows<D, THREADS, KEYS>(v_tile, v, qkv_sample, key0 + KEYS, positions, channels, qkv_stride);
        cp_async_commit();
    }

    // Totals over the quad, then out = O / sum and lse = (max + log2(sum)) ln 2 (a split's part:
    // in f32, to its slice of the partials).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int query = query0 + warp * 16 + g + 8 * r;
        if (query >= positions) continue;
        const float inv_sum = 1.0f / row_sum[r];
        const long long row = sample + (long long)query * channels;
        const long long part = (long long)blockIdx.z * gridDim.y * positions * channels;  // split only
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int c = 8 * j + 2 * t;
            if (c >= channels) continue;
            const float2 value = make_float2(o[j][2 * r] * inv_sum, o[j][2 * r + 1] * inv_sum);
            if (gridDim.z > 1)
                store_float2(partial_out, part + row + c, value);
            else
                store_float2(out, row + c, value);
        }
        const float lse = (row_max[r] + log2f(row_sum[r])) * LN2;
        const long long at = (long long)n * positions + query;
        if (t == 0 && gridDim.z > 1)
            partial_lse[(long long)blockIdx.z * gridDim.y * positions + at] = lse;
        else if (t == 0)
            logsumexp[at] = lse;
    }
}

#define ATTENTION_MMA_ENTRY(name, T, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * attention_mma::WARPS)                                  \
        attention_forward_mma_##name##_d##D(const T* __restrict__ q, const T* __restrict__ k,               \
                                            const T* __restrict__ v, T* __restrict__ out,                   \
                                            float* __restrict__ logsumexp, int positions, int channels,     \
                                            int qkv_stride, float scale, float* __restrict__ partial_out,   \
                                            float* __restrict__ partial_lse) {                              \
        attention_forward_mma<T, D>(q, k, v, out, logsumexp, positions, channels, qkv_stride, scale,        \
                                    partial_out, partial_lse);                                              \
    }

#if KERNELS_BF16
ATTENTION_MMA_ENTRY(bf16, bf16, 64)
ATTENTION_MMA_ENTRY(bf16, bf16, 128)
ATTENTION_MMA_ENTRY(bf16, bf16, 256)
#endif
#if KERNELS_F16
ATTENTION_MMA_ENTRY(f16, f16, 64)
ATTENTION_MMA_ENTRY(f16, f16, 128)
ATTENTION_MMA_ENTRY(f16, f16, 256)
#endif

// ==== Backward on the tensor cores ====
//
// attention.cu's backward (read its comment: the same formulas and layout; dq, dk, dv of run-time
// storage codes) with mma.sync, FlashAttention-2 style: P rebuilt from q, k and the saved
// log-sum-exp, nothing L x L in memory, no atomics. Three kernels, in two launches:
//   attention_backward_row_terms_<T>   once per backward, one warp per (sample, query) row:
//       D_i = dout_i . out_i in f32 into the caller's row_terms, and dout rounded to T into the
//       caller's dout_rounded (the plans' dout is f32: rounded once here, every later read is a
//       16-byte copy of T; the kernels below once re-rounded it element-wise for every tile, and
//       the dk/dv kernel's every key block re-read all of it).
//   dq (attention_backward_dq_mma)    a block owns 64 queries (q and dout rows resident, each
//       warp's as A fragments in registers, loaded once; the dk/dv kernel's resident k and v stay in
//       shared: its two accumulators leave no registers for them); keys and values stream through
//       shared 32 at a time: S = Q K^T and dP = dO V^T by
//       mma, P = exp(S scale - lse), dS = P (dP - D) on the accumulator registers, dq += dS K
//       (dS rounded to T as the A operand, K's B fragments by ldmatrix.trans).
//   dk, dv (attention_backward_dkdv_mma)  a block owns 64 keys (k and v rows resident); queries
//       stream 32 at a time with their dout, lse and D: S^T = K Q^T, dP^T = V dO^T, then
//       dv += P^T dO and dk += dS^T Q.
//   attention_backward_mma_<T>_d<D> runs both, its grid's first half of blocks dk/dv, the second dq
//       (the entry, below, says why).
// Split (grids short of SMs, as the forward's key split: batch 1 at 16x16 is 4 blocks): grid z
// cuts the streamed rows (keys for dq, queries for dk and dv) into parts, each part's gradients
// go in f32 to a workspace (the launcher passes it as dq, dk, dv), and
// attention_backward_split_reduce (attention.cu) adds the parts in order (cifar10 at batch 1 in the latency model
// of examples/emulator_launch_depth.rs: dq and dk/dv 115.7 -> 44.3 us over the six, the reduces
// 1.5 us more).
// Streaming: two stages, filled by 16-byte cp.async (zeros past L and past C by a zero source
// size) one tile ahead, so a tile's loads run under the previous tile's mma; one barrier per tile
// (two where warps pair up, below).
// Warps: 16 resident rows each at D <= 128 (4 warps; dq or dk and dv accumulators of D channels,
// at most 2 x 128 x 16 f32: 128 registers a thread). At D = 256 two warps share 16 rows (8 warps):
// the first computes the scores S, the second dP, each over all of D for the 16 rows x 32 streamed
// rows; they swap them through shared memory in f32 (P from the first, dP from the second), both
// form dS, and each accumulates half the channels of dq (or of dk and dv). S and dP are then
// computed once per block (the dk/dv kernel once ran two blocks per key tile, each rebuilding S
// and dP over all of D to own one half of the channels), and no warp holds more than 128
// accumulators.
// Precision: dout rounded to T once; P and dS rounded to T as mma operands (computed from f32 S
// and dP); f32 accumulation; dq, dk, dv written (or += where `accumulate`) in f32, one rounding to
// their storage type.
// Shared memory (dynamic, rows of D + 8 halves): 2 x 64 resident rows, 2 stages x 2 x 32
// streamed rows, the dk/dv kernel's 2 stages x 2 x 32 f32 (lse, D), and at D = 256 the pairs'
// exchange (4 pairs x 2 x 16 x 32 f32): 148 KiB at D = 256 (H100/H200 and A100 allow 227 and
// 163 KiB a block, Jetson Orin 163 KiB), 68 KiB at 128, 36 KiB at 64.
namespace attention_backward_tiles {
constexpr int BLOCK_ROWS = 64;  // resident rows (queries or keys) per block
constexpr int STREAM = 32;      // streamed rows per stage
constexpr int STAGES = 2;
}  // namespace attention_backward_tiles

template <int D>
struct AttentionBackwardShape {
    static constexpr int SPLIT = D == 256 ? 2 : 1;  // warps sharing 16 resident rows
    static constexpr int DW = D / SPLIT;            // accumulator channels per warp
    static constexpr int WARPS = attention_backward_tiles::BLOCK_ROWS / 16 * SPLIT;
    // Streamed rows per scores step: the whole stage where warps pair up (one swap per tile).
    static constexpr int COLS = SPLIT == 2 ? attention_backward_tiles::STREAM : 16;
};

// D_i = dout_i . out_i (f32, dout as given) for every (sample, query) row into row_terms, and dout
// rounded to T into dout_rounded: one warp per row.
template <typename T>
__device__ __forceinline__ void attention_backward_row_terms(const void* dout, int dt_dout, const T* __restrict__ out,
                                                             float* __restrict__ row_terms, T* __restrict__ dout_rounded,
                                                             int rows, int channels) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const long long at = (long long)row * channels;
        float d = 0.0f;
        for (int c = lane; c < channels; c += 32) {
            const float g = load_dyn(dout, dt_dout, at + c);
            dout_rounded[at + c] = from_float<T>(g);
            d += g * to_float(out[at + c]);
        }
        d = warp_sum(d);
        if (lane == 0) row_terms[row] = d;
    }
}


// `rows` values of an N x L f32 tensor (sample n, from row0) into shared by cp.async, zeros past L.
__device__ __forceinline__ void attention_copy_row_values(float* dst, const float* __restrict__ src, int n, int row0,
                                                          int rows, int positions) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const bool inside = row0 + r < positions;
        cp_async_4(shared_address(dst + r), inside ? src + (long long)n * positions + row0 + r : src, inside ? 4 : 0);
    }
}

// The A operand of the scores, a warp's 16 resident rows over D, k-step by k-step: read from
// shared memory each time (`SharedRowsA`), or held in registers (`RegisterRowsA`, loaded once: the
// resident rows do not change while the other side streams).
template <int D>
struct SharedRowsA {
    const unsigned short* lane_row;  // the row and column this lane's ldmatrix address starts at
    // `rows`: the block's resident rows (stride D + 8), `row0`: this warp's first.
    __device__ __forceinline__ static SharedRowsA at(const unsigned short* rows, int row0, int lane) {
        return {rows + (row0 + lane % 16) * (D + 8) + (lane / 16) * 8};
    }
    __device__ __forceinline__ void fragment(unsigned (&a)[4], int kc) const {
        ldmatrix_x4(a, shared_address(lane_row + kc));
    }
};

template <int D>
struct RegisterRowsA {
    const unsigned (&held)[D / 16][4];
    __device__ __forceinline__ void fragment(unsigned (&a)[4], int kc) const {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = held[kc / 16][e];
    }
};

// acc (16 x COLS) = this warp's 16 resident rows (`a`) times COLS rows of `b_rows` (B's "col"
// operand: its rows are the n index), over D: n-tile j covers b rows 8 j .. 8 j + 7.
template <typename T, int D, int COLS, typename A>
__device__ __forceinline__ void attention_scores(float (&acc)[COLS / 8][4], const A& a_rows,
                                                 const unsigned short* b_rows, int lane) {
    constexpr int ROW = D + 8;
    const int b_row = (lane / 16) * 8 + (lane % 8), b_col = ((lane / 8) % 2) * 8;
#pragma unroll
    for (int j = 0; j < COLS / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < D; kc += 16) {
        unsigned a[4];
        a_rows.fragment(a, kc);
#pragma unroll
        for (int n0 = 0; n0 < COLS; n0 += 16) {
            unsigned b[4];
            ldmatrix_x4(b, shared_address(b_rows + (n0 + b_row) * ROW + kc + b_col));
            mma_m16n8k16<T>(acc[n0 / 8], a, b[0], b[1]);
            mma_m16n8k16<T>(acc[n0 / 8 + 1], a, b[2], b[3]);
        }
    }
}

// The A operand (16 x 16, rounded to T) of k-step kk from accumulators of n8 tiles: the
// accumulator layout of tiles 2 kk and 2 kk + 1 is the m16k16 fragment layout.
template <typename T, int N>
__device__ __forceinline__ void attention_a_fragment(unsigned (&frag)[4], const float (&acc)[N][4], int kk) {
    frag[0] = pack_x2<T>(acc[2 * kk][0], acc[2 * kk][1]);
    frag[1] = pack_x2<T>(acc[2 * kk][2], acc[2 * kk][3]);
    frag[2] = pack_x2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    frag[3] = pack_x2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc (16 x CHANNELS from c0) += A (16 x 16) times 16 rows of `b_rows` read as a 16 x CHANNELS
// matrix (ldmatrix.trans).
template <typename T, int D, int CHANNELS>
__device__ __forceinline__ void attention_accumulate_16(float (&acc)[CHANNELS / 8][4], const unsigned (&a)[4],
                                                        const unsigned short* b_rows, int c0, int lane) {
    constexpr int ROW = D + 8;
    const int b_row = (lane % 8) + ((lane / 8) % 2) * 8, b_col = (lane / 16) * 8;
#pragma unroll
    for (int c = 0; c < CHANNELS; c += 16) {
        unsigned b[4];
        ldmatrix_x4_trans(b, shared_address(b_rows + b_row * ROW + c0 + c + b_col));
        mma_m16n8k16<T>(acc[c / 8], a, b[0], b[1]);
        mma_m16n8k16<T>(acc[c / 8 + 1], a, b[2], b[3]);
    }
}

// Where two warps share 16 rows: this warp's `mine` (role 0: P, role 1: dP) out through shared,
// the partner's in, as (P, dP). Thread-private float4 slots in the accumulator layout (the
// partner's lane holds the same elements): no bank conflicts. One block barrier between.
template <int N>
__device__ __forceinline__ void attention_swap_with_partner(float (&p)[N][4], float (&dp)[N][4],
                                                            const float (&mine)[N][4], float* pair_slots, int role,
                                                            int lane) {
    float4* out_slot = reinterpret_cast<float4*>(pair_slots) + role * N * 32;
    const float4* in_slot = reinterpret_cast<const float4*>(pair_slots) + (1 - role) * N * 32;
#pragma unroll
    for (int j = 0; j < N; ++j) out_slot[j * 32 + lane] = make_float4(mine[j][0], mine[j][1], mine[j][2], mine[j][3]);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float4 other = in_slot[j * 32 + lane];
        const float theirs[4] = {other.x, other.y, other.z, other.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            p[j][e] = role == 0 ? mine[j][e] : theirs[e];
            dp[j][e] = role == 0 ? theirs[e] : mine[j][e];
        }
    }
}

// The operands of one scores step: S = s_rows (16 resident rows) x s_cols^T (COLS streamed rows),
// dP = dp_rows x dp_cols^T; the resident rows are an A source (`SharedRowsA`, `RegisterRowsA`).
template <typename A>
struct AttentionScoreOperands {
    A s_rows;
    const unsigned short* s_cols;
    A dp_rows;
    const unsigned short* dp_cols;
};

// One scores step of the backward, shared by the dq and dk/dv kernels (which differ in what is
// resident and what streams): P = exp(S scale - lse) (0 where the streamed index col0 + 8 j + 2 t +
// (e % 2) is past L) and dS = P (dP - D), on the accumulator layout (element e of n-tile j).
// `lse_at(j, e)` and `delta_at(j, e)` give that element's log-sum-exp and D_i. SPLIT = 2: this
// warp computes S (role 0, and P from it) or dP (role 1) and swaps with its partner.
template <typename T, int D, int SPLIT, int COLS, typename A, typename LseAt, typename DeltaAt>
__device__ __forceinline__ void attention_backward_p_ds(float (&p)[COLS / 8][4], float (&ds)[COLS / 8][4],
                                                        const AttentionScoreOperands<A>& ops, int col0, int positions,
                                                        float scale, LseAt lse_at, DeltaAt delta_at, float* pair_slots,
                                                        int role, int lane) {
    const int t = lane % 4;
    const auto probability = [&](float score, int j, int e) {
        const bool valid = col0 + 8 * j + 2 * t + (e % 2) < positions;
        return valid ? expf(score * scale - lse_at(j, e)) : 0.0f;
    };
    if constexpr (SPLIT == 1) {
        attention_scores<T, D, COLS>(p, ops.s_rows, ops.s_cols, lane);
        attention_scores<T, D, COLS>(ds, ops.dp_rows, ops.dp_cols, lane);
    } else {
        float mine[COLS / 8][4];
        attention_scores<T, D, COLS>(mine, role == 0 ? ops.s_rows : ops.dp_rows, role == 0 ? ops.s_cols : ops.dp_cols,
                                     lane);
        if (role == 0) {
#pragma unroll
            for (int j = 0; j < COLS / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) mine[j][e] = probability(mine[j][e], j, e);
        }
        attention_swap_with_partner(p, ds, mine, pair_slots, role, lane);
    }
#pragma unroll
    for (int j = 0; j < COLS / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if constexpr (SPLIT == 1) p[j][e] = probability(p[j][e], j, e);
            ds[j][e] = p[j][e] * (ds[j][e] - delta_at(j, e));
        }
}

// out[row, c0 + ...] = (or += where `accumulate`) factor * acc for rows g, g + 8 of a warp's 16
// (from row0) of sample n, channels < C, rows `row_stride` elements apart.
template <int CHANNELS>
__device__ __forceinline__ void attention_add_rows(void* dst, int dtype, const float (&acc)[CHANNELS / 8][4],
                                                   float factor, int n, int row0, int c0, int positions,
                                                   int channels, int row_stride, int lane, int accumulate) {
    const int g = lane / 4, t = lane % 4;
    // Channels c and c + 1 in one access where the pair is aligned (channels and the row stride
    // even, dst aligned to two elements): a row's four lanes store 16 (f32: 32) contiguous bytes.
    const bool pairs = channels % 2 == 0 && row_stride % 2 == 0 &&
                       (unsigned long long)dst % (dtype == DTYPE_F32 ? 8 : 4) == 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= positions) continue;
        const long long at = ((long long)n * positions + row) * row_stride;
#pragma unroll
        for (int j = 0; j < CHANNELS / 8; ++j) {
            const int c = c0 + 8 * j + 2 * t;
            if (c >= channels) continue;
            const float v[2] = {factor * acc[j][2 * r], factor * acc[j][2 * r + 1]};
            if (pairs && c + 1 < channels) {
                store_grad_n<2>(dst, dtype, at + c, v, accumulate);
            } else {
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (c + e < channels) store_grad(dst, dtype, at + c + e, v[e], accumulate);
            }
        }
    }
}

// The backward's streamed tiles of this block: all T of them, or where the launcher splits them
// over grid z (grids short of SMs: batch 1 at 16x16 is 4 blocks) part z, [z T / Z, (z + 1) T / Z).
struct StreamTiles {
    int first, end;
};

__device__ __forceinline__ StreamTiles stream_tiles(int positions) {
    const int all = (positions + attention_backward_tiles::STREAM - 1) / attention_backward_tiles::STREAM;
    return StreamTiles{(int)(blockIdx.z * all / gridDim.z), (int)((blockIdx.z + 1) * all / gridDim.z)};
}

template <typename T, int D>
__device__ __forceinline__ void attention_backward_dq_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                          const T* __restrict__ v, const T* __restrict__ dout_rounded,
                                                          const float* __restrict__ row_terms,
                                                          const float* __restrict__ logsumexp, void* dq, int dt_dq,
                                                          int positions, int channels, int qkv_stride,
                                                          int grad_stride, float scale, int accumulate, int block) {
    using namespace attention_backward_tiles;
    using Shape = AttentionBackwardShape<D>;
    constexpr int ROW = D + 8, SPLIT = Shape::SPLIT, DW = Shape::DW, COLS = Shape::COLS, THREADS = 32 * Shape::WARPS;
    constexpr int STAGE = 2 * STREAM * ROW;  // keys, then values
    extern __shared__ __align__(16) unsigned short attention_shared[];
    unsigned short* q_rows = attention_shared;           // BLOCK_ROWS x ROW
    unsigned short* do_rows = q_rows + BLOCK_ROWS * ROW;  // BLOCK_ROWS x ROW
    unsigned short* stages = do_rows + BLOCK_ROWS * ROW;  // STAGES x STAGE
    float* exchange = reinterpret_cast<float*>(stages + STAGES * STAGE);  // SPLIT = 2: pairs x 2 x COLS x 16

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4;
    const int rows0 = (warp / SPLIT) * 16, role = warp % SPLIT, c0 = role * DW;
    const int n = blockIdx.y;
    const int query0 = block * BLOCK_ROWS;
    const long long sample = (long long)n * positions * channels;  // dout's
    const long long qkv_sample = (long long)n * positions * qkv_stride;
    const StreamTiles tiles = stream_tiles(positions);
    const int first_key = tiles.first * STREAM;

    attention_copy_rows<D, THREADS, BLOCK_ROWS>(q_rows, q, qkv_sample, query0, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, BLOCK_ROWS>(do_rows, dout_rounded, sample, query0, positions, channels, channels);
    attention_copy_rows<D, THREADS, STREAM>(stages, k, qkv_sample, first_key, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, STREAM>(stages + STREAM * ROW, v, qkv_sample, first_key, positions, channels,
                                            qkv_stride);
    cp_async_commit();
    // Rows g and g + 8 of this warp's 16: log-sum-exp and D_i (0 past L: those rows are not written).
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int query = query0 + rows0 + g + 8 * r;
        const bool inside = query < positions;
        row_lse[r] = inside ? logsumexp[(long long)n * positions + query] : 0.0f;
        row_delta[r] = inside ? row_terms[(long long)n * positions + query] : 0.0f;
    }

    float acc[DW / 8][4];
#pragma unroll
    for (int j = 0; j < DW / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    // This warp's resident operands as A fragments, loaded once: q (for S) and dout (for dP), or
    // where warps pair up the one its role needs.
    cp_async_wait<0>();
    __syncthreads();
    unsigned held[3 - SPLIT][D / 16][4];
#pragma unroll
    for (int h = 0; h < 3 - SPLIT; ++h)
#pragma unroll
        for (int kc = 0; kc < D; kc += 16)
            SharedRowsA<D>::at(h == 1 || role == 1 ? do_rows : q_rows, rows0, lane).fragment(held[h][kc / 16], kc);
    const RegisterRowsA<D> q_held{held[0]}, do_held{held[2 - SPLIT]};

    for (int tile = tiles.first; tile < tiles.end; ++tile) {
        cp_async_wait<0>();
        __syncthreads();  // this tile is in shared for every warp, and the other stage is consumed
        if (tile + 1 < tiles.end) {
            unsigned short* next = stages + ((tile + 1 - tiles.first) % STAGES) * STAGE;
            attention_copy_rows<D, THREADS, STREAM>(next, k, qkv_sample, (tile + 1) * STREAM, positions, channels,
                                                    qkv_stride);
            attention_copy_rows<D, THREADS, STREAM>(next + STREAM * ROW, v, qkv_sample, (tile + 1) * STREAM, positions,
                                                    channels, qkv_stride);
        }
        cp_async_commit();
        const unsigned short* keys = stages + ((tile - tiles.first) % STAGES) * STAGE;
        const unsigned short* values = keys + STREAM * ROW;
#pragma unroll
        for (int step = 0; step < STREAM; step += COLS) {
            const int key0 = tile * STREAM + step;
            if (key0 >= positions) break;  // the same for the whole block
            // Element e of n-tile j: query row g + 8 (e / 2), key key0 + 8 j + 2 t + (e % 2).
            float p[COLS / 8][4], ds[COLS / 8][4];
            attention_backward_p_ds<T, D, SPLIT, COLS>(
                p, ds,
                AttentionScoreOperands<RegisterRowsA<D>>{q_held, keys + step * ROW, do_held, values + step * ROW}, key0,
                positions, scale,
                [&](int, int e) { return row_lse[e / 2]; }, [&](int, int e) { return row_delta[e / 2]; },
                exchange + (rows0 / 16) * 2 * COLS * 16, role, lane);
#pragma unroll
            for (int kk = 0; kk < COLS / 16; ++kk) {
                unsigned a[4];
                attention_a_fragment<T>(a, ds, kk);
                attention_accumulate_16<T, D, DW>(acc, a, keys + (step + 16 * kk) * ROW, c0, lane);
            }
        }
    }
    attention_add_rows<DW>(gradient_part(dq, positions, channels), dt_dq, acc, scale, n, query0 + rows0, c0,
                           positions, channels, grad_stride, lane, accumulate);
}

template <typename T, int D>
__device__ __forceinline__ void attention_backward_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v,
                                                            const T* __restrict__ dout_rounded,
                                                            const float* __restrict__ row_terms,
                                                            const float* __restrict__ logsumexp, void* dk, int dt_dk,
                                                            void* dv, int dt_dv, int positions, int channels,
                                                            int qkv_stride, int grad_stride, float scale,
                                                            int accumulate, int block) {
    using namespace attention_backward_tiles;
    using Shape = AttentionBackwardShape<D>;
    constexpr int ROW = D + 8, SPLIT = Shape::SPLIT, DW = Shape::DW, COLS = Shape::COLS, THREADS = 32 * Shape::WARPS;
    constexpr int STAGE = 2 * STREAM * ROW;  // queries, then their dout
    extern __shared__ __align__(16) unsigned short attention_shared[];
    unsigned short* k_rows = attention_shared;           // BLOCK_ROWS x ROW
    unsigned short* v_rows = k_rows + BLOCK_ROWS * ROW;  // BLOCK_ROWS x ROW
    unsigned short* stages = v_rows + BLOCK_ROWS * ROW;  // STAGES x STAGE
    float* stage_terms = reinterpret_cast<float*>(stages + STAGES * STAGE);  // STAGES x (lse, D): 2 x STREAM
    float* exchange = stage_terms + STAGES * 2 * STREAM;  // SPLIT = 2: pairs x 2 x COLS x 16

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int t = lane % 4;
    const int rows0 = (warp / SPLIT) * 16, role = warp % SPLIT, c0 = role * DW;
    const int n = blockIdx.y;
    const int key_base = block * BLOCK_ROWS;
    const long long sample = (long long)n * positions * channels;  // dout's
    const long long qkv_sample = (long long)n * positions * qkv_stride;
    const StreamTiles tiles = stream_tiles(positions);
    const int first_query = tiles.first * STREAM;

    attention_copy_rows<D, THREADS, BLOCK_ROWS>(k_rows, k, qkv_sample, key_base, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, BLOCK_ROWS>(v_rows, v, qkv_sample, key_base, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, STREAM>(stages, q, qkv_sample, first_query, positions, channels, qkv_stride);
    attention_copy_rows<D, THREADS, STREAM>(stages + STREAM * ROW, dout_rounded, sample, first_query, positions,
                                            channels, channels);
    attention_copy_row_values(stage_terms, logsumexp, n, first_query, STREAM, positions);
    attention_copy_row_values(stage_terms + STREAM, row_terms, n, first_query, STREAM, positions);
    cp_async_commit();

    const SharedRowsA<D> k_resident = SharedRowsA<D>::at(k_rows, rows0, lane);
    const SharedRowsA<D> v_resident = SharedRowsA<D>::at(v_rows, rows0, lane);
    float dk_acc[DW / 8][4], dv_acc[DW / 8][4];
#pragma unroll
    for (int j = 0; j < DW / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk_acc[j][e] = 0.0f;
            dv_acc[j][e] = 0.0f;
        }

    for (int tile = tiles.first; tile < tiles.end; ++tile) {
        cp_async_wait<0>();
        __syncthreads();  // this tile is in shared for every warp, and the other stage is consumed
        if (tile + 1 < tiles.end) {
            const int next_row = (tile + 1) * STREAM, s = (tile + 1 - tiles.first) % STAGES;
            unsigned short* next = stages + s * STAGE;
            attention_copy_rows<D, THREADS, STREAM>(next, q, qkv_sample, next_row, positions, channels, qkv_stride);
            attention_copy_rows<D, THREADS, STREAM>(next + STREAM * ROW, dout_rounded, sample, next_row, positions,
                                                    channels, channels);
            attention_copy_row_values(stage_terms + s * 2 * STREAM, logsumexp, n, next_row, STREAM, positions);
            attention_copy_row_values(stage_terms + s * 2 * STREAM + STREAM, row_terms, n, next_row, STREAM,
                                      positions);
        }
        cp_async_commit();
        const int stage = (tile - tiles.first) % STAGES;
        const unsigned short* queries = stages + stage * STAGE;
        const unsigned short* douts = queries + STREAM * ROW;
        const float* lse = stage_terms + stage * 2 * STREAM;
        const float* delta = lse + STREAM;
#pragma unroll
        for (int step = 0; step < STREAM; step += COLS) {
            const int query0 = tile * STREAM + step;
            if (query0 >= positions) break;  // the same for the whole block
            // Element e of n-tile j: key row g + 8 (e / 2), query query0 + 8 j + 2 t + (e % 2) (its
            // lse and D at that query's place in the stage).
            const auto local = [&](int j, int e) { return step + 8 * j + 2 * t + (e % 2); };
            float p[COLS / 8][4], ds[COLS / 8][4];  // P^T, dS^T
            attention_backward_p_ds<T, D, SPLIT, COLS>(
                p, ds,
                AttentionScoreOperands<SharedRowsA<D>>{k_resident, queries + step * ROW, v_resident,
                                                       douts + step * ROW},
                query0, positions, scale,
                [&](int j, int e) { return lse[local(j, e)]; }, [&](int j, int e) { return delta[local(j, e)]; },
                exchange + (rows0 / 16) * 2 * COLS * 16, role, lane);
#pragma unroll
            for (int kk = 0; kk < COLS / 16; ++kk) {
                unsigned a[4];
                attention_a_fragment<T>(a, p, kk);
                attention_accumulate_16<T, D, DW>(dv_acc, a, douts + (step + 16 * kk) * ROW, c0, lane);
                attention_a_fragment<T>(a, ds, kk);
                attention_accumulate_16<T, D, DW>(dk_acc, a, queries + (step + 16 * kk) * ROW, c0, lane);
            }
        }
    }
    attention_add_rows<DW>(gradient_part(dk, positions, channels), dt_dk, dk_acc, scale, n, key_base + rows0, c0,
                           positions, channels, grad_stride, lane, accumulate);
    attention_add_rows<DW>(gradient_part(dv, positions, channels), dt_dv, dv_acc, 1.0f, n, key_base + rows0, c0,
                           positions, channels, grad_stride, lane, accumulate);
}

// Entries: one launch runs both kernels, grid x = 2 x (L / 64 rounded up): the first half of
// the blocks take 64 keys each (dk, dv), the second 64 queries each (dq); grid y = N, z = the
// split's parts. The two read the same operands and write different gradients, so they need no
// order between them, and where one kernel's grid would leave SMs idle (batch 16 at 16x16: 64
// blocks a kernel on 132 SMs) the other's blocks run beside it (the latency model of
// examples/emulator_launch_depth.rs, cifar10 at batch 16: the six backwards 116.9 -> 67.0 us, the
// input VJP 756 -> 706; at batch 1, 44.5 -> 25.6 us and 398 -> 379, 6 launches fewer). The dk/dv
// blocks come first: they are the longer ones. The block is 32 x AttentionBackwardShape<D>::WARPS
// threads (256 at D = 256, 128 below) for both, the dynamic shared memory the dk/dv kernel's
// (the larger).
#define ATTENTION_BACKWARD_MMA_ENTRY(name, T, D)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * AttentionBackwardShape<D>::WARPS)                      \
        attention_backward_mma_##name##_d##D(                                                               \
            const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                      \
            const T* __restrict__ dout_rounded, const float* __restrict__ row_terms,                        \
            const float* __restrict__ logsumexp, void* dq, int dt_dq, void* dk, int dt_dk, void* dv,        \
            int dt_dv, int positions, int channels, int qkv_stride, int grad_stride, float scale,           \
            int accumulate) {                                                                               \
        const int row_blocks = (int)gridDim.x / 2;                                                          \
        if ((int)blockIdx.x < row_blocks)                                                                   \
            attention_backward_dkdv_mma<T, D>(q, k, v, dout_rounded, row_terms, logsumexp, dk, dt_dk, dv,   \
                                              dt_dv, positions, channels, qkv_stride, grad_stride, scale,   \
                                              accumulate, (int)blockIdx.x);                                 \
        else                                                                                                \
            attention_backward_dq_mma<T, D>(q, k, v, dout_rounded, row_terms, logsumexp, dq, dt_dq,         \
                                            positions, channels, qkv_stride, grad_stride, scale,            \
                                            accumulate, (int)blockIdx.x - row_blocks);                      \
    }

// attention_backward_row_terms_<T>: D_i and the rounded dout, before the two kernels above.
#define ATTENTION_ROW_TERMS_ENTRY(name, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) attention_backward_row_terms_##name(                   \
        const void* dout, int dt_dout, const T* __restrict__ out, float* __restrict__ row_terms,             \
        T* __restrict__ dout_rounded, int rows, int channels) {                                             \
        attention_backward_row_terms<T>(dout, dt_dout, out, row_terms, dout_rounded, rows, channels);       \
    }

#if KERNELS_BF16
ATTENTION_ROW_TERMS_ENTRY(bf16, bf16)
ATTENTION_BACKWARD_MMA_ENTRY(bf16, bf16, 64)
ATTENTION_BACKWARD_MMA_ENTRY(bf16, bf16, 128)
ATTENTION_BACKWARD_MMA_ENTRY(bf16, bf16, 256)
#endif
#if KERNELS_F16
ATTENTION_ROW_TERMS_ENTRY(f16, f16)
ATTENTION_BACKWARD_MMA_ENTRY(f16, f16, 64)
ATTENTION_BACKWARD_MMA_ENTRY(f16, f16, 128)
ATTENTION_BACKWARD_MMA_ENTRY(f16, f16, 256)
#endif
