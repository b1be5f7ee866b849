//! Race check for shared memory: per byte, the last writer and the readers since the last
//! ordering point. Ordering points are block barriers (a block-wide epoch) and `bar.warp.sync`
//! (a per-warp epoch, ordering only lanes of that warp). Shuffles and votes order nothing.
//! Epochs only grow (also across blocks run by the same worker), so nothing is ever cleared: a
//! byte whose last write is older than the block's first epoch was not written by this block, and
//! reading it is reported (shared memory starts undefined on a GPU; here it starts at zero, which
//! would hide a kernel that forgot to write a tile's edge or zero a shared accumulator).
//!
//! A record is one u64 (epoch 32 bits, warp epoch 16, thread 11, atomic 1, many-readers 1); the
//! PTX lines of the accesses sit in a parallel array read only for reports.

const TID_SHIFT: u32 = 48;
const ATOMIC: u64 = 1 << 59;
const MANY: u64 = 1 << 60;

#[inline]
fn epoch(r: u64) -> u32 {
    r as u32
}
#[inline]
fn warp_epoch(r: u64) -> u16 {
    (r >> 32) as u16
}
#[inline]
fn tid(r: u64) -> u32 {
    ((r >> TID_SHIFT) & 0x7ff) as u32
}

/// A byte's new [last write, reads since] and the PTX lines of those accesses.
type ByteUpdate = ([u64; 2], [u32; 2]);

/// What an access of shared memory did wrong, at shared byte `byte`.
pub enum SharedFault {
    /// It conflicts with an earlier access not ordered before it: that access's thread, PTX line,
    /// and whether it was a write.
    Race { other_tid: u32, other_line: u32, other_write: bool, byte: u64 },
    /// It reads (or updates atomically) a byte no thread of the block has written.
    Uninitialized { byte: u64 },
}

impl SharedFault {
    fn at(mut self, at: u64) -> Self {
        match &mut self {
            SharedFault::Race { byte, .. } | SharedFault::Uninitialized { byte } => *byte = at,
        }
        self
    }
}

pub struct SharedShadow {
    /// Per byte: [last write, reads since].
    recs: Vec<[u64; 2]>,
    lines: Vec<[u32; 2]>,
    epoch: u32,
    /// The current block's first epoch: writes of earlier epochs were other blocks'.
    block_epoch: u32,
    warp_epochs: Vec<u16>,
}

impl Default for SharedShadow {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedShadow {
    pub fn new() -> Self {
        SharedShadow { recs: Vec::new(), lines: Vec::new(), epoch: 1, block_epoch: 1, warp_epochs: Vec::new() }
    }

    /// Prepare for a new block with `size` shared bytes and `warps` warps.
    pub fn start_block(&mut self, size: usize, warps: usize) {
        if self.recs.len() < size {
            self.recs.resize(size, [0; 2]);
            self.lines.resize(size, [0; 2]);
        }
        self.epoch += 1;
        self.block_epoch = self.epoch;
        self.warp_epochs.clear();
        self.warp_epochs.resize(warps, 0);
    }

    pub fn barrier(&mut self) {
        self.epoch += 1;
    }

    pub fn warp_sync(&mut self, warp: usize) {
        self.warp_epochs[warp] = self.warp_epochs[warp].wrapping_add(1);
    }

    /// Whether an earlier access (record `r`, of this epoch) is ordered before thread `t`'s.
    #[inline]
    fn ordered(&self, r: u64, t: u32) -> bool {
        let rt = tid(r);
        rt == t || (rt / 32 == t / 32 && self.warp_epochs[(t / 32) as usize] != warp_epoch(r))
    }

    /// Record an access of `len` bytes at `off` by thread `t`; the first faulty byte's fault, if any.
    pub fn access(
        &mut self,
        off: usize,
        len: usize,
        t: u32,
        line: u32,
        write: bool,
        atomic: bool,
    ) -> Option<SharedFault> {
        let me = self.epoch as u64
            | (self.warp_epochs[(t / 32) as usize] as u64) << 32
            | (t as u64) << TID_SHIFT
            | if atomic { ATOMIC } else { 0 };
        // Neighbouring bytes usually share their history (a word written by one thread): a byte
        // whose records equal the previous byte's gets the previous byte's update, unchecked again.
        // Most often all of them do: one check, and the update filled in.
        let first = self.recs[off];
        if self.recs[off + 1..off + len].iter().all(|&r| r == first) {
            let (recs, lines) = match self.step(first, self.lines[off], me, t, line, write, atomic) {
                Ok(new) => new,
                Err(fault) => return Some(fault.at(off as u64)),
            };
            self.recs[off..off + len].fill(recs);
            self.lines[off..off + len].fill(lines);
            return None;
        }
        let mut previous: Option<([u64; 2], ByteUpdate)> = None;
        for i in off..off + len {
            let old = self.recs[i];
            let new = match previous {
                Some((previous_old, previous_new)) if previous_old == old => previous_new,
                _ => match self.step(old, self.lines[i], me, t, line, write, atomic) {
                    Ok(new) => new,
                    Err(fault) => return Some(fault.at(i as u64)),
                },
            };
            (self.recs[i], self.lines[i]) = new;
            previous = Some((old, new));
        }
        None
    }

