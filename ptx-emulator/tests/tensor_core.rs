//! The sm_80 tensor-core path: mma.sync (m16n8k16 f16/bf16, m16n8k8 tf32 and f16) against a plain
//! matrix product, ldmatrix (x1/x2/x4, .trans) against its documented distribution, cp.async
//! (sizes, zero fill, groups) and the race it has when its target is read before the wait.

mod common;
use common::*;
use half::{bf16, f16};
use ptx_emulator::ReportKind;

/// Host reference: D = A (16xK) * B (Kx8) + C, with f64 sums rounded to f32.
fn matmul(a: &[f64], b: &[f64], c: &[f32], k: usize) -> Vec<f32> {
    let mut d = vec![0f32; 128];
    for r in 0..16 {
        for n in 0..8 {
            let mut acc = c[r * 8 + n] as f64;
            for kk in 0..k {
                acc += a[r * k + kk] * b[kk * 8 + n];
            }
            d[r * 8 + n] = acc as f32;
        }
    }
    d
}

// Fragments are built element by element from the PTX ISA's layout (groupID = lane/4,
// threadID_in_group = lane%4), from A row-major 16xK and B row-major Kx8 in global memory.
const MMA_SRC: &str = r#"
__device__ unsigned pack(const unsigned short* p, int i0, int i1) { return (unsigned)p[i0] | ((unsigned)p[i1] << 16); }
extern "C" __global__ void mma16(const unsigned short* A, const unsigned short* B, const float* C, float* D, int bf) {
  int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  unsigned a[4], b[2];
  a[0] = pack(A, g * 16 + t * 2, g * 16 + t * 2 + 1);
  a[1] = pack(A, (g + 8) * 16 + t * 2, (g + 8) * 16 + t * 2 + 1);
  a[2] = pack(A, g * 16 + t * 2 + 8, g * 16 + t * 2 + 9);
  a[3] = pack(A, (g + 8) * 16 + t * 2 + 8, (g + 8) * 16 + t * 2 + 9);
  b[0] = pack(B, (t * 2) * 8 + g, (t * 2 + 1) * 8 + g);
  b[1] = pack(B, (t * 2 + 8) * 8 + g, (t * 2 + 9) * 8 + g);
  float c[4] = {C[g * 8 + t * 2], C[g * 8 + t * 2 + 1], C[(g + 8) * 8 + t * 2], C[(g + 8) * 8 + t * 2 + 1]};
  float d[4];
  if (bf)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  D[g * 8 + t * 2] = d[0]; D[g * 8 + t * 2 + 1] = d[1]; D[(g + 8) * 8 + t * 2] = d[2]; D[(g + 8) * 8 + t * 2 + 1] = d[3];
}
extern "C" __global__ void mma_tf32(const float* A, const float* B, const float* C, float* D) {
  int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  unsigned a[4], b[2];
  a[0] = __float_as_uint(A[g * 8 + t]); a[1] = __float_as_uint(A[(g + 8) * 8 + t]);
  a[2] = __float_as_uint(A[g * 8 + t + 4]); a[3] = __float_as_uint(A[(g + 8) * 8 + t + 4]);
  b[0] = __float_as_uint(B[t * 8 + g]); b[1] = __float_as_uint(B[(t + 4) * 8 + g]);
  float c[4] = {C[g * 8 + t * 2], C[g * 8 + t * 2 + 1], C[(g + 8) * 8 + t * 2], C[(g + 8) * 8 + t * 2 + 1]};
  float d[4];
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
    : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
      "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  D[g * 8 + t * 2] = d[0]; D[g * 8 + t * 2 + 1] = d[1]; D[(g + 8) * 8 + t * 2] = d[2]; D[(g + 8) * 8 + t * 2 + 1] = d[3];
}
extern "C" __global__ void mma_k8(const unsigned short* A, const unsigned short* B, const float* C, float* D) {
  int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  unsigned a0 = pack(A, g * 8 + t * 2, g * 8 + t * 2 + 1), a1 = pack(A, (g + 8) * 8 + t * 2, (g + 8) * 8 + t * 2 + 1);
  unsigned b0 = pack(B, (t * 2) * 8 + g, (t * 2 + 1) * 8 + g);
  float c[4] = {C[g * 8 + t * 2], C[g * 8 + t * 2 + 1], C[(g + 8) * 8 + t * 2], C[(g + 8) * 8 + t * 2 + 1]};
  float d[4];
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};"
    : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a0), "r"(a1), "r"(b0), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  D[g * 8 + t * 2] = d[0]; D[g * 8 + t * 2 + 1] = d[1]; D[(g + 8) * 8 + t * 2] = d[2]; D[(g + 8) * 8 + t * 2 + 1] = d[3];
}
"#;

