//! A functional emulator of NVIDIA PTX with always-on sanitizers. It runs the PTX text NVRTC
//! emits (the same a GPU driver would JIT) on the CPU: threads with their own program counters,
//! warps running converged lanes together, blocks in parallel over the cores; and it checks every
//! access (bounds, alignment, uninitialised global reads, shared-memory races, global-memory races
//! between blocks) and every barrier.
//!
//! Use: `GlobalMemory` for device memory, `Module::load` for PTX, `launch` to run a kernel.

pub mod block;
pub mod decode;
pub mod exec;
pub mod ir;
pub mod liveness;
pub mod memory;
pub mod ordering;
pub mod parse;
pub mod report;
pub mod shadow;
pub mod timing;
pub mod traffic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

pub use ir::{Function, ParamInfo};
pub use memory::GlobalMemory;
pub use report::{LoadError, Report, ReportKind};
pub use traffic::{GlobalTraffic, SmWork, INSTRUCTION_KINDS};

/// Limits of the emulated device (those of an sm_80 part).
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_SHARED_PER_BLOCK: u32 = 163 * 1024;
pub const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65535, 65535];
pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];

/// A loaded PTX module: decoded kernels, its const bank, its `.global` variables.
pub struct Module {
    pub target: String,
    kernels: HashMap<String, Arc<Function>>,
    consts: Vec<u8>,
    /// Addresses of the module's `.global` variables (allocated at load).
    pub global_vars: Vec<u64>,
}

fn init_bytes(d: &parse::VarDecl, out: &mut [u8]) -> Result<(), LoadError> {
    let es = d.elem_size() as usize;
    for (k, v) in d.init.iter().enumerate() {
        let bits: u64 = match v {
            parse::Operand::Int(i) => *i as u64,
            parse::Operand::F32(b) => *b as u64,
            parse::Operand::F64(b) => {
                if d.ty == ".f32" {
                    (f64::from_bits(*b) as f32).to_bits() as u64
                } else {
                    *b
                }
            }
            o => return Err(LoadError::at(d.line, format!("unsupported initializer {o:?} of '{}'", d.name))),
        };
        let at = k * es;
        if at + es > out.len() {
            return Err(LoadError::at(d.line, format!("too many initializers for '{}'", d.name)));
        }
        out[at..at + es].copy_from_slice(&bits.to_le_bytes()[..es]);
    }
    Ok(())
}

impl Module {
    /// Parses and decodes PTX; `.global` variables are allocated (and initialised) in `mem`.
    pub fn load(ptx: &str, mem: &mut GlobalMemory) -> Result<Module, LoadError> {
        let ast = parse::parse(ptx)?;
        let mut globals = HashMap::new();
        let mut consts_map = HashMap::new();
        let mut consts = Vec::new();
        let mut global_vars = Vec::new();
        let mut shared = Vec::new();
        for d in &ast.globals {
            match d.space.as_str() {
                ".global" => {
                    if d.is_extern {
                        return Err(LoadError::at(d.line, format!("extern .global '{}' is not supported", d.name)));
                    }
                    let mut bytes = vec![0u8; d.bytes() as usize];
                    init_bytes(d, &mut bytes)?;
                    let a = mem.alloc(bytes.len() as u64);
                    // Module variables are zero-initialised when not initialised: written.
                    mem.write(a, &bytes).map_err(|e| LoadError::at(d.line, format!("{e:?}")))?;
                    globals.insert(d.name.clone(), a);
                    global_vars.push(a);
                }
                ".const" => {
                    let off = consts.len().div_ceil(d.align.max(1) as usize) * d.align.max(1) as usize;
                    consts.resize(off + d.bytes() as usize, 0);
                    init_bytes(d, &mut consts[off..])?;
                    consts_map.insert(d.name.clone(), off as u64);
                }
                ".shared" => shared.push(d.clone()),
                s => return Err(LoadError::at(d.line, format!("unsupported module variable space '{s}'"))),
            }
        }
        let funcs =
            ast.functions.iter().filter(|f| !f.is_entry && f.body.is_some()).map(|f| (f.name.clone(), f)).collect();
        let syms = decode::ModuleSymbols { globals, consts: consts_map, shared: &shared, funcs };
        let mut kernels = HashMap::new();
        for f in &ast.functions {
            if !f.is_entry {
                continue;
            }
            kernels.insert(f.name.clone(), Arc::new(decode::decode_function(f, &syms)?));
        }
        Ok(Module { target: ast.target, kernels, consts, global_vars })
    }

