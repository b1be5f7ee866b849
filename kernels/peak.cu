// Ceilings of the benchmark's roofline (ENGINE.md, performance protocol): the tensor cores'
// mma.sync throughput, measured on the GPU at hand rather than taken from a data sheet.
//
// Every warp runs CHAINS independent m16n8k16 bf16 products per iteration on operands held in
// registers (no memory traffic inside the loop), so the loop is bound by the tensor cores alone.
// The sums go to `sink` so the compiler cannot drop the work. One mma is 2 * 16 * 8 * 16 = 4096
// FLOPs; a launch does blocks * (threads / 32) * iterations * CHAINS of them. This is the ceiling
// of the project's mma.sync kernels; Hopper's wgmma reaches further (ENGINE.md).
#include "common.cuh"

#define PEAK_CHAINS 8

extern "C" __global__ void mma_peak_bf16(float* sink, int iterations) {
    const unsigned lane = threadIdx.x & 31;
    // Small, lane-dependent operands: finite sums whatever the iteration count.
    unsigned a[4];
    for (int i = 0; i < 4; ++i) a[i] = pack_x2<bf16>(1e-3f * (float)(lane + i), -1e-3f * (float)i);
    const unsigned b0 = pack_x2<bf16>(1e-3f, 2e-3f * (float)lane);
    const unsigned b1 = pack_x2<bf16>(-1e-3f * (float)lane, 1e-3f);
    float acc[PEAK_CHAINS][4];
    for (int c = 0; c < PEAK_CHAINS; ++c)
        for (int i = 0; i < 4; ++i) acc[c][i] = 0.0f;
    for (int it = 0; it < iterations; ++it) {
#pragma unroll
        for (int c = 0; c < PEAK_CHAINS; ++c) mma_m16n8k16<bf16>(acc[c], a, b0, b1);
    }
    float total = 0.0f;
    for (int c = 0; c < PEAK_CHAINS; ++c) total += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
    sink[(long long)blockIdx.x * blockDim.x + threadIdx.x] = total;
}
