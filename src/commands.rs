//! The subcommands. Each validates all its inputs first, computes, and writes its outputs last, so
//! a bad input never leaves a partial output behind.
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use purifier::attack::{Defence, DefencePlan, Method};
use purifier::backend::{Backend, TensorShape};
use purifier::data::image::{write_comparison_grid, write_png, DEFAULT_CELLS_PER_ROW, DEFAULT_GRID_SCALE};
use purifier::data::tensor_file::{write_safetensors, TensorFile};
use purifier::data::{load_images, ImageBatch};
use purifier::device;
use purifier::error::{check_finite, Error, Result};
use purifier::model::classifier::argmax;
use purifier::model::params::{DeterministicParams, ParamLister};
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{Purifier, PurifyPlan, PurifyReport};

use crate::{AttackArgs, BenchArgs, ClassifyArgs, DeviceArgs, EpsArgs, InspectArgs, PurificationArgs, PurifyArgs};

fn backend(args: &DeviceArgs) -> Result<impl Backend> {
    let (backend, note) = device::select(args.device, purifier::backend::Precision::F32)?;
    let purifier::device::SelectedBackend::Cpu(backend) = backend else {
        return Err(Error::Device("the commands run on the CPU backend only in this build".into()));
    };
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(backend)
}

fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    Ok(())
}

/// Purifies `images` in batches of at most `batch` and returns x_0 in [-1, 1] (each image's noise
/// keyed by its index, so the batch size changes nothing); `on_batch(index, images, report,
/// seconds)` after each batch.
fn purify_in_batches<B: Backend>(
    purifier: &Purifier<B>,
    images: &ImageBatch,
    batch: usize,
    mut on_batch: impl FnMut(usize, usize, &PurifyReport, f64),
) -> Result<Vec<f32>> {
    let x = images.to_model_range();
    let per_image = images.image_len();
    let mut purified = Vec::with_capacity(x.len());
    let mut plan: Option<PurifyPlan<B>> = None;
    for (index, chunk) in x.chunks(batch * per_image).enumerate() {
        let n = chunk.len() / per_image;
        if plan.as_ref().map(|p| p.batch()) != Some(n) {
            plan = Some(purifier.plan(n)?);
        }
        let started = Instant::now();
        let (out, report) = purifier.purify(plan.as_mut().unwrap(), chunk, (index * batch) as u64)?;
        purified.extend_from_slice(&out);
        on_batch(index, n, &report, started.elapsed().as_secs_f64());
    }
    Ok(purified)
}

/// The denoiser and (adversarial mode) the auxiliary network of `args`.
fn load_purification<B: Backend>(b: &B, args: &PurificationArgs) -> Result<(Unet<B>, Option<Classifier<B>>)> {
    let unet = match args.untrained_seed {
        Some(seed) => {
            eprintln!(
                "WARNING: untrained weights (config {}, seed {seed}): a smoke test of the pipeline, not a purification",
                args.untrained_config
            );
            Unet::load(&UnetConfig::by_name(&args.untrained_config)?, &mut DeterministicParams::new(b, seed))?
        }
        None => Unet::from_file(b, &open_weights(&args.weights, "DDPM UNet weights")?)?,
    };
    let auxiliary = args.auxiliary.as_deref().map(|p| Classifier::load(b, &TensorFile::open(p)?)).transpose()?;
    Ok((unet, auxiliary))
}

