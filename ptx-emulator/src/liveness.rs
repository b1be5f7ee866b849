//! Which register slots a thread may read before it has written them: the only slots whose value
//! at a block's start can matter. A block's warps then reuse the register files of the worker's
//! previous block of the same function (`block::REGISTER_FILES`) with just these slots zeroed,
//! instead of a fresh zeroed file: NVRTC's PTX names every value once, so a large kernel has tens
//! of thousands of slots (groupnorm_backward_partial had 46k, 12 MB a warp), of which a block
//! touches a few.
//!
//! Backward liveness over basic blocks, per thread: every path a thread can take is a path of the
//! control-flow graph, and a warp writes a slot only for the lanes that execute the instruction.
//! Reads are over-approximated (every source operand) and writes under-approximated (a guarded
//! write, or one that may leave a lane's slot as it was, kills nothing), so an error only zeroes
//! more slots than needed.

use crate::ir::{Function, Inst, Op, Slot, NONE};

/// Slots `inst` may read.
fn reads(inst: &Inst, mut f: impl FnMut(Slot)) {
    let mut each = |s: Slot| {
        if s != NONE {
            f(s)
        }
    };
    each(inst.guard);
    each(inst.addr);
    inst.s.iter().for_each(|&s| each(s));
    if let Op::Mma(m) = &inst.op {
        m.a[..m.na as usize].iter().chain(&m.b[..m.nb as usize]).chain(&m.c).for_each(|&s| each(s));
    }
}

/// Slots `inst` certainly overwrites (whole, in every lane that executes it).
fn kills(inst: &Inst, mut f: impl FnMut(Slot)) {
    if inst.guard != NONE {
        return;
    }
    match &inst.op {
        // The carry flag (d[1]) is written only by the `.cc` forms.
        Op::AddCarry { .. } | Op::MadCarry { .. } => f(inst.d[0]),
        Op::Mma(m) => m.d.iter().for_each(|&s| f(s)),
        _ => inst.d.iter().filter(|&&s| s != NONE).for_each(|&s| f(s)),
    }
}

/// A set of slots, one bit each.
#[derive(Clone, PartialEq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, s: Slot) {
        self.0[s as usize / 64] |= 1 << (s % 64);
    }
    fn clear(&mut self, s: Slot) {
        self.0[s as usize / 64] &= !(1 << (s % 64));
    }
    fn has(&self, s: Slot) -> bool {
        self.0[s as usize / 64] >> (s % 64) & 1 == 1
    }
}

/// Where control can go after instruction `i` (a branch's target and, unless it is certain, the
/// next instruction).
fn successors(insts: &[Inst], i: usize) -> impl Iterator<Item = usize> {
    let inst = &insts[i];
    let certain = inst.guard == NONE;
    let (target, next) = match inst.op {
        Op::Bra => (Some(inst.target as usize), !certain),
        Op::Ret | Op::Exit | Op::Trap => (None, !certain),
        _ => (None, true),
    };
    target.into_iter().chain((next && i + 1 < insts.len()).then_some(i + 1))
}

/// The register slots a thread of `f` may read before writing them, ascending; `None` when an
/// instruction writes a constant or special slot (whose values are set once, not per block), so
/// that register files of `f` cannot be reused.
pub fn read_before_written(f: &Function) -> Option<Vec<Slot>> {
    let n = f.nslots as usize;
    let mut fixed = Bits::new(n);
    f.consts.iter().map(|&(s, _)| s).chain(f.specials.iter().map(|&(s, _)| s)).for_each(|s| fixed.set(s));
    let mut writes_fixed = false;
    for inst in &f.insts {
        kills(inst, |s| writes_fixed |= fixed.has(s));
        inst.d.iter().filter(|&&s| s != NONE).for_each(|&s| writes_fixed |= fixed.has(s));
    }
    if writes_fixed {
        return None;
    }

    // Basic blocks: leaders are the entry, branch targets, and what follows a control transfer.
    let insts = &f.insts;
    let mut leader = vec![false; insts.len() + 1];
    leader[0] = true;
    for (i, inst) in insts.iter().enumerate() {
        if matches!(inst.op, Op::Bra) {
            leader[inst.target as usize] = true;
        }
        if matches!(inst.op, Op::Bra | Op::Ret | Op::Exit | Op::Trap) {
            leader[i + 1] = true;
        }
    }
    let starts: Vec<usize> = (0..insts.len()).filter(|&i| leader[i]).collect();
    let ends: Vec<usize> = starts.iter().skip(1).copied().chain([insts.len()]).collect();
    let mut block_of = vec![0usize; insts.len()];
    for (b, (&s, &e)) in starts.iter().zip(&ends).enumerate() {
        block_of[s..e].fill(b);
    }

    // Per block: the slots it reads before any write in it (`used`), those it certainly writes
    // (`killed`), and its successors. Both lists are short; only the live sets are dense.
    let nb = starts.len();
    let mut used = vec![Vec::new(); nb];
    let mut killed = vec![Vec::new(); nb];
    let mut succs = vec![Vec::new(); nb];
    let mut written = Bits::new(n);
    for b in 0..nb {
        for inst in &insts[starts[b]..ends[b]] {
            reads(inst, |s| {
                if !written.has(s) {
                    used[b].push(s)
                }
            });
            kills(inst, |s| {
                if !written.has(s) {
                    written.set(s);
                    killed[b].push(s)
                }
            });
        }
        killed[b].iter().for_each(|&s| written.clear(s));
        succs[b] = successors(insts, ends[b] - 1).map(|i| block_of[i]).collect::<Vec<_>>();
    }

    // live_in(b) = used(b) | (live_out(b) & !killed(b)), live_out(b) = the successors' live_in;
    // iterated to the fixed point, last block first (most edges go forward).
    let mut live_in = vec![Bits::new(n); nb];
    let mut next = Bits::new(n);
    let mut changed = true;
    while changed {
        changed = false;
        for b in (0..nb).rev() {
            next.0.fill(0);
            for &t in &succs[b] {
                next.0.iter_mut().zip(&live_in[t].0).for_each(|(w, &l)| *w |= l);
            }
            killed[b].iter().for_each(|&s| next.clear(s));
            used[b].iter().for_each(|&s| next.set(s));
            if next != live_in[b] {
                std::mem::swap(&mut live_in[b], &mut next);
                changed = true;
            }
        }
    }
    let entry = &live_in[0];
    Some((0..n as Slot).filter(|&s| entry.has(s) && !fixed.has(s)).collect())
}
