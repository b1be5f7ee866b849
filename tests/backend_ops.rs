//! One test body per op, run on every backend (candle's `test_device!` idea): the CPU reference
//! itself, the CUDA backend on the PTX emulator (always, in CI too), and the CUDA backend on a GPU
//! when one is present ("skipped: no CUDA device" otherwise). Each body draws fresh random inputs
//! (the seed is printed; `PURIFIER_TEST_SEED` replays one), rounds them to the storage type under
//! test, runs the op on the backend under test with its outputs poisoned (NaN) and on the CPU
//! reference, and compares: relative L2 under 1e-5 for f32, 1e-2 for f16/bf16; NaN never passes.
//!
//! The emulator needs NVRTC (LD_LIBRARY_PATH with libnvrtc.so.13): without it these tests fail,
//! naming what is missing.
mod common;

use std::sync::Arc;

use purifier::backend::cpu::{round_to, CpuBackend, CpuTensor};
use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::GradientStore::{self, Add, Write};
use purifier::backend::{
    step_table_u64, subpixel_weights, AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, LayerGradient,
    LayerInput, Precision, StepColumn, StepSource, TensorShape, STEP_COLUMNS,
};
use purifier::driver::emulated::EmulatedDriver;

const ALL_DTYPES: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

fn tolerance(dtype: Precision) -> f64 {
    match dtype {
        Precision::F32 => 1e-5,
        Precision::F16 | Precision::Bf16 => 1e-2,
    }
}

fn fresh_seed() -> u64 {
    if let Ok(s) = std::env::var("PURIFIER_TEST_SEED") {
        return s.parse().expect("PURIFIER_TEST_SEED must be an integer");
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    nanos as u64 ^ (std::process::id() as u64) << 32
}

/// The backend under test next to the CPU reference, with a stream of fresh random inputs.
struct Harness<'a, B: Backend> {
    b: &'a B,
    cpu: CpuBackend,
    dtype: Precision,
    seed: u64,
    draws: u64,
}

impl<'a, B: Backend> Harness<'a, B> {
    fn new(b: &'a B, dtype: Precision, op: &str) -> Self {
        let seed = fresh_seed();
        println!("{op} on {} with {dtype} tensors: seed {seed}", b.name());
        Self { b, cpu: CpuBackend, dtype, seed, draws: 0 }
    }

    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.draws += 1;
        common::uniform(n, self.seed ^ self.draws.wrapping_mul(0x2545_F491_4F6C_DD1D))
            .iter()
            .map(|v| v * scale)
            .collect()
    }

    /// The same random values in both backends, in storage type `dtype` (rounded once).
    fn input_as(&mut self, shape: &[usize], dtype: Precision, scale: f32) -> (B::Tensor, CpuTensor) {
        let data = self.values(shape.iter().product(), scale);
        (self.b.upload_as(&data, shape, dtype).unwrap(), self.cpu.upload_as(&data, shape, dtype).unwrap())
    }

    fn input(&mut self, shape: &[usize]) -> (B::Tensor, CpuTensor) {
        self.input_as(shape, self.dtype, 1.0)
    }

    fn input_f32(&mut self, shape: &[usize]) -> (B::Tensor, CpuTensor) {
        self.input_as(shape, Precision::F32, 1.0)
    }

    /// An output: NaN in the backend under test (every element must be written), zeros on the CPU.
    fn output_as(&self, shape: &[usize], dtype: Precision) -> (B::Tensor, CpuTensor) {
        let n = shape.iter().product();
        (self.b.upload_as(&vec![f32::NAN; n], shape, dtype).unwrap(), self.cpu.zeros_as(shape, dtype).unwrap())
    }

    fn output(&self, shape: &[usize]) -> (B::Tensor, CpuTensor) {
        self.output_as(shape, self.dtype)
    }

    /// Downloads `got` (after a synchronize that must succeed) and compares it with the reference.
    fn check(&self, what: &str, got: &B::Tensor, want: &CpuTensor) {
        self.check_within(what, got, want, tolerance(self.dtype.max_error_type(got.dtype())));
    }

    fn check_within(&self, what: &str, got: &B::Tensor, want: &CpuTensor, tolerance: f64) {
        self.b.synchronize().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.shape(), &want.shape[..], "{what}: shape");
        let got = self.b.download(got).unwrap();
        if let Some(i) = got.iter().position(|v| v.is_nan()) {
            panic!("{what}: NaN at element {i} (an output element was not written, or the op made one)");
        }
        let num: f64 = got.iter().zip(&want.data).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = want.data.iter().map(|b| (*b as f64).powi(2)).sum();
        let error = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
        println!("  {what}: relative L2 error {error:.2e}");
        assert!(error <= tolerance, "{what}: relative L2 error {error:.3e} over {tolerance:.0e} (seed {})", self.seed);
    }
}

trait WorstOf {
    fn max_error_type(self, other: Precision) -> Precision;
}
impl WorstOf for Precision {
    /// The looser of two storage types: a half-precision operand anywhere sets the tolerance.
    fn max_error_type(self, other: Precision) -> Precision {
        if self == Precision::F32 {
            other
        } else {
            self
        }
    }
}

// ---- backends ----

fn emulator(precision: Precision) -> CudaBackend {
    assert!(
        purifier::backend::cuda::compile::nvrtc_available(),
        "NVRTC is not loadable: put libnvrtc.so.13's folder on LD_LIBRARY_PATH"
    );
    CudaBackend::new(Arc::new(EmulatedDriver::new()), precision, ImageKind::Ptx).unwrap()
}

/// One test per backend for an op body `fn(&B, Precision)`, run for each storage type listed.
macro_rules! test_device {
    ($name:ident, $body:ident, $dtypes:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn cpu() {
                for dtype in $dtypes {
                    $body(&CpuBackend, dtype);
                }
            }
            #[test]
            fn emulator() {
                for dtype in $dtypes {
                    $body(&super::emulator(dtype), dtype);
                }
            }
            #[test]
            fn cuda() {
                match purifier::device::cuda_backend(Precision::F32) {
                    Ok(_) => {
                        for dtype in $dtypes {
                            $body(&purifier::device::cuda_backend(dtype).unwrap(), dtype);
                        }
                    }
                    Err(e) => println!("skipped: no CUDA device ({e})"),
                }
            }
        }
    };
}

// ---- memory ----

fn upload_download_layout<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "upload/download");
    for shape in [vec![2, 3, 4, 5], vec![7, 3], vec![5]] {
        let (x, x_ref) = h.input(&shape);
        h.check_within("round trip", &x, &x_ref, 0.0);
        let (mut y, _) = h.output(&shape);
        b.copy(&x, &mut y);
        h.check_within("copy", &y, &x_ref, 0.0);
        let (mut z, _) = h.output_as(&shape, Precision::F32);
        b.copy(&x, &mut z);
        h.check_within("copy with conversion to f32", &z, &x_ref, 0.0);
        let data = h.values(x_ref.data.len(), 2.0);
        b.write(&mut y, &data).unwrap();
        h.check_within("write", &y, &h.cpu.upload_as(&data, &shape, dtype).unwrap(), 0.0);
        b.fill(&mut y, 0.25);
        h.check_within("fill", &y, &h.cpu.upload_as(&vec![0.25; data.len()], &shape, dtype).unwrap(), 0.0);
    }
    assert!(b.upload(&[1.0, 2.0], &[3]).is_err(), "an upload of the wrong length is an error");
}
test_device!(upload_download, upload_download_layout, ALL_DTYPES);

// ---- element-wise ----

fn elementwise_ops<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "element-wise ops");
    let shape = [2, 5, 3, 7];
    let (x, xr) = h.input(&shape);
    let (y, yr) = h.input_f32(&shape);
    let (mut out, mut out_r) = h.output(&shape);
    b.axpby(0.75, &x, -1.5, &y, &mut out);
    h.cpu.axpby(0.75, &xr, -1.5, &yr, &mut out_r);
    h.check("axpby", &out, &out_r);

    let (mut acc, mut acc_r) = h.input_f32(&shape);
    b.add_assign(&mut acc, &x);
    h.cpu.add_assign(&mut acc_r, &xr);
    h.check("add_assign", &acc, &acc_r);

    let (mut c, mut c_r) = h.input_as(&shape, dtype, 3.0);
    b.clamp(&mut c, -1.0, 0.5);
    h.cpu.clamp(&mut c_r, -1.0, 0.5);
    h.check("clamp", &c, &c_r);

    let (pre, pre_r) = h.input_as(&shape, dtype, 3.0);
    let (mut g, mut g_r) = h.input_f32(&shape);
    b.clamp_backward(&pre, -1.0, 1.0, &mut g);
    h.cpu.clamp_backward(&pre_r, -1.0, 1.0, &mut g_r);
    h.check("clamp_backward", &g, &g_r);

    let (mut r, mut r_r) = h.input(&shape);
    b.relu(&mut r);
    h.cpu.relu(&mut r_r);
    h.check("relu", &r, &r_r);
    for store in [Add, Write] {
        let (mut dr, mut dr_r) = gradient(&mut h, &shape, Precision::F32, store);
        b.relu_backward(&r, &y, &mut dr, store);
        h.cpu.relu_backward(&r_r, &yr, &mut dr_r, store);
        h.check(&format!("relu_backward ({store:?})"), &dr, &dr_r);
    }
}
test_device!(elementwise, elementwise_ops, ALL_DTYPES);

