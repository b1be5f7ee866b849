//! ld/st/atom/cvta: address resolution over the state spaces and generic windows, with the
//! always-on checks (bounds, alignment, initcheck for global, race check for shared).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::float::*;
use super::lanes::*;
use crate::block::BlockEnv;
use crate::ir::*;
use crate::memory::*;
use crate::ordering::Conflict;
use crate::report::{Report, ReportKind};
use crate::shadow::SharedFault;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// (Read, Write, Atomic.)
    Read,
    Write,
    Atomic,
}

impl BlockEnv<'_> {
    /// A pointer to `size` bytes at `addr` in `space` for thread (warp, lane), after all checks.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &mut self,
        space: Space,
        addr: u64,
        size: u64,
        kind: Kind,
        warp: u32,
        lane: u32,
        line: u32,
    ) -> Result<*mut u8, Report> {
        self.resolve_aligned(space, addr, size, size, kind, warp, lane, line)
    }

    /// `resolve` with an explicit alignment requirement (cp.async reads `src-size` bytes of a
    /// `cp-size`-aligned source).
    #[allow(clippy::too_many_arguments)]
    pub fn resolve_aligned(
        &mut self,
        space: Space,
        addr: u64,
        size: u64,
        align: u64,
        kind: Kind,
        warp: u32,
        lane: u32,
        line: u32,
    ) -> Result<*mut u8, Report> {
        let (space, a) = resolve_space(space, addr);
        if a % align != 0 {
            return Err(self.report(
                ReportKind::Misaligned,
                warp,
                lane,
                line,
                Some(addr),
                format!("{size}-byte {} at an address {} bytes past a {align}-byte boundary", kind.name(), a % align),
            ));
        }
        let tid = warp * 32 + lane;
        match space {
            Space::Global => {
                let l = self.launch;
                let found = match l.allocs.get(self.last_alloc) {
                    Some(al) if a >= al.base && a + size <= al.end() => Ok((self.last_alloc, a - al.base)),
                    _ => find_in(l.allocs, l.freed, a, size),
                };
                match found {
                    Ok((i, off)) => {
                        self.last_alloc = i;
                        let al = &l.allocs[i];
                        if kind == Kind::Write || kind == Kind::Atomic {
                            if kind == Kind::Atomic {
                                if let Some(b) = al.first_uninit(off, size) {
                                    return Err(self.uninit(warp, lane, line, a, al.id, b));
                                }
                            }
                            al.mark_init(off, size);
                        } else if let Some(b) = al.first_uninit(off, size) {
                            return Err(self.uninit(warp, lane, line, a, al.id, b));
                        }
                        let (write, atomic) = (kind != Kind::Read, kind == Kind::Atomic);
                        if let Err(c) = self.order.access(&l.order, i, al, off, size, tid, write, atomic) {
                            return Err(self.global_race(kind, warp, lane, line, a, al.id, c));
                        }
                        Ok(unsafe { al.data_ptr().add(off as usize) })
                    }
                    Err(MemError::OutOfBounds(s)) | Err(MemError::Uninitialized { detail: s, .. }) => {
                        Err(self.report(ReportKind::GlobalOutOfBounds, warp, lane, line, Some(addr), s))
                    }
                }
            }
            Space::Shared => {
                let n = self.shared.len() as u64;
                if a + size > n {
                    return Err(self.report(
                        ReportKind::SharedOutOfBounds,
                        warp,
                        lane,
                        line,
                        Some(addr),
                        format!(
                            "{size}-byte {} at shared offset {a} is {} bytes past the end of the block's {n} bytes of shared memory",
                            kind.name(),
                            a + size - n
                        ),
                    ));
                }
                if let Some(b) = self.async_pending_in(a, size) {
                    return Err(self.report(
                        ReportKind::SharedRace,
                        warp,
                        lane,
                        line,
                        Some(addr),
                        format!(
                            "{} of shared byte {b}, the target of a cp.async (PTX line {}) not yet waited for (cp.async.wait_group/wait_all)",
                            kind.name(),
                            self.async_line(b)
                        ),
                    ));
                }
                match self.shadow.access(a as usize, size as usize, tid, line, kind != Kind::Read, kind == Kind::Atomic)
                {
                    None => {}
                    Some(SharedFault::Race { other_tid, other_line, other_write, byte }) => {
                        let t = self.thread_of(other_tid);
                        let what = format!(
                            "{} of shared byte {byte} by this thread conflicts with a {} by thread ({},{},{}) at PTX line {other_line} with no barrier between them",
                            kind.name(),
                            if other_write { "write" } else { "read" },
                            t[0],
                            t[1],
                            t[2],
                        );
                        return Err(self.report(ReportKind::SharedRace, warp, lane, line, Some(addr), what));
                    }
                    Some(SharedFault::Uninitialized { byte }) => {
                        let what = format!(
                            "{} of shared byte {byte}, which no thread of this block has written (shared memory starts undefined)",
                            kind.name()
                        );
                        return Err(self.report(ReportKind::UninitializedRead, warp, lane, line, Some(addr), what));
                    }
                }
                Ok(unsafe { self.shared.as_mut_ptr().add(a as usize) })
            }
            Space::Local => {
                let n = self.launch.func.local_bytes as u64;
                if a + size > n {
                    return Err(self.report(
                        ReportKind::LocalOutOfBounds,
                        warp,
                        lane,
                        line,
                        Some(addr),
                        format!(
                            "{size}-byte {} at local offset {a} is {} bytes past the end of the thread's {n} bytes of local memory",
                            kind.name(),
                            a + size - n
                        ),
                    ));
                }
                Ok(unsafe { self.local.as_mut_ptr().add((tid as u64 * n + a) as usize) })
            }
            Space::Param | Space::Const => {
                let (bytes, name) =
                    if space == Space::Param { (self.launch.params, "param") } else { (self.launch.consts, "const") };
                if kind != Kind::Read {
                    return Err(self.report(
                        ReportKind::InvalidAddress,
                        warp,
                        lane,
                        line,
                        Some(addr),
                        format!("{} to the read-only {name} space", kind.name()),
                    ));
                }
                if a + size > bytes.len() as u64 {
                    return Err(self.report(
                        ReportKind::InvalidAddress,
                        warp,
                        lane,
                        line,
                        Some(addr),
                        format!("{size}-byte read at {name} offset {a} past its {} bytes", bytes.len()),
                    ));
                }
                Ok(bytes[a as usize..].as_ptr() as *mut u8)
            }
            Space::Generic => unreachable!(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn global_race(&self, kind: Kind, warp: u32, lane: u32, line: u32, a: u64, id: u32, c: Conflict) -> Report {
        let [gx, gy, gz] = self.launch.grid;
        let b = c.writer_block;
        let block = if gx as u64 * gy as u64 * gz as u64 <= 1 << 22 {
            format!("block ({},{},{})", b % gx, (b / gx) % gy, b / (gx * gy))
        } else {
            format!("the block numbered {b} (modulo 2^22)")
        };
        let t = self.thread_of(c.writer_thread);
        self.report(
            ReportKind::GlobalRace,
            warp,
            lane,
            line,
            Some(a),
            format!(
                "{} of byte {} of allocation #{id}, which {block} thread ({},{},{}) {} earlier in this launch, with \
                 no ordering between the blocks: the writer needs a device-scope fence (__threadfence) after the \
                 write and then an atomic (the release), and this block an atomic that observes it and a fence \
                 before this access (the acquire)",
                kind.name(),
                c.byte,
                t[0],
                t[1],
                t[2],
                if c.writer_atomic { "updated atomically" } else { "wrote" }
            ),
        )
    }

    fn uninit(&self, warp: u32, lane: u32, line: u32, a: u64, id: u32, byte: u64) -> Report {
        self.report(
            ReportKind::UninitializedRead,
            warp,
            lane,
            line,
            Some(a),
            format!("read of byte {byte} of allocation #{id}, never written since it was allocated"),
        )
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Atomic => "atomic",
        }
    }
}

#[inline]
fn read_le(p: *const u8, n: u32) -> u64 {
    unsafe {
        match n {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

#[inline]
fn write_le(p: *mut u8, n: u32, v: u64) {
    unsafe {
        match n {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

pub fn exec(env: &mut BlockEnv, warp: u32, inst: &Inst, regs: &mut [u64], mask: u32) -> Result<(), Report> {
    let base = inst.addr as usize * 32;
    let line = inst.line;
    match inst.op {
        Op::Ld { space } | Op::St { space } => {
            let load = matches!(inst.op, Op::Ld { .. });
            let eb = inst.ty.bytes();
            let total = eb as u64 * inst.vec as u64;
            let kind = if load { Kind::Read } else { Kind::Write };
            let mut global = [(0u64, 0u64); 32];
            let mut global_lanes = 0;
            let mut shared = [(0u32, 0u64); 32];
            let mut shared_lanes = 0;
            let mut m = mask;
            while m != 0 {
                let l = m.trailing_zeros() as usize;
                m &= m - 1;
                let addr = regs[base + l].wrapping_add(inst.off as u64);
                let p = env.resolve(space, addr, total, kind, warp, l as u32, line)?;
                match resolve_space(space, addr) {
                    (Space::Shared, offset) => {
                        shared[shared_lanes] = (l as u32, offset);
                        shared_lanes += 1;
                    }
                    _ if is_global(space, addr) => {
                        global[global_lanes] = (addr, total);
                        global_lanes += 1;
                    }
                    _ => {}
                }
                for k in 0..inst.vec as usize {
                    let pk = unsafe { p.add(k * eb as usize) };
                    if load {
                        let v = read_le(pk, eb);
                        let v = if inst.ty.signed() { sext(v, eb * 8) as u64 } else { v };
                        regs[inst.d[k] as usize * 32 + l] = v;
                    } else {
                        write_le(pk, eb, regs[inst.s[k] as usize * 32 + l]);
                    }
                }
            }
            env.traffic.record(!load, &global[..global_lanes]);
            env.work.record_shared(total, &shared[..shared_lanes]);
        }
        Op::Atom { space, op } => {
            let eb = inst.ty.bytes();
            let mut m = mask;
            while m != 0 {
                let l = m.trailing_zeros() as usize;
                m &= m - 1;
                let addr = regs[base + l].wrapping_add(inst.off as u64);
                let p = env.resolve(space, addr, eb as u64, Kind::Atomic, warp, l as u32, line)?;
                let b = regs[inst.s[0] as usize * 32 + l];
                let c = if inst.s[1] != NONE { regs[inst.s[1] as usize * 32 + l] } else { 0 };
                let ty = inst.ty;
                let f = |old: u64| atom_apply(op, ty, old, b, c);
                // Real atomics: blocks run in parallel over the cores.
                let rmw = || match eb {
                    4 => {
                        let a = unsafe { AtomicU32::from_ptr(p as *mut u32) };
                        let mut cur = a.load(Ordering::Relaxed);
                        loop {
                            let new = f(cur as u64) as u32;
                            match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                                Ok(_) => break Some(cur as u64),
                                Err(x) => cur = x,
                            }
                        }
                    }
                    8 => {
                        let a = unsafe { AtomicU64::from_ptr(p as *mut u64) };
                        let mut cur = a.load(Ordering::Relaxed);
                        loop {
                            let new = f(cur);
                            match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                                Ok(_) => break Some(cur),
                                Err(x) => cur = x,
                            }
                        }
                    }
                    _ => None,
                };
                // A device-scope atomic on global memory releases and acquires between blocks.
                let old = if is_global(space, addr) && !inst.flags.cta_scope {
                    let launch = env.launch;
                    let order = &mut env.order;
                    launch.order.atomically(rmw, |releases| {
                        order.atomic(releases, launch.allocs, launch.order.launch, addr, &inst.flags)
                    })
                } else {
                    rmw()
                };
                let Some(old) = old else {
                    return Err(env.report(
                        ReportKind::Fault,
                        warp,
                        l as u32,
                        line,
                        Some(addr),
                        format!("{eb}-byte atomics are not supported"),
                    ));
                };
                regs[inst.d[0] as usize * 32 + l] = old;
            }
        }
        Op::Cvta { space, to } => {
            let window = match space {
                Space::Shared => SHARED_WINDOW,
                Space::Local => LOCAL_WINDOW,
                Space::Param => PARAM_WINDOW,
                Space::Const => CONST_WINDOW,
                _ => 0,
            };
            let m = low(inst.ty.bits());
            map1(regs, mask, inst.d[0], inst.s[0], |x| {
                if window == 0 {
                    x
                } else if to {
                    x.wrapping_sub(window) & m
                } else {
                    x.wrapping_add(window) & m
                }
            });
        }
        _ => unreachable!(),
    }
    Ok(())
}

/// The state space an access in `space` at `addr` reaches, and its address there: a generic
/// address in the shared, local, param or const window maps into that space, any other to global.
fn resolve_space(space: Space, addr: u64) -> (Space, u64) {
    match space {
        Space::Generic => match addr {
            x if (SHARED_WINDOW..SHARED_WINDOW + WINDOW_SIZE).contains(&x) => (Space::Shared, x - SHARED_WINDOW),
            x if (LOCAL_WINDOW..LOCAL_WINDOW + WINDOW_SIZE).contains(&x) => (Space::Local, x - LOCAL_WINDOW),
            x if (PARAM_WINDOW..PARAM_WINDOW + WINDOW_SIZE).contains(&x) => (Space::Param, x - PARAM_WINDOW),
            x if (CONST_WINDOW..CONST_WINDOW + WINDOW_SIZE).contains(&x) => (Space::Const, x - CONST_WINDOW),
            x => (Space::Global, x),
        },
        s => (s, addr),
    }
}

/// Whether an access in `space` at `addr` reaches global memory.
pub fn is_global(space: Space, addr: u64) -> bool {
    resolve_space(space, addr).0 == Space::Global
}

fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    let bits = ty.bits();
    let m = low(bits);
    match (op, ty) {
        (AtomOp::Add, Ty::F32) => fb(f(old) + f(b)),
        (AtomOp::Add, Ty::F64) => db(d(old) + d(b)),
        (AtomOp::Min, Ty::F32) => fb(min32(f(old), f(b))),
        (AtomOp::Max, Ty::F32) => fb(max32(f(old), f(b))),
        (AtomOp::Add, _) => old.wrapping_add(b) & m,
        (AtomOp::Min, _) if ty.signed() => sext(old, bits).min(sext(b, bits)) as u64 & m,
        (AtomOp::Max, _) if ty.signed() => sext(old, bits).max(sext(b, bits)) as u64 & m,
        (AtomOp::Min, _) => (old & m).min(b & m),
        (AtomOp::Max, _) => (old & m).max(b & m),
        (AtomOp::Inc, _) => {
            if (old & m) >= (b & m) {
                0
            } else {
                old + 1
            }
        }
        (AtomOp::Dec, _) => {
            if (old & m) == 0 || (old & m) > (b & m) {
                b & m
            } else {
                old - 1
            }
        }
        (AtomOp::And, _) => old & b & m,
        (AtomOp::Or, _) => (old | b) & m,
        (AtomOp::Xor, _) => (old ^ b) & m,
        (AtomOp::Exch, _) => b & m,
        (AtomOp::Cas, _) => {
            if (old & m) == (b & m) {
                c & m
            } else {
                old
            }
        }
    }
}
