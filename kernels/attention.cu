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
// logsumexp N x L, f32. q, k and v rows are `qkv_stride` elements apart (3C: they are the channel
// thirds of the one N x L x 3C tensor the UNet's fused q/k/v projection writes; C for tensors of
// their own); out's rows are C apart.
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
//                           The f32 path (bf16/f16 run attention_mma.cu). Grids short of the
//                           GPU's SMs split the keys over grid z, as the tensor-core kernel does
//                           (f32 at batch 1: a 16x16 attention was 32 blocks each walking all 256
//                           keys); attention_split_combine, below, merges the parts.
#include "common.cuh"

namespace attention {
constexpr int KEYS = 16;             // keys per tile = lanes per half-warp
constexpr int QUERIES = 8;           // queries per block = half-warps per block
constexpr int THREADS = 128;
}  // namespace attention

// Split over the keys (gridDim.z > 1): block z takes key tiles [z T / Z, (z + 1) T / Z) of the T and
// stores its normalised rows and log-sum-exp in f32 to partial_out[z][n][query][c] and
// partial_lse[z][n][query] (attention_mma.cu's layout), for attention_split_combine. The launcher
// keeps Z <= T, so every part has a valid key and a finite max.
template <typename T, int PER_LANE>
__device__ __forceinline__ void attention_forward(const T* __restrict__ q, const T* __restrict__ k,
                                                  const T* __restrict__ v, T* __restrict__ out,
                                                  float* __restrict__ logsumexp, int positions, int channels,
                                                  int qkv_stride, float scale, float* __restrict__ partial_out,
                                                  float* __restrict__ partial_lse) {
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
    const long long sample = (long long)n * positions * channels;      // out's
    const long long qkv_sample = (long long)n * positions * qkv_stride;  // q's, k's, v's

    for (int i = tid; i < QUERIES * channels; i += THREADS) {
        const int row = blockIdx.x * QUERIES + i / channels;
        q_tile[i] = row < positions ? load_float(q, qkv_sample + (long long)row * qkv_stride + i % channels) : 0.0f;
    }

    float acc[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) acc[r] = 0.0f;
    float running_max = -__int_as_float(0x7f800000), running_sum = 0.0f;

    const int tiles = (positions + KEYS - 1) / KEYS;
    const int first_tile = (int)(blockIdx.z * tiles / gridDim.z), end_tile = (int)((blockIdx.z + 1) * tiles / gridDim.z);
    for (int key0 = first_tile * KEYS; key0 < end_tile * KEYS; key0 += KEYS) {
        __syncthreads();  // the previous tile is consumed (and, the first time, q_tile is written)
        for (int i = tid; i < KEYS * v_stride; i += THREADS) {
            const int row = i / v_stride, c = i % v_stride;
            const int key = key0 + row;
            const bool inside = key < positions && c < channels;
            const long long at = qkv_sample + (long long)key * qkv_stride + c;
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
    const float lse = running_max + logf(running_sum);
    if (gridDim.z > 1) {
        const long long part_rows = (long long)blockIdx.z * gridDim.y * positions;
#pragma unroll
        for (int r = 0; r < PER_LANE; ++r) {
            const int c = lane16 + KEYS * r;
            if (c < channels) partial_out[part_rows * channels + row + c] = acc[r] * inv_sum;
        }
        if (lane16 == 0) partial_lse[part_rows + (long long)n * positions + query] = lse;
        return;
    }
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int c = lane16 + KEYS * r;
        if (c < channels) store_float(out, row + c, acc[r] * inv_sum);
    }
    if (lane16 == 0) logsumexp[(long long)n * positions + query] = lse;
}

// The output accumulator lives in registers: PER_LANE = ceil(C / 16) rounded up to 4, 8 or 16.
#define ATTENTION_FORWARD_ENTRY(name, T, PER_LANE)                                                          \
    extern "C" __global__ void __launch_bounds__(attention::THREADS, 4)                                        \
        attention_forward_##name##_c##PER_LANE(const T* __restrict__ q, const T* __restrict__ k,            \
                                               const T* __restrict__ v, T* __restrict__ out,                \
                                               float* __restrict__ logsumexp, int positions, int channels,  \
                                               int qkv_stride, float scale, float* __restrict__ partial_out, \
                                               float* __restrict__ partial_lse) {                           \
        attention_forward<T, PER_LANE>(q, k, v, out, logsumexp, positions, channels, qkv_stride, scale,     \
                                       partial_out, partial_lse);                                           \
    }
