//! One block: its warps, shared and local memory, and the scheduler. Each thread has its own PC;
//! a warp runs the lanes at its lowest PC together, one decoded instruction at a time, until no
//! lane can move (exited, at a barrier, or waiting for a collective's other lanes). Barriers
//! release when every thread that has not exited arrived; no movable thread is a deadlock.

use std::sync::Arc;

use crate::exec::{alu, cvt, mem, warp as coll};
use crate::ir::*;
use crate::memory::Allocation;
use crate::report::{Report, ReportKind};
use crate::shadow::SharedShadow;
use crate::timing::{block_cycles, WarpClock, BARRIER_LATENCY};
use crate::traffic::{GlobalTraffic, SmWork};

/// What every block of a launch shares.
pub struct LaunchCtx<'a> {
    pub kernel: &'a str,
    pub func: &'a Function,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared: u32,
    pub params: &'a [u8],
    pub consts: &'a [u8],
    pub allocs: &'a [Arc<Allocation>],
    pub freed: &'a [(u32, u64, u64)],
    /// Run the latency model (`timing`) alongside.
    pub timing: bool,
    /// The global-memory ordering check's shared state (`ordering`).
    pub order: crate::ordering::LaunchOrder,
}

impl LaunchCtx<'_> {
    pub fn threads_per_block(&self) -> u32 {
        self.block[0] * self.block[1] * self.block[2]
    }
    pub fn shared_bytes(&self) -> u32 {
        if self.dynamic_shared > 0 {
            self.func.dynamic_shared_offset + self.dynamic_shared
        } else {
            self.func.static_shared
        }
    }
}

/// Byte storage with 16-byte alignment (host atomics and vector accesses need it).
pub struct Bytes {
    buf: Vec<u128>,
    len: usize,
}

impl Bytes {
    pub fn zeroed(len: usize) -> Self {
        Bytes { buf: vec![0; len.div_ceil(16)], len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr() as *mut u8
    }
}

pub struct BlockEnv<'a> {
    pub launch: &'a LaunchCtx<'a>,
    pub block: [u32; 3],
    pub shared: Bytes,
    pub shadow: &'a mut SharedShadow,
    pub local: Bytes,
    pub last_alloc: usize,
    /// cp.async state per thread, and per shared byte the number of pending copies to it (both
    /// empty until the block's first cp.async).
    pub async_threads: Vec<crate::exec::async_copy::AsyncThread>,
    pub async_pending: Vec<u16>,
    /// The block's global loads and stores, in sectors per warp-level access.
    pub traffic: GlobalTraffic,
    /// The block's issue slots, tensor-core instructions and shared-memory wavefronts.
    pub work: SmWork,
    /// The block's side of the global-memory ordering check.
    pub order: crate::ordering::BlockOrder,
}

/// What one block did: thread-instructions, global traffic, and its SM work.
pub struct BlockCounts {
    pub thread_instructions: u64,
    /// The most warp-instructions one of the block's warps issued.
    pub longest_warp: u64,
    /// The latency model's time for the block (0 when the launch does not run it).
    pub cycles: u64,
    pub global: GlobalTraffic,
    pub sm: SmWork,
}

impl BlockEnv<'_> {
    pub fn thread_of(&self, tid: u32) -> [u32; 3] {
        let [bx, by, _] = self.launch.block;
        [tid % bx, (tid / bx) % by, tid / (bx * by)]
    }

    pub fn report(
        &self,
        kind: ReportKind,
        warp: u32,
        lane: u32,
        line: u32,
        address: Option<u64>,
        detail: String,
    ) -> Report {
        Report {
            kind,
            kernel: self.launch.kernel.to_string(),
            block: self.block,
            thread: self.thread_of(warp * 32 + lane),
            lane,
            warp,
            line,
            address,
            detail,
        }
    }
}

/// Instructions one warp may run between two scheduling points before the run is declared hung
/// (2^28 by default, tens of seconds of emulation): an endless loop becomes a report, not a stuck
/// CI job. Lowered by tests of the watchdog itself.
pub static WARP_STEP_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 28);

const READY: u8 = 0;
const EXITED: u8 = 1;
const AT_BAR: u8 = 2;
const WAIT_COLL: u8 = 3;

