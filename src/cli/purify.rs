//! `purifier purify`.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use purifier::backend::Backend;
use purifier::data::image::{write_png, DEFAULT_CELLS_PER_ROW, DEFAULT_GRID_SCALE};
use purifier::data::sheet::{write_labelled_sheet, Caption};
use purifier::data::tensor_file::TensorFile;
use purifier::data::{load_images, ImageBatch};
use purifier::error::Result;
use purifier::model::Classifier;
use purifier::purify::Purifier;

use super::args::{DeviceArgs, PurificationArgs};
use super::backend::unet_backend;
use super::outputs::Outputs;
use super::pipeline::{
    check_batch, load_purification, predict, prediction_caption, purify_in_batches, share_correct, title_caption,
};
use super::progress::Progress;
use super::report::{extend, percentile, report_header, with_batch, write_report};

#[derive(Args)]
pub struct PurifyArgs {
    /// Images: CIFAR-10 binary files (.bin), PNG files (32x32 RGB), or folders of PNGs.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub purification: PurificationArgs,
    /// Output folder for purified PNGs and grid.png.
    #[arg(long, default_value = "out/purified")]
    pub out: PathBuf,
    /// Classifier whose accuracy is reported before and after purification (needs labels).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Also write a JSON summary (settings, timings, accuracy) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: &PurifyArgs, progress: Progress) -> Result<()> {
    purifier::with_backend!(unet_backend(&args.device)?, b => run_on(b, args, progress))
}

fn run_on<B: Backend>(b: B, args: &PurifyArgs, progress: Progress) -> Result<()> {
    check_batch(args.batch)?;
    let images = load_images(&args.inputs, args.count)?;
    let settings = &args.purification;
    // Every output is known writable, and none overwrites an input, before any compute.
    let mut outputs =
        Outputs::new(args.inputs.iter().chain(&args.classifier).map(|p| p.as_path()).chain(settings.files()));
    let folder = outputs.folder(&args.out, "--out")?;
    let report_file = args.report.as_deref().map(|p| outputs.file(p, "--report")).transpose()?;
    let (unet, auxiliary) = load_purification(&b, settings)?;
    let classifier = args.classifier.as_deref().map(|p| Classifier::load(&b, &TensorFile::open(p)?)).transpose()?;
    let mut purifier = Purifier::new(&b, &unet, auxiliary.as_ref(), settings.settings())?;
    progress.log(&format!(
        "purifying {} images on {}: UNet {} ({} reverse steps from t* = {}), mode {}, kappa {}, seed {}",
        images.count,
        b.name(),
        unet.config.name,
        purifier.steps().len(),
        settings.t_star,
        settings.guidance().name(),
        settings.kappa,
        settings.seed
    ));
    let batches = images.count.div_ceil(args.batch);
    let bar = progress.bar((batches * purifier.steps().len()) as u64, "reverse steps");
    bar.set_message(format!("batch 1/{batches}"));
    let ticker = bar.clone();
    purifier.observe_steps(move || ticker.inc(1));

    let mut step_seconds = Vec::new();
    let (mut network_calls, mut unet_vjps) = (0, 0);
    let started = Instant::now();
    let purified = purify_in_batches(&purifier, &images, args.batch, |index, n, report, seconds| {
        step_seconds.extend_from_slice(&report.step_seconds);
        network_calls += report.network_calls;
        unet_vjps += report.unet_vjps;
        bar.set_message(format!("batch {}/{batches}", (index + 2).min(batches)));
        bar.log(&format!(
            "  batch {}/{batches}: {n} images, {} UNet calls, {} UNet VJPs, {seconds:.2} s ({:.2} images/s), ETA {}",
            index + 1,
            report.network_calls,
            report.unet_vjps,
            n as f64 / seconds,
            bar.eta()
        ));
    })?;
    bar.finish();
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
    // The classifier's answers before and after, for the accuracy and the sheet's captions.
    let predictions = match &classifier {
        Some(classifier) => Some((
            predict(&b, classifier, &images, args.batch, None)?,
            predict(&b, classifier, &output, args.batch, None)?,
        )),
        None => None,
    };
    let mut accuracy_before_after: Option<(f64, f64)> = None;
    if let (Some(classifier), Some((before, after))) = (&classifier, &predictions) {
        match &images.labels {
            Some(labels) => {
                let (before, after) = (share_correct(before, labels), share_correct(after, labels));
                println!(
                    "classifier {} top-1: {:.2}% before, {:.2}% after purification ({} images)",
                    classifier.name,
                    before * 100.0,
                    after * 100.0,
                    images.count
                );
                accuracy_before_after = Some((before, after));
            }
            None => progress.log("no labels in the input: accuracy not reported"),
        }
    }

    let staged = outputs.staged_folder(folder);
    for i in 0..output.count {
        write_png(&staged.path(&format!("{}.png", output.names[i])), output.image(i), output.height, output.width)?;
    }
    let captions: Vec<Vec<Caption>> = (0..images.count)
        .map(|i| {
            let label = images.labels.as_ref().map(|l| l[i]);
            let mut lines = vec![title_caption(&images.names[i], label)];
            if let Some((before, after)) = &predictions {
                lines.push(prediction_caption("before", before[i], label));
                lines.push(prediction_caption("after", after[i], label));
            }
            lines
        })
        .collect();
    let title = format!(
        "input | purified ({} mode, t* {}){}",
        settings.guidance().name(),
        settings.t_star,
        match &classifier {
            Some(c) => format!("; {} before -> after", c.name),
            None => String::new(),
        }
    );
    write_labelled_sheet(
        &staged.path("grid.png"),
        &title,
        &[&images, &output],
        &captions,
        DEFAULT_CELLS_PER_ROW,
        DEFAULT_GRID_SCALE,
    )?;
    if let Some(report_file) = report_file {
        let mut report = report_header(&b, &images, &args.inputs, Some(&unet), settings);
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
        write_report(outputs.staged_file(report_file), &report)?;
    }
    outputs.commit()?;
    println!(
        "wrote {} PNGs and {} (each cell: input | purified, with labels and predictions)",
        output.count,
        args.out.join("grid.png").display()
    );
    if let Some(path) = &args.report {
        println!("wrote {}", path.display());
    }
    Ok(())
}
