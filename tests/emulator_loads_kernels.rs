//! Every kernel file of the project, compiled by NVRTC for sm_80 through the backend's compiler
//! (and its disk cache: tests/kernels_compile.rs compiles every file afresh), loads in the PTX emulator: the emulator knows every instruction and modifier NVRTC emits for
//! them (an unknown one is a load error naming it and its line).

use purifier::backend::cuda::compile::{nvrtc_available, ImageKind, KernelCompiler};
use purifier::driver::emulated::EmulatedDriver;
use purifier::driver::{Driver, ModuleImage};

#[test]
fn every_kernel_file_loads_in_the_emulator() {
    if !nvrtc_available() {
        assert!(std::env::var("CI").map(|v| v != "true").unwrap_or(true), "NVRTC not found under CI=true");
        println!("skipped: NVRTC not found");
        return;
    }
    let compiler = KernelCompiler::new("sm_80").unwrap();
    let driver = EmulatedDriver::new();
    let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for file in &files {
        let ptx = String::from_utf8(compiler.compile_file(file, ImageKind::Ptx).unwrap()).unwrap();
        if let Err(e) = driver.load_module(ModuleImage::Ptx(&ptx)) {
            let line = e.to_string();
            failures.push(format!("{file}: {line}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
