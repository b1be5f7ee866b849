//! Shared by the emulator's tests: NVRTC compilation of CUDA C++ test kernels to PTX.
#![allow(dead_code)]

/// PTX for `src` compiled by NVRTC for sm_80, or None when NVRTC is not installed (then the
/// caller skips). Under CI=true a missing NVRTC is a failure: these tests never skip in CI.
pub fn compile(src: &str) -> Option<String> {
    compile_for(src, "sm_80")
}

pub fn compile_for(src: &str, arch: &'static str) -> Option<String> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("NVRTC not found under CI=true (set LD_LIBRARY_PATH to the nvidia/cu13/lib folder)");
        }
        println!("skipped: NVRTC not found");
        return None;
    }
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
        Ok(ptx) => Some(ptx.to_src()),
        Err(e) => panic!("NVRTC failed: {e:?}"),
    }
}

use ptx_emulator::{launch, Dims, GlobalMemory, LaunchError, LaunchStats, Module, Report};

/// Device memory and modules for a test.
pub struct Dev {
    pub mem: GlobalMemory,
}

impl Default for Dev {
    fn default() -> Self {
        Self::new()
    }
}

impl Dev {
    pub fn new() -> Self {
        Dev { mem: GlobalMemory::new() }
    }
    pub fn load(&mut self, src: &str) -> Option<Module> {
        self.load_with_ptx(src).map(|(m, _)| m)
    }
    pub fn load_with_ptx(&mut self, src: &str) -> Option<(Module, String)> {
        let ptx = compile(src)?;
        let m = Module::load(&ptx, &mut self.mem).unwrap_or_else(|e| panic!("load failed: {e}\n{ptx}"));
        Some((m, ptx))
    }
    pub fn upload<T: Copy>(&mut self, v: &[T]) -> u64 {
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) };
        let p = self.mem.alloc(bytes.len() as u64);
        self.mem.write(p, bytes).unwrap();
        p
    }
    /// An allocation of `n` elements, written with zeros (so initcheck stays quiet).
    pub fn zeros<T: Copy + Default>(&mut self, n: usize) -> u64 {
        self.upload(&vec![T::default(); n])
    }
    pub fn download<T: Copy + Default>(&self, p: u64, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
        self.mem.read(p, bytes).unwrap();
        v
    }
    pub fn try_run(
        &self,
        m: &Module,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared: u32,
        args: &[Vec<u8>],
    ) -> Result<LaunchStats, LaunchError> {
        let f = m.kernel(name).unwrap_or_else(|| panic!("no kernel {name}"));
        launch(m, f, &Dims { grid, block, dynamic_shared }, args, &self.mem)
    }
    pub fn run(&self, m: &Module, name: &str, grid: u32, block: u32, args: &[Vec<u8>]) -> LaunchStats {
        self.try_run(m, name, [grid, 1, 1], [block, 1, 1], 0, args).unwrap_or_else(|e| panic!("{e}"))
    }
    /// The report a launch must produce.
    pub fn report(&self, m: &Module, name: &str, grid: u32, block: u32, args: &[Vec<u8>]) -> Report {
        match self.try_run(m, name, [grid, 1, 1], [block, 1, 1], 0, args) {
            Err(LaunchError::Report(r)) => *r,
            other => panic!("expected a report from {name}, got {other:?}"),
        }
    }
}

pub fn p(x: u64) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}
pub fn i(x: i32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}
pub fn f(x: f32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

/// A small deterministic generator for test inputs.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u32() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// The 1-based numbers of the PTX lines containing `needle`.
pub fn lines_with(ptx: &str, needle: &str) -> Vec<u32> {
    let v: Vec<u32> = ptx.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i as u32 + 1).collect();
    assert!(!v.is_empty(), "'{needle}' not in PTX:\n{ptx}");
    v
}

/// Like `lines_with`, within the body of `.entry kernel` only.
pub fn lines_in(ptx: &str, kernel: &str, needle: &str) -> Vec<u32> {
    let start = ptx.lines().position(|l| l.contains(".entry") && l.contains(&format!(" {kernel}("))).expect("kernel");
    let v: Vec<u32> = ptx
        .lines()
        .enumerate()
        .skip(start)
        .take_while(|(i, l)| *i == start || !l.contains(".entry"))
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    assert!(!v.is_empty(), "'{needle}' not in kernel {kernel}:\n{ptx}");
    v
}
