// groupnorm.cu: GroupNorm over G groups with SiLU optionally fused, on a two-source input (the
// UNet's ResnetBlock after a skip concat normalises concat(h, skip): the concat is read in place).
//
//   out[n, p, c] = silu?((x[n, p, c] - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c]),  g = c / (C/G)
//   x[n, p, c] = a[n, p, c] for c < Ca, b[n, p, c - Ca] otherwise
//
// Layout: NHWC (p the pixel index y*W + x); gamma, beta f32 (C); stats f32 (N x G x 2: mean, 1/std),
// saved for the backward; partials f32 scratch (N x G x 3 x chunks: each field's chunks contiguous,
// so the finalizing warp's lanes read neighbouring words; then the backward's N x G x 2 group
// means) and arrivals u32 (one counter per partial kernel's (sample, group slice), zero
// between launches), allocated once by the backend.
// Precision: any storage type for a, b and out (run-time codes); statistics in f32 per chunk, two
// passes (mean, then the sum of squared deviations), the chunks merged in f64 (the parallel form of
// Chan's formula), so a large mean does not cancel the variance; eps added in f64 as on the CPU.
// Two kernels, the fast and only version:
//   groupnorm_partial_stats  grid (chunks, G / groups_per_block, N): each block reduces a slice of
//                            pixels of a few neighbouring groups (32 bytes of each pixel where the
//                            groups allow: whole sectors), each thread a vector of channels at a
//                            time (one access), so batch 1 still fills the SMs: the host picks
//                            chunks, but never so many that a thread has no vector (465 blocks of
//                            one element a thread once spent cifar10's batch-1 forward 111 us of
//                            the emulator's latency model here, most of it reducing; 78 us now).
//                            A thread loads a batch of vectors (16 elements) before it adds any,
//                            so their loads are in flight together, and keeps its first batch in
//                            registers for the second pass; the host adds chunks until one batch
//                            holds a thread's whole share, as far as the scratch allows (at batch
//                            64 on an H200, one vector at a time, GroupNorm's kernels ran at 16% of
//                            the copy bandwidth forward and 28% backward: dddc2c9).
//                            The last block of a (sample, group slice) to finish (an arrival
//                            counter) then finalizes its groups: a warp per group, each lane taking
//                            every 32nd chunk, warp sums in a fixed order, into stats; a launch of
//                            one chunk (batch 2 and up, small images) stores the stats itself.
//                            (A kernel of its own finalized at first, one thread per group merging
//                            the chunks one load after another: at batch 1, 30 to 60 round trips
//                            to memory, the slowest launch of the forward in that model,
//                            examples/emulator_launch_depth.rs; then a warp per group; now no
//                            launch at all.) Where a slice is small (the launcher's
//                            groupnorm_fuses_apply: at most 4 load batches a thread), the block
//                            that stored the slice's stats then applies the whole slice
//                            (apply_slice), and groupnorm_apply does not run: its launch cost more
//                            than that walk (50 of cifar10's 51 GroupNorms; in the launch model a
//                            forward at batch 1 1.09 -> 1.00 ms, src/driver/launch_model.rs).
//   groupnorm_apply          one thread per `vec` channels of a pixel (one access each: every byte of
//                            a sector used): normalise, affine, SiLU, one rounding. A 2-D block (a
//                            pixel's channel vectors x pixels, grid y the samples): a thread's
//                            source, gamma, beta and statistics come once, and it loads up to 4
//                            pixels' vectors before it computes any.
//
// Backward (src/backend/cpu/norm.rs `backward` is the reference), on x read as the forward read it
// (two sources in place), stats from the forward:
//   xhat = (x - mean) rstd,  g = dout * silu'(xhat gamma + beta)? * gamma,
//   dx = rstd (g - mean_group(g) - xhat mean_group(g xhat)) + plus?
// stored split like x (channels c < Ca into dx_a, the rest into dx_b), each written or accumulated
// (its own `accumulate`): the UNet's skip concat and the residual or shortcut gradient `plus` cost
// no tensor and no pass of their own (a concat, a split and an add once did; ../src/model/unet.rs).
// What dx_a then holds may be copied to a second tensor as well (`a_copy`: the UNet's 16-bit copy of
// a finished gradient, which the next convolutions read as dout on their cp.async path).
// Two kernels, the same chunking, vectors and batches as the forward (batch 1 fills the device):
//   groupnorm_backward_partial   grid (chunks, G / groups_per_block, N): f32 sums of g and g xhat over
//                                a slice of pixels; the last block of a (sample, group slice) then
//                                sums the chunks in f64 (a warp per group; one chunk: the block),
//                                divided by the group size: the two means, packed after the
//                                chunks' sums; and where the slice is small, as the forward's, dx
//                                of the whole slice (backward_apply_slice);
//   groupnorm_backward_apply     one thread per `vec` channels of a pixel: dx (+)= ..., one rounding.
#include "common.cuh"

struct GroupNormShape {
    int batch, pixels, ca, cb, groups, chunks;
    int groups_per_block;  // of the partial kernels (see SliceWalk)
};

// The kernel body for each vector width (`vec` is uniform over the grid).
#define DISPATCH_VEC(vec, call) \
    switch (vec) {              \
        case 8: call(8); break; \
        case 4: call(4); break; \
        case 2: call(2); break; \
        default: call(1);       \
    }

// Every index is 32-bit (the launcher checks that the tensors hold fewer than 2^31 elements): a
// 64-bit division is a long software routine, and these kernels once spent most of their time in
// three of them per element.

