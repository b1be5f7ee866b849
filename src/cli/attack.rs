//! `purifier attack`.
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use purifier::attack::{AttackSettings, Defence, DefencePlan, Loss, Method, Norm};
use purifier::backend::cuda::CudaBackend;
use purifier::backend::Backend;
use purifier::data::image::{write_png, DEFAULT_CELLS_PER_ROW, DEFAULT_GRID_SCALE};
use purifier::data::sheet::{write_labelled_sheet, Caption, RIGHT, WRONG};
use purifier::data::tensor_file::TensorFile;
use purifier::data::{load_images, ImageBatch};
use purifier::error::{Error, Result};
use purifier::model::Classifier;
use purifier::purify::Purifier;

use super::args::{cli_name, parse_number, DeviceArgs, PurificationArgs};
use super::backend::unet_backend;
use super::outputs::Outputs;
use super::pipeline::{
    accuracy, check_batch, load_purification, predict, prediction_caption, purify_in_batches, title_caption,
};
use super::progress::Progress;
use super::report::{extend, report_header, with_batch, write_report};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttackArg {
    /// PGD on the cross-entropy, fixed step.
    Pgd,
    /// APGD on the cross-entropy.
    ApgdCe,
    /// APGD on the DLR loss.
    ApgdDlr,
    /// AutoAttack's version for stochastic defences: APGD-CE, then APGD-DLR on the images that
    /// survived it (Croce & Hein 2020 use 100 iterations and EOT 20).
    AutoattackRand,
}

/// What the attack is run against.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DefenceArg {
    /// The defended model C(purify(x)): the purification flags above, then --classifier.
    Purification,
    /// --classifier alone: the undefended baseline (deterministic, so EOT and votes are 1).
    None,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NormArg {
    /// Every pixel moves by at most eps.
    Linf,
    /// The perturbation's Euclidean length is at most eps.
    L2,
}

#[derive(Args)]
pub struct AttackArgs {
    /// Labelled images: CIFAR-10 binary files.
    #[arg(long = "input", short, required_unless_present = "plan_memory", num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub purification: PurificationArgs,
    /// The classifier under attack (CIFAR ResNet or WideResNet, safetensors): C in C(purify(x)),
    /// or alone with --defence none.
    #[arg(long)]
    pub classifier: PathBuf,
    /// The attack.
    #[arg(long, value_enum, default_value_t = AttackArg::Pgd)]
    pub attack: AttackArg,
    /// Threat model: l_inf or l_2 ball, on pixels in [0, 1].
    #[arg(long, value_enum, default_value_t = NormArg::Linf)]
    pub norm: NormArg,
    /// Radius of the ball, a number or a fraction like 8/255 (default: 8/255 for linf, 0.5 for l2).
    #[arg(long, value_parser = parse_number, allow_hyphen_values = true)]
    pub eps: Option<f32>,
    /// PGD step (default: 2/255 for linf, eps/4 for l2; APGD adapts its own from 2 eps).
    #[arg(long, value_parser = parse_number, allow_hyphen_values = true)]
    pub step_size: Option<f32>,
    /// Iterations of each attack.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Purifications whose gradients each iteration averages (expectation over transformation).
    #[arg(long, default_value_t = 10)]
    pub eot: usize,
    /// Purifications that judge each final image: robust if a strict majority is classified
    /// correctly (the report also gives "all of them").
    #[arg(long, default_value_t = 5)]
    pub votes: usize,
    /// The model attacked.
    #[arg(long, value_enum, default_value_t = DefenceArg::Purification)]
    pub defence: DefenceArg,
    /// Start at the clean image instead of a random point of the ball.
    #[arg(long)]
    pub no_random_start: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print the device memory the attack's networks and plan take at --batch with --precision
    /// (every allocation the CUDA backend makes, counted without allocating: no GPU needed) and
    /// exit without attacking.
    #[arg(long)]
    pub plan_memory: bool,
    /// Also write the adversarial images as PNGs and grid.png (clean | adversarial | purified) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write a JSON report (settings, seeds, accuracies, per-iteration trace) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl AttackArgs {
    /// The attacks to run in turn (AutoAttack's second one only on the images the first left robust).
    pub fn attack_settings(&self) -> Vec<AttackSettings> {
        let norm = match self.norm {
            NormArg::Linf => Norm::Linf,
            NormArg::L2 => Norm::L2,
        };
        let pgd = AttackSettings::pgd(norm, self.iterations, self.eot, self.purification.seed);
        let eps = self.eps.unwrap_or(pgd.eps);
        let step_size = self.step_size.unwrap_or(match norm {
            Norm::Linf => pgd.step_size,
            Norm::L2 => eps / 4.0,
        });
        let base = AttackSettings { eps, step_size, random_start: !self.no_random_start, ..pgd };
        let apgd = |loss, seed_offset: u64| AttackSettings {
            method: Method::Apgd,
            loss,
            seed: base.seed.wrapping_add(seed_offset),
            ..base.clone()
        };
        match self.attack {
            AttackArg::Pgd => vec![base],
            AttackArg::ApgdCe => vec![apgd(Loss::CrossEntropy, 0)],
            AttackArg::ApgdDlr => vec![apgd(Loss::Dlr, 0)],
            AttackArg::AutoattackRand => vec![apgd(Loss::CrossEntropy, 0), apgd(Loss::Dlr, 1)],
        }
    }
}

