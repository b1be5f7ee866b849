//! `--device` on the command line: the emulator reproduces the CPU, `auto` falls back to the CPU
//! with a warning, and `cuda` without a GPU, or a precision the CPU does not compute in, is one
//! clear error. The emulator needs NVRTC (LD_LIBRARY_PATH).
mod common;

use common::*;

fn classify(device: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "classify",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "8",
        "--batch",
        "8",
    ];
    args.extend_from_slice(device);
    run_cli(&args)
}

/// "ResNet-20 top-1 accuracy: X% (k of 8 images)" without the device and time that follow.
fn accuracy(stdout: &str) -> String {
    let line = stdout.lines().find(|l| l.contains("top-1 accuracy")).unwrap_or_else(|| panic!("no accuracy: {stdout}"));
    line.split(" on ").next().unwrap().to_string()
}

#[test]
fn classify_on_the_emulator_matches_the_cpu() {
    let (ok, cpu, err) = classify(&["--device", "cpu"]);
    assert!(ok, "{err}");
    let (ok, emulated, err) = classify(&["--device", "emulator"]);
    assert!(ok, "{err}");
    assert!(emulated.contains("PTX emulator"), "{emulated}");
    assert_eq!(accuracy(&emulated), accuracy(&cpu));
}

#[test]
fn auto_falls_back_to_the_cpu_with_a_warning() {
    if purifier::device::cuda_backend(purifier::backend::Precision::F32).is_ok() {
        println!("a CUDA device is present: auto picks it, nothing to check here");
        return;
    }
    let (ok, stdout, stderr) = classify(&["--device", "auto"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("warning: device auto: using the CPU backend"), "{stderr}");
    assert!(stdout.contains("on cpu"), "{stdout}");
}

#[test]
fn cuda_without_a_gpu_is_one_clear_error() {
    if purifier::device::cuda_backend(purifier::backend::Precision::F32).is_ok() {
        println!("a CUDA device is present: nothing to check here");
        return;
    }
    let (ok, stdout, stderr) = classify(&["--device", "cuda"]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("CUDA") && !stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn cpu_with_half_precision_is_refused() {
    let (ok, _, stderr) = classify(&["--device", "cpu", "--precision", "bf16"]);
    assert!(!ok && stderr.contains("computes in f32") && stderr.contains("--precision bf16"), "{stderr}");
}
