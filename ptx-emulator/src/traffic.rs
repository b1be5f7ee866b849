//! Global-memory traffic as a GPU's L1 sees it: per warp-level access (a request), the 32-byte
//! sectors its active lanes touch. Sectors per request is Nsight Compute's coalescing measure
//! (`l1tex__t_sectors_pipe_lsu_mem_global_op_ld` over `..._requests_...`): 4 for a warp reading 32
//! consecutive f32, 32 for one whose lanes each read a different sector. Counted here from the
//! addresses the kernel really computes, so a kernel's coalescing can be judged without a GPU.
//! And what a kernel asks of an SM (`SmWork`): issue slots and their instruction mix, tensor-core
//! instructions, shared-memory wavefronts with bank conflicts.

use crate::ir::{Inst, Op, Space};

/// Sizes in bytes; `*_bytes` is what the lanes asked for, `*_sectors` what the memory system moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalTraffic {
    pub load_requests: u64,
    pub load_sectors: u64,
    pub load_bytes: u64,
    pub store_requests: u64,
    pub store_sectors: u64,
    pub store_bytes: u64,
}

pub const SECTOR_BYTES: u64 = 32;

impl GlobalTraffic {
    /// One warp-level access: each active lane's (address, bytes). cp.async counts as a load.
    pub fn record(&mut self, store: bool, lanes: &[(u64, u64)]) {
        if lanes.is_empty() {
            return;
        }
        // At most 32 lanes of at most 32 bytes each: two sectors a lane.
        let mut sectors = [0u64; 64];
        let mut n = 0;
        let mut bytes = 0;
        for &(address, size) in lanes {
            bytes += size;
            let (first, last) = (address / SECTOR_BYTES, (address + size.max(1) - 1) / SECTOR_BYTES);
            for s in first..=last.min(first + 1) {
                sectors[n] = s;
                n += 1;
            }
        }
        let sectors = &mut sectors[..n];
        sectors.sort_unstable();
        let distinct = 1 + sectors.windows(2).filter(|w| w[0] != w[1]).count() as u64;
        if store {
            self.store_requests += 1;
            self.store_sectors += distinct;
            self.store_bytes += bytes;
        } else {
            self.load_requests += 1;
            self.load_sectors += distinct;
            self.load_bytes += bytes;
        }
    }

    pub fn add(&mut self, other: &GlobalTraffic) {
        self.load_requests += other.load_requests;
        self.load_sectors += other.load_sectors;
        self.load_bytes += other.load_bytes;
        self.store_requests += other.store_requests;
        self.store_sectors += other.store_sectors;
        self.store_bytes += other.store_bytes;
    }

