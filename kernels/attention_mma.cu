// attention_mma.cu: the attention of attention.cu (same semantics and layout: read its head
// comment) on the tensor cores, for bf16 and f16 storage. THE FAST ONE for 16-bit activations.
// A module of its own so that attention.cu loads where mma/ldmatrix do not (the PTX emulator today).
//
// Kernels: attention_forward_mma_<T>_d<D>, T in {bf16, f16}, D in {64, 128, 256} (the padded head
// dim: C <= D, C a multiple of 8; columns past C are zeros in shared memory).
// FlashAttention-2 style: each warp owns 16 queries; the block's queries (16 x warps, the launcher
// picks the warps: blockDim.x / 32) sit in shared memory, keys and values stream through it 16 at a
// time. S = Q K^T with mma.sync.m16n8k16 (f32 accumulation) from ldmatrix fragments; online softmax
// in f32 on the accumulator registers (each thread holds 2 rows x 4 keys; row max and sum over the
// 4 threads of a quad); P is rounded to T and reused in registers as the A operand of O += P V,
// with V's B fragments from ldmatrix.trans. The per-query log-sum-exp is written in f32.
// Precision: products of T values exact in f32, f32 accumulation and softmax; P rounded to T once.
// Shared memory (dynamic): (16 x warps + 32) rows of D + 8 halves (the pad keeps the 8 rows one
// ldmatrix reads in distinct banks).
// The backward (attention_backward_row_terms_<T>, attention_backward_dq_mma_<T>_d<D>,
// attention_backward_dkdv_mma_<T>_d<D>) is at the end of the file, with its own comment.
// Hot kernels (no spills allowed): attention_forward_mma_<T>_d128 and _d256, and the bf16 backward
// kernels at d128 and d256 (src/backend/cuda/attention.rs lists them).
#include "common.cuh"

namespace attention_mma {
constexpr int KEYS = 16;  // keys per tile
}

// rows x D tile of a N x L x C tensor into shared (row stride D + 8), zeros past L and past C;
// 16-byte copies (C a multiple of 8, the tensor 16-byte aligned: the launcher checks).
template <int D, typename T>
__device__ __forceinline__ void attention_load_tile(unsigned short* tile, const T* __restrict__ src, long long sample,
                                                    int row0, int rows, int positions, int channels) {
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < rows * CHUNKS; i += blockDim.x) {
        const int row = i / CHUNKS, c = (i % CHUNKS) * 8;
        uint4 value = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + row < positions && c < channels)
            value = *reinterpret_cast<const uint4*>(src + sample + (long long)(row0 + row) * channels + c);
        *reinterpret_cast<uint4*>(tile + row * (D + 8) + c) = value;
    }
}

