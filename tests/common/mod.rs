//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

use purifier::data::tensor_file::TensorFile;

pub mod guidance_checks;
pub mod networks;

/// A path under the project root.
pub fn project_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A path under ../shared (the project's data, never copied into the repo).
pub fn shared_path(relative: &str) -> PathBuf {
    project_path("../shared").join(relative)
}

pub fn golden(name: &str) -> TensorFile {
    TensorFile::open(project_path(&format!("tests/golden/{name}"))).expect("golden file")
}

pub fn tensor(file: &TensorFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    file.get_f32(name).unwrap_or_else(|e| panic!("{e}"))
}

/// ||a - b|| / ||b||, in f64.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(a.iter().all(|v| v.is_finite()), "non-finite value in the result");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Deterministic pseudo-random values in [-1, 1) for test inputs (xorshift; no crate needed).
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32
        })
        .collect()
}

/// Writes deterministic untrained UNet weights of `config` (the goldens' generator) to `path`.
pub fn write_untrained_unet(path: &std::path::Path, config: &purifier::model::UnetConfig, seed: u64) {
    use purifier::model::params::DeterministicParams;
    let b = purifier::backend::cpu::CpuBackend;
    let mut src = DeterministicParams::new(&b, seed);
    src.keep_host_copies = true;
    purifier::model::Unet::load(config, &mut src).unwrap();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        src.generated.iter().map(|(n, s, d)| (n.as_str(), &s[..], &d[..])).collect();
    purifier::data::tensor_file::write_safetensors(path, &tensors).unwrap();
}

/// Runs the purifier binary; returns (success, stdout, stderr). (Integration tests only: their
/// build names the binary; examples/guidance_kinks.rs shares this module without it.)
#[cfg(test)]
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_purifier"))
        .args(args)
        .current_dir(project_path(""))
        .output()
        .expect("run purifier");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!stderr.contains("panicked"), "the CLI panicked: {stderr}");
    (out.status.success(), stdout, stderr)
}

/// Runs the CLI expecting failure; returns the error text.
#[cfg(test)]
pub fn cli_error(args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_cli(args);
    assert!(!ok, "expected failure of {args:?}, got success: {stdout}");
    assert!(stderr.starts_with("error: ") || stderr.contains("\nerror: ") || stderr.contains("error:"), "{stderr}");
    stderr
}
