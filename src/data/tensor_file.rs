//! safetensors files: reading weights, goldens and step indices, writing results.
//!
//! A [`TensorFile`] holds the whole file in memory, checked once on opening (header, offsets and
//! sizes), and converts tensors on request: float tensors (F32, F16, BF16, F64) to f32, integer
//! tensors (and floats holding whole numbers) to i64. Non-finite values are passed through; the
//! caller decides with `error::check_finite`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorView};
pub use safetensors::Dtype;
use safetensors::SafeTensors;

use super::write_atomically;
use crate::error::{Error, Result};

/// Where one tensor's bytes lie in the file.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A safetensors file read into memory and validated.
#[derive(Debug)]
pub struct TensorFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

const FLOAT_TYPES: &str = "F32, F16, BF16 or F64";
/// 2^63, the smallest whole float that does not fit an i64.
const TWO_TO_THE_63: f64 = 9_223_372_036_854_775_808.0;
const INDEX_TYPES: &str = "an integer type (I64, I32, U8, ...) or a float type holding whole numbers";

impl TensorFile {
    /// Reads and validates a safetensors file. I/O failures give `Error::Io`; a file that is not
    /// safetensors, or is truncated, gives `Error::NotSafetensors` with the reason.
    pub fn open(path: impl AsRef<Path>) -> Result<TensorFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        TensorFile::from_bytes(bytes, path)
    }

    /// Validates the bytes of a safetensors file; `path` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: impl Into<PathBuf>) -> Result<TensorFile> {
        let path = path.into();
        let not_safetensors = |reason: String| Error::NotSafetensors { path: path.clone(), reason };
        let (header_len, metadata): (usize, Metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| not_safetensors(describe_parse_error(&e, bytes.len())))?;
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                (name, entry)
            })
            .collect();
        let metadata = metadata.metadata().as_ref().map(|m| m.clone().into_iter().collect()).unwrap_or_default();
        Ok(TensorFile { path, bytes, tensors, metadata })
    }

    /// The file's path as shown in errors.
    pub fn file(&self) -> String {
        self.path.display().to_string()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The free-form `__metadata__` strings of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    /// The stored dtype of tensor `name`.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.entry(name)?.dtype)
    }

    /// Tensor `name` as f32, converting from F32, F16, BF16 or F64 (F64 values beyond the f32
    /// range become Inf). Returns the shape and the values.
    pub fn get_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let entry = self.entry(name)?;
        let bytes = &self.bytes[entry.start..entry.end];
        let values = match entry.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => {
                bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32).collect()
            }
            other => return Err(self.wrong_dtype(name, other.to_string(), FLOAT_TYPES)),
        };
        Ok((entry.shape.clone(), values))
    }

    /// Tensor `name` as f32 with exactly `expected_shape`: `MissingTensor` if absent,
    /// `ShapeMismatch` if shaped otherwise, `WrongDtype` if not a float type.
    pub fn require_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let found = self.shape(name)?;
        if found != expected_shape {
            return Err(Error::ShapeMismatch {
                file: self.file(),
                name: name.to_string(),
                found: found.to_vec(),
                expected: expected_shape.to_vec(),
            });
        }
        Ok(self.get_f32(name)?.1)
    }

    /// Tensor `name` as integers (step indices, labels): any integer dtype, or a float dtype whose
    /// every value is a whole number. Returns the shape and the values.
    pub fn get_indices(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let entry = self.entry(name)?;
        let bytes = &self.bytes[entry.start..entry.end];
        let values: Vec<i64> = match entry.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8"))).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4")).into()).collect(),
            Dtype::I16 => bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]).into()).collect(),
            Dtype::I8 => bytes.iter().map(|&b| (b as i8).into()).collect(),
            Dtype::U8 => bytes.iter().map(|&b| b.into()).collect(),
            Dtype::U16 => bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]).into()).collect(),
            Dtype::U32 => bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4")).into()).collect(),
            Dtype::U64 => {
                let mut values = Vec::with_capacity(bytes.len() / 8);
                for (index, b) in bytes.chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(b.try_into().expect("8"));
                    let v = i64::try_from(v).map_err(|_| {
                        self.wrong_dtype(name, format!("U64 holding {v} (element {index}), beyond i64"), INDEX_TYPES)
                    })?;
                    values.push(v);
                }
                values
            }
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                let floats: Vec<f64> = match entry.dtype {
                    Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8"))).collect(),
                    _ => self.get_f32(name)?.1.into_iter().map(f64::from).collect(),
                };
                let mut values = Vec::with_capacity(floats.len());
                for (index, v) in floats.into_iter().enumerate() {
                    // 2^63 is the first whole float beyond i64.
                    if v.fract() != 0.0 || !v.is_finite() || v.abs() >= TWO_TO_THE_63 {
                        return Err(self.wrong_dtype(
                            name,
                            format!("{} holding the non-integer {v} (element {index})", entry.dtype),
                            INDEX_TYPES,
                        ));
                    }
                    values.push(v as i64);
                }
                values
            }
            other => return Err(self.wrong_dtype(name, other.to_string(), INDEX_TYPES)),
        };
        Ok((entry.shape.clone(), values))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.file(),
            name: name.to_string(),
            hint: self.missing_hint(name),
        })
    }

    /// Suggests a stored name that differs by a prefix (`module.`, `model.`, ...), else says how
    /// many tensors the file holds.
    fn missing_hint(&self, name: &str) -> String {
        let similar = self
            .tensors
            .keys()
            .find(|stored| stored.ends_with(&format!(".{name}")) || name.ends_with(&format!(".{stored}")));
        match similar {
            Some(stored) => format!(" (did you mean `{stored}`?)"),
            None => format!(" (the file holds {} tensors)", self.tensors.len()),
        }
    }

    fn wrong_dtype(&self, name: &str, found: String, expected: &str) -> Error {
        Error::WrongDtype { file: self.file(), name: name.to_string(), found, expected: expected.to_string() }
    }
}

