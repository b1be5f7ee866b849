//! Run-time compilation of kernels/ with NVRTC, and the on-disk cache of compiled images.
//!
//! Each `.cu` file is one module, compiled for the device's architecture with every `.cuh` file of
//! kernels/ (`common.cuh`, `conv_common.cuh`, ...) handed to NVRTC as an in-memory header
//! (kernels/README.md). Images are cached on disk, keyed by a hash of the exact source text (the
//! file and every header), the compile options, the architecture and the NVRTC version; a cache
//! entry whose checksum does not match is recompiled, never trusted.
//!
//! The cache lives in `$PURIFIER_KERNEL_CACHE` when set (`off` disables it), else
//! `$XDG_CACHE_HOME/purifier/kernels`, else `$HOME/.cache/purifier/kernels`.
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::kernels::KERNEL_SOURCES;

/// Whether an embedded kernel file is a header (`.cuh`: handed to NVRTC with every module, never
/// compiled on its own).
fn is_header(name: &str) -> bool {
    name.ends_with(".cuh")
}

/// The embedded headers, (name, source), in file-name order (build.rs sorts them).
pub fn kernel_headers() -> impl Iterator<Item = (&'static str, &'static str)> {
    KERNEL_SOURCES.iter().copied().filter(|(name, _)| is_header(name))
}

/// Compile options shared by every module (no fast math: the kernels are checked against an f32
/// reference at 1e-5).
const BASE_OPTIONS: &[&str] = &["-std=c++17", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=true"];

/// Which 16-bit types' kernels a compile stamps out (`KERNELS_BF16` / `KERNELS_F16` in
/// common.cuh): the tensor-core files instantiate every kernel for bf16 and for f16, and a backend
/// needs its precision's only (the model code makes every activation and weight in the backend's
/// precision), so it compiles half their code, or none of it for f32: they are the slowest modules,
/// and a user's cold start waits for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfTypes {
    Both,
    Bf16,
    F16,
    /// Neither: an f32 backend's (its networks' tensors are all f32, on the SIMT kernels).
    Neither,
}

impl HalfTypes {
    /// What a backend of `precision` compiles: its own 16-bit type's kernels, none for f32.
    pub fn for_precision(precision: Precision) -> Self {
        match precision {
            Precision::Bf16 => HalfTypes::Bf16,
            Precision::F16 => HalfTypes::F16,
            Precision::F32 => HalfTypes::Neither,
        }
    }

    /// NVRTC's defines for it (none: common.cuh's default, both).
    fn defines(self) -> &'static [&'static str] {
        match self {
            HalfTypes::Both => &[],
            HalfTypes::Bf16 => &["-DKERNELS_F16=0"],
            HalfTypes::F16 => &["-DKERNELS_BF16=0"],
            HalfTypes::Neither => &["-DKERNELS_BF16=0", "-DKERNELS_F16=0"],
        }
    }

    /// Whether a compile of these types has kernel `name` (named `..._bf16...` or `..._f16...`
    /// like every 16-bit kernel of kernels/; a name with neither is in every compile).
    pub fn instantiates(self, name: &str) -> bool {
        let has = |t: &str| name.split('_').any(|part| part == t);
        match self {
            HalfTypes::Both => true,
            HalfTypes::Bf16 => !has("f16"),
            HalfTypes::F16 => !has("bf16"),
            HalfTypes::Neither => !has("f16") && !has("bf16"),
        }
    }
}

impl std::fmt::Display for HalfTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HalfTypes::Both => "bf16 and f16",
            HalfTypes::Bf16 => "bf16 only",
            HalfTypes::F16 => "f16 only",
            HalfTypes::Neither => "none (an f32 backend)",
        })
    }
}

/// What NVRTC produces for a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// PTX text: the emulator's input (a GPU JIT-compiles it).
    Ptx,
    /// A cubin for the exact architecture (a GPU loads it with no JIT).
    Cubin,
}

impl ImageKind {
    fn extension(self) -> &'static str {
        match self {
            ImageKind::Ptx => "ptx",
            ImageKind::Cubin => "cubin",
        }
    }
}

