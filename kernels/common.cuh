// common.cuh: the project's own device header, included by every kernel file.
//
// Kernels include no CUDA toolkit header (cuda_fp16.h / cuda_bf16.h need the toolkit's include
// tree, which NVRTC on a deployed machine does not have). What they need beyond NVRTC's built-ins
// (math functions, __shfl_xor_sync, __umulhi, the vector types) is here:
//   - storage types f16 and bf16 (16-bit patterns) with conversions through inline PTX `cvt`;
//   - load/store helpers that read any storage type as float and write float with one rounding;
//   - warp and block reductions (sum, max);
//   - Philox4x32-10 and the Box-Muller transform of src/backend/cpu/rng.rs, bit for bit;
//   - the tensor-core inline PTX the mma kernels share (ldmatrix, mma.sync m16n8k16, packing, cp.async).
// The host hands this file to NVRTC as an in-memory header named "common.cuh" (src/backend/cuda/
// compile.rs), so `#include "common.cuh"` works with no include path.
#pragma once

// ---- Which 16-bit types a compile instantiates ----
// The tensor-core files stamp each kernel for bf16 and for f16; a backend compiles only its own
// precision's (`-DKERNELS_F16=0` for bf16, `-DKERNELS_BF16=0` for f16, both for f32: half or all of
// the work of the slowest modules, the user's cold start). A compile that defines neither gets both.
#ifndef KERNELS_BF16
#define KERNELS_BF16 1
#endif
#ifndef KERNELS_F16
#define KERNELS_F16 1
#endif

// ---- 16-bit storage types ----
// Plain bit patterns: arithmetic is always done in float (or in mma instructions on packed pairs).
struct __align__(2) f16 {
    unsigned short bits;
};
struct __align__(2) bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

// bf16 is the top half of an f32: widening is exact and needs no instruction (`cvt.f32.bf16` is
// sm_90 only).
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }

// Round-to-nearest-even narrowing: the one rounding a value gets when it is stored.
template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}

template <>
__device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// ---- packed pairs (the operand registers of mma.sync m16n8k16) ----
// `lo` lands in bits 0..15 (the lower column / k index of the pair), `hi` in bits 16..31.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned d;
    // cvt's first source goes to the upper half.
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
    unsigned d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ unsigned pack_bits(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// ---- loads and stores as float ----
// Element `i` of a tensor of storage type T, read as float / written from float.
template <typename T>
__device__ __forceinline__ float load_float(const T* p, long long i) {
    return to_float(p[i]);
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, long long i, float v) {
    p[i] = from_float<T>(v);
}

// Storage type chosen at run time (a kernel parameter), for memory-bound kernels whose operands
// may each be f32, f16 or bf16: the branch is uniform across the grid, so it costs no divergence.
// Codes as src/backend/cuda/mod.rs passes them.
enum DtypeCode { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };

__device__ __forceinline__ float load_dyn(const void* p, int dtype, long long i) {
    if (dtype == DTYPE_F32) return static_cast<const float*>(p)[i];
    if (dtype == DTYPE_F16) return to_float(static_cast<const f16*>(p)[i]);
    return to_float(static_cast<const bf16*>(p)[i]);
}

__device__ __forceinline__ void store_dyn(void* p, int dtype, long long i, float v) {
    if (dtype == DTYPE_F32)
        static_cast<float*>(p)[i] = v;
    else if (dtype == DTYPE_F16)
        static_cast<f16*>(p)[i] = from_float<f16>(v);
    else
        static_cast<bf16*>(p)[i] = from_float<bf16>(v);
}

// v as a tensor of storage type `dtype` holds it (rounded once to a 16-bit type).
__device__ __forceinline__ float as_stored(int dtype, float v) {
    if (dtype == DTYPE_F32) return v;
    return dtype == DTYPE_F16 ? to_float(from_float<f16>(v)) : to_float(from_float<bf16>(v));
}

// A backward op's store into an input gradient: dst[i] = g (the first gradient to reach the tensor:
// the buffer needs no zeroing), or dst[i] += g where `accumulate` (where two gradients meet).
__device__ __forceinline__ void store_grad(void* p, int dtype, long long i, float g, int accumulate) {
    store_dyn(p, dtype, i, accumulate ? load_dyn(p, dtype, i) + g : g);
}

// N (1, 2, 4 or 8) consecutive elements from element i, storage type chosen at run time, in the
// fewest aligned accesses: N * 2 bytes (16-bit types) or N * 4 bytes (f32; two accesses at N = 8).
// i must be a multiple of N and the pointer aligned to N elements (the launchers check): a warp
// of threads reading consecutive vectors then uses every byte of every 32-byte sector it touches.

// N 32-bit words in one access (16-bit types: two a word, the lower element in the low half).
template <int N>
__device__ __forceinline__ void load_words(const unsigned* p, unsigned (&w)[N]) {
    if constexpr (N == 4) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
    } else if constexpr (N == 2) {
        const uint2 q = *reinterpret_cast<const uint2*>(p);
        w[0] = q.x, w[1] = q.y;
    } else {
        w[0] = *p;
    }
}

