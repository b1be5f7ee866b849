//! Every check, proven both ways: a kernel with exactly that bug must be reported (right kind,
//! right PTX line) and its fixed twin must run clean.

mod common;
use common::*;
use ptx_emulator::ReportKind;

/// Loads `src` (a buggy kernel `bug` and its fixed twin `fixed`, same parameters).
fn pair(src: &str) -> Option<(Dev, ptx_emulator::Module, String)> {
    let mut dev = Dev::new();
    let (m, ptx) = dev.load_with_ptx(src)?;
    Some((dev, m, ptx))
}

#[test]
fn global_out_of_bounds() {
    let src = r#"
extern "C" __global__ void bug(float* y, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; y[i] = 2.0f; }
extern "C" __global__ void fixed(float* y, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = 2.0f; }"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(100);
    let r = dev.report(&m, "bug", 4, 32, &[p(y), i(100)]);
    assert_eq!(r.kind, ReportKind::GlobalOutOfBounds, "{r}");
    assert_eq!(r.line, lines_in(&ptx, "bug", "st.global")[0]);
    assert_eq!((r.block, r.thread), ([3, 0, 0], [4, 0, 0]), "{r}");
    assert!(r.detail.contains("0 bytes past the end of allocation #0"), "{r}");
    dev.run(&m, "fixed", 4, 32, &[p(y), i(100)]);
    // Use after free is out of bounds too.
    dev.mem.free(y).unwrap();
    let r = dev.report(&m, "fixed", 4, 32, &[p(y), i(100)]);
    assert!(r.kind == ReportKind::GlobalOutOfBounds && r.detail.contains("freed"), "{r}");
}

#[test]
fn shared_out_of_bounds() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ float s[32];
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x % 32];
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s[32];
  if (threadIdx.x < 32) s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x % 32];
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::SharedOutOfBounds, "{r}");
    assert_eq!(r.line, lines_with(&ptx, "st.shared.f32")[0]);
    assert_eq!(r.thread, [32, 0, 0]);
    assert!(r.detail.contains("past the end of the block's 128 bytes"), "{r}");
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
}