#[test]
fn mma_m16n8k16_f16_bf16_against_matrix_product() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(MMA_SRC) else { return };
    let mut g = Lcg(31);
    for bf in [0, 1] {
        let (a, b): (Vec<u16>, Vec<u16>) = if bf == 1 {
            (
                (0..256).map(|_| bf16::from_f32(g.f32()).to_bits()).collect(),
                (0..128).map(|_| bf16::from_f32(g.f32()).to_bits()).collect(),
            )
        } else {
            (
                (0..256).map(|_| f16::from_f32(g.f32()).to_bits()).collect(),
                (0..128).map(|_| f16::from_f32(g.f32()).to_bits()).collect(),
            )
        };
        let c = g.vec(128);
        let val = |x: u16| if bf == 1 { bf16::from_bits(x).to_f64() } else { f16::from_bits(x).to_f64() };
        let want = matmul(
            &a.iter().map(|&x| val(x)).collect::<Vec<_>>(),
            &b.iter().map(|&x| val(x)).collect::<Vec<_>>(),
            &c,
            16,
        );
        let (pa, pb, pc) = (dev.upload(&a), dev.upload(&b), dev.upload(&c));
        let pd = dev.zeros::<f32>(128);
        dev.run(&m, "mma16", 1, 32, &[p(pa), p(pb), p(pc), p(pd), i(bf)]);
        let d: Vec<f32> = dev.download(pd, 128);
        assert_eq!(d, want, "{}", if bf == 1 { "bf16" } else { "f16" });
    }
}

#[test]
fn mma_m16n8k8_tf32_and_f16() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(MMA_SRC) else { return };
    let mut g = Lcg(37);
    let (a, b, c) = (g.vec(128), g.vec(64), g.vec(128));
    // The tensor core reads the tf32 part of each f32 (the low 13 mantissa bits are ignored).
    let tf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_e000) as f64;
    let want =
        matmul(&a.iter().map(|&x| tf(x)).collect::<Vec<_>>(), &b.iter().map(|&x| tf(x)).collect::<Vec<_>>(), &c, 8);
    let (pa, pb, pc) = (dev.upload(&a), dev.upload(&b), dev.upload(&c));
    let pd = dev.zeros::<f32>(128);
    dev.run(&m, "mma_tf32", 1, 32, &[p(pa), p(pb), p(pc), p(pd)]);
    assert_eq!(dev.download::<f32>(pd, 128), want, "tf32");

    let a: Vec<u16> = (0..128).map(|_| f16::from_f32(g.f32()).to_bits()).collect();
    let b: Vec<u16> = (0..64).map(|_| f16::from_f32(g.f32()).to_bits()).collect();
    let v = |x: &Vec<u16>| x.iter().map(|&h| f16::from_bits(h).to_f64()).collect::<Vec<_>>();
    let want = matmul(&v(&a), &v(&b), &c, 8);
    let (pa, pb) = (dev.upload(&a), dev.upload(&b));
    dev.run(&m, "mma_k8", 1, 32, &[p(pa), p(pb), p(pc), p(pd)]);
    assert_eq!(dev.download::<f32>(pd, 128), want, "m16n8k8 f16");
}

#[test]
fn mma_needs_the_whole_warp() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(MMA_SRC) else { return };
    let z16 = dev.zeros::<u16>(256);
    let z = dev.zeros::<f32>(128);
    let r = dev.report(&m, "mma16", 1, 16, &[p(z16), p(z16), p(z), p(z), i(0)]);
    assert_eq!(r.kind, ReportKind::InvalidCollective, "{r}");
}