template <int N>
__device__ __forceinline__ void store_words(unsigned* p, const unsigned (&w)[N]) {
    if constexpr (N == 4)
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    else if constexpr (N == 2)
        *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    else
        *p = w[0];
}

template <int N>
__device__ __forceinline__ void load_dyn_n(const void* p, int dtype, long long i, float (&v)[N]) {
    if (dtype == DTYPE_F32) {
        const unsigned* base = static_cast<const unsigned*>(p) + i;
        constexpr int PER = N < 4 ? N : 4;  // words an access
#pragma unroll
        for (int a = 0; a < N; a += PER) {
            unsigned w[PER];
            load_words<PER>(base + a, w);
#pragma unroll
            for (int k = 0; k < PER; ++k) v[a + k] = __uint_as_float(w[k]);
        }
    } else if constexpr (N == 1) {
        v[0] = load_dyn(p, dtype, i);
    } else {
        unsigned w[N / 2];
        load_words<N / 2>(reinterpret_cast<const unsigned*>(static_cast<const unsigned short*>(p) + i), w);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const unsigned short h = (unsigned short)(w[k / 2] >> (16 * (k % 2)));
            v[k] = dtype == DTYPE_F16 ? to_float(f16{h}) : to_float(bf16{h});
        }
    }
}

template <int N>
__device__ __forceinline__ void store_dyn_n(void* p, int dtype, long long i, const float (&v)[N]) {
    if (dtype == DTYPE_F32) {
        unsigned* base = static_cast<unsigned*>(p) + i;
        constexpr int PER = N < 4 ? N : 4;
#pragma unroll
        for (int a = 0; a < N; a += PER) {
            unsigned w[PER];
#pragma unroll
            for (int k = 0; k < PER; ++k) w[k] = __float_as_uint(v[a + k]);
            store_words<PER>(base + a, w);
        }
    } else if constexpr (N == 1) {
        store_dyn(p, dtype, i, v[0]);
    } else {
        unsigned w[N / 2];
#pragma unroll
        for (int k = 0; k < N; k += 2)
            w[k / 2] = dtype == DTYPE_F16 ? pack_f16x2(v[k], v[k + 1]) : pack_bf16x2(v[k], v[k + 1]);
        store_words<N / 2>(reinterpret_cast<unsigned*>(static_cast<unsigned short*>(p) + i), w);
    }
}

// The run-time code of a storage type, for the *_dyn helpers from a typed pointer (a constant: the
// branches on it fold away).
__device__ __forceinline__ constexpr int dtype_code_of(const float*) { return DTYPE_F32; }
__device__ __forceinline__ constexpr int dtype_code_of(const f16*) { return DTYPE_F16; }
__device__ __forceinline__ constexpr int dtype_code_of(const bf16*) { return DTYPE_BF16; }

// g += what p holds at i.. where `accumulate` (else g as it is): the values store_grad_n stores.
template <int N>
__device__ __forceinline__ void add_held_n(const void* p, int dtype, long long i, float (&g)[N], int accumulate) {
    if (!accumulate) return;
    float held[N];
    load_dyn_n<N>(p, dtype, i, held);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] += held[k];
}

// store_grad over N consecutive elements (as load_dyn_n / store_dyn_n).
template <int N>
__device__ __forceinline__ void store_grad_n(void* p, int dtype, long long i, const float (&g)[N], int accumulate) {
    float sum[N];
#pragma unroll
    for (int k = 0; k < N; ++k) sum[k] = g[k];
    add_held_n<N>(p, dtype, i, sum, accumulate);
    store_dyn_n<N>(p, dtype, i, sum);
}