#[test]
fn local_out_of_bounds() {
    let src = r#"
extern "C" __global__ void bug(float* y, int k) {
  float a[8];
  for (int j = 0; j < 8; j++) a[j] = y[j];
  y[threadIdx.x] = a[(threadIdx.x * k) & 15];
}
extern "C" __global__ void fixed(float* y, int k) {
  float a[8];
  for (int j = 0; j < 8; j++) a[j] = y[j];
  y[threadIdx.x] = a[(threadIdx.x * k) & 7];
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(32);
    let r = dev.report(&m, "bug", 1, 32, &[p(y), i(1)]);
    assert_eq!(r.kind, ReportKind::LocalOutOfBounds, "{r}");
    assert!(lines_with(&ptx, "ld.local").contains(&r.line), "{r}");
    assert_eq!(r.thread, [8, 0, 0]);
    dev.run(&m, "fixed", 1, 32, &[p(y), i(1)]);
}

#[test]
fn misaligned_vector_access() {
    let src = r#"
extern "C" __global__ void bug(float* y, int off) {
  float4 v = *reinterpret_cast<float4*>(y + off + 4 * threadIdx.x);
  y[64 + threadIdx.x] = v.x + v.w;
}
extern "C" __global__ void fixed(float* y, int off) {
  const float* p = y + off + 4 * threadIdx.x;
  y[64 + threadIdx.x] = p[0] + p[3];
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(128);
    let r = dev.report(&m, "bug", 1, 8, &[p(y), i(1)]);
    assert_eq!(r.kind, ReportKind::Misaligned, "{r}");
    assert_eq!(r.line, lines_with(&ptx, "ld.global.v4.f32")[0]);
    assert!(r.detail.contains("16-byte read"), "{r}");
    dev.run(&m, "fixed", 1, 8, &[p(y), i(1)]);
    // The aligned offset is fine for the vector form too.
    dev.run(&m, "bug", 1, 8, &[p(y), i(4)]);
}

#[test]
fn uninitialized_global_read() {
    let src = r#"
extern "C" __global__ void copy(float* y, const float* x) { y[threadIdx.x] = x[threadIdx.x] + 1.0f; }"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let x = dev.mem.alloc(32 * 4);
    let y = dev.mem.alloc(32 * 4);
    let r = dev.report(&m, "copy", 1, 32, &[p(y), p(x)]);
    assert_eq!(r.kind, ReportKind::UninitializedRead, "{r}");
    assert_eq!(r.line, lines_with(&ptx, "ld.global.f32")[0]);
    // Written by the host, by a device copy, or by a kernel: clean.
    dev.mem.write(x, &[0u8; 64]).unwrap();
    let r = dev.report(&m, "copy", 1, 32, &[p(y), p(x)]);
    assert_eq!(r.thread, [16, 0, 0], "bytes 64.. are still unwritten: {r}");
    let z = dev.zeros::<f32>(32);
    dev.mem.copy(x, z, 128).unwrap();
    dev.run(&m, "copy", 1, 32, &[p(y), p(x)]);
    dev.run(&m, "copy", 1, 32, &[p(x), p(y)]);
}

#[test]
fn shared_race_write_write() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ float s;
  s = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s;
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s;
  if (threadIdx.x == 0) s = 7.0f;
  __syncthreads();
  y[threadIdx.x] = s;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    let st = lines_with(&ptx, "st.shared.f32")[0];
    assert_eq!(r.line, st);
    assert!(r.detail.contains(&format!("write by thread (0,0,0) at PTX line {st}")), "{r}");
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
}

#[test]
fn shared_race_read_write_without_barrier() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x;
  y[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    // Lane 0 reads s[1], written by lane 1 of its own warp with no __syncwarp/barrier between.
    assert_eq!(r.line, lines_in(&ptx, "bug", "ld.shared.f32")[0], "{r}");
    assert!(
        r.detail
            .contains(&format!("write by thread (1,0,0) at PTX line {}", lines_in(&ptx, "bug", "st.shared.f32")[0])),
        "{r}"
    );
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
    let out: Vec<f32> = dev.download(y, 64);
    assert!((0..64).all(|t| out[t] == ((t + 1) % 64) as f32));
}

#[test]
fn warp_synchronous_code_needs_syncwarp() {
    let src = r#"
extern "C" __global__ void bug(const float* x, float* y) {
  __shared__ float s[32];
  int t = threadIdx.x;
  s[t] = x[t];
  __syncwarp();
  for (int o = 16; o > 0; o >>= 1) { if (t < o) s[t] += s[t + o]; }
  if (t == 0) y[0] = s[0];
}
extern "C" __global__ void fixed(const float* x, float* y) {
  __shared__ float s[32];
  int t = threadIdx.x;
  s[t] = x[t];
  __syncwarp();
  for (int o = 16; o > 0; o >>= 1) { if (t < o) s[t] += s[t + o]; __syncwarp(); }
  if (t == 0) y[0] = s[0];
}"#;
    let Some((mut dev, m, _ptx)) = pair(src) else { return };
    let xs: Vec<f32> = (0..32).map(|k| k as f32).collect();
    let x = dev.upload(&xs);
    let y = dev.zeros::<f32>(1);
    let r = dev.report(&m, "bug", 1, 32, &[p(x), p(y)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    dev.run(&m, "fixed", 1, 32, &[p(x), p(y)]);
    assert_eq!(dev.download::<f32>(y, 1)[0], 496.0);
}

#[test]
fn atomics_never_race_with_atomics_but_do_with_plain_reads() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1);
  y[threadIdx.x] = count;   // plain read while others still add
}
extern "C" __global__ void fixed(float* y) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1);
  __syncthreads();
  y[threadIdx.x] = count;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    let atom = lines_with(&ptx, "atom.shared")[0];
    let ld = lines_with(&ptx, "ld.shared")[0];
    assert!(r.line == atom || r.line == ld, "{r}");
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
    assert!(dev.download::<f32>(y, 64).iter().all(|&v| v == 64.0));
}

#[test]
fn shuffles_do_not_order_memory() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ float s[32];
  s[threadIdx.x] = threadIdx.x;
  float v = __shfl_xor_sync(0xffffffff, 1.0f, 1);
  y[threadIdx.x] = s[threadIdx.x ^ 1] * v;
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s[32];
  s[threadIdx.x] = threadIdx.x;
  float v = __shfl_xor_sync(0xffffffff, 1.0f, 1);
  __syncwarp();
  y[threadIdx.x] = s[threadIdx.x ^ 1] * v;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(32);
    let r = dev.report(&m, "bug", 1, 32, &[p(y)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    assert_eq!(r.line, lines_with(&ptx, "ld.shared.f32")[0]);
    dev.run(&m, "fixed", 1, 32, &[p(y)]);
}

#[test]
fn barrier_divergence() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  if (threadIdx.x < 16) { __syncthreads(); y[threadIdx.x] = s[63 - threadIdx.x]; }
  __syncthreads();
  y[threadIdx.x] += 1.0f;
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x < 16) { y[threadIdx.x] = s[63 - threadIdx.x]; }
  __syncthreads();
  y[threadIdx.x] += 1.0f;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::BarrierDivergence, "{r}");
    let bars = lines_in(&ptx, "bug", "bar.sync");
    assert_eq!(bars.len(), 2);
    assert!(bars.contains(&r.line) && r.detail.contains(&format!("PTX line {}", bars[0])), "{r}");
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
}