template <typename T, int D>
__device__ __forceinline__ void attention_forward_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, T* __restrict__ out,
                                                      float* __restrict__ logsumexp, int positions, int channels,
                                                      float scale) {
    using namespace attention_mma;
    constexpr int ROW = D + 8;
    extern __shared__ __align__(16) unsigned short attention_shared[];
    const int warps = blockDim.x / 32;
    const int block_queries = 16 * warps;
    unsigned short* q_tile = attention_shared;           // block_queries x ROW
    unsigned short* k_tile = q_tile + block_queries * ROW;  // KEYS x ROW
    unsigned short* v_tile = k_tile + KEYS * ROW;           // KEYS x ROW

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int n = blockIdx.y;
    const int query0 = blockIdx.x * block_queries;
    const long long sample = (long long)n * positions * channels;

    attention_load_tile<D>(q_tile, q, sample, query0, block_queries, positions, channels);

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
    // Rows g and g + 8 of this warp's 16 queries: running max, and this thread's part of the sum.
    float row_max[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};
    float row_sum[2] = {0.0f, 0.0f};

    const int q_row = warp * 16 + (lane % 16), q_col = (lane / 16) * 8;
    const int k_row = (lane / 16) * 8 + (lane % 8), k_col = ((lane / 8) % 2) * 8;
    const int v_row = (lane % 8) + ((lane / 8) % 2) * 8, v_col = (lane / 16) * 8;

    for (int key0 = 0; key0 < positions; key0 += KEYS) {
        __syncthreads();  // the previous tile is consumed (the first time: nothing to wait for)
        attention_load_tile<D>(k_tile, k, sample, key0, KEYS, positions, channels);
        attention_load_tile<D>(v_tile, v, sample, key0, KEYS, positions, channels);
        __syncthreads();

        // S (16 queries x 16 keys): two n8 tiles of keys.
        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kc = 0; kc < D; kc += 16) {
            unsigned a[4], b[4];
            ldmatrix_x4(a, shared_address(q_tile + q_row * ROW + kc + q_col));
            ldmatrix_x4(b, shared_address(k_tile + k_row * ROW + kc + k_col));
            mma_m16n8k16<T>(s[0], a, b[0], b[1]);
            mma_m16n8k16<T>(s[1], a, b[2], b[3]);
        }

        // Online softmax; element e of tile j is key key0 + 8 j + 2 t + (e % 2), row g + 8 (e / 2).
        float tile_max[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool valid = key0 + 8 * j + 2 * t + (e % 2) < positions;
                s[j][e] = valid ? s[j][e] * scale : -__int_as_float(0x7f800000);
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
            }
        float correction[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: the tile has a valid key
            correction[r] = expf(row_max[r] - new_max);           // 0 on the first tile
            row_max[r] = new_max;
            row_sum[r] *= correction[r];
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = expf(s[j][e] - row_max[e / 2]);  // 0 for masked keys
                row_sum[e / 2] += s[j][e];
            }
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[j][e] *= correction[e / 2];

        // P as the A operand (16 x 16 keys): the accumulator layout of the two key tiles is the
        // m16k16 fragment layout.
        const unsigned p[4] = {pack_x2<T>(s[0][0], s[0][1]), pack_x2<T>(s[0][2], s[0][3]),
                               pack_x2<T>(s[1][0], s[1][1]), pack_x2<T>(s[1][2], s[1][3])};
#pragma unroll
        for (int c0 = 0; c0 < D; c0 += 16) {
            unsigned b[4];
            ldmatrix_x4_trans(b, shared_address(v_tile + v_row * ROW + c0 + v_col));
            mma_m16n8k16<T>(o[c0 / 8], p, b[0], b[1]);
            mma_m16n8k16<T>(o[c0 / 8 + 1], p, b[2], b[3]);
        }
    }

    // Totals over the quad, then out = O / sum and lse = max + log(sum).
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
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int c = 8 * j + 2 * t;
            if (c < channels) store_float2(out, row + c, make_float2(o[j][2 * r] * inv_sum, o[j][2 * r + 1] * inv_sum));
        }
        if (t == 0) logsumexp[(long long)n * positions + query] = row_max[r] + logf(row_sum[r]);
    }
}

#define ATTENTION_MMA_ENTRY(name, T, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        attention_forward_mma_##name##_d##D(const T* __restrict__ q, const T* __restrict__ k,               \
                                            const T* __restrict__ v, T* __restrict__ out,                   \
                                            float* __restrict__ logsumexp, int positions, int channels,     \
                                            float scale) {                                                  \
        attention_forward_mma<T, D>(q, k, v, out, logsumexp, positions, channels, scale);                   \
    }

ATTENTION_MMA_ENTRY(bf16, bf16, 64)
ATTENTION_MMA_ENTRY(bf16, bf16, 128)
ATTENTION_MMA_ENTRY(bf16, bf16, 256)
ATTENTION_MMA_ENTRY(f16, f16, 64)
ATTENTION_MMA_ENTRY(f16, f16, 128)
ATTENTION_MMA_ENTRY(f16, f16, 256)

