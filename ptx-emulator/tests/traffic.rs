//! Global-memory traffic counted per warp-level access in 32-byte sectors (`GlobalTraffic`), and
//! shared-memory wavefronts with bank conflicts (`SmWork`), on kernels whose counts are known by
//! hand.

mod common;
use common::*;

const SRC: &str = r#"
extern "C" __global__ void gather(float* out, const float* in, int stride) {
  __shared__ float staged[64];
  const int i = threadIdx.x;
  staged[i] = in[i * stride];
  __syncthreads();
  out[i] = staged[63 - i];
}
extern "C" __global__ void half_warp(float* out, const float* in) {
  const int i = threadIdx.x;
  if (i < 16) out[i] = in[i];
}
extern "C" __global__ void vectors(float4* out, const float4* in) {
  const int i = threadIdx.x;
  out[i] = in[i];
}
extern "C" __global__ void banks(float* out, int stride) {
  __shared__ float s[32 * 33];
  const int i = threadIdx.x;
  s[i * stride] = (float)i;
  __syncthreads();
  out[i] = s[i * stride] + s[0];
}
extern "C" __global__ void divide(int* out, int d) {
  const int i = threadIdx.x;
  out[i] = (i / d) + (i % (d + 1));
}
extern "C" __global__ void shared_vectors(float* out) {
  __shared__ float4 v[32];
  const int i = threadIdx.x;
  v[i] = make_float4(i, i + 1, i + 2, i + 3);
  __syncthreads();
  const float4 a = v[31 - i];
  out[i] = a.x + a.y + a.z + a.w;
}
extern "C" __global__ void uneven_loops(int* out, int n) {
  // Warp w of block b loops (2b + w + 1) * n times.
  const int trips = (2 * blockIdx.x + threadIdx.x / 32 + 1) * n;
  int acc = threadIdx.x;
#pragma unroll 1
  for (int k = 0; k < trips; ++k) acc = acc * 3 + k;
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
"#;

#[test]
fn sectors_per_request_follow_the_addresses() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(SRC) else { return };
    let input = dev.upload(&vec![1.0f32; 64 * 8]);
    let out = dev.zeros::<f32>(128);

    // Two warps of consecutive f32: 4 sectors a request, every byte used; the shared-memory
    // accesses between are not global traffic.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(1)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.load_bytes), (2, 8, 256));
    assert_eq!((t.store_requests, t.store_sectors, t.store_bytes), (2, 8, 256));
    assert_eq!(t.load_efficiency(), 1.0);

    // Lanes 32 bytes apart: a sector each, 4 of its 32 bytes used.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(8)]).global;
    assert_eq!((t.load_requests, t.load_sectors), (2, 64));
    assert_eq!(t.load_efficiency(), 0.125);

    // Two lanes a sector.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(2)]).global;
    assert_eq!(t.load_sectors, 16);

    // A diverged warp issues for its active lanes only.
    let t = dev.run(&m, "half_warp", 1, 32, &[p(out), p(input)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.store_requests, t.store_sectors), (1, 2, 1, 2));

    // 16-byte vectors: 512 bytes a warp, 16 sectors.
    let t = dev.run(&m, "vectors", 1, 32, &[p(out), p(input)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.load_bytes), (1, 16, 512));
}

#[test]
fn shared_wavefronts_count_bank_conflicts() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(SRC) else { return };
    let out = dev.zeros::<f32>(32);
    // One warp: a store and a load at i * stride, and a broadcast load of s[0] (one wavefront).
    // Stride 1 and 33 words: 32 distinct banks, one wavefront each; 2 words: two lanes a bank;
    // 32 words: every lane in bank 0, 32 wavefronts.
    for (stride, per_access) in [(1, 1), (2, 2), (32, 32), (33, 1)] {
        let stats = dev.run(&m, "banks", 1, 32, &[p(out), i(stride)]);
        let w = stats.sm;
        assert_eq!((w.shared_requests, w.shared_wavefronts), (3, 2 * per_access + 1), "stride {stride}");
        assert_eq!(w.mma, 0);
        assert!(
            w.warp_instructions * 32 >= stats.thread_instructions && w.warp_instructions <= stats.thread_instructions
        );
    }
    // A division and a remainder by run-time values: two of the warp's instructions.
    let stats = dev.run(&m, "divide", 1, 32, &[p(out), i(3)]);
    assert_eq!(stats.sm.integer_divisions, 2);
    // 16-byte accesses go a quarter-warp (128 bytes) a wavefront: 4 for the store, 4 for the load.
    let w = dev.run(&m, "shared_vectors", 1, 32, &[p(out)]).sm;
    assert_eq!((w.shared_requests, w.shared_wavefronts), (2, 8));
}

#[test]
fn longest_warp_is_the_deepest_warp_of_the_launch() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(SRC) else { return };
    let out = dev.zeros::<i32>(128);
    let depth = |grid: u32, n: i32| dev.run(&m, "uneven_loops", grid, 64, &[p(out), i(n)]);
    // The same code runs; only the deepest warp's trip count matters: grid 1's second warp loops
    // 2n times, grid 2's 4n, as does grid 1's with 2n.
    let (one, two, one_doubled) = (depth(1, 5), depth(2, 5), depth(1, 10));
    assert_eq!(two.longest_warp, one_doubled.longest_warp);
    // Each trip costs the same instructions: 10 more trips, 10 times a trip's cost more than 10 trips.
    let per_trip = (two.longest_warp - one.longest_warp) / 10;
    assert!(per_trip > 0 && two.longest_warp - one.longest_warp == 10 * per_trip);
    // Grid 1, n = 5: warps of 5 and 10 trips, the same code otherwise; the launch's total is both.
    assert_eq!(one.sm.warp_instructions, 2 * one.longest_warp - 5 * per_trip);
}