fn channel_and_layout_ops<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "channel and layout ops");
    let (n, c, hh, w) = (2, 6, 5, 3);
    let (x, xr) = h.input(&[n, c, hh, w]);
    let (scale, scale_r) = h.input_f32(&[c]);
    let (shift, shift_r) = h.input_f32(&[c]);
    let (mut out, mut out_r) = h.output(&[n, c, hh, w]);
    b.channel_affine(&x, &scale, &shift, &mut out);
    h.cpu.channel_affine(&xr, &scale_r, &shift_r, &mut out_r);
    h.check("channel_affine", &out, &out_r);
    for store in [Add, Write] {
        let (mut dx, mut dx_r) = gradient(&mut h, &[n, c, hh, w], Precision::F32, store);
        b.channel_affine_backward(&out, &scale, &mut dx, store);
        h.cpu.channel_affine_backward(&out_r, &scale_r, &mut dx_r, store);
        h.check(&format!("channel_affine_backward ({store:?})"), &dx, &dx_r);
    }
    // 2-D (N x C): the classifiers' features.
    let (f, fr) = h.input(&[n, c]);
    let (mut fo, mut fo_r) = h.output(&[n, c]);
    b.channel_affine(&f, &scale, &shift, &mut fo);
    h.cpu.channel_affine(&fr, &scale_r, &shift_r, &mut fo_r);
    h.check("channel_affine 2-D", &fo, &fo_r);

    let pad = 2;
    let sub = [n, c + 2 * pad, hh.div_ceil(2), w.div_ceil(2)];
    let (mut s, mut s_r) = h.output(&sub);
    b.shortcut_subsample_pad(&x, pad, &mut s);
    h.cpu.shortcut_subsample_pad(&xr, pad, &mut s_r);
    h.check("shortcut_subsample_pad", &s, &s_r);
    let (ds, ds_r) = h.input_f32(&sub);
    for store in [Add, Write] {
        let (mut dsx, mut dsx_r) = gradient(&mut h, &[n, c, hh, w], Precision::F32, store);
        b.shortcut_subsample_pad_backward(&ds, pad, &mut dsx, store);
        h.cpu.shortcut_subsample_pad_backward(&ds_r, pad, &mut dsx_r, store);
        h.check(&format!("shortcut_subsample_pad_backward ({store:?})"), &dsx, &dsx_r);
    }

    let (mut pooled, mut pooled_r) = h.output(&[n, c]);
    b.global_avg_pool(&x, &mut pooled);
    h.cpu.global_avg_pool(&xr, &mut pooled_r);
    h.check("global_avg_pool", &pooled, &pooled_r);
    let (dp, dp_r) = h.input_f32(&[n, c]);
    for store in [Add, Write] {
        let (mut dpx, mut dpx_r) = gradient(&mut h, &[n, c, hh, w], Precision::F32, store);
        b.global_avg_pool_backward(&dp, &mut dpx, store);
        h.cpu.global_avg_pool_backward(&dp_r, &mut dpx_r, store);
        h.check(&format!("global_avg_pool_backward ({store:?})"), &dpx, &dpx_r);
    }

    let (mut up, mut up_r) = h.output(&[n, c, 2 * hh, 2 * w]);
    b.upsample_nearest2x(&x, &mut up);
    h.cpu.upsample_nearest2x(&xr, &mut up_r);
    h.check("upsample_nearest2x", &up, &up_r);
    let (dup, dup_r) = h.input_f32(&[n, c, 2 * hh, 2 * w]);
    for store in [Add, Write] {
        let (mut dux, mut dux_r) = gradient(&mut h, &[n, c, hh, w], Precision::F32, store);
        b.upsample_nearest2x_backward(&dup, &mut dux, store);
        h.cpu.upsample_nearest2x_backward(&dup_r, &mut dux_r, store);
        h.check(&format!("upsample_nearest2x_backward ({store:?})"), &dux, &dux_r);
    }
}
test_device!(channel_and_layout, channel_and_layout_ops, ALL_DTYPES);

// ---- network ops ----

fn embedding_and_linear<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "timestep embedding and linear");
    let steps = [0.0f32, 1.0, 17.0, 999.0, 500.0];
    let (t, t_r) = (b.upload(&steps, &[5]).unwrap(), h.cpu.upload(&steps, &[5]).unwrap());
    let (mut e, mut e_r) = h.output(&[5, 64]);
    b.timestep_embedding(&t, &mut e);
    h.cpu.timestep_embedding(&t_r, &mut e_r);
    h.check("timestep_embedding", &e, &e_r);

    // The CUDA kernel's sample tiles: 11 samples, a full tile of 8 and a partial one; 3, tiles of 2
    // (the second partial); 1.
    for (silu, n) in [(false, 3), (true, 3), (false, 11), (true, 11), (true, 1)] {
        let (x, xr) = h.input(&[n, 70]);
        let (w, wr) = h.input(&[33, 70]);
        let (bias, bias_r) = h.input_f32(&[33]);
        let (mut out, mut out_r) = h.output(&[n, 33]);
        b.linear(&x, &w, Some(&bias), silu, &mut out);
        h.cpu.linear(&xr, &wr, Some(&bias_r), silu, &mut out_r);
        h.check(&format!("linear (silu input {silu}, {n} samples)"), &out, &out_r);
        let (mut nob, mut nob_r) = h.output(&[n, 33]);
        b.linear(&x, &w, None, silu, &mut nob);
        h.cpu.linear(&xr, &wr, None, silu, &mut nob_r);
        h.check("linear without bias", &nob, &nob_r);
        // An f32 input against the weights' type (the kernel picks each operand's type apart).
        let (x32, x32_r) = h.input_as(&[n, 70], Precision::F32, 1.0);
        let (mut mixed, mut mixed_r) = h.output(&[n, 33]);
        b.linear(&x32, &w, Some(&bias), silu, &mut mixed);
        h.cpu.linear(&x32_r, &wr, Some(&bias_r), silu, &mut mixed_r);
        h.check("linear, f32 input", &mixed, &mixed_r);
        let (dout, dout_r) = h.input_f32(&[n, 33]);
        for store in [Add, Write] {
            let (mut dx, mut dx_r) = gradient(&mut h, &[n, 70], Precision::F32, store);
            b.linear_backward(&x, &w, silu, &dout, &mut dx, store);
            h.cpu.linear_backward(&xr, &wr, silu, &dout_r, &mut dx_r, store);
            h.check(&format!("linear_backward (silu input {silu}, {store:?})"), &dx, &dx_r);
        }
    }
}
test_device!(embedding_linear, embedding_and_linear, ALL_DTYPES);

/// An input gradient for a backward op's `store`: random values to accumulate into (`Add`: an
/// element the op leaves alone is off by its whole gradient), or an output NaN-poisoned on the
/// backend under test (`Write`: the op must never read it and must write every element).
fn gradient<B: Backend>(
    h: &mut Harness<'_, B>,
    shape: &[usize],
    dtype: Precision,
    store: GradientStore,
) -> (B::Tensor, CpuTensor) {
    match store {
        Add => h.input_as(shape, dtype, 0.25),
        Write => h.output_as(shape, dtype),
    }
}

