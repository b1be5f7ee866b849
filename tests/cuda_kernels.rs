//! The convolution and attention kernels (kernels/conv2d.cu and conv2d_mma.cu, attention.cu and
//! attention_mma.cu) and their launchers (src/backend/cuda/{conv,attention}.rs). That they
//! compile for every architecture, that every kernel is one a launcher names, and ptxas's spill
//! report are tests/kernels_compile.rs's.
//! - one check body per op (`check_conv`, `check_attention`) over any `&dyn Driver`: fresh random
//!   inputs (the seed is printed), outputs poisoned with NaN, compared with the CPU reference
//!   backend on the same (rounded) inputs, transposed NCHW <-> NHWC on the host, within ENGINE.md's
//!   tolerances (relative L2 1e-5 f32, 1e-2 bf16/f16; NaN never passes). Every geometry, epilogue,
//!   upsample and concat combination the UNet and the classifiers use, odd channel counts, batch 1
//!   and 3, three full-size layers; run on the PTX emulator (sanitizers on) for both versions of
//!   each op and every storage-type combination they serve.
//!
//! NVRTC needs `LD_LIBRARY_PATH` to hold libnvrtc.so.13 and its builtins (CI installs it); without
//! it the compile tests fail, naming what is missing.
mod common;

use std::sync::Mutex;

use half::{bf16, f16};
use purifier::backend::cpu::CpuBackend;
use purifier::backend::cuda::attention::{
    self, AttentionBackwardLaunch, AttentionKernels, AttentionLaunch, AttentionVersion,
};
use purifier::backend::cuda::compile::{nvrtc_available, HalfTypes, ImageKind, KernelCompiler};
use purifier::backend::cuda::conv::{
    self, Conv2dBackwardInputLaunch, Conv2dKernels, Conv2dLaunch, Conv2dVersion, SplitKWorkspace, Upsampling,
};
use purifier::backend::{
    subpixel_weights, AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, GradientStore, LayerInput, Precision,
};
use purifier::driver::emulated::EmulatedDriver;
use purifier::driver::{DevicePtr, Driver, KernelArgs, LaunchConfig, Module, ModuleImage};

// ---------------------------------------------------------------------------------------------
// NVRTC, through the backend's compiler and its disk cache (kernels/*.cuh as in-memory headers),
// PTX for sm_80 (what the emulator runs), each module read or compiled once per test process.

fn compile_ptx(file: &str) -> String {
    static CACHE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    if let Some((_, ptx)) = CACHE.lock().unwrap().iter().find(|(name, _)| name == file) {
        return ptx.clone();
    }
    assert!(nvrtc_available(), "NVRTC is not loadable: put libnvrtc.so.13's folder on LD_LIBRARY_PATH");
    let compiler = KernelCompiler::new("sm_80").unwrap();
    let image = compiler.compile_file(file, ImageKind::Ptx).unwrap_or_else(|e| panic!("{file}: {e}"));
    let ptx = String::from_utf8(image).unwrap();
    CACHE.lock().unwrap().push((file.to_string(), ptx.clone()));
    ptx
}

// ---------------------------------------------------------------------------------------------
// Device helpers: host f32 values <-> device tensors of a storage type.

/// The values as the device stores them (rounded to the storage type), and their bytes.
fn encode(values: &[f32], dtype: Precision) -> (Vec<f32>, Vec<u8>) {
    match dtype {
        Precision::F32 => (values.to_vec(), bytemuck::cast_slice(values).to_vec()),
        Precision::Bf16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
            (v.iter().map(|x| x.to_f32()).collect(), bytemuck::cast_slice(&v).to_vec())
        }
        Precision::F16 => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            (v.iter().map(|x| x.to_f32()).collect(), bytemuck::cast_slice(&v).to_vec())
        }
    }
}

fn decode(bytes: &[u8], dtype: Precision) -> Vec<f32> {
    match dtype {
        Precision::F32 => bytemuck::cast_slice::<u8, f32>(bytes).to_vec(),
        Precision::Bf16 => bytemuck::cast_slice::<u8, bf16>(bytes).iter().map(|x| x.to_f32()).collect(),
        Precision::F16 => bytemuck::cast_slice::<u8, f16>(bytes).iter().map(|x| x.to_f32()).collect(),
    }
}

/// Device memory allocated by a check, freed when it ends (pass or fail).
struct Allocations<'a> {
    driver: &'a dyn Driver,
    pointers: Vec<DevicePtr>,
}

impl<'a> Allocations<'a> {
    fn new(driver: &'a dyn Driver) -> Self {
        Self { driver, pointers: Vec::new() }
    }
    /// Rounded values and the device copy.
    fn upload(&mut self, values: &[f32], dtype: Precision) -> (Vec<f32>, DevicePtr) {
        let (rounded, bytes) = encode(values, dtype);
        let ptr = self.driver.alloc(bytes.len().max(4)).unwrap();
        self.pointers.push(ptr);
        self.driver.copy_to_device(ptr, &bytes).unwrap();
        (rounded, ptr)
    }
    /// An output of `len` elements, every element NaN.
    fn poisoned(&mut self, len: usize, dtype: Precision) -> DevicePtr {
        let words = (len * dtype.bytes()).div_ceil(4);
        let ptr = self.driver.alloc(words * 4).unwrap();
        self.pointers.push(ptr);
        let nan = match dtype {
            Precision::F32 => 0x7fc0_0000,
            Precision::Bf16 => 0x7fc0_7fc0,
            Precision::F16 => 0x7e00_7e00,
        };
        self.driver.memset_u32(ptr, nan, words).unwrap();
        ptr
    }
    fn download(&self, ptr: DevicePtr, len: usize, dtype: Precision) -> Vec<f32> {
        let mut bytes = vec![0u8; len * dtype.bytes()];
        self.driver.copy_to_host(ptr, &mut bytes).unwrap();
        decode(&bytes, dtype)
    }
}

impl Drop for Allocations<'_> {
    fn drop(&mut self) {
        for &p in &self.pointers {
            let _ = self.driver.free(p);
        }
    }
}

/// A fresh seed per run (printed by the checks so a failure can be replayed with PURIFIER_TEST_SEED).
fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("PURIFIER_TEST_SEED").ok().and_then(|s| s.parse().ok()) {
        return s;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// ||out - reference|| / ||reference||; infinite when `out` holds a NaN or Inf.
fn relative_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out.iter().zip(reference).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn tolerance(dtypes: &[Precision]) -> f64 {
    if dtypes.iter().all(|&d| d == Precision::F32) {
        1e-5
    } else {
        1e-2
    }
}

/// An NHWC tensor (`plane` = H x W positions of `channels`) as NCHW, as the CPU backend holds it.
fn nhwc_to_nchw(v: &[f32], plane: usize, channels: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; v.len()];
    for s in 0..v.len() / (plane * channels).max(1) {
        for p in 0..plane {
            for ch in 0..channels {
                r[(s * channels + ch) * plane + p] = v[(s * plane + p) * channels + ch];
            }
        }
    }
    r
}

/// And back.
fn nchw_to_nhwc(v: &[f32], plane: usize, channels: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; v.len()];
    for s in 0..v.len() / (plane * channels).max(1) {
        for p in 0..plane {
            for ch in 0..channels {
                r[(s * plane + p) * channels + ch] = v[(s * channels + ch) * plane + p];
            }
        }
    }
    r
}

/// The sub-pixel form of 3x3 weights as the kernels store them ([Co][3][3][Ci] in, [Co][phase][tap][Ci]
/// out): `subpixel_weights` on the CPU backend's layout, back to the kernels' (16 taps a channel).
fn subpixel_device_weights(w: &[f32], out_channels: usize, in_channels: usize) -> Vec<f32> {
    let folded = subpixel_weights(&weights_to_oihw(w, out_channels, in_channels, 3), out_channels, in_channels);
    nchw_to_nhwc(&folded, 16, in_channels)
}