    /// Bytes asked for over bytes moved (1.0: every byte of every sector used; above 1 where lanes
    /// read the same bytes, a broadcast), loads and stores.
    pub fn load_efficiency(&self) -> f64 {
        ratio(self.load_bytes, self.load_sectors * SECTOR_BYTES)
    }
    pub fn store_efficiency(&self) -> f64 {
        ratio(self.store_bytes, self.store_sectors * SECTOR_BYTES)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// What a kernel asks of an SM's issue slots, tensor cores and shared memory, counted per
/// warp-level instruction: the three in-SM ceilings a kernel can hit before DRAM. Shared memory
/// moves one 128-byte wavefront a cycle through 32 banks of 4 bytes (Ampere and Hopper); an access
/// takes as many wavefronts as its phases need, each phase as many as its most-used bank has
/// distinct 4-byte words (a bank conflict; lanes reading the same word share it). Nsight Compute
/// calls these `smsp__inst_executed`, `..._pipe_tensor_op_hmma` and
/// `l1tex__data_pipe_lsu_wavefronts_mem_shared`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmWork {
    /// Warp-level instructions issued (a predicated-off instruction still takes its slot): PTX
    /// instructions, which ptxas mostly maps one to one; integer divisions and remainders are the
    /// exception (about 20 SASS instructions each by a run-time value), so they are also counted.
    pub warp_instructions: u64,
    pub integer_divisions: u64,
    /// The warp-instructions by kind (`INSTRUCTION_KINDS` names them): where a kernel's issue
    /// slots go.
    pub mix: [u64; INSTRUCTION_KINDS.len()],
    /// Warp-level `mma.sync` instructions, and their multiply-adds (m x n x k each).
    pub mma: u64,
    pub mma_macs: u64,
    /// Warp-level shared-memory accesses (ld/st.shared, ldmatrix, cp.async's shared writes) and
    /// the wavefronts they take.
    pub shared_requests: u64,
    pub shared_wavefronts: u64,
}

pub const BANKS: u64 = 32;

/// The kinds `SmWork::mix` counts, in its order.
pub const INSTRUCTION_KINDS: [&str; 10] = [
    "mma",
    "ldmatrix",
    "shared ld/st",
    "global ld/st",
    "cp.async",
    "integer",
    "float",
    "setp/selp",
    "cvt/mov",
    "control",
];

/// The `INSTRUCTION_KINDS` index of an instruction. Generic loads and stores count as global (the
/// kernels here address shared memory explicitly).
pub fn instruction_kind(inst: &Inst) -> usize {
    match &inst.op {
        Op::Mma(_) => 0,
        Op::Ldmatrix { .. } => 1,
        Op::Ld { space: Space::Shared } | Op::St { space: Space::Shared } | Op::Atom { space: Space::Shared, .. } => 2,
        Op::Ld { .. } | Op::St { .. } | Op::Atom { .. } => 3,
        Op::CpAsync { .. } | Op::CpAsyncCommit | Op::CpAsyncWait { .. } => 4,
        Op::Setp { .. } | Op::Selp => 7,
        Op::Cvt | Op::Cvta { .. } | Op::Mov | Op::Pack { .. } | Op::Unpack { .. } => 8,
        Op::Bra
        | Op::Ret
        | Op::Exit
        | Op::Trap
        | Op::Bar { .. }
        | Op::BarWarp
        | Op::Shfl(_)
        | Op::Vote(_)
        | Op::Activemask
        | Op::Redux(_)
        | Op::Fence
        | Op::Nop => 9,
        Op::Fma | Op::FUnary(_) | Op::Copysign => 6,
        _ if inst.ty.float() => 6,
        _ => 5,
    }
}

impl SmWork {
    /// One warp-level shared access of `bytes` per lane at each active lane's (lane, shared offset).
    /// Lanes are served in phases of 128 bytes: the whole warp for 4 bytes or less, half-warps for
    /// 8, quarter-warps for 16 (and each 8-lane phase of an ldmatrix, whose rows are 16 bytes).
    pub fn record_shared(&mut self, bytes: u64, lanes: &[(u32, u64)]) {
        if lanes.is_empty() {
            return;
        }
        self.shared_requests += 1;
        let phase_lanes = if bytes <= 4 { 32 } else { (128 / bytes.min(16)) as u32 };
        let words_per_lane = bytes.div_ceil(4).max(1);
        let mut rest = lanes;
        while let Some(&(lane, _)) = rest.first() {
            let phase = lane / phase_lanes;
            let end = rest.iter().position(|&(l, _)| l / phase_lanes != phase).unwrap_or(rest.len());
            self.shared_wavefronts += phase_wavefronts(&rest[..end], words_per_lane);
            rest = &rest[end..];
        }
    }

    pub fn add(&mut self, other: &SmWork) {
        self.warp_instructions += other.warp_instructions;
        self.integer_divisions += other.integer_divisions;
        for (a, b) in self.mix.iter_mut().zip(other.mix) {
            *a += b;
        }
        self.mma += other.mma;
        self.mma_macs += other.mma_macs;
        self.shared_requests += other.shared_requests;
        self.shared_wavefronts += other.shared_wavefronts;
    }
}

/// Wavefronts of one phase (a non-empty run of lanes, each touching `words_per_lane` 4-byte words
/// from its shared offset): the most distinct words any bank holds.
fn phase_wavefronts(lanes: &[(u32, u64)], words_per_lane: u64) -> u64 {
    let words = || lanes.iter().flat_map(move |&(_, offset)| (0..words_per_lane).map(move |k| offset / 4 + k));
    // The usual case first, with no sorting (the emulator's hot path): no bank holds two distinct
    // words (conflict-free, or broadcasts), so one wavefront.
    let (mut seen, mut first) = (0u32, [0u64; BANKS as usize]);
    let conflict = words().any(|w| {
        let bank = (w % BANKS) as usize;
        if seen & (1 << bank) == 0 {
            seen |= 1 << bank;
            first[bank] = w;
            false
        } else {
            first[bank] != w
        }
    });
    if !conflict {
        return 1;
    }
    let mut sorted = [0u64; 128];
    let mut n = 0;
    for w in words().take(sorted.len()) {
        sorted[n] = w;
        n += 1;
    }
    let sorted = &mut sorted[..n];
    sorted.sort_unstable();
    let mut per_bank = [0u64; BANKS as usize];
    for (i, &w) in sorted.iter().enumerate() {
        if i == 0 || w != sorted[i - 1] {
            per_bank[(w % BANKS) as usize] += 1;
        }
    }
    per_bank.into_iter().max().unwrap_or(1)
}
