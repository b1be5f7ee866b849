//! The engine pieces the commands share: loading networks, purifying and classifying in batches.
use std::path::Path;
use std::time::Instant;

use purifier::backend::Backend;
use purifier::data::cifar::class_name;
use purifier::data::sheet::{Caption, RIGHT, TEXT, WRONG};
use purifier::data::tensor_file::TensorFile;
use purifier::data::ImageBatch;
use purifier::error::{Error, Result};
use purifier::model::classifier::{argmax, log_softmax_at};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{Purifier, PurifyPlan, PurifyReport};

use super::args::PurificationArgs;
use super::progress::Bar;

pub(super) fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    Ok(())
}

/// Purifies `images` in batches of at most `batch` and returns x_0 in [-1, 1] (each image's noise
/// keyed by its index, so the batch size changes nothing); `on_batch(index, images, report,
/// seconds)` after each batch.
pub(super) fn purify_in_batches<B: Backend>(
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
pub(super) fn load_purification<B: Backend>(
    b: &B,
    args: &PurificationArgs,
) -> Result<(Unet<B>, Option<Classifier<B>>)> {
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

pub(super) fn open_weights(path: &Path, what: &str) -> Result<TensorFile> {
    if !path.exists() {
        return Err(Error::invalid(format!(
            "{what} not found at {}; see weights/README.md for how to get or train them",
            path.display()
        )));
    }
    TensorFile::open(path)
}

/// The classifier's answer for one image: the class and its softmax probability.
#[derive(Clone, Copy, Debug)]
pub(super) struct Prediction {
    pub class: usize,
    pub confidence: f32,
}

/// Top-1 accuracy of `classifier` on `images` (pixels in [0, 1]).
pub(super) fn accuracy<B: Backend>(
    b: &B,
    classifier: &Classifier<B>,
    images: &ImageBatch,
    labels: &[u8],
    batch: usize,
) -> Result<f64> {
    Ok(share_correct(&predict(b, classifier, images, batch, None)?, labels))
}

/// The share of `predictions` that name the label.
pub(super) fn share_correct(predictions: &[Prediction], labels: &[u8]) -> f64 {
    let correct = predictions.iter().zip(labels).filter(|(p, &l)| p.class == l as usize).count();
    correct as f64 / labels.len() as f64
}

/// The classifier's prediction for every image, in batches of `batch`; `bar` counts the images.
pub(super) fn predict<B: Backend>(
    b: &B,
    classifier: &Classifier<B>,
    images: &ImageBatch,
    batch: usize,
    bar: Option<&Bar>,
) -> Result<Vec<Prediction>> {
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
        predictions.extend(logits.chunks(classifier.num_classes).map(|row| {
            let class = argmax(row);
            Prediction { class, confidence: log_softmax_at(row, class).exp() as f32 }
        }));
        if let Some(bar) = bar {
            bar.inc(n as u64);
        }
    }
    Ok(predictions)
}

/// The first caption line of an image: its class when labelled, else its name.
pub(super) fn title_caption(name: &str, label: Option<u8>) -> Caption {
    match label.and_then(class_name) {
        Some(class) => Caption::new(class, TEXT),
        None => Caption::new(name, TEXT),
    }
}

/// "before: cat 97%", green when it names the label, red when not, plain without a label.
pub(super) fn prediction_caption(when: &str, prediction: Prediction, label: Option<u8>) -> Caption {
    let class = class_name(prediction.class as u8).map_or_else(|| prediction.class.to_string(), str::to_string);
    let colour = match label {
        Some(l) if l as usize == prediction.class => RIGHT,
        Some(_) => WRONG,
        None => TEXT,
    };
    Caption::new(format!("{when}: {class} {:.0}%", 100.0 * prediction.confidence), colour)
}