    pub fn kernel(&self, name: &str) -> Option<&Arc<Function>> {
        self.kernels.get(name)
    }

    pub fn kernel_names(&self) -> impl Iterator<Item = &String> {
        self.kernels.keys()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared: u32,
}

/// What a launch did.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchStats {
    pub thread_instructions: u64,
    pub blocks: u64,
    /// The most warp-instructions any one warp of the launch issued: a bound on the launch's time
    /// however many SMs it has (a warp issues at most one instruction a cycle), what decides a
    /// small launch's latency when its blocks are few.
    pub longest_warp: u64,
    /// The latency model's block times (`timing`), the longest and their sum; 0 unless the launch
    /// ran it (`LaunchOptions::timing`).
    pub block_cycles_max: u64,
    pub block_cycles_sum: u64,
    /// Global loads and stores per warp-level access, in 32-byte sectors (`traffic`).
    pub global: GlobalTraffic,
    /// Issue slots, tensor-core instructions and shared-memory wavefronts (`traffic::SmWork`).
    pub sm: SmWork,
}

/// Checks a launch the way the driver does; the message is the driver's reason.
pub fn check_launch(f: &Function, dims: &Dims, params: &[Vec<u8>]) -> Result<(), String> {
    if params.len() != f.params.len() {
        return Err(format!("kernel {} takes {} parameters, {} given", f.name, f.params.len(), params.len()));
    }
    for (k, (p, info)) in params.iter().zip(&f.params).enumerate() {
        if p.len() != info.size as usize {
            return Err(format!(
                "kernel {} parameter {k} ({}) is {} bytes, {} given",
                f.name,
                info.name,
                info.size,
                p.len()
            ));
        }
    }
    let threads = dims.block.iter().map(|&x| x as u64).product::<u64>();
    if threads == 0 || dims.grid.contains(&0) {
        return Err(format!("kernel {}: empty grid {:?} or block {:?}", f.name, dims.grid, dims.block));
    }
    if threads > MAX_THREADS_PER_BLOCK as u64 || (0..3).any(|i| dims.block[i] > MAX_BLOCK[i]) {
        return Err(format!(
            "kernel {}: block {:?} has {threads} threads; the limit is {MAX_THREADS_PER_BLOCK} ({:?} per dimension)",
            f.name, dims.block, MAX_BLOCK
        ));
    }
    if (0..3).any(|i| dims.grid[i] > MAX_GRID[i]) {
        return Err(format!("kernel {}: grid {:?} over the limit {:?}", f.name, dims.grid, MAX_GRID));
    }
    let shared = f.static_shared as u64
        + if dims.dynamic_shared > 0 {
            (f.dynamic_shared_offset - f.static_shared) as u64 + dims.dynamic_shared as u64
        } else {
            0
        };
    if shared > MAX_SHARED_PER_BLOCK as u64 {
        return Err(format!(
            "kernel {}: {shared} bytes of shared memory ({} static + {} dynamic) over the limit of {MAX_SHARED_PER_BLOCK}",
            f.name, f.static_shared, dims.dynamic_shared
        ));
    }
    Ok(())
}

