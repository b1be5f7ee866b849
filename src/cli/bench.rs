//! `purifier bench`: the benchmark of ENGINE.md's performance protocol, as far as a backend
//! provides it. Per batch size: latency (median, p99) and image-steps per second of the UNet
//! forward and of forward + input VJP; per purification mode: per-step latency and images per
//! second; cold and warm start; the memory of the plans; where one forward + VJP spends its
//! time, op by op. With `--baseline PYTHON` the same run times PyTorch on the same architecture
//! and weights (`bench/torch_baseline.py`), checks that both compute the same eps and input
//! gradient, and reports every figure as a ratio.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use purifier::attack::{Defence, Loss};
use purifier::backend::profiled::{OpStats, Profiled};
use purifier::backend::{Backend, KernelStartUp, Precision};
use purifier::data::tensor_file::TensorFile;
use purifier::diffusion::{GradientPath, Guidance};
use purifier::error::{Error, Result};
use purifier::model::params::{deterministic_uniform, DeterministicParams, ParamLister};
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{NoiseDraw, Purifier, PurifySettings};

use super::args::DeviceArgs;
use super::backend::backend;
use super::outputs::Outputs;
use super::progress::Progress;
use super::report::{percentile, write_report};

#[derive(Args)]
pub struct BenchArgs {
    /// UNet config with deterministic weights (what --baseline compares).
    #[arg(long, default_value = "cifar10-small")]
    pub config: String,
    /// Time this weights file instead (no --baseline).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the deterministic weights and inputs (the baseline uses the same).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch sizes of the UNet measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub batches: Vec<usize>,
    /// Timed runs per measurement (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Purification modes to time.
    #[arg(long, value_delimiter = ',', default_value = "none,pixel,adversarial")]
    pub modes: Vec<String>,
    /// Reverse steps of each timed purification.
    #[arg(long, default_value_t = 10)]
    pub t_star: usize,
    /// Batch of the timed purifications.
    #[arg(long, default_value_t = 16)]
    pub purify_batch: usize,
    /// Batch of the per-op breakdown (one forward + input VJP).
    #[arg(long, default_value_t = 16)]
    pub profile_batch: usize,
    /// Skip the attack gradient (one EOT draw's exact gradient through a whole purification at
    /// --purify-batch and --t-star, with its device memory peak), which is timed by default.
    #[arg(long)]
    pub skip_attack_gradient: bool,
    /// Skip the kernels' start-up measurement (each kernel file compiled by NVRTC with no cache,
    /// then read from the cache), measured by default: kernels are then compiled or read from the
    /// cache as they are first used, within the first forward.
    #[arg(long)]
    pub skip_start_up: bool,
    /// A Python with PyTorch: also time bench/torch_baseline.py on the same weights and inputs.
    #[arg(long, value_name = "PYTHON")]
    pub baseline: Option<PathBuf>,
    /// The PyTorch variants --baseline times: eager, compile (torch.compile), graphs (a CUDA
    /// graph of the forward; GPU only). Default: all three on a GPU, eager on the CPU.
    #[arg(long, value_delimiter = ',')]
    pub baseline_variants: Vec<String>,
    /// Stop the PyTorch baseline after this many seconds and keep the rows it finished (it
    /// rewrites its JSON after each): torch.compile takes minutes a batch size, and a benchmark
    /// under a time limit (the GPU suite's steps) would otherwise lose every row, ours included.
    #[arg(long, value_name = "SECONDS")]
    pub baseline_timeout: Option<f64>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: &BenchArgs, progress: Progress) -> Result<()> {
    purifier::with_backend!(backend(&args.device)?, b => bench(&b, args, progress))
}

/// The step index every timed UNet call uses (the middle of purification's range).
const BENCH_STEP: f32 = 99.0;

struct Timing {
    median: f64,
    p99: f64,
}

/// "kernels cold 30.2 s (NVRTC, 9 files 9 at a time; 61.0 s of compiling), warm 0.04 s (cache);
/// first forward 0.65 s" (no kernel part where the backend compiles nothing).
fn start_up_summary(start_up: Option<&KernelStartUp>, first_forward: f64) -> String {
    let kernels = start_up.map_or(String::new(), |start_up| {
        let warm = start_up.warm_s().map_or("no cache".to_string(), |s| format!("warm {s:.3} s (cache)"));
        format!(
            "kernels cold {:.3} s (NVRTC, {} files {} at a time; {:.1} s of compiling), {warm}; ",
            start_up.cold_s(),
            start_up.files.len(),
            start_up.compile_workers,
            start_up.compile_sum_s()
        )
    });
    format!("{kernels}first forward {first_forward:.3} s (weights, plan, one forward)")
}

