//! The instruction families the project's kernels use, each checked against host values.
//! Kernels are CUDA C++ compiled by NVRTC in the test.

mod common;
use common::*;

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn elementwise_axpy_grid_stride_and_tail() {
    let src = r#"
extern "C" __global__ void axpy(float* y, const float* x, float a, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    y[i] = a * x[i] + y[i];
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(1);
    let n = 1000;
    let (x, y) = (g.vec(n), g.vec(n));
    let (px, py) = (dev.upload(&x), dev.upload(&y));
    let stats = dev.run(&m, "axpy", 3, 96, &[p(py), p(px), f(0.5), i(n as i32)]);
    let out: Vec<f32> = dev.download(py, n);
    for k in 0..n {
        assert_eq!(out[k], 0.5f32.mul_add(x[k], y[k]), "element {k}");
    }
    assert!(stats.thread_instructions > 10 * n as u64);
}

#[test]
fn integer_arithmetic_and_bits() {
    let src = r#"
extern "C" __global__ void ints(const int* a, const int* b, int* out, unsigned long long* out64) {
  int i = threadIdx.x;
  int x = a[i], y = b[i];
  unsigned ux = (unsigned)x, uy = (unsigned)y;
  int k = 0;
  int* o = out + i * 16;
  o[k++] = x + y; o[k++] = x - y; o[k++] = x * y; o[k++] = y != 0 ? x / y : 7; o[k++] = y != 0 ? x % y : 9;
  o[k++] = uy != 0 ? (int)(ux / uy) : 3; o[k++] = x >> (y & 31); o[k++] = (int)(ux >> (uy & 31));
  o[k++] = x << (y & 31); o[k++] = __popc(ux); o[k++] = __clz(x); o[k++] = (int)__brev(ux);
  o[k++] = min(x, y); o[k++] = (int)max(ux, uy); o[k++] = __mulhi(x, y); o[k++] = (x & y) ^ (x | ~y);
  out64[i] = (unsigned long long)ux * uy + (long long)x * (long long)y;
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(7);
    let n = 64;
    let mut a: Vec<i32> = (0..n).map(|_| g.next_u32() as i32).collect();
    let mut b: Vec<i32> = (0..n).map(|_| (g.next_u32() as i32) >> (g.next_u32() % 31)).collect();
    a[0] = i32::MIN;
    b[0] = -1;
    b[1] = 0;
    a[2] = -7;
    b[2] = 2;
    let (pa, pb) = (dev.upload(&a), dev.upload(&b));
    let po = dev.zeros::<i32>(n * 16);
    let p64 = dev.zeros::<u64>(n);
    dev.run(&m, "ints", 1, n as u32, &[p(pa), p(pb), p(po), p(p64)]);
    let out: Vec<i32> = dev.download(po, n * 16);
    let out64: Vec<u64> = dev.download(p64, n);
    for t in 0..n {
        let (x, y) = (a[t], b[t]);
        let (ux, uy) = (x as u32, y as u32);
        let want = [
            x.wrapping_add(y),
            x.wrapping_sub(y),
            x.wrapping_mul(y),
            if y != 0 { x.wrapping_div(y) } else { 7 },
            if y != 0 { x.wrapping_rem(y) } else { 9 },
            ux.checked_div(uy).map_or(3, |q| q as i32),
            x >> (y & 31),
            (ux >> (uy & 31)) as i32,
            x.wrapping_shl((y & 31) as u32),
            ux.count_ones() as i32,
            x.leading_zeros() as i32,
            ux.reverse_bits() as i32,
            x.min(y),
            ux.max(uy) as i32,
            ((x as i64 * y as i64) >> 32) as i32,
            (x & y) ^ (x | !y),
        ];
        assert_eq!(&out[t * 16..t * 16 + 16], &want, "thread {t} x={x} y={y}");
        assert_eq!(out64[t], (ux as u64 * uy as u64).wrapping_add((x as i64 * y as i64) as u64));
    }
}

#[test]
fn float_arithmetic_f32_f64_and_conversions() {
    let src = r#"
extern "C" __global__ void flt(const float* a, const float* b, float* out, double* outd, int* outi) {
  int i = threadIdx.x;
  float x = a[i], y = b[i];
  float* o = out + i * 12;
  o[0] = x + y; o[1] = x * y; o[2] = x / y; o[3] = fmaf(x, y, 1.0f); o[4] = fminf(x, y); o[5] = fmaxf(x, y);
  o[6] = sqrtf(fabsf(x)); o[7] = __fdiv_rz(x, y); o[8] = __fadd_rd(x, y); o[9] = __fmul_ru(x, y);
  o[10] = truncf(x * 100.f); o[11] = rintf(x * 100.f);
  double dx = x, dy = y;
  outd[i * 3] = dx / dy; outd[i * 3 + 1] = sqrt(fabs(dx)); outd[i * 3 + 2] = fma(dx, dy, 0.25);
  outi[i * 4] = (int)(x * 1000.f); outi[i * 4 + 1] = __float2int_rn(x * 1000.f);
  outi[i * 4 + 2] = (int)(unsigned)(x * 1e9f); outi[i * 4 + 3] = __float2int_rd(x * 3.5f);
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(3);
    let n = 96;
    let a: Vec<f32> = g.vec(n);
    let mut b: Vec<f32> = g.vec(n);
    b[0] = 0.0;
    let (pa, pb) = (dev.upload(&a), dev.upload(&b));
    let (po, pd, pi) = (dev.zeros::<f32>(n * 12), dev.zeros::<f64>(n * 3), dev.zeros::<i32>(n * 4));
    dev.run(&m, "flt", 1, n as u32, &[p(pa), p(pb), p(po), p(pd), p(pi)]);
    let out: Vec<f32> = dev.download(po, n * 12);
    let outd: Vec<f64> = dev.download(pd, n * 3);
    let outi: Vec<i32> = dev.download(pi, n * 4);
    for t in 0..n {
        let (x, y) = (a[t], b[t]);
        let o = &out[t * 12..];
        let exact_div = x as f64 / y as f64;
        let rz = {
            let q = (x / y) as f64;
            if q.abs() > exact_div.abs() {
                f32::from_bits((x / y).to_bits() - 1)
            } else {
                x / y
            }
        };
        let sum = x as f64 + y as f64;
        let rd = if ((x + y) as f64) > sum {
            f32::from_bits(if x + y > 0.0 { (x + y).to_bits() - 1 } else { (x + y).to_bits() + 1 })
        } else {
            x + y
        };
        let prod = x as f64 * y as f64;
        let ru = if ((x * y) as f64) < prod {
            f32::from_bits(if x * y >= 0.0 { (x * y).to_bits() + 1 } else { (x * y).to_bits() - 1 })
        } else {
            x * y
        };
        let want = [
            x + y,
            x * y,
            x / y,
            x.mul_add(y, 1.0),
            x.min(y),
            x.max(y),
            x.abs().sqrt(),
            if y == 0.0 { x / y } else { rz },
            rd,
            ru,
            (x * 100.0).trunc(),
            (x * 100.0).round_ties_even(),
        ];
        for k in 0..12 {
            assert!(
                o[k] == want[k] || (o[k].is_nan() && want[k].is_nan()),
                "thread {t} op {k}: {} vs {} (x={x}, y={y})",
                o[k],
                want[k]
            );
        }
        let (dx, dy) = (x as f64, y as f64);
        assert_eq!(outd[t * 3], dx / dy);
        assert_eq!(outd[t * 3 + 1], dx.abs().sqrt());
        assert_eq!(outd[t * 3 + 2], dx.mul_add(dy, 0.25));
        assert_eq!(outi[t * 4], (x * 1000.0) as i32);
        assert_eq!(outi[t * 4 + 1], (x * 1000.0).round_ties_even() as i32);
        assert_eq!(outi[t * 4 + 2], (x * 1e9) as u32 as i32, "f32 -> u32 saturates");
        assert_eq!(outi[t * 4 + 3], (x * 3.5).floor() as i32);
    }
}

#[test]
fn approximate_math_within_stated_error() {
    let src = r#"
extern "C" __global__ void approx(const float* a, float* out) {
  int i = threadIdx.x;
  float x = a[i];
  float* o = out + i * 10;
  o[0] = __expf(x); o[1] = __logf(fabsf(x) + 0.5f); o[2] = __sinf(x); o[3] = __cosf(x); o[4] = rsqrtf(fabsf(x) + 0.1f);
  o[5] = __frcp_rn(x + 3.0f); o[6] = expf(x); o[7] = tanhf(x); o[8] = sinf(x * 40.f); o[9] = logf(fabsf(x) + 1e-3f);
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(5);
    let n = 128;
    let a: Vec<f32> = g.vec(n).iter().map(|v| v * 4.0).collect();
    let pa = dev.upload(&a);
    let po = dev.zeros::<f32>(n * 10);
    dev.run(&m, "approx", 1, n as u32, &[p(pa), p(po)]);
    let out: Vec<f32> = dev.download(po, n * 10);
    for t in 0..n {
        let x = a[t] as f64;
        let want = [
            x.exp(),
            ((x.abs() as f32 + 0.5) as f64).ln(),
            x.sin(),
            x.cos(),
            1.0 / ((x.abs() as f32 + 0.1) as f64).sqrt(),
            1.0 / ((a[t] + 3.0) as f64),
            x.exp(),
            x.tanh(),
            ((a[t] * 40.0) as f64).sin(),
            ((x.abs() as f32 + 1e-3) as f64).ln(),
        ];
        for k in 0..10 {
            assert!(
                close(out[t * 10 + k], want[k] as f32, 2e-6),
                "thread {t} fn {k}: {} vs {}",
                out[t * 10 + k],
                want[k]
            );
        }
    }
}

#[test]
fn unknown_instruction_or_modifier_is_a_load_error_naming_it_and_its_line() {
    let src = r#"extern "C" __global__ void k(int* y, int a) { y[threadIdx.x] = a * threadIdx.x + 3; }"#;
    let Some(ptx) = compile(src) else { return };
    let line = ptx.lines().position(|l| l.contains("mad.lo.s32")).unwrap() as u32 + 1;
    let bad = ptx.replace("mad.lo.s32", "frob.lo.s32");
    let e = ptx_emulator::Module::load(&bad, &mut ptx_emulator::GlobalMemory::new()).err().unwrap();
    assert_eq!(e.line, line);
    assert!(e.to_string().contains("unsupported instruction 'frob.lo.s32'"), "{e}");
    let bad = ptx.replace("mad.lo.s32", "mad.lo.wobble.s32");
    let e = ptx_emulator::Module::load(&bad, &mut ptx_emulator::GlobalMemory::new()).err().unwrap();
    assert_eq!(e.line, line);
    assert!(e.to_string().contains("unsupported modifier '.wobble'"), "{e}");
}

#[test]
fn device_function_calls_are_inlined() {
    // f64 sin/cos of huge arguments call NVRTC's out-of-line `.func` reduction
    // (__internal_trig_reduction_slowpathd): parameters, return values and local memory.
    let src = r#"
extern "C" __global__ void dsin(const double* x, double* out) {
  int i = threadIdx.x;
  out[2 * i] = sin(x[i]);
  out[2 * i + 1] = cos(x[i]);
}"#;
    let Some(ptx) = compile(src) else { return };
    assert!(ptx.contains("call.uni"), "the test needs NVRTC's out-of-line call");
    let mut dev = Dev::new();
    let m = dev.load(src).unwrap();
    let xs = [0.5f64, 3.0, 1e6, 1e22, -7.5e15, 123456789.0, 2.0e300, -1e-300];
    let px = dev.upload(&xs);
    let po = dev.zeros::<f64>(16);
    dev.run(&m, "dsin", 1, xs.len() as u32, &[p(px), p(po)]);
    let out: Vec<f64> = dev.download(po, 16);
    for (k, &x) in xs.iter().enumerate() {
        // CUDA's double sin/cos are within 2 ulp.
        assert!((out[2 * k] - x.sin()).abs() <= 4.0 * f64::EPSILON, "sin({x}) = {} vs {}", out[2 * k], x.sin());
        assert!((out[2 * k + 1] - x.cos()).abs() <= 4.0 * f64::EPSILON, "cos({x}) = {} vs {}", out[2 * k + 1], x.cos());
    }
}
