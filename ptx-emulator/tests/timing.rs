//! The latency model (`ptx_emulator::timing`) on kernels whose time is known by hand: a chain of
//! dependent global loads costs a global latency each, independent ones overlap, and a barrier
//! holds every warp to the slowest.

mod common;
use common::*;
use ptx_emulator::timing::{BARRIER_LATENCY, GLOBAL_LATENCY};
use ptx_emulator::{launch_with, Dims, LaunchOptions, LaunchStats, Module};

const SRC: &str = r#"
// Each load's address is the previous load's value: n round trips to memory.
extern "C" __global__ void chase(int* out, const int* next, int n) {
  int i = 0;
#pragma unroll 1
  for (int k = 0; k < n; ++k) i = next[i];
  out[threadIdx.x] = i;
}
// n independent loads, eight issued before any is used.
extern "C" __global__ void gather(int* out, const int* data, int n) {
  int s = 0;
#pragma unroll 8
  for (int k = 0; k < n; ++k) s += data[k];
  out[threadIdx.x] = s;
}
// Warp 0 chases n pointers, warp 1 none; both then meet at a barrier and store.
extern "C" __global__ void chase_then_sync(int* out, const int* next, int n) {
  int i = 0;
  if (threadIdx.x < 32) {
#pragma unroll 1
    for (int k = 0; k < n; ++k) i = next[i];
  }
  __syncthreads();
  out[threadIdx.x] = i;
}
"#;

fn timed(dev: &Dev, m: &Module, name: &str, threads: u32, args: &[Vec<u8>]) -> LaunchStats {
    let f = m.kernel(name).unwrap();
    let dims = Dims { grid: [1, 1, 1], block: [threads, 1, 1], dynamic_shared: 0 };
    launch_with(m, f, &dims, args, &dev.mem, LaunchOptions { timing: true }).unwrap_or_else(|e| panic!("{e}"))
}

/// The module, a 64-link cycle of indices (each element the next one's) and a 64-int output.
fn chain(dev: &mut Dev) -> Option<(Module, u64, u64)> {
    let m = dev.load(SRC)?;
    let next: Vec<i32> = (0..64).map(|i| (i + 1) % 64).collect();
    Some((m, dev.upload(&next), dev.zeros::<i32>(64)))
}

#[test]
fn dependent_loads_cost_a_latency_each_and_independent_ones_overlap() {
    let mut dev = Dev::new();
    let Some((m, next, out)) = chain(&mut dev) else { return };
    let cycles = |name: &str, n: i32| timed(&dev, &m, name, 32, &[p(out), p(next), i(n)]).block_cycles_max;

    // 64 more round trips: 64 latencies more, and a few cycles of loop each.
    let chase = cycles("chase", 64) - cycles("chase", 0);
    assert!((64 * GLOBAL_LATENCY..64 * (GLOBAL_LATENCY + 20)).contains(&chase), "chase: {chase} cycles");
    // Eight loads in flight at a time: about an eighth of the time.
    let gather = cycles("gather", 64) - cycles("gather", 0);
    assert!((8 * GLOBAL_LATENCY..16 * GLOBAL_LATENCY).contains(&gather), "gather: {gather} cycles");

    // Untimed launches report no cycles.
    let f = m.kernel("chase").unwrap();
    let dims = Dims { grid: [1, 1, 1], block: [32, 1, 1], dynamic_shared: 0 };
    let plain = launch_with(&m, f, &dims, &[p(out), p(next), i(8)], &dev.mem, LaunchOptions::default()).unwrap();
    assert_eq!((plain.block_cycles_max, plain.block_cycles_sum), (0, 0));
}

#[test]
fn a_barrier_holds_every_warp_to_the_slowest() {
    let mut dev = Dev::new();
    let Some((m, next, out)) = chain(&mut dev) else { return };
    let run = |n: i32| timed(&dev, &m, "chase_then_sync", 64, &[p(out), p(next), i(n)]);
    let (short, long) = (run(0), run(16));
    // The block takes warp 0's chain and the barrier, however little warp 1 did.
    assert!(long.block_cycles_max >= short.block_cycles_max + 16 * GLOBAL_LATENCY + BARRIER_LATENCY);
    assert_eq!(long.block_cycles_sum, long.block_cycles_max);
}