pub fn purify(args: &PurifyArgs) -> Result<()> {
    let b = backend(&args.device)?;
    check_batch(args.batch)?;
    let images = load_images(&args.inputs, args.count)?;
    let settings = &args.purification;
    let (unet, auxiliary) = load_purification(&b, settings)?;
    let classifier = args.classifier.as_deref().map(|p| Classifier::load(&b, &TensorFile::open(p)?)).transpose()?;
    let purifier = Purifier::new(&b, &unet, auxiliary.as_ref(), settings.settings())?;
    eprintln!(
        "purifying {} images on {}: UNet {} ({} reverse steps from t* = {}), mode {}, kappa {}, seed {}",
        images.count,
        b.name(),
        unet.config.name,
        purifier.steps().len(),
        settings.t_star,
        settings.guidance().name(),
        settings.kappa,
        settings.seed
    );

    let mut step_seconds = Vec::new();
    let (mut network_calls, mut unet_vjps) = (0, 0);
    let started = Instant::now();
    let purified = purify_in_batches(&purifier, &images, args.batch, |index, n, report, seconds| {
        step_seconds.extend_from_slice(&report.step_seconds);
        network_calls += report.network_calls;
        unet_vjps += report.unet_vjps;
        eprintln!(
            "  batch {index}: {n} images, {} UNet calls, {} UNet VJPs, {seconds:.2} s",
            report.network_calls, report.unet_vjps
        );
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let output = ImageBatch::from_model_range(
        &purified,
        images.height,
        images.width,
        images.labels.clone(),
        images.names.clone(),
    )?;
    let (median, p99) = (percentile(&step_seconds, 0.5), percentile(&step_seconds, 0.99));
    println!("purified {} images in {seconds:.2} s ({:.3} images/s)", images.count, images.count as f64 / seconds);
    println!(
        "per reverse step (batch of up to {}): median {:.1} ms, p99 {:.1} ms",
        args.batch,
        median * 1e3,
        p99 * 1e3
    );
    let mut accuracy_before_after: Option<(f64, f64)> = None;

    if let Some(classifier) = &classifier {
        match &images.labels {
            Some(labels) => {
                let before = accuracy(&b, classifier, &images, labels, args.batch)?;
                let after = accuracy(&b, classifier, &output, labels, args.batch)?;
                println!(
                    "classifier {} top-1: {:.2}% before, {:.2}% after purification ({} images)",
                    classifier.name,
                    before * 100.0,
                    after * 100.0,
                    images.count
                );
                accuracy_before_after = Some((before, after));
            }
            None => eprintln!("no labels in the input: accuracy not reported"),
        }
    }

    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    for i in 0..output.count {
        write_png(&args.out.join(format!("{}.png", output.names[i])), output.image(i), output.height, output.width)?;
    }
    let grid = args.out.join("grid.png");
    write_comparison_grid(&grid, &images, &output, None, DEFAULT_CELLS_PER_ROW, DEFAULT_GRID_SCALE)?;
    println!("wrote {} PNGs and {} (each cell: input | purified)", output.count, grid.display());
    if let Some(path) = &args.report {
        let mut report = report_header(&b, &images, &args.inputs, &unet, settings);
        let more = serde_json::json!({
            "settings": with_batch(settings.to_json(), args.batch),
            "network_calls": network_calls,
            "unet_vjps": unet_vjps,
            "seconds": seconds,
            "images_per_second": images.count as f64 / seconds,
            "step_ms": { "median": median * 1e3, "p99": p99 * 1e3, "count": step_seconds.len() },
            "accuracy": accuracy_before_after.map(|(before, after)| serde_json::json!({ "classifier": args.classifier, "before": before, "after": after })),
        });
        extend(&mut report, more);
        write_report(path, &report)?;
    }
    Ok(())
}

/// The defence plan of batch size `n`, made on first use.
fn plan_for<'p, B: Backend>(
    plans: &'p mut HashMap<usize, DefencePlan<B>>,
    defence: &Defence<B>,
    n: usize,
) -> Result<&'p mut DefencePlan<B>> {
    Ok(match plans.entry(n) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(defence.plan(n)?),
    })
}

/// What every JSON report of a purification run starts with: the images, the device, the UNet.
fn report_header<B: Backend>(
    b: &B,
    images: &ImageBatch,
    inputs: &[std::path::PathBuf],
    unet: &Unet<B>,
    settings: &PurificationArgs,
) -> serde_json::Value {
    serde_json::json!({
        "images": images.count,
        "inputs": inputs,
        "device": b.name(),
        "precision": b.precision().to_string(),
        "unet": { "config": unet.config.name, "weights": settings.weights_name() },
    })
}

/// Adds the keys of object `more` to object `report`.
fn extend(report: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(report), serde_json::Value::Object(more)) = (report.as_object_mut(), more) {
        report.extend(more);
    }
}

pub(crate) fn write_report(path: &Path, report: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report).expect("JSON of plain values");
    purifier::data::write_atomically(path, |w| w.write_all(text.as_bytes()).map_err(|e| Error::io(path, e)))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn with_batch(mut settings: serde_json::Value, batch: usize) -> serde_json::Value {
    settings["batch"] = batch.into();
    settings
}

