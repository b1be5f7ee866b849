//! The command line end to end, and every kind of bad input: each gets one clear error naming
//! the problem, never a panic, and no output file.
mod common;

use std::path::Path;

use common::*;
use purifier::data::tensor_file::{write_safetensors, TensorFile};
use purifier::model::UnetConfig;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn classify_reports_resnet20_accuracy() {
    let (ok, stdout, _) = run_cli(&[
        "classify",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--device",
        "cpu",
    ]);
    assert!(ok);
    assert!(stdout.contains("91.63% (854 of 932 images)"), "{stdout}");
}

#[test]
fn inspect_names_network_and_parameter_count() {
    let (ok, stdout, _) = run_cli(&["inspect", "../shared/weights/resnet20_cifar10.safetensors"]);
    assert!(ok && stdout.contains("ResNet-20") && stdout.contains("parameters: 269722"), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("unet.safetensors");
    write_untrained_unet(&w, &UnetConfig::cifar10_small(), 1);
    let (ok, stdout, _) = run_cli(&["inspect", s(&w)]);
    assert!(
        ok && stdout.contains("config cifar10-small")
            && stdout.contains("parameters: 8952067")
            && stdout.contains("loads: yes"),
        "{stdout}"
    );
}

/// `eps` on the golden's own inputs reproduces the PyTorch outputs.
#[test]
fn eps_command_matches_golden() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("unet.safetensors");
    write_untrained_unet(&w, &UnetConfig::cifar10_small(), 1);
    let golden_path = project_path("tests/golden/unet_cifar10_small.safetensors");
    let out = dir.path().join("out.safetensors");
    let (ok, stdout, stderr) = run_cli(&[
        "eps",
        "--weights",
        s(&w),
        "--input",
        s(&golden_path),
        "--output",
        s(&out),
        "--vjp",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("eps, grad_x"), "{stdout}");
    let result = TensorFile::open(&out).unwrap();
    let golden = golden("unet_cifar10_small.safetensors");
    for name in ["eps", "grad_x"] {
        let err = relative_error(&tensor(&result, name).1, &tensor(&golden, name).1);
        assert!(err < 1e-5, "{name}: {err}");
    }
}

/// purify runs end to end on real test images with ResNet-20 and writes PNGs and a grid.
/// (Untrained UNet weights: this checks the pipeline, not the purification quality.)
#[test]
fn purify_writes_pngs_grid_and_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("purified");
    let (ok, stdout, stderr) = run_cli(&[
        "purify",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "3",
        "--untrained-seed",
        "1",
        "--t-star",
        "20",
        "--sampler",
        "ddim",
        "--stride",
        "10",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--out",
        s(&out),
        "--batch",
        "2",
        "--mode",
        "pixel",
        "--device",
        "cpu",
        "--report",
        s(&out.join("report.json")),
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["images"], 3);
    assert_eq!(report["network_calls"], 4, "2 batches x 2 DDIM calls (t* 20, stride 10)");
    assert_eq!(report["step_ms"]["count"], 4);
    assert!(report["accuracy"]["before"].as_f64().unwrap() > 0.0);
    assert!(stderr.contains("untrained"), "the smoke-test weights must be announced: {stderr}");
    assert!(stdout.contains("before") && stdout.contains("after purification (3 images)"), "{stdout}");
    for name in ["test_lossless_0000.png", "test_lossless_0001.png", "test_lossless_0002.png", "grid.png"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let grid = purifier::data::image::read_png(&out.join("grid.png")).unwrap();
    assert!(grid.width > 2 * 32 * 4 && grid.height >= 32 * 4, "grid {}x{}", grid.width, grid.height);
    let first = purifier::data::image::read_png(&out.join("test_lossless_0000.png")).unwrap();
    assert_eq!((first.width, first.height), (32, 32));
}

#[test]
fn cuda_without_backend_is_a_clear_error() {
    let err = cli_error(&[
        "classify",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--device",
        "cuda",
    ]);
    assert!(err.contains("CUDA"), "{err}");
}

/// Variants of a good weights file, each broken one way, through `eps` (which must then leave
/// no output file) and `inspect`.
#[test]
fn bad_weights_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_untrained_unet(&good, &UnetConfig::cifar10_small(), 1);
    let file = TensorFile::open(&good).unwrap();
    let names: Vec<String> = file.names().iter().map(|n| n.to_string()).collect();
    let all: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| {
            let (shape, data) = file.get_f32(n).unwrap();
            (n.clone(), shape, data)
        })
        .collect();
    let write = |path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        let refs: Vec<(&str, &[usize], &[f32])> =
            tensors.iter().map(|(n, s, d)| (n.as_str(), &s[..], &d[..])).collect();
        write_safetensors(path, &refs).unwrap();
    };
    let input = project_path("tests/golden/unet_cifar10_small.safetensors");
    let check = |weights: &Path, expected: &[&str]| {
        let out = dir.path().join("out.safetensors");
        let err =
            cli_error(&["eps", "--weights", s(weights), "--input", s(&input), "--output", s(&out), "--device", "cpu"]);
        for e in expected {
            assert!(err.contains(e), "expected {e:?} in: {err}");
        }
        assert!(!out.exists(), "an output file was written despite the error");
        let err = cli_error(&["inspect", s(weights)]);
        for e in expected {
            assert!(err.contains(e), "inspect: expected {e:?} in: {err}");
        }
    };

    let missing = dir.path().join("missing.safetensors");
    write(&missing, &all.iter().filter(|(n, ..)| n != "mid.attn_1.q.weight").cloned().collect::<Vec<_>>());
    check(&missing, &["missing tensor", "mid.attn_1.q.weight"]);

    let extra = dir.path().join("extra.safetensors");
    let mut with_extra = all.clone();
    with_extra.push(("mid.attn_2.q.weight".into(), vec![2], vec![0.0, 0.0]));
    write(&extra, &with_extra);
    check(&extra, &["unexpected tensor", "mid.attn_2.q.weight"]);

    let misshaped = dir.path().join("misshaped.safetensors");
    let mut bad_shape = all.clone();
    let k = bad_shape.iter().position(|(n, ..)| n == "up.1.block.2.conv2.weight").unwrap();
    bad_shape[k].1 = vec![128, 128, 9, 1];
    write(&misshaped, &bad_shape);
    check(&misshaped, &["up.1.block.2.conv2.weight", "[128, 128, 9, 1]", "[128, 128, 3, 3]"]);

    let nan = dir.path().join("nan.safetensors");
    let mut with_nan = all.clone();
    let k = with_nan.iter().position(|(n, ..)| n == "down.2.block.0.norm1.bias").unwrap();
    with_nan[k].2[7] = f32::NAN;
    write(&nan, &with_nan);
    check(&nan, &["down.2.block.0.norm1.bias", "NaN"]);

    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    check(&truncated, &["truncated.safetensors", "not a valid safetensors"]);

    let text = dir.path().join("text.safetensors");
    std::fs::write(&text, "these are not weights\n").unwrap();
    check(&text, &["text.safetensors", "not a valid safetensors"]);

    // Weights stored as integers: the wrong dtype, named.
    let wrong_dtype = dir.path().join("wrong_dtype.safetensors");
    {
        use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
        let mut views = Vec::new();
        let converted: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = all
            .iter()
            .map(|(n, s, d)| {
                if n == "conv_out.weight" {
                    (n.clone(), s.clone(), d.iter().flat_map(|v| (*v as i64).to_le_bytes()).collect(), Dtype::I64)
                } else {
                    (n.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32)
                }
            })
            .collect();
        for (n, s, bytes, dtype) in &converted {
            views.push((n.clone(), TensorView::new(*dtype, s.clone(), bytes).unwrap()));
        }
        serialize_to_file(views, None, &wrong_dtype).unwrap();
    }
    check(&wrong_dtype, &["conv_out.weight", "I64"]);

    let absent = dir.path().join("absent.safetensors");
    let out = dir.path().join("out.safetensors");
    let err = cli_error(&["eps", "--weights", s(&absent), "--input", s(&input), "--output", s(&out)]);
    assert!(err.contains("absent.safetensors") && err.contains("not found"), "{err}");
}