// VEC channels from c of `pixel` (VEC divides Ca and Cb: a vector never straddles the two sources).
template <int VEC>
__device__ __forceinline__ void load_two_source(const void* a, int dt_a, const void* b, int dt_b, int pixel, int c,
                                                const GroupNormShape& s, float (&v)[VEC]) {
    if (c < s.ca)
        load_dyn_n<VEC>(a, dt_a, (long long)pixel * s.ca + c, v);
    else
        load_dyn_n<VEC>(b, dt_b, (long long)pixel * s.cb + (c - s.ca), v);
}

// The partial kernels' block (chunk, y, n) reduces the pixels of `chunk` for groups_per_block
// consecutive groups from y * groups_per_block: `width` = groups_per_block x (channels a group)
// contiguous channels of each pixel, in vectors of VEC channels (VEC divides a group's channels,
// so a vector never leaves its group; one access each). The launcher picks groups_per_block so
// that a pixel's slice fills a 32-byte sector where the groups allow (one group of 2 bf16 channels
// would use 4 bytes of each sector a warp loads), and makes the block (at most 256 threads) a
// multiple of the slice's `lanes` = width / VEC vectors: each thread then keeps one vector, so one
// group, and steps over pixels with no division. Where no multiple of width fits in 256 threads,
// VEC and groups_per_block are 1 and threads take elements in turn. Item i of a thread's walk is
// its i-th vector: the pixel and the channel (from the slice's first).
struct SliceWalk {
    int p0, first, step, j, width, end;
    bool strided;  // one column j a thread, pixels first + i step (else elements j + i step in turn)

    // Whether the walk has an item i (pixels below p1, or elements below the slice's count: `end`).
    __device__ __forceinline__ bool has(int i) const { return (strided ? first : j) + i * step < end; }

    __device__ __forceinline__ int2 item(int i) const {
        if (strided) return make_int2(first + i * step, j);
        const int e = j + i * step;  // (the rare shapes only: a division an item)
        return make_int2(p0 + e / width, e % width);
    }
};

template <int VEC>
__device__ __forceinline__ SliceWalk slice_walk(int p0, int p1, int width) {
    const int lanes = width / VEC;
    SliceWalk w;
    w.p0 = p0;
    w.width = width;
    w.strided = VEC > 1 || blockDim.x % lanes == 0;
    if (w.strided) {
        w.j = (threadIdx.x % lanes) * VEC;
        w.first = p0 + threadIdx.x / lanes;
        w.step = blockDim.x / lanes;
        w.end = p1;
    } else {
        const int count = (p1 - p0) * width;
        w.first = p0;
        w.j = threadIdx.x;
        w.step = blockDim.x;
        w.end = count;
    }
    return w;
}

// Vectors a thread loads before it uses any (16 elements, at most 4 vectors), whose loads are then
// in flight together. One vector at a time, waited out before the next (a loop of a load and its
// use), kept too few bytes in flight to cover DRAM's latency: on an H200 at batch 64 GroupNorm ran
// at 16% (forward) and 28% (backward) of the copy bandwidth (dddc2c9).
template <int VEC>
__device__ __forceinline__ constexpr int batch_vectors() {
    return VEC >= 4 ? 16 / VEC : 4;
}

// Where x's channel c lives: its source tensor, storage type, channels a pixel, and channel there.
struct ChannelSource {
    const void* p;
    int dt, row, c;
};

__device__ __forceinline__ ChannelSource channel_source(const void* a, int dt_a, const void* b, int dt_b, int c,
                                                        const GroupNormShape& s) {
    return c < s.ca ? ChannelSource{a, dt_a, s.ca, c} : ChannelSource{b, dt_b, s.cb, c - s.ca};
}

// Items [base, base + H) of the walk from x (two sources): those past the walk's end are zeros. In
// the strided walk a thread's channels, so their source, are the same at every pixel (`column`).
template <int VEC, int H>
__device__ __forceinline__ void load_slice_items(const void* a, int dt_a, const void* b, int dt_b, int first_pixel,
                                                 int c0, const GroupNormShape& s, const SliceWalk& w,
                                                 const ChannelSource& column, int base, float (&v)[H][VEC]) {
#pragma unroll
    for (int h = 0; h < H; ++h) {
        if (!w.has(base + h)) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[h][k] = 0.0f;
        } else if (w.strided) {
            const long long pixel = first_pixel + w.first + (base + h) * w.step;
            load_dyn_n<VEC>(column.p, column.dt, pixel * column.row + column.c, v[h]);
        } else {
            const int2 at = w.item(base + h);
            load_two_source<VEC>(a, dt_a, b, dt_b, first_pixel + at.x, c0 + at.y, s, v[h]);
        }
    }
}

// The group (of the block's groups_per_block) of this thread's vector.
template <int VEC>
__device__ __forceinline__ int slice_group(int width, int cpg, int gs) {
    return gs == 1 ? 0 : (int)(threadIdx.x % (width / VEC)) * VEC / cpg;
}

