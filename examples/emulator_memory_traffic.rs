//! How well each kernel coalesces its global loads and stores, measured on the PTX emulator: one
//! UNet forward + input VJP through the CUDA backend, every warp-level global access counted in the
//! 32-byte sectors it touches (`ptx_emulator::GlobalTraffic`, Nsight Compute's sectors per
//! request). Efficiency is the bytes the lanes asked for over the bytes of the sectors moved: a
//! kernel at 25% moves four times the data it uses through L1. The sectors are counted from the
//! addresses the kernels compute, exactly; what they cost on a GPU (L1 and L2 hits, DRAM) is not
//! modelled.
//!
//! Then, for the tensor-core kernels, what bounds them inside an SM: issue slots, shared-memory
//! wavefronts (bank conflicts counted) and the tensor pipe, per mma (`ptx_emulator::SmWork`).
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_memory_traffic -- [config] [precision] [batch]
//! (config cifar10-small or cifar10, default cifar10-small; precision f32, bf16 or f16, default
//! bf16; batch default 1).

mod common;

use std::sync::Arc;

use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::driver::emulated::EmulatedDriver;

fn main() {
    let common::UnetArgs { config, precision, batch, .. } = common::unet_args("cifar10-small");

    let driver = Arc::new(EmulatedDriver::new());
    let b = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    let common::UnetPass { unet, mut plan, xt, v, steps } = common::unet_pass(&b, &config, batch, true);
    driver.kernel_totals(true);
    unet.forward(&b, &mut plan, &xt, &steps).unwrap();
    unet.input_vjp(&b, &mut plan, &v).unwrap();
    let totals = driver.kernel_totals(true);

    let mut rows: Vec<_> = totals.into_iter().collect();
    let moved = |t: &purifier::driver::emulated::KernelTotals| (t.global.load_sectors + t.global.store_sectors) * 32;
    rows.sort_by_key(|(_, t)| std::cmp::Reverse(moved(t)));
    let all: u64 = rows.iter().map(|(_, t)| moved(t)).sum();
    println!(
        "{} forward + input VJP, batch {batch}, {precision}: global traffic per kernel, by sectors moved",
        config.name
    );
    println!(
        "{:<52} {:>5} {:>9} {:>7} {:>8} {:>6} {:>8} {:>6}",
        "kernel", "calls", "MB moved", "share", "ld sect", "ld eff", "st sect", "st eff"
    );
    for (name, t) in &rows {
        let g = &t.global;
        let per = |sectors: u64, requests: u64| if requests == 0 { 0.0 } else { sectors as f64 / requests as f64 };
        println!(
            "{:<52} {:>5} {:>9.2} {:>6.1}% {:>8.1} {:>5.0}% {:>8.1} {:>5.0}%",
            name,
            t.launches,
            moved(t) as f64 / 1e6,
            100.0 * moved(t) as f64 / all.max(1) as f64,
            per(g.load_sectors, g.load_requests),
            100.0 * g.load_efficiency(),
            per(g.store_sectors, g.store_requests),
            100.0 * g.store_efficiency(),
        );
    }
    println!("{:<52} {:>5} {:>9.2}", "all kernels", "", all as f64 / 1e6);
    println!("(ld/st sect: sectors per warp-level request; eff: bytes asked for / bytes of the sectors moved)");

    // The tensor-core kernels against the SM's three in-core ceilings, in SM cycles per mma.sync
    // m16n8k16 (counts of the kernels' real instructions; the rates are the ceilings' sizes):
    // the tensor pipe at the H200's measured mma.sync bf16 peak (641 TFLOP/s, bench/results) over
    // 132 SMs at the 1.98 GHz boost clock: 0.6 m16n8k16 a cycle, 1.67 cycles each; shared memory
    // one 128-byte wavefront a cycle; four schedulers issuing one warp-instruction a cycle each.
    const TENSOR_CYCLES_PER_MMA: f64 = 132.0 * 1.98e9 * 4096.0 / 641.4e12;
    let mut mma_rows: Vec<_> = rows.iter().filter(|(_, t)| t.sm.mma > 0).collect();
    mma_rows.sort_by_key(|(_, t)| std::cmp::Reverse(t.sm.mma_macs));
    println!();
    println!(
        "tensor-core kernels: SM cycles per m16n8k16 mma (tensor pipe {TENSOR_CYCLES_PER_MMA:.2}) by what bounds them"
    );
    println!(
        "{:<52} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "kernel", "mma", "shared", "issue", "div", "bound", "tensor max"
    );
    for (name, t) in &mma_rows {
        let mma16 = t.sm.mma_macs as f64 / (16.0 * 8.0 * 16.0);
        let shared = t.sm.shared_wavefronts as f64 / mma16;
        // An integer division is one PTX instruction and about 20 on the GPU (ptxas expands it).
        let sass_instructions = t.sm.warp_instructions + 19 * t.sm.integer_divisions;
        let issue = sass_instructions as f64 / 4.0 / mma16;
        let divisions = t.sm.integer_divisions as f64 / mma16;
        let (bound, cycles) = [("tensor", TENSOR_CYCLES_PER_MMA), ("shared", shared), ("issue", issue)]
            .into_iter()
            .fold(("tensor", 0.0), |best, c| if c.1 > best.1 { c } else { best });
        println!(
            "{:<52} {:>9} {:>8.2} {:>8.2} {:>8.3} {:>8} {:>9.0}%",
            name,
            t.sm.mma,
            shared,
            issue,
            divisions,
            bound,
            100.0 * TENSOR_CYCLES_PER_MMA / cycles
        );
    }
    println!("(shared: wavefronts, bank conflicts counted; issue: warp-instructions / 4, an integer division");
    println!(" counted as the ~20 instructions ptxas makes of it; div: integer divisions per mma; tensor max:");
    println!(" the share of the tensor pipe's peak the busiest of the three allows, latency and DRAM aside)");

    // Where the issue slots of the busiest ones go: warp-instructions per mma by kind (PTX; ptxas
    // removes most register moves, the loop's phi copies, and expands integer divisions).
    println!();
    println!("warp-instructions per mma by kind, the 6 tensor-core kernels with the most mma:");
    print!("{:<44}", "kernel");
    for kind in ptx_emulator::INSTRUCTION_KINDS {
        print!(" {kind:>9}");
    }
    println!();
    for (name, t) in mma_rows.iter().take(6) {
        print!("{name:<44}");
        for n in t.sm.mix {
            print!(" {:>9.2}", n as f64 / t.sm.mma as f64);
        }
        println!();
    }
}