pub fn run(args: &AttackArgs, progress: Progress) -> Result<()> {
    if args.plan_memory {
        return print_plan_memory(args);
    }
    purifier::with_backend!(unet_backend(&args.device)?, b => run_on(b, args, progress))
}

/// The attack on any backend: the gradient goes back through every reverse step (and the
/// classifier) with the backend's own backward ops.
fn run_on<B: Backend>(b: B, args: &AttackArgs, progress: Progress) -> Result<()> {
    check_batch(args.batch)?;
    if args.votes == 0 {
        return Err(Error::invalid("--votes must be at least 1 (purifications that judge each image)"));
    }
    let purified = args.defence == DefenceArg::Purification;
    // The classifier alone is deterministic: one draw is the expectation, one vote the verdict.
    let (eot, votes) = if purified { (args.eot, args.votes) } else { (1, 1) };
    let stages: Vec<AttackSettings> =
        args.attack_settings().into_iter().map(|s| AttackSettings { eot: s.eot.min(eot), ..s }).collect();
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
    // Every output is known writable, and none overwrites an input, before any compute.
    let used_files = purified.then(|| settings.files()).into_iter().flatten();
    let mut outputs = Outputs::new(args.inputs.iter().chain([&args.classifier]).map(|p| p.as_path()).chain(used_files));
    let folder = args.out.as_deref().map(|p| outputs.folder(p, "--out")).transpose()?;
    let report_file = args.report.as_deref().map(|p| outputs.file(p, "--report")).transpose()?;
    let networks = purified.then(|| load_purification(&b, settings)).transpose()?;
    let classifier = Classifier::load(&b, &TensorFile::open(&args.classifier)?)?;
    let purifier =
        networks.as_ref().map(|(unet, aux)| Purifier::new(&b, unet, aux.as_ref(), settings.settings())).transpose()?;
    let defence = match &purifier {
        Some(purifier) => Defence::purified(purifier, &classifier),
        None => Defence::undefended(&b, &classifier),
    };
    let bpda = purified && !matches!(settings.guidance(), purifier::diffusion::Guidance::None);
    let stage_names: Vec<String> = stages.iter().map(|s| s.name()).collect();
    let model = match &purifier {
        Some(p) => format!(
            "defence: UNet {} ({} reverse steps from t* = {}), mode {}, classifier {}{}",
            p.unet.config.name,
            p.steps().len(),
            settings.t_star,
            settings.guidance().name(),
            classifier.name,
            if bpda { "; the guidance shift is a constant in the attack's gradient (BPDA)" } else { "" }
        ),
        None => format!("no defence: {} alone (deterministic: EOT 1, 1 vote)", classifier.name),
    };
    progress.log(&format!(
        "attacking {} images on {}: {} ({} iterations) {} eps {:.5}, EOT {}, {} votes, {}; {model}",
        images.count,
        b.name(),
        stage_names.join(" then "),
        first.iterations,
        first.norm.name(),
        first.eps,
        first.eot,
        votes,
        if first.random_start { "random start" } else { "clean start" },
    ));

    let per_image = images.image_len();
    let started = Instant::now();
    // Plans by batch size: later attacks only see the images that survived the earlier ones.
    let mut plans = HashMap::new();
    let (mut clean_votes, mut adversarial_votes) = (Vec::new(), Vec::new());
    let mut adversarial = Vec::with_capacity(images.pixels.len());
    let mut traces = Vec::new();
    let robust = |correct: usize| 2 * correct > votes;
    // Progress in attack iterations (the start of APGD counts as one): an upper bound, since a
    // stage with no image left to attack is skipped (and counted as done).
    let batches = images.count.div_ceil(args.batch);
    let records = |stage: &AttackSettings| stage.iterations as u64 + u64::from(stage.method == Method::Apgd);
    let bar = progress.bar(batches as u64 * stages.iter().map(records).sum::<u64>(), "attack iterations");
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
            votes,
            first.seed,
        )?;
        // Each image keeps the attack result the judges found hardest (its clean self, if it
        // was already misclassified: such images are not attacked).
        let (mut x_adv, mut image_votes) = (chunk.to_vec(), clean.clone());
        let mut batch_traces = Vec::new();
        for stage in &stages {
            let alive: Vec<usize> = (0..n).filter(|&i| robust(image_votes[i])).collect();
            if alive.is_empty() {
                bar.inc(records(stage));
                continue;
            }
            let pixels: Vec<f32> =
                alive.iter().flat_map(|&i| chunk[i * per_image..(i + 1) * per_image].to_vec()).collect();
            let alive_labels: Vec<u8> = alive.iter().map(|&i| chunk_labels[i]).collect();
            let alive_indices: Vec<u64> = alive.iter().map(|&i| chunk_indices[i]).collect();
            let plan = plan_for(&mut plans, &defence, alive.len())?;
            let name = stage.name();
            bar.set_message(format!("batch {}/{batches} {name} on {} images", index + 1, alive.len()));
            let (x, trace) = defence.attack(plan, &pixels, &alive_labels, &alive_indices, stage, |t| {
                bar.inc(1);
                bar.log(&format!(
                    "  batch {}/{batches} {name} after {} steps: loss {:.4}, accuracy over the EOT draws {:.1}%, {:.2} s, ETA {}",
                    index + 1,
                    t.iteration,
                    t.loss,
                    100.0 * t.eot_accuracy,
                    t.seconds,
                    bar.eta()
                ))
            })?;
            let judged = defence.correct_votes(plan, &x, &alive_labels, &alive_indices, votes, first.seed)?;
            for (j, &i) in alive.iter().enumerate() {
                if judged[j] <= image_votes[i] {
                    image_votes[i] = judged[j];
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
        adversarial_votes.extend(image_votes);
        adversarial.extend_from_slice(&x_adv);
        traces.push(batch_traces);
        bar.log(&format!(
            "  batch {}/{batches}: {n} images in {:.1} s, ETA {}",
            index + 1,
            batch_started.elapsed().as_secs_f64(),
            bar.eta()
        ));
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    let adversarial =
        ImageBatch::new(images.height, images.width, adversarial, Some(labels.clone()), images.names.clone())?;

    let count = images.count as f64;
    let share =
        |votes: &[usize], judge: &dyn Fn(usize) -> bool| votes.iter().filter(|&&v| judge(v)).count() as f64 / count;
    let majority = |v: usize| 2 * v > votes;
    let all = |v: usize| v == votes;
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
        votes
    );
    if purified {
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
    } else {
        println!(
            "undefended robust accuracy of {} ({} eps {:.5}): {:.2}% (clean {:.2}%)",
            classifier.name,
            first.norm.name(),
            first.eps,
            100.0 * robust_majority,
            100.0 * clean_majority
        );
    }
    println!(
        "{} alone: {:.2}% on the clean images, {:.2}% on the adversarial ones",
        classifier.name,
        100.0 * undefended_clean,
        100.0 * undefended_adversarial
    );

    if let Some(folder) = folder {
        let staged = outputs.staged_folder(folder);
        for i in 0..adversarial.count {
            let path = staged.path(&format!("{}.png", adversarial.names[i]));
            write_png(&path, adversarial.image(i), adversarial.height, adversarial.width)?;
        }
        // One purification of each adversarial image, for the grid.
        let purified_images = match &purifier {
            Some(purifier) => {
                let x = purify_in_batches(purifier, &adversarial, args.batch, |_, _, _, _| {})?;
                Some(ImageBatch::from_model_range(&x, 32, 32, None, images.names.clone())?)
            }
            None => None,
        };
        // Captions: the class, the classifier on the clean image, on the last column, and
        // (defended) the votes of the defence on the adversarial image.
        let last = purified_images.as_ref().unwrap_or(&adversarial);
        let before = predict(&b, &classifier, &images, args.batch, None)?;
        let after = predict(&b, &classifier, last, args.batch, None)?;
        let captions: Vec<Vec<Caption>> = (0..images.count)
            .map(|i| {
                let label = Some(labels[i]);
                let mut lines = vec![
                    title_caption(&images.names[i], label),
                    prediction_caption("before", before[i], label),
                    prediction_caption("after", after[i], label),
                ];
                if purified {
                    let right = adversarial_votes[i];
                    let colour = if robust(right) { RIGHT } else { WRONG };
                    lines.push(Caption::new(format!("votes: {right}/{votes} right"), colour));
                }
                lines
            })
            .collect();
        let threat = format!("{} {} eps {:.4}", stage_names.join(" + "), first.norm.name(), first.eps);
        let (title, columns) = match &purified_images {
            Some(p) => (
                format!(
                    "clean | adversarial | purified adversarial ({threat}); {} before -> after; defence votes",
                    classifier.name
                ),
                vec![&images, &adversarial, p],
            ),
            None => (
                format!("clean | adversarial ({threat}); {} alone before -> after", classifier.name),
                vec![&images, &adversarial],
            ),
        };
        write_labelled_sheet(
            &staged.path("grid.png"),
            &title,
            &columns,
            &captions,
            DEFAULT_CELLS_PER_ROW,
            DEFAULT_GRID_SCALE,
        )?;
    }
    if let Some(report_file) = report_file {
        let mut report = report_header(&b, &images, &args.inputs, networks.as_ref().map(|(unet, _)| unet), settings);
        let more = serde_json::json!({
            "classifier": args.classifier,
            "defence": cli_name(args.defence),
            "purification": purified.then(|| with_batch(settings.to_json(), args.batch)),
            "attack": {
                "stages": stages.iter().map(|s| serde_json::json!({
                    "name": s.name(), "norm": s.norm.name(), "eps": s.eps,
                    "step_size": match s.method { Method::Pgd => serde_json::json!(s.step_size), Method::Apgd => serde_json::json!("adaptive from 2 eps") },
                    "iterations": s.iterations, "eot": s.eot, "random_start": s.random_start, "seed": s.seed,
                })).collect::<Vec<_>>(),
                "gradient": if !purified { "exact (the classifier alone)" } else if bpda { "exact through every reverse step; guidance shift held constant (BPDA on the guidance only)" } else { "exact through every reverse step" },
                "attacked": "images the model classified correctly by majority (clean, then after each earlier stage)",
                "apgd_result": "per image, the last iterate a strict majority of its EOT draws misclassified (AutoAttack's bookkeeping), else the highest-loss iterate; PGD: the last iterate",
            },
            "votes": votes,
            "accuracy": {
                "undefended_clean": undefended_clean,
                "undefended_adversarial": undefended_adversarial,
                "defended_clean_majority": purified.then_some(clean_majority),
                "defended_clean_all": purified.then_some(clean_all),
                "robust_majority": robust_majority,
                "robust_all": robust_all,
            },
            "correct_votes": { "clean": clean_votes, "adversarial": adversarial_votes },
            "trace": traces,
            "seconds": seconds,
            "device_memory_peak_bytes": b.peak_memory(),
        });
        extend(&mut report, more);
        write_report(outputs.staged_file(report_file), &report)?;
    }
    outputs.commit()?;
    if let Some(out) = &args.out {
        println!(
            "wrote {} adversarial PNGs and {} ({})",
            adversarial.count,
            out.join("grid.png").display(),
            if purified {
                "each cell: clean | adversarial | purified adversarial"
            } else {
                "each cell: clean | adversarial"
            }
        );
    }
    if let Some(path) = &args.report {
        println!("wrote {}", path.display());
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

/// `--plan-memory`: the device bytes of the attack's networks and of one defence plan at
/// `--batch`, counted on the CUDA backend over a driver that holds no memory (every allocation a
/// GPU run makes, made and counted, none backed). Needs no GPU and no NVRTC.
fn print_plan_memory(args: &AttackArgs) -> Result<()> {
    let precision = args.device.precision;
    check_batch(args.batch)?;
    let b = CudaBackend::sizing(precision)?;
    let memory = b.memory();
    let scratch = memory.in_use();
    let purified = args.defence == DefenceArg::Purification;
    let settings = &args.purification;
    let networks = purified.then(|| load_purification(&b, settings)).transpose()?;
    let classifier = Classifier::load(&b, &TensorFile::open(&args.classifier)?)?;
    let weights = memory.in_use() - scratch;
    let purifier =
        networks.as_ref().map(|(unet, aux)| Purifier::new(&b, unet, aux.as_ref(), settings.settings())).transpose()?;
    let defence = match &purifier {
        Some(purifier) => Defence::purified(purifier, &classifier),
        None => Defence::undefended(&b, &classifier),
    };
    // One step's UNet buffers (activations, saved intermediates, gradients), measured alone.
    let unet_step = match &networks {
        Some((unet, _)) => {
            let before = memory.in_use();
            let unet_plan = unet.plan(&b, args.batch, true)?;
            let bytes = memory.in_use() - before;
            drop(unet_plan);
            Some(bytes)
        }
        None => None,
    };
    memory.reset_peak();
    let plan = defence.plan(args.batch)?;
    let plan_bytes = memory.in_use() - weights - scratch;
    let mb = |bytes: usize| bytes as f64 / 1e6;
    let what = match &purifier {
        Some(p) => format!(
            "UNet {} (t* = {}, {} reverse steps, mode {}) and {}",
            p.unet.config.name,
            settings.t_star,
            p.steps().len(),
            settings.guidance().name(),
            classifier.name
        ),
        None => format!("{} alone", classifier.name),
    };
    println!("device memory of the attack's gradient at batch {}, {precision} activations: {what}", plan.batch());
    println!("  weights:          {:>10.1} MB", mb(weights));
    println!("  defence plan:     {:>10.1} MB", mb(plan_bytes));
    if let (Some(p), Some(unet_step)) = (&purifier, unet_step) {
        // The tape: each reverse step's input and the unclamped output, f32.
        let tape = (p.steps().len() + 1) * plan.batch() * 3 * 32 * 32 * 4;
        println!("    of which one step's UNet buffers (forward and VJP): {:.1} MB", mb(unet_step));
        println!("    of which the tape of reverse-step inputs: {:.1} MB", mb(tape));
    }
    println!("  backend scratch:  {:>10.1} MB", mb(scratch));
    println!(
        "  total held:       {:>10.1} MB ({} bytes); peak while planning {:.1} MB",
        mb(memory.in_use()),
        memory.in_use(),
        mb(memory.peak())
    );
    println!(
        "(counted allocation by allocation on the CUDA backend without allocating; a run also holds the plans of \
         smaller batches it meets: the last batch, and the survivors of each stage)"
    );
    Ok(())
}