/// Whether NVRTC can be loaded, without panicking when it cannot (cudarc panics on first use of a
/// missing library, so every NVRTC call goes through this check first).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc would use.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn nvrtc_missing() -> Error {
    Error::Device(
        "NVRTC (libnvrtc.so.13) was not found: the CUDA backend compiles its kernels at run time and needs it; \
         install the CUDA 13.0 NVRTC (PyPI nvidia-cuda-nvrtc==13.0.88) and put its lib folder on LD_LIBRARY_PATH"
            .into(),
    )
}

/// The NVRTC version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present; two valid out-pointers.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    check(status, "nvrtcVersion")?;
    Ok((major, minor))
}

fn check(status: cudarc::nvrtc::sys::nvrtcResult, what: &str) -> Result<()> {
    if status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("NVRTC {what} failed: {status:?}")))
    }
}

/// The real architectures this NVRTC compiles for, as "sm_XY" (nvrtcGetSupportedArchs).
pub fn supported_archs() -> Result<Vec<String>> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    use cudarc::nvrtc::sys;
    let mut count: c_int = 0;
    // SAFETY: the library is present; a count query, then a buffer of exactly that many.
    let archs = unsafe {
        check(sys::nvrtcGetNumSupportedArchs(&mut count), "nvrtcGetNumSupportedArchs")?;
        let mut archs = vec![0 as c_int; count.max(0) as usize];
        check(sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()), "nvrtcGetSupportedArchs")?;
        archs
    };
    Ok(archs.into_iter().map(|a| format!("sm_{a}")).collect())
}

/// The embedded kernel files, each one module (the headers are not).
pub fn kernel_files() -> impl Iterator<Item = &'static str> {
    KERNEL_SOURCES.iter().map(|(name, _)| *name).filter(|name| !is_header(name))
}

/// The embedded source of a kernel file.
pub fn kernel_source(file: &str) -> Result<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, source)| *source)
        .ok_or_else(|| Error::Device(format!("no kernel file {file} is embedded in this build (kernels/)")))
}

/// Compiles kernel files for one architecture, through the disk cache.
#[derive(Clone)]
pub struct KernelCompiler {
    /// e.g. "sm_80".
    arch: String,
    nvrtc_version: (i32, i32),
    cache_dir: Option<PathBuf>,
    /// Whether NVRTC may answer from its own cache (NVRTC 12.9 and later keep one, on a machine
    /// with a CUDA driver): false for a compile that must really run, a cold start being timed
    /// (on the H200 such "compiles" took 0.2 s for a module ptxas needs a minute for).
    nvrtc_cache: bool,
    /// The 16-bit types whose kernels it compiles.
    halves: HalfTypes,
    /// False for a backend that only sizes plans (`CudaBackend::sizing`): no NVRTC is needed.
    enabled: bool,
}

impl KernelCompiler {
    /// A compiler for `arch` ("sm_80", ...) with the default cache folder. Fails if NVRTC is missing.
    pub fn new(arch: &str) -> Result<Self> {
        Self::with_cache_dir(arch, default_cache_dir())
    }

    /// A compiler that compiles nothing (each call is an error): for a backend that runs no
    /// kernels, so it works where NVRTC is missing.
    pub fn disabled(arch: &str) -> Self {
        Self {
            arch: arch.to_string(),
            nvrtc_version: (0, 0),
            cache_dir: None,
            nvrtc_cache: false,
            halves: HalfTypes::Both,
            enabled: false,
        }
    }

    /// The same with an explicit cache folder (`None`: no disk cache).
    pub fn with_cache_dir(arch: &str, cache_dir: Option<PathBuf>) -> Result<Self> {
        Ok(Self {
            arch: arch.to_string(),
            nvrtc_version: nvrtc_version()?,
            cache_dir,
            nvrtc_cache: true,
            halves: HalfTypes::Both,
            enabled: true,
        })
    }

    /// The same compiler with no cache at all, neither ours on disk nor NVRTC's own: every call
    /// compiles (the benchmark's cold start).
    pub fn uncached(&self) -> Self {
        Self { cache_dir: None, nvrtc_cache: false, ..self.clone() }
    }

    /// The same compiler for the kernels of `halves` only (a backend's: `HalfTypes::for_precision`).
    pub fn for_halves(&self, halves: HalfTypes) -> Self {
        Self { halves, ..self.clone() }
    }

    pub fn halves(&self) -> HalfTypes {
        self.halves
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.nvrtc_version
    }

