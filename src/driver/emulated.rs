//! The `Driver` implemented by the project's PTX emulator (crate `ptx_emulator`): the CUDA
//! backend's kernels run on the CPU with every access and barrier checked. A thin adapter:
//! launches run when issued (the stream is in order, so this is what a GPU would compute), and
//! their errors are stored and returned by the next `synchronize` (or host copy), as on a GPU.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use ptx_emulator::{Dims, GlobalMemory, GlobalTraffic, LaunchError, SmWork};

use super::launch_model::{blocks_per_sm, launch_time, LaunchRecord, LaunchTime};
use super::*;

/// Device memory the emulator offers (host memory backs what is allocated).
const EMULATED_MEMORY: usize = 16 << 30;
/// The multiprocessor count the emulator reports, whatever the host's cores: a Jetson Orin's (16
/// SMs, the smallest GPU the project targets), so launch planning that reads it (split-K, the
/// grid-stride kernels' caps, GroupNorm's chunks) makes the same choices on every machine that runs
/// the tests, and the small-GPU paths are the ones checked. Blocks still run on all host cores.
pub const EMULATED_MULTIPROCESSORS: u32 = 16;

enum Work {
    Launch { function: Function, config: LaunchConfig, args: KernelArgs },
    Copy { dst: DevicePtr, src: DevicePtr, bytes: usize },
    Memset { dst: DevicePtr, value: u32, count: usize },
}

struct State {
    mem: GlobalMemory,
    modules: Vec<ptx_emulator::Module>,
    functions: Vec<(usize, std::sync::Arc<ptx_emulator::Function>)>,
    /// Event times; None once destroyed.
    events: Vec<Option<Instant>>,
    /// Recorded sequences; None once destroyed.
    graphs: Vec<Option<Vec<Work>>>,
    capture: Option<Vec<Work>>,
    /// The first error of asynchronous work, returned by the next synchronize.
    pending: Option<DriverError>,
    thread_instructions: u64,
    kernels: BTreeMap<String, KernelTotals>,
    /// Memsets and device-to-device copies issued (each a node of its own in a graph, like a launch).
    memsets: u64,
    copies: u64,
    /// The SM count, when every launch runs the latency model.
    timing: Option<u32>,
    /// Each modelled launch, in order (`launch_records`).
    launch_log: Vec<LaunchRecord>,
    /// ptxas's registers a thread, by kernel name, where the model was given them.
    registers: BTreeMap<String, u32>,
    /// Launches, memsets and copies are counted but not run (`EmulatedDriver::hollow`).
    hollow: bool,
}

/// What the launches of one kernel did, summed: the emulator's per-kernel counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTotals {
    pub launches: u64,
    /// Blocks, summed over the launches.
    pub blocks: u64,
    /// Each launch's deepest warp (`LaunchStats::longest_warp`), summed over the launches.
    pub longest_warps: u64,
    /// The launch model's time (`launch_model`), summed over the launches term by term, when the
    /// driver runs it (`EmulatedDriver::timed`); all 0 otherwise.
    pub model: LaunchTime,
    pub thread_instructions: u64,
    /// Global loads and stores in 32-byte sectors per warp-level access (coalescing).
    pub global: GlobalTraffic,
    /// Issue slots, tensor-core instructions and shared-memory wavefronts.
    pub sm: SmWork,
}

pub struct EmulatedDriver {
    info: DeviceInfo,
    state: Mutex<State>,
}

impl Default for EmulatedDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl EmulatedDriver {
    pub fn new() -> Self {
        Self::with_multiprocessors(EMULATED_MULTIPROCESSORS)
    }