// ==== Backward on the tensor cores (attention_backward_dq_mma_*, attention_backward_dkdv_mma_*) ====
//
// attention.cu's backward (read its comment: the same formulas, layout and run-time storage codes
// for dout, dq, dk, dv; q, k, v and out in T) with mma.sync, FlashAttention-2 style: P rebuilt
// from q, k and the saved log-sum-exp, nothing L x L in memory, two kernels and no atomics.
//   attention_backward_dq_mma_<T>_d<D>    each warp owns 16 queries (q and dout rows in shared);
//       keys and values stream through shared 16 at a time: S = Q K^T and dP = dO V^T by mma,
//       P = exp(S scale - lse), dS = P (dP - D) on the accumulator registers, dq += dS K by mma
//       (dS rounded to T as the A operand, K's B fragments by ldmatrix.trans).
//   attention_backward_dkdv_mma_<T>_d<D>  each warp owns 16 keys (k and v rows in shared); queries
//       stream 16 at a time with their dout, lse and D: S^T = K Q^T, dP^T = V dO^T, then
//       dv += P^T dO and dk += dS^T Q by mma. The accumulators of one block cover DC = min(D, 128)
//       channels (blockIdx.z picks which: D = 256 runs two blocks per key tile, each rebuilding
//       S and dP, so that 2 x DC x 16 accumulators fit the registers).
// D_i = dout_i . out_i is computed in f32 once per backward, before both kernels, into a scratch the
// caller provides (attention_backward_row_terms_<T>).
// Precision: dout rounded to T once as it is staged; P and dS rounded to T as mma operands; f32
// accumulation; dq, dk, dv written (or += where `accumulate`) in f32, one rounding to their storage
// type.

// rows x D tile of an N x L x C tensor of run-time storage type `dtype` into shared as T (row
// stride D + 8), zeros past L and past C (C even).
template <int D, typename T>
__device__ __forceinline__ void attention_stage_rounded(unsigned short* tile, const void* src, int dtype,
                                                        long long sample, int row0, int rows, int positions,
                                                        int channels) {
    constexpr int PAIRS = D / 2;
    for (int i = threadIdx.x; i < rows * PAIRS; i += blockDim.x) {
        const int row = i / PAIRS, c = (i % PAIRS) * 2;
        float lo = 0.0f, hi = 0.0f;
        if (row0 + row < positions && c < channels) {
            const long long at = sample + (long long)(row0 + row) * channels + c;
            lo = load_dyn(src, dtype, at);
            hi = load_dyn(src, dtype, at + 1);
        }
        *reinterpret_cast<unsigned*>(tile + row * (D + 8) + c) = pack_x2<T>(lo, hi);
    }
}

// D_i = dout_i . out_i (f32) for every (sample, query) row of the batch into row_terms: one warp per
// row, once per backward (both kernels below read it; each block of the dk/dv kernel once
// recomputed it for every query tile, 16 times over per sample at cifar10's sizes).
template <typename T>
__device__ __forceinline__ void attention_backward_row_terms(const void* dout, int dt_dout, const T* __restrict__ out,
                                                             float* __restrict__ row_terms, int rows, int channels) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const long long at = (long long)row * channels;
        float d = 0.0f;
        for (int c = lane; c < channels; c += 32) d += load_dyn(dout, dt_dout, at + c) * to_float(out[at + c]);
        d = warp_sum(d);
        if (lane == 0) row_terms[row] = d;
    }
}

// The D_i and log-sum-exp of `rows` rows from row0 of sample n into shared delta[] and lse_rows[]
// (zeros past L).
__device__ __forceinline__ void attention_load_row_terms(float* delta, float* lse_rows,
                                                         const float* __restrict__ row_terms,
                                                         const float* __restrict__ logsumexp, int n, int row0,
                                                         int rows, int positions) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const int row = row0 + r;
        const bool inside = row < positions;
        delta[r] = inside ? row_terms[(long long)n * positions + row] : 0.0f;
        lse_rows[r] = inside ? logsumexp[(long long)n * positions + row] : 0.0f;
    }
}