    /// The compiled image of the embedded kernel file `file` (e.g. "elementwise.cu").
    pub fn compile_file(&self, file: &str, kind: ImageKind) -> Result<Vec<u8>> {
        self.compile_source(file, kernel_source(file)?, kind)
    }

    /// The compiled image of `source` (named `name` in messages), from the cache when a valid entry
    /// exists, else compiled and stored.
    pub fn compile_source(&self, name: &str, source: &str, kind: ImageKind) -> Result<Vec<u8>> {
        if !self.enabled {
            return Err(Error::Device(format!("{name}: this backend only sizes plans and compiles no kernels")));
        }
        let entry = self.cache_entry(name, source, kind)?;
        if let Some(image) = entry.as_deref().and_then(read_cache_entry) {
            return Ok(image);
        }
        let image = self.compile_uncached(name, source, kind)?;
        if let Some(path) = entry {
            // A cache that cannot be written costs only time: the next run compiles again.
            let _ = write_cache_entry(&path, &image);
        }
        Ok(image)
    }

    /// The cached image of kernel file `file`, if the cache holds a valid one (read and verified).
    pub fn cached_file(&self, file: &str, kind: ImageKind) -> Result<Option<Vec<u8>>> {
        Ok(self.cache_entry(file, kernel_source(file)?, kind)?.as_deref().and_then(read_cache_entry))
    }

    /// Stores `image`, compiled from kernel file `file`, in the cache (where there is one; a cache
    /// that cannot be written is not an error).
    pub fn cache_file(&self, file: &str, kind: ImageKind, image: &[u8]) -> Result<()> {
        if let Some(path) = self.cache_entry(file, kernel_source(file)?, kind)? {
            let _ = write_cache_entry(&path, image);
        }
        Ok(())
    }

    /// Where the cache keeps the image of `source` (`None`: no cache).
    fn cache_entry(&self, name: &str, source: &str, kind: ImageKind) -> Result<Option<PathBuf>> {
        Ok(self.cache_dir.as_ref().map(|dir| dir.join(self.cache_key(name, source, kind))))
    }

    /// `<file stem>-<source hash>-<arch>-nvrtc<major>.<minor>.<ptx|cubin>`; the hash covers the
    /// source, every header (name and text: editing any header recompiles) and the options (the
    /// 16-bit types' defines included).
    fn cache_key(&self, name: &str, source: &str, kind: ImageKind) -> String {
        let hash = source_hash(source, kernel_headers(), self.defines(source));
        let stem = Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
        let (major, minor) = self.nvrtc_version;
        format!("{stem}-{hash:032x}-{}-nvrtc{major}.{minor}.{}", self.arch, kind.extension())
    }

    fn compile_uncached(&self, name: &str, source: &str, kind: ImageKind) -> Result<Vec<u8>> {
        // PTX for the virtual architecture (compute_80 for sm_80): the same text, but NVRTC stops
        // there instead of also running ptxas, which is a third of the time of the big modules.
        match kind {
            ImageKind::Ptx => self.run_nvrtc(name, source, &self.arch.replacen("sm_", "compute_", 1), &[])?.ptx(),
            ImageKind::Cubin => self.run_nvrtc(name, source, &self.arch, &[])?.cubin(),
        }
    }

    /// Kernel file `file` compiled once for the real architecture with ptxas's verbose report,
    /// never from a cache (NVRTC's own would give no report): its PTX, its cubin, and each
    /// kernel's registers and spills (the check CI runs on every kernel for every architecture).
    pub fn compile_file_with_report(&self, file: &str) -> Result<CompiledModule> {
        let program = self.uncached().run_nvrtc(file, kernel_source(file)?, &self.arch, &["--ptxas-options=-v"])?;
        let ptx = String::from_utf8(program.ptx()?)
            .map_err(|_| Error::Device(format!("NVRTC's PTX of {file} is not UTF-8")))?;
        let log = program.log();
        let report = parse_ptxas_report(&log)
            .map_err(|e| Error::Device(format!("ptxas's report of {file} for {}: {e}\n{log}", self.arch)))?;
        Ok(CompiledModule { ptx, cubin: program.cubin()?, kernels: report.kernels, functions: report.functions })
    }