#[test]
fn ldmatrix_distribution_x1_x2_x4_and_trans() {
    let src = r#"
extern "C" __global__ void ldm(unsigned* out, int trans) {
  __shared__ __align__(16) unsigned short s[4 * 64];
  for (int i = threadIdx.x; i < 4 * 64; i += 32) s[i] = (unsigned short)i;
  __syncwarp();
  int lane = threadIdx.x;
  // Lane l gives the address of row l%8 of matrix l/8 (rows of 8 b16 = 16 bytes).
  unsigned addr = (unsigned)__cvta_generic_to_shared(&s[(lane / 8) * 64 + (lane % 8) * 8]);
  unsigned r0, r1, r2, r3, q0, q1, x;
  if (trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(q0), "=r"(q1) : "r"(addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(x) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(q0), "=r"(q1) : "r"(addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(x) : "r"(addr));
  }
  unsigned* o = out + lane * 7;
  o[0] = r0; o[1] = r1; o[2] = r2; o[3] = r3; o[4] = q0; o[5] = q1; o[6] = x;
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let po = dev.zeros::<u32>(32 * 7);
    for trans in [0, 1] {
        dev.run(&m, "ldm", 1, 32, &[p(po), i(trans)]);
        let out: Vec<u32> = dev.download(po, 32 * 7);
        for lane in 0..32u32 {
            // Documented distribution: lane holds row lane/4, columns 2*(lane%4) and +1 of each
            // matrix (of its transpose with .trans). Element (r, c) of matrix k is k*64 + r*8 + c.
            let (r, c) = (lane / 4, 2 * (lane % 4));
            let el = |k: u32, r: u32, c: u32| if trans == 1 { k * 64 + c * 8 + r } else { k * 64 + r * 8 + c };
            let want = |k: u32| el(k, r, c) | el(k, r, c + 1) << 16;
            let o = &out[lane as usize * 7..];
            assert_eq!(&o[..4], &[want(0), want(1), want(2), want(3)], "x4, lane {lane}, trans {trans}");
            assert_eq!(&o[4..6], &[want(0), want(1)], "x2, lane {lane}");
            assert_eq!(o[6], want(0), "x1, lane {lane}");
        }
    }
}

const GEMM_SRC: &str = r#"
// One warp: C (16x8) = A (16xK, row-major f16) * B (Kx8, row-major f16), K a multiple of 16, through
// cp.async into shared memory, ldmatrix (x4 for A, x2.trans for B) and mma.m16n8k16.
__device__ void cp16(void* smem, const void* g) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(g));
}
extern "C" __global__ void gemm(const unsigned short* A, const unsigned short* B, float* C, int K) {
  __shared__ __align__(16) unsigned short As[16 * 16];
  __shared__ __align__(16) unsigned short Bs[16 * 8];
  int lane = threadIdx.x;
  float d[4] = {0, 0, 0, 0};
  for (int k0 = 0; k0 < K; k0 += 16) {
    // A tile: 16 rows x 32 bytes = 32 chunks of 16 bytes; B tile: 16 rows x 16 bytes.
    cp16(&As[(lane / 2) * 16 + (lane % 2) * 8], &A[(lane / 2) * K + k0 + (lane % 2) * 8]);
    if (lane < 16) cp16(&Bs[lane * 8], &B[(k0 + lane) * 8]);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group 0;");
    __syncwarp();
    unsigned a[4], b[2];
    unsigned aaddr = (unsigned)__cvta_generic_to_shared(&As[(lane % 16) * 16 + (lane / 16) * 8]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(aaddr));
    unsigned baddr = (unsigned)__cvta_generic_to_shared(&Bs[(lane % 16) * 8]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(b[0]), "=r"(b[1]) : "r"(baddr));
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    __syncwarp();
  }
  int g = lane / 4, t = lane % 4;
  C[g * 8 + t * 2] = d[0]; C[g * 8 + t * 2 + 1] = d[1]; C[(g + 8) * 8 + t * 2] = d[2]; C[(g + 8) * 8 + t * 2 + 1] = d[3];
}
"#;

#[test]
fn gemm_through_cp_async_ldmatrix_and_mma() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(GEMM_SRC) else { return };
    let mut g = Lcg(41);
    let k = 64;
    let a: Vec<u16> = (0..16 * k).map(|_| f16::from_f32(g.f32()).to_bits()).collect();
    let b: Vec<u16> = (0..k * 8).map(|_| f16::from_f32(g.f32()).to_bits()).collect();
    let (pa, pb) = (dev.upload(&a), dev.upload(&b));
    let pc = dev.mem.alloc(128 * 4);
    let stats = dev.run(&m, "gemm", 1, 32, &[p(pa), p(pb), p(pc), i(k as i32)]);
    // Per k-step: cp.async of A (512 contiguous bytes: 4 wavefronts) and B (256: 2); ldmatrix.x4
    // of A, whose 8 rows a matrix are 32 bytes apart (rows r and r + 4 share banks: 2 wavefronts a
    // matrix, 8), and ldmatrix.x2 of B (contiguous rows: 2); one mma.
    let steps = (k / 16) as u64;
    assert_eq!(stats.sm.mma, steps);
    assert_eq!(stats.sm.mma_macs, steps * 16 * 8 * 16);
    assert_eq!((stats.sm.shared_requests, stats.sm.shared_wavefronts), (4 * steps, 16 * steps));
    // The mix: every issue slot in one kind; the mma, ldmatrix (2 a step) and cp.async (2 copies,
    // a commit and a wait a step) where they belong.
    let mix = stats.sm.mix;
    assert_eq!(mix.iter().sum::<u64>(), stats.sm.warp_instructions);
    assert_eq!((mix[0], mix[1], mix[4]), (steps, 2 * steps, 4 * steps), "{:?}", ptx_emulator::INSTRUCTION_KINDS);
    let c: Vec<f32> = dev.download(pc, 128);
    for r in 0..16 {
        for n in 0..8 {
            let exact: f64 =
                (0..k).map(|kk| f16::from_bits(a[r * k + kk]).to_f64() * f16::from_bits(b[kk * 8 + n]).to_f64()).sum();
            // One f32 rounding per 16-wide mma step: well within 1e-6 relative of the exact sum.
            assert!(
                (c[r * 8 + n] as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()),
                "C[{r}][{n}] = {} vs {exact}",
                c[r * 8 + n]
            );
        }
    }
}