    /// One byte's check and update for an access by thread `t` (record `me`): the byte's new
    /// [last write, reads since] and their lines, or the fault (its `byte` left for the caller).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn step(
        &self,
        [w, r]: [u64; 2],
        lines: [u32; 2],
        me: u64,
        t: u32,
        line: u32,
        write: bool,
        atomic: bool,
    ) -> Result<ByteUpdate, SharedFault> {
        if (!write || atomic) && epoch(w) < self.block_epoch {
            return Err(SharedFault::Uninitialized { byte: 0 });
        }
        // Against the last write: any access races unless ordered or both atomic.
        if epoch(w) == self.epoch && !self.ordered(w, t) && !(atomic && w & ATOMIC != 0) {
            return Err(SharedFault::Race { other_tid: tid(w), other_line: lines[0], other_write: true, byte: 0 });
        }
        let reader_live = epoch(r) == self.epoch;
        if write && reader_live && !(atomic && r & ATOMIC != 0) {
            let unordered = !self.ordered(r, t);
            if unordered || (r & MANY != 0 && tid(r) / 32 != t / 32) {
                return Err(SharedFault::Race { other_tid: tid(r), other_line: lines[1], other_write: false, byte: 0 });
            }
        }
        Ok(if write {
            // An atomic also reads: it stays as a reader that only atomics may follow.
            ([me, if atomic { me } else { 0 }], [line, line])
        } else if !reader_live || tid(r) == t || self.ordered(r, t) {
            let many = if reader_live { r & MANY } else { 0 };
            ([w, me | many], [lines[0], line])
        } else if r & MANY == 0 {
            ([w, r | MANY], lines)
        } else {
            ([w, r], lines)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault in words: a race's other access (thread, PTX line, write) and the byte, or `uninit`
    /// and the byte.
    fn fault(f: Option<SharedFault>) -> Option<String> {
        f.map(|f| match f {
            SharedFault::Race { other_tid, other_line, other_write, byte } => {
                format!("race with thread {other_tid} line {other_line} write {other_write} at byte {byte}")
            }
            SharedFault::Uninitialized { byte } => format!("uninit at byte {byte}"),
        })
    }

    fn block() -> SharedShadow {
        let mut shadow = SharedShadow::new();
        shadow.start_block(64, 4);
        shadow
    }

    #[test]
    fn bytes_of_one_word_keep_their_own_histories() {
        let mut s = block();
        // Thread 0 writes word 0 whole; thread 40 (another warp) writes its byte 2, unordered.
        assert_eq!(fault(s.access(0, 4, 0, 1, true, false)), None);
        assert_eq!(
            fault(s.access(2, 1, 40, 2, true, false)),
            Some("race with thread 0 line 1 write true at byte 2".into())
        );
        let mut s = block();
        assert_eq!(fault(s.access(0, 4, 0, 1, true, false)), None);
        s.barrier();
        // Now ordered: thread 40 writes bytes 0-1; bytes 2-3 keep thread 0's write.
        assert_eq!(fault(s.access(0, 2, 40, 2, true, false)), None);
        // Thread 64 reads bytes 2-3 (thread 0's, before the barrier): fine; the whole word: not.
        assert_eq!(fault(s.access(2, 2, 64, 3, false, false)), None);
        assert_eq!(
            fault(s.access(0, 4, 64, 4, false, false)),
            Some("race with thread 40 line 2 write true at byte 0".into())
        );
        s.barrier();
        // Thread 96 writes the whole word over both histories.
        assert_eq!(fault(s.access(0, 4, 96, 5, true, false)), None);
        assert_eq!(fault(s.access(0, 8, 96, 6, false, false)), Some("uninit at byte 4".into()));
        assert_eq!(
            fault(s.access(1, 1, 1, 7, false, false)),
            Some("race with thread 96 line 5 write true at byte 1".into())
        );
    }

    #[test]
    fn a_partly_written_word_is_uninitialized_past_what_was_written() {
        let mut s = block();
        assert_eq!(fault(s.access(8, 2, 5, 1, true, false)), None);
        assert_eq!(fault(s.access(8, 2, 5, 2, false, false)), None);
        assert_eq!(fault(s.access(8, 4, 5, 3, false, false)), Some("uninit at byte 10".into()));
        // A later block sees none of this block's writes.
        s.start_block(64, 4);
        assert_eq!(fault(s.access(8, 2, 5, 4, false, false)), Some("uninit at byte 8".into()));
    }
}
