//! Warp collectives (`shfl.sync`, `vote.sync`, `redux.sync`, `activemask`) computed for a group
//! of lanes that all reached the instruction. The scheduler has checked the masks.

use super::lanes::*;
use crate::ir::*;

/// `shfl.sync`: for each lane of `exec`, the source lane and whether it was in range; the
/// caller checks that every source lane is in the group.
pub fn shfl_sources(mode: ShflMode, lane: u32, b: u32, c: u32) -> (u32, bool) {
    let cval = c & 0x1f;
    let seg = (c >> 8) & 0x1f;
    let max_lane = (lane & seg) | (cval & !seg);
    let min_lane = lane & seg;
    let (j, ok) = match mode {
        ShflMode::Up => {
            let j = lane as i32 - b as i32;
            (j, j >= max_lane as i32)
        }
        ShflMode::Down => {
            let j = lane as i32 + (b & 0x1f) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Bfly => {
            let j = (lane ^ (b & 0x1f)) as i32;
            (j, j <= max_lane as i32)
        }
        ShflMode::Idx => {
            let j = (min_lane | (b & 0x1f & !seg)) as i32;
            (j, j <= max_lane as i32)
        }
    };
    if ok {
        (j as u32, true)
    } else {
        (lane, false)
    }
}

pub fn shfl(inst: &Inst, mode: ShflMode, regs: &mut [u64], exec: u32, src_lane: &[u32; 32], ok: &[bool; 32]) {
    let a = inst.s[0] as usize * 32;
    let mut vals = [0u64; 32];
    vals.copy_from_slice(&regs[a..a + 32]);
    let _ = mode;
    for_lanes(exec, |l| {
        regs[inst.d[0] as usize * 32 + l] = vals[src_lane[l] as usize] & 0xffff_ffff;
        if inst.d[1] != NONE {
            regs[inst.d[1] as usize * 32 + l] = ok[l] as u64;
        }
    });
}

pub fn vote(inst: &Inst, mode: VoteMode, regs: &mut [u64], exec: u32) {
    let a = inst.s[0] as usize * 32;
    let mk = inst.s[1] as usize * 32;
    let neg = inst.flags.neg_c;
    let pred = |l: usize| (regs[a + l] & 1 == 1) ^ neg;
    let mut out = [0u64; 32];
    for_lanes(exec, |l| {
        let members = regs[mk + l] as u32 & exec;
        let mut ballot = 0u32;
        for_lanes(members, |k| {
            if pred(k) {
                ballot |= 1 << k
            }
        });
        out[l] = match mode {
            VoteMode::Ballot => ballot as u64,
            VoteMode::All => (ballot == members) as u64,
            VoteMode::Any => (ballot != 0) as u64,
            VoteMode::Uni => (ballot == members || ballot == 0) as u64,
        };
    });
    for_lanes(exec, |l| regs[inst.d[0] as usize * 32 + l] = out[l]);
}

pub fn redux(inst: &Inst, op: AtomOp, regs: &mut [u64], exec: u32) {
    let a = inst.s[0] as usize * 32;
    let mk = inst.s[1] as usize * 32;
    let signed = inst.ty.signed();
    let mut out = [0u64; 32];
    for_lanes(exec, |l| {
        let members = regs[mk + l] as u32 & exec;
        let mut acc: Option<u64> = None;
        for_lanes(members, |k| {
            let v = regs[a + k] & 0xffff_ffff;
            acc = Some(match acc {
                None => v,
                Some(x) => match op {
                    AtomOp::Add => (x + v) & 0xffff_ffff,
                    AtomOp::And => x & v,
                    AtomOp::Or => x | v,
                    AtomOp::Xor => x ^ v,
                    AtomOp::Min if signed => (x as i32).min(v as i32) as u32 as u64,
                    AtomOp::Max if signed => (x as i32).max(v as i32) as u32 as u64,
                    AtomOp::Min => x.min(v),
                    _ => x.max(v),
                },
            });
        });
        out[l] = acc.unwrap_or(0);
    });
    for_lanes(exec, |l| regs[inst.d[0] as usize * 32 + l] = out[l]);
}
