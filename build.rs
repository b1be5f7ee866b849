//! Embeds the CUDA kernel sources of kernels/ into the binary (see src/kernels.rs), so the binary is
//! self-contained: NVRTC compiles them at run time for the GPU it finds.
use std::{env, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let mut entries: Vec<_> =
        fs::read_dir("kernels").map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    entries.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")));
    entries.sort();
    let mut out = String::from(
        "/// (file name, source) of every kernel file in kernels/.\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().unwrap().to_string_lossy();
        let abs = fs::canonicalize(path).unwrap();
        out += &format!("    ({:?}, include_str!({:?})),\n", name, abs.display().to_string());
    }
    out += "];\n";
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    fs::write(dest, out).unwrap();
}