// Two consecutive elements (i even, the pointer aligned to two elements) in one access.
__device__ __forceinline__ float2 load_float2(const float* p, long long i) {
    return *reinterpret_cast<const float2*>(p + i);
}
__device__ __forceinline__ float2 load_float2(const f16* p, long long i) {
    unsigned pair = *reinterpret_cast<const unsigned*>(p + i);
    f16 lo = {(unsigned short)(pair & 0xffffu)}, hi = {(unsigned short)(pair >> 16)};
    return make_float2(to_float(lo), to_float(hi));
}
__device__ __forceinline__ float2 load_float2(const bf16* p, long long i) {
    unsigned pair = *reinterpret_cast<const unsigned*>(p + i);
    return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
}

__device__ __forceinline__ void store_float2(float* p, long long i, float2 v) {
    *reinterpret_cast<float2*>(p + i) = v;
}
__device__ __forceinline__ void store_float2(f16* p, long long i, float2 v) {
    *reinterpret_cast<unsigned*>(p + i) = pack_f16x2(v.x, v.y);
}
__device__ __forceinline__ void store_float2(bf16* p, long long i, float2 v) {
    *reinterpret_cast<unsigned*>(p + i) = pack_bf16x2(v.x, v.y);
}

// ---- reductions ----
// Every lane of a full warp must call these (mask 0xffffffff).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` is 32 floats of shared memory; the leading barrier makes back-to-back calls with the
// same scratch safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -__int_as_float(0x7f800000);
    return warp_max(v);
}

// ---- counter-based Gaussian noise (src/backend/cpu/rng.rs is the spec) ----
// Philox4x32-10 (Salmon et al., SC 2011): 10 rounds, the key bumped between rounds.
__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
    const unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += W0;
            key.y += W1;
        }
        const unsigned hi0 = __umulhi(M0, counter.x), lo0 = M0 * counter.x;
        const unsigned hi1 = __umulhi(M1, counter.z), lo1 = M1 * counter.z;
        counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    }
    return counter;
}

// A Philox output word as a uniform strictly inside (0, 1), in f64 (exact).
__device__ __forceinline__ double philox_uniform(unsigned r) { return ((double)r + 0.5) / 4294967296.0; }

