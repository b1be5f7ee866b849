//! A latency model of a launch, for what the instruction counts cannot show: how long a block takes
//! when its warps wait on memory. Off unless a launch asks for it (`LaunchOptions::timing`).
//!
//! Each warp issues one instruction a cycle at most, and an instruction waits until its source
//! registers are ready (a scoreboard per warp, at warp level: the lanes issue together); its
//! results are ready a fixed latency after issue, by kind (`latency`). A GPU issues in order, but
//! ptxas schedules each basic block so that independent loads go first (the PTX NVRTC writes
//! interleaves each load with its use), so within a stretch of straight-line code an instruction
//! issues as soon as its sources are ready and a slot is free, and nothing moves across a branch,
//! a barrier or a `cp.async` wait. A `cp.async` group is complete a global latency after its last
//! copy issued, and `cp.async.wait_group` waits for it; a barrier releases its warps at the latest
//! arrival. A block takes the longest of its warps' clocks, and at least its warp-instructions over
//! the SM's four schedulers.
//!
//! It is a model, not a simulator: one latency per kind (a global load costs the same whether it
//! hits L1, L2 or DRAM), no contention for memory bandwidth or the tensor pipe, no instruction
//! cache. Its constants are round figures of the order published microbenchmarks of Ampere and
//! Hopper report (shared memory about 30 cycles, L2 hits about 200-300, DRAM about 500-600); a
//! GPU's profile is what calibrates it.

use std::collections::VecDeque;

use crate::ir::*;

/// Cycles from issue to result, by kind (see the module comment for where they come from).
pub const ALU_LATENCY: u64 = 4;
pub const SPECIAL_FUNCTION_LATENCY: u64 = 16;
/// f64 arithmetic (the data-centre GPUs' full-rate units; consumer GPUs are far slower).
pub const F64_LATENCY: u64 = 8;
/// An integer division by a run-time value: about 20 dependent instructions after ptxas.
pub const INTEGER_DIVISION_LATENCY: u64 = 80;
pub const SHARED_LATENCY: u64 = 30;
pub const GLOBAL_LATENCY: u64 = 450;
pub const MMA_LATENCY: u64 = 32;
pub const WARP_COLLECTIVE_LATENCY: u64 = 24;
/// From the last warp's arrival at a barrier to every warp's next issue.
pub const BARRIER_LATENCY: u64 = 20;
/// Warp schedulers per SM, each issuing one warp-instruction a cycle.
pub const SCHEDULERS: u64 = 4;

/// One warp's clock and scoreboard.
pub struct WarpClock {
    /// Where this stretch of straight-line code starts: nothing in it issues earlier.
    floor: u64,
    /// Instructions issued in the stretch so far (one a cycle: the n-th issues at floor + n at the
    /// earliest).
    issued: u64,
    /// The latest issue cycle so far.
    last: u64,
    /// The cycle each register slot's value is ready.
    ready: Vec<u64>,
    /// Completion cycle of the copies issued since the last commit, and of the committed groups
    /// not yet waited for (oldest first).
    open_group: u64,
    groups: VecDeque<u64>,
}

impl WarpClock {
    pub fn new(slots: usize) -> Self {
        WarpClock { floor: 0, issued: 0, last: 0, ready: vec![0; slots], open_group: 0, groups: VecDeque::new() }
    }

    /// The cycle after the last issue: when the warp is done, or reaches a barrier.
    pub fn now(&self) -> u64 {
        self.floor.max(self.last + 1)
    }

    /// Nothing issues before `cycle` from here on (a barrier's release).
    pub fn resume_at(&mut self, cycle: u64) {
        self.floor = cycle.max(self.now());
        self.issued = 0;
    }

    /// Issues `inst`: at its stretch's next free slot, once its sources are ready; marks its
    /// results' ready cycle. A branch or a wait ends the stretch.
    pub fn issue(&mut self, inst: &Inst) {
        let mut at = self.floor + self.issued;
        let mut source = |s: Slot| {
            if s != NONE {
                at = at.max(self.ready[s as usize]);
            }
        };
        for s in inst.s {
            source(s);
        }
        source(inst.addr);
        source(inst.guard);
        if let Op::Mma(m) = &inst.op {
            m.a.iter().chain(&m.b).chain(&m.c).for_each(|&s| source(s));
        }
        if let Op::CpAsyncWait { n, all } = inst.op {
            // wait_all commits what is open and waits for everything; wait_group n waits for all
            // but the newest n committed groups.
            if all && self.open_group > 0 {
                self.groups.push_back(std::mem::take(&mut self.open_group));
            }
            while self.groups.len() > n as usize {
                at = at.max(self.groups.pop_front().unwrap_or(0));
            }
        }
        self.issued += 1;
        self.last = self.last.max(at);
        if matches!(inst.op, Op::Bra | Op::CpAsyncWait { .. } | Op::Bar { .. } | Op::BarWarp | Op::Ret | Op::Exit) {
            self.resume_at(at + 1);
        }
        let done = at + latency(inst);
        match &inst.op {
            Op::CpAsync { .. } => self.open_group = self.open_group.max(done),
            Op::CpAsyncCommit => self.groups.push_back(std::mem::take(&mut self.open_group)),
            Op::Mma(m) => m.d.iter().for_each(|&d| self.mark(d, done)),
            _ => inst.d.iter().for_each(|&d| self.mark(d, done)),
        }
    }

    fn mark(&mut self, slot: Slot, cycle: u64) {
        if slot != NONE {
            self.ready[slot as usize] = cycle;
        }
    }
}

/// Cycles from `inst`'s issue to its results.
pub fn latency(inst: &Inst) -> u64 {
    match &inst.op {
        Op::Ld { space: Space::Shared } | Op::St { space: Space::Shared } | Op::Ldmatrix { .. } => SHARED_LATENCY,
        // Param, const and local loads are cached close to the SM; generic ones are mostly global.
        Op::Ld { space: Space::Param | Space::Const | Space::Local } => SHARED_LATENCY,
        Op::Ld { .. } | Op::Atom { .. } | Op::CpAsync { .. } => GLOBAL_LATENCY,
        Op::Mma(_) => MMA_LATENCY,
        Op::Shfl(_) | Op::Vote(_) | Op::Redux(_) => WARP_COLLECTIVE_LATENCY,
        Op::Div | Op::Rem if !inst.ty.float() => INTEGER_DIVISION_LATENCY,
        Op::FUnary(_) | Op::Div => SPECIAL_FUNCTION_LATENCY,
        _ if inst.ty == Ty::F64 || inst.ty2 == Ty::F64 => F64_LATENCY,
        _ => ALU_LATENCY,
    }
}

/// A block's modelled time: its slowest warp, or its issue slots if those are the tighter bound.
pub fn block_cycles(warp_clocks: impl Iterator<Item = u64>, warp_instructions: u64) -> u64 {
    warp_clocks.max().unwrap_or(0).max(warp_instructions.div_ceil(SCHEDULERS))
}
