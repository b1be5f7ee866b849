//! What bounds the UNet's small-batch latency, measured on the PTX emulator: one forward (and,
//! with `vjp`, one input VJP) through the CUDA backend planned for an H200's 132 SMs, and for each
//! kernel two floors on its time that no GPU can beat, from the instructions its warps really issued:
//!
//! - depth: the deepest warp's warp-instructions (`LaunchStats::longest_warp`); a warp issues at most
//!   one instruction a cycle, so a launch lasts at least that many cycles, however many SMs it has;
//! - width: all its warp-instructions over the SMs' issue slots (132 SMs x 4 schedulers a cycle).
//!
//! At batch 1 most launches are short of blocks, so depth is the floor that matters: a kernel whose
//! depth dwarfs its width has its work in too few, too long warps (split the loop, or give it more
//! blocks). Both floors ignore memory latency, which a dependent chain of global loads adds on top.
//! So a third column runs the emulator's latency model (`ptx_emulator::timing`: a scoreboard per
//! warp with round-figure latencies, global loads 450 cycles): an estimate, not a floor, whose
//! constants a GPU profile has to calibrate. Memsets and launches are counted too: each is a node
//! of the reverse step's graph, and each node costs the GPU a microsecond or two however small,
//! which none of the columns include. Memsets and device-to-device copies are counted too.
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_launch_depth -- [config] [precision] [batch] [vjp]
//! (config cifar10-small or cifar10, default cifar10; precision f32, bf16 or f16, default bf16;
//! batch default 1).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::Backend;
use purifier::driver::emulated::{EmulatedDriver, KernelTotals};

/// An H200's SM count and boost clock (the clock the tensor-pipe ceiling of
/// `emulator_memory_traffic` uses too).
const SMS: u32 = common::H200_SMS;
const CLOCK_HZ: f64 = 1.98e9;
/// Warp schedulers an SM, each issuing one warp-instruction a cycle.
const SCHEDULERS: f64 = 4.0;

fn main() {
    let common::UnetArgs { config, precision, batch, more } = common::unet_args("cifar10");
    let vjp = match more.first().map(String::as_str) {
        None => false,
        Some("vjp") => true,
        Some(other) => panic!("unknown fourth argument {other} (vjp, or nothing)"),
    };

    let driver = Arc::new(EmulatedDriver::with_multiprocessors(SMS).timed());
    let b = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    let common::UnetPass { unet, mut plan, xt, v, steps } = common::unet_pass(&b, &config, batch, vjp);

    driver.kernel_totals(true);
    driver.memsets_and_copies(true);
    unet.forward(&b, &mut plan, &xt, &steps).unwrap();
    b.synchronize().unwrap();
    report(&format!("{} forward, batch {batch}, {precision}", config.name), &driver);
    if vjp {
        unet.input_vjp(&b, &mut plan, &v).unwrap();
        b.synchronize().unwrap();
        println!();
        report(&format!("{} input VJP (after its forward), batch {batch}, {precision}", config.name), &driver);
    }
}

/// The floors of the work since the last report, per kernel, deepest first.
fn report(title: &str, driver: &EmulatedDriver) {
    let totals: BTreeMap<String, KernelTotals> = driver.kernel_totals(true);
    let (memsets, copies) = driver.memsets_and_copies(true);
    // An integer division is one PTX instruction and about 20 SASS ones (ptxas expands it).
    let issued = |warp_instructions: u64, t: &KernelTotals| {
        let divisions_share = t.sm.integer_divisions as f64 / t.sm.warp_instructions.max(1) as f64;
        warp_instructions as f64 * (1.0 + 19.0 * divisions_share)
    };
    let micros = |cycles: f64| cycles / CLOCK_HZ * 1e6;
    let mut rows: Vec<(String, KernelTotals, f64, f64, f64)> = totals
        .into_iter()
        .map(|(name, t)| {
            let depth = micros(issued(t.longest_warps, &t));
            let width = micros(issued(t.sm.warp_instructions, &t) / (f64::from(SMS) * SCHEDULERS));
            let model = micros(t.modelled_cycles as f64);
            (name, t, depth, width, model)
        })
        .collect();
    rows.sort_by(|a, b| b.4.total_cmp(&a.4));

    println!("{title}: floors on each kernel's time on {SMS} SMs at {:.2} GHz", CLOCK_HZ / 1e9);
    println!(
        "{:<52} {:>5} {:>11} {:>12} {:>10} {:>10} {:>8} {:>10} {:>8}",
        "kernel", "calls", "blocks/call", "depth/call", "depth us", "width us", "bound", "model us", "us/call"
    );
    let (mut launches, mut floor, mut depth_sum, mut width_sum, mut model_sum) = (0, 0.0, 0.0, 0.0, 0.0);
    for (name, t, depth, width, model) in &rows {
        launches += t.launches;
        floor += depth.max(*width);
        depth_sum += depth;
        width_sum += width;
        model_sum += model;
        println!(
            "{:<52} {:>5} {:>11.0} {:>12.0} {:>10.1} {:>10.1} {:>8} {:>10.1} {:>8.1}",
            name,
            t.launches,
            t.blocks as f64 / t.launches as f64,
            t.longest_warps as f64 / t.launches as f64,
            depth,
            width,
            if depth >= width { "depth" } else { "width" },
            model,
            model / t.launches as f64
        );
    }
    println!(
        "{launches} launches, {memsets} memsets and {copies} copies; floors summed: depth {depth_sum:.0} us, width {width_sum:.0} us, \
         the larger of the two per kernel {floor:.0} us; latency model {model_sum:.0} us"
    );
    println!("(depth/call: the deepest warp's warp-instructions, mean over the calls; an integer division counted");
    println!(" as the ~20 instructions ptxas makes of it; memory latency is not in either floor)");
}
