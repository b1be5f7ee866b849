//! Every kernel file compiles under NVRTC for the architectures the project supports (sm_80,
//! sm_87 Jetson Orin, sm_90 Hopper). Needs NVRTC (LD_LIBRARY_PATH with libnvrtc.so.13): CI installs
//! it; without it the test fails, naming what is missing.
use purifier::backend::cuda::compile::{nvrtc_available, ImageKind, KernelCompiler};
use purifier::kernels::KERNEL_SOURCES;

#[test]
fn every_kernel_file_compiles_for_every_architecture() {
    assert!(nvrtc_available(), "NVRTC is not loadable: put libnvrtc.so.13's folder on LD_LIBRARY_PATH");
    let files: Vec<&str> = KERNEL_SOURCES.iter().map(|(n, _)| *n).filter(|n| n.ends_with(".cu")).collect();
    for arch in ["sm_80", "sm_87", "sm_90"] {
        let compiler = KernelCompiler::with_cache_dir(arch, None).unwrap();
        for file in &files {
            let ptx = compiler.compile_file(file, ImageKind::Ptx).unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
            let text = String::from_utf8(ptx).unwrap();
            assert!(text.contains(&format!(".target {arch}")), "{file}: PTX not for {arch}");
            compiler.compile_file(file, ImageKind::Cubin).unwrap_or_else(|e| panic!("{file} cubin for {arch}: {e}"));
        }
    }
}

#[test]
fn compile_error_names_the_file_and_the_reason() {
    let compiler = KernelCompiler::with_cache_dir("sm_80", None).unwrap();
    let err = compiler
        .compile_source(
            "broken.cu",
            "#include \"common.cuh\"\nextern \"C\" __global__ void k() { undefined_name; }",
            ImageKind::Ptx,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.cu") && err.contains("undefined_name"), "{err}");
}

#[test]
fn disk_cache_reuses_and_repairs_entries() {
    let dir = tempfile::tempdir().unwrap();
    let compiler = KernelCompiler::with_cache_dir("sm_80", Some(dir.path().to_path_buf())).unwrap();
    let source = "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* p) { p[0] = warp_sum(p[1]); }";
    let first = compiler.compile_source("cached.cu", source, ImageKind::Ptx).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one cache entry: {entries:?}");
    let name = entries[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("cached-") && name.contains("-sm_80-nvrtc") && name.ends_with(".ptx"), "{name}");
    // Corrupt the entry: it is recompiled (same image), and the entry repaired.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&entries[0], &bytes).unwrap();
    let again = compiler.compile_source("cached.cu", source, ImageKind::Ptx).unwrap();
    assert_eq!(again, first);
    assert_ne!(std::fs::read(&entries[0]).unwrap(), bytes, "the corrupt entry was rewritten");
    // A different architecture is a different entry.
    let other = KernelCompiler::with_cache_dir("sm_90", Some(dir.path().to_path_buf())).unwrap();
    other.compile_source("cached.cu", source, ImageKind::Ptx).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
