//! `purifier classify`.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use purifier::backend::Backend;
use purifier::data::load_images;
use purifier::data::tensor_file::TensorFile;
use purifier::error::{Error, Result};
use purifier::model::Classifier;

use super::args::DeviceArgs;
use super::backend::backend;
use super::pipeline::{check_batch, predict, share_correct};
use super::progress::Progress;

#[derive(Args)]
pub struct ClassifyArgs {
    /// Classifier weights (CIFAR ResNet, safetensors).
    #[arg(long)]
    pub classifier: PathBuf,
    /// Labelled images: CIFAR-10 binary files.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: &ClassifyArgs, progress: Progress) -> Result<()> {
    purifier::with_backend!(backend(&args.device)?, b => run_on(b, args, progress))
}

fn run_on<B: Backend>(b: B, args: &ClassifyArgs, progress: Progress) -> Result<()> {
    check_batch(args.batch)?;
    let classifier = Classifier::load(&b, &TensorFile::open(&args.classifier)?)?;
    let images = load_images(&args.inputs, args.count)?;
    let Some(labels) = images.labels.clone() else {
        return Err(Error::invalid(
            "classify needs labelled images (CIFAR-10 binary files); PNG files carry no labels",
        ));
    };
    let started = Instant::now();
    let bar = progress.bar(images.count as u64, "images");
    bar.set_message(format!("{} on {}", classifier.name, b.name()));
    let predictions = predict(&b, &classifier, &images, args.batch, Some(&bar))?;
    bar.finish();
    let acc = share_correct(&predictions, &labels);
    let confidence = predictions.iter().map(|p| p.confidence as f64).sum::<f64>() / predictions.len() as f64;
    println!(
        "{} top-1 accuracy: {:.2}% ({} of {} images), mean confidence {:.1}%, on {} in {:.2} s",
        classifier.name,
        acc * 100.0,
        (acc * images.count as f64).round() as usize,
        images.count,
        100.0 * confidence,
        b.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
