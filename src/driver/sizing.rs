//! A driver that holds no memory and runs nothing: it hands out addresses and counts the bytes
//! behind them. The CUDA backend over it (`CudaBackend::sizing`) loads networks and makes plans
//! exactly as on a GPU, allocation for allocation, so the device memory of any plan (an attack's
//! 100-step tape at batch 64, say) is known without a GPU and without allocating it.
//!
//! Data sent to it is dropped; anything that needs data back or code run (a download, a kernel
//! launch, a graph) is an error that says so.
use std::collections::HashMap;
use std::sync::Mutex;

use super::{DeviceInfo, DevicePtr, Driver, DriverError, DriverResult, Event, Function, Graph, KernelArgs};
use super::{LaunchConfig, Module, ModuleImage};

/// Allocation alignment, as `Driver::alloc` promises (and cuMemAlloc gives).
const ALIGNMENT: u64 = 256;

pub struct SizingDriver {
    info: DeviceInfo,
    state: Mutex<Allocations>,
}

#[derive(Default)]
struct Allocations {
    next: DevicePtr,
    sizes: HashMap<DevicePtr, usize>,
}

impl SizingDriver {
    /// A device of compute capability `compute_capability` with unbounded memory (the point is
    /// to learn how much is needed).
    pub fn new(compute_capability: (u32, u32)) -> Self {
        Self {
            info: DeviceInfo {
                name: format!(
                    "plan sizing (sm_{}{}, no memory held, no kernels run)",
                    compute_capability.0, compute_capability.1
                ),
                compute_capability,
                total_memory: usize::MAX,
                multiprocessors: 1,
                max_shared_per_block: 0,
                max_threads_per_block: 1024,
            },
            state: Mutex::new(Allocations { next: ALIGNMENT, sizes: HashMap::new() }),
        }
    }

    fn refuse<T>(&self, what: &str) -> DriverResult<T> {
        Err(DriverError::Unavailable(format!(
            "{what}: the plan-sizing driver only counts allocations (it holds no data and runs no kernels)"
        )))
    }

    fn check(&self, ptr: DevicePtr, bytes: usize, what: &str) -> DriverResult<()> {
        let s = self.state.lock().unwrap();
        // Addresses inside an allocation are valid too (views): find the one that holds `ptr`.
        let inside = s.sizes.iter().any(|(&start, &size)| ptr >= start && ptr + bytes as u64 <= start + size as u64);
        if inside {
            Ok(())
        } else {
            Err(DriverError::InvalidValue(format!("{what}: {bytes} bytes at {ptr:#x} are not inside an allocation")))
        }
    }
}

impl Driver for SizingDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn free_memory(&self) -> DriverResult<usize> {
        Ok(usize::MAX)
    }
    fn alloc(&self, bytes: usize) -> DriverResult<DevicePtr> {
        let mut s = self.state.lock().unwrap();
        let ptr = s.next;
        s.next += (bytes as u64).max(1).div_ceil(ALIGNMENT) * ALIGNMENT;
        s.sizes.insert(ptr, bytes);
        Ok(ptr)
    }
    fn free(&self, ptr: DevicePtr) -> DriverResult<()> {
        match self.state.lock().unwrap().sizes.remove(&ptr) {
            Some(_) => Ok(()),
            None => Err(DriverError::InvalidValue(format!("free of {ptr:#x}, which is not an allocation"))),
        }
    }
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> DriverResult<()> {
        self.check(dst, src.len(), "host-to-device copy")
    }
    fn copy_to_host(&self, _src: DevicePtr, _dst: &mut [u8]) -> DriverResult<()> {
        self.refuse("device-to-host copy")
    }
    fn copy_device_to_device(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> DriverResult<()> {
        self.check(dst, bytes, "device-to-device copy")?;
        self.check(src, bytes, "device-to-device copy")
    }
    fn memset_u32(&self, dst: DevicePtr, _value: u32, count: usize) -> DriverResult<()> {
        self.check(dst, 4 * count, "memset")
    }
    fn load_module(&self, _image: ModuleImage<'_>) -> DriverResult<Module> {
        self.refuse("module load")
    }
    fn function(&self, _module: Module, name: &str) -> DriverResult<Function> {
        self.refuse(&format!("kernel {name}"))
    }
    fn launch(&self, _function: Function, _config: LaunchConfig, _args: &KernelArgs) -> DriverResult<()> {
        self.refuse("kernel launch")
    }
    fn synchronize(&self) -> DriverResult<()> {
        Ok(())
    }
    fn record_event(&self) -> DriverResult<Event> {
        self.refuse("event")
    }
    fn elapsed_ms(&self, _start: Event, _end: Event) -> DriverResult<f32> {
        self.refuse("event timing")
    }
    fn destroy_event(&self, _event: Event) -> DriverResult<()> {
        self.refuse("event")
    }
    fn begin_capture(&self) -> DriverResult<()> {
        self.refuse("graph capture")
    }
    fn end_capture(&self) -> DriverResult<Graph> {
        self.refuse("graph capture")
    }
    fn replay(&self, _graph: Graph) -> DriverResult<()> {
        self.refuse("graph replay")
    }
    fn destroy_graph(&self, _graph: Graph) -> DriverResult<()> {
        self.refuse("graph")
    }
}
