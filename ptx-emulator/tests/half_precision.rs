//! f16/bf16/tf32: every cvt form against known bit patterns and the `half` crate (an independent
//! round-to-nearest-even implementation), x2 arithmetic against exact host values, redux.sync.

mod common;
use common::*;
use half::{bf16, f16};

const CVT_SRC: &str = r#"
__device__ unsigned short f16_rn(float x) { unsigned short r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short f16_rz(float x) { unsigned short r; asm("cvt.rz.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short f16_rm(float x) { unsigned short r; asm("cvt.rm.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short f16_rp(float x) { unsigned short r; asm("cvt.rp.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short bf16_rn(float x) { unsigned short r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short bf16_rz(float x) { unsigned short r; asm("cvt.rz.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short f16_sat(float x) { unsigned short r; asm("cvt.rn.sat.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ unsigned short bf16_relu(float x) { unsigned short r; asm("cvt.rn.relu.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ float f16_to_f32(unsigned short h) { float r; asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h)); return r; }
__device__ unsigned tf32(float x) { unsigned r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r; }
__device__ unsigned pack_f16x2(float lo, float hi) { unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ unsigned pack_bf16x2(float lo, float hi) { unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ int f16_to_int(unsigned short h) { int r; asm("cvt.rni.s32.f16 %0, %1;" : "=r"(r) : "h"(h)); return r; }
extern "C" __global__ void cvts(const float* x, unsigned* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  unsigned* o = out + i * 14;
  o[0] = f16_rn(v); o[1] = f16_rz(v); o[2] = f16_rm(v); o[3] = f16_rp(v);
  o[4] = bf16_rn(v); o[5] = bf16_rz(v); o[6] = f16_sat(v); o[7] = bf16_relu(v);
  o[8] = __float_as_uint(f16_to_f32(f16_rn(v))); o[9] = tf32(v);
  o[10] = pack_f16x2(v, -v); o[11] = pack_bf16x2(v, 2.0f * v);
  o[12] = (unsigned)f16_to_int(f16_rn(v)); o[13] = 0;
}"#;

/// Reference for a directed rounding to f16 from the exact f32 value (by stepping from RNE).
fn f16_dir(v: f32, mode: &str) -> u16 {
    let n = f16::from_f32(v);
    if v.is_nan() {
        return 0x7fff;
    }
    let nv = n.to_f64();
    let x = v as f64;
    let step_down = |h: f16| -> f16 {
        let b = h.to_bits();
        if h.to_f64() == 0.0 {
            return f16::from_bits(0x8001);
        }
        if b & 0x8000 == 0 {
            f16::from_bits(b - 1)
        } else {
            f16::from_bits(b + 1)
        }
    };
    let step_up =
        |h: f16| -> f16 { f16::from_bits(step_down(f16::from_bits(h.to_bits() ^ 0x8000)).to_bits() ^ 0x8000) };
    let r = match mode {
        "rz" if nv.abs() > x.abs() => {
            if x > 0.0 {
                step_down(n)
            } else {
                step_up(n)
            }
        }
        "rm" if nv > x => step_down(n),
        "rp" if nv < x => step_up(n),
        _ => n,
    };
    r.to_bits()
}

#[test]
fn cvt_f16_bf16_tf32_all_forms() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(CVT_SRC) else { return };
    let mut g = Lcg(21);
    let mut xs: Vec<f32> = vec![
        1.0 + 2f32.powi(-11),       // f16 tie: even (1.0)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie: even (1 + 2^-9)
        1.0 + 2f32.powi(-8),        // bf16 tie: even (1.0)
        65504.0,
        65519.0,
        65520.0,
        1e6, // f16 max, below and at the overflow midpoint
        -65520.0,
        1e-8,
        -1e-8,
        6e-8,
        2f32.powi(-24),
        3.0 * 2f32.powi(-25),
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.5,
        -2.5,
        1.5,
        3.4e38,
        1.1754944e-38,
    ];
    for _ in 0..200 {
        let e = (g.next_u32() % 40) as i32 - 28;
        xs.push(g.f32() * 2f32.powi(e));
    }
    for _ in 0..100 {
        xs.push(f32::from_bits(g.next_u32()));
    }
    let n = xs.len();
    let px = dev.upload(&xs);
    let po = dev.zeros::<u32>(n * 14);
    dev.run(&m, "cvts", n.div_ceil(64) as u32, 64, &[p(px), p(po), i(n as i32)]);
    let out: Vec<u32> = dev.download(po, n * 14);
    // Known bit patterns first.
    let at = |k: usize, j: usize| out[k * 14 + j];
    assert_eq!(at(0, 0), 0x3c00, "f16 tie to even");
    assert_eq!(at(0, 3), 0x3c01, "rp rounds the tie up");
    assert_eq!(at(1, 0), 0x3c02, "f16 tie to even (odd below)");
    assert_eq!(at(2, 4), 0x3f80, "bf16 tie to even");
    assert_eq!(at(3, 0), 0x7bff);
    assert_eq!(at(4, 0), 0x7bff, "65519 rounds down to max");
    assert_eq!(at(5, 0), 0x7c00, "65520 overflows to inf under rn");
    assert_eq!(at(5, 1), 0x7bff, "rz saturates to max finite");
    assert_eq!(at(7, 2), 0xfc00, "-65520 rm is -inf");
    assert_eq!(at(7, 3), 0xfbff, "-65520 rp is -max");
    assert_eq!((at(8, 0), at(8, 3)), (0x0000, 0x0001), "1e-8: rn to zero, rp to the least subnormal");
    assert_eq!(at(9, 2), 0x8001, "-1e-8 rm is the negative least subnormal");
    assert_eq!(at(12, 0), 0x0002, "3*2^-25 is a subnormal tie: even");
    assert_eq!(at(17, 0), 0x7fff, "NaN is the canonical NaN");
    assert_eq!((at(18, 6), at(19, 6)), (0x3800, 0x0000), ".sat clamps to [0, 1]");
    assert_eq!(at(19, 7), 0x0000, ".relu: negative to +0");
    assert_eq!(at(19, 12) as i32, -2, "cvt.rni.s32.f16 ties to even");
    // tf32: 1 + 2^-11 keeps 10 mantissa bits, round to nearest, ties away: 1 + 2^-10.
    assert_eq!(at(0, 9), (1.0f32 + 2f32.powi(-10)).to_bits());
    for (k, &v) in xs.iter().enumerate() {
        let h = f16::from_f32(v);
        let b = bf16::from_f32(v);
        let want_h = if v.is_nan() { 0x7fff } else { h.to_bits() };
        let want_b = if v.is_nan() { 0x7fff } else { b.to_bits() };
        assert_eq!(at(k, 0) as u16, want_h, "f16 rn of {v:e}");
        for (j, mode) in [(1, "rz"), (2, "rm"), (3, "rp")] {
            assert_eq!(at(k, j) as u16, f16_dir(v, mode), "f16 {mode} of {v:e}");
        }
        assert_eq!(at(k, 4) as u16, want_b, "bf16 rn of {v:e}");
        if !v.is_nan() {
            let rz = v.to_bits() >> 16;
            assert_eq!(at(k, 5), rz, "bf16 rz of {v:e} is truncation");
            assert_eq!(f32::from_bits(at(k, 8)), h.to_f32(), "f16 widening of {v:e}");
            assert_eq!(at(k, 10), ((f16::from_f32(-v).to_bits() as u32) << 16) | h.to_bits() as u32);
            assert_eq!(at(k, 11), ((bf16::from_f32(2.0 * v).to_bits() as u32) << 16) | b.to_bits() as u32);
            // tf32 reference: round the 13 dropped bits, ties away from zero.
            if v.is_finite() {
                let bits = v.to_bits();
                let rounded = (bits + 0x1000) & !0x1fff;
                let want = rounded;
                assert_eq!(at(k, 9), want, "tf32 of {v:e}");
            }
        }
    }
}

#[test]
fn f16x2_and_bf16x2_arithmetic() {
    let src = r#"
extern "C" __global__ void h2(const unsigned* a, const unsigned* b, const unsigned* c, unsigned* out) {
  int i = threadIdx.x;
  unsigned x = a[i], y = b[i], z = c[i], r;
  unsigned* o = out + i * 8;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(y)); o[0] = r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(y)); o[1] = r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(z)); o[2] = r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(z)); o[3] = r;
  asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(y)); o[4] = r;
  asm("neg.f16x2 %0, %1;" : "=r"(r) : "r"(x)); o[5] = r;
  asm("fma.rn.relu.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(z)); o[6] = r;
  unsigned short hs;
  asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; sub.rn.f16 %0, lo, hi; }" : "=h"(hs) : "r"(x)); o[7] = hs;
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(17);
    let n = 128;
    let h2 = |g: &mut Lcg| {
        let lo = f16::from_f32(g.f32() * 8.0).to_bits() as u32;
        let hi = f16::from_f32(g.f32() * 8.0).to_bits() as u32;
        lo | hi << 16
    };
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
        (0..n).map(|_| h2(&mut g)).collect(),
        (0..n).map(|_| h2(&mut g)).collect(),
        (0..n).map(|_| h2(&mut g)).collect(),
    );
    let (pa, pb, pc) = (dev.upload(&a), dev.upload(&b), dev.upload(&c));
    let po = dev.zeros::<u32>(n * 8);
    dev.run(&m, "h2", 1, n as u32, &[p(pa), p(pb), p(pc), p(po)]);
    let out: Vec<u32> = dev.download(po, n * 8);
    let hv = |x: u32, k: u32| f16::from_bits((x >> (16 * k)) as u16).to_f64();
    let bv = |x: u32, k: u32| bf16::from_bits((x >> (16 * k)) as u16).to_f64();
    let ph =
        |f: &dyn Fn(u32) -> f64| (f16::from_f64(f(0)).to_bits() as u32) | (f16::from_f64(f(1)).to_bits() as u32) << 16;
    let pb2 = |f: &dyn Fn(u32) -> f64| {
        (bf16::from_f64(f(0)).to_bits() as u32) | (bf16::from_f64(f(1)).to_bits() as u32) << 16
    };
    for t in 0..n {
        let (x, y, z) = (a[t], b[t], c[t]);
        let o = &out[t * 8..];
        assert_eq!(o[0], ph(&|k| hv(x, k) + hv(y, k)), "add, thread {t}");
        assert_eq!(o[1], ph(&|k| hv(x, k) * hv(y, k)), "mul, thread {t}");
        assert_eq!(o[2], ph(&|k| hv(x, k).mul_add(hv(y, k), hv(z, k))), "fma, thread {t}");
        assert_eq!(o[3], pb2(&|k| bv(x, k).mul_add(bv(y, k), bv(z, k))), "bf16 fma, thread {t}");
        assert_eq!(o[4], ph(&|k| hv(x, k).max(hv(y, k))), "max, thread {t}");
        assert_eq!(o[5], x ^ 0x8000_8000, "neg");
        assert_eq!(o[6], ph(&|k| hv(x, k).mul_add(hv(y, k), hv(z, k)).max(0.0)), "fma.relu, thread {t}");
        assert_eq!(o[7], f16::from_f64(hv(x, 0) - hv(x, 1)).to_bits() as u32, "scalar sub via unpacked halves");
    }
}

#[test]
fn redux_sync() {
    let src = r#"
extern "C" __global__ void red(const int* v, int* out) {
  int x = v[threadIdx.x];
  out[threadIdx.x * 4 + 0] = __reduce_add_sync(0xffffffff, x);
  out[threadIdx.x * 4 + 1] = __reduce_min_sync(0xffffffff, x);
  out[threadIdx.x * 4 + 2] = (int)__reduce_max_sync(0xffffffff, (unsigned)x);
  out[threadIdx.x * 4 + 3] = (int)__reduce_xor_sync((threadIdx.x & 31) < 16 ? 0x0000ffffu : 0xffff0000u, (unsigned)x);
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(2);
    let v: Vec<i32> = (0..64).map(|_| g.next_u32() as i32 >> 4).collect();
    let pv = dev.upload(&v);
    let po = dev.zeros::<i32>(64 * 4);
    dev.run(&m, "red", 1, 64, &[p(pv), p(po)]);
    let out: Vec<i32> = dev.download(po, 64 * 4);
    for w in 0..2 {
        let xs = &v[w * 32..w * 32 + 32];
        for l in 0..32 {
            let o = &out[(w * 32 + l) * 4..];
            assert_eq!(o[0], xs.iter().fold(0i32, |a, &b| a.wrapping_add(b)));
            assert_eq!(o[1], *xs.iter().min().unwrap());
            assert_eq!(o[2] as u32, xs.iter().map(|&x| x as u32).max().unwrap());
            let half = if l < 16 { &xs[..16] } else { &xs[16..] };
            assert_eq!(o[3], half.iter().fold(0, |a, &b| a ^ b));
        }
    }
}