/// Times `run` on the backend's own clock (device events on a GPU, so host overhead between
/// launches counts only where it stalls the device), after one warm-up.
fn time_runs<B: Backend>(b: &B, repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    run()?; // warm-up
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = b.timestamp()?;
        run()?;
        let end = b.timestamp()?;
        seconds.push(b.elapsed_ms(&start, &end)? / 1e3);
        b.release_timestamp(start);
        b.release_timestamp(end);
    }
    Ok(Timing { median: percentile(&seconds, 0.5), p99: percentile(&seconds, 0.99) })
}

/// The ops `issue` sends, recorded once for replay (`Backend::begin_capture`); None where the backend
/// does not record (the CPU), having issued nothing.
fn record<B: Backend>(b: &B, issue: impl FnOnce() -> Result<()>) -> Result<Option<B::Graph>> {
    if !b.begin_capture()? {
        return Ok(None);
    }
    let issued = issue();
    let graph = b.end_capture(); // the recording ends even when issuing failed
    issued?;
    Ok(Some(graph?))
}

/// The two ceilings of the roofline, measured on this device.
struct Ceilings {
    /// Dense bf16 mma.sync throughput (FLOP/s); none on the CPU.
    tensor_core_flops: Option<f64>,
    /// Device-to-device copy, bytes read plus bytes written per second.
    copy_bytes_per_s: f64,
}

fn measure_ceilings<B: Backend>(b: &B) -> Result<Ceilings> {
    // 256 MiB per buffer (far beyond any cache), less where the device has less free.
    let elements = b.available_memory().map_or(1 << 26, |free| (free / 16).min(1 << 28) / 4).max(1 << 20);
    let src = b.zeros(&[elements])?;
    let mut dst = b.zeros(&[elements])?;
    b.copy(&src, &mut dst); // warm-up
    const COPIES: usize = 5;
    let start = b.timestamp()?;
    for _ in 0..COPIES {
        b.copy(&src, &mut dst);
    }
    let end = b.timestamp()?;
    let seconds = b.elapsed_ms(&start, &end)? / 1e3;
    Ok(Ceilings {
        tensor_core_flops: b.tensor_core_peak()?,
        copy_bytes_per_s: (COPIES * 2 * elements * 4) as f64 / seconds,
    })
}

/// Where an op stands against its roofline: the fraction of the ceiling its arithmetic intensity
/// allows (min(peak, intensity x bandwidth)). Ops that compute count against the tensor cores in
/// a 16-bit plan; an f32 plan's ops run on the SIMT units, whose ceiling is not measured, so only
/// memory-bound ops get a place there.
fn roofline_fraction(stats: &OpStats, ceilings: &Ceilings, precision: Precision) -> Option<f64> {
    if stats.seconds <= 0.0 || stats.bytes <= 0.0 {
        return None;
    }
    let memory_bound = stats.bytes / ceilings.copy_bytes_per_s;
    if stats.flops == 0.0 {
        return Some(memory_bound / stats.seconds);
    }
    let peak = ceilings.tensor_core_flops.filter(|_| precision != Precision::F32)?;
    Some(memory_bound.max(stats.flops / peak) / stats.seconds)
}

/// One UNet call (or one reverse step) per timed run: image-steps/s = batch / median.
fn timing_json(t: &Timing, batch: usize) -> serde_json::Value {
    serde_json::json!({
        "median_ms": t.median * 1e3, "p99_ms": t.p99 * 1e3, "image_steps_per_s": batch as f64 / t.median,
    })
}