fn group_norm_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "group_norm");
    // (N, channels of a, channels of b, groups, H, W): the UNet's shapes shrunk, a concat, one group;
    // 8 channels a group, alone and in a concat (8 channels a thread in the element-wise kernel);
    // 33 channels a group (no block is a multiple of 33 and 32: the kernels' division path), also
    // over 12x12 pixels; 257 channels a group (a pixel's 514 single-channel vectors are more than an
    // element-wise CUDA block's 256 threads: each thread takes two); one sample of one group over 96x96 pixels, which the partial kernel splits
    // into more chunks than the finalizing warp has lanes (36 on the emulator's 16 SMs); the rest
    // of one chunk or a few.
    let cases = [
        (2, 64, 0, 32, 8, 8),
        (2, 32, 32, 32, 4, 4),
        (2, 6, 0, 1, 5, 3),
        (2, 8, 4, 4, 3, 5),
        (2, 64, 0, 8, 3, 3),
        (2, 16, 16, 4, 3, 2),
        (2, 66, 0, 2, 3, 3),
        (2, 16, 8, 6, 3, 4),
        (2, 32, 0, 32, 5, 3),
        (1, 8, 0, 1, 96, 96),
        (1, 66, 0, 2, 12, 12),
        (2, 514, 0, 2, 2, 3),
    ];
    for (n, ca, cb, groups, hh, w) in cases {
        for silu in [false, true] {
            let c = ca + cb;
            let (a, ar) = h.input(&[n, ca, hh, w]);
            // An offset mean: the statistics must not cancel.
            let (bb, bb_r) = h.input_as(&[n, cb.max(1), hh, w], dtype, 1.0);
            let (gamma, gamma_r) = h.input_f32(&[c]);
            let (beta, beta_r) = h.input_f32(&[c]);
            let (mut out, mut out_r) = h.output(&[n, c, hh, w]);
            let (mut stats, mut stats_r) = h.output_as(&[n, groups, 2], Precision::F32);
            let (input, input_r) = if cb > 0 {
                (LayerInput::concat(&a, &bb), LayerInput::concat(&ar, &bb_r))
            } else {
                (LayerInput::one(&a), LayerInput::one(&ar))
            };
            b.group_norm(input, &gamma, &beta, groups, 1e-6, silu, &mut out, &mut stats);
            h.cpu.group_norm(input_r, &gamma_r, &beta_r, groups, 1e-6, silu, &mut out_r, &mut stats_r);
            let what = format!("group_norm {ca}+{cb} channels, {groups} groups, {hh}x{w}, silu {silu}");
            h.check(&what, &out, &out_r);
            h.check_within(&format!("{what}: stats"), &stats, &stats_r, 1e-5);
        }
    }
}
test_device!(group_norm, group_norm_op, ALL_DTYPES);

fn group_norm_backward_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "group_norm_backward");
    // (N, channels of a, channels of b, groups, H, W): the UNet's 32 groups (at 16x16 and 8x8, batch
    // 1 and 3), one group, an odd size, 8, 4 and 33 channels a group (group_norm_op says why):
    // every vector width of the element-wise kernel; one group of one sample in more chunks than a
    // warp has lanes; concats as the UNet's skips read them (2 and 3 channels a group), with 4
    // channels a group, and with a group across the two sources (3 channels a group, 8 + 4).
    let cases = [
        (1, 8, 0, 1, 96, 96),
        (1, 64, 0, 32, 16, 16),
        (3, 64, 0, 32, 8, 8),
        (2, 6, 0, 1, 5, 3),
        (1, 12, 0, 4, 3, 7),
        (2, 64, 0, 8, 3, 3),
        (1, 66, 0, 2, 3, 3),
        (2, 128, 0, 32, 3, 2),
        (2, 32, 0, 32, 4, 3),
        (2, 32, 32, 32, 4, 4),
        (1, 64, 32, 32, 3, 3),
        (2, 16, 8, 6, 3, 4),
        (2, 8, 4, 4, 3, 5),
        (1, 66, 0, 2, 12, 12),
        (2, 514, 0, 2, 2, 3),
    ];
    // (dout, dx) storage: f32 as in the plans; dx in the activations' type as where the UNet's plans
    // narrow it (a ResnetBlock's conv1 output gradient); both in it.
    let grad_dtypes = if dtype == Precision::F32 {
        vec![(dtype, dtype)]
    } else {
        vec![(Precision::F32, Precision::F32), (Precision::F32, dtype), (dtype, dtype)]
    };
    // Each source's store (either may be the first gradient to reach its tensor, as the UNet meets
    // them), alone and with the other path's gradient added (`plus`: a residual's, f32) and what
    // dx a then holds copied (the UNet's copy for its convolutions).
    let runs = [([Write, Add], false), ([Add, Write], true)];
    for (n, ca, cb, groups, hh, w) in cases {
        for silu in [false, true] {
            let c = ca + cb;
            let shape = [n, c, hh, w];
            let (a, ar) = h.input(&[n, ca, hh, w]);
            // An offset mean: the statistics must not cancel.
            let (skip, skip_r) = h.input_as(&[n, cb.max(1), hh, w], dtype, 1.0);
            let (x, xr) = if cb > 0 {
                (LayerInput::concat(&a, &skip), LayerInput::concat(&ar, &skip_r))
            } else {
                (LayerInput::one(&a), LayerInput::one(&ar))
            };
            let (gamma, gamma_r) = h.input_f32(&[c]);
            let (beta, beta_r) = h.input_f32(&[c]);
            // The forward's statistics, as the backward gets them.
            let (mut out, mut out_r) = h.output(&shape);
            let (mut stats, mut stats_r) = h.output_as(&[n, groups, 2], Precision::F32);
            b.group_norm(x, &gamma, &beta, groups, 1e-6, silu, &mut out, &mut stats);
            h.cpu.group_norm(xr, &gamma_r, &beta_r, groups, 1e-6, silu, &mut out_r, &mut stats_r);
            let what = format!("group_norm_backward {n}x({ca}+{cb})x{hh}x{w}, {groups} groups, silu {silu}");
            for &(dout_dtype, dx_dtype) in &grad_dtypes {
                let (dout, dout_r) = h.input_as(&shape, dout_dtype, 1.0);
                for (stores, with_plus) in runs {
                    let (plus, plus_r) = h.input_f32(&shape);
                    let (mut da, mut da_r) = gradient(&mut h, &[n, ca, hh, w], dx_dtype, stores[0]);
                    let (mut db, mut db_r) = gradient(&mut h, &[n, cb.max(1), hh, w], dx_dtype, stores[1]);
                    let (mut dx, mut dx_r) = if cb > 0 {
                        let dx_r = LayerGradient::concat(&mut da_r, stores[0], &mut db_r, stores[1]);
                        (LayerGradient::concat(&mut da, stores[0], &mut db, stores[1]), dx_r)
                    } else {
                        (LayerGradient::one(&mut da, stores[0]), LayerGradient::one(&mut da_r, stores[0]))
                    };
                    // The UNet's case (f32 dx, a 16-bit copy), and a copy wider than dx.
                    let copy_dtype = if dx_dtype == Precision::F32 { dtype } else { Precision::F32 };
                    let (mut copy, mut copy_r) = h.output_as(&[n, ca, hh, w], copy_dtype);
                    if with_plus {
                        (dx, dx_r) = (dx.plus(&plus), dx_r.plus(&plus_r));
                        (dx, dx_r) = (dx.copy_a_into(Some(&mut copy)), dx_r.copy_a_into(Some(&mut copy_r)));
                    }
                    b.group_norm_backward(x, &gamma, &beta, &stats, groups, silu, &dout, dx);
                    h.cpu.group_norm_backward(xr, &gamma_r, &beta_r, &stats_r, groups, silu, &dout_r, dx_r);
                    let run = format!("{dout_dtype} dout, {dx_dtype} dx, {stores:?}, plus and copy {with_plus}");
                    h.check(&format!("{what}: dx a ({run})"), &da, &da_r);
                    if cb > 0 {
                        h.check(&format!("{what}: dx b ({run})"), &db, &db_r);
                    }
                    if with_plus {
                        h.check(&format!("{what}: copy of dx a ({run})"), &copy, &copy_r);
                        // Exactly what dx a holds, rounded to the copy's type.
                        let held = b.download(&da).unwrap().into_iter().map(|v| round_to(copy_dtype, v));
                        let copied = b.download(&copy).unwrap();
                        assert!(held.eq(copied), "{what}: the copy of dx a is not what it holds ({run})");
                    }
                }
            }
        }
    }
}
test_device!(group_norm_backward, group_norm_backward_op, ALL_DTYPES);

/// GroupNorm with its partial kernels held to one chunk a (sample, group slice), as the statistics
/// scratch holds large batches: the 96x96 and 12x12 cases then give a thread more vectors than it
/// loads at once (the strided walk and the element-wise one), which the planned chunks never do.
#[test]
fn group_norm_in_one_chunk_on_the_emulator() {
    for dtype in [Precision::F32, Precision::Bf16] {
        let mut b = emulator(dtype);
        b.cap_groupnorm_chunks(1);
        group_norm_op(&b, dtype);
        group_norm_backward_op(&b, dtype);
    }
}

const DOWNSAMPLE: Conv2dGeometry = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };

