//! Errors: module load errors (with the PTX line) and run-time reports (sanitizer findings and
//! execution faults), each naming kernel, block, thread, lane, PTX line, address and what.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub line: u32,
    pub message: String,
}

impl LoadError {
    pub fn at(line: u32, message: String) -> Self {
        Self { line, message }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PTX line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for LoadError {}

/// What a run-time report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// Global access outside any live allocation.
    GlobalOutOfBounds,
    SharedOutOfBounds,
    LocalOutOfBounds,
    /// Param or const space, or a generic address in no window.
    InvalidAddress,
    Misaligned,
    /// Shared memory accessed by two threads without a barrier between them.
    SharedRace,
    /// Global memory read before it was ever written since allocation, or shared memory read
    /// before the block wrote it.
    UninitializedRead,
    /// Global bytes another block wrote in the same launch, read or written with no release and
    /// acquire between the blocks (`ordering`).
    GlobalRace,
    /// Threads of a block released from one barrier while waiting at different instructions.
    BarrierDivergence,
    /// No thread of the block can move and some wait.
    Deadlock,
    /// A warp collective whose mask is inconsistent or names an exited lane.
    InvalidCollective,
    /// `trap`, an unsupported run-time case, or an arithmetic fault.
    Fault,
}

impl ReportKind {
    pub fn name(self) -> &'static str {
        match self {
            ReportKind::GlobalOutOfBounds => "global out-of-bounds access",
            ReportKind::SharedOutOfBounds => "shared out-of-bounds access",
            ReportKind::LocalOutOfBounds => "local out-of-bounds access",
            ReportKind::InvalidAddress => "invalid address",
            ReportKind::Misaligned => "misaligned access",
            ReportKind::SharedRace => "shared-memory race",
            ReportKind::UninitializedRead => "uninitialized read",
            ReportKind::GlobalRace => "global-memory race between blocks",
            ReportKind::BarrierDivergence => "barrier divergence",
            ReportKind::Deadlock => "deadlock",
            ReportKind::InvalidCollective => "invalid warp collective",
            ReportKind::Fault => "fault",
        }
    }
}

/// One finding of a launch. Block and thread are 3-D indices; `line` is the PTX line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    pub kernel: String,
    pub block: [u32; 3],
    pub thread: [u32; 3],
    /// Linear thread index in the block, and lane within its warp.
    pub lane: u32,
    pub warp: u32,
    pub line: u32,
    pub address: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in kernel {} at PTX line {}, block ({},{},{}), thread ({},{},{}) (warp {}, lane {})",
            self.kind.name(),
            self.kernel,
            self.line,
            self.block[0],
            self.block[1],
            self.block[2],
            self.thread[0],
            self.thread[1],
            self.thread[2],
            self.warp,
            self.lane
        )?;
        if let Some(a) = self.address {
            write!(f, ", address {a:#x}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for Report {}
