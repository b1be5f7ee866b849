//! Recorded reverse steps on the emulator: the sampler records one step of each kind per plan and
//! replays it for every later step (the cursor moving inside the recording), which must give the
//! same bits as issuing every step op by op, and the CPU's result within f32 tolerance. Also the
//! attack's backward through the purification (`input_vjp`, its steps recorded too).
//!
//! The UNet is a reduced config (32 channels at both of its two levels, one block per level,
//! attention at 16x16) on deterministic weights: it has every layer kind of the real ones (skip
//! concats, 1x1 shortcuts, attention, down- and upsampling), and the emulator runs it several times
//! faster than cifar10-small, which a test that purifies twice on each of two emulated backends
//! needs (at cifar10-small width the three tests took 20 minutes on the loaded 2-core machine).
//! Batch 1, t* = 2..3. The emulator needs NVRTC (LD_LIBRARY_PATH).
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::networks::reduced_unet;

use purifier::backend::cpu::CpuBackend;
use purifier::backend::{Backend, Precision};
use purifier::device::emulator_backend;
use purifier::diffusion::{GradientPath, Guidance, Sampler};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet};
use purifier::purify::{NoiseDraw, Purifier, PurifyReport, PurifySettings};

/// The purified batch, the report, and (differentiable runs) the input gradient of a constant
/// output gradient, for two purifications in a row on one plan (different images and draws).
struct Run {
    outputs: Vec<Vec<f32>>,
    reports: Vec<PurifyReport>,
    gradient: Option<Vec<f32>>,
    observed_steps: usize,
}

fn purify_twice<B: Backend>(b: &B, settings: &PurifySettings, graphs: bool, x: &[f32], vjp: bool) -> Run {
    let unet = Unet::load(&reduced_unet(), &mut DeterministicParams::new(b, 21)).unwrap();
    let auxiliary = Classifier::load_with(&mut DeterministicParams::new(b, 22), 20).unwrap();
    let observed = AtomicUsize::new(0);
    let mut purifier = Purifier::new(b, &unet, Some(&auxiliary), settings.clone()).unwrap();
    purifier.use_graphs(graphs);
    purifier.observe_steps(|| {
        observed.fetch_add(1, Ordering::Relaxed);
    });
    let batch = x.len() / (3 * 32 * 32);
    let mut plan = if vjp { purifier.plan_differentiable(batch) } else { purifier.plan(batch) }.unwrap();
    let mut run = Run { outputs: Vec::new(), reports: Vec::new(), gradient: None, observed_steps: 0 };
    for draw in 0..2u64 {
        let images: Vec<u64> = (0..batch as u64).map(|i| 5 * i + draw).collect();
        let noise = NoiseDraw { seed: settings.seed, draw };
        let report = purifier.purify_on_backend(&mut plan, x, &images, noise).unwrap();
        run.outputs.push(b.download(plan.output()).unwrap());
        run.reports.push(report);
    }
    if vjp {
        let direction: Vec<f32> = common::uniform(x.len(), 77);
        let g = b.upload(&direction, &[batch, 3, 32, 32]).unwrap();
        run.gradient = Some(b.download(purifier.input_vjp(&mut plan, &g).unwrap()).unwrap());
    }
    run.observed_steps = observed.load(Ordering::Relaxed);
    run
}