#define ATTENTION_FORWARD_ENTRIES(name, T)                                                                  \
    ATTENTION_FORWARD_ENTRY(name, T, 4) ATTENTION_FORWARD_ENTRY(name, T, 8) ATTENTION_FORWARD_ENTRY(name, T, 16)

ATTENTION_FORWARD_ENTRIES(f32, float)
ATTENTION_FORWARD_ENTRIES(f16, f16)
ATTENTION_FORWARD_ENTRIES(bf16, bf16)

// The key split's merge (this kernel's and attention_mma.cu's): lse = log sum_z exp(lse_z) and
// out = sum_z exp(lse_z - lse) out_z (each part normalised over its own keys), z = 0, 1, ... in
// order (the same bits every run), the max taken out first; out rounded once to its type (a
// run-time code). One warp per (sample, query) row: lane z takes part z's log-sum-exp and weight
// (32 parts at a time), the max and the weights reach every lane by shuffles, and lane l adds the
// parts of channels l, l + 32, ... (C <= 256: at most 8), two parts' loads in flight (four spilled
// 52 B on sm_90, held to 64 registers; two take 80 there, none spilled; the latency model of
// examples/emulator_launch_depth.rs, which finds the merge bound by L2, gives cifar10 at batch 16
// 32.0 us over the five either way). A thread per element took every part's exp and a 64-bit
// division again for each: cifar10 at batch 16 (3 parts), 32.1 -> 6.7 us over the five in that
// model as it was then (the attentions themselves 20.2), the same sums in the same order (the
// same bits); at batch 1 (4 parts, a row a warp) 3.4 -> 4.5 us. Grid-stride over the rows, 8 a
// block.
constexpr int COMBINE_CHANNELS_PER_LANE = 8;
extern "C" __global__ void __launch_bounds__(256)
    attention_split_combine(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                            int splits, void* __restrict__ out, int out_dtype, float* __restrict__ logsumexp,
                            int rows, int channels) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const long long total = (long long)rows * channels;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const auto part_lse = [&](int z) { return z < splits ? partial_lse[(long long)z * rows + row] : NEG_INF; };
        const float first = part_lse(lane);
        float max_lse = first;
        for (int z0 = 32; z0 < splits; z0 += 32) max_lse = fmaxf(max_lse, part_lse(z0 + lane));
        max_lse = warp_max(max_lse);
        // Channel lane + 32 j, or past C the last channel's (loaded, never stored: no branch
        // between a part's loads, so they issue together).
        int column[COMBINE_CHANNELS_PER_LANE];
        float weight_sum = 0.0f, value[COMBINE_CHANNELS_PER_LANE];
#pragma unroll
        for (int j = 0; j < COMBINE_CHANNELS_PER_LANE; ++j) {
            column[j] = min(lane + 32 * j, channels - 1);
            value[j] = 0.0f;
        }
        for (int z0 = 0; z0 < splits; z0 += 32) {
            const float lse = z0 == 0 ? first : part_lse(z0 + lane);
            const float lane_weight = z0 + lane < splits ? expf(lse - max_lse) : 0.0f;
            const int count = min(32, splits - z0);
            const float* part = partial_out + (long long)z0 * total + (long long)row * channels;
#pragma unroll 2
            for (int i = 0; i < count; ++i, part += total) {
                const float weight = __shfl_sync(0xffffffffu, lane_weight, i);
                weight_sum += weight;
#pragma unroll
                for (int j = 0; j < COMBINE_CHANNELS_PER_LANE; ++j) value[j] += weight * part[column[j]];
            }
        }
        const long long at = (long long)row * channels + lane;
#pragma unroll
        for (int j = 0; j < COMBINE_CHANNELS_PER_LANE; ++j)
            if (lane + 32 * j < channels) store_dyn(out, out_dtype, at + 32 * j, value[j] / weight_sum);
        if (lane == 0) logsumexp[row] = max_lse + logf(weight_sum);
    }
}