/// Forward convolutions with many k-steps and few outputs at batch 2: the CUDA backend splits K for
/// them with 16-bit weights on a GPU of 16 SMs, the emulator's count
/// (`split_k_cases_split_on_the_emulator` checks that). (name, ca, cb, upsample, co, k, geometry, H)
type ForwardCase = (&'static str, usize, usize, bool, usize, usize, Conv2dGeometry, usize);
const CONV2D_SPLIT_K_CASES: [ForwardCase; 3] = [
    ("split-K 3x3 at 2x2 (M 8), 18 k-steps", 64, 0, false, 32, 3, Conv2dGeometry::same(1), 2),
    ("split-K upsample 2x2 -> 4x4 + concat", 32, 32, true, 24, 3, Conv2dGeometry::same(1), 2),
    ("split-K downsample 4x4 -> 2x2, 14 k-steps", 48, 0, false, 16, 3, DOWNSAMPLE, 4),
];

fn conv2d_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "conv2d");
    let cases = [
        ("3x3", 16, 0, false, 16, 3, Conv2dGeometry::same(1), 6),
        ("conv_in (3 channels)", 3, 0, false, 16, 3, Conv2dGeometry::same(1), 5),
        ("conv_in (3 channels, 128 out)", 3, 0, false, 128, 3, Conv2dGeometry::same(1), 5),
        ("concat 1x1 (nin_shortcut)", 16, 8, false, 16, 1, Conv2dGeometry::same(0), 4),
        ("upsample 3x3", 16, 0, true, 16, 3, Conv2dGeometry::same(1), 3),
        ("downsample (pad right/bottom, stride 2)", 16, 0, false, 16, 3, DOWNSAMPLE, 6),
    ];
    for (name, ca, cb, upsample, co, k, geometry, size) in cases.into_iter().chain(CONV2D_SPLIT_K_CASES) {
        let n = 2;
        let (a, ar) = h.input(&[n, ca, size, size]);
        let (bb, bb_r) = h.input(&[n, cb.max(1), size, size]);
        let (w, wr) = h.input_as(&[co, ca + cb, k, k], dtype, 0.3);
        let (bias, bias_r) = h.input_f32(&[co]);
        let logical = if upsample { 2 * size } else { size };
        let (oh, ow) = geometry.output_size(logical, logical, k, k);
        // Columns 2.. of a wider tensor, as the UNet's blocks read their share of one: every
        // kernel's epilogue (and split-K's reduction) steps rows by its width, not by Co.
        let cbias_column = 2;
        let (cbias, cbias_r) = h.input_f32(&[n, co + 6]);
        let (res, res_r) = h.input(&[n, co, oh, ow]);
        let (mut out, mut out_r) = h.output(&[n, co, oh, ow]);
        fn input<'t, T: TensorShape>(a: &'t T, b: &'t T, concat: bool, upsample: bool) -> LayerInput<'t, T> {
            LayerInput { a, b: concat.then_some(b), upsample2x: upsample }
        }
        let epilogue = ConvEpilogue {
            channel_bias: Some(&cbias),
            channel_bias_column: cbias_column,
            residual: Some(&res),
            relu: true,
        };
        let epilogue_r = ConvEpilogue {
            channel_bias: Some(&cbias_r),
            channel_bias_column: cbias_column,
            residual: Some(&res_r),
            relu: true,
        };
        b.conv2d(input(&a, &bb, cb > 0, upsample), &w, Some(&bias), geometry, epilogue, &mut out);
        h.cpu.conv2d(input(&ar, &bb_r, cb > 0, upsample), &wr, Some(&bias_r), geometry, epilogue_r, &mut out_r);
        h.check(&format!("conv2d {name}"), &out, &out_r);
    }
    // conv_in as 16-bit plans run it: x_t in f32 (at this size the SIMT tile, conv2d_version), 16
    // and 128 out.
    for co in [16, 128] {
        let (x, xr) = h.input_as(&[2, 3, 5, 5], Precision::F32, 1.0);
        let (w, wr) = h.input_as(&[co, 3, 3, 3], dtype, 0.3);
        let (bias, bias_r) = h.input_f32(&[co]);
        let (mut out, mut out_r) = h.output(&[2, co, 5, 5]);
        let same = Conv2dGeometry::same(1);
        b.conv2d(LayerInput::one(&x), &w, Some(&bias), same, ConvEpilogue::default(), &mut out);
        h.cpu.conv2d(LayerInput::one(&xr), &wr, Some(&bias_r), same, ConvEpilogue::default(), &mut out_r);
        h.check(&format!("conv2d conv_in (f32 x_t, {co} out)"), &out, &out_r);
    }
}
test_device!(conv2d, conv2d_op, ALL_DTYPES);

/// An input gradient's case: (name, ci, co, k, geometry, H, batch).
type BackwardCase = (&'static str, usize, usize, usize, Conv2dGeometry, usize, usize);
/// The geometries of the UNet and the classifiers.
const CONV2D_BACKWARD_INPUT_CASES: [BackwardCase; 8] = [
    ("3x3", 16, 24, 3, Conv2dGeometry::same(1), 6, 2),
    // conv_in's: with a 128-channel dout the narrow kernel on CUDA (a warp a dx pixel), with 16 the
    // tensor cores'. conv_out's at its size too.
    ("conv_in (3 channels)", 3, 16, 3, Conv2dGeometry::same(1), 5, 1),
    ("conv_in (3 channels, 128-channel dout)", 3, 128, 3, Conv2dGeometry::same(1), 6, 2),
    ("conv_out (3 channels)", 16, 3, 3, Conv2dGeometry::same(1), 5, 1),
    ("conv_out (3 channels, 128-channel dx)", 128, 3, 3, Conv2dGeometry::same(1), 6, 2),
    ("1x1", 24, 16, 1, Conv2dGeometry::same(0), 4, 3),
    ("downsample (pad right/bottom, stride 2)", 16, 16, 3, DOWNSAMPLE, 6, 2),
    ("classifier stride 2, pad 1", 8, 16, 3, Conv2dGeometry::strided(2, 1), 7, 2),
];
/// Input gradients with many k-steps and few dx positions, split on the emulator like
/// `CONV2D_SPLIT_K_CASES`.
const CONV2D_BACKWARD_INPUT_SPLIT_K_CASES: [BackwardCase; 5] = [
    ("split-K 3x3 at 3x3 (M 9), 18 k-steps", 32, 64, 3, Conv2dGeometry::same(1), 3, 1),
    ("split-K downsample, dx 4x4, 14 k-steps", 24, 48, 3, DOWNSAMPLE, 4, 2),
    ("split-K 1x1 at 2x2, 8 k-steps", 64, 256, 1, Conv2dGeometry::same(0), 2, 1),
    // dout by cp.async, the 5-channel weights element-wise (gather_w; conv_in's 3 channels take
    // the narrow kernel).
    ("split-K 5 channels under a 128-channel dout at 4x4, 36 k-steps", 5, 128, 3, Conv2dGeometry::same(1), 4, 1),
    // Co 36: 16-bit dout is gathered (not a multiple of 8), f32 dout by cp.async.
    ("split-K Co 36 at 3x3, 11 k-steps", 8, 36, 3, Conv2dGeometry::same(1), 3, 1),
];

/// dx = (and +=) the transposed convolution of dout (`gradient` says how dx starts for each
/// store). Gradients are f32 in the plans whatever the weights' type (the tensor-core kernel for
/// 16-bit weights); every case also runs with dout and dx in the weights' type.
fn conv2d_backward_input_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "conv2d_backward_input");
    let grad_dtypes = if dtype == Precision::F32 { vec![dtype] } else { vec![Precision::F32, dtype] };
    for (name, ci, co, k, geometry, size, n) in
        CONV2D_BACKWARD_INPUT_CASES.into_iter().chain(CONV2D_BACKWARD_INPUT_SPLIT_K_CASES)
    {
        for &grad_dtype in &grad_dtypes {
            let (oh, ow) = geometry.output_size(size, size, k, k);
            let (dout, dout_r) = h.input_as(&[n, co, oh, ow], grad_dtype, 1.0);
            let (w, wr) = h.input_as(&[co, ci, k, k], dtype, 0.3);
            for store in [Add, Write] {
                let (mut dx, mut dx_r) = gradient(&mut h, &[n, ci, size, size], grad_dtype, store);
                b.conv2d_backward_input(&dout, &w, geometry, &mut dx, store);
                h.cpu.conv2d_backward_input(&dout_r, &wr, geometry, &mut dx_r, store);
                h.check(&format!("conv2d_backward_input {name} ({grad_dtype} gradients, {store:?})"), &dx, &dx_r);
            }
        }
    }
}
test_device!(conv2d_backward_input, conv2d_backward_input_op, ALL_DTYPES);