// sin and cos in f64 for |x| < 2^19 (angles of the noise and the timestep embedding), written
// here rather than taken from NVRTC's math library: its f64 sin/cos carry a call to a large-argument
// reduction routine (a `.func`), which the PTX emulator does not run. Accuracy is that of a libm
// (about 1 ulp of f64), far below the one rounding to f32 the callers apply.
// Reduction: k = nearest integer to x / (pi/2), r = x - k pi/2 with pi/2 split in three parts whose
// products with k are exact (the first part has 33 significant bits), so |r| <= pi/4 accurately.
// Then Taylor series to degree 23 / 24 (truncation below 1e-25 on |r| <= pi/4), in Horner form.
__device__ __forceinline__ void sincos_f64(double x, double* sin_out, double* cos_out) {
    const double two_over_pi = 0.63661977236758134308;
    const double pio2_hi = 1.57079632673412561417e+00;  // first 33 bits of pi/2
    const double pio2_mid = 6.07710050650619224932e-11;  // next 33 bits
    const double pio2_lo = 2.02226624879595063154e-21;  // the rest
    const double k = rint(x * two_over_pi);
    const double r = ((x - k * pio2_hi) - k * pio2_mid) - k * pio2_lo;
    const double z = r * r;
    // sin r = r + r z (-1/3! + z (1/5! - z (1/7! - ...)))
    double ps = -1.0 / 25852016738884976640000.0;          // -1/23!
    ps = ps * z + 1.0 / 51090942171709440000.0;           // 1/21!
    ps = ps * z - 1.0 / 121645100408832000.0;             // -1/19!
    ps = ps * z + 1.0 / 355687428096000.0;                // 1/17!
    ps = ps * z - 1.0 / 1307674368000.0;                  // -1/15!
    ps = ps * z + 1.0 / 6227020800.0;                     // 1/13!
    ps = ps * z - 1.0 / 39916800.0;                       // -1/11!
    ps = ps * z + 1.0 / 362880.0;                         // 1/9!
    ps = ps * z - 1.0 / 5040.0;                           // -1/7!
    ps = ps * z + 1.0 / 120.0;                            // 1/5!
    ps = ps * z - 1.0 / 6.0;                              // -1/3!
    const double s = r + r * z * ps;
    // cos r = 1 + z (-1/2! + z (1/4! - ...))
    double pc = 1.0 / 620448401733239439360000.0;         // 1/24!
    pc = pc * z - 1.0 / 1124000727777607680000.0;         // -1/22!
    pc = pc * z + 1.0 / 2432902008176640000.0;            // 1/20!
    pc = pc * z - 1.0 / 6402373705728000.0;               // -1/18!
    pc = pc * z + 1.0 / 20922789888000.0;                 // 1/16!
    pc = pc * z - 1.0 / 87178291200.0;                    // -1/14!
    pc = pc * z + 1.0 / 479001600.0;                      // 1/12!
    pc = pc * z - 1.0 / 3628800.0;                        // -1/10!
    pc = pc * z + 1.0 / 40320.0;                          // 1/8!
    pc = pc * z - 1.0 / 720.0;                            // -1/6!
    pc = pc * z + 1.0 / 24.0;                             // 1/4!
    pc = pc * z - 0.5;                                    // -1/2!
    const double c = 1.0 + z * pc;
    const int quadrant = ((int)k) & 3;
    *sin_out = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
    *cos_out = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

// Box-Muller in f64, rounded to f32 once, as on the CPU: (u0, u1) -> (radius cos, radius sin).
__device__ __forceinline__ float2 box_muller(double u0, double u1) {
    const double pi = 3.141592653589793;
    const double radius = sqrt(-2.0 * log(u0));
    const double angle = 2.0 * pi * u1;
    double s, c;
    sincos_f64(angle, &s, &c);
    return make_float2((float)(radius * c), (float)(radius * s));
}

// The four standard normals of one Philox output block (n0, n1 from words 0,1; n2, n3 from 2,3).
__device__ __forceinline__ float4 gaussian4_from_bits(uint4 r) {
    const float2 a = box_muller(philox_uniform(r.x), philox_uniform(r.y));
    const float2 b = box_muller(philox_uniform(r.z), philox_uniform(r.w));
    return make_float4(a.x, a.y, b.x, b.y);
}

// 64-bit values split into Philox words: (low 32 bits, high 32 bits).
__device__ __forceinline__ uint2 split_u64(unsigned long long v) {
    return make_uint2((unsigned)v, (unsigned)(v >> 32));
}

// ---- indexing ----
// Grid-stride loop over [0, n): kernels stay correct for any grid size the host picks.
#define GRID_STRIDE_LOOP(i, n)                                                                     \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n);      \
         i += (long long)gridDim.x * blockDim.x)

// ---- tensor cores (sm_80): the inline PTX the mma kernels share ----
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices from shared memory, in mma's operand fragment layout (.trans: transposed).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// d += a b for one m16n8k16 tile: T (bf16 or f16) operands, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<bf16>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<f16>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed into one mma operand register (lo in the low half).
template <typename T>
__device__ __forceinline__ unsigned pack_x2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack_x2<bf16>(float lo, float hi) { return pack_bf16x2(lo, hi); }
template <>
__device__ __forceinline__ unsigned pack_x2<f16>(float lo, float hi) { return pack_f16x2(lo, hi); }

// Global -> shared, asynchronously (cp.async): `bytes` (at most the copy's size) are read and the
// rest of the copy written as zeros (0: padding past an edge; `src` must still be a valid address).
// The data is there for this thread after cp_async_wait, for the block after a barrier that
// follows it.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_4(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most PENDING of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// The attention backward's split (attention.cu and attention_mma.cu): where a split block writes
// its part of a gradient. The launcher passes the f32 workspace of the parts (dtype f32,
// accumulate 0), and part z is its z-th N x L x C slice (grid y = the batch);
// attention_backward_split_reduce (attention.cu) adds the parts.
__device__ __forceinline__ void* gradient_part(void* gradient, int positions, int channels) {
    return gridDim.z == 1 ? gradient
                          : static_cast<float*>(gradient) + (long long)blockIdx.z * gridDim.y * positions * channels;
}
