//! `purifier kernels`: the CUDA kernels compiled into the disk cache now, so that later runs start
//! warm: before a first run, or for a GPU that is not on this machine (a deployment image built
//! for a Jetson: `--arch sm_87`). NVRTC needs no GPU to compile.
use clap::Args;
use purifier::backend::cuda::compile::{self, HalfTypes, ImageKind, KernelCompiler};
use purifier::backend::cuda::modules::compile_side_by_side;
use purifier::backend::Precision;
use purifier::driver::cuda::{CudaDriver, MIN_COMPUTE_CAPABILITY};
use purifier::driver::Driver as _;
use purifier::error::{Error, Result};

#[derive(Args)]
pub struct KernelsArgs {
    /// The GPU architecture to compile for: sm_80 (A100), sm_86 (RTX 30), sm_87 (Jetson Orin),
    /// sm_89 (L4, RTX 40), sm_90 (H100, H200), ...; default: that of the first GPU here.
    #[arg(long)]
    pub arch: Option<String>,
    /// The precisions later runs will use, comma-separated: f32 (the SIMT kernels), bf16 (and the
    /// bf16 tensor-core kernels), f16 (and the f16 ones); each 16-bit type's are compiled apart.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16,f16")]
    pub precision: Vec<Precision>,
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    let arch = match &args.arch {
        Some(arch) => checked_arch(arch)?,
        None => this_gpus_arch()?,
    };
    let cache = compile::default_cache_dir().ok_or_else(|| {
        Error::invalid("the kernel cache is off (PURIFIER_KERNEL_CACHE=off): there is nowhere to keep the kernels")
    })?;
    let compiler = KernelCompiler::new(&arch)?;
    let (major, minor) = compiler.nvrtc_version();
    println!("kernels for {arch} (NVRTC {major}.{minor}) into {}", cache.display());
    let files: Vec<&'static str> = compile::kernel_files().collect();
    let mut precisions: Vec<Precision> = Vec::new();
    for &precision in &args.precision {
        if !precisions.contains(&precision) {
            precisions.push(precision);
        }
    }
    for precision in precisions {
        let compiler = compiler.for_halves(HalfTypes::for_precision(precision));
        let is_cached = |file: &str| compiler.cached_file(file, ImageKind::Cubin).map(|image| image.is_some());
        let was_cached: Vec<bool> = files.iter().map(|file| is_cached(file)).collect::<Result<_>>()?;
        // Compiled (or read back) side by side, as a first run would.
        let done = compile_side_by_side(&compiler, ImageKind::Cubin, &files);
        let mut lines = Vec::new();
        for ((file, (image, seconds)), cached) in files.iter().zip(done.files).zip(was_cached) {
            image?;
            if !is_cached(file)? {
                return Err(Error::Device(format!(
                    "{file}: compiled, but the cache at {} took no entry",
                    cache.display()
                )));
            }
            lines.push(if cached {
                format!("  {file:<20} cached already")
            } else {
                format!("  {file:<20} {seconds:.1} s")
            });
        }
        println!("{precision}: {} files ready in {:.1} s, {} at a time", files.len(), done.wall_s, done.workers);
        for line in lines {
            println!("{line}");
        }
    }
    Ok(())
}

/// `--arch` as NVRTC names it, if the kernels can run there and this NVRTC compiles for it.
fn checked_arch(arch: &str) -> Result<String> {
    let number: u32 = arch
        .strip_prefix("sm_")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid(format!("--arch {arch}: not an architecture name such as sm_87")))?;
    let (major, minor) = MIN_COMPUTE_CAPABILITY;
    if number < major * 10 + minor {
        return Err(Error::invalid(format!("--arch {arch}: the kernels need sm_{major}{minor} (Ampere) or newer")));
    }
    let supported = compile::supported_archs()?;
    if !supported.iter().any(|a| a == arch) {
        return Err(Error::invalid(format!(
            "--arch {arch}: this NVRTC does not compile for it (it does for {})",
            supported.join(", ")
        )));
    }
    Ok(arch.to_string())
}

/// The first GPU's architecture; without one, an error asking for `--arch`.
fn this_gpus_arch() -> Result<String> {
    match CudaDriver::new(0) {
        Ok(driver) => Ok(driver.info().arch()),
        Err(e) => Err(Error::Device(format!(
            "{e}; to compile for a GPU that is not here, name it with --arch (sm_87 for a Jetson Orin)"
        ))),
    }
}