#[test]
fn cp_async_sizes_zero_fill_and_wait_semantics() {
    let src = r#"
__device__ unsigned sa(void* p) { return (unsigned)__cvta_generic_to_shared(p); }
extern "C" __global__ void copies(const float* g, float* out, int bug) {
  __shared__ __align__(16) float s[32 * 8];
  float* mine = &s[threadIdx.x * 8];
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(sa(mine)), "l"(g + threadIdx.x));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, 4;" :: "r"(sa(mine + 2)), "l"(g + 64 + 2 * threadIdx.x));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(sa(mine + 4)), "l"(g + 128 + 4 * threadIdx.x), "r"(threadIdx.x % 5 * 4));
  asm volatile("cp.async.commit_group;");
  if (bug) out[threadIdx.x] = mine[0];  // read before the wait: a race
  asm volatile("cp.async.wait_all;");
  for (int j = 0; j < 8; j++) if (j != 1) out[threadIdx.x * 8 + j] = mine[j];
}"#;
    let mut dev = Dev::new();
    let Some((m, ptx)) = dev.load_with_ptx(src) else { return };
    let gv: Vec<f32> = (0..256).map(|k| k as f32 + 0.5).collect();
    let pg = dev.upload(&gv);
    let po = dev.zeros::<f32>(256);
    dev.run(&m, "copies", 1, 32, &[p(pg), p(po), i(0)]);
    let out: Vec<f32> = dev.download(po, 256);
    for t in 0..32 {
        let o = &out[t * 8..t * 8 + 8];
        assert_eq!(o[0], gv[t], "4-byte copy");
        assert_eq!((o[2], o[3]), (gv[64 + 2 * t], 0.0), "8-byte copy with src-size 4: zero fill");
        let n = (t % 5) * 4 / 4;
        for j in 0..4 {
            assert_eq!(o[4 + j], if j < n { gv[128 + 4 * t + j] } else { 0.0 }, "16-byte cg copy, src-size {}", n * 4);
        }
    }
    let r = dev.report(&m, "copies", 1, 32, &[p(pg), p(po), i(1)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    assert!(lines_with(&ptx, "ld.shared.f32").contains(&r.line), "{r}");
    assert!(r.detail.contains("not yet waited for"), "{r}");
}

#[test]
fn cp_async_target_read_by_another_thread_needs_a_barrier() {
    let src = r#"
extern "C" __global__ void k(const float* g, float* out, int bug) {
  __shared__ __align__(16) float s[64];
  unsigned a = (unsigned)__cvta_generic_to_shared(&s[threadIdx.x]);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(a), "l"(g + threadIdx.x));
  asm volatile("cp.async.wait_all;");
  if (!bug) __syncthreads();
  // The neighbouring lane's copy: landed by that lane's wait, not ordered before this read.
  // (A lane of a warp that has not run yet would not have written it: an uninitialized read.)
  out[threadIdx.x] = s[threadIdx.x ^ 1];
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let gv: Vec<f32> = (0..64).map(|k| k as f32).collect();
    let pg = dev.upload(&gv);
    let po = dev.zeros::<f32>(64);
    let r = dev.report(&m, "k", 1, 64, &[p(pg), p(po), i(1)]);
    assert_eq!(r.kind, ReportKind::SharedRace, "{r}");
    dev.run(&m, "k", 1, 64, &[p(pg), p(po), i(0)]);
    assert!(dev.download::<f32>(po, 64).iter().enumerate().all(|(t, &v)| v == (t ^ 1) as f32));
}