/// Convolution weights as the kernels store them, [Co][k][k][Ci], in the CPU backend's [Co][Ci][k][k].
fn weights_to_oihw(w: &[f32], out_channels: usize, in_channels: usize, k: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; w.len()];
    for co in 0..out_channels {
        for ch in 0..in_channels {
            for t in 0..k * k {
                r[(co * in_channels + ch) * k * k + t] = w[(co * k * k + t) * in_channels + ch];
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The convolution check.

#[derive(Clone, Debug)]
pub struct ConvCase {
    pub name: &'static str,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels_a: usize,
    pub channels_b: usize,
    pub upsample: Upsampling,
    pub out_channels: usize,
    pub kernel: usize,
    pub geometry: Conv2dGeometry,
    pub bias: bool,
    pub channel_bias: bool,
    pub residual: bool,
    pub relu: bool,
}

impl ConvCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        batch: usize,
        hw: usize,
        ca: usize,
        co: usize,
        kernel: usize,
        g: Conv2dGeometry,
    ) -> Self {
        Self {
            name,
            batch,
            height: hw,
            width: hw,
            channels_a: ca,
            channels_b: 0,
            upsample: Upsampling::None,
            out_channels: co,
            kernel,
            geometry: g,
            bias: true,
            channel_bias: false,
            residual: false,
            relu: false,
        }
    }
}

/// Every geometry + epilogue + upsample + concat combination of the UNet and the classifiers, at
/// small sizes with odd channel counts (not multiples of the tiles).
pub fn conv_cases() -> Vec<ConvCase> {
    let same1 = Conv2dGeometry::same(1);
    let same0 = Conv2dGeometry::same(0);
    let downsample = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
    vec![
        // UNet
        ConvCase::new("conv_in 3x3 (Ci 3)", 3, 9, 3, 19, 3, same1),
        ConvCase { channel_bias: true, ..ConvCase::new("resblock conv1 3x3 + temb bias", 3, 8, 24, 40, 3, same1) },
        ConvCase { residual: true, ..ConvCase::new("resblock conv2 3x3 + residual", 1, 8, 40, 40, 3, same1) },
        ConvCase { residual: true, ..ConvCase::new("1x1 (q/k/v, proj_out + residual)", 3, 7, 40, 33, 1, same0) },
        ConvCase::new("downsample 3x3 s2 pad right/bottom (even)", 3, 10, 24, 24, 3, downsample),
        ConvCase::new("downsample 3x3 s2 pad right/bottom (odd)", 1, 9, 16, 24, 3, downsample),
        ConvCase { upsample: Upsampling::Nearest, ..ConvCase::new("upsample x2 + 3x3", 3, 5, 24, 24, 3, same1) },
        ConvCase {
            upsample: Upsampling::SubPixel,
            ..ConvCase::new("sub-pixel upsample x2 + 3x3", 3, 5, 24, 24, 3, same1)
        },
        ConvCase {
            upsample: Upsampling::SubPixel,
            channels_b: 8,
            channel_bias: true,
            residual: true,
            relu: true,
            ..ConvCase::new("sub-pixel upsample, concat, every epilogue term", 2, 3, 16, 40, 3, same1)
        },
        ConvCase {
            channels_b: 16,
            residual: true,
            ..ConvCase::new("nin_shortcut 1x1 on concat(h, skip)", 3, 6, 24, 40, 1, same0)
        },
        ConvCase { channels_b: 8, ..ConvCase::new("3x3 on concat(h, skip)", 1, 6, 24, 16, 3, same1) },
        ConvCase {
            channels_b: 8,
            upsample: Upsampling::Nearest,
            ..ConvCase::new("upsample + concat + 3x3", 1, 4, 16, 12, 3, same1)
        },
        ConvCase::new("conv_out 3x3 (Co 3)", 1, 8, 32, 3, 3, same1),
        // Classifiers (batch-norm folded: bias; then ReLU, residual)
        ConvCase { relu: true, ..ConvCase::new("conv-bn-relu 3x3", 3, 8, 16, 16, 3, same1) },
        ConvCase {
            relu: true,
            ..ConvCase::new("3x3 stride 2 pad 1 + relu", 1, 8, 16, 32, 3, Conv2dGeometry::strided(2, 1))
        },
        ConvCase {
            residual: true,
            relu: true,
            ..ConvCase::new("basic block conv2 + shortcut + relu", 1, 8, 32, 32, 3, same1)
        },
        ConvCase {
            bias: false,
            ..ConvCase::new("WRN 1x1 stride-2 shortcut, no bias", 3, 8, 16, 32, 1, Conv2dGeometry::strided(2, 0))
        },
        ConvCase {
            channel_bias: true,
            residual: true,
            relu: true,
            ..ConvCase::new("every epilogue term", 1, 5, 20, 70, 3, same1)
        },
        // Full-size layers: cifar10-small level 0 (64 channels at 32x32), cifar10 level 1 on a skip
        // concat (256 + 256 -> 256 at 16x16), cifar10-small's last upsample (64 at 16x16 -> 32x32) in
        // the sub-pixel form the UNet runs.
        ConvCase {
            channel_bias: true,
            ..ConvCase::new("full size: 3x3 64 -> 64 at 32x32 + temb", 2, 32, 64, 64, 3, same1)
        },
        ConvCase {
            channels_b: 256,
            residual: true,
            ..ConvCase::new("full size: 1x1 concat 256+256 -> 256 at 16x16", 1, 16, 256, 256, 1, same0)
        },
        ConvCase {
            upsample: Upsampling::SubPixel,
            ..ConvCase::new("full size: sub-pixel upsample 16 -> 32, 3x3 64 -> 64", 1, 16, 64, 64, 3, same1)
        },
    ]
}

/// What one check of a kernel against the CPU found: the relative L2 error, the kernel that ran
/// and its output (NCHW, as the device stored it: split-K tests compare versions on it).
pub struct Checked {
    pub error: f64,
    pub kernel: String,
    pub output: Vec<f32>,
}

/// Runs one case on `driver` (split-K versions in `workspace`) and the CPU reference.
pub fn check_conv(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    case: &ConvCase,
    version: Conv2dVersion,
    [input_dtype, weight_dtype, out_dtype]: [Precision; 3],
    seed: u64,
    workspace: Option<&SplitKWorkspace>,
) -> Checked {
    let c = case;
    let ci = c.channels_a + c.channels_b;
    let (n, h, w) = (c.batch, c.height, c.width);
    let mut mem = Allocations::new(driver);
    let (a_host, a) = mem.upload(&common::uniform(n * h * w * c.channels_a, seed), input_dtype);
    let (b_host, b) = mem.upload(&common::uniform(n * h * w * c.channels_b, seed + 1), input_dtype);
    let weight_values: Vec<f32> =
        common::uniform(c.out_channels * c.kernel * c.kernel * ci, seed + 2).iter().map(|v| v * 0.3).collect();
    // The sub-pixel form folds the 3x3 weights in f32 and rounds the sums once: its reference is
    // the plain convolution on the unrounded 3x3 weights.
    let subpixel = c.upsample == Upsampling::SubPixel;
    let device_weights =
        if subpixel { subpixel_device_weights(&weight_values, c.out_channels, ci) } else { weight_values.clone() };
    let (w_stored, weight) = mem.upload(&device_weights, weight_dtype);
    let w_host = if subpixel { weight_values } else { w_stored };
    let (bias_host, bias) = mem.upload(&common::uniform(c.out_channels, seed + 3), Precision::F32);
    // Columns 1.. of rows 3 wider than Co (the UNet's blocks read their share of one tensor).
    let cbias_width = c.out_channels + 3;
    let (cbias_host, cbias) = mem.upload(&common::uniform(n * cbias_width, seed + 4), Precision::F32);

    let mut launch = Conv2dLaunch {
        batch: n,
        height: h,
        width: w,
        channels_a: c.channels_a,
        channels_b: c.channels_b,
        upsample: c.upsample,
        out_channels: c.out_channels,
        kernel_h: c.kernel,
        kernel_w: c.kernel,
        geometry: c.geometry,
        relu: c.relu,
        input_dtype,
        weight_dtype,
        out_dtype,
        a,
        b: (c.channels_b > 0).then_some(b),
        weight,
        bias: c.bias.then_some(bias),
        channel_bias: c.channel_bias.then_some(cbias + 4),
        channel_bias_stride: cbias_width,
        residual: None,
        out: 0,
    };
    let (oh, ow) = launch.output_size();
    let out_len = launch.output_len();
    let (residual_host, residual) = mem.upload(&common::uniform(out_len, seed + 5), out_dtype);
    launch.residual = c.residual.then_some(residual);
    launch.out = mem.poisoned(out_len, out_dtype);

    let kernel = conv::kernel_for(&launch, version).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    conv::launch_conv2d_version(driver, kernels, &launch, version, workspace)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    driver.synchronize().unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let out_nhwc = mem.download(launch.out, out_len, out_dtype);

    // The reference: the CPU backend on the same (rounded) values, NCHW, reading the same two
    // sources and upsample through its LayerInput.
    let k = c.kernel;
    let cpu = CpuBackend;
    let a_t = cpu.upload(&nhwc_to_nchw(&a_host, h * w, c.channels_a), &[n, c.channels_a, h, w]).unwrap();
    let b_t = cpu.upload(&nhwc_to_nchw(&b_host, h * w, c.channels_b), &[n, c.channels_b, h, w]).unwrap();
    let x = LayerInput { a: &a_t, b: (c.channels_b > 0).then_some(&b_t), upsample2x: c.upsample != Upsampling::None };
    let w_t = cpu.upload(&weights_to_oihw(&w_host, c.out_channels, ci, k), &[c.out_channels, ci, k, k]).unwrap();
    let bias_t = cpu.upload(&bias_host, &[c.out_channels]).unwrap();
    let cbias_t = cpu.upload(&cbias_host, &[n, cbias_width]).unwrap();
    let res_t =
        cpu.upload(&nhwc_to_nchw(&residual_host, oh * ow, c.out_channels), &[n, c.out_channels, oh, ow]).unwrap();
    let mut out_t = cpu.zeros(&[n, c.out_channels, oh, ow]).unwrap();
    let epilogue = ConvEpilogue {
        channel_bias: c.channel_bias.then_some(&cbias_t),
        channel_bias_column: 1,
        residual: c.residual.then_some(&res_t),
        relu: c.relu,
    };
    cpu.conv2d(x, &w_t, c.bias.then_some(&bias_t), c.geometry, epilogue, &mut out_t);
    let mut reference = cpu.download(&out_t).unwrap();
    if out_dtype != Precision::F32 {
        // What the device can at best store.
        reference = encode(&reference, out_dtype).0;
    }
    let output = nhwc_to_nchw(&out_nhwc, oh * ow, c.out_channels);
    Checked { error: relative_l2(&output, &reference), kernel, output }
}

// ---------------------------------------------------------------------------------------------
// The attention check.

/// (name, batch, H*W, channels): the UNet's attention at 16x16 and 4x4 (scaled down in channels
/// where the full size adds nothing), odd position and channel counts.
pub fn attention_cases() -> Vec<(&'static str, usize, usize, usize)> {
    vec![
        ("16x16, C 64", 1, 256, 64),
        ("4x4 (middle), C 256", 3, 16, 256),
        ("odd: 7x5 positions, C 40", 3, 35, 40),
        ("8x8, C 128", 1, 64, 128),
        // The backward's tiles (64 resident rows, 32 streamed; warp pairs at D 256): C < D at D 256
        // with a partial streamed tile, and two blocks the second of which is nearly empty.
        ("odd: 5x7 positions, C 136 (D 256)", 2, 35, 136),
        ("9x9, C 256", 1, 81, 256),
        ("full size: 16x16, C 256 (cifar10)", 2, 256, 256),
    ]
}

/// Runs one attention on `driver` and the CPU reference; returns the relative L2 errors of the
/// output and of the log-sum-exp. A key split uses `workspace`.
pub fn check_attention(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    (name, batch, positions, channels): (&str, usize, usize, usize),
    version: AttentionVersion,
    workspace: Option<&SplitKWorkspace>,
    dtype: Precision,
    seed: u64,
) -> (f64, f64) {
    let len = batch * positions * channels;
    let mut mem = Allocations::new(driver);
    // Queries scaled up so that the softmax is far from uniform.
    let q_values: Vec<f32> = common::uniform(len, seed).iter().map(|v| v * 4.0).collect();
    let (q_host, q) = mem.upload(&q_values, dtype);
    let (k_host, k) = mem.upload(&common::uniform(len, seed + 1), dtype);
    let (v_host, v) = mem.upload(&common::uniform(len, seed + 2), dtype);
    let out = mem.poisoned(len, dtype);
    let logsumexp = mem.poisoned(batch * positions, Precision::F32);
    let qkv_stride = channels;
    let launch = AttentionLaunch { batch, positions, channels, qkv_stride, dtype, q, k, v, out, logsumexp };
    attention::launch_attention_version(driver, kernels, &launch, version, workspace)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    driver.synchronize().unwrap_or_else(|e| panic!("{name}: {e}"));
    let out_nhwc = mem.download(out, len, dtype);
    let lse = mem.download(logsumexp, batch * positions, Precision::F32);

    let to_nchw = |v: &[f32]| nhwc_to_nchw(v, positions, channels);
    let cpu = CpuBackend;
    let shape = [batch, channels, positions, 1];
    let qkv = stack_thirds([&to_nchw(&q_host), &to_nchw(&k_host), &to_nchw(&v_host)], batch);
    let qkv_t = cpu.upload(&qkv, &[batch, 3 * channels, positions, 1]).unwrap();
    let mut out_t = cpu.zeros(&shape).unwrap();
    let mut lse_t = cpu.zeros(&[batch, positions]).unwrap();
    cpu.attention(&qkv_t, &mut out_t, &mut lse_t);
    let mut reference = cpu.download(&out_t).unwrap();
    if dtype != Precision::F32 {
        reference = encode(&reference, dtype).0;
    }
    (relative_l2(&to_nchw(&out_nhwc), &reference), relative_l2(&lse, &cpu.download(&lse_t).unwrap()))
}

/// The N x 3C x ... values (NCHW) whose channel thirds are the three N x C x ... tensors given: the
/// q/k/v tensor the reference attention reads.
fn stack_thirds(thirds: [&[f32]; 3], batch: usize) -> Vec<f32> {
    let sample = thirds[0].len() / batch;
    (0..batch)
        .flat_map(|n| thirds.into_iter().flat_map(move |t| t[n * sample..(n + 1) * sample].iter().copied()))
        .collect()
}

/// Third `which` (0 q, 1 k, 2 v) of N x 3C x ... values (NCHW).
fn third_of(values: &[f32], which: usize, batch: usize) -> Vec<f32> {
    let sample = values.len() / batch / 3;
    (0..batch).flat_map(|n| values[(3 * n + which) * sample..][..sample].iter().copied()).collect()
}

// ---------------------------------------------------------------------------------------------
// Launcher validation (no device needed: errors come before any launch).

fn valid_launch() -> Conv2dLaunch {
    Conv2dLaunch {
        batch: 1,
        height: 8,
        width: 8,
        channels_a: 16,
        channels_b: 0,
        upsample: Upsampling::None,
        out_channels: 16,
        kernel_h: 3,
        kernel_w: 3,
        geometry: Conv2dGeometry::same(1),
        relu: false,
        input_dtype: Precision::F32,
        weight_dtype: Precision::F32,
        out_dtype: Precision::F32,
        a: 0x1000,
        b: None,
        weight: 0x2000,
        bias: None,
        channel_bias: None,
        channel_bias_stride: 16,
        residual: None,
        out: 0x3000,
    }
}

#[test]
fn conv_launch_rejects_bad_shapes_with_a_message() {
    assert!(valid_launch().validate().is_ok());
    let cases: Vec<(Conv2dLaunch, &str)> = vec![
        (Conv2dLaunch { channels_b: 8, ..valid_launch() }, "no second input"),
        (Conv2dLaunch { b: Some(0x4000), ..valid_launch() }, "channels_b = 0"),
        (
            Conv2dLaunch { channel_bias: Some(0x4000), channel_bias_stride: 8, ..valid_launch() },
            "channel_bias rows 8 elements apart, fewer than the 16 output channels",
        ),
        (Conv2dLaunch { kernel_h: 11, ..valid_launch() }, "larger than the padded input"),
        (Conv2dLaunch { batch: 0, ..valid_launch() }, "empty input"),
        (Conv2dLaunch { out: 0, ..valid_launch() }, "null device pointer for `out`"),
        (Conv2dLaunch { input_dtype: Precision::Bf16, ..valid_launch() }, "f32 weights need f32 input"),
        (
            Conv2dLaunch { weight_dtype: Precision::Bf16, out_dtype: Precision::F16, ..valid_launch() },
            "output storage f16 with bf16 weights",
        ),
        (Conv2dLaunch { a: 0x1002, ..valid_launch() }, "not aligned"),
        (Conv2dLaunch { batch: 1 << 20, height: 64, width: 64, ..valid_launch() }, "the kernel indexes at most"),
    ];
    for (launch, expected) in cases {
        let err = launch.validate().expect_err(expected).to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
    let tc = Conv2dLaunch {
        weight_dtype: Precision::Bf16,
        input_dtype: Precision::Bf16,
        out_dtype: Precision::Bf16,
        ..valid_launch()
    };
    assert_eq!(conv::kernel_for(&tc, Conv2dVersion::TensorCore).unwrap(), "conv2d_mma_bf16_bf16_bf16");
    let odd = Conv2dLaunch { channels_a: 3, ..tc };
    assert_eq!(conv::kernel_for(&odd, Conv2dVersion::TensorCore).unwrap(), "conv2d_mma_gather_bf16_bf16_bf16");
    let f32_in = Conv2dLaunch { input_dtype: Precision::F32, ..tc };
    assert_eq!(conv::kernel_for(&f32_in, Conv2dVersion::TensorCore).unwrap(), "conv2d_mma_gather_f32_bf16_bf16");
    assert!(conv::kernel_for(&valid_launch(), Conv2dVersion::TensorCore).is_err());
}

#[test]
fn conv_backward_input_launch_checks_storage_types_and_picks_the_kernel() {
    let ok = Conv2dBackwardInputLaunch {
        batch: 1,
        height: 8,
        width: 8,
        in_channels: 16,
        out_channels: 16,
        kernel_h: 3,
        kernel_w: 3,
        geometry: Conv2dGeometry::same(1),
        dout_dtype: Precision::F32,
        weight_dtype: Precision::Bf16,
        dx_dtype: Precision::F32,
        dout: 0x1000,
        weight: 0x2000,
        dx: 0x3000,
        accumulate: true,
        subpixel: false,
    };
    let tc = Conv2dVersion::TensorCore;
    assert_eq!(conv::backward_input_kernel_for(&ok, tc).unwrap(), "conv2d_backward_input_mma_f32_bf16");
    // Ci = 3 (conv_in): dout still by cp.async, the weights element-wise; Co = 6 too: both.
    let odd = Conv2dBackwardInputLaunch { in_channels: 3, ..ok };
    assert_eq!(conv::backward_input_kernel_for(&odd, tc).unwrap(), "conv2d_backward_input_mma_gather_w_f32_bf16");
    let odder = Conv2dBackwardInputLaunch { out_channels: 6, ..odd };
    assert_eq!(conv::backward_input_kernel_for(&odder, tc).unwrap(), "conv2d_backward_input_mma_gather_f32_bf16");
    let half = Conv2dBackwardInputLaunch { dout_dtype: Precision::F16, weight_dtype: Precision::F16, ..ok };
    assert_eq!(conv::backward_input_kernel_for(&half, tc).unwrap(), "conv2d_backward_input_mma_f16_f16");
    // The SIMT kernel takes one storage type throughout, or an f32 dx unsplit (conv_out's at small
    // batch, below; dout in f32 or the weights' type); f32 weights have no tensor-core kernel.
    let simt = Conv2dVersion::Simt;
    assert_eq!(conv::backward_input_kernel_for(&ok, simt).unwrap(), "conv2d_backward_input_simt_f32_bf16_f32");
    let narrow_dout = Conv2dBackwardInputLaunch { dout_dtype: Precision::Bf16, ..ok };
    let name = conv::backward_input_kernel_for(&narrow_dout, simt).unwrap();
    assert_eq!(name, "conv2d_backward_input_simt_bf16_bf16_f32");
    let err = conv::backward_input_kernel_for(&ok, Conv2dVersion::SimtSplitK { slices: 2 }).unwrap_err().to_string();
    assert!(err.contains("one storage type throughout, or an f32 dx unsplit"), "{err}");
    let narrow_dx = Conv2dBackwardInputLaunch { dx_dtype: Precision::Bf16, ..ok };
    let err = conv::backward_input_kernel_for(&narrow_dx, simt).unwrap_err().to_string();
    assert!(err.contains("one storage type throughout"), "{err}");
    let f32_weights = Conv2dBackwardInputLaunch { weight_dtype: Precision::F32, ..ok };
    assert!(conv::backward_input_kernel_for(&f32_weights, tc).is_err());
    for (launch, expected) in [
        (Conv2dBackwardInputLaunch { dout_dtype: Precision::Bf16, ..f32_weights }, "f32 weights need f32 dout and dx"),
        (Conv2dBackwardInputLaunch { dx_dtype: Precision::F16, ..ok }, "bf16 weights take dout and dx in f32 or bf16"),
        (Conv2dBackwardInputLaunch { dx: 0x3002, ..ok }, "not aligned"),
        (Conv2dBackwardInputLaunch { kernel_h: 11, ..ok }, "larger than the padded input"),
    ] {
        let err = launch.validate().expect_err(expected).to_string();
        assert!(err.contains(expected) && err.contains("conv2d backward input:"), "expected `{expected}` in `{err}`");
    }
}

/// Split-K planning: only grids with fewer blocks than SMs split; at most 16 slices of at least 4
/// k-steps; every split fits the workspace sized from the SM count; a forced split never has an
/// empty slice; no workspace, no split.
#[test]
fn split_k_planning_fills_the_gpu_within_the_workspace() {
    for sms in [1, 16, 108, 132] {
        let tile_bytes = 128 * 64 * 4;
        for blocks in 1..=2 * sms {
            for k_tiles in 1..=160 {
                let slices = conv::split_k_slices(blocks, k_tiles, sms);
                assert!((1..=conv::SPLIT_K_MAX_SLICES).contains(&slices), "{blocks} blocks, {k_tiles}: {slices}");
                if blocks >= sms {
                    assert_eq!(slices, 1, "{blocks} blocks fill {sms} SMs");
                }
                if slices > 1 {
                    assert!(k_tiles / slices >= conv::SPLIT_K_MIN_SLICE_TILES, "{k_tiles} k-steps in {slices}");
                    assert!(slices * blocks * tile_bytes <= SplitKWorkspace::bytes_for(sms), "{blocks} x {slices}");
                }
            }
        }
    }
    // The UNet's 4x4 level at batch 1 on an H200: 1 x 4 blocks, 72 k-steps -> 16 slices of 4 or 5.
    assert_eq!(conv::split_k_slices(4, 72, 132), 16);
    assert_eq!(conv::split_k_slices(4, 72, 16), 8);

    let tc = Conv2dLaunch {
        weight_dtype: Precision::Bf16,
        input_dtype: Precision::Bf16,
        out_dtype: Precision::Bf16,
        channels_a: 128,
        out_channels: 256,
        height: 4,
        width: 4,
        ..valid_launch()
    };
    let workspace = SplitKWorkspace { ptr: 0x10000, bytes: SplitKWorkspace::bytes_for(132), multiprocessors: 132 };
    let version = conv::conv2d_version(&tc, true, Some(&workspace));
    assert_eq!(version, Conv2dVersion::TensorCoreSplitK { slices: 9 }, "36 k-steps, 4 blocks on 132 SMs");
    let plan = conv::plan_conv2d(&tc, version).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_mma_partial_bf16_bf16", [1, 4, 9]));
    let split = plan.split.unwrap();
    // 4096 outputs: a thread each.
    assert_eq!((split.reduce_kernel.as_str(), split.workspace_bytes), ("conv2d_split_reduce", 9 * 16 * 256 * 4));
    // From 2^18 outputs (batch 16 at 16x16: 128 blocks, split 3 ways) 4 channels a thread where every
    // access allows it, else 1.
    let level16 = Conv2dLaunch { batch: 16, height: 16, width: 16, ..tc };
    let version16 = conv::conv2d_version(&level16, true, Some(&workspace));
    assert_eq!(version16, Conv2dVersion::TensorCoreSplitK { slices: 3 });
    let split = conv::plan_conv2d(&level16, version16).unwrap().split.unwrap();
    assert_eq!(split.reduce_kernel, "conv2d_split_reduce_v4");
    assert_eq!(split.reduce_config.grid[0], (16 * 256 * 256 / 4 / 256) as u32);
    for scalar in [
        Conv2dLaunch { out: 0x3002, ..level16 },
        Conv2dLaunch { out_channels: 254, ..level16 },
        Conv2dLaunch { channel_bias: Some(0x5004), channel_bias_stride: 256, ..level16 },
        Conv2dLaunch { channel_bias: Some(0x5000), channel_bias_stride: 258, ..level16 },
    ] {
        let split = conv::plan_conv2d(&scalar, version16).unwrap().split.unwrap();
        assert_eq!(split.reduce_kernel, "conv2d_split_reduce", "{scalar:?}");
    }
    let with_channel_bias = Conv2dLaunch { channel_bias: Some(0x5000), channel_bias_stride: 512, ..level16 };
    let split = conv::plan_conv2d(&with_channel_bias, version16).unwrap().split.unwrap();
    assert_eq!(split.reduce_kernel, "conv2d_split_reduce_v4");
    assert_eq!(conv::conv2d_version(&tc, true, None), Conv2dVersion::TensorCore, "no workspace, no split");
    // Without conv2d_mma.cu, the SIMT tiles, split as well (1 x 4 blocks, 36 k-steps).
    assert_eq!(conv::conv2d_version(&tc, false, Some(&workspace)), Conv2dVersion::SimtSplitK { slices: 9 });
    // A full grid: the narrow tile (the forward's wide tile is off unless PURIFIER_CONV_WIDE=on:
    // slower on an H200, see switches::wide_conv_tiles), which the wide one can still run.
    let big = Conv2dLaunch { batch: 64, height: 32, width: 32, ..tc };
    assert_eq!(conv::conv2d_version(&big, true, Some(&workspace)), Conv2dVersion::TensorCore, "a full grid");
    let plan = conv::plan_conv2d(&big, Conv2dVersion::TensorCoreWide).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_mma_wide_bf16_bf16_bf16", [512, 2, 1]));
    assert_eq!(plan.config.dynamic_shared_bytes, 3 * (128 + 128) * 32 * 2);
    assert_eq!(conv::plan_conv2d(&big, Conv2dVersion::TensorCore).unwrap().config.dynamic_shared_bytes, 3 * 192 * 64);
    let gathered = Conv2dLaunch { input_dtype: Precision::F32, ..big };
    assert_eq!(conv::conv2d_version(&gathered, true, Some(&workspace)), Conv2dVersion::TensorCore);
    let err = conv::plan_conv2d(&gathered, Conv2dVersion::TensorCoreWide).unwrap_err().to_string();
    assert!(err.contains("only the cp.async loader"), "{err}");
    // Forced: 8 slices of a 6-k-step K (Ci 20, element-wise loader) run as 6.
    let odd = Conv2dLaunch { channels_a: 20, ..tc };
    let plan = conv::plan_conv2d(&odd, Conv2dVersion::TensorCoreSplitK { slices: 8 }).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid[2]), ("conv2d_mma_gather_partial_bf16_bf16", 6));
    assert!(conv::plan_conv2d(&odd, Conv2dVersion::TensorCoreSplitK { slices: 0 }).is_err());
    assert!(conv::plan_conv2d(&valid_launch(), Conv2dVersion::TensorCoreSplitK { slices: 2 }).is_err(), "f32");
    // f32 (the SIMT tiles of 64 x 64 x 16 k): the UNet's 4x4 level at batch 1, 1 x 4 blocks of 144
    // k-tiles (72 of the 32-k steps split_k_slices counts) -> 16 slices of 9; the reductions are the
    // tensor cores' own (conv2d.cu holds them).
    let f32_level = Conv2dLaunch { channels_a: 256, out_channels: 256, height: 4, width: 4, ..valid_launch() };
    let version = conv::conv2d_version(&f32_level, true, Some(&workspace));
    assert_eq!(version, Conv2dVersion::SimtSplitK { slices: 16 });
    assert_eq!(conv::conv2d_version(&f32_level, true, None), Conv2dVersion::Simt, "no workspace, no split");
    let plan = conv::plan_conv2d(&f32_level, version).unwrap();
    assert_eq!(
        (plan.kernel.as_str(), plan.config.grid, plan.config.block),
        ("conv2d_simt_partial_f32", [1, 4, 16], [256, 1, 1])
    );
    let split = plan.split.unwrap();
    assert_eq!(
        (split.reduce_kernel.as_str(), split.k_tiles, split.workspace_bytes),
        ("conv2d_split_reduce", 144, 16 * 16 * 256 * 4)
    );
    let f32_full = Conv2dLaunch { batch: 16, height: 32, width: 32, ..f32_level };
    assert_eq!(conv::conv2d_version(&f32_full, true, Some(&workspace)), Conv2dVersion::Simt, "a full grid");
    let mixed = Conv2dLaunch { out_dtype: Precision::F32, ..tc };
    let err = conv::plan_conv2d(&mixed, Conv2dVersion::SimtSplitK { slices: 3 }).unwrap_err().to_string();
    assert!(err.contains("one storage type throughout"), "{err}");
    // conv_in of a 16-bit plan (x_t in f32, 3 channels, one k-step): at batch 1 the gather's 16
    // blocks leave SMs idle and split-K cannot help, so the SIMT tile (f32 input kept); at batch 16
    // its 256 blocks fill the GPU: the tensor cores. Unsplit only (the partial kernels take one type).
    let conv_in = Conv2dLaunch { input_dtype: Precision::F32, channels_a: 3, height: 32, width: 32, ..tc };
    assert_eq!(conv::conv2d_version(&conv_in, true, Some(&workspace)), Conv2dVersion::Simt);
    let plan = conv::plan_conv2d(&conv_in, Conv2dVersion::Simt).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_simt_f32_bf16_bf16", [16, 4, 1]));
    let conv_in_16 = Conv2dLaunch { batch: 16, ..conv_in };
    assert_eq!(conv::conv2d_version(&conv_in_16, true, Some(&workspace)), Conv2dVersion::TensorCore);
    let err = conv::plan_conv2d(&conv_in, Conv2dVersion::SimtSplitK { slices: 2 }).unwrap_err().to_string();
    assert!(err.contains("an f32 input unsplit"), "{err}");
    let backward = Conv2dBackwardInputLaunch {
        batch: 1,
        height: 4,
        width: 4,
        in_channels: 256,
        out_channels: 256,
        kernel_h: 3,
        kernel_w: 3,
        geometry: Conv2dGeometry::same(1),
        dout_dtype: Precision::F32,
        weight_dtype: Precision::Bf16,
        dx_dtype: Precision::F32,
        dout: 0x1000,
        weight: 0x2000,
        dx: 0x3000,
        accumulate: false,
        subpixel: false,
    };
    let version = conv::conv2d_backward_input_version(&backward, true, Some(&workspace));
    assert_eq!(version, Conv2dVersion::TensorCoreSplitK { slices: 16 });
    let plan = conv::plan_conv2d_backward_input(&backward, version).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_backward_input_mma_partial_f32_bf16", [1, 4, 16]));
    assert_eq!(plan.split.unwrap().reduce_kernel, "conv2d_backward_input_split_reduce");
    let large = Conv2dBackwardInputLaunch { batch: 16, height: 16, width: 16, ..backward };
    let large_version = conv::conv2d_backward_input_version(&large, true, Some(&workspace));
    let split = conv::plan_conv2d_backward_input(&large, large_version).unwrap().split.unwrap();
    assert_eq!(split.reduce_kernel, "conv2d_backward_input_split_reduce_v4");
    let unaligned = Conv2dBackwardInputLaunch { dx: 0x3008, ..large };
    let split = conv::plan_conv2d_backward_input(&unaligned, large_version).unwrap().split.unwrap();
    assert_eq!(split.reduce_kernel, "conv2d_backward_input_split_reduce", "an f32 dx 8-byte aligned");
    // conv_out's input gradient (f32 dx, 3 output channels: one k-step) as conv_in's
    // forward: the SIMT tile at batch 1, the tensor cores at 16.
    let conv_out = Conv2dBackwardInputLaunch { height: 32, width: 32, in_channels: 128, out_channels: 3, ..backward };
    assert_eq!(conv::conv2d_backward_input_version(&conv_out, true, Some(&workspace)), Conv2dVersion::Simt);
    // The same kernel for a rounded dout (it must give the same bits).
    let rounded = Conv2dBackwardInputLaunch { dout_dtype: Precision::Bf16, ..conv_out };
    assert_eq!(conv::conv2d_backward_input_version(&rounded, true, Some(&workspace)), Conv2dVersion::Simt);
    let conv_out_16 = Conv2dBackwardInputLaunch { batch: 16, ..conv_out };
    let version = conv::conv2d_backward_input_version(&conv_out_16, true, Some(&workspace));
    assert_eq!(version, Conv2dVersion::TensorCore);
    // A full grid of the input gradient takes the wide tile where N (Ci) fills its 128 columns as
    // well as the narrow tile's 64.
    let big = Conv2dBackwardInputLaunch { batch: 64, height: 16, width: 16, ..backward };
    assert_eq!(conv::conv2d_backward_input_version(&big, true, Some(&workspace)), Conv2dVersion::TensorCoreWide);
    let plan = conv::plan_conv2d_backward_input(&big, Conv2dVersion::TensorCoreWide).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_backward_input_mma_wide_f32_bf16", [128, 2, 1]));
    assert_eq!(plan.config.dynamic_shared_bytes, 3 * (128 * 32 + 32 * 136) * 2);
    for ci in [64, 192] {
        let narrow = Conv2dBackwardInputLaunch { in_channels: ci, height: 32, width: 32, ..big };
        let version = conv::conv2d_backward_input_version(&narrow, true, Some(&workspace));
        assert_eq!(version, Conv2dVersion::TensorCore, "Ci {ci}");
    }
    // 80 wide blocks would leave SMs of 132 idle: the narrow tile's 160.
    let level = Conv2dBackwardInputLaunch { batch: 20, ..big };
    assert_eq!(conv::conv2d_backward_input_version(&level, true, Some(&workspace)), Conv2dVersion::TensorCore);
    let f32_backward = Conv2dBackwardInputLaunch {
        dout_dtype: Precision::F32,
        weight_dtype: Precision::F32,
        dx_dtype: Precision::F32,
        ..backward
    };
    let version = conv::conv2d_backward_input_version(&f32_backward, true, Some(&workspace));
    assert_eq!(version, Conv2dVersion::SimtSplitK { slices: 16 });
    let plan = conv::plan_conv2d_backward_input(&f32_backward, version).unwrap();
    assert_eq!((plan.kernel.as_str(), plan.config.grid), ("conv2d_backward_input_simt_partial_f32", [1, 4, 16]));
    assert_eq!(plan.split.unwrap().reduce_kernel, "conv2d_backward_input_split_reduce");
}

