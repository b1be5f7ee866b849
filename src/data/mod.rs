//! Images and tensors in and out of the engine: CIFAR-10 binary records, PNG files, comparison grids
//! and safetensors files.
//!
//! Images travel as an [`ImageBatch`]: planar RGB (N x 3 x H x W) in [0, 1], the layout of the CIFAR
//! records and of the network's input, with optional labels and one name per image for output files.
//! Every reader checks its input and fails with an [`Error`] that names the file and the problem;
//! every writer writes a temporary file next to the target and renames it, so a failure leaves no
//! partial output behind.

pub mod cifar;
pub mod font;
pub mod fuzz_entry;
pub mod image;
pub mod sheet;
pub mod tensor_file;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{check_finite, Error, Result};

/// Side of the square images the CIFAR-10 UNet works on.
pub const IMAGE_SIZE: usize = 32;

/// A batch of RGB images in [0, 1], planar (N x 3 x H x W), with optional labels and per-image names.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageBatch {
    pub count: usize,
    pub height: usize,
    pub width: usize,
    /// N x 3 x H x W, planar RGB, rows top to bottom, values in [0, 1].
    pub pixels: Vec<f32>,
    /// One class index per image when the source had labels (CIFAR records), else `None`.
    pub labels: Option<Vec<u8>>,
    /// One name per image, unique within the batch, for output file names: `test_lossless_0007`
    /// for record 7 of `test_lossless.bin`, the file stem for a PNG.
    pub names: Vec<String>,
}

impl ImageBatch {
    /// Builds a batch, checking that `pixels`, `labels` and `names` agree with `count`, `height` and
    /// `width`, and that every pixel is finite and in [0, 1].
    pub fn new(
        height: usize,
        width: usize,
        pixels: Vec<f32>,
        labels: Option<Vec<u8>>,
        names: Vec<String>,
    ) -> Result<Self> {
        let image_len = 3 * height * width;
        if image_len == 0 {
            return Err(Error::invalid(format!("image size {height}x{width} is empty")));
        }
        if !pixels.len().is_multiple_of(image_len) {
            return Err(Error::invalid(format!(
                "{} pixel values are not a whole number of 3x{height}x{width} images",
                pixels.len()
            )));
        }
        let count = pixels.len() / image_len;
        if names.len() != count {
            return Err(Error::invalid(format!("{} names for {count} images", names.len())));
        }
        if let Some(labels) = &labels {
            if labels.len() != count {
                return Err(Error::invalid(format!("{} labels for {count} images", labels.len())));
            }
        }
        check_finite(&pixels, || "image batch".to_string())?;
        if let Some(index) = pixels.iter().position(|p| !(0.0..=1.0).contains(p)) {
            return Err(Error::invalid(format!("pixel value {} at element {index} is outside [0, 1]", pixels[index])));
        }
        Ok(ImageBatch { count, height, width, pixels, labels, names })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Values per image: 3 x H x W.
    pub fn image_len(&self) -> usize {
        3 * self.height * self.width
    }

    /// The shape of the batch as the network sees it: [N, 3, H, W].
    pub fn shape(&self) -> [usize; 4] {
        [self.count, 3, self.height, self.width]
    }

    /// Image `i` as 3 x H x W planar values. Panics if `i >= count`, like slice indexing.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The pixels mapped to the network's range [-1, 1] (p -> 2p - 1).
    pub fn to_model_range(&self) -> Vec<f32> {
        self.pixels.iter().map(|&p| 2.0 * p - 1.0).collect()
    }

    /// Builds a batch from network-range values x in [-1, 1] (x -> (x + 1) / 2, then clamped to
    /// [0, 1]: a sampler's output may overshoot slightly). Non-finite values are an error.
    pub fn from_model_range(
        x: &[f32],
        height: usize,
        width: usize,
        labels: Option<Vec<u8>>,
        names: Vec<String>,
    ) -> Result<Self> {
        check_finite(x, || "network output images".to_string())?;
        let pixels = x.iter().map(|&v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect();
        ImageBatch::new(height, width, pixels, labels, names)
    }

    /// The images in `range`, with their labels and names.
    pub fn select(&self, range: Range<usize>) -> Result<ImageBatch> {
        if range.start > range.end || range.end > self.count {
            return Err(Error::invalid(format!(
                "image range {}..{} is outside a batch of {} images",
                range.start, range.end, self.count
            )));
        }
        let n = self.image_len();
        Ok(ImageBatch {
            count: range.len(),
            height: self.height,
            width: self.width,
            pixels: self.pixels[range.start * n..range.end * n].to_vec(),
            labels: self.labels.as_ref().map(|l| l[range.clone()].to_vec()),
            names: self.names[range].to_vec(),
        })
    }

    /// The first `n` images (all of them if the batch has fewer).
    pub fn take(&self, n: usize) -> ImageBatch {
        self.select(0..n.min(self.count)).expect("0..min(n, count) is always in range")
    }

    /// Joins batches of the same image size. Labels are kept only if every batch has them; names
    /// that repeat (two folders holding `cat.png`) get a `_2`, `_3`, ... suffix.
    pub fn concat(batches: Vec<ImageBatch>) -> Result<ImageBatch> {
        let Some(first) = batches.first() else {
            return Err(Error::invalid("no images to join"));
        };
        let (height, width) = (first.height, first.width);
        let all_labelled = batches.iter().all(|b| b.labels.is_some());
        let mut pixels = Vec::with_capacity(batches.iter().map(|b| b.pixels.len()).sum());
        let mut labels = all_labelled.then(Vec::new);
        let mut names = Vec::new();
        let mut count = 0;
        for batch in batches {
            if (batch.height, batch.width) != (height, width) {
                return Err(Error::invalid(format!(
                    "cannot join {}x{} images with {height}x{width} images",
                    batch.height, batch.width
                )));
            }
            count += batch.count;
            pixels.extend_from_slice(&batch.pixels);
            if let (Some(all), Some(these)) = (labels.as_mut(), batch.labels.as_ref()) {
                all.extend_from_slice(these);
            }
            names.extend(batch.names);
        }
        Ok(ImageBatch { count, height, width, pixels, labels, names: make_unique(names) })
    }
}

/// Appends `_2`, `_3`, ... to repeated names so that output files do not overwrite each other.
fn make_unique(names: Vec<String>) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut taken: std::collections::HashSet<String> = names.iter().cloned().collect();
    names
        .into_iter()
        .map(|name| {
            let uses = seen.entry(name.clone()).or_insert(0);
            *uses += 1;
            if *uses == 1 {
                return name;
            }
            let mut k = *uses;
            loop {
                let candidate = format!("{name}_{k}");
                if taken.insert(candidate.clone()) {
                    return candidate;
                }
                k += 1;
            }
        })
        .collect()
}

/// Loads images from CIFAR-10 binary files (`.bin`), PNG files (`.png`) and directories (their
/// `.png` files, sorted by name), in the order given, stopping after `limit` images.
///
/// Every image must be 32x32 RGB, the UNet's resolution. Labels are kept only if every source
/// has them (CIFAR files do, PNG files do not).
pub fn load_images(paths: &[PathBuf], limit: Option<usize>) -> Result<ImageBatch> {
    if paths.is_empty() {
        return Err(Error::invalid("no image paths given"));
    }
    if limit == Some(0) {
        return Err(Error::invalid("an image limit of 0 leaves nothing to load"));
    }
    let mut batches = Vec::new();
    let mut loaded = 0usize;
    for path in paths {
        let remaining = limit.map(|l| l - loaded);
        if remaining == Some(0) {
            break;
        }
        let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let batch = if metadata.is_dir() {
            load_png_dir(path, remaining)?
        } else {
            match extension(path).as_deref() {
                Some("bin") => cifar::read_cifar(path, remaining)?,
                Some("png") => load_pngs(std::slice::from_ref(path))?,
                _ => {
                    return Err(Error::BadImage {
                        what: path.display().to_string(),
                        reason: "unknown file type: expected a CIFAR-10 binary file (.bin), a PNG \
                                 file (.png) or a directory of PNG files"
                            .to_string(),
                    })
                }
            }
        };
        loaded += batch.count;
        batches.push(batch);
    }
    ImageBatch::concat(batches)
}

fn load_png_dir(dir: &Path, limit: Option<usize>) -> Result<ImageBatch> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if extension(&path).as_deref() == Some("png") && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::BadImage {
            what: dir.display().to_string(),
            reason: "the directory holds no .png files".to_string(),
        });
    }
    files.sort();
    files.truncate(limit.unwrap_or(usize::MAX));
    load_pngs(&files)
}