/// Bad `eps` inputs: missing x, wrong image shape, NaN, step index out of range, missing v.
#[test]
fn bad_eps_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("unet.safetensors");
    write_untrained_unet(&w, &UnetConfig::cifar10_small(), 1);
    let out = dir.path().join("out.safetensors");
    let x = vec![0.1f32; 2 * 3072];
    let case = |name: &str, tensors: &[(&str, &[usize], &[f32])], extra: &[&str], expected: &[&str]| {
        let input = dir.path().join(format!("{name}.safetensors"));
        write_safetensors(&input, tensors).unwrap();
        let mut args = vec!["eps", "--weights", s(&w), "--input", s(&input), "--output", s(&out), "--device", "cpu"];
        args.extend_from_slice(extra);
        let err = cli_error(&args);
        for e in expected {
            assert!(err.contains(e), "{name}: expected {e:?} in: {err}");
        }
        assert!(!out.exists(), "{name}: output written despite the error");
    };
    case("no_x", &[("t", &[2], &[1.0, 2.0])], &[], &["missing tensor `x`"]);
    case(
        "small_images",
        &[("x", &[2, 3, 16, 16], &x[..2 * 768]), ("t", &[2], &[1.0, 2.0])],
        &[],
        &["`x`", "[2, 3, 16, 16]", "32 x 32"],
    );
    case(
        "gray_images",
        &[("x", &[2, 1, 32, 32], &x[..2 * 1024]), ("t", &[2], &[1.0, 2.0])],
        &[],
        &["`x`", "[2, 1, 32, 32]"],
    );
    let mut with_nan = x.clone();
    with_nan[100] = f32::NAN;
    case("nan_image", &[("x", &[2, 3, 32, 32], &with_nan), ("t", &[2], &[1.0, 2.0])], &[], &["`x`", "NaN"]);
    case("t_too_large", &[("x", &[2, 3, 32, 32], &x), ("t", &[2], &[1.0, 1000.0])], &[], &["1000", "out of range"]);
    case("t_fraction", &[("x", &[2, 3, 32, 32], &x), ("t", &[2], &[1.5, 3.0])], &[], &["`t`", "1.5"]);
    case("t_count", &[("x", &[2, 3, 32, 32], &x), ("t", &[3], &[1.0, 2.0, 3.0])], &[], &["`t`", "[3]"]);
    case("no_v", &[("x", &[2, 3, 32, 32], &x), ("t", &[2], &[1.0, 2.0])], &["--vjp"], &["missing tensor `v`"]);
}