// totals[t] = the sum of `v` over the threads whose vector lies in group t of the block's slice,
// for every t < gs, in a fixed order (the same bits every run). `part` is blockDim values of shared
// memory; warp t adds group t's entries (gs > 1 only on the vector path: a group's threads are
// `cpg / VEC` neighbours in each row of `width / VEC`). V is float, or float2 for two sums at once
// (the backward's: one pass of barriers and shuffles instead of two, each component summed in the
// same order as alone).
__device__ __forceinline__ float2 operator+(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float2 warp_sum(float2 v) { return make_float2(warp_sum(v.x), warp_sum(v.y)); }

template <int VEC, typename V>
__device__ __forceinline__ void slice_group_sums(V v, V* part, V* totals, int width, int cpg, int gs, V zero) {
    __syncthreads();  // the previous call's readers are done with part and totals
    part[threadIdx.x] = v;
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int per_group = blockDim.x / gs, lanes = width / VEC, group_lanes = cpg / VEC;
    for (int t = threadIdx.x >> 5; t < gs; t += warps) {
        V sum = zero;
        for (int e = lane; e < per_group; e += 32) {
            // (One vector a group, the UNet's case, needs no division: ptxas makes ~20 instructions of one.)
            const int row = group_lanes == 1 ? e : e / group_lanes, col = group_lanes == 1 ? 0 : e % group_lanes;
            sum = sum + part[gs == 1 ? e : row * lanes + t * group_lanes + col];
        }
        sum = warp_sum(sum);
        if (lane == 0) totals[t] = sum;
    }
    __syncthreads();
}

// Chunk k's first field of (sample, group) ng's partial sums; field f is f * chunks further.
__device__ __forceinline__ float* partial_fields(const float* partials, int ng, int k, const GroupNormShape& s) {
    return const_cast<float*>(partials) + ng * 3 * s.chunks + k;
}

// The pixels [p0, p1) of `chunk`.
__device__ __forceinline__ int2 chunk_pixels(int chunk, const GroupNormShape& s) {
    const int per_chunk = (s.pixels + s.chunks - 1) / s.chunks;
    const int p0 = min(chunk * per_chunk, s.pixels);
    return make_int2(p0, min(p0 + per_chunk, s.pixels));
}

__device__ __forceinline__ double shfl_xor_double(double v, int offset) {
    const int hi = __shfl_xor_sync(0xffffffffu, __double2hiint(v), offset);
    const int lo = __shfl_xor_sync(0xffffffffu, __double2loint(v), offset);
    return __hiloint2double(hi, lo);
}

__device__ __forceinline__ double warp_sum_double(double v) {
    // The same bits in every lane: each round adds the same two partial sums (in either order).
    for (int offset = 16; offset > 0; offset >>= 1) v += shfl_xor_double(v, offset);
    return v;
}

// Whether this block is the last of the `expected` blocks counted in `arrival` to get here, after
// all of them wrote their partial sums. The fence before the count makes this block's sums visible
// device-wide before its arrival is (release); the fence after it orders the last block's reads of
// the others' sums after their arrivals (acquire), which it reads past L1 (__ldcg). The last block
// resets the counter, so it is zero again for the next launch (and the next replay of a graph).
__device__ __forceinline__ bool last_to_arrive(unsigned* arrival, int expected) {
    __shared__ int last;
    __threadfence();
    __syncthreads();  // every thread's sums are written and fenced
    if (threadIdx.x == 0) {
        last = atomicAdd(arrival, 1u) == (unsigned)expected - 1;
        if (last) atomicExch(arrival, 0u);
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// The partial kernels' counter: one per (sample, group slice) of their grid.
__device__ __forceinline__ unsigned* slice_arrival(unsigned* arrivals) {
    return arrivals + blockIdx.z * gridDim.y + blockIdx.y;
}

// Group ng's stats (mean, 1/std) from its (count, mean, m2), eps added in f64 as on the CPU.
__device__ __forceinline__ void store_group_stats(float* stats, int ng, double count, double mean, double m2,
                                                  float eps) {
    const double var = m2 / count;
    stats[ng * 2] = (float)mean;
    stats[ng * 2 + 1] = (float)(1.0 / sqrt(var + (double)eps));
}

// Group ng's stats from its chunks' (count, mean, m2), by one warp, in f64: the group's mean from
// the chunks' sums (count x mean), then M2 = the chunks' m2 + count (mean_k - mean)^2 summed (the
// parallel form of Chan's formula: one division, where merging the lanes pairwise took two a
// round). Each lane takes every 32nd chunk, keeping its first for the second sum; the warp sums
// have a fixed order (the same bits every run). One chunk gives exactly its own mean and m2.
__device__ __forceinline__ void finalize_group_stats(const float* partials, float* stats, int ng,
                                                     const GroupNormShape& s, float eps) {
    const int lane = threadIdx.x & 31;
    double count = 0.0, total = 0.0;
    float kept[3] = {0.0f, 0.0f, 0.0f};
    for (int k = lane; k < s.chunks; k += 32) {
        const float* p = partial_fields(partials, ng, k, s);
        const float n = __ldcg(p), mean_k = __ldcg(p + s.chunks);
        if (k == lane) {
            kept[0] = n;
            kept[1] = mean_k;
            kept[2] = __ldcg(p + 2 * s.chunks);
        }
        count += n;
        total += (double)n * mean_k;
    }
    count = warp_sum_double(count);
    total = warp_sum_double(total);
    const double mean = total / count;
    double m2 = 0.0;
    for (int k = lane; k < s.chunks; k += 32) {
        const float* p = partial_fields(partials, ng, k, s);
        const bool first = k == lane;
        const float n = first ? kept[0] : __ldcg(p), mean_k = first ? kept[1] : __ldcg(p + s.chunks);
        const double d = (double)mean_k - mean;
        m2 += (double)(first ? kept[2] : __ldcg(p + 2 * s.chunks)) + n * d * d;
    }
    m2 = warp_sum_double(m2);
    if (lane == 0) store_group_stats(stats, ng, count, mean, m2, eps);
}

// SiLU's sigmoid with the fast exponential and division (ex2.approx and rcp.approx: a few ulp, far
// inside the f32 tolerance): expf and an IEEE division made it most of the apply kernels'
// instructions per element, and these kernels run out of issue slots before DRAM at large batch
// (the latency model's issue floor, examples/emulator_launch_depth.rs). 1 + e overflowing to
// infinity gives 0, as the exact form does.
__device__ __forceinline__ float fast_sigmoid(float y) {
    return __fdividef(1.0f, 1.0f + __expf(-y));
}

// out = silu?((x - mean) rstd gamma + beta) of one vector, in place.
template <int VEC>
__device__ __forceinline__ void normalize_vector(float (&v)[VEC], float mean, float rstd, const float (&gs)[VEC],
                                                 const float (&bs)[VEC], int silu) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        v[k] = (v[k] - mean) * rstd * gs[k] + bs[k];
        if (silu) v[k] *= fast_sigmoid(v[k]);
    }
}

// The forward's apply where the partial kernel does it (`FusedApply`): out = silu?((x - mean) rstd
// gamma + beta), one rounding, as groupnorm_apply computes it.
struct FusedApply {
    const float* gamma;
    const float* beta;
    void* out;  // null: groupnorm_apply follows in a launch of its own
    int dt_out, silu;
};

// The block's whole slice (every pixel of sample n, channels c0.. of its groups), walked as the
// partial kernels walk a chunk, a batch of H vectors loaded before any is used; the groups' stats
// are stored (by this block, before a barrier).
// Inlined, unlike the backward's (backward_apply_slice): it grows the partial kernel by a third
// (14k to 18.8k PTX lines, ptxas 3 s more), and a call cost the launch model's forward at batch 1
// 17 us (1003 -> 1020).
template <int VEC, int H>
__device__ __forceinline__ void apply_slice(const void* a, int dt_a, const void* b, int dt_b, const float* stats,
                                            const FusedApply& f, int n, int c0, int width, const GroupNormShape& s) {
    const int channels = s.ca + s.cb, cpg = channels / s.groups, first_pixel = n * s.pixels;
    const SliceWalk w = slice_walk<VEC>(0, s.pixels, width);
    const ChannelSource column = channel_source(a, dt_a, b, dt_b, c0 + w.j, s);
    // A channel vector's terms: its group's stats, gamma and beta (in the strided walk the same at
    // every item, so loaded once).
    float mean, rstd, gs[VEC], bs[VEC];
    const auto terms = [&](int c) {
        const int ng = n * s.groups + c / cpg;
        mean = stats[ng * 2];
        rstd = stats[ng * 2 + 1];
        load_dyn_n<VEC>(f.gamma, DTYPE_F32, c, gs);
        load_dyn_n<VEC>(f.beta, DTYPE_F32, c, bs);
    };
    if (w.strided) terms(c0 + w.j);
    for (int base = 0; w.has(base); base += H) {
        float v[H][VEC];
        load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, base, v);
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
            const int2 at = w.item(base + h);
            const int c = c0 + at.y;
            if (!w.strided) terms(c);
            normalize_vector<VEC>(v[h], mean, rstd, gs, bs, f.silu);
            store_dyn_n<VEC>(f.out, f.dt_out, (long long)(first_pixel + at.x) * channels + c, v[h]);
        }
    }
}