#[test]
fn attention_launch_rejects_bad_shapes_with_a_message() {
    // q, k, v the thirds of one tensor (rows of 3C), as the UNet runs them.
    let ok = AttentionLaunch {
        batch: 2,
        positions: 256,
        channels: 128,
        qkv_stride: 384,
        dtype: Precision::F32,
        q: 0x1000,
        k: 0x2000,
        v: 0x3000,
        out: 0x4000,
        logsumexp: 0x5000,
    };
    assert!(ok.validate().is_ok());
    for (launch, expected) in [
        (AttentionLaunch { channels: 512, ..ok }, "at most 256"),
        (AttentionLaunch { positions: 0, ..ok }, "empty input"),
        (AttentionLaunch { logsumexp: 0, ..ok }, "null device pointer for `logsumexp`"),
        (AttentionLaunch { dtype: Precision::Bf16, v: 0x3001, ..ok }, "not aligned"),
        (AttentionLaunch { qkv_stride: 127, ..ok }, "rows 127 elements apart, for 128 channels"),
    ] {
        let err = launch.validate().expect_err(expected).to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
    let bf16 = AttentionLaunch { dtype: Precision::Bf16, ..ok };
    assert_eq!(attention::kernel_for(&bf16, AttentionVersion::TensorCore).unwrap(), "attention_forward_mma_bf16_d128");
    assert_eq!(attention::kernel_for(&bf16, AttentionVersion::Simt).unwrap(), "attention_forward_bf16_c8");
    let odd = AttentionLaunch { channels: 36, qkv_stride: 108, ..bf16 };
    assert!(attention::kernel_for(&odd, AttentionVersion::TensorCore)
        .unwrap_err()
        .to_string()
        .contains("multiples of 8"));
    // Rows whose stride breaks the 16-byte copies (the SIMT kernel takes any stride).
    let odd_stride = AttentionLaunch { qkv_stride: 132, ..bf16 };
    assert!(attention::kernel_for(&odd_stride, AttentionVersion::TensorCore)
        .unwrap_err()
        .to_string()
        .contains("rows 132 apart"));
    assert!(attention::kernel_for(&odd_stride, AttentionVersion::Simt).is_ok());
    assert!(attention::kernel_for(&ok, AttentionVersion::TensorCore).is_err());
    // The backward: the forward's checks, then the gradients' pointers.
    let backward = AttentionBackwardLaunch {
        forward: bf16,
        dout: 0x6000,
        dout_dtype: Precision::F32,
        row_terms: 0xa000,
        dout_rounded: 0xb000,
        dq: 0x7000,
        dq_dtype: Precision::F32,
        dk: 0x8000,
        dk_dtype: Precision::F32,
        dv: 0x9000,
        dv_dtype: Precision::F32,
        grad_stride: 384,
        accumulate: true,
    };
    assert_eq!(attention::backward_kernel_for(&backward).unwrap(), "attention_backward_mma_bf16_d128");
    for (launch, expected) in [
        (AttentionBackwardLaunch { dk: 0, ..backward }, "null device pointer for `dk`"),
        (AttentionBackwardLaunch { row_terms: 0, ..backward }, "null device pointer for `row_terms`"),
        (AttentionBackwardLaunch { dout_rounded: 0xb001, ..backward }, "`dout_rounded` at 0xb001 is not aligned"),
        (AttentionBackwardLaunch { dout_rounded: 0xb008, ..backward }, "16-byte aligned q, k, v and dout_rounded"),
        (AttentionBackwardLaunch { dv: 0x9002, ..backward }, "`dv` at 0x9002 is not aligned"),
        (AttentionBackwardLaunch { forward: odd, ..backward }, "multiples of 8"),
        (AttentionBackwardLaunch { grad_stride: 100, ..backward }, "dq, dk, dv rows 100 elements apart"),
        (AttentionBackwardLaunch { forward: AttentionLaunch { positions: 0, ..bf16 }, ..backward }, "empty input"),
    ] {
        let err = attention::backward_kernel_for(&launch).expect_err(expected).to_string();
        assert!(err.contains(expected) && err.contains("attention backward:"), "expected `{expected}` in `{err}`");
    }
    // The tensor-core backward's shared tiles at D = 256 need more than a 99 KiB (sm_86/89) block
    // has: the backend runs the SIMT backward there; D = 128 fits.
    let wide = AttentionBackwardLaunch { forward: AttentionLaunch { channels: 256, ..bf16 }, ..backward };
    assert!(wide.tensor_cores_fit(163 * 1024) && !wide.tensor_cores_fit(99 * 1024));
    assert!(backward.tensor_cores_fit(99 * 1024));
}

// ---------------------------------------------------------------------------------------------
// On the PTX emulator (always, in CI) with its sanitizers on.

fn load_ptx(driver: &EmulatedDriver, file: &str) -> Module {
    driver.load_module(ModuleImage::Ptx(&compile_ptx(file))).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The split-K reductions' two forms (a thread an output, and 4 a thread, `_v4`, which the
/// launcher takes from 2^18 outputs, more than the emulator's UNet tests reach) on the same
/// partial sums: the same bits, every epilogue term on (bias, channel bias, residual, ReLU) and
/// dx accumulated, 16-bit outputs.
#[test]
fn emulator_split_reduce_forms_give_the_same_bits() {
    let driver = EmulatedDriver::new();
    let module = load_ptx(&driver, "conv2d.cu");
    let seed = fresh_seed();
    let mut mem = Allocations::new(&driver);
    let (slices, out_channels, bias_stride) = (3, 12, 16);
    let launch = Conv2dLaunch {
        batch: 2,
        height: 5,
        width: 6,
        channels_a: 8,
        out_channels,
        kernel_h: 1,
        kernel_w: 1,
        geometry: Conv2dGeometry::same(0),
        relu: true,
        channel_bias_stride: bias_stride,
        out_dtype: Precision::Bf16,
        ..valid_launch()
    };
    let total = 2 * 5 * 6 * out_channels;
    let (_, partials) = mem.upload(&common::uniform(slices * total, seed), Precision::F32);
    let (_, bias) = mem.upload(&common::uniform(out_channels, seed + 1), Precision::F32);
    let (_, channel_bias) = mem.upload(&common::uniform(2 * bias_stride, seed + 2), Precision::F32);
    let (_, residual) = mem.upload(&common::uniform(total, seed + 3), Precision::Bf16);
    let params = launch.params_bytes(false);
    let mut forward = |name: &str, per_thread: usize| {
        let out = mem.poisoned(total, Precision::Bf16);
        let args = KernelArgs::new()
            .ptr(partials)
            .i32(slices as i32)
            .ptr(bias)
            .ptr(channel_bias)
            .ptr(residual)
            .ptr(out)
            .i32(purifier::backend::cuda::dtype_code(Precision::Bf16))
            .bytes(&params);
        let config = LaunchConfig::linear((total / per_thread).div_ceil(64) as u32, 64);
        driver.launch(driver.function(module, name).unwrap(), config, &args).unwrap();
        driver.synchronize().unwrap_or_else(|e| panic!("{name}: {e}"));
        mem.download(out, total, Precision::Bf16)
    };
    let (scalar, vector) = (forward("conv2d_split_reduce", 1), forward("conv2d_split_reduce_v4", 4));
    assert!(scalar.iter().all(|v| v.is_finite()) && scalar.iter().any(|&v| v > 0.0), "{scalar:?}");
    assert!(scalar.iter().zip(&vector).all(|(a, b)| a.to_bits() == b.to_bits()), "forward: the forms differ");

    let (_, dx_start) = mem.upload(&common::uniform(total, seed + 4), Precision::Bf16);
    let mut backward = |name: &str, per_thread: usize| {
        let dx = mem.poisoned(total, Precision::Bf16);
        let mut start = vec![0u8; total * 2];
        driver.copy_to_host(dx_start, &mut start).unwrap();
        driver.copy_to_device(dx, &start).unwrap();
        let args = KernelArgs::new()
            .ptr(partials)
            .i32(slices as i32)
            .u64(total as u64)
            .ptr(dx)
            .i32(purifier::backend::cuda::dtype_code(Precision::Bf16))
            .i32(1);
        let config = LaunchConfig::linear((total / per_thread).div_ceil(64) as u32, 64);
        driver.launch(driver.function(module, name).unwrap(), config, &args).unwrap();
        driver.synchronize().unwrap_or_else(|e| panic!("{name}: {e}"));
        mem.download(dx, total, Precision::Bf16)
    };
    let scalar = backward("conv2d_backward_input_split_reduce", 1);
    let vector = backward("conv2d_backward_input_split_reduce_v4", 4);
    assert!(scalar.iter().all(|v| v.is_finite()), "{scalar:?}");
    assert!(scalar.iter().zip(&vector).all(|(a, b)| a.to_bits() == b.to_bits()), "input gradient: the forms differ");
}

/// An emulated device with the convolution kernels: version 1 only, or (`tensor_cores`) with
/// conv2d_mma.cu too.
fn emulated_conv_kernels(tensor_cores: bool) -> (EmulatedDriver, Conv2dKernels) {
    let driver = EmulatedDriver::new();
    let simt = load_ptx(&driver, "conv2d.cu");
    let mma = tensor_cores.then(|| (load_ptx(&driver, "conv2d_mma.cu"), HalfTypes::Both));
    let kernels = Conv2dKernels::load(&driver, simt, mma).unwrap();
    (driver, kernels)
}

/// The same for attention (attention.cu, and attention_mma.cu with `tensor_cores`).
fn emulated_attention_kernels(tensor_cores: bool) -> (EmulatedDriver, AttentionKernels) {
    let driver = EmulatedDriver::new();
    let simt = load_ptx(&driver, "attention.cu");
    let mma = tensor_cores.then(|| (load_ptx(&driver, "attention_mma.cu"), HalfTypes::Both));
    let kernels = AttentionKernels::load(&driver, simt, mma).unwrap();
    (driver, kernels)
}

fn run_attention_checks(driver: &dyn Driver, kernels: &AttentionKernels, version: AttentionVersion, dtype: Precision) {
    run_attention_checks_with(driver, kernels, |_| Some(version), None, dtype);
}

/// The attention cases with the version `version_for` gives each (None: skip it, said in the log).
fn run_attention_checks_with(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    version_for: impl Fn(usize) -> Option<AttentionVersion>,
    workspace: Option<&SplitKWorkspace>,
    dtype: Precision,
) {
    let seed = fresh_seed();
    let mut failures = Vec::new();
    for case in attention_cases() {
        let Some(version) = version_for(case.2) else {
            println!("attention {dtype} {:<30} not run: one key tile, nothing to split", case.0);
            continue;
        };
        let start = std::time::Instant::now();
        let (out_err, lse_err) = check_attention(driver, kernels, case, version, workspace, dtype, seed);
        let tol = tolerance(&[dtype]);
        println!(
            "attention {version:?} {dtype} {:<30} out rel L2 {out_err:.2e}, lse {lse_err:.2e} (tol {tol:.0e}, seed {seed}, {:.1} s)",
            case.0,
            start.elapsed().as_secs_f64()
        );
        if out_err.is_nan() || lse_err.is_nan() || out_err > tol || lse_err > 1e-5 {
            failures.push(format!("{}: out {out_err:e}, lse {lse_err:e}", case.0));
        }
    }
    assert!(failures.is_empty(), "attention {dtype} (seed {seed}) over tolerance: {failures:?}");
}

#[test]
fn emulator_conv_f32_every_fusion() {
    let (driver, kernels) = emulated_conv_kernels(false);
    run_conv_checks(&driver, &kernels, ConvOp::Forward, Conv2dVersion::Simt, [Precision::F32; 3]);
}

#[test]
fn emulator_attention_f32() {
    let (driver, kernels) = emulated_attention_kernels(false);
    run_attention_checks(&driver, &kernels, AttentionVersion::Simt, Precision::F32);
}

#[test]
fn emulator_conv_simt_bf16_and_f16() {
    let (driver, kernels) = emulated_conv_kernels(false);
    run_conv_checks(&driver, &kernels, ConvOp::Forward, Conv2dVersion::Simt, [Precision::Bf16; 3]);
    run_conv_checks(&driver, &kernels, ConvOp::Forward, Conv2dVersion::Simt, [Precision::F16; 3]);
}

#[test]
fn emulator_attention_bf16_and_f16() {
    let (driver, kernels) = emulated_attention_kernels(false);
    run_attention_checks(&driver, &kernels, AttentionVersion::Simt, Precision::Bf16);
    run_attention_checks(&driver, &kernels, AttentionVersion::Simt, Precision::F16);
}

/// Every storage-type combination the tensor-core kernels serve: 16-bit throughout (cp.async
/// loader where the channels allow, gather otherwise), f32 input (conv_in), f32 output (conv_out).
fn tensor_core_dtype_sets() -> Vec<[Precision; 3]> {
    let mut sets = Vec::new();
    for w in [Precision::Bf16, Precision::F16] {
        sets.extend([[w, w, w], [Precision::F32, w, w], [w, w, Precision::F32], [Precision::F32, w, Precision::F32]]);
    }
    sets
}

#[test]
fn emulator_conv_tensor_cores() {
    let (driver, kernels) = emulated_conv_kernels(true);
    for dtypes in tensor_core_dtype_sets() {
        run_conv_checks(&driver, &kernels, ConvOp::Forward, Conv2dVersion::TensorCore, dtypes);
    }
}

#[test]
fn emulator_attention_tensor_cores() {
    let (driver, kernels) = emulated_attention_kernels(true);
    run_attention_checks(&driver, &kernels, AttentionVersion::TensorCore, Precision::Bf16);
    run_attention_checks(&driver, &kernels, AttentionVersion::TensorCore, Precision::F16);
}

/// The backward of `forward` with f32 gradients, for the launchers' choices and errors: nothing is
/// launched, so the addresses are placeholders.
fn unlaunched_attention_backward(forward: AttentionLaunch) -> AttentionBackwardLaunch {
    AttentionBackwardLaunch {
        forward,
        dout: 0x6000,
        dout_dtype: Precision::F32,
        row_terms: 0x7000,
        dout_rounded: 0x8000,
        dq: 0x9000,
        dq_dtype: Precision::F32,
        dk: 0xa000,
        dk_dtype: Precision::F32,
        dv: 0xb000,
        dv_dtype: Precision::F32,
        grad_stride: 3 * forward.channels,
        accumulate: false,
    }
}

/// A bf16 attention of one sample at placeholder addresses, for the launchers' choices and errors
/// (nothing is launched).
fn unlaunched_attention(positions: usize, channels: usize) -> AttentionLaunch {
    AttentionLaunch {
        batch: 1,
        positions,
        channels,
        qkv_stride: 3 * channels,
        dtype: Precision::Bf16,
        q: 0x1000,
        k: 0x2000,
        v: 0x3000,
        out: 0x4000,
        logsumexp: 0x5000,
    }
}

/// The key split (version 3) on every case with more than one key tile (32 keys): three parts
/// where there are three tiles or more (uneven parts of 8 tiles; the last tile partial at 35 and 81
/// positions), else two.
#[test]
fn emulator_attention_split_keys() {
    let (driver, kernels) = emulated_attention_kernels(true);
    let (workspace, ptr) = split_k_workspace(&driver);
    let version_for = |positions: usize| {
        let tiles = positions.div_ceil(32);
        (tiles > 1).then(|| AttentionVersion::TensorCoreSplitKeys { splits: tiles.min(3) })
    };
    for dtype in [Precision::Bf16, Precision::F16] {
        run_attention_checks_with(&driver, &kernels, version_for, Some(&workspace), dtype);
    }
    // More parts than key tiles, one part, and a workspace too small: errors, nothing launched.
    let tiny = SplitKWorkspace { bytes: 1024, ..workspace };
    let launch = |positions| unlaunched_attention(positions, 64);
    let split = |splits| AttentionVersion::TensorCoreSplitKeys { splits };
    let err = attention::launch_attention_version(&driver, &kernels, &launch(64), split(3), Some(&workspace));
    assert!(err.unwrap_err().to_string().contains("3 key splits of 2 key tiles"));
    let err = attention::launch_attention_version(&driver, &kernels, &launch(256), split(1), Some(&workspace));
    assert!(err.unwrap_err().to_string().contains("1 key splits of 8 key tiles (2 parts or more"));
    let err = attention::launch_attention_version(&driver, &kernels, &launch(256), split(2), Some(&tiny));
    assert!(err.unwrap_err().to_string().contains("needs 133120 bytes of workspace, the backend has 1024"));
    // The launcher splits the UNet's batch-1 attention (16x16, 4 blocks of 64 queries) on 132 SMs.
    assert_eq!(attention::attention_version(&launch(256), true, Some(&workspace)), split(4));
    assert_eq!(attention::attention_version(&launch(256), true, None), AttentionVersion::TensorCore);
    driver.free(ptr).unwrap();
}

/// Version 1's key split (the f32 path): every case with more than one key tile (16 keys) in f32,
/// three parts where there are three tiles or more, else two; the merge is version 3's.
#[test]
fn emulator_attention_simt_split_keys() {
    let (driver, kernels) = emulated_attention_kernels(false);
    let (workspace, ptr) = split_k_workspace(&driver);
    let version_for = |positions: usize| {
        let tiles = positions.div_ceil(16);
        (tiles > 1).then(|| AttentionVersion::SimtSplitKeys { splits: tiles.min(3) })
    };
    run_attention_checks_with(&driver, &kernels, version_for, Some(&workspace), Precision::F32);
    let launch = |positions| AttentionLaunch { dtype: Precision::F32, ..unlaunched_attention(positions, 256) };
    let split = |splits| AttentionVersion::SimtSplitKeys { splits };
    let err = attention::launch_attention_version(&driver, &kernels, &launch(32), split(3), Some(&workspace));
    assert!(err.unwrap_err().to_string().contains("3 key splits of 2 key tiles"));
    // The f32 UNet's batch-1 attention (16x16, 32 blocks of 8 queries) on 132 SMs: 8 parts of 2 key
    // tiles (9 would give two blocks an SM; 2 tiles a part at the least); f32 never takes the
    // tensor cores.
    assert_eq!(attention::attention_version(&launch(256), true, Some(&workspace)), split(8));
    assert_eq!(attention::attention_version(&launch(256), true, None), AttentionVersion::Simt);
    assert_eq!(attention::kernel_for(&launch(256), split(8)).unwrap(), "attention_forward_f32_c16");
    driver.free(ptr).unwrap();
}

/// The input gradient of one case (its logical input: concat and upsample are the caller's) with
/// storage types `[dout, weights, dx]`: accumulated onto a random dx (`Add`: every dx element must
/// be updated: one left alone keeps its start value and is off by its whole gradient) or written
/// over a poisoned one (`Write`: one left alone stays NaN). Split-K versions use `workspace`.
#[allow(clippy::too_many_arguments)]
fn check_conv_backward_input(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    case: &ConvCase,
    version: Conv2dVersion,
    [dout_dtype, weight_dtype, dx_dtype]: [Precision; 3],
    seed: u64,
    store: GradientStore,
    workspace: Option<&SplitKWorkspace>,
) -> Checked {
    let c = case;
    // dx: the logical input (folded upsample: the caller folds it), or the stored one (sub-pixel).
    let subpixel = c.upsample == Upsampling::SubPixel;
    let factor = if c.upsample == Upsampling::Nearest { 2 } else { 1 };
    let (n, h, w) = (c.batch, c.height * factor, c.width * factor);
    let (ci, co, k) = (c.channels_a + c.channels_b, c.out_channels, c.kernel);
    let mut mem = Allocations::new(driver);
    let mut launch = Conv2dBackwardInputLaunch {
        batch: n,
        height: h,
        width: w,
        in_channels: ci,
        out_channels: co,
        kernel_h: k,
        kernel_w: k,
        geometry: c.geometry,
        dout_dtype,
        weight_dtype,
        dx_dtype,
        dout: 0,
        weight: 0,
        dx: 0,
        accumulate: store.accumulates(),
        subpixel,
    };
    let (oh, ow) = launch.output_size();
    let (dout_host, dout) = mem.upload(&common::uniform(n * oh * ow * co, seed), dout_dtype);
    let weight_values = common::uniform(co * k * k * ci, seed + 1);
    // (As the forward's check: the sub-pixel form's reference is the plain 3x3 weights, unrounded.)
    let device_weights = if subpixel { subpixel_device_weights(&weight_values, co, ci) } else { weight_values.clone() };
    let (w_stored, weight) = mem.upload(&device_weights, weight_dtype);
    let w_host = if subpixel { weight_values } else { w_stored };
    let (dx_host, dx) = match store {
        GradientStore::Add => mem.upload(&common::uniform(n * h * w * ci, seed + 2), dx_dtype),
        GradientStore::Write => (vec![0.0; n * h * w * ci], mem.poisoned(n * h * w * ci, dx_dtype)),
    };
    (launch.dout, launch.weight, launch.dx) = (dout, weight, dx);
    let kernel = conv::backward_input_kernel_for(&launch, version).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    conv::launch_conv2d_backward_input_version(driver, kernels, &launch, version, workspace)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    driver.synchronize().unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let dx_out = mem.download(dx, n * h * w * ci, dx_dtype);

    // The reference: the CPU on the same stored values (f32 dout unrounded: rounding it to the
    // weights' type is the kernel's, and within the tolerance); the sub-pixel form's through the
    // plain convolution's gradient on the upsampled input, then the upsample's.
    let cpu = CpuBackend;
    let dout_t = cpu.upload(&nhwc_to_nchw(&dout_host, oh * ow, co), &[n, co, oh, ow]).unwrap();
    let w_t = cpu.upload(&weights_to_oihw(&w_host, co, ci, k), &[co, ci, k, k]).unwrap();
    let mut dx_t = cpu.upload(&nhwc_to_nchw(&dx_host, h * w, ci), &[n, ci, h, w]).unwrap();
    if subpixel {
        let mut dup = cpu.zeros(&[n, ci, 2 * h, 2 * w]).unwrap();
        cpu.conv2d_backward_input(&dout_t, &w_t, c.geometry, &mut dup, GradientStore::Write);
        cpu.upsample_nearest2x_backward(&dup, &mut dx_t, store);
    } else {
        cpu.conv2d_backward_input(&dout_t, &w_t, c.geometry, &mut dx_t, store);
    }
    let mut reference = cpu.download(&dx_t).unwrap();
    if dx_dtype != Precision::F32 {
        reference = encode(&reference, dx_dtype).0;
    }
    let output = nhwc_to_nchw(&dx_out, h * w, ci);
    Checked { error: relative_l2(&output, &reference), kernel, output }
}

/// The convolution op a check runs: the forward, or the input gradient stored one way (`Add`:
/// every dx element must be updated; `Write`: none may be left NaN). One check harness serves both.
#[derive(Clone, Copy, Debug)]
enum ConvOp {
    Forward,
    BackwardInput(GradientStore),
}

impl ConvOp {
    #[allow(clippy::too_many_arguments)]
    fn check(
        self,
        driver: &dyn Driver,
        kernels: &Conv2dKernels,
        case: &ConvCase,
        version: Conv2dVersion,
        dtypes: [Precision; 3],
        seed: u64,
        workspace: Option<&SplitKWorkspace>,
    ) -> Checked {
        match self {
            ConvOp::Forward => check_conv(driver, kernels, case, version, dtypes, seed, workspace),
            ConvOp::BackwardInput(store) => {
                check_conv_backward_input(driver, kernels, case, version, dtypes, seed, store, workspace)
            }
        }
    }

    fn label(self) -> String {
        match self {
            ConvOp::Forward => "conv".into(),
            ConvOp::BackwardInput(store) => format!("conv backward input ({store:?})"),
        }
    }
}

/// Every case of `conv_cases` through `op` with one version and storage-type set, against the CPU.
fn run_conv_checks(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    op: ConvOp,
    version: Conv2dVersion,
    dtypes: [Precision; 3],
) {
    let seed = fresh_seed();
    let tol = tolerance(&dtypes);
    let mut failures = Vec::new();
    for case in conv_cases() {
        let start = std::time::Instant::now();
        let Checked { error: err, kernel, .. } = op.check(driver, kernels, &case, version, dtypes, seed, None);
        println!(
            "{} {kernel:<40} {:<45} rel L2 {err:.2e} (tol {tol:.0e}, seed {seed}, {:.1} s)",
            op.label(),
            case.name,
            start.elapsed().as_secs_f64()
        );
        // NaN compares false: it fails here.
        if err.is_nan() || err > tol {
            failures.push(format!("{}: {err:e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{} {version:?} {dtypes:?} (seed {seed}) over tolerance: {failures:?}", op.label());
}

/// The input-gradient checks over `conv_cases` accumulate onto a random dx (a dx element left alone
/// is off by its whole gradient); split-K checks both stores.
const ADD_INPUT_GRADIENT: ConvOp = ConvOp::BackwardInput(GradientStore::Add);

#[test]
fn emulator_conv_backward_input() {
    let (driver, kernels) = emulated_conv_kernels(false);
    for dtype in [Precision::F32, Precision::Bf16] {
        run_conv_checks(&driver, &kernels, ADD_INPUT_GRADIENT, Conv2dVersion::Simt, [dtype; 3]);
    }
}

/// The tensor-core input gradient over every forward geometry: f32 gradients against bf16 and f16
/// weights (what the plans' VJPs run), and 16-bit throughout; cp.async loaders where the channels
/// allow, element-wise (conv_in's Ci = 3, conv_out's Co = 3, odd counts) otherwise.
#[test]
fn emulator_conv_backward_input_tensor_cores() {
    let (driver, kernels) = emulated_conv_kernels(true);
    let f32 = Precision::F32;
    for w in [Precision::Bf16, Precision::F16] {
        for dtypes in [[f32, w, f32], [w, w, w]] {
            run_conv_checks(&driver, &kernels, ADD_INPUT_GRADIENT, Conv2dVersion::TensorCore, dtypes);
        }
    }
    // The mixed pairs once each (the kernel takes dout and dx types independently).
    for dtypes in [[f32, Precision::Bf16, Precision::Bf16], [Precision::F16, Precision::F16, f32]] {
        run_conv_checks(&driver, &kernels, ADD_INPUT_GRADIENT, Conv2dVersion::TensorCore, dtypes);
    }
}

/// A kernel that takes a warp a pixel (the narrow input gradient) on `cases` through each op of
/// `ops`, with every storage-type set a plan runs it with, against the CPU; with 1, 3 and 16 pixels
/// a warp, which must give the same bits (a pixel's sums depend on nothing else).
fn check_warp_pixel_kernel(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    ops: &[ConvOp],
    cases: &[ConvCase],
    version: fn(usize) -> Conv2dVersion,
    infix: &str,
) {
    let (f32, bf16, f16) = (Precision::F32, Precision::Bf16, Precision::F16);
    // [dout, weights, dx]: a 16-bit plan's f32 gradients, or its type.
    let dtype_sets =
        [[f32, f32, f32], [f32, bf16, f32], [bf16, bf16, bf16], [f32, f16, f32], [f16, f16, f16], [bf16, bf16, f32]];
    let seed = fresh_seed();
    let mut failures = Vec::new();
    for dtypes in dtype_sets {
        let tol = tolerance(&dtypes);
        for case in cases {
            for &op in ops {
                let runs: Vec<Checked> = [1, 3, 16]
                    .map(|pixels_per_warp| {
                        op.check(driver, kernels, case, version(pixels_per_warp), dtypes, seed, None)
                    })
                    .into();
                let same_bits = runs.iter().all(|r| bits(&r.output) == bits(&runs[0].output));
                let err = runs[0].error;
                println!(
                    "{} {:<40} {dtypes:?} {:<44} rel L2 {err:.2e} (tol {tol:.0e}, seed {seed}); 1, 3, 16 pixels a warp the same bits: {same_bits}",
                    op.label(),
                    runs[0].kernel,
                    case.name
                );
                if err.is_nan() || err > tol || !same_bits || !runs[0].kernel.contains(infix) {
                    failures.push(format!(
                        "{} {} {dtypes:?}: error {err:e}, same bits {same_bits}",
                        op.label(),
                        case.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{infix} kernels (seed {seed}): {failures:?}");
}

/// Padding that differs on every side (no layer has it; it tells the sides apart).
const UNEVEN_PADS: Conv2dGeometry = Conv2dGeometry { stride: 1, pad_top: 1, pad_left: 0, pad_bottom: 0, pad_right: 2 };

/// Both stores of an input gradient.
const BOTH_STORES: [ConvOp; 2] =
    [ConvOp::BackwardInput(GradientStore::Add), ConvOp::BackwardInput(GradientStore::Write)];

/// The narrow input gradient (version 4: a warp a dx pixel; conv_in's dx) over the layers it takes:
/// 1 to 4 input channels, 1x1 to 3x3, strides 1 and 2 with both paddings, Co 64 to 200 (two chunks
/// of 128, the second partial), conv_in at full size (`check_warp_pixel_kernel`). Then the same bits
/// at batch 1 and 3, and the launcher's choice and refusals.
#[test]
fn emulator_conv_backward_input_narrow() {
    let (driver, kernels) = emulated_conv_kernels(false);
    let same1 = Conv2dGeometry::same(1);
    let downsample = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
    let uneven = UNEVEN_PADS;
    let cases = [
        ConvCase::new("conv_in 3x3 (Ci 3, Co 68)", 3, 9, 3, 68, 3, same1),
        ConvCase::new("Ci 1, Co 64", 2, 7, 1, 64, 3, same1),
        ConvCase::new("Ci 4, Co 200 (two chunks)", 1, 6, 4, 200, 3, same1),
        ConvCase::new("Ci 2, downsample pad right/bottom", 2, 9, 2, 64, 3, downsample),
        ConvCase::new("Ci 3, 3x3 stride 2 pad 1", 1, 8, 3, 64, 3, Conv2dGeometry::strided(2, 1)),
        ConvCase::new("Ci 3, 1x1 (Co 96)", 3, 5, 3, 96, 1, Conv2dGeometry::same(0)),
        ConvCase::new("Ci 3, pads top 1, left 0, bottom 0, right 2", 2, 6, 3, 64, 3, uneven),
        ConvCase::new("full size: conv_in 3 <- 128 at 32x32", 2, 32, 3, 128, 3, same1),
    ];
    let narrow = |pixels_per_warp| Conv2dVersion::Narrow { pixels_per_warp };
    check_warp_pixel_kernel(&driver, &kernels, &BOTH_STORES, &cases, narrow, "_narrow_");
    let (f32, bf16) = (Precision::F32, Precision::Bf16);
    let seed = fresh_seed();

    // Batch invariance: the first sample of a batch of 3 has the bits of the batch of 1 (the
    // inputs' first sample is the same: the generator's stream is a prefix).
    let one = ConvCase::new("conv_in, batch 1", 1, 12, 3, 128, 3, same1);
    let three = ConvCase { batch: 3, ..one.clone() };
    let op = ConvOp::BackwardInput(GradientStore::Add);
    for dtypes in [[f32, bf16, f32], [f32, f32, f32]] {
        let alone = op.check(&driver, &kernels, &one, Conv2dVersion::Narrow { pixels_per_warp: 1 }, dtypes, seed, None);
        let batched =
            op.check(&driver, &kernels, &three, Conv2dVersion::Narrow { pixels_per_warp: 5 }, dtypes, seed, None);
        // NCHW: sample 0 is the first C x H x W values.
        assert_eq!(
            bits(&alone.output),
            bits(&batched.output[..alone.output.len()]),
            "{dtypes:?}: batch changed a sample's bits (seed {seed})"
        );
    }

    // The launcher takes it for conv_in's gradient at every batch, a warp 1 pixel at batch 1 and
    // 16 at 256 on 132 SMs; not for 5 channels; refuses what it cannot take by name.
    let workspace = SplitKWorkspace { ptr: 0x10000, bytes: SplitKWorkspace::bytes_for(132), multiprocessors: 132 };
    let conv_in = Conv2dBackwardInputLaunch {
        batch: 1,
        height: 32,
        width: 32,
        in_channels: 3,
        out_channels: 128,
        kernel_h: 3,
        kernel_w: 3,
        geometry: same1,
        dout_dtype: bf16,
        weight_dtype: bf16,
        dx_dtype: f32,
        dout: 0x1000,
        weight: 0x2000,
        dx: 0x3000,
        accumulate: false,
        subpixel: false,
    };
    for (batch, pixels_per_warp, blocks) in [(1, 1, 128), (16, 7, 293), (256, 16, 2048)] {
        let launch = Conv2dBackwardInputLaunch { batch, ..conv_in };
        let version = conv::conv2d_backward_input_version(&launch, true, Some(&workspace));
        assert_eq!(version, Conv2dVersion::Narrow { pixels_per_warp }, "batch {batch}");
        let plan = conv::plan_conv2d_backward_input(&launch, version).unwrap();
        assert_eq!(
            (plan.kernel.as_str(), plan.config.grid),
            ("conv2d_backward_input_narrow_bf16_bf16", [blocks, 1, 1])
        );
        assert_eq!(plan.config.dynamic_shared_bytes, 9 * 4 * 128 * 4);
    }
    let f32_plan = Conv2dBackwardInputLaunch { dout_dtype: f32, weight_dtype: f32, ..conv_in };
    assert!(matches!(conv::conv2d_backward_input_version(&f32_plan, false, None), Conv2dVersion::Narrow { .. }));
    let five = Conv2dBackwardInputLaunch { in_channels: 5, ..conv_in };
    assert!(!matches!(
        conv::conv2d_backward_input_version(&five, true, Some(&workspace)),
        Conv2dVersion::Narrow { .. }
    ));
    let narrow = Conv2dVersion::Narrow { pixels_per_warp: 4 };
    for (launch, expected) in [
        (five, "cannot take 5 input channels (at most 4)"),
        (Conv2dBackwardInputLaunch { kernel_h: 1, kernel_w: 5, ..conv_in }, "cannot take a 1x5 kernel (at most 3x3)"),
        (Conv2dBackwardInputLaunch { out_channels: 400, ..conv_in }, "cannot take 400 output channels (its weights"),
        (Conv2dBackwardInputLaunch { out_channels: 66, ..conv_in }, "cannot take 66 output channels at 0x1000"),
        // (The classifiers' first convolution keeps the tensor cores: 4 lanes of 32 would work.)
        (Conv2dBackwardInputLaunch { out_channels: 16, ..conv_in }, "cannot take 16 output channels (at least 64)"),
        (
            Conv2dBackwardInputLaunch { dout: 0x1004, ..conv_in },
            "cannot take 128 output channels at 0x1004 (4-channel loads)",
        ),
        (Conv2dBackwardInputLaunch { out_channels: 64, subpixel: true, ..conv_in }, "cannot take the sub-pixel form"),
    ] {
        let err = conv::plan_conv2d_backward_input(&launch, narrow).expect_err(expected).to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
    for pixels_per_warp in [0, 17] {
        let err = conv::plan_conv2d_backward_input(&conv_in, Conv2dVersion::Narrow { pixels_per_warp }).unwrap_err();
        assert!(err.to_string().contains("takes 1 to 16 pixels a warp"), "{err}");
    }
    let forward =
        Conv2dLaunch { out_channels: 3, weight_dtype: bf16, input_dtype: bf16, out_dtype: bf16, ..valid_launch() };
    let err = conv::plan_conv2d(&forward, narrow).unwrap_err().to_string();
    assert!(err.contains("computes input gradients only"), "{err}");
}

/// The bits of each value (NaN-safe equality).
fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The wide tile (128 x 128 a block, warps of 64 x 64) over every case its cp.async loaders take,
/// forward and input gradient (written and accumulated), the plans' storage types: within the
/// tolerance of the CPU and the same bits as the narrow tile (K is summed in the same order by
/// both). Cases with gathered loads must be refused by name.
#[test]
fn emulator_conv_wide_tile() {
    let (driver, kernels) = emulated_conv_kernels(true);
    let seed = fresh_seed();
    let f32 = Precision::F32;
    let mut runs = Vec::new();
    for w in [Precision::Bf16, Precision::F16] {
        runs.extend([(ConvOp::Forward, [w, w, w]), (ConvOp::Forward, [w, w, f32])]);
        runs.push((ConvOp::BackwardInput(GradientStore::Write), [f32, w, f32]));
    }
    runs.push((ADD_INPUT_GRADIENT, [f32, Precision::Bf16, f32]));
    runs.push((ADD_INPUT_GRADIENT, [Precision::Bf16, Precision::Bf16, Precision::Bf16]));
    let mut failures = Vec::new();
    let mut wide_runs = 0;
    for (op, dtypes) in runs {
        let tol = tolerance(&dtypes);
        for case in conv_cases() {
            let narrow = op.check(&driver, &kernels, &case, Conv2dVersion::TensorCore, dtypes, seed, None);
            if narrow.kernel.contains("gather") {
                let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    op.check(&driver, &kernels, &case, Conv2dVersion::TensorCoreWide, dtypes, seed, None)
                }));
                assert!(refused.is_err(), "{} {}: the wide tile took gathered loads", op.label(), case.name);
                continue;
            }
            let wide = op.check(&driver, &kernels, &case, Conv2dVersion::TensorCoreWide, dtypes, seed, None);
            wide_runs += 1;
            let same_bits = wide.output.iter().zip(&narrow.output).all(|(a, b)| a.to_bits() == b.to_bits());
            println!(
                "{} {:<44} {dtypes:?} {:<48} rel L2 {:.2e}, same bits as {}: {same_bits} (seed {seed})",
                op.label(),
                wide.kernel,
                case.name,
                wide.error,
                narrow.kernel
            );
            if !(wide.kernel.contains("_wide_") && wide.error <= tol && same_bits) {
                failures.push(format!(
                    "{} {} {dtypes:?}: error {:e}, same bits {same_bits}",
                    op.label(),
                    case.name,
                    wide.error
                ));
            }
        }
    }
    assert!(wide_runs >= 40, "only {wide_runs} cases took the wide tile");
    assert!(failures.is_empty(), "wide tile (seed {seed}): {failures:?}");
    // Its forward's tiles are conflict-free: 1.5 shared wavefronts an m16n8k16 on whole tiles
    // (tests/coalescing.rs holds the others to theirs through the backend, whose launcher no longer
    // picks the wide forward unless PURIFIER_CONV_WIDE=on).
    driver.kernel_totals(true);
    let whole = ConvCase::new("whole wide tiles", 8, 16, 128, 128, 3, Conv2dGeometry::same(1));
    let bf16 = Precision::Bf16;
    ConvOp::Forward.check(&driver, &kernels, &whole, Conv2dVersion::TensorCoreWide, [bf16; 3], seed, None);
    let totals = driver.kernel_totals(true);
    let t = &totals["conv2d_mma_wide_bf16_bf16_bf16"];
    let wavefronts = t.sm.shared_wavefronts as f64 / (t.sm.mma_macs as f64 / (16.0 * 8.0 * 16.0));
    assert!(t.sm.mma > 0 && (wavefronts - 1.5).abs() < 1e-9, "{wavefronts} shared wavefronts per mma, want 1.5");
}

// ---------------------------------------------------------------------------------------------
// Split-K (version 3): the tensor-core kernels with K cut into slices, f32 partial sums and a
// reduction that applies the epilogue. Checked against the CPU and against the unsplit kernel on the
// same inputs (the same products, only the order of the f32 sums differs), twice (the same bits
// every run).

/// A workspace on `driver` as large as a 132-SM GPU's (every forced split here fits).
fn split_k_workspace(driver: &dyn Driver) -> (SplitKWorkspace, DevicePtr) {
    let bytes = SplitKWorkspace::bytes_for(132);
    let ptr = driver.alloc(bytes).unwrap();
    (SplitKWorkspace { ptr, bytes, multiprocessors: 132 }, ptr)
}

/// Cases whose K runs over many k-steps (32 k each), at small M: M < 16, K not a multiple of 32, k-steps
/// not a multiple of the slices, every epilogue term, stride 2, upsample and concat folded in, the
/// element-wise loader (channels not multiples of 8), two channel tiles; with the slices to force.
fn split_k_cases() -> Vec<(ConvCase, usize)> {
    let same1 = Conv2dGeometry::same(1);
    let same0 = Conv2dGeometry::same(0);
    let downsample = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
    vec![
        // M = 9, K = 432: 14 k-steps (the last half full) in slices of 3, 4, 3, 4.
        (
            ConvCase {
                channel_bias: true,
                residual: true,
                relu: true,
                ..ConvCase::new("M 9, every epilogue term, 14 k-steps / 4", 1, 3, 48, 24, 3, same1)
            },
            4,
        ),
        // M = 2 x 4 x 4, K = 288: 9 k-steps in slices of 4, 5.
        (
            ConvCase {
                channel_bias: true,
                ..ConvCase::new("downsample s2, 9 k-steps / 2", 2, 8, 32, 40, 3, downsample)
            },
            2,
        ),
        // Upsample 3x3 -> 6x6 on concat(16, 24): K = 360, 12 k-steps in 8 slices of 1 or 2.
        (
            ConvCase {
                channels_b: 24,
                upsample: Upsampling::Nearest,
                residual: true,
                ..ConvCase::new("upsample + concat, 12 k-steps / 8", 1, 3, 16, 24, 3, same1)
            },
            8,
        ),
        // The same in the sub-pixel form: 4 phases of K = 160 (5 k-steps), 3 slices each (grid z
        // 12); its input gradient K = 16 taps x 24 (12 k-steps) in 3 slices of 4.
        (
            ConvCase {
                channels_b: 24,
                upsample: Upsampling::SubPixel,
                residual: true,
                channel_bias: true,
                ..ConvCase::new("sub-pixel upsample + concat, 5 k-steps / 3", 1, 3, 16, 24, 3, same1)
            },
            3,
        ),
        // Element-wise loader (Ci 20), Co 70 (two channel tiles, the last partial): 6 k-steps, 8
        // slices asked, one per k-step run.
        (ConvCase { relu: true, ..ConvCase::new("gather Ci 20, Co 70, 6 k-steps / 8", 1, 4, 20, 70, 3, same1) }, 8),
        // 1x1 on concat(96, 64) at 2x2: M = 4, 5 k-steps in slices of 2, 3.
        (
            ConvCase {
                channels_b: 64,
                residual: true,
                ..ConvCase::new("1x1 concat at 2x2, 5 k-steps / 2", 1, 2, 96, 32, 1, same0)
            },
            2,
        ),
        // The classifiers' stride 2, pad 1, K = 9 x 24 (7 k-steps), ReLU: slices 3, 4.
        (
            ConvCase {
                relu: true,
                ..ConvCase::new("stride 2 pad 1, 7 k-steps / 2", 1, 6, 24, 16, 3, Conv2dGeometry::strided(2, 1))
            },
            2,
        ),
        // The UNet's 4x4 level at batch 1 (channels halved): 36 k-steps, 9 slices of 4.
        (
            ConvCase {
                channel_bias: true,
                ..ConvCase::new("4x4 level, 128 ch, 36 k-steps / 9", 1, 4, 128, 128, 3, same1)
            },
            9,
        ),
    ]
}

/// How far split and unsplit outputs may differ: the f32 sums differ in their last bits, so an
/// output rounded to 16 bits may differ by one unit in the last place (2^-8 bf16, 2^-11 f16).
fn split_tolerance(out_dtype: Precision) -> f64 {
    match out_dtype {
        Precision::F32 => 1e-5,
        Precision::Bf16 => 1.0 / 256.0,
        Precision::F16 => 1.0 / 2048.0,
    }
}

#[test]
fn emulator_conv_split_k() {
    let (driver, kernels) = emulated_conv_kernels(true);
    let (workspace, ptr) = split_k_workspace(&driver);
    // A workspace too small for the slices: an error naming the sizes, nothing launched.
    let launch = Conv2dLaunch {
        weight_dtype: Precision::Bf16,
        input_dtype: Precision::Bf16,
        out_dtype: Precision::Bf16,
        channels_a: 128,
        ..valid_launch()
    };
    let tiny = SplitKWorkspace { bytes: 1024, ..workspace };
    let split = Conv2dVersion::TensorCoreSplitK { slices: 4 };
    let err = conv::launch_conv2d_version(&driver, &kernels, &launch, split, Some(&tiny)).unwrap_err().to_string();
    assert!(err.contains("needs 16384 bytes of workspace, the backend has 1024"), "{err}");
    let err = conv::launch_conv2d_version(&driver, &kernels, &launch, split, None).unwrap_err().to_string();
    assert!(err.contains("split-K needs a workspace"), "{err}");

    driver.free(ptr).unwrap();
    run_split_k_checks(&driver, &kernels, &[ConvOp::Forward], &tensor_core_dtype_sets(), TENSOR_CORE_SPLIT);
}

/// Version 1's split (the f32 plans' small grids): the same cases, f32 throughout, forward and both
/// input-gradient stores, against the unsplit SIMT kernel. Its k-tiles are 16 k, so the cases'
/// slices hold half the k-steps their names count and twice the tiles.
#[test]
fn emulator_conv_simt_split_k() {
    let (driver, kernels) = emulated_conv_kernels(false);
    let ops = [ConvOp::Forward, ConvOp::BackwardInput(GradientStore::Write), ADD_INPUT_GRADIENT];
    run_split_k_checks(&driver, &kernels, &ops, &[[Precision::F32; 3]], SIMT_SPLIT);
}

#[test]
fn emulator_conv_backward_input_split_k() {
    let (driver, kernels) = emulated_conv_kernels(true);
    let f32 = Precision::F32;
    // f32 gradients against bf16 and f16 weights (the plans' VJPs), 16-bit throughout, one mixed pair.
    let dtype_sets = [
        [f32, Precision::Bf16, f32],
        [f32, Precision::F16, f32],
        [Precision::Bf16, Precision::Bf16, Precision::Bf16],
        [Precision::F16, Precision::F16, Precision::F16],
        [f32, Precision::Bf16, Precision::Bf16],
    ];
    let ops = [ConvOp::BackwardInput(GradientStore::Write), ConvOp::BackwardInput(GradientStore::Add)];
    run_split_k_checks(&driver, &kernels, &ops, &dtype_sets, TENSOR_CORE_SPLIT);
}

/// A kernel family's unsplit version and its split one with a given number of slices.
type SplitVersions = (Conv2dVersion, fn(usize) -> Conv2dVersion);
const TENSOR_CORE_SPLIT: SplitVersions =
    (Conv2dVersion::TensorCore, |slices| Conv2dVersion::TensorCoreSplitK { slices });
const SIMT_SPLIT: SplitVersions = (Conv2dVersion::Simt, |slices| Conv2dVersion::SimtSplitK { slices });

/// Every split-K case through each of `ops` and storage-type set: the unsplit kernel of `versions`,
/// then the split one twice on the same inputs; each within the tolerance of the CPU, split and
/// unsplit within `split_tolerance` of each other, and the same bits both times.
fn run_split_k_checks(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    ops: &[ConvOp],
    dtype_sets: &[[Precision; 3]],
    (unsplit_version, split_version): SplitVersions,
) {
    let (workspace, ptr) = split_k_workspace(driver);
    let seed = fresh_seed();
    let mut failures = Vec::new();
    for &dtypes in dtype_sets {
        let tol = tolerance(&dtypes);
        for (case, slices) in split_k_cases() {
            for &op in ops {
                let start = std::time::Instant::now();
                let split = split_version(slices);
                let check = |version, workspace| op.check(driver, kernels, &case, version, dtypes, seed, workspace);
                let unsplit = check(unsplit_version, None);
                let first = check(split, Some(&workspace));
                let again = check(split, Some(&workspace));
                let apart = relative_l2(&first.output, &unsplit.output);
                let same_bits = first.output.iter().zip(&again.output).all(|(a, b)| a.to_bits() == b.to_bits());
                println!(
                    "{} split-K {:<44} {dtypes:?} {:<52} rel L2 {:.2e} (unsplit {:.2e}, apart {apart:.2e}; \
                     seed {seed}, {:.1} s)",
                    op.label(),
                    first.kernel,
                    case.name,
                    first.error,
                    unsplit.error,
                    start.elapsed().as_secs_f64()
                );
                if !(first.error <= tol && unsplit.error <= tol && apart <= split_tolerance(dtypes[2]) && same_bits) {
                    failures.push(format!(
                        "{} {} {dtypes:?}: error {:e}, unsplit {:e}, apart {apart:e}, same bits twice: {same_bits}",
                        op.label(),
                        case.name,
                        first.error,
                        unsplit.error
                    ));
                }
            }
        }
    }
    driver.free(ptr).unwrap();
    assert!(failures.is_empty(), "split-K (seed {seed}): {failures:?}");
}

/// The attention backward on one case (the tensor cores' for 16-bit `dtype`, attention.cu's SIMT
/// kernels for f32) with gradients (dout, dq, dk, dv) in `grad_dtype`: q, k, v fresh in `dtype`, out and the log-sum-exp from the CPU's forward, dq, dk,
/// dv accumulated onto small random values; returns the relative L2 errors of dq, dk, dv and the
/// kernels that ran. `splits` > 1 splits the streamed rows (parts in `workspace`).
#[allow(clippy::too_many_arguments)]
fn check_attention_backward(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    (name, batch, positions, channels): (&str, usize, usize, usize),
    dtype: Precision,
    grad_dtype: Precision,
    splits: usize,
    workspace: Option<&SplitKWorkspace>,
    seed: u64,
) -> ([f64; 3], String) {
    let len = batch * positions * channels;
    let mut mem = Allocations::new(driver);
    let q_values: Vec<f32> = common::uniform(len, seed).iter().map(|v| v * 4.0).collect();
    let (q_host, q) = mem.upload(&q_values, dtype);
    let (k_host, k) = mem.upload(&common::uniform(len, seed + 1), dtype);
    let (v_host, v) = mem.upload(&common::uniform(len, seed + 2), dtype);
    let (dout_host, dout) = mem.upload(&common::uniform(len, seed + 3), grad_dtype);
    let small: Vec<f32> = common::uniform(3 * len, seed + 4).iter().map(|v| v * 0.01).collect();
    let (dq_host, dq) = mem.upload(&small[..len], grad_dtype);
    let (dk_host, dk) = mem.upload(&small[len..2 * len], grad_dtype);
    let (dv_host, dv) = mem.upload(&small[2 * len..], grad_dtype);

    let to_nchw = |v: &[f32]| nhwc_to_nchw(v, positions, channels);
    let to_nhwc = |v: &[f32]| nchw_to_nhwc(v, positions, channels);
    // The forward on the CPU (its out rounded to the storage type, as a plan keeps it).
    let cpu = CpuBackend;
    let shape = [batch, channels, positions, 1];
    let up = |v: &[f32]| cpu.upload(&to_nchw(v), &shape).unwrap();
    let qkv_shape = [batch, 3 * channels, positions, 1];
    let stacked = |[a, b, c]: [&[f32]; 3]| stack_thirds([&to_nchw(a), &to_nchw(b), &to_nchw(c)], batch);
    let qkv_t = cpu.upload(&stacked([&q_host, &k_host, &v_host]), &qkv_shape).unwrap();
    let mut out_t = cpu.zeros_as(&shape, dtype).unwrap();
    let mut lse_t = cpu.zeros(&[batch, positions]).unwrap();
    cpu.attention(&qkv_t, &mut out_t, &mut lse_t);
    let (_, out) = mem.upload(&to_nhwc(&cpu.download(&out_t).unwrap()), dtype);
    let (_, logsumexp) = mem.upload(&cpu.download(&lse_t).unwrap(), Precision::F32);

    let qkv_stride = channels;
    let forward = AttentionLaunch { batch, positions, channels, qkv_stride, dtype, q, k, v, out, logsumexp };
    let (_, row_terms) = mem.upload(&vec![f32::NAN; batch * positions], Precision::F32);
    let (_, dout_rounded) = mem.upload(&vec![f32::NAN; len], dtype);
    let launch = AttentionBackwardLaunch {
        forward,
        dout,
        dout_dtype: grad_dtype,
        row_terms,
        dout_rounded,
        dq,
        dq_dtype: grad_dtype,
        dk,
        dk_dtype: grad_dtype,
        dv,
        dv_dtype: grad_dtype,
        grad_stride: channels,
        accumulate: true,
    };
    let (names, launched) = if dtype == Precision::F32 {
        let names = attention::BACKWARD_KERNELS.join(" + ");
        (names, attention::launch_attention_backward_simt(driver, kernels, &launch, splits, workspace))
    } else {
        let names = attention::backward_kernel_for(&launch).unwrap_or_else(|e| panic!("{name}: {e}"));
        (names, attention::launch_attention_backward_mma(driver, kernels, &launch, splits, workspace))
    };
    launched.unwrap_or_else(|e| panic!("{name}: {e}"));
    driver.synchronize().unwrap_or_else(|e| panic!("{name}: {e}"));

    let dout_t = up(&dout_host);
    let mut dqkv_t = cpu.upload(&stacked([&dq_host, &dk_host, &dv_host]), &qkv_shape).unwrap();
    let mut row_terms_t = cpu.zeros(&[batch, positions]).unwrap();
    let mut dout_rounded_t = cpu.zeros(&shape).unwrap();
    let scratch = AttentionScratch { row_terms: &mut row_terms_t, dout_rounded: &mut dout_rounded_t };
    cpu.attention_backward(&qkv_t, &out_t, &lse_t, &dout_t, scratch, &mut dqkv_t, GradientStore::Add);
    let dqkv_values = cpu.download(&dqkv_t).unwrap();
    let errors = [0, 1, 2].map(|which| {
        let ptr = [dq, dk, dv][which];
        let mut want = third_of(&dqkv_values, which, batch);
        if grad_dtype != Precision::F32 {
            want = encode(&want, grad_dtype).0;
        }
        relative_l2(&to_nchw(&mem.download(ptr, len, grad_dtype)), &want)
    });
    (errors, names)
}

/// attention.cu's SIMT backward (the f32 plans'), f32 throughout, over the attention cases: each
/// whole, and where it has two streamed tiles (16 rows) or more, split into 2 or 3 parts summed by
/// the tensor cores' reduce (attention.cu holds it); its split count for the f32 UNet at batch 1.
#[test]
fn emulator_attention_backward_simt_split() {
    let (driver, kernels) = emulated_attention_kernels(false);
    let (workspace, ptr) = split_k_workspace(&driver);
    let seed = fresh_seed();
    let f32 = Precision::F32;
    let mut failures = Vec::new();
    for case in attention_cases() {
        let tiles = case.2.div_ceil(16);
        let split_counts = if tiles > 1 { vec![1, tiles.min(3)] } else { vec![1] };
        for splits in split_counts {
            let (errors, _) =
                check_attention_backward(&driver, &kernels, case, f32, f32, splits, Some(&workspace), seed);
            println!(
                "attention backward SIMT x{splits} f32 {:<34} dq {:.2e} dk {:.2e} dv {:.2e} (seed {seed})",
                case.0, errors[0], errors[1], errors[2]
            );
            if errors.iter().any(|e| e.is_nan() || *e > 1e-4) {
                failures.push(format!("{} x{splits}: {errors:?}", case.0));
            }
        }
    }
    assert!(failures.is_empty(), "SIMT attention backward (seed {seed}) over tolerance: {failures:?}");
    let launch = unlaunched_attention_backward(AttentionLaunch { dtype: f32, ..unlaunched_attention(256, 256) });
    // 16x16 at batch 1: 32 blocks of 8 rows on 132 SMs, 16 tiles -> 8 parts of 2.
    assert_eq!(attention::backward_splits(&launch, false, Some(&workspace)), 8);
    let err = attention::launch_attention_backward_simt(&driver, &kernels, &launch, 17, Some(&workspace)).unwrap_err();
    assert!(err.to_string().contains("17 splits of 16 streamed tiles"), "{err}");
    driver.free(ptr).unwrap();
}

/// The tensor-core attention backward over the attention cases (16x16 positions at C 64, C 256,
/// odd position counts, C 40 padded to 64), bf16 and f16, gradients in f32 (the plans) and in the
/// activations' type; each case whole, and where it has two streamed tiles (32 rows) or more,
/// split into 2 or 3 parts (uneven parts, a partial last tile) summed by the reduce.
#[test]
fn emulator_attention_backward_tensor_cores() {
    let (driver, kernels) = emulated_attention_kernels(true);
    let (workspace, ptr) = split_k_workspace(&driver);
    let seed = fresh_seed();
    let mut failures = Vec::new();
    for dtype in [Precision::Bf16, Precision::F16] {
        for grad_dtype in [Precision::F32, dtype] {
            for case in attention_cases() {
                let tiles = case.2.div_ceil(32);
                let split_counts = if tiles > 1 { vec![1, tiles.min(3)] } else { vec![1] };
                for splits in split_counts {
                    let start = std::time::Instant::now();
                    let (errors, names) = check_attention_backward(
                        &driver,
                        &kernels,
                        case,
                        dtype,
                        grad_dtype,
                        splits,
                        Some(&workspace),
                        seed,
                    );
                    println!(
                    "attention backward {} x{splits} {dtype} ({grad_dtype} gradients) {:<34} dq {:.2e} dk {:.2e} dv {:.2e} (seed {seed}, {:.1} s)",
                    names,
                    case.0,
                    errors[0],
                    errors[1],
                    errors[2],
                    start.elapsed().as_secs_f64()
                );
                    if errors.iter().any(|e| e.is_nan() || *e > 1e-2) {
                        failures.push(format!("{dtype} {grad_dtype} {} x{splits}: {errors:?}", case.0));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "attention backward (seed {seed}) over tolerance: {failures:?}");
    // The launcher splits the UNet's batch-1 backward (16x16: 4 blocks) on 132 SMs, and refuses a
    // split with more parts than streamed tiles.
    let launch = unlaunched_attention_backward(unlaunched_attention(256, 256));
    assert_eq!(attention::backward_splits(&launch, true, Some(&workspace)), 4);
    assert_eq!(attention::backward_splits(&launch, true, None), 1);
    let err = attention::launch_attention_backward_mma(&driver, &kernels, &launch, 9, Some(&workspace)).unwrap_err();
    assert!(err.to_string().contains("9 splits of 8 streamed tiles"), "{err}");
    driver.free(ptr).unwrap();
}