    /// The 16-bit types' defines for `source`: none for a file with no such guard, which compiles
    /// the same for every precision (one cache entry, not one per precision).
    fn defines(&self, source: &str) -> &'static [&'static str] {
        let per_16_bit_type = source.contains("KERNELS_BF16") || source.contains("KERNELS_F16");
        if per_16_bit_type {
            self.halves.defines()
        } else {
            &[]
        }
    }

    /// NVRTC's options for compiling `source` for `--gpu-architecture=arch`: the base ones, its
    /// 16-bit types' defines, `extra`, and `--no-cache` where NVRTC's own cache must not answer
    /// (an option NVRTC has had since 12.9).
    fn options(&self, source: &str, arch: &str, extra: &[&str]) -> Vec<String> {
        let mut options: Vec<String> =
            BASE_OPTIONS.iter().chain(self.defines(source)).chain(extra).map(|o| o.to_string()).collect();
        if !self.nvrtc_cache && self.nvrtc_version >= (12, 9) {
            options.push("--no-cache".into());
        }
        options.push(format!("--gpu-architecture={arch}"));
        options
    }

    /// One NVRTC compilation of `source` for `--gpu-architecture=arch`, with the base options and
    /// `extra`; a compile error names the file and carries NVRTC's log.
    fn run_nvrtc(&self, name: &str, source: &str, arch: &str, extra: &[&str]) -> Result<Program> {
        use cudarc::nvrtc::sys;
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| Error::Device(format!("kernel {what} {name} contains a NUL byte")))
        };
        let source_c = cstr(source, "source")?;
        let name_c = cstr(name, "name")?;
        let headers_c: Vec<CString> = kernel_headers().map(|(_, text)| cstr(text, "header")).collect::<Result<_>>()?;
        let header_names_c: Vec<CString> =
            kernel_headers().map(|(header_name, _)| cstr(header_name, "header name")).collect::<Result<_>>()?;
        let options: Vec<CString> =
            self.options(source, arch, extra).iter().map(|o| cstr(o, "option")).collect::<Result<_>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        let mut program: sys::nvrtcProgram = std::ptr::null_mut();
        let headers: Vec<*const c_char> = headers_c.iter().map(|h| h.as_ptr()).collect();
        let header_names: Vec<*const c_char> = header_names_c.iter().map(|h| h.as_ptr()).collect();
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; NVRTC
        // copies them. The library's presence was checked in `new`.
        check(
            unsafe {
                sys::nvrtcCreateProgram(
                    &mut program,
                    source_c.as_ptr(),
                    name_c.as_ptr(),
                    headers.len() as c_int,
                    headers.as_ptr(),
                    header_names.as_ptr(),
                )
            },
            "nvrtcCreateProgram",
        )?;
        let program = Program(program);
        // SAFETY: a live program and `option_ptrs.len()` valid option strings.
        let status = unsafe { sys::nvrtcCompileProgram(program.0, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
        if status != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device(format!(
                "NVRTC could not compile {name} for {}:\n{}",
                self.arch,
                program.log().trim_end()
            )));
        }
        Ok(program)
    }
}

/// A kernel file compiled for a real architecture, with ptxas's report.
pub struct CompiledModule {
    pub ptx: String,
    pub cubin: Vec<u8>,
    /// Every kernel (entry) of the module, in ptxas's order.
    pub kernels: Vec<KernelResources>,
    /// Every device function ptxas compiled apart (called, not inlined).
    pub functions: Vec<FunctionResources>,
}

/// What ptxas gave one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    /// Local memory for the kernel's own frame (a struct taken by reference, an indexed array).
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// What ptxas gave a device function left a call (`__noinline__`): its frame and spills (its
/// registers count in its callers').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionResources {
    /// The mangled name.
    pub name: String,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// ptxas's `-v` report, parsed: each kernel's and each called function's resources.
#[derive(Debug, PartialEq, Eq)]
pub struct PtxasReport {
    pub kernels: Vec<KernelResources>,
    pub functions: Vec<FunctionResources>,
}