/// The q-quantile (nearest rank) of a set of timings; 0 for none.
pub(crate) fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn open_weights(path: &Path, what: &str) -> Result<TensorFile> {
    if !path.exists() {
        return Err(Error::invalid(format!(
            "{what} not found at {}; see weights/README.md for how to get or train them",
            path.display()
        )));
    }
    TensorFile::open(path)
}

/// Top-1 accuracy of `classifier` on `images` (pixels in [0, 1]).
fn accuracy<B: Backend>(
    b: &B,
    classifier: &Classifier<B>,
    images: &ImageBatch,
    labels: &[u8],
    batch: usize,
) -> Result<f64> {
    let predictions = predict(b, classifier, images, batch)?;
    let correct = predictions.iter().zip(labels).filter(|(p, &l)| **p == l as usize).count();
    Ok(correct as f64 / labels.len() as f64)
}

fn predict<B: Backend>(b: &B, classifier: &Classifier<B>, images: &ImageBatch, batch: usize) -> Result<Vec<usize>> {
    let x = images.to_model_range();
    let per_image = images.image_len();
    let mut predictions = Vec::with_capacity(images.count);
    let mut plan = None;
    for chunk in x.chunks(batch * per_image) {
        let n = chunk.len() / per_image;
        if plan.as_ref().map(|p: &purifier::model::ClassifierPlan<B>| p.batch) != Some(n) {
            plan = Some(classifier.plan(b, n, false)?);
        }
        let plan = plan.as_mut().unwrap();
        let input = b.upload(chunk, &[n, 3, images.height, images.width])?;
        classifier.forward(b, plan, &input)?;
        let logits = b.download(&plan.logits)?;
        predictions.extend(logits.chunks(classifier.num_classes).map(argmax));
    }
    Ok(predictions)
}

