//! A launch's time on an H200 as the emulator models it, from what the launch really did
//! (`ptx_emulator::LaunchStats`): for the examples that study latency without a GPU.
//!
//! A launch takes the longest of five times, plus a fixed cost:
//! - latency: the per-warp scoreboard of `ptx_emulator::timing` (its slowest block, or its blocks'
//!   times spread over the SMs as occupancy allows: threads, shared memory and, where the driver
//!   was given ptxas's counts, registers);
//! - issue: the busiest SM's warp-instructions over its four schedulers (the scoreboard gives
//!   each block an SM's four; blocks sharing an SM share them);
//! - tensor: the busiest SM's mma multiply-adds at its share of the measured `mma.sync` peak;
//! - lsu: the busiest SM's load/store data pipe, one 128-byte wavefront a cycle, shared memory's
//!   wavefronts and global memory's sectors (four a wavefront) together;
//! - l2: all its global sectors at the L2's bandwidth (sectors as L1 asks for them: an upper bound
//!   where L1 hits);
//! - and each launch's fixed cost: a graph node's launch and the ramp of its first and last wave.
//!
//! The busiest SM holds ceil(blocks / SMs) blocks' share of the work: a launch of fewer blocks than
//! SMs is bound by one block's, not by the whole GPU's rate.
//!
//! DRAM is not a term: the emulator does not track which bytes a launch touched first, and at the
//! batches it can run (16 and below) a whole UNet pass fits in the H200's 50 MB L2.
//!
//! The constants are the H200's: measured ones where the GPU suite measured them
//! (bench/results/gpu-suite-2026-11-30-dddc2c9fa6.json: `ceilings`), and the launch cost and L2
//! bandwidth fitted to that run's whole-pass times (see `LAUNCH_COST_CYCLES`).

use ptx_emulator::LaunchStats;

/// The H200's boost clock (the suite's nvidia-smi line: 1980 MHz).
pub const CLOCK_HZ: f64 = 1.98e9;
/// Warp schedulers an SM, each issuing one warp-instruction a cycle.
pub const SCHEDULERS: f64 = 4.0;
/// bf16 `mma.sync` peak measured by the suite's peak kernel on the H200 (642 to 647 TFLOP/s).
const MMA_FLOPS_PER_S: f64 = 642e12;
/// One 128-byte wavefront an SM a cycle through L1/shared memory (Ampere and Hopper).
const LSU_BYTES_PER_SM_CYCLE: f64 = 128.0;
/// An integer division by a run-time value is one PTX instruction and about 20 SASS ones.
pub const DIVISION_INSTRUCTIONS: f64 = 20.0;
/// L2 bandwidth, fitted (see `LAUNCH_COST_CYCLES`).
const L2_BYTES_PER_S: f64 = 4.0e12;
/// Each launch's fixed cost in a replayed graph, fitted with `L2_BYTES_PER_S` by
/// scripts/fit_launch_model.py to the H200's replayed forward and input VJP at batch 1 and 16 at
/// dddc2c9 (1.135, 1.616, 2.526 and 3.805 ms; the model 1.229, 1.484, 2.842 and 3.442: an rms log
/// ratio of 0.097). The model reads the forward about 10% slow and the VJP about 10% fast, so its
/// forward + VJP over forward reads low (2.21 at batch 16, where the GPU took 2.51).
pub const LAUNCH_COST_CYCLES: f64 = 2.6e-6 * CLOCK_HZ;

/// Blocks an SM holds at once: what threads (2048 an SM), shared memory (228 KiB an SM, an
/// H100/H200's), the 32-block limit and, where ptxas's count is known, registers allow (64 Ki an
/// SM, given out a warp at a time in multiples of 256).
pub fn blocks_per_sm(threads_per_block: u32, shared_bytes: u32, registers_per_thread: Option<u32>) -> u32 {
    let threads = threads_per_block.max(1);
    let by_shared = (228u32 << 10).checked_div(shared_bytes).unwrap_or(32);
    let by_registers = registers_per_thread.map_or(32, |r| {
        let per_warp = (r.max(1) * 32).div_ceil(256) * 256;
        (65536 / per_warp) / threads.div_ceil(32)
    });
    (2048 / threads).min(by_shared).min(by_registers).clamp(1, 32)
}

/// What one launch did, for the model (the driver keeps these when it runs the model).
#[derive(Clone, Debug)]
pub struct LaunchRecord {
    pub kernel: String,
    pub stats: LaunchStats,
    /// Blocks an SM holds at once (`blocks_per_sm`).
    pub blocks_per_sm: u32,
}

/// A launch's modelled time by term, in cycles (sums of launches' terms add up term by term).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LaunchTime {
    pub latency: f64,
    pub issue: f64,
    pub tensor: f64,
    pub lsu: f64,
    pub l2: f64,
    pub fixed: f64,
    /// The longest term plus the fixed cost: the launch's time.
    pub total: f64,
}

