//! What the emulator examples share: their arguments and one UNet pass's inputs on the CUDA backend.
#![allow(dead_code)]

use purifier::backend::cuda::CudaBackend;
use purifier::backend::{Backend, Precision};
use purifier::model::params::DeterministicParams;
use purifier::model::{Unet, UnetConfig, UnetPlan};

/// An H200's SM count: the examples plan launches for it where they model the GPU.
pub const H200_SMS: u32 = 132;

/// The UNet examples' command line, `[config] [precision] [batch] [more...]`: precision bf16 and
/// batch 1 when absent; `more` is what follows.
pub struct UnetArgs {
    pub config: UnetConfig,
    pub precision: Precision,
    pub batch: usize,
    pub more: Vec<String>,
}

pub fn unet_args(default_config: &str) -> UnetArgs {
    let args: Vec<String> = std::env::args().skip(1).collect();
    UnetArgs {
        config: config_arg(args.first().map(String::as_str), default_config),
        precision: precision_arg(args.get(1).map(String::as_str), Precision::Bf16),
        batch: args.get(2).map_or(1, |b| b.parse().expect("batch: a positive integer")),
        more: args.iter().skip(3).cloned().collect(),
    }
}

/// The config an argument names (cifar10-small or cifar10), `default` when it is absent.
pub fn config_arg(arg: Option<&str>, default: &str) -> UnetConfig {
    match arg.unwrap_or(default) {
        "cifar10-small" => UnetConfig::cifar10_small(),
        "cifar10" => UnetConfig::cifar10(),
        other => panic!("unknown config {other} (cifar10-small, cifar10)"),
    }
}

/// The precision an argument names (f32, bf16 or f16), `default` when it is absent.
pub fn precision_arg(arg: Option<&str>, default: Precision) -> Precision {
    match arg {
        None => default,
        Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16,
        Some("f16") => Precision::F16,
        Some(other) => panic!("unknown precision {other} (f32, bf16, f16)"),
    }
}

/// A deterministic UNet of `config` on `b`, planned at `batch` (with the input VJP's buffers where
/// `vjp`), with a fixed x_t, a VJP seed of 0.5 everywhere and step 50 for every image.
pub struct UnetPass {
    pub unet: Unet<CudaBackend>,
    pub plan: UnetPlan<CudaBackend>,
    pub xt: <CudaBackend as Backend>::Tensor,
    pub v: <CudaBackend as Backend>::Tensor,
    pub steps: Vec<f32>,
}

pub fn unet_pass(b: &CudaBackend, config: &UnetConfig, batch: usize, vjp: bool) -> UnetPass {
    let unet = Unet::load(config, &mut DeterministicParams::new(b, 1)).unwrap();
    let plan = unet.plan(b, batch, vjp).unwrap();
    let r = config.resolution;
    let x: Vec<f32> = (0..batch * 3 * r * r).map(|i| ((i * 37 % 255) as f32 / 127.5) - 1.0).collect();
    let xt = b.upload(&x, &[batch, 3, r, r]).unwrap();
    let v = b.upload(&vec![0.5; x.len()], &[batch, 3, r, r]).unwrap();
    UnetPass { unet, plan, xt, v, steps: vec![50.0; batch] }
}

/// ptxas's registers a thread for every kernel, compiled for the H200's sm_90 (NVRTC's ptxas), for
/// the launch model's occupancy (`EmulatedDriver::with_kernel_registers`).
pub fn h200_registers() -> std::collections::BTreeMap<String, u32> {
    use purifier::backend::cuda::compile::{kernel_files, KernelCompiler};
    let compiler = KernelCompiler::with_cache_dir("sm_90", None).expect("NVRTC (source scripts/nvrtc.sh)");
    kernel_files()
        .flat_map(|file| compiler.compile_file_with_report(file).unwrap_or_else(|e| panic!("{file}: {e}")).kernels)
        .map(|k| (k.name, k.registers))
        .collect()
}