// The 16 x 16 product of this warp's 16 rows of `a_rows` (from a_row0) with 16 rows of `b_rows`
// (B's "col" operand: rows are the n index), over D: acc[j] for n-tile j (rows 8 j .. 8 j + 7).
template <typename T, int D>
__device__ __forceinline__ void attention_scores_16x16(float (&acc)[2][4], const unsigned short* a_rows, int a_row0,
                                                       const unsigned short* b_rows, int lane) {
    constexpr int ROW = D + 8;
    const int a_row = a_row0 + (lane % 16), a_col = (lane / 16) * 8;
    const int b_row = (lane / 16) * 8 + (lane % 8), b_col = ((lane / 8) % 2) * 8;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < D; kc += 16) {
        unsigned a[4], b[4];
        ldmatrix_x4(a, shared_address(a_rows + a_row * ROW + kc + a_col));
        ldmatrix_x4(b, shared_address(b_rows + b_row * ROW + kc + b_col));
        mma_m16n8k16<T>(acc[0], a, b[0], b[1]);
        mma_m16n8k16<T>(acc[1], a, b[2], b[3]);
    }
}

// acc (16 x CHANNELS from c0) += A (16 x 16, the accumulator layout of two n8 tiles, rounded to T)
// times 16 rows of `b_rows` read as a 16 x CHANNELS matrix (ldmatrix.trans).
template <typename T, int D, int CHANNELS>
__device__ __forceinline__ void attention_accumulate_16(float (&acc)[CHANNELS / 8][4], const float (&a)[2][4],
                                                        const unsigned short* b_rows, int c0, int lane) {
    constexpr int ROW = D + 8;
    const unsigned p[4] = {pack_x2<T>(a[0][0], a[0][1]), pack_x2<T>(a[0][2], a[0][3]), pack_x2<T>(a[1][0], a[1][1]),
                           pack_x2<T>(a[1][2], a[1][3])};
    const int b_row = (lane % 8) + ((lane / 8) % 2) * 8, b_col = (lane / 16) * 8;
#pragma unroll
    for (int c = 0; c < CHANNELS; c += 16) {
        unsigned b[4];
        ldmatrix_x4_trans(b, shared_address(b_rows + b_row * ROW + c0 + c + b_col));
        mma_m16n8k16<T>(acc[c / 8], p, b[0], b[1]);
        mma_m16n8k16<T>(acc[c / 8 + 1], p, b[2], b[3]);
    }
}

// out[row, c0 + ...] = (or += where `accumulate`) factor * acc for rows g, g + 8 of a warp's 16
// (from row0), channels < C.
template <int CHANNELS>
__device__ __forceinline__ void attention_add_rows(void* dst, int dtype, const float (&acc)[CHANNELS / 8][4],
                                                   float factor, long long sample, int row0, int c0, int positions,
                                                   int channels, int lane, int accumulate) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= positions) continue;
        const long long at = sample + (long long)row * channels;