    /// An emulator that reports `multiprocessors` SMs, so that launches are planned as for that
    /// GPU (132 for an H200's grids); the tests keep the default.
    pub fn with_multiprocessors(multiprocessors: u32) -> Self {
        let threads = rayon::current_num_threads();
        EmulatedDriver {
            info: DeviceInfo {
                name: format!("PTX emulator (sm_80, {multiprocessors} SMs, {threads} threads)"),
                compute_capability: (8, 0),
                total_memory: EMULATED_MEMORY,
                multiprocessors,
                max_shared_per_block: ptx_emulator::MAX_SHARED_PER_BLOCK as usize,
                max_threads_per_block: ptx_emulator::MAX_THREADS_PER_BLOCK,
            },
            state: Mutex::new(State {
                mem: GlobalMemory::new(),
                modules: Vec::new(),
                functions: Vec::new(),
                events: Vec::new(),
                graphs: Vec::new(),
                capture: None,
                pending: None,
                thread_instructions: 0,
                kernels: BTreeMap::new(),
                memsets: 0,
                copies: 0,
                timing: None,
                launch_log: Vec::new(),
                registers: BTreeMap::new(),
                hollow: false,
            }),
        }
    }

    /// The same driver with the latency model on (`KernelTotals::modelled_cycles`), for the
    /// examples that study small-batch latency (the tests leave it off).
    pub fn timed(self) -> Self {
        self.lock().timing = Some(self.info.multiprocessors);
        self
    }

    /// The same driver with ptxas's register counts (a thread's, by kernel name) for the model's
    /// occupancy (`launch_model::blocks_per_sm`); a kernel not named is limited by threads and
    /// shared memory alone.
    pub fn with_kernel_registers(self, registers: BTreeMap<String, u32>) -> Self {
        self.lock().registers = registers;
        self
    }

    /// The same driver with its launches checked (arguments, dimensions) and counted, and its
    /// memsets and device-to-device copies counted, but none of them run: what is left is the
    /// host's side of issuing work (the backend's checks, planning and argument packing, this
    /// driver's bookkeeping), which examples/host_launch_cost.rs times. Outputs are whatever their
    /// buffers held.
    pub fn hollow(self) -> Self {
        self.lock().hollow = true;
        self
    }

    /// Thread-instructions executed by all launches so far (the emulator's speed measure).
    pub fn thread_instructions(&self) -> u64 {
        self.lock().thread_instructions
    }

    /// Per kernel name, what its launches so far did; `take` clears the counts.
    pub fn kernel_totals(&self, take: bool) -> BTreeMap<String, KernelTotals> {
        let mut state = self.lock();
        if take {
            std::mem::take(&mut state.kernels)
        } else {
            state.kernels.clone()
        }
    }

    /// Every launch the model timed so far, in order; `take` clears the list.
    pub fn launch_records(&self, take: bool) -> Vec<LaunchRecord> {
        let mut state = self.lock();
        if take {
            std::mem::take(&mut state.launch_log)
        } else {
            state.launch_log.clone()
        }
    }

