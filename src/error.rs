//! One error type for the whole engine. Every variant names the bad input and what was expected, so
//! the CLI can print it as-is and exit; nothing in the library panics on bad input.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },

    #[error("{path} is not a valid safetensors file: {reason}")]
    NotSafetensors { path: PathBuf, reason: String },

    #[error("{file}: missing tensor `{name}`{hint}")]
    MissingTensor { file: String, name: String, hint: String },

    #[error("{file}: unexpected tensor `{name}` (not part of the {what})")]
    UnexpectedTensor { file: String, name: String, what: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { file: String, name: String, found: Vec<usize>, expected: Vec<usize> },

    #[error("{file}: tensor `{name}` has dtype {found}, expected {expected}")]
    WrongDtype { file: String, name: String, found: String, expected: String },

    #[error("{what} contains a non-finite value (NaN or Inf) at element {index}")]
    NonFinite { what: String, index: usize },

    #[error("cannot tell which network {file} holds: {reason}")]
    UnknownConfig { file: String, reason: String },

    #[error("bad image {what}: {reason}")]
    BadImage { what: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("device: {0}")]
    Device(String),

    #[error("device: {0}")]
    Driver(#[from] crate::driver::DriverError),

    #[error("{what} needs {:.2} GiB of memory but {:.2} GiB are available: use a smaller --batch", gib(*needed), gib(*available))]
    OutOfMemory { what: String, needed: usize, available: usize },
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// Fails with `NonFinite` naming `what` if any value is NaN or Inf.
pub fn check_finite(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { what: what(), index }),
        None => Ok(()),
    }
}