/// On the CUDA backend with 16-bit weights, dout in f32 and the same dout rounded to the weights'
/// type give the same dx, bit for bit: the kernels round dout to the weights' type as they stage
/// it. `Unet::plan` relies on it to store the gradients that only a convolution reads in the
/// activations' type. (The CPU backend does not round dout, so it is not held to this.)
fn narrow_dout_gives_the_same_bits(b: &CudaBackend, dtype: Precision) {
    let cases = CONV2D_BACKWARD_INPUT_CASES.into_iter().chain(CONV2D_BACKWARD_INPUT_SPLIT_K_CASES);
    // Co = 12: f32 dout staged through registers (Co a multiple of 4), 16-bit dout gathered.
    let odd = ("Co 12 (16-bit dout gathered)", 16, 12, 3, Conv2dGeometry::same(1), 5, 2);
    for (seed, (name, ci, co, k, geometry, size, n)) in cases.chain([odd]).enumerate() {
        let (oh, ow) = geometry.output_size(size, size, k, k);
        let dout_shape = [n, co, oh, ow];
        let values = common::uniform(dout_shape.iter().product(), 0xD0D0 + seed as u64);
        let weights = common::uniform(co * ci * k * k, 0x3E3E + seed as u64);
        let w = b.upload_as(&weights, &[co, ci, k, k], dtype).unwrap();
        let dx = |dout_dtype: Precision| {
            let dout = b.upload_as(&values, &dout_shape, dout_dtype).unwrap();
            let mut dx = b.upload(&vec![f32::NAN; n * ci * size * size], &[n, ci, size, size]).unwrap();
            b.conv2d_backward_input(&dout, &w, geometry, &mut dx, Write);
            b.download(&dx).unwrap()
        };
        let (wide, narrow) = (dx(Precision::F32), dx(dtype));
        assert!(wide.iter().all(|v| v.is_finite()), "{name} ({dtype}): dx not written");
        let differ = wide.iter().zip(&narrow).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{name} ({dtype}): {differ} of {} dx values differ with dout rounded", wide.len());
    }
}

#[test]
fn narrow_dout_gives_the_same_bits_on_the_emulator() {
    for dtype in [Precision::Bf16, Precision::F16] {
        narrow_dout_gives_the_same_bits(&emulator(dtype), dtype);
    }
}

#[test]
fn narrow_dout_gives_the_same_bits_on_cuda() {
    match purifier::device::cuda_backend(Precision::Bf16) {
        Ok(b) => {
            narrow_dout_gives_the_same_bits(&b, Precision::Bf16);
            narrow_dout_gives_the_same_bits(&purifier::device::cuda_backend(Precision::F16).unwrap(), Precision::F16);
        }
        Err(e) => println!("skipped: no CUDA device ({e})"),
    }
}

/// The split-K cases above do split where the emulator backend runs them (16-bit weights, the
/// emulator's 16 SMs, the backend's workspace), so `conv2d::emulator` and
/// `conv2d_backward_input::emulator` check split-K through the backend, not only the unsplit kernel.
#[test]
fn split_k_cases_split_on_the_emulator() {
    use purifier::backend::cuda::conv::{
        self, Conv2dBackwardInputLaunch, Conv2dLaunch, Conv2dVersion, SplitKWorkspace, Upsampling,
    };
    use purifier::driver::emulated::EMULATED_MULTIPROCESSORS;
    let sms = EMULATED_MULTIPROCESSORS as usize;
    let workspace = SplitKWorkspace { ptr: 0x10000, bytes: SplitKWorkspace::bytes_for(sms), multiprocessors: sms };
    let bf16 = Precision::Bf16;
    let forward = |(ca, cb, co, k, geometry, size, batch), upsample| Conv2dLaunch {
        batch,
        height: size,
        width: size,
        channels_a: ca,
        channels_b: cb,
        upsample,
        out_channels: co,
        kernel_h: k,
        kernel_w: k,
        geometry,
        relu: true,
        input_dtype: bf16,
        weight_dtype: bf16,
        out_dtype: bf16,
        a: 0x1000,
        b: (cb > 0).then_some(0x2000),
        weight: 0x3000,
        bias: None,
        channel_bias: None,
        channel_bias_stride: co,
        residual: None,
        out: 0x4000,
    };
    let backward = |(ci, co, k, geometry, size, n), subpixel| Conv2dBackwardInputLaunch {
        batch: n,
        height: size,
        width: size,
        in_channels: ci,
        out_channels: co,
        kernel_h: k,
        kernel_w: k,
        geometry,
        dout_dtype: Precision::F32,
        weight_dtype: bf16,
        dx_dtype: Precision::F32,
        dout: 0x1000,
        weight: 0x2000,
        dx: 0x3000,
        accumulate: false,
        subpixel,
    };
    let split = |name: &str, version: Conv2dVersion| {
        assert!(matches!(version, Conv2dVersion::TensorCoreSplitK { slices } if slices > 1), "{name}: {version:?}");
    };
    for (name, ca, cb, upsample, co, k, geometry, size) in CONV2D_SPLIT_K_CASES {
        let upsample = if upsample { Upsampling::Nearest } else { Upsampling::None };
        let launch = forward((ca, cb, co, k, geometry, size, 2), upsample);
        split(name, conv::conv2d_version(&launch, true, Some(&workspace)));
    }
    for (name, ci, co, k, geometry, size, n) in CONV2D_BACKWARD_INPUT_SPLIT_K_CASES {
        let launch = backward((ci, co, k, geometry, size, n), false);
        split(name, conv::conv2d_backward_input_version(&launch, true, Some(&workspace)));
    }
    // upsample_conv2d's split-K case: 64 -> 32 at 2x2, its 4 phases of 4 positions.
    let same = Conv2dGeometry::same(1);
    let launch = forward((64, 0, 32, 3, same, 2, 1), Upsampling::SubPixel);
    split("sub-pixel", conv::conv2d_version(&launch, true, Some(&workspace)));
    let launch = backward((64, 32, 3, same, 2, 1), true);
    split("sub-pixel gradient", conv::conv2d_backward_input_version(&launch, true, Some(&workspace)));
}

/// `upsample_conv2d` and its input gradient (the UNet's Upsample in the sub-pixel form) against the
/// CPU's plain convolution of the upsampled input and its gradient, with the 3x3 weights the
/// sub-pixel form is folded from, unrounded (the backend under test holds the folded sums, rounded
/// once). Every epilogue term; odd channels (element-wise loads on the tensor cores); a case whose
/// K splits on the emulator. Cases: (name, Ci, Co, H, W, batch).
fn upsample_conv2d_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "upsample_conv2d");
    let same = Conv2dGeometry::same(1);
    let cases = [
        ("16 -> 24 at 3x3", 16, 24, 3, 3, 2),
        ("odd: 5 -> 7 at 5x4", 5, 7, 5, 4, 1),
        ("split-K: 64 -> 32 at 2x2, 8 k-steps", 64, 32, 2, 2, 1),
    ];
    for (name, ci, co, hh, ww, n) in cases {
        let w3 = h.values(co * ci * 9, 0.3);
        let w = b.upload_as(&subpixel_weights(&w3, co, ci), &[co, ci, 4, 4], dtype).unwrap();
        let wr = h.cpu.upload(&w3, &[co, ci, 3, 3]).unwrap();
        let (x, xr) = h.input(&[n, ci, hh, ww]);
        let (bias, bias_r) = h.input_f32(&[co]);
        let (cbias, cbias_r) = h.input_f32(&[n, co + 2]);
        let out_shape = [n, co, 2 * hh, 2 * ww];
        let (res, res_r) = h.input(&out_shape);
        let (mut out, mut out_r) = h.output(&out_shape);
        let epilogue =
            ConvEpilogue { channel_bias: Some(&cbias), channel_bias_column: 1, residual: Some(&res), relu: true };
        let epilogue_r =
            ConvEpilogue { channel_bias: Some(&cbias_r), channel_bias_column: 1, residual: Some(&res_r), relu: true };
        b.upsample_conv2d(&x, &w, Some(&bias), epilogue, &mut out);
        h.cpu.conv2d(LayerInput::upsampled(&xr), &wr, Some(&bias_r), same, epilogue_r, &mut out_r);
        h.check(&format!("upsample_conv2d {name}"), &out, &out_r);

        let grad_dtypes = if dtype == Precision::F32 { vec![dtype] } else { vec![Precision::F32, dtype] };
        for grad_dtype in grad_dtypes {
            let (dout, dout_r) = h.input_as(&out_shape, grad_dtype, 1.0);
            for store in [Add, Write] {
                let (mut dx, mut dx_r) = gradient(&mut h, &[n, ci, hh, ww], grad_dtype, store);
                b.upsample_conv2d_backward_input(&dout, &w, &mut dx, store);
                let mut dup = h.cpu.zeros(&[n, ci, 2 * hh, 2 * ww]).unwrap();
                h.cpu.conv2d_backward_input(&dout_r, &wr, same, &mut dup, Write);
                h.cpu.upsample_nearest2x_backward(&dup, &mut dx_r, store);
                let what = format!("upsample_conv2d_backward_input {name} ({grad_dtype} gradients, {store:?})");
                h.check(&what, &dx, &dx_r);
            }
        }
    }
}
test_device!(upsample_conv2d, upsample_conv2d_op, ALL_DTYPES);