    /// Memsets and device-to-device copies issued so far; `take` clears the counts.
    pub fn memsets_and_copies(&self, take: bool) -> (u64, u64) {
        let mut state = self.lock();
        let counts = (state.memsets, state.copies);
        if take {
            (state.memsets, state.copies) = (0, 0);
        }
        counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn mem_error(e: ptx_emulator::memory::MemError) -> DriverError {
    match e {
        ptx_emulator::memory::MemError::OutOfBounds(s) => DriverError::InvalidValue(s),
        ptx_emulator::memory::MemError::Uninitialized { detail, .. } => DriverError::InvalidValue(detail),
    }
}

impl State {
    fn run(&mut self, work: &Work) {
        if self.pending.is_some() {
            // After a fault the stream does no more work (the error is sticky until reported).
            return;
        }
        let result = match work {
            Work::Launch { function, .. } if self.hollow => {
                let name = &self.functions[function.0 as usize].1.name;
                self.kernels.entry(name.clone()).or_default().launches += 1;
                Ok(())
            }
            Work::Launch { function, config, args } => {
                let module = &self.modules[function_module(&self.functions, *function)];
                let f = &self.functions[function.0 as usize].1;
                let dims = Dims { grid: config.grid, block: config.block, dynamic_shared: config.dynamic_shared_bytes };
                let options = ptx_emulator::LaunchOptions { timing: self.timing.is_some() };
                match ptx_emulator::launch_with(module, f, &dims, args.params(), &self.mem, options) {
                    Ok(stats) => {
                        self.thread_instructions += stats.thread_instructions;
                        let totals = self.kernels.entry(f.name.clone()).or_default();
                        totals.launches += 1;
                        totals.blocks += stats.blocks;
                        totals.longest_warps += stats.longest_warp;
                        if let Some(sms) = self.timing {
                            let threads = dims.block.iter().product::<u32>();
                            let shared = if dims.dynamic_shared > 0 {
                                f.dynamic_shared_offset + dims.dynamic_shared
                            } else {
                                f.static_shared
                            };
                            let blocks_per_sm = blocks_per_sm(threads, shared, self.registers.get(&f.name).copied());
                            let record = LaunchRecord { kernel: f.name.clone(), stats, blocks_per_sm };
                            totals.model.add(&launch_time(&record, sms));
                            self.launch_log.push(record);
                        }
                        totals.thread_instructions += stats.thread_instructions;
                        totals.global.add(&stats.global);
                        totals.sm.add(&stats.sm);
                        Ok(())
                    }
                    Err(LaunchError::Invalid(s)) => Err(DriverError::InvalidValue(s)),
                    Err(LaunchError::Report(r)) => {
                        Err(DriverError::KernelFault { kernel: r.kernel.clone(), report: r.to_string() })
                    }
                }
            }
            Work::Copy { dst, src, bytes } => {
                self.copies += 1;
                if self.hollow {
                    return;
                }
                self.mem.copy(*dst, *src, *bytes as u64).map_err(mem_error)
            }
            Work::Memset { dst, value, count } => {
                self.memsets += 1;
                if self.hollow {
                    return;
                }
                let bytes: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), *count).flatten().collect();
                self.mem.write(*dst, &bytes).map_err(mem_error)
            }
        };
        if let Err(e) = result {
            self.pending = Some(e);
        }
    }

    fn issue(&mut self, work: Work) {
        match &mut self.capture {
            Some(list) => list.push(work),
            None => self.run(&work),
        }
    }

    fn no_capture(&self, what: &str) -> DriverResult<()> {
        if self.capture.is_some() {
            return Err(DriverError::InvalidValue(format!("{what} during graph capture")));
        }
        Ok(())
    }
}

fn function_module(functions: &[(usize, std::sync::Arc<ptx_emulator::Function>)], f: Function) -> usize {
    functions[f.0 as usize].0
}

