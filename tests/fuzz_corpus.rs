//! Replays the fuzz corpus (fuzz/corpus) and every input a fuzzer found to crash
//! (fuzz/regressions) through the fuzz targets' own entry points, so that what the fuzzers
//! learned is checked in every ordinary `cargo test`, without nightly or cargo-fuzz.
use std::path::PathBuf;

use purifier::data::fuzz_entry;

fn replay(target: &str, entry: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for folder in ["corpus", "regressions"] {
        let dir = root.join(folder).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for file in entries {
            let path = file.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                entry_on(&path, entry);
                replayed += 1;
            }
        }
    }
    assert!(replayed > 0, "no corpus files for {target} under {}", root.display());
    println!("{target}: replayed {replayed} inputs");
}

fn entry_on(path: &std::path::Path, entry: fn(&[u8])) {
    let bytes = std::fs::read(path).unwrap();
    // A panic names the input that caused it.
    let result = std::panic::catch_unwind(|| entry(&bytes));
    assert!(result.is_ok(), "{} panicked in the reader", path.display());
}

#[test]
fn safetensors_corpus_replays() {
    replay("safetensors", fuzz_entry::safetensors_bytes);
}

#[test]
fn cifar_corpus_replays() {
    replay("cifar", fuzz_entry::cifar_bytes);
}

#[test]
fn png_corpus_replays() {
    replay("png", fuzz_entry::png_bytes);
}