// ==== Backward (attention_backward_*): a separate section, its own constants ====
//
// dq, dk, dv = (or += where `accumulate`) the vector-Jacobian product of the forward (src/backend/cpu/attention.rs
// `backward` is the reference): with P_ij = exp(s_ij - lse_i) rebuilt from q, k and the saved
// log-sum-exp (nothing L x L in memory), dP_ij = dout_i . v_j and D_i = dout_i . out_i,
//   dS_ij = P_ij (dP_ij - D_i),  dq_i += scale sum_j dS_ij k_j,
//   dk_j += scale sum_i dS_ij q_i,  dv_j += sum_i P_ij dout_i.
// D_i is a C-long dot product: each block computes it for the queries it visits, at 1/16 of the
// score work, instead of a pass and a scratch buffer of its own.
// Version 1, f32 SIMT, any storage type per operand (run-time codes: q, k, v and out share one;
// dout, dq, dk, dv each their own), accumulators in shared memory so any C fits the block's shared
// memory (C = 256: 58 KB and 66 KB, above the 48 KB default: the driver opts in). Two kernels, no
// atomics, every output element written by one thread:
//   attention_backward_dq    grid (ceil(L/8), N), 128 threads: 8 queries per block, one per
//                            half-warp; keys stream through shared memory in tiles of 16, lane j of
//                            a half-warp scores key j; the lane then owns channels lane, lane+16, ...
//                            of its query's dq accumulator.
//   attention_backward_dkdv  grid (ceil(L/8), N), 128 threads: 8 keys per block, one per half-warp;
//                            queries stream in tiles of 16 (q, dout, lse and D), lane i scores query
//                            i; the lane then owns channels lane, lane+16, ... of its key's dk, dv.
// Layout: q, k, v rows `qkv_stride` apart, dq, dk, dv rows `grad_stride` apart (3C for the fused
// q/k/v tensor and its gradient, C for tensors of their own or a split's parts); out, dout C.
// Split (grids short of SMs, as the tensor-core backward's): block z takes part z of its streamed
// tiles, [z T / Z, (z + 1) T / Z), and writes its gradients in f32 to slice z of the workspace
// (gradient_part, rows C apart); attention_backward_split_reduce, below, adds the parts in order.
// Version 2 (tensor cores, bf16/f16 activations with C a multiple of 8): attention_mma.cu.
namespace attention_backward {
constexpr int TILE = 16;     // streamed rows per tile = lanes per half-warp
constexpr int ROWS = 8;      // rows owned per block = half-warps per block
constexpr int THREADS = 128;
}  // namespace attention_backward

extern "C" __global__ void __launch_bounds__(attention_backward::THREADS)
    attention_backward_dq(const void* q, const void* k, const void* v, const void* out, int dt_in, const void* dout,
                          int dt_dout, const float* logsumexp, void* dq, int dt_dq, int positions, int channels,
                          int qkv_stride, int grad_stride, float scale, int accumulate) {
    using namespace attention_backward;
    extern __shared__ __align__(16) float shared[];
    const int C = channels, stride = C + 1;  // odd row stride: 16 lanes reading 16 rows hit 16 banks
    float* q_rows = shared;                  // ROWS x C
    float* dout_rows = q_rows + ROWS * C;    // ROWS x C
    float* dq_acc = dout_rows + ROWS * C;    // ROWS x C
    float* k_tile = dq_acc + ROWS * C;       // TILE x stride
    float* v_tile = k_tile + TILE * stride;  // TILE x stride

    const int tid = threadIdx.x, lane16 = tid % TILE, row_local = tid / TILE;
    const int n = blockIdx.y;
    const int query = blockIdx.x * ROWS + row_local;
    const bool query_valid = query < positions;
    const long long sample = (long long)n * positions * C;  // out's and dout's
    const long long qkv_sample = (long long)n * positions * qkv_stride;

    for (int i = tid; i < ROWS * C; i += THREADS) {
        const int row = blockIdx.x * ROWS + i / C;
        q_rows[i] = row < positions ? load_dyn(q, dt_in, qkv_sample + (long long)row * qkv_stride + i % C) : 0.0f;
        dout_rows[i] = row < positions ? load_dyn(dout, dt_dout, sample + (long long)row * C + i % C) : 0.0f;
    }
    for (int c = lane16; c < C; c += TILE) dq_acc[row_local * C + c] = 0.0f;  // this lane's own slots

    // D_i over the half-warp (xor offsets below 16 stay inside it).
    float delta = 0.0f;
    if (query_valid) {
        const long long row = sample + (long long)query * C;
        for (int c = lane16; c < C; c += TILE) delta += load_dyn(dout, dt_dout, row + c) * load_dyn(out, dt_in, row + c);
    }
    for (int offset = TILE / 2; offset > 0; offset >>= 1) delta += __shfl_xor_sync(0xffffffffu, delta, offset);
    const float lse = query_valid ? logsumexp[(long long)n * positions + query] : 0.0f;

    const float* q_row = q_rows + row_local * C;
    const float* dout_row = dout_rows + row_local * C;
    float* acc = dq_acc + row_local * C;
    const int tiles = (positions + TILE - 1) / TILE;
    const int first = (int)(blockIdx.z * tiles / gridDim.z), end = (int)((blockIdx.z + 1) * tiles / gridDim.z);
    for (int key0 = first * TILE; key0 < end * TILE; key0 += TILE) {
        __syncthreads();  // the previous tile is consumed (and, the first time, the rows are written)
        for (int i = tid; i < TILE * C; i += THREADS) {
            const int row = i / C, c = i % C, key = key0 + row;
            const long long at = qkv_sample + (long long)key * qkv_stride + c;
            k_tile[row * stride + c] = key < positions ? load_dyn(k, dt_in, at) : 0.0f;
            v_tile[row * stride + c] = key < positions ? load_dyn(v, dt_in, at) : 0.0f;
        }
        __syncthreads();

        // dS for key key0 + lane16 of this half-warp's query.
        const float* k_row = k_tile + lane16 * stride;
        const float* v_row = v_tile + lane16 * stride;
        float score = 0.0f, dp = 0.0f;
        for (int c = 0; c < C; ++c) {
            score = fmaf(q_row[c], k_row[c], score);
            dp = fmaf(dout_row[c], v_row[c], dp);
        }
        const bool inside = query_valid && key0 + lane16 < positions;
        const float p = inside ? expf(score * scale - lse) : 0.0f;
        const float ds = p * (dp - delta);

        for (int j = 0; j < TILE; ++j) {
            const float ds_j = __shfl_sync(0xffffffffu, ds, (tid & TILE) + j);
            const float* k_j = k_tile + j * stride;
            for (int c = lane16; c < C; c += TILE) acc[c] = fmaf(ds_j, k_j[c], acc[c]);
        }
    }

    if (!query_valid) return;
    const long long row = ((long long)n * positions + query) * grad_stride;
    void* own = gradient_part(dq, positions, C);
    for (int c = lane16; c < C; c += TILE) store_grad(own, dt_dq, row + c, scale * acc[c], accumulate);
}