impl LaunchTime {
    pub const TERMS: [&'static str; 5] = ["latency", "issue", "tensor", "lsu", "l2"];

    fn terms(&self) -> [f64; 5] {
        [self.latency, self.issue, self.tensor, self.lsu, self.l2]
    }

    /// The name of the longest term.
    pub fn bound(&self) -> &'static str {
        let terms = self.terms();
        let longest = (0..terms.len()).max_by(|&a, &b| terms[a].total_cmp(&terms[b])).unwrap_or(0);
        Self::TERMS[longest]
    }

    pub fn add(&mut self, other: &LaunchTime) {
        self.latency += other.latency;
        self.issue += other.issue;
        self.tensor += other.tensor;
        self.lsu += other.lsu;
        self.l2 += other.l2;
        self.fixed += other.fixed;
        self.total += other.total;
    }
}

/// The bytes a launch moves through L2 in the model: its global sectors as L1 asks for them.
pub fn l2_bytes(stats: &LaunchStats) -> f64 {
    ((stats.global.load_sectors + stats.global.store_sectors) * ptx_emulator::traffic::SECTOR_BYTES) as f64
}

/// `record`'s modelled time on `sms` SMs.
pub fn launch_time(record: &LaunchRecord, sms: u32) -> LaunchTime {
    let (s, sms) = (&record.stats, f64::from(sms));
    let concurrent = sms * f64::from(record.blocks_per_sm.max(1));
    // The SM-bound terms are the busiest SM's: ceil(blocks / SMs) blocks' share of the work (the
    // work spread over all SMs where blocks are many; one block's where they are fewer than SMs).
    let blocks = s.blocks.max(1) as f64;
    let busiest = (blocks / sms).ceil() / blocks;
    let global_bytes = l2_bytes(s);
    let issued = s.sm.warp_instructions as f64 + (DIVISION_INSTRUCTIONS - 1.0) * s.sm.integer_divisions as f64;
    let mut t = LaunchTime {
        latency: (s.block_cycles_max as f64).max(s.block_cycles_sum as f64 / concurrent),
        issue: busiest * issued / SCHEDULERS,
        tensor: busiest * 2.0 * s.sm.mma_macs as f64 / (MMA_FLOPS_PER_S / CLOCK_HZ / sms),
        lsu: busiest * (s.sm.shared_wavefronts as f64 * LSU_BYTES_PER_SM_CYCLE + global_bytes) / LSU_BYTES_PER_SM_CYCLE,
        l2: global_bytes / (L2_BYTES_PER_S / CLOCK_HZ),
        fixed: LAUNCH_COST_CYCLES,
        total: 0.0,
    };
    t.total = t.terms().into_iter().fold(0.0, f64::max) + t.fixed;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_takes_the_tightest_limit() {
        // Threads: 2048 an SM.
        assert_eq!(blocks_per_sm(256, 0, None), 8);
        // Shared memory: 228 KiB an SM.
        assert_eq!(blocks_per_sm(128, 100 << 10, None), 2);
        // Registers: 168 a thread is 5376 a warp (a multiple of 256), so 12 warps an SM.
        assert_eq!(blocks_per_sm(128, 0, Some(168)), 3);
        assert_eq!(blocks_per_sm(256, 0, Some(255)), 1);
        // Never below one block, never above 32.
        assert_eq!(blocks_per_sm(1024, 200 << 10, Some(255)), 1);
        assert_eq!(blocks_per_sm(32, 0, Some(16)), 32);
    }

    fn record(blocks: u64, warp_instructions: u64, mma_macs: u64) -> LaunchRecord {
        let mut stats =
            LaunchStats { blocks, block_cycles_max: 100, block_cycles_sum: 100 * blocks, ..Default::default() };
        stats.sm.warp_instructions = warp_instructions;
        stats.sm.mma_macs = mma_macs;
        LaunchRecord { kernel: "k".into(), stats, blocks_per_sm: 1 }
    }

    #[test]
    fn a_launch_takes_its_longest_term_and_its_fixed_cost() {
        // 1000 blocks on 100 SMs: 10 blocks a busiest SM, 4 schedulers each.
        let t = launch_time(&record(1000, 400_000, 0), 100);
        assert_eq!(t.issue, 1000.0);
        assert_eq!(t.latency, 1000.0);
        assert_eq!(t.total, 1000.0 + LAUNCH_COST_CYCLES);
        let t = launch_time(&record(1000, 800_000, 0), 100);
        assert_eq!((t.bound(), t.total), ("issue", 2000.0 + LAUNCH_COST_CYCLES));
        // Fewer blocks than SMs: the busiest SM holds one block's work, not an even share.
        let t = launch_time(&record(10, 40_000, 0), 100);
        assert_eq!(t.issue, 1000.0);
        // The tensor term at the busiest SM's share of the peak.
        let macs_per_sm_cycle = MMA_FLOPS_PER_S / CLOCK_HZ / 2.0 / 100.0;
        let t = launch_time(&record(100, 0, (macs_per_sm_cycle * 5000.0) as u64 * 100), 100);
        assert!((t.tensor - 5000.0).abs() < 1.0, "{}", t.tensor);
        assert_eq!(t.bound(), "tensor");
    }
}