// The partial stats of one vector width. A launch of one chunk a (sample, group slice) (batch 2 and
// up, or small images) has each group's whole sums in its block: it stores the stats itself, with
// no partials and no arrival (the same bits as the finalizing warp: one chunk's merge is exact).
// With `fused.out`, the block that stored a slice's stats then applies the slice (apply_slice).
template <int VEC>
__device__ __forceinline__ void partial_stats(const void* a, int dt_a, const void* b, int dt_b, float* partials,
                                              unsigned* arrivals, float* stats, float eps, const FusedApply& fused,
                                              const GroupNormShape& s, float* part, float* sums, float* m2s) {
    const int chunk = blockIdx.x, n = blockIdx.z, gs = s.groups_per_block, g0 = blockIdx.y * gs;
    const int cpg = (s.ca + s.cb) / s.groups, width = cpg * gs, c0 = g0 * cpg;
    const int2 range = chunk_pixels(chunk, s);
    const int count = (range.y - range.x) * cpg;  // elements of each group in the chunk
    const int first_pixel = n * s.pixels;

    // The thread's first batch of vectors stays in registers for the second pass (the launcher
    // sizes the chunks so that most threads have no more: the second pass then reads no memory).
    // The sums run over the items in order, each vector's channels in order; a batch's zeros past
    // the walk's end add nothing.
    constexpr int H = batch_vectors<VEC>();
    const SliceWalk w = slice_walk<VEC>(range.x, range.y, width);
    const ChannelSource column = channel_source(a, dt_a, b, dt_b, c0 + w.j, s);
    float kept[H][VEC];
    load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, 0, kept);
    float sum = 0.0f;
#pragma unroll
    for (int h = 0; h < H; ++h)
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += kept[h][k];
    for (int base = H; w.has(base); base += H) {
        float v[H][VEC];
        load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, base, v);