impl Driver for EmulatedDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn free_memory(&self) -> DriverResult<usize> {
        Ok(EMULATED_MEMORY.saturating_sub(self.lock().mem.used as usize))
    }

    fn alloc(&self, bytes: usize) -> DriverResult<DevicePtr> {
        let mut s = self.lock();
        let free = EMULATED_MEMORY.saturating_sub(s.mem.used as usize);
        if bytes > free {
            return Err(DriverError::OutOfMemory { requested: bytes, free });
        }
        Ok(s.mem.alloc(bytes as u64))
    }

    fn free(&self, ptr: DevicePtr) -> DriverResult<()> {
        self.lock().mem.free(ptr).map_err(DriverError::InvalidValue)
    }

    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> DriverResult<()> {
        let s = self.lock();
        s.no_capture("host-to-device copy")?;
        s.mem.write(dst, src).map_err(mem_error)
    }

    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> DriverResult<()> {
        let mut s = self.lock();
        s.no_capture("device-to-host copy")?;
        if let Some(e) = s.pending.take() {
            return Err(e);
        }
        s.mem.read(src, dst).map_err(mem_error)
    }

    fn copy_device_to_device(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> DriverResult<()> {
        let mut s = self.lock();
        s.mem.find(dst, bytes as u64).map_err(mem_error)?;
        s.mem.find(src, bytes as u64).map_err(mem_error)?;
        s.issue(Work::Copy { dst, src, bytes });
        Ok(())
    }

    fn memset_u32(&self, dst: DevicePtr, value: u32, count: usize) -> DriverResult<()> {
        let mut s = self.lock();
        if !dst.is_multiple_of(4) {
            return Err(DriverError::InvalidValue(format!("memset_u32 at {dst:#x}: not 4-byte aligned")));
        }
        s.mem.find(dst, 4 * count as u64).map_err(mem_error)?;
        s.issue(Work::Memset { dst, value, count });
        Ok(())
    }

    fn load_module(&self, image: ModuleImage<'_>) -> DriverResult<Module> {
        let ModuleImage::Ptx(text) = image else {
            return Err(DriverError::ModuleLoad("the PTX emulator runs PTX only, not cubin".into()));
        };
        let mut s = self.lock();
        let m = ptx_emulator::Module::load(text, &mut s.mem).map_err(|e| DriverError::ModuleLoad(e.to_string()))?;
        s.modules.push(m);
        Ok(Module(s.modules.len() as u32 - 1))
    }

    fn function(&self, module: Module, name: &str) -> DriverResult<Function> {
        let mut s = self.lock();
        let m = s
            .modules
            .get(module.0 as usize)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown module {}", module.0)))?;
        let f = m
            .kernel(name)
            .ok_or_else(|| DriverError::InvalidValue(format!("module {} has no kernel '{name}'", module.0)))?
            .clone();
        s.functions.push((module.0 as usize, f));
        Ok(Function(s.functions.len() as u32 - 1))
    }

    fn launch(&self, function: Function, config: LaunchConfig, args: &KernelArgs) -> DriverResult<()> {
        let mut s = self.lock();
        let (_, f) = s
            .functions
            .get(function.0 as usize)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown function {}", function.0)))?;
        let dims = Dims { grid: config.grid, block: config.block, dynamic_shared: config.dynamic_shared_bytes };
        ptx_emulator::check_launch(f, &dims, args.params()).map_err(DriverError::InvalidValue)?;
        s.issue(Work::Launch { function, config, args: args.clone() });
        Ok(())
    }

    fn synchronize(&self) -> DriverResult<()> {
        match self.lock().pending.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn record_event(&self) -> DriverResult<Event> {
        let mut s = self.lock();
        s.no_capture("event record")?;
        s.events.push(Some(Instant::now()));
        Ok(Event(s.events.len() as u32 - 1))
    }

    fn elapsed_ms(&self, start: Event, end: Event) -> DriverResult<f32> {
        let s = self.lock();
        let get = |e: Event| {
            s.events
                .get(e.0 as usize)
                .copied()
                .flatten()
                .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed event {}", e.0)))
        };
        Ok(get(end)?.saturating_duration_since(get(start)?).as_secs_f32() * 1e3)
    }

    fn destroy_event(&self, event: Event) -> DriverResult<()> {
        let mut s = self.lock();
        match s.events.get_mut(event.0 as usize) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(DriverError::InvalidValue(format!("unknown or destroyed event {}", event.0))),
        }
    }

    fn begin_capture(&self) -> DriverResult<()> {
        let mut s = self.lock();
        if s.capture.is_some() {
            return Err(DriverError::InvalidValue("a graph capture is already under way".into()));
        }
        s.capture = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> DriverResult<Graph> {
        let mut s = self.lock();
        let list =
            s.capture.take().ok_or_else(|| DriverError::InvalidValue("end_capture without begin_capture".into()))?;
        s.graphs.push(Some(list));
        Ok(Graph(s.graphs.len() as u32 - 1))
    }

    fn replay(&self, graph: Graph) -> DriverResult<()> {
        let mut s = self.lock();
        s.no_capture("graph replay")?;
        let list = s
            .graphs
            .get_mut(graph.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| DriverError::InvalidValue(format!("unknown or destroyed graph {}", graph.0)))?;
        for w in &list {
            s.run(w);
        }
        s.graphs[graph.0 as usize] = Some(list);
        Ok(())
    }

    fn destroy_graph(&self, graph: Graph) -> DriverResult<()> {
        let mut s = self.lock();
        match s.graphs.get_mut(graph.0 as usize) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(DriverError::InvalidValue(format!("unknown or destroyed graph {}", graph.0))),
        }
    }
}
