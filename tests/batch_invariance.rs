//! An image's result depends on the seed, the image and the settings only: not on `--batch`,
//! nor on the other images of the run. The noise is keyed by each image's index in the whole
//! input (src/backend/cpu/rng.rs), so every batch size must give the same output bytes.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// Every file the run wrote into `out`: names and bytes.
fn outputs_of(args: &[&str], out: &Path) -> BTreeMap<String, Vec<u8>> {
    let (ok, _, stderr) = run_cli(args);
    assert!(ok, "{args:?}: {stderr}");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        files.insert(path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap());
    }
    files
}

/// Runs `base` with `--batch` each of `batches`, checks that every output file is identical byte
/// for byte to the first run's, and returns the first run's JSON report.
fn assert_same_outputs_for_batches(base: &[&str], batches: &[usize], expected_files: usize) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut first: Option<(usize, BTreeMap<String, Vec<u8>>)> = None;
    let mut first_report = serde_json::Value::Null;
    for &batch in batches {
        let out = dir.path().join(format!("batch{batch}"));
        let report = out.join("report.json");
        let batch_text = batch.to_string();
        let mut args = base.to_vec();
        args.extend(["--batch", &batch_text, "--out", out.to_str().unwrap()]);
        args.extend(["--report", report.to_str().unwrap()]);
        let mut files = outputs_of(&args, &out);
        assert_eq!(files.len(), expected_files, "files written with --batch {batch}: {:?}", files.keys());
        // The report says which batch size ran and how long it took; its results must agree.
        let report: serde_json::Value = serde_json::from_slice(&files.remove("report.json").unwrap()).unwrap();
        let results = serde_json::to_vec(&(&report["accuracy"], &report["correct_votes"])).unwrap();
        files.insert("report results".into(), results);
        match &first {
            None => {
                first = Some((batch, files));
                first_report = report;
            }
            Some((first_batch, expected)) => {
                let differing: Vec<&String> =
                    expected.iter().filter(|(name, bytes)| files.get(*name) != Some(*bytes)).map(|(n, _)| n).collect();
                assert!(differing.is_empty(), "--batch {first_batch} and --batch {batch} differ in {differing:?}");
            }
        }
    }
    first_report
}

/// DDPM (noise at every reverse step, and the q-sample's) on 6 images: batch 1, 4 (a full batch
/// and a partial one) and 6 write the same PNGs.
#[test]
fn purify_output_does_not_depend_on_batch() {
    let base = [
        "purify",
        "--input",
        "../shared/data/cifar10/test_lossless.bin",
        "--count",
        "6",
        "--untrained-seed",
        "1",
        "--t-star",
        "3",
        "--seed",
        "7",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--device",
        "cpu",
    ];
    // 6 PNGs, grid.png and the report.
    assert_same_outputs_for_batches(&base, &[1, 4, 6], 8);
}

/// PGD-EOT (random start, 2 EOT draws per iteration, 2 iterations) and the votes that pick who is
/// attacked: the adversarial PNGs, the grid of their purifications and the votes agree for batch
/// 1, 4 and 6. Images 0 and 4 carry a wrong label, so the defence gets them wrong and they are not
/// attacked: the attacked images' noise must not depend on their place among the attacked ones.
#[test]
fn attack_output_does_not_depend_on_batch() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("six.bin");
    const RECORD: usize = 1 + 3 * 32 * 32; // CIFAR-10 binary: label byte, then the pixels
    let mut records = std::fs::read(shared_path("data/cifar10/test_lossless.bin")).unwrap()[..6 * RECORD].to_vec();
    for image in [0, 4] {
        records[image * RECORD] = (records[image * RECORD] + 1) % 10;
    }
    std::fs::write(&input, &records).unwrap();
    let base = [
        "attack",
        "--input",
        input.to_str().unwrap(),
        "--count",
        "6",
        "--untrained-seed",
        "1",
        "--t-star",
        "2",
        "--seed",
        "7",
        "--classifier",
        "../shared/weights/resnet20_cifar10.safetensors",
        "--iterations",
        "2",
        "--eot",
        "2",
        "--votes",
        "1",
        "--device",
        "cpu",
    ];
    let report = assert_same_outputs_for_batches(&base, &[1, 4, 6], 8);
    // What makes the test meaningful: the relabelled images were left alone, the others attacked
    // (untrained UNet at t* = 2, so the defence is ResNet-20 on nearly the clean image).
    assert_eq!(report["correct_votes"]["clean"], serde_json::json!([0, 1, 1, 1, 0, 1]), "{report}");
}