#pragma unroll
        for (int h = 0; h < H; ++h)
#pragma unroll
            for (int k = 0; k < VEC; ++k) sum += v[h][k];
    }
    slice_group_sums<VEC>(sum, part, sums, width, cpg, gs, 0.0f);
    const float mean = count > 0 ? sums[slice_group<VEC>(width, cpg, gs)] / (float)count : 0.0f;
    float m2 = 0.0f;
    const auto add_squares = [&](const float(&v)[H][VEC], int base) {
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float d = v[h][k] - mean;
                m2 += d * d;
            }
        }
    };
    add_squares(kept, 0);
    for (int base = H; w.has(base); base += H) {
        float v[H][VEC];
        load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, base, v);
        add_squares(v, base);
    }
    slice_group_sums<VEC>(m2, part, m2s, width, cpg, gs, 0.0f);
    for (int t = threadIdx.x; t < gs; t += blockDim.x) {
        const float chunk_mean = count > 0 ? sums[t] / (float)count : 0.0f, chunk_m2 = count > 0 ? m2s[t] : 0.0f;
        const int ng = n * s.groups + g0 + t;
        if (s.chunks == 1) {
            store_group_stats(stats, ng, (double)count, (double)chunk_mean, (double)chunk_m2, eps);
            continue;
        }
        float* out = partial_fields(partials, ng, chunk, s);
        out[0] = (float)count;
        out[s.chunks] = chunk_mean;
        out[2 * s.chunks] = chunk_m2;
    }
    if (s.chunks > 1) {
        if (!last_to_arrive(slice_arrival(arrivals), s.chunks)) return;
        for (int t = threadIdx.x >> 5; t < gs; t += blockDim.x >> 5)
            finalize_group_stats(partials, stats, n * s.groups + g0 + t, s, eps);
    }
    if (!fused.out) return;
    __syncthreads();  // the slice's stats are stored
    apply_slice<VEC, H>(a, dt_a, b, dt_b, stats, fused, n, c0, width, s);
}

// gamma, beta, out, dt_out, silu: the fused apply's (out null: none, groupnorm_apply follows).
extern "C" __global__ void __launch_bounds__(256)
    groupnorm_partial_stats(const void* a, int dt_a, const void* b, int dt_b, float* partials, unsigned* arrivals,
                            float* stats, float eps, const float* gamma, const float* beta, void* out, int dt_out,
                            int silu, int vec, GroupNormShape s) {
    __shared__ float part[256], sums[32], m2s[32];
    const FusedApply fused{gamma, beta, out, dt_out, silu};
#define PARTIAL(VEC) partial_stats<VEC>(a, dt_a, b, dt_b, partials, arrivals, stats, eps, fused, s, part, sums, m2s)
    DISPATCH_VEC(vec, PARTIAL)
#undef PARTIAL
}

// The element-wise kernels take VEC consecutive channels of one pixel per thread (VEC divides Ca,
// Cb and the group size, and the tensors are aligned to VEC elements: the launcher picks 8, 4, 2 or
// 1), so a vector never leaves its source tensor or its group, and it moves in one access
// (load_dyn_n): a warp's loads and stores use every byte of the sectors they touch. The block is 2-D:
// threadIdx.x walks a pixel's channel vectors (all of them where there are at most 256: the UNet's
// 16 to 96), threadIdx.y the block's rows of pixels, grid y the sample. So a thread's channels are
// the same at every pixel it visits: their source tensor, gamma, beta and their group's statistics
// come once, and no element pays a division (a 1-D grid-stride loop once divided three times a
// vector, most of these kernels' instructions).
//
// Pixels p, p + S, ... of the thread (S = gridDim.x x blockDim.y): a batch of U loaded before any is
// used (their loads in flight together), each a warp's contiguous access.
template <int VEC>
__device__ __forceinline__ constexpr int apply_batch() {
    return VEC == 1 ? 1 : VEC == 8 ? 2 : 4;
}

// The backward's batch: 2 (it loads x, dout and often `plus` for each: as many bytes in flight as
// the forward's 4, half the code).
template <int VEC>
__device__ __forceinline__ constexpr int backward_apply_batch() {
    return VEC == 1 ? 1 : 2;
}

// Calls f(u, pixel) for the batch's pixels u = 0.. (those below the sample's count), in order.
template <int U, typename F>
__device__ __forceinline__ void for_batch(int p0, int step, int pixels, F&& f) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int p = p0 + u * step;
        if (p < pixels) f(u, p);
    }
}

// Calls f(c0, first pixel, pixel step) for each of the thread's channel vectors (one where a
// pixel has at most 256).
template <int VEC, typename F>
__device__ __forceinline__ void for_each_column(const GroupNormShape& s, F&& f) {
    const int channels = s.ca + s.cb;
    for (int c0 = threadIdx.x * VEC; c0 < channels; c0 += blockDim.x * VEC)
        f(c0, blockIdx.x * blockDim.y + threadIdx.y, gridDim.x * blockDim.y);
}

