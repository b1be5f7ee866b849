//! JSON reports and the figures they hold.
use std::io::Write;
use std::path::{Path, PathBuf};

use purifier::backend::Backend;
use purifier::data::ImageBatch;
use purifier::error::{Error, Result};
use purifier::model::Unet;

use super::args::PurificationArgs;

/// What every JSON report of a purification run starts with: the images, the device, the UNet
/// (none for an attack on the classifier alone).
pub(super) fn report_header<B: Backend>(
    b: &B,
    images: &ImageBatch,
    inputs: &[PathBuf],
    unet: Option<&Unet<B>>,
    settings: &PurificationArgs,
) -> serde_json::Value {
    serde_json::json!({
        "images": images.count,
        "inputs": inputs,
        "device": b.name(),
        "precision": b.precision().to_string(),
        "unet": unet.map(|unet| serde_json::json!({ "config": unet.config.name, "weights": settings.weights_name() })),
    })
}

/// Adds the keys of object `more` to object `report`.
pub(super) fn extend(report: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(report), serde_json::Value::Object(more)) = (report.as_object_mut(), more) {
        report.extend(more);
    }
}

pub(super) fn write_report(path: &Path, report: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report).expect("JSON of plain values");
    purifier::data::write_atomically(path, |w| {
        w.write_all(text.as_bytes()).map_err(|e| Error::Write { path: path.to_path_buf(), source: e })
    })
}

pub(super) fn with_batch(mut settings: serde_json::Value, batch: usize) -> serde_json::Value {
    settings["batch"] = batch.into();
    settings
}

/// The q-quantile (nearest rank) of a set of timings; 0 for none.
pub(super) fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}