fn attention_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "attention");
    for (n, c, hh, w) in [(2, 32, 4, 4), (1, 64, 3, 5)] {
        // q, k, v: the channel thirds of one tensor, as the UNet's fused projection writes them.
        let (qkv, qkv_r) = h.input(&[n, 3 * c, hh, w]);
        let (mut out, mut out_r) = h.output(&[n, c, hh, w]);
        let (mut lse, mut lse_r) = h.output_as(&[n, hh * w], Precision::F32);
        b.attention(&qkv, &mut out, &mut lse);
        h.cpu.attention(&qkv_r, &mut out_r, &mut lse_r);
        h.check(&format!("attention {n}x{c}x{hh}x{w}"), &out, &out_r);
        h.check(&format!("attention {n}x{c}x{hh}x{w}: logsumexp"), &lse, &lse_r);
    }
}
test_device!(attention, attention_op, ALL_DTYPES);

fn attention_backward_op<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "attention_backward");
    // (N, C, H, W): 16x16 and 8x8 positions (batch 1 and 3), 15 positions and 40 channels (neither a
    // multiple of a tile), 256 channels (the UNet's attention width; shared memory above 48 KB), and
    // 136 channels over 35 positions (C < D at D 256, where warps pair up; a partial streamed tile).
    for (n, c, hh, w) in [(1, 64, 16, 16), (3, 32, 8, 8), (2, 40, 3, 5), (1, 256, 4, 5), (2, 136, 5, 7)] {
        let (shape, qkv_shape) = ([n, c, hh, w], [n, 3 * c, hh, w]);
        let (qkv, qkv_r) = h.input(&qkv_shape);
        // The forward's out and log-sum-exp from the reference, the same values on both backends.
        let (mut out_r, mut lse_r) = (h.cpu.zeros_as(&shape, dtype).unwrap(), h.cpu.zeros(&[n, hh * w]).unwrap());
        h.cpu.attention(&qkv_r, &mut out_r, &mut lse_r);
        let out = b.upload_as(&out_r.data, &shape, dtype).unwrap();
        let lse = b.upload(&lse_r.data, &[n, hh * w]).unwrap();
        // Gradients are f32 in the plans; one case also stores them in the activation type.
        let grad_dtype = if c == 40 { dtype } else { Precision::F32 };
        let (dout, dout_r) = h.input_as(&shape, grad_dtype, 1.0);
        for store in [Add, Write] {
            let (mut dqkv, mut dqkv_r) = gradient(&mut h, &qkv_shape, grad_dtype, store);
            // Scratch poisoned too: nothing may be read from it before the op writes it.
            let (mut row_terms, mut row_terms_r) = h.output_as(&[n, hh * w], Precision::F32);
            let (mut dout_rounded, mut dout_rounded_r) = h.output_as(&shape, dtype);
            let scratch = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut dout_rounded };
            b.attention_backward(&qkv, &out, &lse, &dout, scratch, &mut dqkv, store);
            let scratch_r = AttentionScratch { row_terms: &mut row_terms_r, dout_rounded: &mut dout_rounded_r };
            h.cpu.attention_backward(&qkv_r, &out_r, &lse_r, &dout_r, scratch_r, &mut dqkv_r, store);
            h.check(&format!("attention_backward {n}x{c}x{hh}x{w} ({store:?}): dq, dk, dv"), &dqkv, &dqkv_r);
        }
    }
}
test_device!(attention_backward, attention_backward_op, ALL_DTYPES);

// ---- the sampler's ops ----

fn noise_is_bit_identical<B: Backend>(b: &B, dtype: Precision) {
    let h = Harness::new(b, dtype, "fill_gaussian");
    // Noise keyed per image (NHWC and plain layouts; images in any order, the last Philox block
    // of an image cut short).
    for (shape, images) in [(vec![2, 3, 5, 7], vec![9.0, 3.0]), (vec![3, 4099], vec![5.0, 0.0, 2.0])] {
        let (mut z, mut z_r) = h.output_as(&shape, Precision::F32);
        let indices = b.upload(&images, &[images.len()]).unwrap();
        let indices_r = h.cpu.upload(&images, &[images.len()]).unwrap();
        let seed = h.seed;
        b.fill_gaussian(&mut z, &indices, seed, 7);
        h.cpu.fill_gaussian(&mut z_r, &indices_r, seed, 7);
        b.synchronize().unwrap();
        assert_eq!(b.download(&z).unwrap(), z_r.data, "noise of shape {shape:?} differs from the CPU's (seed {seed})");
    }
}
test_device!(noise, noise_is_bit_identical, [Precision::F32]);

/// A three-row step table with distinct values in every column (the noise of row 1 off, row 2's
/// stream using all 64 bits), in both backends, and a cursor on row `row`.
fn step_table<B: Backend>(h: &mut Harness<'_, B>, row: usize) -> ((B::Tensor, CpuTensor), (B::Tensor, CpuTensor)) {
    let mut table = vec![0.0f32; 3 * STEP_COLUMNS];
    let user = h.values(3 * 4, 2.0);
    for r in 0..3 {
        let at = |c: StepColumn| r * STEP_COLUMNS + c as usize;
        table[at(StepColumn::SqrtAbar)] = 0.6 + 0.1 * r as f32;
        table[at(StepColumn::SqrtOneMinusAbar)] = 0.8 - 0.1 * r as f32;
        table[at(StepColumn::C0)] = 0.3 + 0.05 * r as f32;
        table[at(StepColumn::Ct)] = 0.65 - 0.05 * r as f32;
        table[at(StepColumn::NoiseStd)] = [0.2, 0.0, 0.1][r];
        table[at(StepColumn::UnetStep)] = [4.0, 17.0, 999.0][r];
        let stream = [7, 8, 0xFEDC_BA98_7654_3210][r];
        table[at(StepColumn::Seed)..][..4].copy_from_slice(&step_table_u64(h.seed));
        table[at(StepColumn::Stream)..][..4].copy_from_slice(&step_table_u64(stream));
        table[at(StepColumn::User0)..][..4].copy_from_slice(&user[r * 4..(r + 1) * 4]);
        table[at(StepColumn::One)] = 1.0;
    }
    let shape = [3, STEP_COLUMNS];
    let tables = (h.b.upload(&table, &shape).unwrap(), h.cpu.upload(&table, &shape).unwrap());
    let cursors = (h.b.upload(&[row as f32], &[1]).unwrap(), h.cpu.upload(&[row as f32], &[1]).unwrap());
    (tables, cursors)
}

