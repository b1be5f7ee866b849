//! `cp.async` (global to shared, 4/8/16 bytes, src-size zero fill) with commit and wait groups,
//! and `ldmatrix`'s shared-memory reads. A cp.async reads its source when issued and its write
//! lands in shared memory at the `wait_group`/`wait_all` that completes its group: touching the
//! target before that is reported as a race.

use super::tensor;
use crate::block::BlockEnv;
use crate::exec::mem::Kind;
use crate::ir::*;
use crate::report::{Report, ReportKind};

#[derive(Clone)]
pub struct Copy {
    dst: u64,
    data: [u8; 16],
    len: u8,
    line: u32,
}

/// One thread's copies: not yet committed, and committed groups oldest first.
#[derive(Clone, Default)]
pub struct AsyncThread {
    open: Vec<Copy>,
    groups: std::collections::VecDeque<Vec<Copy>>,
}

impl BlockEnv<'_> {
    /// The first byte of `[a, a+len)` a pending cp.async will write.
    pub fn async_pending_in(&self, a: u64, len: u64) -> Option<u64> {
        if self.async_pending.is_empty() {
            return None;
        }
        (a..a + len).find(|&b| self.async_pending[b as usize] != 0)
    }

    pub fn async_line(&self, byte: u64) -> u32 {
        for t in &self.async_threads {
            for c in t.open.iter().chain(t.groups.iter().flatten()) {
                if (c.dst..c.dst + c.len as u64).contains(&byte) {
                    return c.line;
                }
            }
        }
        0
    }
}

pub fn exec(env: &mut BlockEnv, warp: u32, inst: &Inst, regs: &[u64], mask: u32) -> Result<(), Report> {
    if env.async_threads.is_empty() {
        let n = env.launch.threads_per_block() as usize;
        env.async_threads = vec![AsyncThread::default(); n];
        env.async_pending = vec![0; env.shared.len()];
    }
    // The global reads of a cp.async warp access (zero-filling lanes read nothing).
    let mut global = [(0u64, 0u64); 32];
    let mut global_lanes = 0;
    // The shared writes (lane, offset) and their size: the wavefronts they take when they land.
    let mut shared = [(0u32, 0u64); 32];
    let mut shared_lanes = 0;
    let mut shared_size = 0;
    let mut m = mask;
    while m != 0 {
        let l = m.trailing_zeros();
        m &= m - 1;
        let t = (warp * 32 + l) as usize;
        match inst.op {
            Op::CpAsync { size, off2 } => {
                let size = size as u64;
                let src = regs[inst.s[0] as usize * 32 + l as usize].wrapping_add(off2 as u64);
                let dst = regs[inst.addr as usize * 32 + l as usize].wrapping_add(inst.off as u64);
                let src_size =
                    if inst.s[1] != NONE { regs[inst.s[1] as usize * 32 + l as usize] as u32 as u64 } else { size };
                if src_size > size {
                    return Err(env.report(
                        ReportKind::Fault,
                        warp,
                        l,
                        inst.line,
                        Some(src),
                        format!("cp.async src-size {src_size} is larger than its copy size {size}"),
                    ));
                }
                let mut data = [0u8; 16];
                if src_size > 0 {
                    let p = env.resolve_aligned(Space::Global, src, src_size, size, Kind::Read, warp, l, inst.line)?;
                    unsafe { std::ptr::copy_nonoverlapping(p, data.as_mut_ptr(), src_size as usize) };
                    global[global_lanes] = (src, src_size);
                    global_lanes += 1;
                }
                // The destination: in bounds, aligned, and not the target of another pending copy.
                let n = env.shared.len() as u64;
                if !dst.is_multiple_of(size) || dst + size > n {
                    let (kind, what) = if !dst.is_multiple_of(size) {
                        (
                            ReportKind::Misaligned,
                            format!("cp.async of {size} bytes to shared offset {dst}, not {size}-byte aligned"),
                        )
                    } else {
                        (
                            ReportKind::SharedOutOfBounds,
                            format!(
                                "cp.async of {size} bytes to shared offset {dst}: {} bytes past the block's {n} bytes",
                                dst + size - n
                            ),
                        )
                    };
                    return Err(env.report(kind, warp, l, inst.line, Some(dst), what));
                }
                if let Some(b) = env.async_pending_in(dst, size) {
                    let other = env.async_line(b);
                    return Err(env.report(
                        ReportKind::SharedRace,
                        warp,
                        l,
                        inst.line,
                        Some(dst),
                        format!("cp.async to shared byte {b}, the target of an earlier cp.async (PTX line {other}) not yet waited for"),
                    ));
                }
                for b in dst..dst + size {
                    env.async_pending[b as usize] += 1;
                }
                env.async_threads[t].open.push(Copy { dst, data, len: size as u8, line: inst.line });
                shared[shared_lanes] = (l, dst);
                shared_lanes += 1;
                shared_size = size;
            }
            Op::CpAsyncCommit => {
                let open = std::mem::take(&mut env.async_threads[t].open);
                env.async_threads[t].groups.push_back(open);
            }
            Op::CpAsyncWait { n, all } => {
                if all {
                    let open = std::mem::take(&mut env.async_threads[t].open);
                    env.async_threads[t].groups.push_back(open);
                }
                while env.async_threads[t].groups.len() > n as usize {
                    let group = env.async_threads[t].groups.pop_front().unwrap_or_default();
                    for c in group {
                        for b in c.dst..c.dst + c.len as u64 {
                            env.async_pending[b as usize] -= 1;
                        }
                        // The write lands now, as this thread's write, ordered like any other.
                        let p = env.resolve(Space::Shared, c.dst, c.len as u64, Kind::Write, warp, l, c.line)?;
                        unsafe { std::ptr::copy_nonoverlapping(c.data.as_ptr(), p, c.len as usize) };
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    env.traffic.record(false, &global[..global_lanes]);
    env.work.record_shared(shared_size, &shared[..shared_lanes]);
    Ok(())
}

/// `ldmatrix`: lanes 0..8*N give the row addresses of N 8x8 b16 matrices (16 bytes each).
pub fn ldmatrix(env: &mut BlockEnv, warp: u32, inst: &Inst, regs: &mut [u64], trans: bool) -> Result<(), Report> {
    let n = inst.vec as usize;
    let mut rows = [[[0u16; 8]; 8]; 4];
    let mut lanes = [(0u32, 0u64); 32];
    for l in 0..8 * n {
        let addr = regs[inst.addr as usize * 32 + l].wrapping_add(inst.off as u64);
        let p = env.resolve(Space::Shared, addr, 16, Kind::Read, warp, l as u32, inst.line)?;
        lanes[l] = (l as u32, addr);
        for (c, v) in rows[l / 8][l % 8].iter_mut().enumerate() {
            *v = unsafe { (p.add(2 * c) as *const u16).read_unaligned() };
        }
    }
    // Each matrix's 8 rows of 16 bytes are one phase.
    env.work.record_shared(16, &lanes[..8 * n]);
    tensor::ldmatrix_distribute(inst, regs, &rows[..n], trans);
    Ok(())
}
