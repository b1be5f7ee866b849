//! The PTX emulator's headline figure: one `cifar10-small` UNet forward at batch 1 through the CUDA
//! backend (the project's kernels, planning and launchers) on the emulated driver, sanitizers on,
//! compared with the CPU reference. Precision as the first argument (f32, bf16, f16; default f32).
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_unet_forward -- bf16

use std::sync::Arc;
use std::time::Instant;

use purifier::backend::cpu::CpuBackend;
use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::{Backend, Precision};
use purifier::driver::emulated::EmulatedDriver;
use purifier::model::params::DeterministicParams;
use purifier::model::{Unet, UnetConfig};

mod common;

fn main() {
    let precision = common::precision_arg(std::env::args().nth(1).as_deref(), Precision::F32);
    let config = UnetConfig::cifar10_small();
    let x: Vec<f32> = (0..3072).map(|i| ((i * 37 % 255) as f32 / 127.5) - 1.0).collect();

    let cpu = CpuBackend;
    let unet = Unet::load(&config, &mut DeterministicParams::new(&cpu, 1)).unwrap();
    let mut plan = unet.plan(&cpu, 1, false).unwrap();
    let xt = cpu.upload(&x, &[1, 3, 32, 32]).unwrap();
    let reference = cpu.download(unet.forward(&cpu, &mut plan, &xt, &[50.0]).unwrap()).unwrap();

    let driver = Arc::new(EmulatedDriver::new());
    let t = Instant::now();
    let b = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    let unet = Unet::load(&config, &mut DeterministicParams::new(&b, 1)).unwrap();
    let mut plan = unet.plan(&b, 1, false).unwrap();
    let xt = b.upload(&x, &[1, 3, 32, 32]).unwrap();
    println!("setup (NVRTC compile, weights, plan): {:.2} s", t.elapsed().as_secs_f64());
    let before = driver.thread_instructions();
    let (wall, cpu0) = (Instant::now(), cpu_seconds());
    let out = b.download(unet.forward(&b, &mut plan, &xt, &[50.0]).unwrap()).unwrap();
    let (dt, dcpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let ti = driver.thread_instructions() - before;
    let num: f64 = out.iter().zip(&reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    println!(
        "cifar10-small forward, batch 1, {precision}: {dt:.2} s wall, {dcpu:.2} s CPU over {} threads, {ti} thread-instructions ({:.1} M/s wall); rel L2 vs CPU {:.2e}",
        rayon::current_num_threads(),
        ti as f64 / dt / 1e6,
        (num / den).sqrt()
    );
}

/// CPU time of this process (user + system) from /proc: on a shared machine wall time also counts
/// the other jobs' turns.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime: fields 14 and 15 of the stat line, 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}