/// Each kernel's registers, frame and spills from ptxas's `-v` report (its lines "Compiling entry
/// function 'name'", "Function properties for name", "S bytes stack frame, N bytes spill stores,
/// M bytes spill loads", "Used R registers"), and the frame and spills of each function whose
/// properties come outside a kernel's (a called function).
fn parse_ptxas_report(log: &str) -> std::result::Result<PtxasReport, String> {
    let number_before = |line: &str, word: &str| -> std::result::Result<u32, String> {
        let at = line.find(word).ok_or_else(|| format!("no `{word}` in `{line}`"))?;
        let number = line[..at].split_whitespace().last().unwrap_or("");
        number.parse().map_err(|_| format!("`{number}` before `{word}` in `{line}` is not a count"))
    };
    let mut report = PtxasReport { kernels: Vec::new(), functions: Vec::new() };
    let mut current: Option<KernelResources> = None;
    let mut properties_of: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(unfinished) = current.take() {
                return Err(format!("no register count for {}", unfinished.name));
            }
            let name = rest.split('\'').next().unwrap_or("").to_string();
            current =
                Some(KernelResources { name, registers: 0, stack_bytes: 0, spill_store_bytes: 0, spill_load_bytes: 0 });
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_of = Some(rest.trim().to_string());
        } else if line.contains("bytes spill stores") {
            let (stack, stores, loads) = (
                number_before(line, "bytes stack frame")?,
                number_before(line, "bytes spill stores")?,
                number_before(line, "bytes spill loads")?,
            );
            let of = properties_of.take().ok_or_else(|| format!("`{line}` follows no `Function properties for`"))?;
            match current.as_mut() {
                Some(kernel) if kernel.name == of => {
                    (kernel.stack_bytes, kernel.spill_store_bytes, kernel.spill_load_bytes) = (stack, stores, loads);
                }
                _ => report.functions.push(FunctionResources {
                    name: of,
                    stack_bytes: stack,
                    spill_store_bytes: stores,
                    spill_load_bytes: loads,
                }),
            }
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(mut kernel) = current.take() {
                kernel.registers = number_before(line, "registers")?;
                report.kernels.push(kernel);
            }
        }
    }
    match current {
        Some(unfinished) => Err(format!("no register count for {}", unfinished.name)),
        None => Ok(report),
    }
}

/// The hash of what NVRTC compiles: the source, each header's name and text, the options (the base
/// ones and `defines`).
fn source_hash<'a>(source: &str, headers: impl Iterator<Item = (&'a str, &'a str)>, defines: &[&str]) -> u128 {
    let mut hash = Fnv128::new();
    hash.write(source.as_bytes());
    for (name, text) in headers {
        for part in ["\0", name, "\0", text] {
            hash.write(part.as_bytes());
        }
    }
    hash.write(b"\0");
    hash.write(BASE_OPTIONS.join(" ").as_bytes());
    for define in defines {
        hash.write(b" ");
        hash.write(define.as_bytes());
    }
    hash.finish()
}

/// An NVRTC program, destroyed on drop.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Program {
    /// The PTX text (NUL terminator dropped).
    fn ptx(&self) -> Result<Vec<u8>> {
        use cudarc::nvrtc::sys;
        let mut size = 0usize;
        // SAFETY: a size query on a compiled program, then a buffer of exactly that size.
        let mut image = unsafe {
            check(sys::nvrtcGetPTXSize(self.0, &mut size), "nvrtcGetPTXSize")?;
            let mut image = vec![0u8; size];
            check(sys::nvrtcGetPTX(self.0, image.as_mut_ptr() as *mut c_char), "nvrtcGetPTX")?;
            image
        };
        while image.last() == Some(&0) {
            image.pop();
        }
        Ok(image)
    }

    /// The cubin (compiled for a real architecture only).
    fn cubin(&self) -> Result<Vec<u8>> {
        use cudarc::nvrtc::sys;
        let mut size = 0usize;
        // SAFETY: a size query on a compiled program, then a buffer of exactly that size.
        unsafe {
            check(sys::nvrtcGetCUBINSize(self.0, &mut size), "nvrtcGetCUBINSize")?;
            let mut image = vec![0u8; size];
            check(sys::nvrtcGetCUBIN(self.0, image.as_mut_ptr() as *mut c_char), "nvrtcGetCUBIN")?;
            Ok(image)
        }
    }

    fn log(&self) -> String {
        use cudarc::nvrtc::sys;
        let mut size = 0usize;
        // SAFETY: a live program; the buffer has the size NVRTC reported.
        unsafe {
            if sys::nvrtcGetProgramLogSize(self.0, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                return String::new();
            }
            let mut log = vec![0u8; size];
            if sys::nvrtcGetProgramLog(self.0, log.as_mut_ptr() as *mut c_char) != sys::nvrtcResult::NVRTC_SUCCESS {
                return String::new();
            }
            CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe {
            cudarc::nvrtc::sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// The cache folder from the environment (see the module comment).
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("PURIFIER_KERNEL_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("purifier").join("kernels"))
        }
    }
}

/// A cache entry: a one-line header `purifier-kernel-image v1 <length> <fnv128 of the payload>`
/// then the payload.
const CACHE_MAGIC: &str = "purifier-kernel-image v1";

fn read_cache_entry(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..newline]).ok()?;
    let payload = &bytes[newline + 1..];
    let mut fields = header.strip_prefix(CACHE_MAGIC)?.split_whitespace();
    let length: usize = fields.next()?.parse().ok()?;
    let checksum = u128::from_str_radix(fields.next()?, 16).ok()?;
    let mut hash = Fnv128::new();
    hash.write(payload);
    (length == payload.len() && checksum == hash.finish()).then(|| payload.to_vec())
}