pub fn classify(args: &ClassifyArgs) -> Result<()> {
    let b = backend(&args.device)?;
    check_batch(args.batch)?;
    let classifier = Classifier::load(&b, &TensorFile::open(&args.classifier)?)?;
    let images = load_images(&args.inputs, args.count)?;
    let Some(labels) = images.labels.clone() else {
        return Err(Error::invalid(
            "classify needs labelled images (CIFAR-10 binary files); PNG files carry no labels",
        ));
    };
    let started = Instant::now();
    let acc = accuracy(&b, &classifier, &images, &labels, args.batch)?;
    println!(
        "{} top-1 accuracy: {:.2}% ({} of {} images) on {} in {:.2} s",
        classifier.name,
        acc * 100.0,
        (acc * images.count as f64).round() as usize,
        images.count,
        b.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let file = TensorFile::open(&args.weights)?;
    let b = purifier::backend::cpu::CpuBackend;
    let stored: usize =
        file.names().iter().map(|n| file.shape(n).map(|s| s.iter().product::<usize>()).unwrap_or(0)).sum();
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for name in file.names() {
        *dtypes.entry(file.dtype(name)?.to_string()).or_default() += 1;
    }
    println!("file: {}", args.weights.display());
    println!("tensors: {} ({} values; dtypes {:?})", file.names().len(), stored, dtypes);
    if file.contains("conv_in.weight") {
        let config = UnetConfig::infer(&file)?;
        let mut lister = ParamLister::new(&b);
        let structure = Unet::load(&config, &mut lister)?;
        if args.layers {
            for (name, [c, h, w]) in structure.layers() {
                println!("  {name:<24} -> {c} x {h} x {w}");
            }
        }
        println!(
            "network: DDPM UNet, config {} (ch {}, mult {:?}, {} res blocks, attention at {:?})",
            config.name, config.channels, config.channel_mult, config.res_blocks, config.attention_resolutions
        );
        println!("parameters: {}", lister.count());
        Unet::from_file(&b, &file)?;
        println!("loads: yes (every tensor present, shaped as expected, finite; nothing extra)");
    } else if file.contains("layer1.0.conv1.weight") || file.contains("block1.layer.0.conv1.weight") {
        let classifier = Classifier::load(&b, &file)?;
        let params: usize = file
            .names()
            .iter()
            .filter(|n| {
                !n.ends_with("running_mean") && !n.ends_with("running_var") && !n.ends_with("num_batches_tracked")
            })
            .map(|n| file.shape(n).map(|s| s.iter().product::<usize>()).unwrap_or(0))
            .sum();
        println!(
            "network: {} classifier ({} classes, {}-d features)",
            classifier.name,
            classifier.num_classes,
            classifier.feature_dim()
        );
        println!("parameters: {params}");
        println!("loads: yes");
    } else {
        return Err(Error::UnknownConfig {
            file: file.file(),
            reason: "neither a DDPM UNet (conv_in.weight), a CIFAR ResNet (layer1.0.conv1.weight) nor a \
                     WideResNet (block1.layer.0.conv1.weight)"
                .into(),
        });
    }
    Ok(())
}

pub fn eps(args: &EpsArgs) -> Result<()> {
    let b = backend(&args.device)?;
    let unet = Unet::from_file(&b, &open_weights(&args.weights, "DDPM UNet weights")?)?;
    let input = TensorFile::open(&args.input)?;
    let (shape, x) = input.get_f32("x")?;
    let r = unet.config.resolution;
    if shape.len() != 4 || shape[1..] != [3, r, r] || shape[0] == 0 {
        return Err(Error::invalid(format!(
            "{}: tensor `x` has shape {shape:?}, expected N x 3 x {r} x {r} (N >= 1)",
            input.file()
        )));
    }
    check_finite(&x, || format!("{}: tensor `x`", input.file()))?;
    let n = shape[0];
    let (t_shape, t) = input.get_indices("t")?;
    if t_shape != [n] {
        return Err(Error::ShapeMismatch { file: input.file(), name: "t".into(), found: t_shape, expected: vec![n] });
    }
    if let Some(bad) = t.iter().find(|&&s| !(0..1000).contains(&s)) {
        return Err(Error::invalid(format!("{}: step index {bad} in `t` is out of range 0..999", input.file())));
    }
    let v = if args.vjp {
        let v = input.require_f32("v", &shape)?;
        check_finite(&v, || format!("{}: tensor `v`", input.file()))?;
        Some(v)
    } else {
        None
    };
    let mut plan = unet.plan(&b, n, args.vjp)?;
    let x_dev = b.upload(&x, &shape)?;
    let t: Vec<f32> = t.iter().map(|&s| s as f32).collect();
    let started = Instant::now();
    let eps = b.download(unet.forward(&b, &mut plan, &x_dev, &t)?)?;
    let mut outputs: Vec<(&str, Vec<f32>)> = vec![("eps", eps)];
    if let Some(v) = v {
        let v_dev = b.upload(&v, &shape)?;
        let grad = unet.input_vjp(&b, &mut plan, &v_dev)?;
        debug_assert_eq!(grad.shape(), &shape[..]);
        outputs.push(("grad_x", b.download(grad)?));
    }
    let seconds = started.elapsed().as_secs_f64();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        outputs.iter().map(|(name, data)| (*name, &shape[..], &data[..])).collect();
    write_safetensors(&args.output, &tensors)?;
    println!(
        "wrote {} ({}) for {n} images, config {}, on {} in {seconds:.2} s",
        args.output.display(),
        outputs.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        unet.config.name,
        b.name()
    );
    Ok(())
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    crate::bench::bench(&backend(&args.device)?, args)
}

pub fn attack(args: &AttackArgs) -> Result<()> {
    let b = backend(&args.device)?;
    check_batch(args.batch)?;
    if args.votes == 0 {
        return Err(Error::invalid("--votes must be at least 1 (purifications that judge each image)"));
    }
    let stages = args.attack_settings();
    for stage in &stages {
        stage.validate()?;
    }
    let first = &stages[0];
    let images = load_images(&args.inputs, args.count)?;
    let Some(labels) = images.labels.clone() else {
        return Err(Error::invalid("attack needs labelled images (CIFAR-10 binary files); PNG files carry no labels"));
    };
    if (images.height, images.width) != (32, 32) {
        return Err(Error::invalid(format!("attack works on 32x32 images, got {}x{}", images.height, images.width)));
    }
    let settings = &args.purification;
    let (unet, auxiliary) = load_purification(&b, settings)?;
    let classifier = Classifier::load(&b, &TensorFile::open(&args.classifier)?)?;
    let purifier = Purifier::new(&b, &unet, auxiliary.as_ref(), settings.settings())?;
    let defence = Defence { purifier: &purifier, classifier: &classifier };
    let bpda = !matches!(settings.guidance(), purifier::diffusion::Guidance::None);
    let stage_names: Vec<String> = stages.iter().map(|s| s.name()).collect();
    eprintln!(
        "attacking {} images on {}: {} ({} iterations) {} eps {:.5}, EOT {}, {} votes, {}; defence: UNet {} ({} reverse steps from t* = {}), mode {}, classifier {}{}",
        images.count,
        b.name(),
        stage_names.join(" then "),
        first.iterations,
        first.norm.name(),
        first.eps,
        first.eot,
        args.votes,
        if first.random_start { "random start" } else { "clean start" },
        unet.config.name,
        purifier.steps().len(),
        settings.t_star,
        settings.guidance().name(),
        classifier.name,
        if bpda { "; the guidance shift is a constant in the attack's gradient (BPDA)" } else { "" }
    );

    let per_image = images.image_len();
    let started = Instant::now();
    // Plans by batch size: later attacks only see the images that survived the earlier ones.
    let mut plans = HashMap::new();
    let (mut clean_votes, mut adversarial_votes) = (Vec::new(), Vec::new());
    let mut adversarial = Vec::with_capacity(images.pixels.len());
    let mut traces = Vec::new();
    let robust = |correct: usize| 2 * correct > args.votes;
    for (index, chunk) in images.pixels.chunks(args.batch * per_image).enumerate() {
        let n = chunk.len() / per_image;
        let chunk_labels = &labels[index * args.batch..index * args.batch + n];
        // Each image's index in the whole input keys all its noise, attacked or judged.
        let chunk_indices: Vec<u64> = (index * args.batch..index * args.batch + n).map(|g| g as u64).collect();
        let batch_started = Instant::now();
        let clean = defence.correct_votes(
            plan_for(&mut plans, &defence, n)?,
            chunk,
            chunk_labels,
            &chunk_indices,
            args.votes,
            first.seed,
        )?;
        // Each image keeps the attack result the judges found hardest (its clean self, if it
        // was already misclassified: such images are not attacked).
        let (mut x_adv, mut votes) = (chunk.to_vec(), clean.clone());
        let mut batch_traces = Vec::new();
        for stage in &stages {
            let alive: Vec<usize> = (0..n).filter(|&i| robust(votes[i])).collect();
            if alive.is_empty() {
                break;
            }
            let pixels: Vec<f32> =
                alive.iter().flat_map(|&i| chunk[i * per_image..(i + 1) * per_image].to_vec()).collect();
            let alive_labels: Vec<u8> = alive.iter().map(|&i| chunk_labels[i]).collect();
            let alive_indices: Vec<u64> = alive.iter().map(|&i| chunk_indices[i]).collect();
            let plan = plan_for(&mut plans, &defence, alive.len())?;
            let name = stage.name();
            let (x, trace) = defence.attack(plan, &pixels, &alive_labels, &alive_indices, stage, |t| {
                eprintln!(
                    "  batch {index} {name} after {} steps: loss {:.4}, accuracy over the EOT draws {:.1}%, {:.2} s",
                    t.iteration,
                    t.loss,
                    100.0 * t.eot_accuracy,
                    t.seconds
                )
            })?;
            let judged = defence.correct_votes(plan, &x, &alive_labels, &alive_indices, args.votes, first.seed)?;
            for (j, &i) in alive.iter().enumerate() {
                if judged[j] <= votes[i] {
                    votes[i] = judged[j];
                    x_adv[i * per_image..(i + 1) * per_image].copy_from_slice(&x[j * per_image..(j + 1) * per_image]);
                }
            }
            batch_traces.push(serde_json::json!({
                "attack": name,
                "images": alive.len(),
                "correct_votes": judged,
                "steps": trace.iter().map(|t| serde_json::json!({
                    "iteration": t.iteration, "loss": t.loss, "eot_accuracy": t.eot_accuracy, "seconds": t.seconds,
                })).collect::<Vec<_>>(),
            }));
        }
        clean_votes.extend(clean);
        adversarial_votes.extend(votes);
        adversarial.extend_from_slice(&x_adv);
        traces.push(batch_traces);
        eprintln!("  batch {index}: {n} images in {:.1} s", batch_started.elapsed().as_secs_f64());
    }
    let seconds = started.elapsed().as_secs_f64();
    let adversarial =
        ImageBatch::new(images.height, images.width, adversarial, Some(labels.clone()), images.names.clone())?;

    let count = images.count as f64;
    let share =
        |votes: &[usize], judge: &dyn Fn(usize) -> bool| votes.iter().filter(|&&v| judge(v)).count() as f64 / count;
    let majority = |v: usize| 2 * v > args.votes;
    let all = |v: usize| v == args.votes;
    let (clean_majority, clean_all) = (share(&clean_votes, &majority), share(&clean_votes, &all));
    let (robust_majority, robust_all) = (share(&adversarial_votes, &majority), share(&adversarial_votes, &all));
    let undefended_clean = accuracy(&b, &classifier, &images, &labels, args.batch)?;
    let undefended_adversarial = accuracy(&b, &classifier, &adversarial, &labels, args.batch)?;
    println!(
        "attacked {} images in {seconds:.1} s ({}, {} iterations x {} EOT draws, {} votes per image)",
        images.count,
        stage_names.join(" then "),
        first.iterations,
        first.eot,
        args.votes
    );
    println!(
        "defended clean accuracy: {:.2}% (majority of votes), {:.2}% (all votes)",
        100.0 * clean_majority,
        100.0 * clean_all
    );
    println!(
        "defended robust accuracy ({} eps {:.5}): {:.2}% (majority of votes), {:.2}% (all votes)",
        first.norm.name(),
        first.eps,
        100.0 * robust_majority,
        100.0 * robust_all
    );
    println!(
        "{} alone: {:.2}% on the clean images, {:.2}% on the adversarial ones",
        classifier.name,
        100.0 * undefended_clean,
        100.0 * undefended_adversarial
    );

    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        for i in 0..adversarial.count {
            let path = out.join(format!("{}.png", adversarial.names[i]));
            write_png(&path, adversarial.image(i), adversarial.height, adversarial.width)?;
        }
        // One purification of each adversarial image, for the grid.
        let purified = purify_in_batches(&purifier, &adversarial, args.batch, |_, _, _, _| {})?;
        let purified = ImageBatch::from_model_range(&purified, 32, 32, None, images.names.clone())?;
        let grid = out.join("grid.png");
        write_comparison_grid(
            &grid,
            &adversarial,
            &purified,
            Some(&images),
            DEFAULT_CELLS_PER_ROW,
            DEFAULT_GRID_SCALE,
        )?;
        println!(
            "wrote {} adversarial PNGs and {} (each cell: clean | adversarial | purified adversarial)",
            adversarial.count,
            grid.display()
        );
    }
    if let Some(path) = &args.report {
        let mut report = report_header(&b, &images, &args.inputs, &unet, settings);
        let more = serde_json::json!({
            "classifier": args.classifier,
            "purification": with_batch(settings.to_json(), args.batch),
            "attack": {
                "stages": stages.iter().map(|s| serde_json::json!({
                    "name": s.name(), "norm": s.norm.name(), "eps": s.eps,
                    "step_size": match s.method { Method::Pgd => serde_json::json!(s.step_size), Method::Apgd => serde_json::json!("adaptive from 2 eps") },
                    "iterations": s.iterations, "eot": s.eot, "random_start": s.random_start, "seed": s.seed,
                })).collect::<Vec<_>>(),
                "gradient": if bpda { "exact through every reverse step; guidance shift held constant (BPDA on the guidance only)" } else { "exact through every reverse step" },
                "attacked": "images the defence classified correctly by majority (clean, then after each earlier stage)",
            },
            "votes": args.votes,
            "accuracy": {
                "undefended_clean": undefended_clean,
                "undefended_adversarial": undefended_adversarial,
                "defended_clean_majority": clean_majority,
                "defended_clean_all": clean_all,
                "robust_majority": robust_majority,
                "robust_all": robust_all,
            },
            "correct_votes": { "clean": clean_votes, "adversarial": adversarial_votes },
            "trace": traces,
            "seconds": seconds,
        });
        extend(&mut report, more);
        write_report(path, &report)?;
    }
    Ok(())
}
