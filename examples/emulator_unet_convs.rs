//! The PTX emulator's speed on the work that dominates a UNet forward: every convolution of a
//! `cifar10-small` UNet forward at batch 1 (conv_in, the ResBlocks with their concat inputs and 1x1
//! shortcuts, the attention 1x1 projections, down- and upsampling convs, conv_out), launched through
//! the project's conv kernels and launcher on the emulated driver, sanitizers on. Once with the f32
//! SIMT kernel, once with the bf16 tensor-core kernel.
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_unet_convs

use std::time::Instant;

use purifier::backend::cuda::compile::{HalfTypes, ImageKind, KernelCompiler};
use purifier::backend::cuda::conv::{launch_conv2d, Conv2dKernels, Conv2dLaunch, Upsampling};
use purifier::backend::{Conv2dGeometry, Precision};
use purifier::driver::emulated::EmulatedDriver;
use purifier::driver::{DevicePtr, Driver, ModuleImage};

/// (input size, channels from a, channels from b (concat), upsample, out channels, kernel, geometry)
type Layer = (usize, usize, usize, bool, usize, usize, Conv2dGeometry);

fn unet_convs() -> Vec<Layer> {
    let (ch, mult, blocks) = (64usize, [1usize, 2, 2, 2], 2usize);
    let same3 = Conv2dGeometry::same(1);
    let same1 = Conv2dGeometry::same(0);
    let down = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
    let mut l: Vec<Layer> = vec![(32, 3, 0, false, ch, 3, same3)];
    let resblock = |l: &mut Vec<Layer>, res: usize, ca: usize, cb: usize, co: usize| {
        l.push((res, ca, cb, false, co, 3, same3));
        l.push((res, co, 0, false, co, 3, same3));
        if ca + cb != co {
            l.push((res, ca, cb, false, co, 1, same1));
        }
    };
    let attention = |l: &mut Vec<Layer>, res: usize, c: usize| {
        for _ in 0..4 {
            l.push((res, c, 0, false, c, 1, same1)); // q, k, v, proj_out
        }
    };
    let mut skips = vec![ch];
    let (mut res, mut c) = (32usize, ch);
    for (level, &m) in mult.iter().enumerate() {
        for _ in 0..blocks {
            resblock(&mut l, res, c, 0, ch * m);
            c = ch * m;
            if res == 16 {
                attention(&mut l, res, c);
            }
            skips.push(c);
        }
        if level + 1 < mult.len() {
            l.push((res, c, 0, false, c, 3, down));
            res /= 2;
            skips.push(c);
        }
    }
    resblock(&mut l, res, c, 0, c);
    attention(&mut l, res, c);
    resblock(&mut l, res, c, 0, c);
    for (level, &m) in mult.iter().enumerate().rev() {
        for _ in 0..=blocks {
            let skip = skips.pop().unwrap();
            resblock(&mut l, res, c, skip, ch * m);
            c = ch * m;
            if res == 16 {
                attention(&mut l, res, c);
            }
        }
        if level > 0 {
            l.push((res, c, 0, true, c, 3, same3));
            res *= 2;
        }
    }
    l.push((32, c, 0, false, 3, 3, same3));
    l
}

fn filled(d: &EmulatedDriver, elements: usize, dtype: Precision) -> DevicePtr {
    let bytes = elements * dtype.bytes();
    let p = d.alloc(bytes.max(4)).unwrap();
    // 0.01 in the storage type, two 16-bit values per word.
    let word = match dtype {
        Precision::F32 => 0.01f32.to_bits(),
        Precision::Bf16 => 0x3c24_3c24,
        Precision::F16 => 0x211f_211f,
    };
    d.memset_u32(p, word, bytes.div_ceil(4)).unwrap();
    p
}

fn main() {
    let compiler = KernelCompiler::with_cache_dir("sm_80", None).expect("NVRTC (source scripts/nvrtc.sh)");
    let ptx = String::from_utf8(compiler.compile_file("conv2d.cu", ImageKind::Ptx).unwrap()).unwrap();
    let mma_ptx = String::from_utf8(compiler.compile_file("conv2d_mma.cu", ImageKind::Ptx).unwrap()).unwrap();
    let layers = unet_convs();
    let macs: usize = layers
        .iter()
        .map(|&(res, ca, cb, up, co, k, g)| {
            let r = if up { 2 * res } else { res };
            let out = g.output_size(r, r, k, k);
            // (The sub-pixel upsample's output element sums 4 taps, not 9.)
            out.0 * out.1 * co * (ca + cb) * if up { 4 } else { k * k }
        })
        .sum();
    println!(
        "cifar10-small UNet forward, batch 1: {} convolutions, {:.2} G multiply-adds",
        layers.len(),
        macs as f64 / 1e9
    );
    let only = std::env::args().nth(1);
    for (input, weight) in [(Precision::F32, Precision::F32), (Precision::Bf16, Precision::Bf16)] {
        if only.as_deref().is_some_and(|o| o != input.to_string()) {
            continue;
        }
        let d = EmulatedDriver::new();
        let module = d.load_module(ModuleImage::Ptx(&ptx)).unwrap();
        let mma = d.load_module(ModuleImage::Ptx(&mma_ptx)).unwrap();
        let kernels = Conv2dKernels::load(&d, module, Some((mma, HalfTypes::Both))).unwrap();
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        for &(res, ca, cb, upsample, co, k, geometry) in &layers {
            let r = if upsample { 2 * res } else { res };
            let (oh, ow) = geometry.output_size(r, r, k, k);
            let args = Conv2dLaunch {
                batch: 1,
                height: res,
                width: res,
                channels_a: ca,
                channels_b: cb,
                // (The UNet's Upsample: the sub-pixel form, 16 taps per output quad.)
                upsample: if upsample { Upsampling::SubPixel } else { Upsampling::None },
                out_channels: co,
                kernel_h: k,
                kernel_w: k,
                geometry,
                relu: false,
                input_dtype: input,
                weight_dtype: weight,
                out_dtype: input,
                a: filled(&d, res * res * ca, input),
                b: (cb > 0).then(|| filled(&d, res * res * cb, input)),
                weight: filled(&d, co * (ca + cb) * if upsample { 16 } else { k * k }, weight),
                bias: Some(filled(&d, co, Precision::F32)),
                channel_bias: None,
                channel_bias_stride: co,
                residual: None,
                out: d.alloc(oh * ow * co * input.bytes()).unwrap(),
            };
            launch_conv2d(&d, &kernels, &args, None).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        d.synchronize().unwrap();
        let dt = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_start;
        let ti = d.thread_instructions();
        println!(
            "{input} inputs, {weight} weights: {dt:.2} s wall, {cpu:.2} s CPU over {} threads, {ti} thread-instructions ({:.1} M/s wall)",
            rayon::current_num_threads(),
            ti as f64 / dt / 1e6
        );
    }
}

/// CPU time of this process (user + system), from /proc: on a shared machine wall time also counts
/// the other jobs' turns.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the stat line (utime, stime), counted after the command name.
    (ticks(11) + ticks(12)) / 100.0
}