fn write_cache_entry(path: &Path, image: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache entries live in a folder");
    std::fs::create_dir_all(dir)?;
    let mut hash = Fnv128::new();
    hash.write(image);
    let mut bytes = format!("{CACHE_MAGIC} {} {:032x}\n", image.len(), hash.finish()).into_bytes();
    bytes.extend_from_slice(image);
    // Written to a temporary name and renamed, so a reader never sees half an entry.
    let temporary = dir.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    std::fs::write(&temporary, &bytes)?;
    std::fs::rename(&temporary, path)
}

/// FNV-1a with 128-bit state: a stable hash (std's may change between Rust versions) for cache
/// keys and entry checksums, where accidental collisions are what matters, not adversaries.
struct Fnv128(u128);

impl Fnv128 {
    fn new() -> Self {
        Self(0x6c62272e07bb014262b821756295c58d)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u128;
            self.0 = self.0.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }
    fn finish(&self) -> u128 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entry_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("purifier-cache-test-{}", std::process::id()));
        let path = dir.join("entry.ptx");
        write_cache_entry(&path, b"some image").unwrap();
        assert_eq!(read_cache_entry(&path).as_deref(), Some(&b"some image"[..]));
        // One flipped byte of the payload: refused.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_cache_entry(&path), None);
        // Truncated: refused.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_cache_entry(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_header_is_part_of_the_source_hash() {
        let headers: Vec<(&str, &str)> = kernel_headers().collect();
        let names: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
        assert!(names.contains(&"common.cuh") && names.contains(&"conv_common.cuh"), "{names:?}");
        let base = source_hash("k", headers.iter().copied(), &[]);
        for i in 0..headers.len() {
            let text = format!("{}\n// edited", headers[i].1);
            let mut edited: Vec<(&str, &str)> = headers.clone();
            edited[i].1 = &text;
            assert_ne!(source_hash("k", edited.into_iter(), &[]), base, "editing {} keeps the hash", headers[i].0);
        }
        let fewer = headers[..headers.len() - 1].iter().copied();
        assert_ne!(source_hash("k", fewer, &[]), base, "a header less keeps the hash");
        assert_ne!(source_hash("k2", headers.iter().copied(), &[]), base);
        // Each compile of a subset of the 16-bit kernels is an entry of its own.
        let bf16 = source_hash("k", headers.iter().copied(), HalfTypes::Bf16.defines());
        let f16 = source_hash("k", headers.iter().copied(), HalfTypes::F16.defines());
        assert!(bf16 != base && f16 != base && bf16 != f16);
    }

    #[test]
    fn ptxas_report_gives_each_kernels_registers_and_spills() {
        let log = "ptxas info    : 64 bytes gmem\n\
            ptxas info    : Compiling entry function 'first' for 'sm_80'\n\
            ptxas info    : Function properties for first\n\
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 255 registers, used 1 barriers, 444 bytes cmem[0]\n\
            ptxas info    : Compile time = 571.457 ms\n\
            ptxas info    : Function properties for _Z6calleei\n\
            ptxas         .     16 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Compiling entry function 'second' for 'sm_80'\n\
            ptxas info    : Function properties for second\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 32 registers, 428 bytes cmem[0]\n";
        let report = parse_ptxas_report(log).unwrap();
        let resources = |name: &str, registers, stack_bytes, spill_store_bytes, spill_load_bytes| KernelResources {
            name: name.into(),
            registers,
            stack_bytes,
            spill_store_bytes,
            spill_load_bytes,
        };
        assert_eq!(report.kernels, vec![resources("first", 255, 8, 4, 12), resources("second", 32, 0, 0, 0)]);
        let callee =
            FunctionResources { name: "_Z6calleei".into(), stack_bytes: 16, spill_store_bytes: 0, spill_load_bytes: 4 };
        assert_eq!(report.functions, vec![callee]);
        // A kernel with no register line is an error, not a kernel with 0 registers.
        let cut = &log[..log.find("Used 32").unwrap()];
        assert!(parse_ptxas_report(cut).unwrap_err().contains("second"));
    }

    #[test]
    fn only_a_compile_that_must_run_turns_nvrtcs_own_cache_off() {
        let compiler = |nvrtc_version| KernelCompiler {
            arch: "sm_90".into(),
            nvrtc_version,
            cache_dir: None,
            nvrtc_cache: true,
            halves: HalfTypes::Both,
            enabled: true,
        };
        let no_cache = |c: &KernelCompiler| c.options("k", "sm_90", &[]).iter().any(|o| o == "--no-cache");
        assert!(!no_cache(&compiler((13, 0))), "a normal compile may use NVRTC's cache");
        assert!(no_cache(&compiler((13, 0)).uncached()), "the cold start must really compile");
        assert!(no_cache(&compiler((12, 9)).uncached()));
        // NVRTC before 12.9 has neither the cache nor the option (it would refuse it).
        assert!(!no_cache(&compiler((12, 8)).uncached()));
        let options = compiler((13, 0)).uncached().options("k", "sm_90", &["-v"]);
        assert_eq!(options.last().map(String::as_str), Some("--gpu-architecture=sm_90"));
        assert!(options.iter().any(|o| o == "-v") && options.iter().any(|o| o == "-std=c++17"));
    }

    #[test]
    fn a_compile_for_one_16_bit_type_has_that_types_kernels_only() {
        assert_eq!(HalfTypes::for_precision(Precision::Bf16), HalfTypes::Bf16);
        assert_eq!(HalfTypes::for_precision(Precision::F16), HalfTypes::F16);
        assert_eq!(HalfTypes::for_precision(Precision::F32), HalfTypes::Neither);
        let names = ["conv2d_mma_gather_f32_bf16_f32", "conv2d_mma_f16_f16_f16", "attention_mma_bf16_64", "peak"];
        let kept = |h: HalfTypes| names.iter().filter(|n| h.instantiates(n)).copied().collect::<Vec<_>>();
        assert_eq!(kept(HalfTypes::Both), names);
        assert_eq!(kept(HalfTypes::Bf16), ["conv2d_mma_gather_f32_bf16_f32", "attention_mma_bf16_64", "peak"]);
        assert_eq!(kept(HalfTypes::F16), ["conv2d_mma_f16_f16_f16", "peak"]);
        assert_eq!(kept(HalfTypes::Neither), ["peak"]);
        // The defines go to the files that stamp per 16-bit type only: the others compile (and are
        // cached) once for every precision.
        let bf16_only = KernelCompiler::disabled("sm_90").for_halves(HalfTypes::Bf16);
        let guarded = "#if KERNELS_BF16\n#endif";
        assert!(bf16_only.options(guarded, "sm_90", &[]).iter().any(|o| o == "-DKERNELS_F16=0"));
        assert!(!bf16_only.options("plain", "sm_90", &[]).iter().any(|o| o.starts_with("-D")));
        let both = KernelCompiler::disabled("sm_90");
        assert_eq!(
            bf16_only.cache_key("a.cu", "plain", ImageKind::Ptx),
            both.cache_key("a.cu", "plain", ImageKind::Ptx)
        );
        assert_ne!(
            bf16_only.cache_key("a.cu", guarded, ImageKind::Ptx),
            both.cache_key("a.cu", guarded, ImageKind::Ptx)
        );
    }

    #[test]
    fn fnv128_known_value() {
        // FNV-1a 128 of the empty string is the offset basis; of "a" a fixed value.
        let mut h = Fnv128::new();
        assert_eq!(h.finish(), 0x6c62272e07bb014262b821756295c58d);
        h.write(b"a");
        assert_eq!(h.finish(), 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