/// Packs parameter bytes at the offsets of the `.entry`'s parameters.
pub fn pack_params(f: &Function, params: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = vec![0u8; f.param_bytes as usize];
    for (p, info) in params.iter().zip(&f.params) {
        let o = info.offset as usize;
        buf[o..o + p.len()].copy_from_slice(p);
    }
    buf
}

/// How a launch runs beyond what the kernel and its arguments say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Run the latency model (`timing`): `LaunchStats::block_cycles_*`. It updates a scoreboard at
    /// every instruction, so it is off unless asked for (off, it costs a branch an instruction: the
    /// throughput example ran at 136-145 M thread-instructions per CPU-second with it built in,
    /// 143-149 without, three runs each).
    pub timing: bool,
}

/// Runs a kernel to completion over all blocks (in parallel); the first report, by block order.
pub fn launch(
    module: &Module,
    f: &Function,
    dims: &Dims,
    params: &[Vec<u8>],
    mem: &GlobalMemory,
) -> Result<LaunchStats, LaunchError> {
    launch_with(module, f, dims, params, mem, LaunchOptions::default())
}

/// `launch` with `options`.
pub fn launch_with(
    module: &Module,
    f: &Function,
    dims: &Dims,
    params: &[Vec<u8>],
    mem: &GlobalMemory,
    options: LaunchOptions,
) -> Result<LaunchStats, LaunchError> {
    check_launch(f, dims, params).map_err(LaunchError::Invalid)?;
    let packed = pack_params(f, params);
    let ctx = block::LaunchCtx {
        kernel: &f.name,
        func: f,
        grid: dims.grid,
        block: dims.block,
        dynamic_shared: dims.dynamic_shared,
        params: &packed,
        consts: &module.consts,
        allocs: mem.allocations(),
        freed: mem.freed(),
        timing: options.timing,
        order: ordering::LaunchOrder::new(mem.next_launch(), f),
    };
    let nblocks = dims.grid.iter().map(|&x| x as u64).product::<u64>();
    let failed = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let longest_warp = AtomicU64::new(0);
    let (block_cycles_max, block_cycles_sum) = (AtomicU64::new(0), AtomicU64::new(0));
    let traffic = std::sync::Mutex::new((GlobalTraffic::default(), SmWork::default()));
    let first_error = (0..nblocks)
        .into_par_iter()
        .map_init(shadow::SharedShadow::new, |sh, b| {
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            match block::run_block(&ctx, b, sh) {
                Ok(counts) => {
                    count.fetch_add(counts.thread_instructions, Ordering::Relaxed);
                    longest_warp.fetch_max(counts.longest_warp, Ordering::Relaxed);
                    block_cycles_max.fetch_max(counts.cycles, Ordering::Relaxed);
                    block_cycles_sum.fetch_add(counts.cycles, Ordering::Relaxed);
                    let mut sums = traffic.lock().unwrap_or_else(|e| e.into_inner());
                    sums.0.add(&counts.global);
                    sums.1.add(&counts.sm);
                    None
                }
                Err(r) => {
                    failed.store(true, Ordering::Relaxed);
                    Some((b, r))
                }
            }
        })
        .filter_map(|x| x)
        .min_by_key(|(b, _)| *b);
    match first_error {
        Some((_, r)) => Err(LaunchError::Report(Box::new(r))),
        None => {
            let (global, sm) = traffic.into_inner().unwrap_or_else(|e| e.into_inner());
            Ok(LaunchStats {
                thread_instructions: count.into_inner(),
                blocks: nblocks,
                longest_warp: longest_warp.into_inner(),
                block_cycles_max: block_cycles_max.into_inner(),
                block_cycles_sum: block_cycles_sum.into_inner(),
                global,
                sm,
            })
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchError {
    /// The launch itself is invalid (arguments, dimensions, shared memory): the driver's error.
    Invalid(String),
    /// The kernel ran and a check or fault stopped it.
    Report(Box<Report>),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::Invalid(s) => write!(f, "{s}"),
            LaunchError::Report(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for LaunchError {}
