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
// Hot kernels (no spills allowed): attention_forward_mma_bf16_d128, attention_forward_mma_f16_d128.
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
