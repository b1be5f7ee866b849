//! The driver layer: the only code of the CUDA path that differs between a real GPU and the PTX
//! emulator. The CUDA backend (planning, launch configuration, argument packing) is written once
//! over `dyn Driver`; `cuda` implements it with cudarc (driver API, loaded dynamically) and
//! `emulated` with the project's PTX emulator, which runs the same PTX NVRTC gives a GPU.
//!
//! The model is one in-order stream per driver: copies, memsets and launches run in the order
//! they are issued. Errors of asynchronous work (a kernel fault, a sanitizer report) are stored
//! and returned by the next `synchronize`, as on a GPU; argument and configuration errors the
//! driver can see at launch time are returned by `launch` itself.
//!
//! Handles (`Module`, `Function`, `Event`, `Graph`) are small copyable ids into tables each
//! implementation keeps; device memory is named by its 64-bit device address.

pub mod cuda;
pub mod emulated;
pub mod launch_model;
pub mod nvtx;
pub mod sizing;

/// A device address (what a kernel's pointer parameter holds).
pub type DevicePtr = u64;

/// What the driver can say about its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// e.g. "NVIDIA H200" or "PTX emulator (sm_80, 16 SMs, 2 threads)".
    pub name: String,
    /// Compute capability (major, minor): the `sm_XY` NVRTC compiles for.
    pub compute_capability: (u32, u32),
    pub total_memory: usize,
    pub multiprocessors: u32,
    /// Shared memory one block may use with the opt-in attribute (bytes).
    pub max_shared_per_block: usize,
    pub max_threads_per_block: u32,
}

impl DeviceInfo {
    /// The NVRTC architecture flag value for this device, e.g. "sm_90".
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// A compiled module as handed to `load_module`.
#[derive(Clone, Copy, Debug)]
pub enum ModuleImage<'a> {
    /// PTX text, as NVRTC emits it (the emulator's only input; a GPU JIT-compiles it).
    Ptx(&'a str),
    /// A cubin for the device's exact architecture (GPU only).
    Cubin(&'a [u8]),
}

/// Grid and block dimensions of a launch, and the dynamic shared memory it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Self { grid: [blocks, 1, 1], block: [threads, 1, 1], dynamic_shared_bytes: 0 }
    }
}

/// Kernel arguments packed in the order of the `.entry`'s `.param`s, each as its bytes
/// (little-endian, the size of the parameter). The driver checks count and sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelArgs {
    params: Vec<Vec<u8>>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ptr(mut self, p: DevicePtr) -> Self {
        self.params.push(p.to_le_bytes().to_vec());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.params.push(v.to_le_bytes().to_vec());
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.params.push(v.to_le_bytes().to_vec());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.params.push(v.to_le_bytes().to_vec());
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.params.push(v.to_le_bytes().to_vec());
        self
    }
    /// A by-value struct parameter: its bytes exactly as the kernel's C++ struct lays them out.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.params.push(b.to_vec());
        self
    }
    pub fn params(&self) -> &[Vec<u8>] {
        &self.params
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Module(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Function(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Graph(pub u32);

/// What can go wrong below the backend. Messages name the kernel, the resource and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// The driver library, NVRTC or a device is missing, or the device is unusable.
    #[error("{0}")]
    Unavailable(String),
    #[error("device out of memory: {requested} bytes requested, {free} bytes free")]
    OutOfMemory { requested: usize, free: usize },
    /// A launch or call the driver refuses (wrong argument count or size, block over the limit,
    /// too much shared memory, unknown function, bad pointer), with the driver's reason.
    #[error("{0}")]
    InvalidValue(String),
    /// A module that does not load (PTX that does not parse, an instruction the emulator lacks).
    #[error("module load failed: {0}")]
    ModuleLoad(String),
    /// A kernel that faulted while running (on the emulator: a sanitizer report).
    #[error("kernel {kernel}: {report}")]
    KernelFault { kernel: String, report: String },
    /// Any other error code of the driver, with its name.
    #[error("CUDA driver: {0}")]
    Other(String),
}

pub type DriverResult<T> = std::result::Result<T, DriverError>;

/// The device interface of the CUDA backend. Implemented by cudarc on a GPU and by the PTX emulator.
pub trait Driver: Send + Sync {
    fn info(&self) -> &DeviceInfo;
    /// Bytes free for new allocations now.
    fn free_memory(&self) -> DriverResult<usize>;

    // ---- memory ----
    /// A new allocation of `bytes` bytes (contents undefined: the emulator's initcheck tracks it),
    /// aligned to at least 256 bytes.
    fn alloc(&self, bytes: usize) -> DriverResult<DevicePtr>;
    fn free(&self, ptr: DevicePtr) -> DriverResult<()>;
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> DriverResult<()>;
    /// Waits for the work before it, like `cuMemcpyDtoH`.
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> DriverResult<()>;
    fn copy_device_to_device(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> DriverResult<()>;
    /// `count` 32-bit words at `dst` set to `value`.
    fn memset_u32(&self, dst: DevicePtr, value: u32, count: usize) -> DriverResult<()>;

    // ---- code ----
    fn load_module(&self, image: ModuleImage<'_>) -> DriverResult<Module>;
    fn function(&self, module: Module, name: &str) -> DriverResult<Function>;
    fn launch(&self, function: Function, config: LaunchConfig, args: &KernelArgs) -> DriverResult<()>;
    /// Waits for all issued work; returns the first stored error of it.
    fn synchronize(&self) -> DriverResult<()>;

    // ---- timing ----
    /// An event recorded at this point of the stream.
    fn record_event(&self) -> DriverResult<Event>;
    /// Milliseconds between two recorded events (after a synchronize).
    fn elapsed_ms(&self, start: Event, end: Event) -> DriverResult<f32>;
    /// Frees an event (a sampler records one per step: they must not pile up over an attack).
    fn destroy_event(&self, event: Event) -> DriverResult<()>;

    // ---- graphs ----
    /// From here to `end_capture`, launches, device-to-device copies and memsets are recorded,
    /// not run (host copies inside a capture are an error).
    fn begin_capture(&self) -> DriverResult<()>;
    fn end_capture(&self) -> DriverResult<Graph>;
    /// Runs a recorded sequence again, with the pointers and arguments it was recorded with.
    fn replay(&self, graph: Graph) -> DriverResult<()>;
    /// Frees a recorded sequence (replays already issued still run); the handle is dead after.
    fn destroy_graph(&self, graph: Graph) -> DriverResult<()>;
}