#pragma unroll
        for (int j = 0; j < CHANNELS / 8; ++j) {
            const int c = c0 + 8 * j + 2 * t;
            if (c >= channels) continue;
#pragma unroll
            for (int e = 0; e < 2; ++e)
                store_grad(dst, dtype, at + c + e, factor * acc[j][2 * r + e], accumulate);
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void attention_backward_dq_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                          const T* __restrict__ v, const float* __restrict__ row_terms,
                                                          const void* dout, int dt_dout,
                                                          const float* __restrict__ logsumexp, void* dq, int dt_dq,
                                                          int positions, int channels, float scale, int accumulate) {
    using namespace attention_mma;
    constexpr int ROW = D + 8;
    extern __shared__ __align__(16) unsigned short attention_shared[];
    const int warps = blockDim.x / 32;
    const int block_queries = 16 * warps;
    unsigned short* q_tile = attention_shared;                  // block_queries x ROW
    unsigned short* do_tile = q_tile + block_queries * ROW;     // block_queries x ROW
    unsigned short* k_tile = do_tile + block_queries * ROW;     // KEYS x ROW
    unsigned short* v_tile = k_tile + KEYS * ROW;               // KEYS x ROW
    float* delta = reinterpret_cast<float*>(v_tile + KEYS * ROW);  // block_queries
    float* lse_rows = delta + block_queries;                        // block_queries

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int n = blockIdx.y;
    const int query0 = blockIdx.x * block_queries;
    const long long sample = (long long)n * positions * channels;

    attention_load_tile<D>(q_tile, q, sample, query0, block_queries, positions, channels);
    attention_stage_rounded<D, T>(do_tile, dout, dt_dout, sample, query0, block_queries, positions, channels);
    attention_load_row_terms(delta, lse_rows, row_terms, logsumexp, n, query0, block_queries, positions);
    __syncthreads();
    const float row_delta[2] = {delta[warp * 16 + g], delta[warp * 16 + g + 8]};
    const float row_lse[2] = {lse_rows[warp * 16 + g], lse_rows[warp * 16 + g + 8]};

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    for (int key0 = 0; key0 < positions; key0 += KEYS) {
        __syncthreads();  // the previous tile is consumed
        attention_load_tile<D>(k_tile, k, sample, key0, KEYS, positions, channels);
        attention_load_tile<D>(v_tile, v, sample, key0, KEYS, positions, channels);
        __syncthreads();
        float s[2][4], dp[2][4];
        attention_scores_16x16<T, D>(s, q_tile, warp * 16, k_tile, lane);
        attention_scores_16x16<T, D>(dp, do_tile, warp * 16, v_tile, lane);
        // Element e of n-tile j: query row g + 8 (e / 2), key key0 + 8 j + 2 t + (e % 2).
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool valid = key0 + 8 * j + 2 * t + (e % 2) < positions;
                const float p = valid ? expf(s[j][e] * scale - row_lse[e / 2]) : 0.0f;
                s[j][e] = p * (dp[j][e] - row_delta[e / 2]);  // dS
            }
        attention_accumulate_16<T, D, D>(acc, s, k_tile, 0, lane);
    }
    attention_add_rows<D>(dq, dt_dq, acc, scale, sample, query0 + warp * 16, 0, positions, channels, lane, accumulate);
}

template <typename T, int D, int DC>
__device__ __forceinline__ void attention_backward_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v,
                                                            const float* __restrict__ row_terms, const void* dout,
                                                            int dt_dout,
                                                            const float* __restrict__ logsumexp, void* dk, int dt_dk,
                                                            void* dv, int dt_dv, int positions, int channels,
                                                            float scale, int accumulate) {
    using namespace attention_mma;
    constexpr int ROW = D + 8;
    extern __shared__ __align__(16) unsigned short attention_shared[];
    const int warps = blockDim.x / 32;
    const int block_keys = 16 * warps;
    unsigned short* k_rows = attention_shared;                   // block_keys x ROW
    unsigned short* v_rows = k_rows + block_keys * ROW;          // block_keys x ROW
    unsigned short* q_tile = v_rows + block_keys * ROW;          // KEYS x ROW (16 queries)
    unsigned short* do_tile = q_tile + KEYS * ROW;               // KEYS x ROW
    float* delta = reinterpret_cast<float*>(do_tile + KEYS * ROW);  // KEYS
    float* lse_rows = delta + KEYS;                                  // KEYS

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int t = lane % 4;
    const int n = blockIdx.y;
    const int key_base = blockIdx.x * block_keys;
    const int c0 = blockIdx.z * DC;
    const long long sample = (long long)n * positions * channels;

    attention_load_tile<D>(k_rows, k, sample, key_base, block_keys, positions, channels);
    attention_load_tile<D>(v_rows, v, sample, key_base, block_keys, positions, channels);

    float dk_acc[DC / 8][4], dv_acc[DC / 8][4];
#pragma unroll
    for (int j = 0; j < DC / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk_acc[j][e] = 0.0f;
            dv_acc[j][e] = 0.0f;
        }

    for (int query0 = 0; query0 < positions; query0 += KEYS) {
        __syncthreads();  // the previous tile is consumed (the first time: the key rows are written)
        attention_load_tile<D>(q_tile, q, sample, query0, KEYS, positions, channels);
        attention_stage_rounded<D, T>(do_tile, dout, dt_dout, sample, query0, KEYS, positions, channels);
        attention_load_row_terms(delta, lse_rows, row_terms, logsumexp, n, query0, KEYS, positions);
        __syncthreads();
        float st[2][4], dpt[2][4];
        attention_scores_16x16<T, D>(st, k_rows, warp * 16, q_tile, lane);
        attention_scores_16x16<T, D>(dpt, v_rows, warp * 16, do_tile, lane);
        // Element e of n-tile j: key row g + 8 (e / 2), query query0 + 8 j + 2 t + (e % 2).
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int local = 8 * j + 2 * t + (e % 2);
                const bool valid = query0 + local < positions;
                const float p = valid ? expf(st[j][e] * scale - lse_rows[local]) : 0.0f;
                st[j][e] = p;
                dpt[j][e] = p * (dpt[j][e] - delta[local]);  // dS^T
            }
        attention_accumulate_16<T, D, DC>(dv_acc, st, do_tile, c0, lane);
        attention_accumulate_16<T, D, DC>(dk_acc, dpt, q_tile, c0, lane);
    }
    attention_add_rows<DC>(dk, dt_dk, dk_acc, scale, sample, key_base + warp * 16, c0, positions, channels, lane,
                           accumulate);
    attention_add_rows<DC>(dv, dt_dv, dv_acc, 1.0f, sample, key_base + warp * 16, c0, positions, channels, lane,
                           accumulate);
}

