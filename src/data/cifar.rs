//! The CIFAR-10 binary record format: each record is 1 label byte (0..9) followed by 3072 pixel
//! bytes, planar RGB (1024 R, 1024 G, 1024 B), rows top to bottom. A file is records back to back,
//! with no header.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::{file_stem, write_atomically, ImageBatch, IMAGE_SIZE};
use crate::error::{Error, Result};

/// Pixel bytes of one record: 3 x 32 x 32.
pub const IMAGE_BYTES: usize = 3 * IMAGE_SIZE * IMAGE_SIZE;
/// Bytes of one record: the label, then the pixels.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// The class names, in label order.
pub const CLASS_NAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The name of class `label`, or `None` past 9.
pub fn class_name(label: u8) -> Option<&'static str> {
    CLASS_NAMES.get(label as usize).copied()
}

/// Reads the records of a CIFAR-10 binary file, at most `limit` of them, as a batch of 32x32
/// images in [0, 1] with their labels. Images are named `<file stem>_<record index>`, the index
/// zero-padded to 4 digits (`test_lossless_0007`).
///
/// Fails on an empty file, a size that is not a whole number of 3073-byte records, or a label
/// above 9.
pub fn read_cifar(path: &Path, limit: Option<usize>) -> Result<ImageBatch> {
    let bad = |reason: String| Error::BadImage { what: path.display().to_string(), reason };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let records = check_size(size).map_err(bad)?;
    let count = limit.map_or(records, |l| l.min(records));
    let mut bytes = vec![0u8; count * RECORD_BYTES];
    file.read_exact(&mut bytes).map_err(|e| Error::io(path, e))?;
    let (labels, pixels) = parse_records(&bytes).map_err(bad)?;
    let names = names(&file_stem(path), records, count);
    Ok(ImageBatch { count, height: IMAGE_SIZE, width: IMAGE_SIZE, pixels, labels: Some(labels), names })
}

/// Decodes the bytes of a whole CIFAR-10 binary file as `read_cifar` does (same size check, same
/// record parser, same names); `what` names the file in errors.
pub fn decode_cifar(bytes: &[u8], what: &str, limit: Option<usize>) -> Result<ImageBatch> {
    let bad = |reason: String| Error::BadImage { what: what.to_string(), reason };
    let records = check_size(bytes.len() as u64).map_err(bad)?;
    let count = limit.map_or(records, |l| l.min(records));
    let (labels, pixels) = parse_records(&bytes[..count * RECORD_BYTES]).map_err(bad)?;
    let stem = file_stem(Path::new(what));
    Ok(ImageBatch {
        count,
        height: IMAGE_SIZE,
        width: IMAGE_SIZE,
        pixels,
        labels: Some(labels),
        names: names(&stem, records, count),
    })
}

/// `<stem>_<index>` for the first `count` of `records` records, the index zero-padded to at least 4 digits.
fn names(stem: &str, records: usize, count: usize) -> Vec<String> {
    let digits = (records.max(1) - 1).to_string().len().max(4);
    (0..count).map(|i| format!("{stem}_{i:0digits$}")).collect()
}

/// Number of records in a file of `size` bytes, or why that size is not a CIFAR-10 file.
fn check_size(size: u64) -> std::result::Result<usize, String> {
    if size == 0 {
        return Err("the file is empty (expected CIFAR-10 records of 3073 bytes)".to_string());
    }
    if !size.is_multiple_of(RECORD_BYTES as u64) {
        return Err(format!(
            "file size {size} bytes is not a whole number of 3073-byte CIFAR-10 records \
             ({} whole records plus {} bytes: truncated, or not a CIFAR-10 binary file)",
            size / RECORD_BYTES as u64,
            size % RECORD_BYTES as u64
        ));
    }
    usize::try_from(size / RECORD_BYTES as u64).map_err(|_| format!("file of {size} bytes is too large"))
}

/// Splits whole records into labels and [0, 1] pixels, or says which record has a bad label.
pub fn parse_records(bytes: &[u8]) -> std::result::Result<(Vec<u8>, Vec<f32>), String> {
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(format!("{} bytes are not a whole number of 3073-byte records", bytes.len()));
    }
    let count = bytes.len() / RECORD_BYTES;
    let mut labels = Vec::with_capacity(count);
    let mut pixels = Vec::with_capacity(count * IMAGE_BYTES);
    for (index, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if class_name(label).is_none() {
            return Err(format!(
                "record {index} (byte offset {}) has label {label}, expected 0..9",
                index * RECORD_BYTES
            ));
        }
        labels.push(label);
        pixels.extend(record[1..].iter().map(|&b| f32::from(b) / 255.0));
    }
    Ok((labels, pixels))
}

/// Writes a batch of labelled 32x32 images as CIFAR-10 records, atomically. Pixels are quantised
/// to 8 bits as for PNG (round(255 p), p clamped to [0, 1]); a NaN pixel is an error.
pub fn write_cifar(path: &Path, batch: &ImageBatch) -> Result<()> {
    if (batch.height, batch.width) != (IMAGE_SIZE, IMAGE_SIZE) {
        return Err(Error::invalid(format!(
            "CIFAR-10 records hold 32x32 images; cannot write {}x{} images to {}",
            batch.height,
            batch.width,
            path.display()
        )));
    }
    if batch.count == 0 {
        return Err(Error::invalid(format!("no images to write to {}", path.display())));
    }
    let labels = batch.labels.as_ref().ok_or_else(|| {
        Error::invalid(format!("CIFAR-10 records need labels; the images for {} have none", path.display()))
    })?;
    if labels.len() != batch.count || batch.pixels.len() != batch.count * IMAGE_BYTES {
        return Err(Error::invalid(format!(
            "inconsistent batch for {}: {} images, {} labels, {} pixel values",
            path.display(),
            batch.count,
            labels.len(),
            batch.pixels.len()
        )));
    }
    if let Some(index) = labels.iter().position(|&l| class_name(l).is_none()) {
        return Err(Error::invalid(format!(
            "image {index} has label {}, expected 0..9 (writing {})",
            labels[index],
            path.display()
        )));
    }
    let bytes = super::image::quantize(&batch.pixels, || format!("images for {}", path.display()))?;
    let mut out = Vec::with_capacity(batch.count * RECORD_BYTES);
    for (label, image) in labels.iter().zip(bytes.chunks_exact(IMAGE_BYTES)) {
        out.push(*label);
        out.extend_from_slice(image);
    }
    write_atomically(path, |w| w.write_all(&out).map_err(|e| Error::Write { path: path.to_path_buf(), source: e }))
}