fn reverse_step_ops<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "reverse-step ops");
    let shape = [2, 3, 4, 4];
    let ((table, table_r), (cursor, cursor_r)) = step_table(&mut h, 1);
    let k = StepSource { table: &table, cursor: &cursor };
    let k_r = StepSource { table: &table_r, cursor: &cursor_r };
    let (x, xr) = h.input_as(&shape, Precision::F32, 1.5);
    let (eps, eps_r) = h.input_as(&shape, Precision::F32, 1.5);
    let (mut x0, mut x0_r) = h.output_as(&shape, Precision::F32);
    let (mut mu, mut mu_r) = h.output_as(&shape, Precision::F32);
    b.predict_x0_and_mean(&x, &eps, k, &mut x0, &mut mu);
    h.cpu.predict_x0_and_mean(&xr, &eps_r, k_r, &mut x0_r, &mut mu_r);
    h.check("predict_x0_and_mean: x0_hat", &x0, &x0_r);
    h.check("predict_x0_and_mean: mu", &mu, &mu_r);
    let (mut u, mut u_r) = h.input_f32(&shape);
    b.mask_clipped(&x, &eps, k, &mut u);
    h.cpu.mask_clipped(&xr, &eps_r, k_r, &mut u_r);
    h.check("mask_clipped", &u, &u_r);
    for kappa in [0.5, 1e6, f32::INFINITY] {
        let (mut d, mut d_r) = h.input_f32(&shape);
        b.constrain_guidance(&mut d, &x, &mu, kappa);
        h.cpu.constrain_guidance(&mut d_r, &xr, &mu_r, kappa);
        h.check(&format!("constrain_guidance kappa {kappa}"), &d, &d_r);
    }
    let labels = [3.0f32, 0.0];
    let (lab, lab_r) = (b.upload(&labels, &[2]).unwrap(), h.cpu.upload(&labels, &[2]).unwrap());
    let (logits, logits_r) = h.input_as(&[2, 10], Precision::F32, 4.0);
    let (f, f_r) = h.input_f32(&[2, 16]);
    let (fref, fref_r) = h.input_f32(&[2, 16]);
    let (mut df, mut df_r) = h.output_as(&[2, 16], Precision::F32);
    let (mut dl, mut dl_r) = h.output_as(&[2, 10], Precision::F32);
    b.guidance_objective_grad(&f, &fref, &logits, &lab, 0.7, 1.3, &mut df, &mut dl);
    h.cpu.guidance_objective_grad(&f_r, &fref_r, &logits_r, &lab_r, 0.7, 1.3, &mut df_r, &mut dl_r);
    h.check("guidance_objective_grad: features", &df, &df_r);
    h.check("guidance_objective_grad: logits", &dl, &dl_r);
    let (mut ce, mut ce_r) = h.output_as(&[2, 10], Precision::F32);
    b.cross_entropy_grad(&logits, &lab, &mut ce);
    h.cpu.cross_entropy_grad(&logits_r, &lab_r, &mut ce_r);
    h.check("cross_entropy_grad", &ce, &ce_r);
    // More classes than ImageNet's: the kernels keep no per-class array.
    let (logits, logits_r) = h.input_as(&[2, 1500], Precision::F32, 4.0);
    let (mut ce, mut ce_r) = h.output_as(&[2, 1500], Precision::F32);
    b.cross_entropy_grad(&logits, &lab, &mut ce);
    h.cpu.cross_entropy_grad(&logits_r, &lab_r, &mut ce_r);
    h.check("cross_entropy_grad, 1500 classes", &ce, &ce_r);
}
test_device!(reverse_step, reverse_step_ops, [Precision::F32]);

/// The table-driven ops of a GPU-shaped step: the UNet's step indices and the cursor, the
/// guidance's axpby, the q-sample and the fused reverse step (with and without delta and noise),
/// on every backend against the CPU; and, on the CPU itself, the fused ops against the ops they
/// replace, bit for bit.
fn step_table_ops<B: Backend>(b: &B, dtype: Precision) {
    let mut h = Harness::new(b, dtype, "step-table ops");
    for row in 0..3 {
        let ((table, table_r), (mut cursor, mut cursor_r)) = step_table(&mut h, row);
        let step = StepSource { table: &table, cursor: &cursor };
        let step_r = StepSource { table: &table_r, cursor: &cursor_r };
        let (mut t, mut t_r) = h.output_as(&[3], Precision::F32);
        b.step_unet_indices(step, &mut t);
        h.cpu.step_unet_indices(step_r, &mut t_r);
        h.check(&format!("step_unet_indices row {row}"), &t, &t_r);

        let (x, x_r) = h.input(&[2, 3, 4, 4]);
        let (y, y_r) = h.input(&[2, 3, 4, 4]);
        let (mut out, mut out_r) = h.output(&[2, 3, 4, 4]);
        b.axpby_step(step, StepColumn::User1, &x, StepColumn::User3, &y, &mut out);
        h.cpu.axpby_step(step_r, StepColumn::User1, &x_r, StepColumn::User3, &y_r, &mut out_r);
        h.check(&format!("axpby_step row {row}"), &out, &out_r);

        // Noise per image, a sample length that is not a multiple of 4, images out of order.
        let images = [9.0, 3.0];
        let indices = (b.upload(&images, &[2]).unwrap(), h.cpu.upload(&images, &[2]).unwrap());
        let shape = [2, 3, 5, 7];
        let (x, x_r) = h.input_as(&shape, dtype, 1.0);
        let (mut x_t, mut x_t_r) = h.output_as(&shape, Precision::F32);
        b.q_sample(&x, &indices.0, step, &mut x_t);
        h.cpu.q_sample(&x_r, &indices.1, step_r, &mut x_t_r);
        h.check(&format!("q_sample row {row}"), &x_t, &x_t_r);

        let (eps, eps_r) = h.input_as(&shape, dtype, 1.5);
        let (delta, delta_r) = h.input_as(&shape, Precision::F32, 0.1);
        for with_delta in [false, true] {
            let (mut x_t, mut x_t_r) = h.input_as(&shape, Precision::F32, 1.5);
            let before = x_t_r.clone();
            b.reverse_step(&mut x_t, &eps, with_delta.then_some(&delta), &indices.0, step);
            h.cpu.reverse_step(&mut x_t_r, &eps_r, with_delta.then_some(&delta_r), &indices.1, step_r);
            h.check(&format!("reverse_step row {row}, delta {with_delta}"), &x_t, &x_t_r);

            // The CPU's fused step is the unfused sequence, bit for bit.
            let cpu = &h.cpu;
            let (mut x0, mut mu) = (cpu.zeros(&shape).unwrap(), cpu.zeros(&shape).unwrap());
            cpu.predict_x0_and_mean(&before, &eps_r, step_r, &mut x0, &mut mu);
            if with_delta {
                cpu.add_assign(&mut mu, &delta_r);
            }
            let table_row = &table_r.data[row * STEP_COLUMNS..(row + 1) * STEP_COLUMNS];
            let sigma = table_row[StepColumn::NoiseStd as usize];
            let expected = if sigma > 0.0 {
                let piece = |c: StepColumn| (0..4).map(|k| (table_row[c as usize + k] as u64) << (16 * k)).sum();
                let mut z = cpu.zeros(&shape).unwrap();
                cpu.fill_gaussian(&mut z, &indices.1, piece(StepColumn::Seed), piece(StepColumn::Stream));
                let mut next = cpu.zeros(&shape).unwrap();
                cpu.axpby(1.0, &mu, sigma, &z, &mut next);
                next
            } else {
                mu
            };
            assert_eq!(x_t_r.data, expected.data, "the CPU's fused reverse step changed bits (row {row})");
        }

        b.advance_step_cursor(&mut cursor, 1);
        h.cpu.advance_step_cursor(&mut cursor_r, 1);
        b.advance_step_cursor(&mut cursor, -3);
        h.cpu.advance_step_cursor(&mut cursor_r, -3);
        b.synchronize().unwrap();
        assert_eq!(b.download(&cursor).unwrap(), [row as f32 - 2.0]);
        assert_eq!(cursor_r.data, [row as f32 - 2.0]);
    }
}
test_device!(step_table, step_table_ops, [Precision::F32, Precision::Bf16]);

// ---- errors ----

/// A bad call is not a panic on the CUDA backend: it is stored, reported by `synchronize`, and
/// the backend works again afterwards.
#[test]
fn emulator_reports_bad_calls_through_synchronize() {
    let b = emulator(Precision::F32);
    let x = b.upload(&[1.0; 6], &[2, 3]).unwrap();
    let mut wrong = b.zeros(&[3, 2]).unwrap();
    b.axpby(1.0, &x, 1.0, &x, &mut wrong);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("axpby: out") && err.contains("[3, 2]"), "{err}");
    b.synchronize().expect("the error is reported once");
    let mut right = b.zeros(&[2, 3]).unwrap();
    b.axpby(1.0, &x, 1.0, &x, &mut right);
    assert_eq!(b.download(&right).unwrap(), vec![2.0; 6]);
}

/// A backend compiles the tensor-core kernels of its precision's 16-bit type only: a convolution in
/// the other one is an error naming why, not a panic, and the backend works on afterwards.
#[test]
fn emulator_names_the_precision_a_16_bit_kernel_needs() {
    let b = emulator(Precision::Bf16);
    let x = b.upload_as(&[0.5; 2 * 16 * 8 * 8], &[2, 16, 8, 8], Precision::F16).unwrap();
    let w = b.upload_as(&[0.1; 16 * 16 * 9], &[16, 16, 3, 3], Precision::F16).unwrap();
    let mut out = b.zeros_as(&[2, 16, 8, 8], Precision::F16).unwrap();
    let same = Conv2dGeometry::same(1);
    b.conv2d(LayerInput::one(&x), &w, None, same, ConvEpilogue::default(), &mut out);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("_f16") && err.contains("bf16 only"), "{err}");
    let x = b.upload(&[0.5; 2 * 16 * 8 * 8], &[2, 16, 8, 8]).unwrap();
    let w = b.upload(&[0.1; 16 * 16 * 9], &[16, 16, 3, 3]).unwrap();
    let mut out = b.zeros(&[2, 16, 8, 8]).unwrap();
    b.conv2d(LayerInput::one(&x), &w, None, same, ConvEpilogue::default(), &mut out);
    b.synchronize().unwrap();
    // An interior pixel sums all 16 x 9 taps of 0.5 x 0.1 (each rounded to bf16).
    let out = b.download(&out).unwrap();
    assert!((out[4 * 8 + 4] - 7.2).abs() < 0.05, "{}", out[4 * 8 + 4]);
}