fn bench<B: Backend>(b: &B, args: &BenchArgs, progress: Progress) -> Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) {
        return Err(Error::invalid("--batches needs batch sizes of at least 1, e.g. 1,16,64,256"));
    }
    if args.repeats == 0 {
        return Err(Error::invalid("--repeats must be at least 1"));
    }
    if args.baseline.is_some() && args.weights.is_some() {
        return Err(Error::invalid("--baseline compares deterministic weights: drop --weights (use --config)"));
    }
    match args.baseline_timeout {
        Some(_) if args.baseline.is_none() => {
            return Err(Error::invalid("--baseline-timeout limits the PyTorch baseline: give --baseline PYTHON too"))
        }
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(Error::invalid(format!("--baseline-timeout must be a positive number of seconds, got {s}")))
        }
        _ => {}
    }
    let guidances = args
        .modes
        .iter()
        .map(|mode| match mode.as_str() {
            "none" => Ok(Guidance::None),
            "pixel" => Ok(Guidance::Pixel { scale: 1.0 }),
            "adversarial" => Ok(Guidance::Adversarial {
                scale: 1.0,
                lambda_features: 1.0,
                lambda_class: 1.0,
                path: GradientPath::X0,
            }),
            other => Err(Error::invalid(format!("--modes: unknown mode '{other}' (none, pixel, adversarial)"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outputs = Outputs::new(args.weights.as_deref());
    let json_file = args.json.as_deref().map(|p| outputs.file(p, "--json")).transpose()?;
    // Start-up, in two parts: every kernel file compiled by NVRTC (cold) and read back from the
    // disk cache (warm), each loaded on the device; then, kernels ready, the weights made or read,
    // a plan and the first forward.
    let start_up = if args.skip_start_up { None } else { b.kernel_start_up()? };
    let first_started = Instant::now();
    let (unet, weights) = match &args.weights {
        Some(path) => (Unet::from_file(b, &TensorFile::open(path)?)?, path.display().to_string()),
        None => {
            let config = UnetConfig::by_name(&args.config)?;
            let unet = Unet::load(&config, &mut DeterministicParams::new(b, args.seed))?;
            (unet, format!("deterministic (config {}, seed {})", args.config, args.seed))
        }
    };
    let parameters = {
        let mut lister = ParamLister::new(b);
        Unet::load(&unet.config, &mut lister)?;
        lister.count()
    };
    let input = |n: usize| deterministic_uniform("bench.x", n * 3 * 32 * 32, args.seed);
    {
        let mut plan = unet.plan(b, 1, false)?;
        let x = b.upload(&input(1), &[1, 3, 32, 32])?;
        unet.forward(b, &mut plan, &x, &[BENCH_STEP])?;
        b.download(plan.eps())?;
    }
    let first_forward = first_started.elapsed().as_secs_f64();
    progress.log(&format!(
        "bench on {}: UNet {} ({parameters} parameters, {weights}); {}",
        b.name(),
        unet.config.name,
        start_up_summary(start_up.as_ref(), first_forward)
    ));
    let ceilings = measure_ceilings(b)?;
    // Progress in timed measurements: forward and forward + VJP per batch, the per-op breakdown,
    // one purification per mode, the attack gradient.
    let attack_measurements = if args.skip_attack_gradient { 0 } else { 1 };
    let bar =
        progress.bar((2 * args.batches.len() + 1 + args.modes.len() + attack_measurements) as u64, "measurements");

    let mut rows = Vec::new();
    let mut unet_json = Vec::new();
    let mut peak_plan_bytes = 0;
    for &n in &args.batches {
        let x = b.upload(&input(n), &[n, 3, 32, 32])?;
        let v = b.upload(&deterministic_uniform("bench.v", n * 3 * 32 * 32, args.seed), &[n, 3, 32, 32])?;
        let t = vec![BENCH_STEP; n];
        let mut plan = unet.plan(b, n, true)?;
        peak_plan_bytes = peak_plan_bytes.max(plan.bytes(b));
        bar.set_message(format!("UNet forward, batch {n}"));
        let forward = time_runs(b, args.repeats, || unet.forward(b, &mut plan, &x, &t).map(|_| ()))?;
        bar.inc(1);
        bar.set_message(format!("UNet forward + VJP, batch {n}"));
        let with_vjp = time_runs(b, args.repeats, || {
            unet.forward(b, &mut plan, &x, &t)?;
            unet.input_vjp(b, &mut plan, &v).map(|_| ())
        })?;
        bar.inc(1);
        // The same passes recorded once and replayed, as the sampler runs its steps (a CUDA graph
        // on a GPU: no launch overhead); the CPU records nothing, so it has no such rows.
        let t_device = b.upload(&t, &[n])?;
        let forward_graph = record(b, || unet.enqueue_forward_indexed(b, &mut plan, &x, &t_device).map(|_| ()))?;
        let vjp_graph = record(b, || {
            unet.enqueue_forward_indexed(b, &mut plan, &x, &t_device)?;
            unet.enqueue_input_vjp(b, &mut plan, &v).map(|_| ())
        })?;
        let replayed = match (&forward_graph, &vjp_graph) {
            (Some(forward_graph), Some(vjp_graph)) => {
                let forward = time_runs(b, args.repeats, || b.replay(forward_graph))?;
                let with_vjp = time_runs(b, args.repeats, || b.replay(vjp_graph))?;
                b.synchronize()?;
                Some((forward, with_vjp))
            }
            _ => None,
        };
        // Forward + VJP over the forward alone (issue 9's target: at most 2.5 at batch 256).
        let vjp_over_forward = |f: &Timing, v: &Timing| v.median / f.median;
        let replayed_ms = replayed.as_ref().map_or(String::new(), |(f, v)| {
            format!(" (replayed: {:.1} ms, {:.1} ms, {:.2}x)", f.median * 1e3, v.median * 1e3, vjp_over_forward(f, v))
        });
        bar.log(&format!(
            "  batch {n}: forward {:.1} ms, forward + VJP {:.1} ms ({:.2}x the forward){replayed_ms}, ETA {}",
            forward.median * 1e3,
            with_vjp.median * 1e3,
            vjp_over_forward(&forward, &with_vjp),
            bar.eta()
        ));
        let mut row_json = serde_json::json!({ "batch": n });
        row_json["forward_vjp_over_forward"] = vjp_over_forward(&forward, &with_vjp).into();
        if let Some((f, v)) = &replayed {
            row_json["forward_vjp_over_forward_replayed"] = vjp_over_forward(f, v).into();
        }
        let mut unet_row = |label: &str, key: &str, t: &Timing| {
            rows.push((format!("{label}, batch {n}"), t.median, t.p99, n as f64 / t.median));
            row_json[key] = timing_json(t, n);
        };
        unet_row("UNet forward", "forward", &forward);
        unet_row("UNet forward + VJP", "forward_vjp", &with_vjp);
        if let Some((forward, with_vjp)) = &replayed {
            unet_row("UNet forward replayed", "forward_replayed", forward);
            unet_row("UNet forward + VJP replayed", "forward_vjp_replayed", with_vjp);
        }
        unet_json.push(row_json);
    }

    // Where the time goes: one forward + input VJP at --profile-batch, op by op.
    bar.set_message(format!("per-op breakdown, batch {}", args.profile_batch));
    let profile = {
        let profiled = Profiled::new(b);
        let traced = match &args.weights {
            Some(path) => Unet::from_file(&profiled, &TensorFile::open(path)?)?,
            None => Unet::load(&unet.config, &mut DeterministicParams::new(&profiled, args.seed))?,
        };
        let n = args.profile_batch;
        let mut plan = traced.plan(&profiled, n, true)?;
        let x = profiled.upload(&input(n), &[n, 3, 32, 32])?;
        let v = profiled.upload(&deterministic_uniform("bench.v", n * 3 * 32 * 32, args.seed), &[n, 3, 32, 32])?;
        let t = vec![BENCH_STEP; n];
        let mut pass = || -> Result<()> {
            traced.forward(&profiled, &mut plan, &x, &t)?;
            traced.input_vjp(&profiled, &mut plan, &v).map(|_| ())
        };
        pass()?; // warm-up
        profiled.take()?;
        pass()?;
        (n, profiled.take()?)
    };
    bar.inc(1);

    // Whole purifications: per-step latency of each mode at --purify-batch, t* = --t-star.
    let auxiliary = Classifier::load_with(&mut DeterministicParams::new(b, args.seed), 20)?;
    let mut purify_json = Vec::new();
    for (mode, guidance) in args.modes.iter().zip(guidances) {
        let settings = PurifySettings { t_star: args.t_star, guidance, ..Default::default() };
        let purifier = Purifier::new(b, &unet, Some(&auxiliary), settings)?;
        let n = args.purify_batch;
        bar.set_message(format!("purify {mode}, batch {n}"));
        let mut plan = purifier.plan(n)?;
        let x = input(n);
        purifier.purify(&mut plan, &x, 0)?; // warm-up
        let started = Instant::now();
        let mut steps = Vec::new();
        for r in 0..args.repeats {
            steps.extend(purifier.purify(&mut plan, &x, r as u64 + 1)?.1.step_seconds);
        }
        let seconds = started.elapsed().as_secs_f64();
        let step = Timing { median: percentile(&steps, 0.5), p99: percentile(&steps, 0.99) };
        let images_per_s = (n * args.repeats) as f64 / seconds;
        bar.inc(1);
        bar.log(&format!(
            "  purify {mode}, batch {n}: {:.1} ms per step, {images_per_s:.3} images/s, ETA {}",
            step.median * 1e3,
            bar.eta()
        ));
        rows.push((
            format!("purify {mode} (t* {}), step, batch {n}", args.t_star),
            step.median,
            step.p99,
            n as f64 / step.median,
        ));
        purify_json.push(serde_json::json!({
            "mode": mode, "batch": n, "t_star": args.t_star, "step": timing_json(&step, n),
            "images_per_s": images_per_s,
        }));
    }

    // The attacks' unit of work: one EOT draw's exact gradient through a whole `none` purification
    // of the deterministic ResNet-20's input (every reverse step forward, then back through every
    // step's UNet VJP), at --purify-batch and t* = --t-star, after one warm-up; and the device memory
    // it peaks at (weights, the defence plan and its tape), where the backend counts it.
    let attack_json = if args.skip_attack_gradient {
        serde_json::Value::Null
    } else {
        let n = args.purify_batch;
        bar.set_message(format!("attack gradient, batch {n}"));
        let settings = PurifySettings { t_star: args.t_star, ..Default::default() };
        let purifier = Purifier::new(b, &unet, None, settings)?;
        let defence = Defence::purified(&purifier, &auxiliary);
        b.reset_peak_memory();
        let mut plan = defence.plan(n)?;
        let pixels: Vec<f32> = input(n).iter().map(|x| (x + 1.0) / 2.0).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let indices: Vec<u64> = (0..n as u64).collect();
        let mut gradient = |draw| {
            let noise = NoiseDraw { seed: args.seed, draw };
            defence.loss_gradient(&mut plan, &pixels, &labels, &indices, Loss::CrossEntropy, noise).map(|_| ())
        };
        gradient(0)?; // warm-up
        let started = Instant::now();
        gradient(1)?;
        let seconds = started.elapsed().as_secs_f64();
        let peak = b.peak_memory();
        bar.inc(1);
        bar.log(&format!(
            "  attack gradient (one PGD-EOT iteration, EOT 1), batch {n}: {:.1} ms{}",
            seconds * 1e3,
            peak.map_or(String::new(), |p| format!(", device memory peak {:.1} MB", p as f64 / 1e6))
        ));
        // Image-steps as the purification rows count them: each of the t* steps once per image.
        let image_steps_per_s = (n * args.t_star) as f64 / seconds;
        rows.push((format!("attack gradient (t* {}), batch {n}", args.t_star), seconds, seconds, image_steps_per_s));
        serde_json::json!({
            "what": "one EOT draw's cross-entropy gradient through a whole none-mode purification, exact through \
                     every reverse step (one PGD-EOT iteration with EOT 1, less its step), host clock",
            "batch": n, "t_star": args.t_star, "ms": seconds * 1e3, "device_memory_peak_bytes": peak,
        })
    };

    bar.finish();
    let baseline = match &args.baseline {
        Some(python) => {
            let mut report = run_baseline(b, &unet, args, python)?;
            report["ratios"] = ratios(&unet_json, &purify_json, &report);
            Some(report)
        }
        None => None,
    };

    println!("{:<44} {:>12} {:>12} {:>16}", "measurement", "median ms", "p99 ms", "image-steps/s");
    for (name, median, p99, rate) in &rows {
        println!("{name:<44} {:>12.2} {:>12.2} {:>16.2}", median * 1e3, p99 * 1e3, rate);
    }
    if let Some(baseline) = &baseline {
        let stopped = baseline["stopped_after_s"]
            .as_f64()
            .map_or(String::new(), |s| format!(", stopped after {s:.0} s (--baseline-timeout): the rows it finished"));
        println!(
            "PyTorch {} baseline ({}), same weights and inputs{stopped}:",
            baseline["torch"].as_str().unwrap_or("?"),
            baseline["variant"].as_str().unwrap_or("?")
        );
        for row in baseline["ratios"].as_array().into_iter().flatten() {
            println!(
                "  {:<42} PyTorch {:>9.2} ms, ours {:>9.2} ms: {:.2}x",
                row["what"].as_str().unwrap_or(""),
                row["torch_ms"].as_f64().unwrap_or(f64::NAN),
                row["ours_ms"].as_f64().unwrap_or(f64::NAN),
                row["speedup"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "  agreement (batch 1): eps relative error {:.2e}, input gradient {:.2e}",
            baseline["agreement"]["eps"].as_f64().unwrap_or(f64::NAN),
            baseline["agreement"]["grad_x"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let (profile_batch, op_times) = &profile;
    let total = op_times.total_seconds();
    println!(
        "where one UNet forward + input VJP at batch {profile_batch} spends its {:.1} ms \
         (ceilings: bf16 mma.sync {}, copy {:.0} GB/s):",
        total * 1e3,
        ceilings.tensor_core_flops.map_or("not on this device".into(), |f| format!("{:.1} TFLOP/s", f / 1e12)),
        ceilings.copy_bytes_per_s / 1e9
    );
    println!(
        "  {:<32} {:>5} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "op", "calls", "ms", "share", "TFLOP/s", "GB/s", "roofline"
    );
    let columns = |stats: &OpStats| {
        let place = roofline_fraction(stats, &ceilings, b.precision())
            .map_or("-".to_string(), |f| format!("{:.1}%", 100.0 * f));
        format!(
            "{:>5} {:>10.2} {:>6.1}% {:>9.2} {:>9.1} {place:>9}",
            stats.calls,
            stats.seconds * 1e3,
            100.0 * stats.seconds / total,
            stats.flops / stats.seconds / 1e12,
            stats.bytes / stats.seconds / 1e9
        )
    };
    for (op, stats) in op_times.sorted().into_iter().take(12) {
        println!("  {op:<32} {}", columns(&stats));
    }
    println!("its slowest shapes (convolutions: kernel, stride, channels in -> out, output size; dx's for the input gradient):");
    println!(
        "  {:<24} {:<30} {:>5} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "op", "shape", "calls", "ms", "share", "TFLOP/s", "GB/s", "roofline"
    );
    for (op, shape, stats) in op_times.sorted_shapes().into_iter().take(12) {
        println!("  {op:<24} {shape:<30} {}", columns(&stats));
    }
    if let Some(start_up) = &start_up {
        println!("kernel start-up per file (s; the device's module load in both starts):");
        println!("  {:<24} {:>12} {:>12} {:>9} {:>10}", "file", "NVRTC", "cache read", "load", "image KB");
        for f in &start_up.files {
            let read = f.cache_read_s.map_or("-".to_string(), |s| format!("{s:.4}"));
            println!(
                "  {:<24} {:>12.3} {read:>12} {:>9.4} {:>10.1}",
                f.file,
                f.compile_s,
                f.load_s,
                f.image_bytes as f64 / 1e3
            );
        }
    }
    println!(
        "{}; largest UNet plan {:.1} MB; weights {:.1} MB ({})",
        start_up_summary(start_up.as_ref(), first_forward),
        peak_plan_bytes as f64 / 1e6,
        (parameters * b.precision().bytes()) as f64 / 1e6,
        b.precision()
    );
    if let Some(json_file) = json_file {
        let stats_json = |stats: &OpStats| {
            serde_json::json!({
                "calls": stats.calls, "ms": stats.seconds * 1e3, "share": stats.seconds / total,
                "flops": stats.flops, "bytes": stats.bytes,
                "tflops_per_s": stats.flops / stats.seconds / 1e12, "gb_per_s": stats.bytes / stats.seconds / 1e9,
                "roofline_fraction": roofline_fraction(stats, &ceilings, b.precision()),
            })
        };
        let report = serde_json::json!({
            "device": b.name(),
            "precision": b.precision().to_string(),
            "unet": { "config": unet.config.name, "parameters": parameters, "weights": weights },
            "step_index": BENCH_STEP,
            "repeats": args.repeats,
            "start_up": {
                "kernels": start_up.as_ref().map(|start_up| serde_json::json!({
                    "what": "every kernel file compiled by NVRTC with no cache, compile_workers at a time as a first \
                             run does (cold_s: that wall time and the loads), or read from the disk cache (warm_s; \
                             null with the cache off), each loaded on the device",
                    "cold_s": start_up.cold_s(),
                    "cold_compile_wall_s": start_up.cold_compile_wall_s,
                    "compile_workers": start_up.compile_workers,
                    "compile_sum_s": start_up.compile_sum_s(),
                    "warm_s": start_up.warm_s(),
                    "files": start_up.files.iter().map(|f| serde_json::json!({
                        "file": f.file, "nvrtc_compile_s": f.compile_s, "cache_read_s": f.cache_read_s,
                        "load_s": f.load_s, "image_bytes": f.image_bytes,
                    })).collect::<Vec<_>>(),
                })),
                "first_forward_s": first_forward,
            },
            "nvtx_ranges": purifier::driver::nvtx::available(),
            "ceilings": {
                "bf16_mma_sync_flops_per_s": ceilings.tensor_core_flops,
                "copy_bytes_per_s": ceilings.copy_bytes_per_s,
            },
            "memory": { "largest_unet_plan_bytes": peak_plan_bytes, "weights_bytes": parameters * b.precision().bytes() },
            "unet_timings": unet_json,
            "purify_timings": purify_json,
            "attack_gradient": attack_json,
            "per_op_breakdown": {
                "what": "one UNet forward + input VJP, each op timed by the backend's timestamps around it \
                         (device events on a GPU); flops and minimal bytes counted from the shapes",
                "batch": profile_batch,
                "total_ms": total * 1e3,
                "ops": op_times.sorted().into_iter().map(|(op, stats)| {
                    let mut row = stats_json(&stats);
                    row["op"] = op.into();
                    row
                }).collect::<Vec<_>>(),
                "shapes": op_times.sorted_shapes().into_iter().map(|(op, shape, stats)| {
                    let mut row = stats_json(&stats);
                    (row["op"], row["shape"]) = (op.into(), shape.into());
                    row
                }).collect::<Vec<_>>(),
            },
            "baseline": baseline,
        });
        write_report(outputs.staged_file(json_file), &report)?;
    }
    outputs.commit()?;
    if let Some(path) = &args.json {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs bench/torch_baseline.py with `python` on the same config, seed and batches; returns its
/// report with the ratios and the agreement of eps and grad_x at batch 1.
fn run_baseline<B: Backend>(b: &B, unet: &Unet<B>, args: &BenchArgs, python: &Path) -> Result<serde_json::Value> {
    let dir = tempfile_dir()?;
    let (json_path, tensors_path) = (dir.join("baseline.json"), dir.join("baseline.safetensors"));
    // The GPU suite runs a binary built elsewhere: it names the script of the tree it carried.
    let script = std::env::var_os("PURIFIER_BASELINE_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/torch_baseline.py"));
    let batches: Vec<String> = args.batches.iter().map(|n| n.to_string()).collect();
    let device = if b.name().starts_with("cpu") { "cpu" } else { "cuda" };
    let variants = match (&args.baseline_variants, device) {
        (v, _) if !v.is_empty() => v.clone(),
        (_, "cuda") => vec!["eager".into(), "compile".into(), "graphs".into()],
        _ => vec!["eager".into()],
    };
    eprintln!("running the PyTorch baseline: {} {}", python.display(), script.display());
    let child = std::process::Command::new(python)
        .arg(&script)
        .args(["--config", &args.config, "--seed", &args.seed.to_string(), "--batches", &batches.join(",")])
        .args(["--repeats", &args.repeats.to_string(), "--step", &BENCH_STEP.to_string()])
        .args(["--device", device, "--precision", &b.precision().to_string(), "--variants", &variants.join(",")])
        .args(["--purify-modes", &args.modes.join(","), "--purify-t-star", &args.t_star.to_string()])
        .args(["--purify-batch", &args.purify_batch.to_string()])
        .arg("--json")
        .arg(&json_path)
        .arg("--tensors")
        .arg(&tensors_path)
        .spawn()
        .map_err(|e| Error::invalid(format!("--baseline: cannot run {}: {e}", python.display())))?;
    let stopped_after = wait_for_baseline(child, args.baseline_timeout)?;
    let text = match (std::fs::read_to_string(&json_path), stopped_after) {
        (Ok(text), _) => text,
        (Err(_), Some(seconds)) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Error::invalid(format!(
                "the PyTorch baseline was stopped by --baseline-timeout after {seconds:.0} s before it timed anything"
            )));
        }
        (Err(e), None) => return Err(Error::io(&json_path, e)),
    };
    let mut report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::invalid(format!("baseline JSON: {e}")))?;
    if let Some(seconds) = stopped_after {
        eprintln!("  the PyTorch baseline was stopped after {seconds:.0} s (--baseline-timeout): keeping the rows it finished");
        report["stopped_after_s"] = serde_json::json!(seconds);
    }

    // Agreement at batch 1 on the shared deterministic input (the script writes its tensors first).
    let torch = TensorFile::open(&tensors_path)?;
    let (_, torch_eps) = torch.get_f32("eps")?;
    let (_, torch_grad) = torch.get_f32("grad_x")?;
    let mut plan = unet.plan(b, 1, true)?;
    let x = b.upload(&deterministic_uniform("bench.x", 3 * 32 * 32, args.seed), &[1, 3, 32, 32])?;
    let v = b.upload(&deterministic_uniform("bench.v", 3 * 32 * 32, args.seed), &[1, 3, 32, 32])?;
    unet.forward(b, &mut plan, &x, &[BENCH_STEP])?;
    let eps = b.download(plan.eps())?;
    let grad = b.download(unet.input_vjp(b, &mut plan, &v)?)?;
    report["agreement"] = serde_json::json!({
        "eps": relative_error(&eps, &torch_eps), "grad_x": relative_error(&grad, &torch_grad),
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Waits for the baseline; with a timeout, kills it when that passes and returns the seconds it
/// ran (None: it finished). A baseline that fails on its own is an error (its message is above,
/// on stderr).
fn wait_for_baseline(mut child: std::process::Child, timeout: Option<f64>) -> Result<Option<f64>> {
    let start = std::time::Instant::now();
    let failed = |e: std::io::Error| Error::invalid(format!("the PyTorch baseline: {e}"));
    loop {
        if let Some(status) = child.try_wait().map_err(failed)? {
            if !status.success() {
                return Err(Error::invalid(format!("the PyTorch baseline failed ({status}); its error is above")));
            }
            return Ok(None);
        }
        let seconds = start.elapsed().as_secs_f64();
        if timeout.is_some_and(|limit| seconds >= limit) {
            child.kill().map_err(failed)?;
            child.wait().map_err(failed)?;
            return Ok(Some(seconds));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// PyTorch's median over ours (above 1: we are faster), for every PyTorch variant, batch size
/// and measurement, and for every purification mode (per step).
fn ratios(unet: &[serde_json::Value], purify: &[serde_json::Value], torch: &serde_json::Value) -> serde_json::Value {
    let mut rows = Vec::new();
    let mut push = |what: String, torch_ms: Option<f64>, ours_ms: Option<f64>| {
        if let (Some(torch_ms), Some(ours_ms)) = (torch_ms, ours_ms) {
            rows.push(serde_json::json!({
                "what": what, "torch_ms": torch_ms, "ours_ms": ours_ms, "speedup": torch_ms / ours_ms,
            }));
        }
    };
    for (variant, timings) in torch["variants"].as_object().into_iter().flatten() {
        for theirs in timings.as_array().into_iter().flatten() {
            let Some(mine) = unet.iter().find(|o| o["batch"] == theirs["batch"]) else { continue };
            // Ours issued op by op, then replayed (where the backend records), against each variant.
            let measurements = [
                ("forward", "forward", "UNet forward"),
                ("forward_vjp", "forward_vjp", "UNet forward + VJP"),
                ("forward", "forward_replayed", "UNet forward replayed"),
                ("forward_vjp", "forward_vjp_replayed", "UNet forward + VJP replayed"),
            ];
            for (their_key, our_key, label) in measurements {
                push(
                    format!("{label}, batch {} (PyTorch {variant})", theirs["batch"]),
                    theirs[their_key]["median_ms"].as_f64(),
                    mine[our_key]["median_ms"].as_f64(),
                );
            }
        }
    }
    for theirs in torch["purify_timings"].as_array().into_iter().flatten() {
        let Some(mine) = purify.iter().find(|o| o["mode"] == theirs["mode"] && o["batch"] == theirs["batch"]) else {
            continue;
        };
        push(
            format!(
                "purify {} step, batch {} (PyTorch eager, autograd)",
                theirs["mode"].as_str().unwrap_or("?"),
                theirs["batch"]
            ),
            theirs["step"]["median_ms"].as_f64(),
            mine["step"]["median_ms"].as_f64(),
        );
    }
    serde_json::Value::Array(rows)
}

fn relative_error(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(reference).map(|(a, r)| (*a as f64 - *r as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|r| (*r as f64).powi(2)).sum();
    if a.len() != reference.len() {
        return f64::INFINITY;
    }
    (num / den).sqrt()
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("purifier-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}