template <int VEC>
__device__ __forceinline__ void groupnorm_apply_vec(const void* a, int dt_a, const void* b, int dt_b,
                                                    const float* stats, const float* gamma, const float* beta,
                                                    void* out, int dt_out, int silu, const GroupNormShape& s) {
    constexpr int U = apply_batch<VEC>();
    const int channels = s.ca + s.cb, n = blockIdx.y;
    const long long sample = (long long)n * s.pixels;
    for_each_column<VEC>(s, [&](int c0, int first, int step) {
        const ChannelSource x = channel_source(a, dt_a, b, dt_b, c0, s);
        const int ng = n * s.groups + c0 / (channels / s.groups);
        const float mean = stats[ng * 2], rstd = stats[ng * 2 + 1];
        float gs[VEC], bs[VEC];
        load_dyn_n<VEC>(gamma, DTYPE_F32, c0, gs);
        load_dyn_n<VEC>(beta, DTYPE_F32, c0, bs);
        for (int p0 = first; p0 < s.pixels; p0 += U * step) {
            float y[U][VEC];
            for_batch<U>(p0, step, s.pixels, [&](int u, int p) {
                load_dyn_n<VEC>(x.p, x.dt, (sample + p) * x.row + x.c, y[u]);
            });
            for_batch<U>(p0, step, s.pixels, [&](int u, int p) {
                normalize_vector<VEC>(y[u], mean, rstd, gs, bs, silu);
                store_dyn_n<VEC>(out, dt_out, (sample + p) * channels + c0, y[u]);
            });
        }
    });
}

extern "C" __global__ void groupnorm_apply(const void* a, int dt_a, const void* b, int dt_b, const float* stats,
                                           const float* gamma, const float* beta, void* out, int dt_out, int silu,
                                           int vec, GroupNormShape s) {
#define APPLY(VEC) groupnorm_apply_vec<VEC>(a, dt_a, b, dt_b, stats, gamma, beta, out, dt_out, silu, s)
    DISPATCH_VEC(vec, APPLY)
#undef APPLY
}

// ---- backward ----

// (xhat, g) of an element of channel c with input x and output gradient dy: the normalised input
// recomputed from x and the saved stats, and the gradient at xhat (through SiLU's derivative when
// fused).
__device__ __forceinline__ float2 groupnorm_grad_at(float x, float dy, float mean, float rstd, float gamma,
                                                    float beta, int silu) {
    const float xhat = (x - mean) * rstd;
    if (silu) {
        const float y = xhat * gamma + beta;
        const float sig = fast_sigmoid(y);
        dy *= sig * (1.0f + y * (1.0f - sig));
    }
    return make_float2(xhat, dy * gamma);
}

// The backward's two group means (of g and of g xhat), per (n, g), packed after the chunks' sums so
// that neighbouring threads of the apply kernel read neighbouring words (the backend sizes the
// scratch for both).
__device__ __forceinline__ float* group_means(const float* partials, const GroupNormShape& s) {
    return const_cast<float*>(partials) + s.batch * s.groups * s.chunks * 3;
}

// Group ng's two means (of g and of g xhat) from its sums over the whole group.
__device__ __forceinline__ void store_group_means(float* partials, int ng, double sum_g, double sum_g_xhat,
                                                  const GroupNormShape& s) {
    const double len = (double)s.pixels * ((s.ca + s.cb) / s.groups);
    float* means = group_means(partials, s) + ng * 2;
    means[0] = (float)(sum_g / len);
    means[1] = (float)(sum_g_xhat / len);
}

// Group ng's two means from its chunks' sums, by one warp (as finalize_group_stats).
__device__ __forceinline__ void finalize_group_means(float* partials, int ng, const GroupNormShape& s) {
    const int lane = threadIdx.x & 31;
    double sum_g = 0.0, sum_g_xhat = 0.0;
    for (int k = lane; k < s.chunks; k += 32) {
        const float* p = partial_fields(partials, ng, k, s);
        sum_g += __ldcg(p);
        sum_g_xhat += __ldcg(p + s.chunks);
    }
    sum_g = warp_sum_double(sum_g);
    sum_g_xhat = warp_sum_double(sum_g_xhat);
    if (lane == 0) store_group_means(partials, ng, sum_g, sum_g_xhat, s);
}

// Where the apply kernel stores dx: x's channels c < Ca into `a`, the rest into `b` (each its own
// storage type and `accumulate`), with `plus` (whole-input shape; null: none) added first, and what
// `a` then holds copied into `a_copy` (its own storage type; null: none).
struct GradientSplit {
    void* a;
    void* b;
    const void* plus;
    void* a_copy;
    int dt_a, dt_b, dt_plus, dt_a_copy;
    int accumulate_a, accumulate_b;
};

// One vector's dx: channels c.. of a pixel with input xs, output gradient g (dx replaces it) and
// `plus` there (more; used where dx.plus is set), the group's stats and means, the channels' gamma
// and beta; `at` the vector's index in x's source tensor (dx is split as x is: in_a, c < Ca).
template <int VEC>
__device__ __forceinline__ void store_dx_vector(float (&g)[VEC], const float (&xs)[VEC], const float (&more)[VEC],
                                                float mean, float rstd, float mean_g, float mean_g_xhat,
                                                const float (&gs)[VEC], const float (&bs)[VEC], int silu,
                                                const GradientSplit& dx, bool in_a, long long at) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const float2 t = groupnorm_grad_at(xs[k], g[k], mean, rstd, gs[k], bs[k], silu);
        g[k] = rstd * (t.y - mean_g - t.x * mean_g_xhat);
        if (dx.plus) g[k] += more[k];
    }
    if (in_a) {
        add_held_n<VEC>(dx.a, dx.dt_a, at, g, dx.accumulate_a);  // (store_grad_n, keeping the sum)
        store_dyn_n<VEC>(dx.a, dx.dt_a, at, g);
        if (dx.a_copy) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[k] = as_stored(dx.dt_a, g[k]);
            store_dyn_n<VEC>(dx.a_copy, dx.dt_a_copy, at, g);
        }
    } else {
        store_grad_n<VEC>(dx.b, dx.dt_b, at, g, dx.accumulate_b);
    }
}