/// The backward ops check their operands before launching anything: a wrong shape is an error
/// naming the operand, and the gradient is left as it was.
#[test]
fn emulator_backward_ops_report_bad_shapes() {
    let b = emulator(Precision::F32);
    let x = b.upload(&[0.5; 2 * 4 * 3 * 3], &[2, 4, 3, 3]).unwrap();
    let gamma = b.upload(&[1.0; 4], &[4]).unwrap();
    let beta = b.zeros(&[4]).unwrap();
    let wrong_stats = b.zeros(&[2, 4, 2]).unwrap();
    let mut dx = b.upload(&[0.25; 2 * 4 * 3 * 3], &[2, 4, 3, 3]).unwrap();
    let one = LayerInput::one(&x);
    b.group_norm_backward(one, &gamma, &beta, &wrong_stats, 2, true, &x, LayerGradient::one(&mut dx, Add));
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("group_norm_backward: stats") && err.contains("[2, 2, 2]"), "{err}");
    // A concat's gradient for one tensor's input.
    let (stats, mut other) = (b.zeros(&[2, 2, 2]).unwrap(), b.zeros(&[2, 4, 3, 3]).unwrap());
    let split = LayerGradient::concat(&mut dx, Add, &mut other, Add);
    b.group_norm_backward(one, &gamma, &beta, &stats, 2, true, &x, split);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("group_norm_backward: dx must be split as x is"), "{err}");
    let wrong_plus = b.zeros(&[2, 8, 3, 3]).unwrap();
    b.group_norm_backward(one, &gamma, &beta, &stats, 2, true, &x, LayerGradient::one(&mut dx, Add).plus(&wrong_plus));
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("group_norm_backward: plus") && err.contains("[2, 8, 3, 3]"), "{err}");
    // The attention's q, k, v are the thirds of one tensor: 3 x 4 channels over x's 4.
    let (qkv, mut dqkv) = (b.zeros(&[2, 12, 3, 3]).unwrap(), b.zeros(&[2, 12, 3, 3]).unwrap());
    let wrong_lse = b.zeros(&[2, 8]).unwrap();
    let (mut row_terms, mut wrong_row_terms) = (b.zeros(&[2, 9]).unwrap(), b.zeros(&[2, 8]).unwrap());
    let (mut dout_rounded, mut wrong_dout_rounded) = (b.zeros(&[2, 4, 3, 3]).unwrap(), b.zeros(&[2, 4, 9]).unwrap());
    let scratch = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut dout_rounded };
    b.attention_backward(&qkv, &x, &wrong_lse, &x, scratch, &mut dqkv, Add);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("attention_backward: logsumexp") && err.contains("[2, 9]"), "{err}");
    let lse = b.zeros(&[2, 9]).unwrap();
    let scratch = AttentionScratch { row_terms: &mut wrong_row_terms, dout_rounded: &mut dout_rounded };
    b.attention_backward(&qkv, &x, &lse, &x, scratch, &mut dqkv, Add);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("attention_backward: row_terms") && err.contains("[2, 9]"), "{err}");
    let scratch = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut wrong_dout_rounded };
    b.attention_backward(&qkv, &x, &lse, &x, scratch, &mut dqkv, Add);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("attention_backward: dout_rounded") && err.contains("[2, 4, 3, 3]"), "{err}");
    // A qkv whose channels are not three equal thirds, and a dqkv not of qkv's shape.
    let mut lse_out = b.zeros(&[2, 9]).unwrap();
    b.attention(&x, &mut dx, &mut lse_out);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("attention: qkv: 4 channels, not three equal thirds"), "{err}");
    let scratch = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut dout_rounded };
    b.attention_backward(&qkv, &x, &lse, &x, scratch, &mut dx, Add);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("attention_backward: dqkv") && err.contains("[2, 12, 3, 3]"), "{err}");
    // The sub-pixel upsample's weights must come in its form (Co x Ci x 4 x 4), not as 3x3.
    let w3 = b.zeros(&[4, 4, 3, 3]).unwrap();
    let mut dup = b.zeros(&[2, 4, 6, 6]).unwrap();
    b.upsample_conv2d(&x, &w3, None, ConvEpilogue::default(), &mut dup);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("upsample_conv2d: w [4, 4, 3, 3] is not the sub-pixel form"), "{err}");
    b.upsample_conv2d_backward_input(&dup, &w3, &mut dx, Add);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("upsample_conv2d_backward_input: w [4, 4, 3, 3]"), "{err}");
    assert_eq!(b.download(&dx).unwrap(), vec![0.25; 2 * 4 * 3 * 3], "nothing written on an error");
}

/// The table-driven ops refuse a step table of the wrong width, a cursor that is not one f32
/// element and image indices of the wrong count, through synchronize, writing nothing; a cursor
/// outside the table (which the sampler never moves it to; the CPU reference panics on it) makes
/// them write nothing and is reported by the next synchronize.
#[test]
fn emulator_step_ops_report_bad_tables() {
    let b = emulator(Precision::F32);
    let shape = [1, 3, 2, 2];
    let x = b.upload(&[0.5; 12], &shape).unwrap();
    let images = b.upload(&[0.0], &[1]).unwrap();
    let mut x_t = b.upload(&[0.25; 12], &shape).unwrap();
    let narrow = b.zeros(&[2, STEP_COLUMNS - 1]).unwrap();
    let cursor = b.zeros(&[1]).unwrap();
    b.q_sample(&x, &images, StepSource { table: &narrow, cursor: &cursor }, &mut x_t);
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("q_sample: a step table is rows x 20") && err.contains("[2, 19]"), "{err}");
    let table = b.upload(&[0.5; 2 * STEP_COLUMNS], &[2, STEP_COLUMNS]).unwrap();
    let long_cursor = b.zeros(&[2]).unwrap();
    b.reverse_step(&mut x_t, &x, None, &images, StepSource { table: &table, cursor: &long_cursor });
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("reverse_step: step cursor"), "{err}");
    let two_images = b.zeros(&[2]).unwrap();
    b.reverse_step(&mut x_t, &x, None, &two_images, StepSource { table: &table, cursor: &cursor });
    let err = b.synchronize().unwrap_err().to_string();
    assert!(err.contains("reverse_step: image_indices"), "{err}");
    // The cursor lives on the device: the kernels find it outside the table, write nothing and
    // set a fault that synchronize reports once; a half-way cursor (1.5) is outside too.
    for bad in [2.0, -1.0, 1.5] {
        let outside = b.upload(&[bad], &[1]).unwrap();
        b.reverse_step(&mut x_t, &x, None, &images, StepSource { table: &table, cursor: &outside });
        let err = b.synchronize().unwrap_err().to_string();
        assert!(err.contains("step cursor outside the step table"), "cursor {bad}: {err}");
        b.synchronize().expect("the fault is reported once");
        assert_eq!(b.download(&x_t).unwrap(), vec![0.25; 12], "nothing written (cursor {bad})");
    }
    b.reverse_step(&mut x_t, &x, None, &images, StepSource { table: &table, cursor: &cursor });
    b.synchronize().expect("a cursor inside the table runs");
    assert_ne!(b.download(&x_t).unwrap(), vec![0.25; 12]);
}

/// Kernels compiled on background threads are the ones the ops then use: every kernel file is
/// handed to the threads (twice over: the second call finds them under way or done), and an
/// element-wise op (its file still queued: compiled where it is needed), a convolution and the
/// attention (the tensor-core files, which the threads take first: waited for) agree with the CPU.
#[test]
fn emulator_compiles_kernels_in_background() {
    let b = emulator(Precision::Bf16);
    b.compile_kernels_in_background();
    b.compile_kernels_in_background();
    elementwise_ops(&b, Precision::Bf16);
    conv2d_op(&b, Precision::Bf16);
    attention_op(&b, Precision::Bf16);
}

/// The benchmark's compute ceiling: kernels/peak.cu runs (on the emulator: a few doublings of its
/// loop, which is the same code a GPU runs) and yields a finite, positive rate; the CPU has none.
#[test]
fn tensor_core_peak_is_measured_where_there_are_tensor_cores() {
    let rate = emulator(Precision::Bf16).tensor_core_peak().unwrap().expect("the CUDA backend measures it");
    assert!(rate.is_finite() && rate > 0.0, "rate {rate}");
    assert_eq!(CpuBackend.tensor_core_peak().unwrap(), None);
}