/// Bad images and settings for `purify`: wrong size, grayscale, missing file, t* out of range;
/// nothing is written.
#[test]
fn bad_purify_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("purified");
    let small = dir.path().join("small.png");
    {
        let file = std::fs::File::create(&small).unwrap();
        let mut encoder = png::Encoder::new(file, 16, 16);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(&vec![100u8; 16 * 16 * 3]).unwrap();
    }
    let gray = dir.path().join("gray.png");
    {
        let file = std::fs::File::create(&gray).unwrap();
        let mut encoder = png::Encoder::new(file, 32, 32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(&vec![100u8; 32 * 32]).unwrap();
    }
    let base = ["purify", "--untrained-seed", "1", "--out", s(&out), "--device", "cpu", "--input"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        cli_error(&args)
    };
    let err = with(&[s(&small)]);
    assert!(err.contains("small.png") && err.contains("16x16") && err.contains("32x32"), "{err}");
    let err = with(&[s(&gray)]);
    assert!(err.contains("gray.png") && err.contains("grayscale"), "{err}");
    let err = with(&["no_such_file.bin"]);
    assert!(err.contains("no_such_file.bin"), "{err}");
    let err = with(&["../shared/data/cifar10/test_lossless.bin", "--t-star", "0"]);
    assert!(err.contains("t*") && err.contains("between 1 and 1000"), "{err}");
    let err = with(&["../shared/data/cifar10/test_lossless.bin", "--t-star", "5000"]);
    assert!(err.contains("5000"), "{err}");
    let err = with(&["../shared/data/cifar10/test_lossless.bin", "--mode", "adversarial"]);
    assert!(err.contains("auxiliary"), "{err}");
    assert!(!out.exists(), "nothing may be written on bad input");
}