extern "C" __global__ void __launch_bounds__(attention_backward::THREADS)
    attention_backward_dkdv(const void* q, const void* k, const void* v, const void* out, int dt_in,
                            const void* dout, int dt_dout, const float* logsumexp, void* dk, int dt_dk, void* dv,
                            int dt_dv, int positions, int channels, int qkv_stride, int grad_stride, float scale,
                            int accumulate) {
    using namespace attention_backward;
    extern __shared__ __align__(16) float shared[];
    const int C = channels, stride = C + 1;
    float* k_rows = shared;                        // ROWS x C
    float* v_rows = k_rows + ROWS * C;             // ROWS x C
    float* dk_acc = v_rows + ROWS * C;             // ROWS x C
    float* dv_acc = dk_acc + ROWS * C;             // ROWS x C
    float* q_tile = dv_acc + ROWS * C;             // TILE x stride
    float* dout_tile = q_tile + TILE * stride;     // TILE x stride
    float* lse_tile = dout_tile + TILE * stride;   // TILE
    float* delta_tile = lse_tile + TILE;           // TILE

    const int tid = threadIdx.x, lane16 = tid % TILE, row_local = tid / TILE;
    const int lane = tid % 32, warp = tid / 32;
    const int n = blockIdx.y;
    const int key = blockIdx.x * ROWS + row_local;
    const bool key_valid = key < positions;
    const long long sample = (long long)n * positions * C;  // out's and dout's
    const long long qkv_sample = (long long)n * positions * qkv_stride;

    for (int i = tid; i < ROWS * C; i += THREADS) {
        const int row = blockIdx.x * ROWS + i / C;
        const long long at = qkv_sample + (long long)row * qkv_stride + i % C;
        k_rows[i] = row < positions ? load_dyn(k, dt_in, at) : 0.0f;
        v_rows[i] = row < positions ? load_dyn(v, dt_in, at) : 0.0f;
    }
    float* dk_own = dk_acc + row_local * C;
    float* dv_own = dv_acc + row_local * C;
    for (int c = lane16; c < C; c += TILE) {
        dk_own[c] = 0.0f;
        dv_own[c] = 0.0f;
    }

    const float* k_row = k_rows + row_local * C;
    const float* v_row = v_rows + row_local * C;
    const int tiles = (positions + TILE - 1) / TILE;
    const int first = (int)(blockIdx.z * tiles / gridDim.z), end = (int)((blockIdx.z + 1) * tiles / gridDim.z);
    for (int query0 = first * TILE; query0 < end * TILE; query0 += TILE) {
        __syncthreads();  // the previous tile is consumed (and, the first time, the key rows are written)
        for (int i = tid; i < TILE * C; i += THREADS) {
            const int row = i / C, c = i % C, query = query0 + row;
            const long long at = qkv_sample + (long long)query * qkv_stride + c;
            q_tile[row * stride + c] = query < positions ? load_dyn(q, dt_in, at) : 0.0f;
            dout_tile[row * stride + c] =
                query < positions ? load_dyn(dout, dt_dout, sample + (long long)query * C + c) : 0.0f;
        }
        // lse and D of the tile's queries: warp w takes queries 4w .. 4w + 3.
        for (int r = 0; r < TILE / (THREADS / 32); ++r) {
            const int local = warp * (TILE / (THREADS / 32)) + r, query = query0 + local;
            float d = 0.0f;
            if (query < positions) {
                const long long row = sample + (long long)query * C;
                for (int c = lane; c < C; c += 32) d += load_dyn(dout, dt_dout, row + c) * load_dyn(out, dt_in, row + c);
            }
            d = warp_sum(d);
            if (lane == 0) {
                delta_tile[local] = d;
                lse_tile[local] = query < positions ? logsumexp[(long long)n * positions + query] : 0.0f;
            }
        }
        __syncthreads();

        // P and dS of query query0 + lane16 against this half-warp's key.
        const float* q_row = q_tile + lane16 * stride;
        const float* dout_row = dout_tile + lane16 * stride;
        float score = 0.0f, dp = 0.0f;
        for (int c = 0; c < C; ++c) {
            score = fmaf(q_row[c], k_row[c], score);
            dp = fmaf(dout_row[c], v_row[c], dp);
        }
        const bool inside = key_valid && query0 + lane16 < positions;
        const float p = inside ? expf(score * scale - lse_tile[lane16]) : 0.0f;
        const float ds = p * (dp - delta_tile[lane16]);

        for (int i = 0; i < TILE; ++i) {
            const float p_i = __shfl_sync(0xffffffffu, p, (tid & TILE) + i);
            const float ds_i = __shfl_sync(0xffffffffu, ds, (tid & TILE) + i);
            const float* q_i = q_tile + i * stride;
            const float* dout_i = dout_tile + i * stride;
            for (int c = lane16; c < C; c += TILE) {
                dv_own[c] = fmaf(p_i, dout_i[c], dv_own[c]);
                dk_own[c] = fmaf(ds_i, q_i[c], dk_own[c]);
            }
        }
    }

    if (!key_valid) return;
    const long long row = ((long long)n * positions + key) * grad_stride;
    void* dk_part = gradient_part(dk, positions, C);
    void* dv_part = gradient_part(dv, positions, C);
    for (int c = lane16; c < C; c += TILE) {
        store_grad(dk_part, dt_dk, row + c, scale * dk_own[c], accumulate);
        store_grad(dv_part, dt_dv, row + c, dv_own[c], accumulate);
    }
}