#define ATTENTION_BACKWARD_MMA_ENTRIES(name, T, D, DC)                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        attention_backward_dq_mma_##name##_d##D(const T* __restrict__ q, const T* __restrict__ k,           \
                                                const T* __restrict__ v, const float* __restrict__ row_terms, \
                                                const void* dout, int dt_dout,                              \
                                                const float* __restrict__ logsumexp, void* dq, int dt_dq,   \
                                                int positions, int channels, float scale, int accumulate) { \
        attention_backward_dq_mma<T, D>(q, k, v, row_terms, dout, dt_dout, logsumexp, dq, dt_dq, positions, \
                                        channels, scale, accumulate);                                       \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv_mma_##name##_d##D(            \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                          \
        const float* __restrict__ row_terms, const void* dout, int dt_dout,                                 \
        const float* __restrict__ logsumexp, void* dk, int dt_dk, void* dv, int dt_dv, int positions,       \
        int channels, float scale, int accumulate) {                                                        \
        attention_backward_dkdv_mma<T, D, DC>(q, k, v, row_terms, dout, dt_dout, logsumexp, dk, dt_dk, dv,  \
                                              dt_dv, positions, channels, scale, accumulate);               \
    }

// attention_backward_row_terms_<T>: the D_i of every row, before the two kernels above.
#define ATTENTION_ROW_TERMS_ENTRY(name, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) attention_backward_row_terms_##name(                   \
        const void* dout, int dt_dout, const T* __restrict__ out, float* __restrict__ row_terms, int rows,   \
        int channels) {                                                                                     \
        attention_backward_row_terms<T>(dout, dt_dout, out, row_terms, rows, channels);                     \
    }

ATTENTION_ROW_TERMS_ENTRY(bf16, bf16)
ATTENTION_ROW_TERMS_ENTRY(f16, f16)
ATTENTION_BACKWARD_MMA_ENTRIES(bf16, bf16, 64, 64)
ATTENTION_BACKWARD_MMA_ENTRIES(bf16, bf16, 128, 128)
ATTENTION_BACKWARD_MMA_ENTRIES(bf16, bf16, 256, 128)
ATTENTION_BACKWARD_MMA_ENTRIES(f16, f16, 64, 64)
ATTENTION_BACKWARD_MMA_ENTRIES(f16, f16, 128, 128)
ATTENTION_BACKWARD_MMA_ENTRIES(f16, f16, 256, 128)