// The backward's apply where its partial kernel does it (as the forward's apply_slice): the block's
// whole slice, once the slice's group means are stored (by this block, before a barrier).
// Not inlined: inlined into groupnorm_backward_partial, the walk grew a copy for each combination
// of its runtime conditions, 64k PTX lines for the kernel (8k before the fusion), and ptxas took
// 200 s on this file for each architecture (sm_80, sm_90; NVRTC 13.0), the most of a cold start;
// now 17 s. The call, once a block, costs the launch model's input VJP at batch 1 35 us (1045 ->
// 1080). The structs come by value: by reference they went through an 88-byte stack frame in
// local memory.
template <int VEC, int H>
__device__ __noinline__ void backward_apply_slice(const void* a, int dt_a, const void* b, int dt_b,
                                                  const void* dout, int dt_dout, const float* stats,
                                                  const float* gamma, const float* beta, int silu,
                                                  const float* partials, GradientSplit dx, int n, int c0, int width,
                                                  GroupNormShape s) {
    const int channels = s.ca + s.cb, cpg = channels / s.groups, first_pixel = n * s.pixels;
    const SliceWalk w = slice_walk<VEC>(0, s.pixels, width);
    const ChannelSource column = channel_source(a, dt_a, b, dt_b, c0 + w.j, s);
    float mean, rstd, mean_g, mean_g_xhat, gs[VEC], bs[VEC];
    const auto terms = [&](int c) {
        const int ng = n * s.groups + c / cpg;
        mean = stats[ng * 2];
        rstd = stats[ng * 2 + 1];
        const float* means = group_means(partials, s) + ng * 2;
        mean_g = means[0];
        mean_g_xhat = means[1];
        load_dyn_n<VEC>(gamma, DTYPE_F32, c, gs);
        load_dyn_n<VEC>(beta, DTYPE_F32, c, bs);
    };
    if (w.strided) terms(c0 + w.j);
    for (int base = 0; w.has(base); base += H) {
        // The batch's x, dout and `plus` first, then each vector's dx.
        float xs[H][VEC], grad[H][VEC], more[H][VEC];
        load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, base, xs);
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
            const int2 at = w.item(base + h);
            const long long i = (long long)(first_pixel + at.x) * channels + c0 + at.y;
            load_dyn_n<VEC>(dout, dt_dout, i, grad[h]);
            if (dx.plus) load_dyn_n<VEC>(dx.plus, dx.dt_plus, i, more[h]);
        }
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
            const int2 at = w.item(base + h);
            const int c = c0 + at.y;
            if (!w.strided) terms(c);
            const ChannelSource x = w.strided ? column : channel_source(a, dt_a, b, dt_b, c, s);
            store_dx_vector<VEC>(grad[h], xs[h], more[h], mean, rstd, mean_g, mean_g_xhat, gs, bs, silu, dx, c < s.ca,
                                 (long long)(first_pixel + at.x) * x.row + x.c);
        }
    }
}

// The backward's partial sums of one vector width; one chunk a (sample, group slice) stores the
// means itself, as the forward's stats (the same bits as the finalizing warp).
// With `fused`, the block that stored a slice's means then applies the slice (backward_apply_slice).
template <int VEC>
__device__ __forceinline__ void backward_partial(const void* a, int dt_a, const void* b, int dt_b, const void* dout,
                                                 int dt_dout, const float* stats, const float* gamma,
                                                 const float* beta, int silu, float* partials, unsigned* arrivals,
                                                 const GradientSplit& dx, int fused, const GroupNormShape& s,
                                                 float2* part, float2* sums) {
    const int chunk = blockIdx.x, n = blockIdx.z, gs = s.groups_per_block, g0 = blockIdx.y * gs;
    const int channels = s.ca + s.cb, cpg = channels / s.groups, width = cpg * gs, c0 = g0 * cpg;
    const int2 range = chunk_pixels(chunk, s);
    const int first_pixel = n * s.pixels;
    const float* st = stats + (n * s.groups + g0 + slice_group<VEC>(width, cpg, gs)) * 2;
    const float mean = st[0], rstd = st[1];

    // A batch of vectors' x and dout loaded before any is used (as the forward's partial sums). In
    // the strided walk a thread's channels are the same at every pixel: gamma and beta once.
    constexpr int H = batch_vectors<VEC>();
    const SliceWalk w = slice_walk<VEC>(range.x, range.y, width);
    const ChannelSource column = channel_source(a, dt_a, b, dt_b, c0 + w.j, s);
    float gms[VEC], bts[VEC];
    if (w.strided) {
        load_dyn_n<VEC>(gamma, DTYPE_F32, c0 + w.j, gms);
        load_dyn_n<VEC>(beta, DTYPE_F32, c0 + w.j, bts);
    }
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int base = 0; w.has(base); base += H) {
        float xs[H][VEC], dys[H][VEC];
        load_slice_items<VEC, H>(a, dt_a, b, dt_b, first_pixel, c0, s, w, column, base, xs);
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
            const int2 at = w.item(base + h);
            load_dyn_n<VEC>(dout, dt_dout, (long long)(first_pixel + at.x) * channels + c0 + at.y, dys[h]);
        }
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (!w.has(base + h)) break;
            if (!w.strided) {
                const int c = c0 + w.item(base + h).y;
                load_dyn_n<VEC>(gamma, DTYPE_F32, c, gms);
                load_dyn_n<VEC>(beta, DTYPE_F32, c, bts);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float2 g = groupnorm_grad_at(xs[h][k], dys[h][k], mean, rstd, gms[k], bts[k], silu);
                sum_g += g.y;
                sum_g_xhat += g.y * g.x;
            }
        }
    }
    // (x: the sum of g, y: of g xhat.)
    slice_group_sums<VEC>(make_float2(sum_g, sum_g_xhat), part, sums, width, cpg, gs, make_float2(0.0f, 0.0f));
    for (int t = threadIdx.x; t < gs; t += blockDim.x) {
        const int ng = n * s.groups + g0 + t;
        if (s.chunks == 1) {
            store_group_means(partials, ng, sums[t].x, sums[t].y, s);
            continue;
        }
        float* out = partial_fields(partials, ng, chunk, s);
        out[0] = sums[t].x;
        out[s.chunks] = sums[t].y;
    }
    if (s.chunks > 1) {
        if (!last_to_arrive(slice_arrival(arrivals), s.chunks)) return;
        for (int t = threadIdx.x >> 5; t < gs; t += blockDim.x >> 5)
            finalize_group_means(partials, n * s.groups + g0 + t, s);
    }
    if (!fused) return;
    __syncthreads();  // the slice's means are stored
    backward_apply_slice<VEC, H>(a, dt_a, b, dt_b, dout, dt_dout, stats, gamma, beta, silu, partials, dx, n, c0, width,
                                 s);
}

