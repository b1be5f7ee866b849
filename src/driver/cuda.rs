//! The `Driver` on a real GPU: the CUDA driver API through cudarc's thin `result`/`sys` layers,
//! with libcuda loaded at run time (no CUDA toolkit to build).
//!
//! cudarc panics when libcuda is missing, so `CudaDriver::new` probes for the library first and
//! turns every way of not having a usable GPU into one `DriverError::Unavailable` naming it: no
//! driver library, no device, a device older than sm_80. One stream per driver; the primary
//! context of the device is made current on each calling thread.
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::driver::{result, sys};

use super::{
    DeviceInfo, DevicePtr, Driver, DriverError, DriverResult, Event, Function, Graph, KernelArgs, LaunchConfig, Module,
    ModuleImage,
};

/// The oldest architecture the kernels are written for (mma.sync bf16, cp.async).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);

/// Whether the CUDA driver library can be loaded (without panicking when it cannot).
pub fn driver_library_present() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc would use.
    unsafe { sys::is_culib_present() }
}

fn cuda_error(what: &str, e: result::DriverError) -> DriverError {
    match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            let free = result::mem_get_info().map(|(free, _)| free).unwrap_or(0);
            DriverError::OutOfMemory { requested: 0, free }
        }
        sys::CUresult::CUDA_ERROR_INVALID_VALUE | sys::CUresult::CUDA_ERROR_INVALID_HANDLE => {
            DriverError::InvalidValue(format!("{what}: {:?}", e.0))
        }
        sys::CUresult::CUDA_ERROR_INVALID_PTX
        | sys::CUresult::CUDA_ERROR_INVALID_IMAGE
        | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => DriverError::ModuleLoad(format!("{what}: {:?}", e.0)),
        _ => DriverError::Other(format!("{what}: {:?}", e.0)),
    }
}

struct State {
    modules: Vec<sys::CUmodule>,
    functions: Vec<(sys::CUfunction, String)>,
    /// Recorded events; None once destroyed.
    events: Vec<Option<sys::CUevent>>,
    /// Instantiated graphs; None once destroyed.
    graphs: Vec<Option<sys::CUgraphExec>>,
    capturing: bool,
}

pub struct CudaDriver {
    info: DeviceInfo,
    device: sys::CUdevice,
    context: sys::CUcontext,
    stream: sys::CUstream,
    state: Mutex<State>,
}

