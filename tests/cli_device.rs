//! `--device` on the command line: the emulator reproduces the CPU (classify, `eps --vjp`,
//! `purify` in every mode and path, `attack`), `auto` falls back to the CPU with a warning, and
//! `cuda` without a GPU, or a precision the CPU does not compute in, is one clear error. The
//! emulator needs NVRTC (LD_LIBRARY_PATH).
//!
//! The UNet runs use a small untrained UNet written by the test (64 channels at two levels, one
//! ResnetBlock per level, attention at 16x16: every op of the CIFAR configs, at about a fifth of
//! cifar10-small's cost on the emulator), one image and t* = 2.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use purifier::data::tensor_file::{write_safetensors, TensorFile};
use purifier::model::UnetConfig;

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

/// `purifier kernels` with the cache in `cache` (`None`: the cache off).
fn kernels(args: &[&str], cache: Option<&Path>) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_purifier"))
        .arg("kernels")
        .args(args)
        .env("PURIFIER_KERNEL_CACHE", cache.map_or("off".into(), |c| c.as_os_str().to_owned()))
        .output()
        .expect("run purifier");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The kernels compiled ahead into the cache for a GPU that is not here (a Jetson Orin's): one cubin
/// a file, all found cached by a second run; bad architectures and a cache that is off are one
/// clear error each.
#[test]
fn kernels_compiles_ahead_for_a_gpu_that_is_not_here() {
    let dir = tempfile::tempdir().unwrap();
    let files = std::fs::read_dir(project_path("kernels"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cu"))
        .count();
    let (ok, stdout, stderr) = kernels(&["--arch", "sm_87", "--precision", "f32"], Some(dir.path()));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kernels for sm_87") && stdout.contains(&format!("f32: {files} files ready")), "{stdout}");
    let entries: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(entries.len(), files, "{entries:?}");
    assert!(entries.iter().all(|e| e.contains("-sm_87-nvrtc") && e.ends_with(".cubin")), "{entries:?}");
    let (ok, again, stderr) = kernels(&["--arch", "sm_87", "--precision", "f32"], Some(dir.path()));
    assert!(ok && again.matches("cached already").count() == files, "{again}{stderr}");
    for (arch, expected) in
        [("sm_70", "need sm_80"), ("ampere", "not an architecture name"), ("sm_99", "does not compile for it")]
    {
        let (ok, stdout, stderr) = kernels(&["--arch", arch], Some(dir.path()));
        assert!(!ok && stdout.is_empty() && stderr.contains(expected), "--arch {arch}: {stderr}");
        assert!(!stderr.contains("panicked") && stderr.trim().lines().count() == 1, "{stderr}");
    }
    let (ok, _, stderr) = kernels(&["--arch", "sm_87"], None);
    assert!(!ok && stderr.contains("PURIFIER_KERNEL_CACHE=off"), "{stderr}");
    if purifier::device::cuda_backend(purifier::backend::Precision::F32).is_err() {
        let (ok, _, stderr) = kernels(&[], Some(dir.path()));
        assert!(!ok && stderr.contains("--arch") && !stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn cpu_with_half_precision_is_refused() {
    let (ok, _, stderr) = classify(&["--device", "cpu", "--precision", "bf16"]);
    assert!(!ok && stderr.contains("computes in f32") && stderr.contains("--precision bf16"), "{stderr}");
}

#[test]
fn a_mistyped_switch_is_one_clear_error_on_every_device() {
    for device in ["cpu", "emulator", "auto"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_purifier"))
            .args(["classify", "--classifier", "../shared/weights/resnet20_cifar10.safetensors", "--count", "8"])
            .args(["--input", "../shared/data/cifar10/test_lossless.bin", "--device", device])
            .env("PURIFIER_CONV_WIDE", "sideways")
            .current_dir(project_path(""))
            .output()
            .expect("run purifier");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success() && stdout.is_empty(), "--device {device}: {stdout}");
        let expected = "PURIFIER_CONV_WIDE=sideways: expected one of backward, off, on";
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "--device {device}: {stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Untrained weights of the small UNet (see the head comment), written into `dir`.
fn small_unet(dir: &Path) -> PathBuf {
    let config = UnetConfig {
        name: "small".into(),
        channels: 64,
        channel_mult: vec![1, 1],
        res_blocks: 1,
        attention_resolutions: vec![16],
        resolution: 32,
    };
    let path = dir.join("unet.safetensors");
    write_untrained_unet(&path, &config, 1);
    path
}

/// `eps --vjp` on the emulator writes the CPU's eps and grad_x (f32: ENGINE.md's 1e-5).
#[test]
fn eps_vjp_on_the_emulator_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let weights = small_unet(dir.path());
    let input = dir.path().join("input.safetensors");
    let (x, v) = (uniform(3 * 32 * 32, 40), uniform(3 * 32 * 32, 41));
    let shape = [1, 3, 32, 32];
    write_safetensors(&input, &[("x", &shape, &x), ("t", &[1], &[250.0]), ("v", &shape, &v)]).unwrap();
    let mut results = Vec::new();
    for device in ["cpu", "emulator"] {
        let output = dir.path().join(format!("{device}.safetensors"));
        let started = std::time::Instant::now();
        let (ok, stdout, stderr) = run_cli(&[
            "eps",
            "--weights",
            s(&weights),
            "--input",
            s(&input),
            "--output",
            s(&output),
            "--vjp",
            "--device",
            device,
        ]);
        assert!(ok, "{stderr}");
        println!("eps --vjp --device {device}: {:.1} s; {}", started.elapsed().as_secs_f64(), stdout.trim());
        results.push(TensorFile::open(&output).unwrap());
    }
    for name in ["eps", "grad_x"] {
        let error = relative_error(&tensor(&results[1], name).1, &tensor(&results[0], name).1);
        println!("{name}: relative L2 {error:.2e}");
        assert!(error < 1e-5, "{name}: {error:.3e}");
    }
}

/// Pixels of a PNG the CLI wrote.
fn png(path: &Path) -> Vec<f32> {
    purifier::data::image::read_png(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).pixels
}

/// Two 8-bit images from the same f32 computation on two backends: the f32 results differ by
/// about 1e-6, so a pixel may round to the neighbouring 8-bit level (rarely: a handful of
/// 3072), never further.
fn assert_same_image(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    let level = 1.0 / 255.0;
    let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("{what}: {differing} of {} pixels differ, by at most {:.0} levels", got.len(), worst / level);
    assert!(worst <= level * 1.001 && differing <= 8, "{what}: {differing} pixels differ, worst by {worst}");
}

/// `purify --mode ...` on one image at t* = 2 on the CPU and on the emulator: the same PNG (up
/// to an 8-bit rounding step) and the same count of network calls and UNet VJPs.
fn check_purify(mode: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let weights = small_unet(dir.path());
    let mut outputs = Vec::new();
    for device in ["cpu", "emulator"] {
        let out = dir.path().join(device);
        let report = dir.path().join(format!("{device}.json"));
        let mut args = vec![
            "purify",
            "--weights",
            s(&weights),
            "--input",
            "../shared/data/cifar10/test_lossless.bin",
            "--count",
            "1",
            "--batch",
            "1",
            "--t-star",
            "2",
            "--seed",
            "5",
            "--out",
            s(&out),
            "--report",
            s(&report),
            "--device",
            device,
        ];
        args.extend_from_slice(mode);
        let started = std::time::Instant::now();
        let (ok, _, stderr) = run_cli(&args);
        assert!(ok, "{stderr}");
        println!("purify {mode:?} --device {device}: {:.1} s", started.elapsed().as_secs_f64());
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        outputs.push((png(&out.join("test_lossless_0000.png")), report));
    }
    let ((emulated, emulated_report), (cpu, cpu_report)) = (&outputs[1], &outputs[0]);
    assert_same_image(emulated, cpu, &format!("purify {mode:?}"));
    for key in ["network_calls", "unet_vjps"] {
        assert_eq!(emulated_report[key], cpu_report[key], "{key}");
    }
}

/// The guidance scale is large because sigma_t^2 is about 1e-4 at t = 2: at scale 1 the guided
/// runs would not differ from unguided ones in 8 bits; at 1e4 the gradient constraint bounds it.
#[test]
fn purify_none_on_the_emulator_matches_the_cpu() {
    check_purify(&["--mode", "none"]);
}

#[test]
fn purify_pixel_on_the_emulator_matches_the_cpu() {
    check_purify(&["--mode", "pixel", "--scale", "1e4"]);
}

const AUXILIARY: &str = "../shared/weights/resnet20_cifar10.safetensors";

#[test]
fn purify_adversarial_x0_on_the_emulator_matches_the_cpu() {
    check_purify(&["--mode", "adversarial", "--gradient-path", "x0", "--auxiliary", AUXILIARY, "--scale", "1e4"]);
}

#[test]
fn purify_adversarial_xt_on_the_emulator_matches_the_cpu() {
    check_purify(&["--mode", "adversarial", "--gradient-path", "xt", "--auxiliary", AUXILIARY, "--scale", "1e4"]);
}

/// One PGD iteration through a pixel-guided purification at t* = 2 on the emulator: the CPU's
/// loss, votes and adversarial image. One EOT draw, for time: the sum of several draws on the
/// device is checked in tests/emulator_guidance.rs (EOT 2); this one runs the command end to end.
#[test]
fn attack_on_the_emulator_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let weights = small_unet(dir.path());
    let mut outputs = Vec::new();
    for device in ["cpu", "emulator"] {
        let out = dir.path().join(device);
        let report = dir.path().join(format!("{device}.json"));
        let started = std::time::Instant::now();
        let (ok, _, stderr) = run_cli(&[
            "attack",
            "--weights",
            s(&weights),
            "--input",
            "../shared/data/cifar10/test_lossless.bin",
            "--count",
            "1",
            "--batch",
            "1",
            "--t-star",
            "2",
            "--mode",
            "pixel",
            "--scale",
            "1e4",
            "--classifier",
            "../shared/weights/resnet20_cifar10.safetensors",
            "--iterations",
            "1",
            "--eot",
            "1",
            "--votes",
            "1",
            "--norm",
            "l2",
            "--eps",
            "0.5",
            "--out",
            s(&out),
            "--report",
            s(&report),
            "--device",
            device,
        ]);
        assert!(ok, "{stderr}");
        println!("attack --device {device}: {:.1} s", started.elapsed().as_secs_f64());
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        outputs.push((png(&out.join("test_lossless_0000.png")), report));
    }
    let ((emulated, emulated_report), (cpu, cpu_report)) = (&outputs[1], &outputs[0]);
    assert_same_image(emulated, cpu, "adversarial image");
    let steps = |r: &serde_json::Value| r["trace"][0][0]["steps"].as_array().cloned().unwrap_or_default();
    let (got, want) = (steps(emulated_report), steps(cpu_report));
    assert!(!want.is_empty(), "the image must be attacked (the defence got it right): {cpu_report}");
    assert_eq!(got.len(), want.len(), "{emulated_report}");
    for (g, w) in got.iter().zip(&want) {
        let (g, w) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
        println!("EOT loss: emulator {g}, cpu {w}");
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "loss {g} vs {w}");
    }
    assert_eq!(emulated_report["correct_votes"], cpu_report["correct_votes"]);
    assert!(emulated_report["device_memory_peak_bytes"].as_u64().unwrap() > 0);
    assert!(cpu_report["device_memory_peak_bytes"].is_null());
}

/// `attack --plan-memory` sizes the attack without a GPU or NVRTC and without allocating it:
/// bf16 activations take less than f32, and the figure grows with t* by the tape.
#[test]
fn attack_plan_memory_is_sized_without_allocating() {
    let total = |extra: &[&str]| -> u64 {
        let mut args = vec![
            "attack",
            "--plan-memory",
            "--untrained-seed",
            "0",
            "--untrained-config",
            "cifar10",
            "--batch",
            "64",
            "--classifier",
            "../shared/weights/resnet20_cifar10.safetensors",
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = run_cli(&args);
        assert!(ok, "{stderr}");
        println!("{stdout}");
        let line = stdout.lines().find(|l| l.contains("total held")).unwrap_or_else(|| panic!("{stdout}"));
        let bytes = line.split('(').nth(1).and_then(|r| r.split(' ').next()).unwrap();
        bytes.parse().unwrap_or_else(|_| panic!("{line}"))
    };
    let f32_100 = total(&["--t-star", "100", "--precision", "f32"]);
    let bf16_100 = total(&["--t-star", "100", "--precision", "bf16"]);
    let f32_50 = total(&["--t-star", "50", "--precision", "f32"]);
    assert!(bf16_100 < f32_100, "bf16 {bf16_100} vs f32 {f32_100}");
    // 50 more tape entries of 64 f32 images, and 50 more rows of the sampler's step table.
    let row = purifier::backend::STEP_COLUMNS as u64 * 4;
    assert_eq!(f32_100 - f32_50, 50 * (64 * 3 * 32 * 32 * 4 + row));
    // The target: the exact 100-step attack gradient of cifar10 at batch 64 within 8 GB.
    assert!(f32_100 < 8_000_000_000, "{f32_100}");
}

/// `bench` on the emulator: the UNet rows issued op by op and also recorded once and replayed (as
/// the sampler runs its steps), the per-op breakdown, a purification and the attack gradient with
/// its device memory peak, all in the JSON.
#[test]
fn bench_on_the_emulator_times_issued_and_replayed_passes() {
    let dir = tempfile::tempdir().unwrap();
    let weights = small_unet(dir.path());
    let json = dir.path().join("bench.json");
    let (ok, stdout, stderr) = run_cli(&[
        "bench",
        "--device",
        "emulator",
        "--weights",
        s(&weights),
        "--batches",
        "1",
        "--repeats",
        "1",
        "--modes",
        "none",
        "--t-star",
        "1",
        "--purify-batch",
        "1",
        "--profile-batch",
        "1",
        "--json",
        s(&json),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("UNet forward + VJP replayed, batch 1"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = &report["unet_timings"][0];
    for key in ["forward", "forward_vjp", "forward_replayed", "forward_vjp_replayed"] {
        let median = row[key]["median_ms"].as_f64().unwrap_or(0.0);
        assert!(median > 0.0, "{key}: {row}");
    }
    assert_eq!(report["purify_timings"].as_array().unwrap().len(), 1);
    // Start-up: every kernel file compiled by NVRTC, read back from the cache, and loaded.
    let kernels = &report["start_up"]["kernels"];
    let files = kernels["files"].as_array().unwrap();
    let kernel_files = std::fs::read_dir(project_path("kernels"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cu"))
        .count();
    assert_eq!(files.len(), kernel_files, "{kernels}");
    for f in files {
        for key in ["nvrtc_compile_s", "cache_read_s", "load_s"] {
            assert!(f[key].as_f64().unwrap() > 0.0, "{key}: {f}");
        }
        assert!(f["image_bytes"].as_u64().unwrap() > 0, "{f}");
    }
    assert!(kernels["warm_s"].as_f64().unwrap() > 0.0 && report["start_up"]["first_forward_s"].as_f64().unwrap() > 0.0);
    // Cold: the files compiled side by side, as a first run does: the wall time is at least the
    // slowest file's and at most all of them one after another.
    let compile_s: Vec<f64> = files.iter().map(|f| f["nvrtc_compile_s"].as_f64().unwrap()).collect();
    let wall = kernels["cold_compile_wall_s"].as_f64().unwrap();
    let sum: f64 = compile_s.iter().sum();
    assert!(compile_s.iter().all(|&s| s <= wall) && wall <= sum + 0.5, "{kernels}");
    assert!((kernels["compile_sum_s"].as_f64().unwrap() - sum).abs() < 1e-9, "{kernels}");
    assert!(kernels["compile_workers"].as_u64().unwrap() >= 1 && kernels["cold_s"].as_f64().unwrap() >= wall);
    // The CUDA backend counts its device memory: the attack gradient's peak holds at least the plan.
    let attack = &report["attack_gradient"];
    assert!(
        attack["ms"].as_f64().unwrap() > 0.0 && attack["device_memory_peak_bytes"].as_u64().unwrap() > 0,
        "{attack}"
    );
}