/// Emulator with graphs against emulator without (bits) and the CPU (f32 tolerance); `replays`
/// is how many steps each of the two purifications must have replayed.
fn check_graphs(settings: PurifySettings, batch: usize, vjp: bool, replays: [usize; 2]) {
    let x: Vec<f32> = common::uniform(batch * 3 * 32 * 32, 3).iter().map(|v| v * 0.9).collect();
    let emulator = emulator_backend(Precision::F32).unwrap();
    let started = std::time::Instant::now();
    let graphed = purify_twice(&emulator, &settings, true, &x, vjp);
    let seconds = started.elapsed().as_secs_f64();
    // A fresh emulator: nothing recorded on the first one is reused.
    let eager = purify_twice(&emulator_backend(Precision::F32).unwrap(), &settings, false, &x, vjp);
    let cpu = purify_twice(&CpuBackend, &settings, true, &x, vjp);
    let steps = settings.t_star; // DDPM: one reverse step per level
    let mode = settings.guidance.name();
    println!("{mode}, t* {steps}, batch {batch}: emulator with graphs {seconds:.1} s for two purifications");
    for (i, report) in graphed.reports.iter().enumerate() {
        assert_eq!(report.replayed_steps, replays[i], "{mode}: replayed steps of purification {i}");
        assert_eq!(report.step_seconds.len(), steps, "{mode}: one time per step");
        assert!(report.step_seconds.iter().all(|s| s.is_finite() && *s >= 0.0), "{:?}", report.step_seconds);
        assert_eq!(eager.reports[i].replayed_steps, 0, "graphs off: nothing replayed");
        assert_eq!(report.network_calls, eager.reports[i].network_calls);
        assert_eq!(report.unet_vjps, eager.reports[i].unet_vjps);
    }
    assert_eq!(graphed.observed_steps, 2 * steps, "{mode}: the observer fires once per step, replays too");
    for i in 0..2 {
        assert!(graphed.outputs[i] == eager.outputs[i], "{mode}: purification {i} with graphs differs from without");
        let error = common::relative_error(&graphed.outputs[i], &cpu.outputs[i]);
        println!("  purification {i}: relative L2 to the CPU {error:.2e}");
        assert!(error < 1e-5, "{mode}: purification {i}: relative L2 {error:.3e} to the CPU");
    }
    if vjp {
        let (g, e, c) = (graphed.gradient.unwrap(), eager.gradient.unwrap(), cpu.gradient.unwrap());
        assert!(g == e, "{mode}: input_vjp with graphs differs from without");
        let error = common::relative_error(&g, &c);
        println!("  input_vjp: relative L2 to the CPU {error:.2e}");
        assert!(error < 1e-4, "{mode}: input_vjp relative L2 {error:.3e} to the CPU");
    }
}

/// t* = 3: step 3 eager (it loads the kernels), step 2 recorded and replayed, step 1 replayed;
/// the second purification replays all three. The input VJP's steps likewise.
#[test]
fn none_mode_graphs_match_eager_bits_and_the_cpu() {
    let settings = PurifySettings { t_star: 3, sampler: Sampler::Ddpm, guidance: Guidance::None, kappa: 0.5, seed: 11 };
    check_graphs(settings, 1, true, [2, 3]);
}

/// Pixel guidance, t* = 3: steps 3 and 2 are guided (3 eager, 2 recorded), the last step has
/// none (sigma = 0: its own kind, eager the first time, recorded the second).
#[test]
fn pixel_mode_graphs_match_eager_bits_and_the_cpu() {
    let settings = PurifySettings {
        t_star: 3,
        sampler: Sampler::Ddpm,
        guidance: Guidance::Pixel { scale: 4.0 },
        kappa: 0.5,
        seed: 12,
    };
    check_graphs(settings, 1, false, [1, 3]);
}

/// Adversarial guidance through x0 (a classifier forward and VJP and a UNet VJP inside the
/// recorded step), t* = 2: the first purification runs eagerly (each kind met once), the second
/// records and replays both kinds.
#[test]
fn adversarial_mode_graphs_match_eager_bits_and_the_cpu() {
    let guidance =
        Guidance::Adversarial { scale: 3.0, lambda_features: 1.0, lambda_class: 0.5, path: GradientPath::X0 };
    let settings = PurifySettings { t_star: 2, sampler: Sampler::Ddpm, guidance, kappa: 0.5, seed: 13 };
    check_graphs(settings, 1, false, [0, 2]);
}