// SAFETY: the driver API's handles may be used from any thread once the context is current there
// (every method makes it current first); the tables are behind a mutex.
unsafe impl Send for CudaDriver {}
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    /// The GPU of ordinal `ordinal`, or `Unavailable` saying why there is none to use.
    pub fn new(ordinal: usize) -> DriverResult<Self> {
        if !driver_library_present() {
            return Err(DriverError::Unavailable(
                "no CUDA driver: libcuda.so was not found (no NVIDIA driver installed on this machine)".into(),
            ));
        }
        let unavailable = |what: &str, e: result::DriverError| DriverError::Unavailable(format!("{what}: {:?}", e.0));
        result::init().map_err(|e| unavailable("the CUDA driver failed to initialise", e))?;
        let count = result::device::get_count().map_err(|e| unavailable("cannot count CUDA devices", e))?;
        if count <= 0 {
            return Err(DriverError::Unavailable("the CUDA driver reports no device".into()));
        }
        if ordinal >= count as usize {
            return Err(DriverError::Unavailable(format!("no CUDA device {ordinal} ({count} present)")));
        }
        let device = result::device::get(ordinal as i32).map_err(|e| unavailable("cuDeviceGet", e))?;
        use sys::CUdevice_attribute::*;
        // SAFETY: a device handle from cuDeviceGet.
        let attribute =
            |a| unsafe { result::device::get_attribute(device, a) }.map_err(|e| unavailable("attribute", e));
        let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32;
        let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32;
        let name = result::device::get_name(device).map_err(|e| unavailable("cuDeviceGetName", e))?;
        if (major, minor) < MIN_COMPUTE_CAPABILITY {
            return Err(DriverError::Unavailable(format!(
                "{name} is sm_{major}{minor}; the CUDA kernels need sm_{}{} (Ampere) or newer",
                MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            )));
        }
        let info = DeviceInfo {
            name,
            compute_capability: (major, minor),
            // SAFETY: as above.
            total_memory: unsafe { result::device::total_mem(device) }.map_err(|e| unavailable("total memory", e))?,
            multiprocessors: attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            max_shared_per_block: attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
            max_threads_per_block: attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)? as u32,
        };
        // SAFETY: the primary context of a valid device, made current before the stream is created.
        let context = unsafe { result::primary_ctx::retain(device) }.map_err(|e| unavailable("context", e))?;
        unsafe { result::ctx::set_current(context) }.map_err(|e| unavailable("context", e))?;
        let stream =
            result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| unavailable("stream", e))?;
        let state = State {
            modules: Vec::new(),
            functions: Vec::new(),
            events: Vec::new(),
            graphs: Vec::new(),
            capturing: false,
        };
        Ok(Self { info, device, context, stream, state: Mutex::new(state) })
    }

    fn current(&self) -> DriverResult<()> {
        // SAFETY: the context was retained in `new` and is released only in `drop`.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| cuda_error("cuCtxSetCurrent", e))
    }

    fn refuse_during_capture(&self, what: &str) -> DriverResult<()> {
        if self.state.lock().unwrap().capturing {
            return Err(DriverError::InvalidValue(format!("{what} inside a graph capture")));
        }
        Ok(())
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap();
        // SAFETY: handles created by this driver, destroyed once; errors at teardown are moot.
        unsafe {
            let _ = result::ctx::set_current(self.context);
            let _ = result::stream::synchronize(self.stream);
            for &g in state.graphs.iter().flatten() {
                let _ = result::graph::exec_destroy(g);
            }
            for &e in state.events.iter().flatten() {
                let _ = result::event::destroy(e);
            }
            for &m in &state.modules {
                let _ = result::module::unload(m);
            }
            let _ = result::stream::destroy(self.stream);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}

impl Driver for CudaDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn free_memory(&self) -> DriverResult<usize> {
        self.current()?;
        result::mem_get_info().map(|(free, _)| free).map_err(|e| cuda_error("cuMemGetInfo", e))
    }

    fn alloc(&self, bytes: usize) -> DriverResult<DevicePtr> {
        self.current()?;
        self.refuse_during_capture("an allocation")?;
        // SAFETY: a plain allocation in the current context.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| match cuda_error("cuMemAlloc", e) {
            DriverError::OutOfMemory { free, .. } => DriverError::OutOfMemory { requested: bytes, free },
            other => other,
        })
    }

    fn free(&self, ptr: DevicePtr) -> DriverResult<()> {
        self.current()?;
        // SAFETY: pointers come from `alloc` and are freed once (CudaTensor's drop).
        unsafe { result::free_sync(ptr) }.map_err(|e| cuda_error("cuMemFree", e))
    }

    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> DriverResult<()> {
        self.current()?;
        self.refuse_during_capture("a host-to-device copy")?;
        // SAFETY: ordered on the stream, and waited for before `src` can go away.
        unsafe {
            result::memcpy_htod_async(dst, src, self.stream).map_err(|e| cuda_error("cuMemcpyHtoD", e))?;
            result::stream::synchronize(self.stream).map_err(|e| cuda_error("cuMemcpyHtoD", e))
        }
    }

    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> DriverResult<()> {
        self.current()?;
        self.refuse_during_capture("a device-to-host copy")?;
        // SAFETY: as above.
        unsafe {
            result::memcpy_dtoh_async(dst, src, self.stream).map_err(|e| cuda_error("cuMemcpyDtoH", e))?;
            result::stream::synchronize(self.stream).map_err(|e| cuda_error("cuMemcpyDtoH", e))
        }
    }

    fn copy_device_to_device(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> DriverResult<()> {
        self.current()?;
        // SAFETY: device addresses of live allocations, ordered on the stream.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream) }.map_err(|e| cuda_error("cuMemcpyDtoD", e))
    }

    fn memset_u32(&self, dst: DevicePtr, value: u32, count: usize) -> DriverResult<()> {
        self.current()?;
        // SAFETY: as above.
        unsafe { sys::cuMemsetD32Async(dst, value, count, self.stream).result() }
            .map_err(|e| cuda_error("cuMemsetD32", e))
    }

    fn load_module(&self, image: ModuleImage<'_>) -> DriverResult<Module> {
        self.current()?;
        let module = match image {
            ModuleImage::Ptx(text) => {
                let text = CString::new(text).map_err(|_| DriverError::ModuleLoad("PTX with a NUL byte".into()))?;
                // SAFETY: a NUL-terminated PTX string that outlives the call.
                unsafe { result::module::load_data(text.as_ptr() as *const c_void) }
            }
            // SAFETY: a cubin image as NVRTC produced it.
            ModuleImage::Cubin(bytes) => unsafe { result::module::load_data(bytes.as_ptr() as *const c_void) },
        }
        .map_err(|e| cuda_error("cuModuleLoadData", e))?;
        let mut state = self.state.lock().unwrap();
        state.modules.push(module);
        Ok(Module(state.modules.len() as u32 - 1))
    }

    fn function(&self, module: Module, name: &str) -> DriverResult<Function> {
        self.current()?;
        let mut state = self.state.lock().unwrap();
        let &m = state
            .modules
            .get(module.0 as usize)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown module {}", module.0)))?;
        let c_name = CString::new(name).map_err(|_| DriverError::InvalidValue(format!("kernel name {name:?}")))?;
        // SAFETY: a module loaded by this driver.
        let f = unsafe { result::module::get_function(m, c_name) }
            .map_err(|e| DriverError::InvalidValue(format!("no kernel `{name}` in module {}: {:?}", module.0, e.0)))?;
        state.functions.push((f, name.to_string()));
        Ok(Function(state.functions.len() as u32 - 1))
    }

    fn launch(&self, function: Function, config: LaunchConfig, args: &KernelArgs) -> DriverResult<()> {
        self.current()?;
        let (f, name) = {
            let state = self.state.lock().unwrap();
            state
                .functions
                .get(function.0 as usize)
                .cloned()
                .ok_or_else(|| DriverError::InvalidValue(format!("unknown function {}", function.0)))?
        };
        let threads: u32 = config.block.iter().product();
        if threads == 0 || threads > self.info.max_threads_per_block {
            return Err(DriverError::InvalidValue(format!(
                "{name}: block {:?} has {threads} threads (1..={})",
                config.block, self.info.max_threads_per_block
            )));
        }
        if config.dynamic_shared_bytes as usize > self.info.max_shared_per_block {
            return Err(DriverError::InvalidValue(format!(
                "{name}: {} bytes of dynamic shared memory (at most {})",
                config.dynamic_shared_bytes, self.info.max_shared_per_block
            )));
        }
        if config.dynamic_shared_bytes > 48 * 1024 {
            // SAFETY: a function of this context; the opt-in above the default 48 KiB.
            unsafe {
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    config.dynamic_shared_bytes as i32,
                )
                .result()
                .map_err(|e| cuda_error(&name, e))?;
            }
        }
        // cuLaunchKernel takes one pointer per parameter, to its value; the driver copies them.
        let mut values: Vec<Vec<u8>> = args.params().to_vec();
        let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        // SAFETY: parameter values live until the call returns; the kernel's argument layout is
        // what KernelArgs packed (checked against the PTX by the emulator in CI).
        unsafe {
            result::launch_kernel(
                f,
                (gx, gy, gz),
                (bx, by, bz),
                config.dynamic_shared_bytes,
                self.stream,
                &mut pointers,
            )
        }
        .map_err(|e| cuda_error(&format!("launch of {name}"), e))
    }

    fn synchronize(&self) -> DriverResult<()> {
        self.current()?;
        // SAFETY: the driver's own stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
            | sys::CUresult::CUDA_ERROR_MISALIGNED_ADDRESS
            | sys::CUresult::CUDA_ERROR_LAUNCH_FAILED
            | sys::CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | sys::CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR => {
                DriverError::KernelFault { kernel: "a kernel of this stream".into(), report: format!("{:?}", e.0) }
            }
            _ => cuda_error("cuStreamSynchronize", e),
        })
    }

    fn record_event(&self) -> DriverResult<Event> {
        self.current()?;
        let event =
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| cuda_error("cuEventCreate", e))?;
        // SAFETY: a new event on the driver's stream.
        unsafe { result::event::record(event, self.stream) }.map_err(|e| cuda_error("cuEventRecord", e))?;
        let mut state = self.state.lock().unwrap();
        state.events.push(Some(event));
        Ok(Event(state.events.len() as u32 - 1))
    }

    fn elapsed_ms(&self, start: Event, end: Event) -> DriverResult<f32> {
        self.current()?;
        let state = self.state.lock().unwrap();
        let get = |e: Event| {
            state
                .events
                .get(e.0 as usize)
                .copied()
                .flatten()
                .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed event {}", e.0)))
        };
        let (a, b) = (get(start)?, get(end)?);
        // SAFETY: events recorded on this driver's stream.
        unsafe {
            result::event::synchronize(b).map_err(|e| cuda_error("cuEventSynchronize", e))?;
            result::event::elapsed(a, b).map_err(|e| cuda_error("cuEventElapsedTime", e))
        }
    }

    fn destroy_event(&self, event: Event) -> DriverResult<()> {
        self.current()?;
        let e = self
            .state
            .lock()
            .unwrap()
            .events
            .get_mut(event.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed event {}", event.0)))?;
        // SAFETY: an event of this driver, destroyed once (its slot is now empty); a record still
        // pending completes first, as cuEventDestroy documents.
        unsafe { result::event::destroy(e) }.map_err(|e| cuda_error("cuEventDestroy", e))
    }

    fn begin_capture(&self) -> DriverResult<()> {
        self.current()?;
        let mut state = self.state.lock().unwrap();
        if state.capturing {
            return Err(DriverError::InvalidValue("a capture is already in progress".into()));
        }
        // SAFETY: the driver's own stream; thread-local mode, so other threads are not affected.
        unsafe {
            result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        }
        .map_err(|e| cuda_error("cuStreamBeginCapture", e))?;
        state.capturing = true;
        Ok(())
    }

    fn end_capture(&self) -> DriverResult<Graph> {
        self.current()?;
        let mut state = self.state.lock().unwrap();
        if !state.capturing {
            return Err(DriverError::InvalidValue("end_capture without begin_capture".into()));
        }
        state.capturing = false;
        // SAFETY: the capture begun on this stream; the graph is destroyed once instantiated.
        let exec = unsafe {
            let graph = result::stream::end_capture(self.stream).map_err(|e| cuda_error("cuStreamEndCapture", e))?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            exec.map_err(|e| cuda_error("cuGraphInstantiate", e))?
        };
        state.graphs.push(Some(exec));
        Ok(Graph(state.graphs.len() as u32 - 1))
    }

    fn replay(&self, graph: Graph) -> DriverResult<()> {
        self.current()?;
        let exec = {
            let state = self.state.lock().unwrap();
            state
                .graphs
                .get(graph.0 as usize)
                .copied()
                .flatten()
                .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed graph {}", graph.0)))?
        };
        // SAFETY: an instantiated graph of this driver, launched on its stream.
        unsafe { result::graph::launch(exec, self.stream) }.map_err(|e| cuda_error("cuGraphLaunch", e))
    }

    fn destroy_graph(&self, graph: Graph) -> DriverResult<()> {
        self.current()?;
        let exec = self
            .state
            .lock()
            .unwrap()
            .graphs
            .get_mut(graph.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed graph {}", graph.0)))?;
        // SAFETY: an instantiated graph of this driver, destroyed once (its slot is now empty);
        // launches already issued complete first, as cuGraphExecDestroy documents.
        unsafe { result::graph::exec_destroy(exec) }.map_err(|e| cuda_error("cuGraphExecDestroy", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Here (no GPU): the probe answers, and `new` is a clear error, not a panic. On a GPU machine
    /// the driver opens and describes its device.
    #[test]
    fn probe_gives_a_clear_answer() {
        match CudaDriver::new(0) {
            Ok(driver) => {
                let info = driver.info();
                assert!(info.compute_capability >= MIN_COMPUTE_CAPABILITY && info.multiprocessors > 0);
                println!("CUDA device: {info:?}");
            }
            Err(DriverError::Unavailable(reason)) => {
                assert!(!reason.is_empty());
                println!("skipped: no CUDA device ({reason})");
            }
            Err(other) => panic!("a missing GPU must be `Unavailable`, got {other:?}"),
        }
        let _ = driver_library_present();
    }
}
