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
//! So a third column runs the emulator's launch model (`purifier::driver::launch_model`: a
//! scoreboard per warp with round-figure latencies, capped by the SMs' issue slots, tensor cores,
//! load/store pipe and the L2's bandwidth, plus a fixed cost a launch), an estimate, not a floor,
//! with the term that bounds it. Memsets and device-to-device copies are counted too (each a node
//! of the reverse step's graph).
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_launch_depth -- [config] [precision] [batch] [vjp] [launches=FILE]
//! (config cifar10-small or cifar10, default cifar10; precision f32, bf16 or f16, default bf16;
//! batch default 1; `launches=FILE` writes each launch's model terms to FILE as CSV, for
//! scripts/fit_launch_model.py to fit the model's constants to a GPU's times).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::Backend;
use purifier::driver::emulated::{EmulatedDriver, KernelTotals};
use purifier::driver::launch_model::{
    l2_bytes, launch_time, LaunchRecord, LaunchTime, CLOCK_HZ, DIVISION_INSTRUCTIONS, SCHEDULERS,
};

/// An H200's SM count.
const SMS: u32 = common::H200_SMS;

fn main() {
    let common::UnetArgs { config, precision, batch, more } = common::unet_args("cifar10");
    let (mut vjp, mut launches_csv) = (false, None);
    for arg in &more {
        match arg.split_once('=') {
            None if arg == "vjp" => vjp = true,
            Some(("launches", path)) => {
                launches_csv = Some(std::fs::File::create(path).expect("launches=FILE: cannot create FILE"))
            }
            _ => panic!("unknown argument {arg} (vjp, launches=FILE)"),
        }
    }

    let driver =
        Arc::new(EmulatedDriver::with_multiprocessors(SMS).timed().with_kernel_registers(common::h200_registers()));
    let b = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    let common::UnetPass { unet, mut plan, xt, v, steps } = common::unet_pass(&b, &config, batch, vjp);

    driver.kernel_totals(true);
    driver.memsets_and_copies(true);
    driver.launch_records(true);
    if let Some(file) = &mut launches_csv {
        write_launches_header(file);
    }
    unet.forward(&b, &mut plan, &xt, &steps).unwrap();
    b.synchronize().unwrap();
    report(&format!("{} forward, batch {batch}, {precision}", config.name), &driver);
    if let Some(file) = &mut launches_csv {
        write_launches(file, "forward", &driver.launch_records(true));
    }
    if vjp {
        unet.input_vjp(&b, &mut plan, &v).unwrap();
        b.synchronize().unwrap();
        println!();
        report(&format!("{} input VJP (after its forward), batch {batch}, {precision}", config.name), &driver);
        if let Some(file) = &mut launches_csv {
            write_launches(file, "vjp", &driver.launch_records(true));
        }
    }
}

fn write_launches_header(file: &mut std::fs::File) {
    use std::io::Write;
    writeln!(file, "pass,kernel,blocks,latency,issue,tensor,lsu,l2_bytes").unwrap();
}

/// One CSV row a launch: the model's terms in cycles, but the L2's in bytes, and without the fixed
/// cost: the two constants scripts/fit_launch_model.py fits.
fn write_launches(file: &mut std::fs::File, pass: &str, records: &[LaunchRecord]) {
    use std::io::Write;
    for r in records {
        let t = launch_time(r, SMS);
        let bytes = l2_bytes(&r.stats);
        writeln!(
            file,
            "{pass},{},{},{},{},{},{},{bytes}",
            r.kernel, r.stats.blocks, t.latency, t.issue, t.tensor, t.lsu
        )
        .unwrap();
    }
}

/// The floors of the work since the last report, per kernel, deepest first.
fn report(title: &str, driver: &EmulatedDriver) {
    let totals: BTreeMap<String, KernelTotals> = driver.kernel_totals(true);
    let (memsets, copies) = driver.memsets_and_copies(true);
    // An integer division is one PTX instruction and about 20 SASS ones (ptxas expands it).
    let issued = |warp_instructions: u64, t: &KernelTotals| {
        let divisions_share = t.sm.integer_divisions as f64 / t.sm.warp_instructions.max(1) as f64;
        warp_instructions as f64 * (1.0 + (DIVISION_INSTRUCTIONS - 1.0) * divisions_share)
    };
    let micros = |cycles: f64| cycles / CLOCK_HZ * 1e6;
    let mut rows: Vec<(String, KernelTotals, f64, f64, f64)> = totals
        .into_iter()
        .map(|(name, t)| {
            let depth = micros(issued(t.longest_warps, &t));
            let width = micros(issued(t.sm.warp_instructions, &t) / (f64::from(SMS) * SCHEDULERS));
            let model = micros(t.model.total);
            (name, t, depth, width, model)
        })
        .collect();
    rows.sort_by(|a, b| b.4.total_cmp(&a.4));

    println!("{title}: floors on each kernel's time on {SMS} SMs at {:.2} GHz", CLOCK_HZ / 1e9);
    println!(
        "{:<52} {:>5} {:>11} {:>12} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8}",
        "kernel",
        "calls",
        "blocks/call",
        "depth/call",
        "depth us",
        "width us",
        "bound",
        "model us",
        "us/call",
        "model by"
    );
    let (mut launches, mut floor, mut depth_sum, mut width_sum) = (0, 0.0, 0.0, 0.0);
    let mut model = LaunchTime::default();
    for (name, t, depth, width, model_us) in &rows {
        launches += t.launches;
        floor += depth.max(*width);
        depth_sum += depth;
        width_sum += width;
        model.add(&t.model);
        println!(
            "{:<52} {:>5} {:>11.0} {:>12.0} {:>10.1} {:>10.1} {:>8} {:>10.1} {:>8.1} {:>8}",
            name,
            t.launches,
            t.blocks as f64 / t.launches as f64,
            t.longest_warps as f64 / t.launches as f64,
            depth,
            width,
            if depth >= width { "depth" } else { "width" },
            model_us,
            model_us / t.launches as f64,
            t.model.bound()
        );
    }
    println!(
        "{launches} launches, {memsets} memsets and {copies} copies; floors summed: depth {depth_sum:.0} us, width {width_sum:.0} us, \
         the larger of the two per kernel {floor:.0} us"
    );
    println!(
        "launch model {:.0} us, of which launches' fixed cost {:.0} us; its terms summed over the launches: {}",
        micros(model.total),
        micros(model.fixed),
        LaunchTime::TERMS
            .iter()
            .zip([model.latency, model.issue, model.tensor, model.lsu, model.l2])
            .map(|(name, cycles)| format!("{name} {:.0} us", micros(cycles)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("(depth/call: the deepest warp's warp-instructions, mean over the calls; an integer division counted");
    println!(" as the ~20 instructions ptxas makes of it; memory latency is not in either floor)");
}