// The backward's key (dq) and query (dk, dv) split (this file's kernels and attention_mma.cu's): gradient y (0 dq, 1 dk, 2 dv) of grid y =
// (or += where `accumulate`) the sum of its `splits` f32 parts, each an N x L x C slice of `parts`
// (dq's parts, then dk's, then dv's), added in order z = 0, 1, ... (the same bits every run), one
// rounding to the gradient's storage type; the gradients' rows `grad_stride` apart.
extern "C" __global__ void __launch_bounds__(256)
    attention_backward_split_reduce(const float* __restrict__ parts, int splits, long long slice, int channels,
                                    int grad_stride, void* dq, int dt_dq, void* dk, int dt_dk, void* dv, int dt_dv,
                                    int accumulate) {
    // Chosen by selects: an array indexed by blockIdx.y would live in a local-memory frame.
    const int y = blockIdx.y;
    void* const gradient = y == 0 ? dq : y == 1 ? dk : dv;
    const int dtype = y == 0 ? dt_dq : y == 1 ? dt_dk : dt_dv;
    const float* own = parts + (long long)y * splits * slice;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < slice; i += (long long)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int z = 0; z < splits; ++z) sum += own[z * slice + i];
        const long long row = i / channels;
        store_grad(gradient, dtype, row * grad_stride + (i - row * channels), sum, accumulate);
    }
}
