//! The host's side of issuing a UNet pass on the CUDA backend, measured without a GPU: the backend
//! over the emulator's driver with its launches checked and counted, and its memsets and copies
//! counted, but nothing run (`EmulatedDriver::hollow`), so the time left is the backend's own work per op (shape checks,
//! launch planning, argument packing) and the driver's bookkeeping. A real driver adds its own
//! launch call (cuLaunchKernel, a few microseconds) on top, which this cannot see. It bounds the
//! op-by-op ("issued") timings of `bench` from below; a recorded step replayed as a graph pays it
//! once, when it is recorded.
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example host_launch_cost -- [config] [precision] [batch]
//! (config cifar10-small or cifar10, default cifar10; precision default bf16; batch default 1).

mod common;

use std::sync::Arc;
use std::time::Instant;

use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::Backend;
use purifier::driver::emulated::EmulatedDriver;

const REPEATS: usize = 50;

fn main() {
    let common::UnetArgs { config, precision, batch, .. } = common::unet_args("cifar10");

    let driver = Arc::new(EmulatedDriver::with_multiprocessors(common::H200_SMS).hollow());
    let b = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    let common::UnetPass { unet, mut plan, xt, v, steps } = common::unet_pass(&b, &config, batch, true);
    // Launches, memsets and device copies since the last call (each a node of a recorded graph).
    let issued = |driver: &EmulatedDriver| -> (u64, u64, u64) {
        let (memsets, copies) = driver.memsets_and_copies(true);
        (driver.kernel_totals(true).values().map(|t| t.launches).sum(), memsets, copies)
    };

    // Once to load every module (NVRTC or the disk cache), then timed.
    unet.forward(&b, &mut plan, &xt, &steps).unwrap();
    unet.input_vjp(&b, &mut plan, &v).unwrap();
    b.synchronize().unwrap();
    issued(&driver);

    let time = |pass: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..REPEATS {
            pass();
        }
        b.synchronize().unwrap();
        start.elapsed().as_secs_f64() / REPEATS as f64
    };
    let forward = time(&mut || {
        unet.forward(&b, &mut plan, &xt, &steps).unwrap();
    });
    let forward_issued = issued(&driver);
    let vjp = time(&mut || {
        unet.input_vjp(&b, &mut plan, &v).unwrap();
    });
    let vjp_issued = issued(&driver);
    println!("{} batch {batch} {precision}, host side only (nothing run), mean of {REPEATS}:", config.name);
    for (what, seconds, counts) in [("forward", forward, forward_issued), ("input VJP", vjp, vjp_issued)] {
        let [launches, memsets, copies] = [counts.0, counts.1, counts.2].map(|n| n / REPEATS as u64);
        println!(
            "  {what:<10} {:>8.1} us for {launches} launches, {memsets} memsets and {copies} copies: {:.2} us each",
            seconds * 1e6,
            seconds * 1e6 / (launches + memsets + copies).max(1) as f64
        );
    }
}