/// Says why bytes are not a safetensors file, in words for a person.
fn describe_parse_error(error: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match error {
        E::HeaderTooSmall => {
            format!("only {file_len} bytes, too short for the 8-byte header length")
        }
        E::InvalidHeaderLength => {
            "the header length runs past the end of the file (truncated, or not a safetensors file)".to_string()
        }
        E::HeaderTooLarge => "the header length is implausibly large (not a safetensors file)".to_string(),
        E::MetadataIncompleteBuffer => {
            format!("the tensor data does not match the file size of {file_len} bytes (truncated or padded)")
        }
        other => other.to_string(),
    }
}

/// Writes F32 tensors `(name, shape, values)` to a safetensors file, atomically.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, &[])
}

/// As [`write_safetensors`], with `__metadata__` strings in the header.
pub fn write_safetensors_with_metadata(
    path: impl AsRef<Path>,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let path = path.as_ref();
    check_tensors(path, tensors)?;
    let encoded: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    write_encoded(path, tensors, Dtype::F32, &encoded, metadata)
}

/// Writes tensors `(name, shape, values)` as F16, atomically. A finite value beyond the F16 range
/// (|x| > 65504) is an error naming the tensor; NaN and Inf are stored as such.
pub fn write_safetensors_f16(path: impl AsRef<Path>, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    let path = path.as_ref();
    check_tensors(path, tensors)?;
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, _, values) in tensors {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for (index, &v) in values.iter().enumerate() {
            let h = f16::from_f32(v);
            if v.is_finite() && !h.is_finite() {
                return Err(Error::invalid(format!(
                    "tensor `{name}` for {}: value {v} at element {index} is beyond the F16 range",
                    path.display()
                )));
            }
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        encoded.push(bytes);
    }
    write_encoded(path, tensors, Dtype::F16, &encoded, &[])
}

fn check_tensors(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, shape, values) in tensors {
        if !seen.insert(*name) {
            return Err(Error::invalid(format!("tensor `{name}` given twice for {}", path.display())));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(values.len()) {
            return Err(Error::invalid(format!(
                "tensor `{name}` for {}: shape {shape:?} does not hold {} values",
                path.display(),
                values.len()
            )));
        }
    }
    Ok(())
}

fn write_encoded(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    dtype: Dtype,
    encoded: &[Vec<u8>],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let fail = |reason: String| Error::invalid(format!("cannot encode {}: {reason}", path.display()));
    let views = tensors
        .iter()
        .zip(encoded)
        .map(|((name, shape, _), bytes)| {
            TensorView::new(dtype, shape.to_vec(), bytes).map(|view| (name.to_string(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let metadata: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let bytes = safetensors::serialize(views, metadata).map_err(|e| fail(e.to_string()))?;
    write_atomically(path, |out| {
        out.write_all(&bytes).map_err(|e| Error::Write { path: path.to_path_buf(), source: e })
    })
}