#[test]
fn attack_reports_clean_and_robust_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("attack");
    let report_path = dir.path().join("attack.json");
    let (ok, stdout, stderr) = run_cli(&[
        "attack",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "3",
        "--untrained-seed",
        "1",
        "--t-star",
        "2",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--iterations",
        "2",
        "--eot",
        "1",
        "--votes",
        "3",
        "--batch",
        "2",
        "--eps",
        "4/255",
        "--out",
        s(&out),
        "--report",
        s(&report_path),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("defended robust accuracy (linf eps 0.01569)"), "{stdout}");
    assert!(stderr.contains("batch 2/2 PGD-CE after 1 steps"), "per-iteration progress: {stderr}");
    assert!(stderr.contains(", ETA "), "an ETA in the log: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["images"], 3);
    let stage = &report["attack"]["stages"][0];
    assert_eq!(stage["name"], "PGD-CE");
    assert_eq!(stage["iterations"], 2);
    assert!((stage["eps"].as_f64().unwrap() - 4.0 / 255.0).abs() < 1e-7);
    assert!((stage["step_size"].as_f64().unwrap() - 2.0 / 255.0).abs() < 1e-7);
    assert_eq!(report["trace"].as_array().unwrap().len(), 2, "one trace per batch");
    let votes = report["correct_votes"]["clean"].as_array().unwrap();
    assert_eq!(votes.len(), 3);
    assert!(votes.iter().all(|v| v.as_u64().unwrap() <= 3));
    let accuracy = &report["accuracy"];
    for key in ["defended_clean_majority", "defended_clean_all", "robust_majority", "robust_all"] {
        let v = accuracy[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert!(accuracy["robust_all"].as_f64() <= accuracy["robust_majority"].as_f64());
    // The adversarial PNGs stay within eps of the clean images (up to the 8-bit rounding).
    let clean =
        purifier::data::load_images(&[project_path("../shared/data/cifar10/test_lossless.bin")], Some(3)).unwrap();
    let adversarial = purifier::data::image::read_png(&out.join("test_lossless_0001.png")).unwrap();
    let worst = adversarial.pixels.iter().zip(clean.image(1)).map(|(a, c)| (a - c).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 4.0 / 255.0 + 0.5 / 255.0 + 1e-6 && worst > 0.0, "l_inf distance {worst}");
    assert!(out.join("grid.png").is_file());
}

/// AutoAttack's rand version: APGD-CE on every image the defence gets right, then APGD-DLR on
/// those still robust after it.
#[test]
fn autoattack_rand_runs_both_stages_on_the_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("aa.json");
    let (ok, stdout, stderr) = run_cli(&[
        "attack",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "4",
        "--untrained-seed",
        "1",
        "--t-star",
        "2",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--attack",
        "autoattack-rand",
        "--iterations",
        "3",
        "--eot",
        "1",
        "--votes",
        "3",
        "--batch",
        "4",
        "--eps",
        "1/255",
        "--report",
        s(&report_path),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("APGD-CE then APGD-DLR"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let stages = report["attack"]["stages"].as_array().unwrap();
    assert_eq!(stages.iter().map(|s| s["name"].as_str().unwrap()).collect::<Vec<_>>(), ["APGD-CE", "APGD-DLR"]);
    assert_ne!(stages[0]["seed"], stages[1]["seed"], "each stage draws its own noise");
    let votes = |key: &str| -> Vec<u64> {
        report["correct_votes"][key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    };
    let (clean, adversarial) = (votes("clean"), votes("adversarial"));
    let robust_after_clean = clean.iter().filter(|&&v| 2 * v > 3).count() as u64;
    let batch = report["trace"][0].as_array().unwrap();
    assert_eq!(batch[0]["images"], robust_after_clean, "APGD-CE attacks the images the defence gets right");
    assert_eq!(batch[0]["steps"].as_array().unwrap().len(), 4, "the start and 3 steps");
    let survivors =
        batch[0]["correct_votes"].as_array().unwrap().iter().filter(|v| 2 * v.as_u64().unwrap() > 3).count();
    match batch.get(1) {
        Some(second) => assert_eq!(second["images"], survivors as u64, "APGD-DLR attacks the survivors"),
        None => assert_eq!(survivors, 0, "APGD-DLR is skipped only when nothing survived"),
    }
    assert!(adversarial.iter().zip(&clean).all(|(a, c)| a <= c), "an attack never helps the defence");
}

#[test]
fn bad_attack_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("attack.json");
    let base = [
        "attack",
        "--untrained-seed",
        "1",
        "--t-star",
        "1",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--report",
        s(&report),
        "--device",
        "cpu",
        "--input",
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        cli_error(&args)
    };
    let bin = "../shared/data/cifar10/test_lossless.bin";
    let err = with(&[bin, "--votes", "0"]);
    assert!(err.contains("--votes"), "{err}");
    let err = with(&[bin, "--eot", "0"]);
    assert!(err.contains("--eot"), "{err}");
    let err = with(&[bin, "--eps", "-0.1"]);
    assert!(err.contains("eps"), "{err}");
    let err = with(&[bin, "--eps", "8/zero"]);
    assert!(err.contains("8/zero") && err.contains("fraction"), "{err}");
    let err = with(&[bin, "--eps", "1/0"]);
    assert!(err.contains("1/0"), "{err}");
    let err = with(&[bin, "--step-size", "0"]);
    assert!(err.contains("step size"), "{err}");
    let png = dir.path().join("one.png");
    purifier::data::image::write_png(&png, &vec![0.5; 3 * 32 * 32], 32, 32).unwrap();
    let err = with(&[s(&png)]);
    assert!(err.contains("labelled"), "{err}");
    assert!(!report.exists(), "nothing may be written on bad input");
}

#[test]
fn bench_reports_timings_as_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut args = vec!["bench", "--batches", "1,2", "--repeats", "2", "--t-star", "2", "--purify-batch", "1"];
    args.extend(["--profile-batch", "1"]);
    args.extend(["--json", s(&json), "--device", "cpu"]);
    // The PyTorch baseline runs when a local venv has torch (CI has none).
    let python = project_path(".venv/bin/python");
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch, safetensors"])
        .status()
        .is_ok_and(|s| s.success());
    if has_torch {
        args.extend(["--baseline", s(&python)]);
    } else {
        println!("skipped: the PyTorch baseline part (no .venv/bin/python with torch)");
    }
    let (ok, stdout, stderr) = run_cli(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("UNet forward + VJP, batch 2") && stdout.contains("purify adversarial"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let unet = report["unet_timings"].as_array().unwrap();
    assert_eq!(unet.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    for row in unet {
        for key in ["forward", "forward_vjp"] {
            let (median, p99) = (row[key]["median_ms"].as_f64().unwrap(), row[key]["p99_ms"].as_f64().unwrap());
            assert!(median > 0.0 && p99 >= median, "{key}: median {median}, p99 {p99}");
        }
        let ratio = row["forward_vjp_over_forward"].as_f64().unwrap();
        let medians = row["forward_vjp"]["median_ms"].as_f64().unwrap() / row["forward"]["median_ms"].as_f64().unwrap();
        assert!((ratio - medians).abs() < 1e-9 * medians, "forward + VJP over forward: {ratio} vs {medians}");
        // The CPU records nothing to replay (tests/cli_device.rs checks the emulator's replayed rows).
        assert!(row.get("forward_replayed").is_none(), "{row}");
    }
    assert_eq!(report["purify_timings"].as_array().unwrap().len(), 3, "none, pixel, adversarial");
    assert!(report["attack_gradient"]["ms"].as_f64().unwrap() > 0.0, "{}", report["attack_gradient"]);
    assert_eq!(report["unet"]["parameters"], 8_952_067);
    let ops = report["per_op_breakdown"]["ops"].as_array().unwrap();
    let share: f64 = ops.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
    let calls = |name: &str| ops.iter().find(|o| o["op"] == name).map(|o| o["calls"].as_u64().unwrap());
    // cifar10-small: 77 convolutions forward and as many backward (each attention's q, k and v one),
    // 3 of them the Upsamples' (in the sub-pixel form, an op of their own); attention at 16x16 only.
    assert_eq!(calls("conv2d"), Some(74));
    assert_eq!(calls("conv2d_backward_input"), Some(74));
    assert_eq!(calls("upsample_conv2d"), Some(3));
    assert_eq!(calls("upsample_conv2d_backward_input"), Some(3));
    assert_eq!(calls("attention"), Some(6));
    // The same calls per shape: conv_in (3 -> 64 channels at 32x32) is one of them.
    let shapes = report["per_op_breakdown"]["shapes"].as_array().unwrap();
    let conv_calls: u64 = shapes.iter().filter(|s| s["op"] == "conv2d").map(|s| s["calls"].as_u64().unwrap()).sum();
    assert_eq!(conv_calls, 74);
    assert!(
        shapes.iter().any(|s| s["op"] == "upsample_conv2d" && s["shape"] == "3x3 s1 128 -> 128, 32x32"),
        "{shapes:?}"
    );
    assert!(shapes.iter().any(|s| s["op"] == "conv2d" && s["shape"] == "3x3 s1 3 -> 64, 32x32"), "{shapes:?}");
    if has_torch {
        let agreement = &report["baseline"]["agreement"];
        assert!(agreement["eps"].as_f64().unwrap() < 1e-4, "eps differs from PyTorch: {agreement}");
        assert!(agreement["grad_x"].as_f64().unwrap() < 1e-4, "grad_x differs from PyTorch: {agreement}");
        // Eager PyTorch on the CPU: forward and forward + VJP at batches 1 and 2, and one step of
        // each purification mode.
        let ratios = report["baseline"]["ratios"].as_array().unwrap();
        assert_eq!(ratios.len(), 4 + 3, "{ratios:?}");
        assert!(ratios.iter().all(|r| r["speedup"].as_f64().is_some_and(|x| x.is_finite() && x > 0.0)), "{ratios:?}");
    }
}

/// A baseline that finishes one row and then hangs (torch.compile on a new shape, say): with
/// --baseline-timeout the bench stops it, keeps that row's ratio and its own rows, and says so.
/// The stand-in script (no PyTorch needed) writes what bench/torch_baseline.py writes first: the
/// agreement tensors, then its JSON with `"complete": false`.
#[test]
fn bench_keeps_the_rows_of_a_baseline_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hanging_baseline.py");
    std::fs::write(
        &script,
        r#"
import json, struct, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
values = struct.pack("<3072f", *([0.5] * 3072))
header = {"eps": {"dtype": "F32", "shape": [1, 3, 32, 32], "data_offsets": [0, 12288]},
          "grad_x": {"dtype": "F32", "shape": [1, 3, 32, 32], "data_offsets": [12288, 24576]}}
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
with open(args["--tensors"], "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + values + values)
row = {"batch": 1, "forward": {"median_ms": 1000.0, "p99_ms": 1000.0}}
report = {"torch": "stand-in", "variant": "compile", "complete": False, "variants": {"compile": [row]},
          "unet_timings": [row], "purify_timings": []}
with open(args["--json"], "w") as f:
    json.dump(report, f)
time.sleep(600)
"#,
    )
    .unwrap();
    let json = dir.path().join("bench.json");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_purifier"))
        .args(["bench", "--device", "cpu", "--batches", "1", "--repeats", "1", "--modes", "none", "--t-star", "1"])
        .args(["--purify-batch", "1", "--profile-batch", "1", "--skip-attack-gradient"])
        .args(["--baseline", "python3", "--baseline-timeout", "3", "--json"])
        .arg(&json)
        .env("PURIFIER_BASELINE_SCRIPT", &script)
        .current_dir(project_path(""))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(started.elapsed().as_secs() < 300, "the hanging baseline was not stopped");
    assert!(stdout.contains("stopped after 3 s (--baseline-timeout)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let baseline = &report["baseline"];
    assert!(baseline["stopped_after_s"].as_f64().unwrap() >= 3.0, "{baseline}");
    let ratios = baseline["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 1, "the forward at batch 1 against the stand-in's one row: {ratios:?}");
    assert_eq!(ratios[0]["torch_ms"], 1000.0);
    assert!(baseline["agreement"]["eps"].as_f64().unwrap().is_finite(), "{baseline}");
    assert_eq!(report["unet_timings"].as_array().unwrap().len(), 1, "our own rows are kept");
}

#[test]
fn bad_bench_inputs_get_clear_errors() {
    let base = ["bench", "--device", "cpu", "--repeats", "1"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        cli_error(&args)
    };
    assert!(with(&["--batches", "0"]).contains("--batches"));
    assert!(with(&["--repeats", "0"]).contains("--repeats"));
    assert!(with(&["--batches", "1", "--modes", "bogus"]).contains("unknown mode 'bogus'"));
    assert!(with(&["--config", "cifar100"]).contains("cifar100"));
    assert!(with(&["--weights", "x.safetensors", "--baseline", "python3"]).contains("drop --weights"));
    assert!(with(&["--baseline-timeout", "5"]).contains("give --baseline PYTHON too"));
    assert!(with(&["--baseline", "python3", "--baseline-timeout", "0"]).contains("positive number of seconds"));
    assert!(with(&["--weights", "no_such.safetensors"]).contains("no_such.safetensors"));
}

/// Outputs are all or nothing: a path that cannot be written fails before any compute, an output
/// folder that is (or holds) an input is refused, and a failure leaves what was there before.
#[test]
fn outputs_are_checked_before_compute_and_written_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["purify", "--untrained-seed", "1", "--t-star", "2", "--device", "cpu", "--count", "2", "--batch", "2"];
    let purify = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let bin = "../shared/data/cifar10/test_lossless.bin";

    // An output folder under a file: refused at once, with the verb right.
    let file = dir.path().join("plain.txt");
    std::fs::write(&file, "not a folder").unwrap();
    let under_file = file.join("out");
    let (ok, _, stderr) = purify(&["--input", bin, "--out", s(&under_file)]);
    assert!(!ok && stderr.contains("cannot write") && stderr.contains("plain.txt"), "{stderr}");
    assert!(!stderr.contains("purifying"), "failed after starting the compute: {stderr}");
    let (ok, _, stderr) = purify(&["--input", bin, "--out", "/proc/purifier-test/out"]);
    assert!(!ok && stderr.contains("cannot write /proc/purifier-test"), "{stderr}");
    assert!(!stderr.contains("purifying"), "{stderr}");

    // A report that cannot be written: nothing at all is written, what was there is kept.
    let out = dir.path().join("kept");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("grid.png"), "the previous grid").unwrap();
    let (ok, _, stderr) = purify(&["--input", bin, "--out", s(&out), "--report", s(&file.join("r.json"))]);
    assert!(!ok && stderr.contains("cannot write") && !stderr.contains("purifying"), "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("grid.png")).unwrap(), "the previous grid");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "only the previous file remains");
    let fresh = dir.path().join("a/b/c");
    let (ok, _, _) = purify(&["--input", bin, "--out", s(&fresh), "--report", s(&file.join("r.json"))]);
    assert!(!ok);
    assert!(!dir.path().join("a").exists(), "folders made for the outputs are removed on failure");

    // The output folder is the input folder, or holds an input: refused, the inputs untouched.
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for k in 0..2 {
        purifier::data::image::write_png(&images.join(format!("{k}.png")), &vec![0.25; 3 * 32 * 32], 32, 32).unwrap();
    }
    let before: Vec<Vec<u8>> = (0..2).map(|k| std::fs::read(images.join(format!("{k}.png"))).unwrap()).collect();
    let err = cli_error(&[&base[..], &["--input", s(&images), "--out", s(&images)]].concat());
    assert!(err.contains("--out") && err.contains("is the input"), "{err}");
    let err = cli_error(&[&base[..], &["--input", s(&images), "--out", s(dir.path())]].concat());
    assert!(err.contains("contains the input"), "{err}");
    let err = cli_error(
        &[&base[..], &["--input", s(&images), "--out", s(&out), "--report", s(&images.join("0.png"))]].concat(),
    );
    assert!(err.contains("--report") && err.contains("is the input"), "{err}");
    let after: Vec<Vec<u8>> = (0..2).map(|k| std::fs::read(images.join(format!("{k}.png"))).unwrap()).collect();
    assert_eq!(before, after, "the inputs were changed");
    assert!(!images.join("grid.png").exists());

    // Success: everything in place, no staging left behind.
    let (ok, _, stderr) = purify(&["--input", bin, "--out", s(&out), "--report", s(&out.join("r.json"))]);
    assert!(ok, "{stderr}");
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["grid.png", "r.json", "test_lossless_0000.png", "test_lossless_0001.png"]);
}

/// Negative numbers reach the real validation, written either way; reports spell values as the
/// command line does; every command's --help has one layout.
#[test]
fn help_negative_numbers_and_report_spelling_follow_the_cli() {
    let base = ["purify", "--untrained-seed", "1", "--t-star", "1", "--count", "1", "--device", "cpu"];
    let bin = "../shared/data/cifar10/test_lossless.bin";
    for kappa in [&["--kappa", "-1"][..], &["--kappa=-1"]] {
        let err = cli_error(&[&base[..], &["--input", bin, "--out", "/tmp/never-written"], kappa].concat());
        assert!(err.contains("kappa must be >= 0"), "{kappa:?}: {err}");
    }
    let err = cli_error(&[&base[..], &["--input", bin, "--mode", "pixel", "--scale", "-2"]].concat());
    assert!(err.contains("guidance scale") && err.contains("-2"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let mut args = base.to_vec();
    args.extend(["--input", bin, "--out", s(dir.path()), "--report", s(&report), "--sampler", "ddim"]);
    args.extend(["--stride", "1", "--mode", "pixel", "--gradient-path", "xt", "--kappa", "inf"]);
    let (ok, _, stderr) = run_cli(&args);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let settings = &report["settings"];
    assert_eq!(settings["sampler"], "ddim");
    assert_eq!(settings["gradient_path"], "xt");
    assert_eq!(settings["mode"], "pixel");
    assert_eq!(settings["kappa"], "inf");

    // One layout: a described option per paragraph in every command's --help.
    for command in ["purify", "classify", "inspect", "eps", "attack", "bench"] {
        let (ok, help, _) = run_cli(&[command, "--help"]);
        assert!(ok && help.contains("\n\nOptions:\n"), "{command}: {help}");
        let options = &help[help.find("Options:").unwrap()..];
        assert!(options.contains("\n          "), "{command} --help does not put each option's text below it: {help}");
    }
    let (_, help, _) = run_cli(&["purify", "--help"]);
    for described in ["Purification mode", "Reverse-step sampler", "Ancestral DDPM", "UNet config of the untrained"] {
        assert!(help.contains(described), "purify --help lacks {described:?}");
    }
}

/// Progress: per batch with rate and ETA on standard error (no bar when it is not a terminal, as
/// here); --quiet leaves only warnings and errors.
#[test]
fn progress_has_rate_and_eta_and_quiet_silences_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["purify", "--untrained-seed", "1", "--t-star", "2", "--count", "3", "--batch", "2"];
    args.extend(["--device", "cpu", "--input", "../shared/data/cifar10/test_lossless.bin", "--out", s(dir.path())]);
    let (ok, _, stderr) = run_cli(&args);
    assert!(ok, "{stderr}");
    for expected in ["batch 1/2: 2 images", "batch 2/2: 1 images", "images/s), ETA "] {
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    }
    assert!(!stderr.contains('\u{1b}'), "terminal escapes in a log that is not a terminal: {stderr:?}");
    args.push("--quiet");
    let (ok, stdout, stderr) = run_cli(&args);
    assert!(ok && stdout.contains("purified 3 images"), "{stdout}");
    assert_eq!(stderr.lines().filter(|l| !l.starts_with("WARNING: untrained")).count(), 0, "{stderr}");
}

/// The undefended baseline: the same attacks on the classifier alone, judged as it judges. APGD
/// keeps an iterate that broke an image (AutoAttack's bookkeeping): an image any iterate
/// misclassified counts as broken.
#[test]
fn attack_with_no_defence_measures_the_classifier_alone() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("none.json");
    let out = dir.path().join("grid");
    let (ok, stdout, stderr) = run_cli(&[
        "attack",
        "--defence",
        "none",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "6",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--attack",
        "apgd-ce",
        "--iterations",
        "5",
        "--eps",
        "2/255",
        "--batch",
        "1",
        "--eot",
        "4",
        "--votes",
        "3",
        "--out",
        s(&out),
        "--report",
        s(&report_path),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("no defence: ResNet-20 alone"), "{stderr}");
    assert!(stdout.contains("undefended robust accuracy of ResNet-20 (linf eps 0.00784)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["defence"], "none");
    assert!(report["unet"].is_null() && report["purification"].is_null());
    assert_eq!(report["votes"], 1, "a deterministic model needs one vote");
    assert_eq!(report["attack"]["stages"][0]["eot"], 1, "and one draw");
    let accuracy = &report["accuracy"];
    // One judge: the classifier on the adversarial images is the robust accuracy.
    assert_eq!(accuracy["robust_majority"], accuracy["undefended_adversarial"]);
    assert!(accuracy["robust_majority"].as_f64() < accuracy["undefended_clean"].as_f64(), "{accuracy}");
    // Batches of one image: an image any APGD iterate misclassified is judged broken.
    for batch in report["trace"].as_array().unwrap() {
        let Some(stage) = batch.get(0) else { continue };
        let broken_somewhere = stage["steps"].as_array().unwrap().iter().any(|t| t["eot_accuracy"] == 0.0);
        if broken_somewhere {
            assert_eq!(stage["correct_votes"][0], 0, "an iterate broke the image, the result does not: {stage}");
        }
    }
    let grid = purifier::data::image::read_png(&out.join("grid.png")).unwrap();
    assert!(grid.width > 0);
}

/// `inspect --layers` lists a classifier's layers too, named as in its file, with their shapes.
#[test]
fn inspect_lists_classifier_layers() {
    let (ok, stdout, _) = run_cli(&["inspect", "--layers", "../shared/weights/resnet20_cifar10.safetensors"]);
    assert!(ok, "{stdout}");
    let layers: Vec<&str> = stdout.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(layers.len(), 2 + 9 + 2, "input, stem, 9 blocks, pool, linear: {stdout}");
    assert!(layers[5].contains("layer2.0") && layers[5].ends_with("-> 32 x 16 x 16"), "{}", layers[5]);
    assert!(layers[12].contains("linear (logits)") && layers[12].ends_with("-> 10 x 1 x 1"), "{}", layers[12]);

    // A WideResNet-16-2 in RobustBench's naming.
    use purifier::model::params::DeterministicParams;
    let b = purifier::backend::cpu::CpuBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrn.safetensors");
    let mut src = DeterministicParams::new(&b, 5);
    src.keep_host_copies = true;
    purifier::model::Classifier::load_wide(&mut src, 16, 2).unwrap();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        src.generated.iter().map(|(n, s, d)| (n.as_str(), &s[..], &d[..])).collect();
    write_safetensors(&path, &tensors).unwrap();
    let (ok, stdout, _) = run_cli(&["inspect", "--layers", s(&path)]);
    assert!(ok, "{stdout}");
    for expected in [
        "block2.layer.0 (residual, stride 2, 1x1 conv shortcut)",
        "-> 64 x 16 x 16",
        "bn1 + relu (head)",
        "-> 128 x 8 x 8",
        "fc (logits)",
    ] {
        assert!(stdout.contains(expected), "expected {expected:?} in: {stdout}");
    }
}

/// grid.png is a labelled sheet: under each cell the class and the classifier's prediction and
/// confidence before and after (green when right, red when wrong); cells wrap into rows.
#[test]
fn grid_is_a_labelled_sheet() {
    use purifier::data::sheet::{RIGHT, SHEET_BACKGROUND, TEXT};
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_cli(&[
        "purify",
        "--untrained-seed",
        "1",
        "--t-star",
        "1",
        "--count",
        "10",
        "--batch",
        "10",
        "--device",
        "cpu",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--out",
        s(dir.path()),
    ]);
    assert!(ok, "{stderr}");
    let sheet = purifier::data::image::read_png(&dir.path().join("grid.png")).unwrap();
    let plane = sheet.width * sheet.height;
    let pixel = |i: usize| [0, 1, 2].map(|c| (sheet.pixels[c * plane + i] * 255.0).round() as u8);
    let count = |colour: [u8; 3]| (0..plane).filter(|&i| pixel(i) == colour).count();
    assert!(count(TEXT) > 100, "no caption text");
    assert!(count(RIGHT) > 100, "no prediction marked right (ResNet-20 gets most test images right)");
    assert!(count([SHEET_BACKGROUND; 3]) > plane / 10, "no background");
    // 10 images, 8 to a row: two rows of cells (each two 32x32 images upscaled, with captions).
    let row_height = sheet.height / 2;
    assert!(row_height >= 32 * 4 + 3 * 9 && sheet.width > 8 * 2 * 32 * 4, "{}x{}", sheet.width, sheet.height);
}