struct Warp {
    id: u32,
    regs: Vec<u64>,
    pc: [u32; 32],
    st: [u8; 32],
    bar_id: [u32; 32],
    bar_count: [u32; 32],
    /// Warp-instructions this warp has issued (its serial depth: a warp issues one a cycle at most).
    issued: u64,
    /// The latency model's clock, when the launch runs it.
    clock: Option<WarpClock>,
}

fn lane_mask_of(regs: &[u64], slot: Slot, lane: usize) -> u32 {
    regs[slot as usize * 32 + lane] as u32
}

/// Runs one block to completion; returns what it did.
pub fn run_block(l: &LaunchCtx, block_linear: u64, shadow: &mut SharedShadow) -> Result<BlockCounts, Report> {
    let [gx, gy, _] = l.grid;
    let b = block_linear as u32;
    let block = [b % gx, (b / gx) % gy, b / (gx * gy)];
    let nthreads = l.threads_per_block();
    let nwarps = nthreads.div_ceil(32);
    let f = l.func;
    let shared_bytes = l.shared_bytes() as usize;
    shadow.start_block(shared_bytes, nwarps as usize);
    let mut env = BlockEnv {
        launch: l,
        block,
        shared: Bytes::zeroed(shared_bytes),
        shadow,
        local: Bytes::zeroed(f.local_bytes as usize * nthreads as usize),
        last_alloc: 0,
        async_threads: Vec::new(),
        async_pending: Vec::new(),
        traffic: GlobalTraffic::default(),
        work: SmWork::default(),
        order: crate::ordering::BlockOrder::new(block_linear),
    };
    let mut files = REGISTER_FILES.with(|p| std::mem::take(&mut *p.borrow_mut()));
    files.resize_with(files.len().max(nwarps as usize), RegisterFile::default);
    let mut warps: Vec<Warp> =
        (0..nwarps).map(|w| new_warp(l, &env, w, nthreads, std::mem::take(&mut files[w as usize]))).collect();
    let result = schedule(l, &mut env, &mut warps);
    for (file, w) in files.iter_mut().zip(warps) {
        *file = RegisterFile { function: Some(f.id), regs: w.regs };
    }
    REGISTER_FILES.with(|p| *p.borrow_mut() = files);
    result
}

/// Runs the block's warps until every thread exited.
fn schedule(l: &LaunchCtx, env: &mut BlockEnv, warps: &mut [Warp]) -> Result<BlockCounts, Report> {
    let f = l.func;
    let mut count = 0u64;
    loop {
        for w in warps.iter_mut() {
            count += run_warp(env, w, f)?;
        }
        let live: u32 = warps.iter().map(|w| w.st.iter().filter(|&&s| s != EXITED).count() as u32).sum();
        if live == 0 {
            let longest_warp = warps.iter().map(|w| w.issued).max().unwrap_or(0);
            let cycles = if l.timing {
                block_cycles(
                    warps.iter().filter_map(|w| w.clock.as_ref()).map(WarpClock::now),
                    env.work.warp_instructions,
                )
            } else {
                0
            };
            return Ok(BlockCounts {
                thread_instructions: count,
                longest_warp,
                cycles,
                global: std::mem::take(&mut env.traffic),
                sm: std::mem::take(&mut env.work),
            });
        }
        if !release_barriers(env, warps, live)? {
            return Err(deadlock(env, warps, f));
        }
    }
}

/// A warp's register file (slot-major: `regs[slot * 32 + lane]`) and the function it was last set
/// up for.
#[derive(Default)]
struct RegisterFile {
    function: Option<u64>,
    regs: Vec<u64>,
}