#[test]
fn deadlock_is_reported_not_hung() {
    // Half a warp waits in a full-warp shuffle while the other half waits at a barrier.
    let src = r#"
extern "C" __global__ void bug(float* y) {
  float v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_sync(0xffffffff, v, 0);
  __syncthreads();
  y[threadIdx.x] = v;
}
extern "C" __global__ void fixed(float* y) {
  float v = threadIdx.x;
  float w = __shfl_sync(0xffffffff, v, 0);
  if ((threadIdx.x & 31) < 16) v = w;
  __syncthreads();
  y[threadIdx.x] = v;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "bug", 1, 64, &[p(y)]);
    assert_eq!(r.kind, ReportKind::Deadlock, "{r}");
    let shfl = lines_with(&ptx, "shfl.sync")[0];
    assert!(r.detail.contains(&format!("warp collective at line {shfl}")), "{r}");
    assert!(r.detail.contains("32 threads (first (16,0,0)) wait at barrier 0"), "{r}");
    dev.run(&m, "fixed", 1, 64, &[p(y)]);
}

#[test]
fn collective_naming_exited_lanes() {
    let src = r#"
extern "C" __global__ void bug(float* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_down_sync(0xffffffff, (float)threadIdx.x, 1);
}
extern "C" __global__ void fixed(float* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_down_sync(0x0000ffff, (float)threadIdx.x, 1);
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(32);
    let r = dev.report(&m, "bug", 1, 32, &[p(y)]);
    assert_eq!(r.kind, ReportKind::InvalidCollective, "{r}");
    assert_eq!(r.line, lines_with(&ptx, "shfl.sync")[0]);
    // Lane 15 of the fixed twin reads lane 16, outside the mask: also undefined on hardware.
    let r = dev.report(&m, "fixed", 1, 32, &[p(y)]);
    assert!(r.kind == ReportKind::InvalidCollective && r.detail.contains("lane 16"), "{r}");
}

/// The last-block reduction: each block writes its partial sum, counts its arrival atomically,
/// and the last to arrive adds the partials. It needs a device-scope fence between a block's write
/// and its arrival, and one between the last block's arrival and its reads; `release` and
/// `acquire` say which variant leaves which out (a `.cta` fence orders nothing between blocks).
const LAST_BLOCK_REDUCE: &str = r#"
enum Fence { NONE, BLOCK, DEVICE };
template <Fence RELEASE, Fence ACQUIRE, bool ACQ_REL_ATOMIC>
__device__ void reduce(const float* x, float* partials, unsigned* arrival, float* total) {
  __shared__ float s[64];
  __shared__ bool last;
  s[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int k = 0; k < 64; k++) sum += s[k];
    partials[blockIdx.x] = sum;
    if (RELEASE == DEVICE) __threadfence();
    if (RELEASE == BLOCK) __threadfence_block();
    unsigned before;
    if (ACQ_REL_ATOMIC) {
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(arrival) : "memory");
    } else {
      before = atomicAdd(arrival, 1u);
    }
    last = before == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    if (ACQUIRE == DEVICE) __threadfence();
    float t = 0.0f;
    for (int b = 0; b < gridDim.x; b++) t += __ldcg(partials + b);
    *total = t;
    *arrival = 0;
  }
}
extern "C" __global__ void fenced(const float* x, float* p, unsigned* a, float* t) { reduce<DEVICE, DEVICE, false>(x, p, a, t); }
extern "C" __global__ void acq_rel_atomic(const float* x, float* p, unsigned* a, float* t) { reduce<NONE, NONE, true>(x, p, a, t); }
extern "C" __global__ void no_release(const float* x, float* p, unsigned* a, float* t) { reduce<NONE, DEVICE, false>(x, p, a, t); }
extern "C" __global__ void block_release(const float* x, float* p, unsigned* a, float* t) { reduce<BLOCK, DEVICE, false>(x, p, a, t); }
extern "C" __global__ void no_acquire(const float* x, float* p, unsigned* a, float* t) { reduce<DEVICE, NONE, false>(x, p, a, t); }
"#;

