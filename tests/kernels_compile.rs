//! Every kernel file compiles under NVRTC for the architectures the project supports (sm_80,
//! sm_87 Jetson Orin, sm_90 Hopper), one test per architecture (they run side by side), each file
//! compiled once: its PTX, its cubin and ptxas's report (NVRTC's own ptxas, `-v`) from one run.
//! - the PTX targets the architecture;
//! - for the files whose launchers name their kernels (conv, attention): every name is an entry,
//!   and every entry is a name the launchers use (so every kernel is one the emulator checks run);
//! - ptxas's registers, stack frame and spills for every kernel and every function left a call,
//!   printed, no spill in a kernel marked hot or in any called function, and no frame over 1 KiB;
//! - a backend's compile of the tensor-core files (its precision's 16-bit type only) has exactly
//!   that type's kernels.
//!
//! Needs NVRTC (LD_LIBRARY_PATH with libnvrtc.so.13): CI installs it; without it the test fails,
//! naming what is missing.
use purifier::backend::cuda::compile::{nvrtc_available, HalfTypes, ImageKind, KernelCompiler};
use purifier::backend::cuda::{attention, conv};
use purifier::kernels::KERNEL_SOURCES;

/// The kernel names a file's launchers look up, and the ones marked hot (no spill allowed).
fn launcher_names(file: &str) -> Option<(Vec<String>, &'static [&'static str])> {
    match file {
        "conv2d.cu" => Some((conv::simt_kernel_names(), conv::SIMT_HOT_KERNELS)),
        "conv2d_mma.cu" => Some((conv::mma_kernel_names(), conv::MMA_HOT_KERNELS)),
        "attention.cu" => Some((attention::simt_kernel_names(), attention::SIMT_HOT_KERNELS)),
        "attention_mma.cu" => Some((attention::mma_kernel_names(), attention::MMA_HOT_KERNELS)),
        _ => None,
    }
}

/// The largest stack frame a kernel or called function may have. The driver reserves a kernel's
/// frame for every thread the GPU can hold: at 1 KiB, 270 MB of an H200's memory (132 SMs x 2048
/// threads); the guidance gradients' per-class f64 array (1000 classes, 8000 B) came to 2.2 GB so.
const MAX_STACK_BYTES: u32 = 1024;

fn every_kernel_file_compiles_for(arch: &str) {
    assert!(nvrtc_available(), "NVRTC is not loadable: put libnvrtc.so.13's folder on LD_LIBRARY_PATH");
    let compiler = KernelCompiler::with_cache_dir(arch, None).unwrap();
    let files: Vec<&str> = KERNEL_SOURCES.iter().map(|(n, _)| *n).filter(|n| n.ends_with(".cu")).collect();
    let mut spilled_hot = Vec::new();
    let mut big_frames = Vec::new();
    for file in files {
        let started = std::time::Instant::now();
        let module = compiler.compile_file_with_report(file).unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
        let seconds = started.elapsed().as_secs_f64();
        assert!(module.ptx.contains(&format!(".target {arch}")), "{file}: PTX not for {arch}");
        assert!(!module.cubin.is_empty(), "{file}: empty cubin for {arch}");
        let entries = module.ptx.matches(".entry ").count();
        assert_eq!(
            module.kernels.len(),
            entries,
            "{file} {arch}: ptxas reported {} of {entries} entries",
            module.kernels.len()
        );
        let hot: &[&str] = match launcher_names(file) {
            Some((names, hot)) => {
                for name in &names {
                    assert!(module.ptx.contains(&format!(".entry {name}(")), "{file} for {arch}: no entry `{name}`");
                }
                let unnamed: Vec<&str> = module
                    .kernels
                    .iter()
                    .map(|k| k.name.as_str())
                    .filter(|entry| !names.iter().any(|n| n == entry))
                    .collect();
                assert!(unnamed.is_empty(), "{file} for {arch}: kernels no launcher names: {unnamed:?}");
                hot
            }
            None => &[],
        };
        // (The compile time, the user's cold start: a file that takes minutes is a regression to find.)
        println!(
            "{file} {arch}: {entries} kernels, {} bytes of PTX, {} of cubin, compiled in {seconds:.1} s",
            module.ptx.len(),
            module.cubin.len()
        );
        for kernel in &module.kernels {
            let is_hot = hot.contains(&kernel.name.as_str());
            println!(
                "{arch} {:<48} {:>3} registers, stack {} B, spill {} B stores / {} B loads{}",
                kernel.name,
                kernel.registers,
                kernel.stack_bytes,
                kernel.spill_store_bytes,
                kernel.spill_load_bytes,
                if is_hot { "  (hot)" } else { "" }
            );
            if is_hot && kernel.spill_store_bytes + kernel.spill_load_bytes > 0 {
                spilled_hot.push(format!("{arch} {}", kernel.name));
            }
            if kernel.stack_bytes > MAX_STACK_BYTES {
                big_frames.push(format!("{arch} {}: {} B", kernel.name, kernel.stack_bytes));
            }
        }
        // A function left a call (`__noinline__`) runs inside its callers, hot or not: none spills.
        for function in &module.functions {
            println!(
                "{arch} {file} function {}: stack {} B, spill {} B stores / {} B loads",
                function.name, function.stack_bytes, function.spill_store_bytes, function.spill_load_bytes
            );
            if function.spill_store_bytes + function.spill_load_bytes > 0 {
                spilled_hot.push(format!("{arch} {file} function {}", function.name));
            }
            if function.stack_bytes > MAX_STACK_BYTES {
                big_frames.push(format!("{arch} {file} function {}: {} B", function.name, function.stack_bytes));
            }
        }
    }
    assert!(spilled_hot.is_empty(), "hot kernels or called functions spill: {spilled_hot:?}");
    assert!(big_frames.is_empty(), "stack frames over {MAX_STACK_BYTES} B a thread: {big_frames:?}");
}