// dx, fused: where the fused apply stores dx, and whether it runs (0: groupnorm_backward_apply follows).
extern "C" __global__ void __launch_bounds__(256) groupnorm_backward_partial(
    const void* a, int dt_a, const void* b, int dt_b, const void* dout, int dt_dout, const float* stats,
    const float* gamma, const float* beta, int silu, float* partials, unsigned* arrivals, GradientSplit dx, int fused,
    int vec, GroupNormShape s) {
    __shared__ float2 part[256], sums[32];
#define PARTIAL(VEC)                                                                                           \
    backward_partial<VEC>(a, dt_a, b, dt_b, dout, dt_dout, stats, gamma, beta, silu, partials, arrivals, dx, fused, s, \
                          part, sums)
    DISPATCH_VEC(vec, PARTIAL)
#undef PARTIAL
}

template <int VEC>
__device__ __forceinline__ void groupnorm_backward_apply_vec(const void* a, int dt_a, const void* b, int dt_b,
                                                             const void* dout, int dt_dout, const float* stats,
                                                             const float* gamma, const float* beta, int silu,
                                                             const float* partials, const GradientSplit& dx,
                                                             const GroupNormShape& s) {
    constexpr int U = backward_apply_batch<VEC>();
    const int channels = s.ca + s.cb, n = blockIdx.y;
    const long long sample = (long long)n * s.pixels;
    for_each_column<VEC>(s, [&](int c0, int first, int step) {
        // (VEC divides Ca: a vector lies in one source, and its gradient goes to that source's.)
        const ChannelSource x = channel_source(a, dt_a, b, dt_b, c0, s);
        const bool in_a = c0 < s.ca;
        const int ng = n * s.groups + c0 / (channels / s.groups);
        const float mean = stats[ng * 2], rstd = stats[ng * 2 + 1];
        const float* means = group_means(partials, s) + ng * 2;
        const float mean_g = means[0], mean_g_xhat = means[1];
        float gs[VEC], bs[VEC];
        load_dyn_n<VEC>(gamma, DTYPE_F32, c0, gs);
        load_dyn_n<VEC>(beta, DTYPE_F32, c0, bs);
        for (int p0 = first; p0 < s.pixels; p0 += U * step) {
            // The batch's x, dout and `plus` first (as the forward's apply), then each vector's dx.
            float xs[U][VEC], grad[U][VEC], more[U][VEC];
            for_batch<U>(p0, step, s.pixels, [&](int u, int p) {
                const long long at = (sample + p) * channels + c0;
                load_dyn_n<VEC>(x.p, x.dt, (sample + p) * x.row + x.c, xs[u]);
                load_dyn_n<VEC>(dout, dt_dout, at, grad[u]);
                if (dx.plus) load_dyn_n<VEC>(dx.plus, dx.dt_plus, at, more[u]);
            });
            for_batch<U>(p0, step, s.pixels, [&](int u, int p) {
                store_dx_vector<VEC>(grad[u], xs[u], more[u], mean, rstd, mean_g, mean_g_xhat, gs, bs, silu, dx, in_a,
                                     (sample + p) * x.row + x.c);
            });
        }
    });
}

extern "C" __global__ void groupnorm_backward_apply(const void* a, int dt_a, const void* b, int dt_b, const void* dout,
                                                    int dt_dout, const float* stats, const float* gamma,
                                                    const float* beta, int silu, const float* partials,
                                                    GradientSplit dx, int vec, GroupNormShape s) {
#define APPLY(VEC) \
    groupnorm_backward_apply_vec<VEC>(a, dt_a, b, dt_b, dout, dt_dout, stats, gamma, beta, silu, partials, dx, s)
    DISPATCH_VEC(vec, APPLY)
#undef APPLY
}