fn load_pngs(files: &[PathBuf]) -> Result<ImageBatch> {
    let mut pixels = Vec::with_capacity(files.len() * 3 * IMAGE_SIZE * IMAGE_SIZE);
    let mut names = Vec::with_capacity(files.len());
    for file in files {
        let image = image::read_png_sized(file, IMAGE_SIZE, IMAGE_SIZE)?;
        pixels.extend_from_slice(&image.pixels);
        names.push(file_stem(file));
    }
    Ok(ImageBatch { count: files.len(), height: IMAGE_SIZE, width: IMAGE_SIZE, pixels, labels: None, names })
}

/// Lower-case extension of `path`, if any.
fn extension(path: &Path) -> Option<String> {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase())
}

/// The file name without its extension, for naming the images a file holds.
pub(crate) fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
}

/// Writes `path` atomically: `write` fills a temporary file in the same directory, which is then
/// flushed, synced and renamed over `path`. On any error the temporary file is removed and `path`
/// is left as it was.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<&File>) -> Result<()>) -> Result<()> {
    let file_name =
        path.file_name().ok_or_else(|| Error::invalid(format!("output path {} has no file name", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (temp_path, file) = create_temp_file(&dir, &file_name.to_string_lossy())?;
    let result = (|| {
        let mut writer = BufWriter::new(&file);
        write(&mut writer)?;
        writer.flush().map_err(|e| Error::Write { path: path.to_path_buf(), source: e })?;
        drop(writer);
        file.sync_all().map_err(|e| Error::Write { path: path.to_path_buf(), source: e })?;
        std::fs::rename(&temp_path, path).map_err(|e| Error::Write { path: path.to_path_buf(), source: e })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp_path);
    }
    result
}

fn create_temp_file(dir: &Path, file_name: &str) -> Result<(PathBuf, File)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_path = dir.join(format!(".{file_name}.{pid}.{n}.tmp"));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&temp_path) {
            Ok(file) => return Ok((temp_path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Write { path: dir.join(file_name), source: e }),
        }
    }
}