thread_local! {
    /// This worker's register files of its last block, by warp: the next block of the same
    /// function zeroes only the slots a thread may read before writing them (`liveness`), where a
    /// fresh file would be zeroed whole (12 MB a warp for the largest kernel).
    static REGISTER_FILES: std::cell::RefCell<Vec<RegisterFile>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `file` set up for a new warp of `f`: constants in place, every slot a thread may read before
/// writing it zero, as in a fresh zeroed file (the specials are the caller's).
fn reset_register_file(f: &Function, file: &mut RegisterFile) {
    let len = f.nslots as usize * 32;
    match &f.read_before_written {
        Some(slots) if file.function == Some(f.id) && file.regs.len() == len => {
            for &s in slots {
                file.regs[s as usize * 32..s as usize * 32 + 32].fill(0);
            }
        }
        _ => {
            file.regs.clear();
            file.regs.resize(len, 0);
            for &(s, v) in &f.consts {
                file.regs[s as usize * 32..s as usize * 32 + 32].fill(v);
            }
            file.function = Some(f.id);
        }
    }
}

fn new_warp(l: &LaunchCtx, env: &BlockEnv, w: u32, nthreads: u32, mut file: RegisterFile) -> Warp {
    let f = l.func;
    reset_register_file(f, &mut file);
    let mut regs = file.regs;
    let nwarps = nthreads.div_ceil(32);
    for lane in 0..32u32 {
        let tid = w * 32 + lane;
        let t = env.thread_of(tid);
        for &(s, sp) in &f.specials {
            let v: u64 = match sp {
                Special::Tid(d) => t[d as usize] as u64,
                Special::Ntid(d) => l.block[d as usize] as u64,
                Special::Ctaid(d) => env.block[d as usize] as u64,
                Special::Nctaid(d) => l.grid[d as usize] as u64,
                Special::LaneId => lane as u64,
                Special::WarpId => w as u64,
                Special::NWarpId => nwarps as u64,
                Special::LanemaskEq => 1u64 << lane,
                Special::LanemaskLt => (1u64 << lane) - 1,
                Special::LanemaskLe => ((1u64 << lane) << 1).wrapping_sub(1) & 0xffff_ffff,
                Special::LanemaskGt => !(((1u64 << lane) << 1).wrapping_sub(1)) & 0xffff_ffff,
                Special::LanemaskGe => !((1u64 << lane) - 1) & 0xffff_ffff,
                Special::SmId | Special::GridId | Special::Clock => 0,
                Special::NSmId => 1,
                Special::DynamicSmemSize => l.dynamic_shared as u64,
                Special::TotalSmemSize => l.shared_bytes() as u64,
            };
            regs[s as usize * 32 + lane as usize] = v;
        }
    }
    let clock = l.timing.then(|| WarpClock::new(f.nslots as usize));
    let mut st = [READY; 32];
    for (lane, s) in st.iter_mut().enumerate() {
        if w * 32 + lane as u32 >= nthreads {
            *s = EXITED;
        }
    }
    Warp { id: w, regs, pc: [0; 32], st, bar_id: [0; 32], bar_count: [0; 32], issued: 0, clock }
}

fn advance(w: &mut Warp, lanes: u32) {
    crate::exec::lanes::for_lanes(lanes, |l| w.pc[l] += 1);
}

/// Runs a warp until none of its lanes can move; returns thread-instructions executed.
fn run_warp(env: &mut BlockEnv, w: &mut Warp, f: &Function) -> Result<u64, Report> {
    let mut count = 0u64;
    let mut steps = 0u64;
    let step_limit = WARP_STEP_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    // Fast path: while every live lane is ready at one PC (a converged warp), that PC is kept
    // here and the per-lane PCs are stale; `materialize` writes them back before divergence.
    let mut uni: Option<u32> = None;
    let mut live = 0u32;
    for l in 0..32 {
        if w.st[l] != EXITED {
            live |= 1 << l;
        }
    }
    macro_rules! materialize {
        () => {
            if let Some(p) = uni.take() {
                crate::exec::lanes::for_lanes(live, |l| w.pc[l] = p);
            }
        };
    }
    macro_rules! advance {
        ($lanes:expr) => {
            match uni.as_mut() {
                Some(p) => *p += 1,
                None => advance(w, $lanes),
            }
        };
    }
    loop {
        let (min_pc, group) = match uni {
            Some(pc) => (pc, live),
            None => {
                let mut min_pc = u32::MAX;
                let mut group = 0u32;
                let mut waiting = false;
                for l in 0..32 {
                    match w.st[l] {
                        READY if w.pc[l] < min_pc => {
                            min_pc = w.pc[l];
                            group = 1 << l;
                        }
                        READY if w.pc[l] == min_pc => group |= 1 << l,
                        WAIT_COLL => waiting = true,
                        _ => {}
                    }
                }
                if min_pc == u32::MAX {
                    check_waiting_collectives(env, w, f)?;
                    return Ok(count);
                }
                if waiting {
                    for l in 0..32 {
                        if w.st[l] == WAIT_COLL && w.pc[l] == min_pc {
                            group |= 1 << l;
                        }
                    }
                }
                if group == live && !waiting {
                    uni = Some(min_pc);
                }
                (min_pc, group)
            }
        };
        let inst = &f.insts[min_pc as usize];
        let mut exec = group;
        if inst.guard != NONE {
            let g = inst.guard as usize * 32;
            let mut m = 0u32;
            crate::exec::lanes::for_lanes(group, |l| {
                if (w.regs[g + l] & 1 == 1) != inst.guard_neg {
                    m |= 1 << l
                }
            });
            exec = m;
        }
        count += exec.count_ones() as u64;
        steps += 1;
        env.work.warp_instructions += 1;
        w.issued += 1;
        if let Some(clock) = w.clock.as_mut() {
            clock.issue(inst);
        }
        env.work.mix[crate::traffic::instruction_kind(inst)] += 1;
        if matches!(inst.op, Op::Div | Op::Rem) && !inst.ty.float() {
            env.work.integer_divisions += 1;
        }
        if steps > step_limit {
            return Err(env.report(
                ReportKind::Fault,
                w.id,
                exec.trailing_zeros().min(31),
                inst.line,
                None,
                format!(
                    "the warp ran {step_limit} instructions without blocking: an endless loop, or a spin wait on \
                     another block (blocks run one after another per core here)"
                ),
            ));
        }
        let first = exec.trailing_zeros().min(31);
        let fault = |env: &BlockEnv, kind: ReportKind, lane: u32, msg: String| {
            env.report(kind, w.id, lane, inst.line, None, msg)
        };
        match &inst.op {
            Op::Bra => {
                if uni.is_some() && (exec == group || exec == 0) {
                    uni = Some(if exec != 0 { inst.target } else { min_pc + 1 });
                } else {
                    materialize!();
                    crate::exec::lanes::for_lanes(group, |l| {
                        w.pc[l] = if exec & (1 << l) != 0 { inst.target } else { w.pc[l] + 1 }
                    });
                }
            }
            Op::Ret | Op::Exit => {
                materialize!();
                crate::exec::lanes::for_lanes(exec, |l| w.st[l] = EXITED);
                live &= !exec;
                advance(w, group & !exec);
            }
            Op::Trap => {
                if exec != 0 {
                    return Err(fault(env, ReportKind::Fault, first, "trap executed".into()));
                }
                advance!(group);
            }
            Op::Bar { arrive } => {
                materialize!();
                if *arrive && exec != 0 {
                    return Err(fault(env, ReportKind::Fault, first, "bar.arrive is not supported".into()));
                }
                crate::exec::lanes::for_lanes(exec, |l| {
                    w.st[l] = AT_BAR;
                    w.bar_id[l] = w.regs[inst.s[0] as usize * 32 + l] as u32;
                    w.bar_count[l] = if inst.s[1] != NONE { w.regs[inst.s[1] as usize * 32 + l] as u32 } else { 0 };
                });
                advance(w, group & !exec);
            }
            Op::Shfl(_) | Op::Vote(_) | Op::Redux(_) | Op::BarWarp | Op::Mma(_) | Op::Ldmatrix { .. } => {
                let mslot = collective_mask(inst);
                let mut needed = 0u32;
                for l in 0..32 {
                    if exec & (1 << l) != 0 {
                        let m = lane_mask_of(&w.regs, mslot, l);
                        if m & (1 << l) == 0 {
                            return Err(fault(
                                env,
                                ReportKind::InvalidCollective,
                                l as u32,
                                format!("member mask {m:#010x} does not include the executing lane {l}"),
                            ));
                        }
                        needed |= m;
                    }
                }
                let missing = needed & !exec;
                if missing != 0 {
                    let exited: u32 =
                        (0..32).filter(|&l| missing & (1 << l) != 0 && w.st[l] == EXITED).fold(0, |a, l| a | 1 << l);
                    if exited != 0 {
                        return Err(fault(
                            env,
                            ReportKind::InvalidCollective,
                            first,
                            format!("member mask {needed:#010x} names lanes that exited ({exited:#010x})"),
                        ));
                    }
                    // Lanes of the mask that are in the group but predicated off never arrive either.
                    if missing & group != 0 {
                        return Err(fault(
                            env,
                            ReportKind::InvalidCollective,
                            first,
                            format!(
                                "member mask {needed:#010x} names lanes predicated off ({:#010x})",
                                missing & group
                            ),
                        ));
                    }
                    materialize!();
                    crate::exec::lanes::for_lanes(exec, |l| w.st[l] = WAIT_COLL);
                    advance(w, group & !exec);
                    continue;
                }
                match inst.op {
                    Op::Shfl(mode) => {
                        let mut src = [0u32; 32];
                        let mut ok = [false; 32];
                        for l in 0..32u32 {
                            if exec & (1 << l) != 0 {
                                let b = w.regs[inst.s[1] as usize * 32 + l as usize] as u32;
                                let c = w.regs[inst.s[2] as usize * 32 + l as usize] as u32;
                                let (j, p) = coll::shfl_sources(mode, l, b, c);
                                if exec & (1 << j) == 0 {
                                    return Err(fault(
                                        env,
                                        ReportKind::InvalidCollective,
                                        l,
                                        format!("shfl reads lane {j}, which is not taking part (lanes {exec:#010x})"),
                                    ));
                                }
                                src[l as usize] = j;
                                ok[l as usize] = p;
                            }
                        }
                        coll::shfl(inst, mode, &mut w.regs, exec, &src, &ok);
                    }
                    Op::Vote(mode) => coll::vote(inst, mode, &mut w.regs, exec),
                    Op::Redux(op) => coll::redux(inst, op, &mut w.regs, exec),
                    Op::Mma(ref m) => {
                        env.work.mma += 1;
                        env.work.mma_macs += 16 * 8 * m.kind.k as u64;
                        crate::exec::tensor::mma(m, &mut w.regs)
                    }
                    Op::Ldmatrix { trans } => crate::exec::async_copy::ldmatrix(env, w.id, inst, &mut w.regs, trans)?,
                    _ => env.shadow.warp_sync(w.id as usize),
                }
                crate::exec::lanes::for_lanes(group, |l| w.st[l] = READY);
                advance!(group);
            }
            Op::Activemask => {
                let d = inst.d[0] as usize * 32;
                crate::exec::lanes::for_lanes(exec, |l| w.regs[d + l] = group as u64);
                advance!(group);
            }
            Op::Fence => {
                if exec != 0 && !inst.flags.cta_scope {
                    let launch = env.launch;
                    env.order.fence(&launch.order);
                }
                advance!(group);
            }
            Op::Nop => advance!(group),
            Op::CpAsync { .. } | Op::CpAsyncCommit | Op::CpAsyncWait { .. } => {
                crate::exec::async_copy::exec(env, w.id, inst, &w.regs, exec)?;
                advance!(group);
            }
            Op::Ld { .. } | Op::St { .. } | Op::Atom { .. } | Op::Cvta { .. } => {
                mem::exec(env, w.id, inst, &mut w.regs, exec)?;
                advance!(group);
            }
            Op::Cvt => {
                if let Err(e) = cvt::exec(inst, &mut w.regs, exec) {
                    return Err(fault(env, ReportKind::Fault, first, e));
                }
                advance!(group);
            }
            _ => {
                if let Err(e) = alu::exec(inst, &mut w.regs, exec) {
                    return Err(fault(env, ReportKind::Fault, first, e));
                }
                advance!(group);
            }
        }
    }
}

/// The mask operand slot of a warp collective.
fn collective_mask(inst: &Inst) -> Slot {
    match inst.op {
        Op::Shfl(_) => inst.s[3],
        Op::Vote(_) | Op::Redux(_) => inst.s[1],
        _ => inst.s[0],
    }
}

/// Lanes waiting in a collective whose mask names lanes that have exited since: an error.
fn check_waiting_collectives(env: &BlockEnv, w: &Warp, f: &Function) -> Result<(), Report> {
    for l in 0..32 {
        if w.st[l] == WAIT_COLL {
            let inst = &f.insts[w.pc[l] as usize];
            let m = lane_mask_of(&w.regs, collective_mask(inst), l);
            let exited: u32 = (0..32).filter(|&k| m & (1 << k) != 0 && w.st[k] == EXITED).fold(0, |a, k| a | 1 << k);
            if exited != 0 {
                return Err(env.report(
                    ReportKind::InvalidCollective,
                    w.id,
                    l as u32,
                    inst.line,
                    None,
                    format!("member mask {m:#010x} names lanes that exited ({exited:#010x})"),
                ));
            }
        }
    }
    Ok(())
}

/// Releases every barrier all live threads (or its thread count) have reached. False when none could be.
fn release_barriers(env: &mut BlockEnv, warps: &mut [Warp], live: u32) -> Result<bool, Report> {
    let mut ids: Vec<u32> = Vec::new();
    for w in warps.iter() {
        for l in 0..32 {
            if w.st[l] == AT_BAR && !ids.contains(&w.bar_id[l]) {
                ids.push(w.bar_id[l]);
            }
        }
    }
    let mut released = false;
    for id in ids {
        let mut arrived = 0u32;
        let mut count = 0u32;
        for w in warps.iter() {
            for l in 0..32 {
                if w.st[l] == AT_BAR && w.bar_id[l] == id {
                    arrived += 1;
                    count = count.max(w.bar_count[l]);
                }
            }
        }
        let expected = if count > 0 { count.min(live) } else { live };
        if arrived < expected {
            continue;
        }
        // Everyone must wait at the same barrier instruction.
        let mut first: Option<(u32, u32, usize)> = None;
        for w in warps.iter() {
            for l in 0..32 {
                if w.st[l] == AT_BAR && w.bar_id[l] == id {
                    match first {
                        None => first = Some((w.pc[l], w.id, l)),
                        Some((pc, fw, fl)) if pc != w.pc[l] => {
                            let f = env.launch.func;
                            let other = env.thread_of(fw * 32 + fl as u32);
                            return Err(env.report(
                                ReportKind::BarrierDivergence,
                                w.id,
                                l as u32,
                                f.insts[w.pc[l] as usize].line,
                                None,
                                format!(
                                    "barrier {id} reached at PTX line {} by this thread but at PTX line {} by thread ({},{},{})",
                                    f.insts[w.pc[l] as usize].line,
                                    f.insts[pc as usize].line,
                                    other[0],
                                    other[1],
                                    other[2]
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        let at_barrier = |w: &Warp| (0..32).any(|l| w.st[l] == AT_BAR && w.bar_id[l] == id);
        let last_arrival =
            warps.iter().filter(|w| at_barrier(w)).filter_map(|w| w.clock.as_ref()).map(WarpClock::now).max();
        for w in warps.iter_mut() {
            let arrived = at_barrier(w);
            if let (Some(clock), Some(last), true) = (w.clock.as_mut(), last_arrival, arrived) {
                clock.resume_at(last + BARRIER_LATENCY);
            }
            for l in 0..32 {
                if w.st[l] == AT_BAR && w.bar_id[l] == id {
                    w.st[l] = READY;
                    w.pc[l] += 1;
                }
            }
        }
        env.shadow.barrier();
        released = true;
    }
    Ok(released)
}

fn deadlock(env: &BlockEnv, warps: &[Warp], f: &Function) -> Report {
    // Group the waiting threads by what they wait at: (what, count, first thread).
    let mut groups: Vec<(String, u32, u32)> = Vec::new();
    let mut who = None;
    for w in warps {
        for l in 0..32 {
            let line = f.insts[w.pc[l] as usize].line;
            let what = match w.st[l] {
                AT_BAR => format!("barrier {} at line {line}", w.bar_id[l]),
                WAIT_COLL => format!("warp collective at line {line}"),
                _ => continue,
            };
            let tid = w.id * 32 + l as u32;
            who.get_or_insert((w.id, l as u32, line));
            match groups.iter_mut().find(|g| g.0 == what) {
                Some(g) => g.1 += 1,
                None => groups.push((what, 1, tid)),
            }
        }
    }
    let text: Vec<String> = groups
        .iter()
        .map(|(what, n, tid)| {
            let t = env.thread_of(*tid);
            format!("{n} threads (first ({},{},{})) wait at {what}", t[0], t[1], t[2])
        })
        .collect();
    let (wid, lane, line) = who.unwrap_or((0, 0, 0));
    env.report(
        ReportKind::Deadlock,
        wid,
        lane,
        line,
        None,
        format!("no thread of the block can move: {}", text.join("; ")),
    )
}
