// attention.cu: fused single-head softmax attention over the H*W positions of NHWC tensors.
//
// What it computes (src/backend/cpu/attention.rs is the reference), per sample, with L = H*W
// positions and C channels:
//   s_ij = (q_i . k_j) * scale (scale = 1/sqrt(C), from the host, rounded to f32 as the CPU does),
//   lse_i = log sum_j exp(s_ij),  out_i = sum_j exp(s_ij - lse_i) v_j.
// Flash-style: keys and values stream through shared memory in tiles of 16 with an online softmax
// (running max and sum, f32), so the L x L matrix never reaches memory; the per-query log-sum-exp
// is written (f32) for the backward.
//
// Layout: q, k, v, out N x L x C (NHWC: position-major, channels contiguous), storage type T;
// logsumexp N x L, f32.
//
// Kernels:
//   attention_forward_<T>   version 1, f32 arithmetic for any storage type (f32, f16, bf16). A block
//                           of 4 warps takes 8 queries (one per half-warp); in the score phase a
//                           lane computes one key's score for its half-warp's query; in the output
//                           phase a lane owns channels lane16, lane16 + 16, ... of its query.
//                           Shared memory (dynamic): queries 8 x C, a key tile 16 x (C + 1) (odd
//                           row stride: the 16 lanes reading 16 rows hit 16 banks), a value tile
//                           16 x 16*PER_LANE (zero-padded). The output accumulator is
//                           in registers: the _c4/_c8/_c16 variants hold C <= 64/128/256.
//                           The fast one for now: no tensor-core version yet.
#include "common.cuh"

namespace attention {
constexpr int KEYS = 16;             // keys per tile = lanes per half-warp
constexpr int QUERIES = 8;           // queries per block = half-warps per block
constexpr int THREADS = 128;
}  // namespace attention

template <typename T, int PER_LANE>
__device__ __forceinline__ void attention_forward(const T* __restrict__ q, const T* __restrict__ k,
                                                  const T* __restrict__ v, T* __restrict__ out,
                                                  float* __restrict__ logsumexp, int positions, int channels,
                                                  float scale) {
    using namespace attention;
    extern __shared__ __align__(16) float shared[];
    float* q_tile = shared;                                  // QUERIES x C
    float* k_tile = q_tile + QUERIES * channels;             // KEYS x (C + 1)
    // Value rows padded with zeros to KEYS * PER_LANE channels: every lane reads all its PER_LANE slots.
    const int v_stride = KEYS * PER_LANE;
    float* v_tile = k_tile + KEYS * (channels + 1);          // KEYS x v_stride

    const int tid = threadIdx.x;
    const int lane16 = tid % KEYS;                 // key index in the score phase, channel slot later
    const int query_local = tid / KEYS;            // which of the block's queries this half-warp has
    const int n = blockIdx.y;
    const int query = blockIdx.x * QUERIES + query_local;
    const bool query_valid = query < positions;
    const long long sample = (long long)n * positions * channels;

    for (int i = tid; i < QUERIES * channels; i += THREADS) {
        const int row = blockIdx.x * QUERIES + i / channels;
        q_tile[i] = row < positions ? load_float(q, sample + (long long)row * channels + i % channels) : 0.0f;
    }

    float acc[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) acc[r] = 0.0f;
    float running_max = -__int_as_float(0x7f800000), running_sum = 0.0f;

    for (int key0 = 0; key0 < positions; key0 += KEYS) {
        __syncthreads();  // the previous tile is consumed (and, the first time, q_tile is written)
        for (int i = tid; i < KEYS * v_stride; i += THREADS) {
            const int row = i / v_stride, c = i % v_stride;
            const int key = key0 + row;
            const bool inside = key < positions && c < channels;
            const long long at = sample + (long long)key * channels + c;
            if (c < channels) k_tile[row * (channels + 1) + c] = inside ? load_float(k, at) : 0.0f;
            v_tile[row * v_stride + c] = inside ? load_float(v, at) : 0.0f;
        }
        __syncthreads();

        // Score of key key0 + lane16 for this half-warp's query.
        const float* q_row = q_tile + query_local * channels;
        const float* k_row = k_tile + lane16 * (channels + 1);
        float dot = 0.0f;
        for (int c = 0; c < channels; ++c) dot = fmaf(q_row[c], k_row[c], dot);
        const float score = key0 + lane16 < positions ? dot * scale : -__int_as_float(0x7f800000);

        // Online softmax over the half-warp (xor offsets below 16 stay inside it).
        float tile_max = score;
        for (int offset = KEYS / 2; offset > 0; offset >>= 1)
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        const float new_max = fmaxf(running_max, tile_max);  // finite: the tile has a valid key
        const float prob = expf(score - new_max);            // 0 for masked keys
        float tile_sum = prob;
        for (int offset = KEYS / 2; offset > 0; offset >>= 1)
            tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
        const float correction = expf(running_max - new_max);  // 0 on the first tile
        running_sum = running_sum * correction + tile_sum;
        running_max = new_max;

        // acc[c] = acc[c] * correction + sum_j p_j v_j[c], channels lane16 + 16 r.
#pragma unroll
        for (int r = 0; r < PER_LANE; ++r) acc[r] *= correction;
        for (int j = 0; j < KEYS; ++j) {
            const float p_j = __shfl_sync(0xffffffffu, prob, (tid & 16) + j);
            const float* v_row = v_tile + j * v_stride;
#pragma unroll
            for (int r = 0; r < PER_LANE; ++r) {
                const int c = lane16 + KEYS * r;
                acc[r] = fmaf(p_j, v_row[c], acc[r]);
            }
        }
    }

    if (!query_valid) return;
    const float inv_sum = 1.0f / running_sum;
    const long long row = sample + (long long)query * channels;
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int c = lane16 + KEYS * r;
        if (c < channels) store_float(out, row + c, acc[r] * inv_sum);
    }
    if (lane16 == 0) logsumexp[(long long)n * positions + query] = running_max + logf(running_sum);
}

// The output accumulator lives in registers: PER_LANE = ceil(C / 16) rounded up to 4, 8 or 16.
#define ATTENTION_FORWARD_ENTRY(name, T, PER_LANE)                                                          \
    extern "C" __global__ void __launch_bounds__(attention::THREADS, 4)                                        \
        attention_forward_##name##_c##PER_LANE(const T* __restrict__ q, const T* __restrict__ k,            \
                                               const T* __restrict__ v, T* __restrict__ out,                \
                                               float* __restrict__ logsumexp, int positions, int channels,  \
                                               float scale) {                                               \
        attention_forward<T, PER_LANE>(q, k, v, out, logsumexp, positions, channels, scale);                \
    }
#define ATTENTION_FORWARD_ENTRIES(name, T)                                                                  \
    ATTENTION_FORWARD_ENTRY(name, T, 4) ATTENTION_FORWARD_ENTRY(name, T, 8) ATTENTION_FORWARD_ENTRY(name, T, 16)

ATTENTION_FORWARD_ENTRIES(f32, float)
ATTENTION_FORWARD_ENTRIES(f16, f16)
ATTENTION_FORWARD_ENTRIES(bf16, bf16)