#[test]
fn blocks_of_a_launch_need_release_and_acquire_to_share_global_memory() {
    let Some((mut dev, m, ptx)) = pair(LAST_BLOCK_REDUCE) else { return };
    let blocks = 24;
    let x: Vec<f32> = (0..blocks * 64).map(|k| (k % 7) as f32).collect();
    let want: f32 = x.iter().sum();
    let x = dev.upload(&x);
    let partials = dev.zeros::<f32>(blocks);
    let arrival = dev.zeros::<u32>(1);
    let total = dev.zeros::<f32>(1);
    let args = [p(x), p(partials), p(arrival), p(total)];
    // Fenced both sides, or with an acq_rel atomic: clean, and again (the counter is reset).
    for kernel in ["fenced", "fenced", "acq_rel_atomic"] {
        dev.upload(&[0.0f32]);
        dev.run(&m, kernel, blocks as u32, 64, &args);
        assert_eq!(dev.download::<f32>(total, 1)[0], want, "{kernel}");
        assert_eq!(dev.download::<u32>(arrival, 1)[0], 0, "{kernel}");
    }
    // A fence missing on either side, or one of block scope: the last block's read of another
    // block's partial is reported, whichever block comes last.
    for kernel in ["no_release", "block_release", "no_acquire"] {
        let r = dev.report(&m, kernel, blocks as u32, 64, &args);
        assert_eq!(r.kind, ReportKind::GlobalRace, "{kernel}: {r}");
        assert_eq!(r.line, lines_in(&ptx, kernel, "ld.global.cg")[0], "{kernel}: {r}");
        assert!(r.detail.contains("read of byte") && r.detail.contains("thread (0,0,0) wrote"), "{kernel}: {r}");
        // The reporting launch stopped before the reset.
        dev.mem.write(arrival, &[0; 4]).unwrap();
    }
}

#[test]
fn two_blocks_writing_one_word_race() {
    let src = r#"
extern "C" __global__ void bug(float* y) { if (threadIdx.x == 0) y[0] = blockIdx.x; }
extern "C" __global__ void fixed(float* y) {
  // Neighbouring halves of one word from two blocks do not overlap: no race.
  if (threadIdx.x == 0) reinterpret_cast<unsigned short*>(y)[blockIdx.x] = blockIdx.x;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(1);
    let r = dev.report(&m, "bug", 2, 32, &[p(y)]);
    assert_eq!(r.kind, ReportKind::GlobalRace, "{r}");
    assert_eq!(r.line, lines_in(&ptx, "bug", "st.global")[0]);
    assert!(r.detail.starts_with("write of byte 0 of allocation"), "{r}");
    dev.run(&m, "fixed", 2, 32, &[p(y)]);
    // Launches are ordered: the same word written again by the next launch's other block is fine.
    dev.run(&m, "fixed", 2, 32, &[p(y)]);
}

#[test]
fn shared_memory_read_before_the_block_wrote_it() {
    // Shared memory starts undefined on a GPU (zero here): a tile half written, a shared
    // accumulator never zeroed, or bytes only an earlier block on the same SM wrote.
    let src = r#"
extern "C" __global__ void half_tile(float* y) {
  __shared__ float s[32];
  if (threadIdx.x < 16) s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void unzeroed_sum(float* y) {
  __shared__ float sum;
  __syncthreads();
  atomicAdd(&sum, 1.0f);
  __syncthreads();
  if (threadIdx.x == 0) y[blockIdx.x] = sum;
}
extern "C" __global__ void first_block_writes(float* y) {
  __shared__ float s[32];
  if (blockIdx.x == 0) s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void fixed(float* y) {
  __shared__ float s[32];
  __shared__ float sum;
  s[threadIdx.x] = threadIdx.x < 16 ? threadIdx.x : 0.0f;
  if (threadIdx.x == 0) sum = 0.0f;
  __syncthreads();
  atomicAdd(&sum, 1.0f);
  __syncthreads();
  y[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x] + sum;
}"#;
    let Some((mut dev, m, ptx)) = pair(src) else { return };
    let y = dev.zeros::<f32>(64);
    let r = dev.report(&m, "half_tile", 1, 32, &[p(y)]);
    assert_eq!(r.kind, ReportKind::UninitializedRead, "{r}");
    assert_eq!(r.thread, [16, 0, 0], "{r}");
    assert_eq!(r.line, lines_in(&ptx, "half_tile", "ld.shared")[0]);
    assert!(r.detail.contains("read of shared byte 64, which no thread of this block has written"), "{r}");
    let r = dev.report(&m, "unzeroed_sum", 1, 32, &[p(y)]);
    assert!(r.kind == ReportKind::UninitializedRead && r.detail.starts_with("atomic of shared byte"), "{r}");
    // Block 1 runs after block 0 on some worker, over its shared bytes: still not its own writes.
    let r = dev.report(&m, "first_block_writes", 2, 32, &[p(y)]);
    assert_eq!((r.kind, r.block), (ReportKind::UninitializedRead, [1, 0, 0]), "{r}");
    dev.run(&m, "fixed", 2, 32, &[p(y)]);
    let want: Vec<f32> = (0..64).map(|k| if k % 32 < 16 { (k % 32) as f32 + 32.0 } else { 32.0 }).collect();
    assert_eq!(dev.download::<f32>(y, 64), want);
}