#[test]
fn every_kernel_file_compiles_for_sm_80() {
    every_kernel_file_compiles_for("sm_80");
}

#[test]
fn every_kernel_file_compiles_for_sm_87() {
    every_kernel_file_compiles_for("sm_87");
}

#[test]
fn every_kernel_file_compiles_for_sm_90() {
    every_kernel_file_compiles_for("sm_90");
}

/// A backend compiles the tensor-core files for its precision's 16-bit type only (half the work of
/// a cold start): each such compile has exactly that type's kernels of the launchers' names.
#[test]
fn a_precisions_compile_has_exactly_its_16_bit_kernels() {
    // The default cache: these are the images the emulator tests' bf16 and f16 backends load.
    let compiler = KernelCompiler::new("sm_80").unwrap();
    for (file, names) in
        [("conv2d_mma.cu", conv::mma_kernel_names()), ("attention_mma.cu", attention::mma_kernel_names())]
    {
        for halves in [HalfTypes::Bf16, HalfTypes::F16, HalfTypes::Neither] {
            let ptx = compiler.for_halves(halves).compile_file(file, ImageKind::Ptx).unwrap();
            let ptx = String::from_utf8(ptx).unwrap();
            let mut entries: Vec<&str> =
                ptx.split(".entry ").skip(1).map(|rest| rest.split('(').next().unwrap().trim()).collect();
            entries.sort();
            let mut expected: Vec<&str> = names.iter().map(String::as_str).filter(|n| halves.instantiates(n)).collect();
            expected.sort();
            let some = halves != HalfTypes::Neither;
            assert!(expected.is_empty() != some && expected.len() < names.len(), "{file} {halves:?}: {expected:?}");
            assert_eq!(entries, expected, "{file} compiled for {halves:?}");
        }
    }
}

/// A PTX image (compiled for the virtual architecture, no ptxas run) is the real architecture's
/// PTX text: what the emulator runs is what a GPU's cubin was made from.
#[test]
fn ptx_images_are_the_real_architectures_ptx() {
    let compiler = KernelCompiler::with_cache_dir("sm_80", None).unwrap();
    let ptx = compiler.compile_file("embedding.cu", ImageKind::Ptx).unwrap();
    let module = compiler.compile_file_with_report("embedding.cu").unwrap();
    assert_eq!(String::from_utf8(ptx).unwrap(), module.ptx);
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
