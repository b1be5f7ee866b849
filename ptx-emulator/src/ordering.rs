//! Global-memory ordering between the blocks of one launch. Blocks of a launch run in any order
//! and at once, so a block that reads (or overwrites) bytes another block wrote in the same launch
//! must be ordered after that write the way the PTX memory model allows, which kernels do as
//!
//! - writer: the write, then a device-scope fence (`__threadfence`), then an atomic on some address
//!   (the release; an atomic with `.release` is its own fence);
//! - reader: an atomic on that address that comes later in the atomics' order (so it observes the
//!   release), then a device-scope fence (or the atomic itself `.acquire`), then the read.
//!
//! Any other cross-block read or overwrite is a global-memory race, reported: a fence missing on
//! either side, a `.cta` one, or no synchronisation at all (two blocks writing one output).
//! On a GPU such code works or fails by timing and by what L1 holds; here blocks run on host
//! threads with coherent memory, so the data alone would never show it.
//!
//! State: per 4-byte word of an allocation a kernel wrote, one `Record` of its last write (launch
//! number, writer block and thread, the writer block's first release covering it, the bytes, and
//! whether by an atomic). Per block (`BlockOrder`): a clock that advances at each fence (and
//! `.release` atomic), its last fence, the writes no release has covered yet (only in kernels
//! with an atomic or a fence: no other can release), the atomics whose releases await a fence,
//! and the releases it acquired.
//! Per launch (`LaunchOrder`), per address that atomics touched, the releases in the order those
//! atomics ran, appended under one lock with the atomic itself, so an atomic sees exactly the
//! releases before it.
//!
//! The fences and atomics are the block's, not one thread's: a fence by any of its threads after
//! a write (in the block's run) releases it at the block's next atomic, and one after an atomic
//! acquires for every later read of the block. Within a block it is the shared-memory race check
//! that holds threads to barriers: the threads that act on an atomic's result (the last block's
//! flag) learn it through shared memory, after a barrier. Other limits (the crate's README says
//! them): strong `ld`/`st` (`.volatile`, `.relaxed`, `.acquire`, `.release`) are not release or
//! acquire points here, only atomics and fences are, so ordering built on flags alone is reported
//! (stricter than hardware); a word's record keeps one writer (two blocks' disjoint bytes of one
//! word keep the later one's), and its first covering release stands for any later one of the
//! same block; write-after-read between blocks is not checked.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::ir::{Flags, Function, Op};
use crate::memory::Allocation;

/// A word's last kernel write, packed in a u64: launch 16 bits | block 22 | thread 10 | release
/// 11 | bytes 4 | atomic 1. Block numbers past 2^22 fold (a race between two blocks 2^22 apart is
/// missed); releases past 2^11 - 1 saturate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record(u64);

const BLOCK_BITS: u32 = 22;
const RELEASE_MAX: u32 = (1 << 11) - 1;

impl Record {
    /// A write no release covers yet (`with_release` adds one).
    fn new(launch: u16, block: u32, thread: u32, bytes: u8, atomic: bool) -> Self {
        Record(
            (launch as u64) << 48
                | ((block & ((1 << BLOCK_BITS) - 1)) as u64) << 26
                | ((thread & 0x3ff) as u64) << 16
                | ((bytes & 0xf) as u64) << 1
                | atomic as u64,
        )
    }
    fn launch(self) -> u16 {
        (self.0 >> 48) as u16
    }
    fn block(self) -> u32 {
        (self.0 >> 26) as u32 & ((1 << BLOCK_BITS) - 1)
    }
    fn thread(self) -> u32 {
        (self.0 >> 16) as u32 & 0x3ff
    }
    fn release(self) -> u32 {
        (self.0 >> 5) as u32 & RELEASE_MAX
    }
    fn bytes(self) -> u8 {
        (self.0 >> 1) as u8 & 0xf
    }
    fn atomic(self) -> bool {
        self.0 & 1 != 0
    }
    fn with_release(self, release: u32) -> Self {
        Record(self.0 & !((RELEASE_MAX as u64) << 5) | (release.min(RELEASE_MAX) as u64) << 5)
    }
}

/// Per address that atomics touched: (block, its release number), in the atomics' order.
pub type Releases = HashMap<u64, Vec<(u32, u32)>>;

/// What every block of a launch shares.
pub struct LaunchOrder {
    /// This launch's number (`GlobalMemory::next_launch`): records of other launches are ordered
    /// before it by the launch boundary.
    pub launch: u16,
    /// The kernel has an atomic or a fence: only then can a write be released, and blocks keep
    /// their unreleased writes.
    pub can_release: bool,
    releases: Mutex<Releases>,
}

impl LaunchOrder {
    pub fn new(launch: u16, f: &Function) -> Self {
        let can_release = f.insts.iter().any(|i| matches!(i.op, Op::Atom { .. } | Op::Fence));
        LaunchOrder { launch, can_release, releases: Mutex::new(HashMap::new()) }
    }

    /// Runs `atomic` (an atomic's read-modify-write) under the lock of the releases, then `after`
    /// with them: the releases' order is the atomics' order.
    pub fn atomically<T>(&self, atomic: impl FnOnce() -> T, after: impl FnOnce(&mut Releases)) -> T {
        let mut releases = self.releases.lock().unwrap_or_else(|e| e.into_inner());
        let old = atomic();
        after(&mut releases);
        old
    }
}

/// A cross-block access with no ordering: the earlier write's block (linear, folded to 22 bits)
/// and thread, the byte of the allocation, and whether the write was an atomic.
pub struct Conflict {
    pub writer_block: u32,
    pub writer_thread: u32,
    pub byte: u64,
    pub writer_atomic: bool,
}

/// Words `[word, word + words)` of allocation `alloc` (index in the launch's list), written at
/// block clock `clock`, not yet covered by a release.
struct Unreleased {
    alloc: u32,
    word: u64,
    words: u32,
    clock: u64,
}

/// An atomic of `address` that saw the first `seen` releases there, acquired at the block's next
/// fence.
struct Pending {
    address: u64,
    seen: usize,
}

/// One block's side.
pub struct BlockOrder {
    block: u32,
    clock: u64,
    /// The clock of the block's last device-scope fence (0: none yet).
    last_fence: u64,
    unreleased: Vec<Unreleased>,
    pending: Vec<Pending>,
    /// The block's releases so far (the newest covers all its writes before its last fence).
    releases: u32,
    /// Per writer block, the newest of its releases this block acquired.
    acquired: HashMap<u32, u32>,
}

impl BlockOrder {
    pub fn new(block_linear: u64) -> Self {
        BlockOrder {
            block: block_linear as u32 & ((1 << BLOCK_BITS) - 1),
            clock: 1,
            last_fence: 0,
            unreleased: Vec::new(),
            pending: Vec::new(),
            releases: 0,
            acquired: HashMap::new(),
        }
    }

    /// A device-scope fence: the block's writes before it can be released by its next atomic; the
    /// releases its atomics saw are acquired.
    pub fn fence(&mut self, launch: &LaunchOrder) {
        self.clock += 1;
        self.last_fence = self.clock;
        if !self.pending.is_empty() {
            let releases = launch.releases.lock().unwrap_or_else(|e| e.into_inner());
            for p in std::mem::take(&mut self.pending) {
                self.acquire(&releases, p.address, p.seen);
            }
        }
    }

    fn acquire(&mut self, releases: &Releases, address: u64, seen: usize) {
        for &(block, release) in releases.get(&address).map_or(&[][..], |r| &r[..seen]) {
            let newest = self.acquired.entry(block).or_insert(0);
            *newest = (*newest).max(release);
        }
    }

    /// An atomic at `address` has just run (under the releases' lock): it reads the releases
    /// before it, acquired at once (`.acquire`) or at the block's next fence, and it releases the
    /// block's writes before its last fence (before itself, with `.release`).
    pub fn atomic(
        &mut self,
        releases: &mut Releases,
        allocs: &[Arc<Allocation>],
        launch: u16,
        address: u64,
        flags: &Flags,
    ) {
        let seen = releases.get(&address).map_or(0, Vec::len);
        if flags.acquire {
            self.acquire(releases, address, seen);
        } else if seen > 0 {
            self.pending.push(Pending { address, seen });
        }
        if flags.release {
            self.clock += 1;
            self.last_fence = self.clock;
        }
        if self.last_fence == 0 {
            return;
        }
        let fence = self.last_fence;
        if self.unreleased.iter().any(|w| w.clock < fence) || self.releases == 0 {
            self.releases = (self.releases + 1).min(RELEASE_MAX);
        }
        let (release, block) = (self.releases, self.block);
        self.unreleased.retain(|w| {
            let covered = w.clock < fence;
            if covered {
                for word in &allocs[w.alloc as usize].writers()[w.word as usize..(w.word + w.words as u64) as usize] {
                    let r = Record(word.load(Ordering::Relaxed));
                    if r.launch() == launch && r.block() == block && r.release() == 0 {
                        let new = r.with_release(release).0;
                        let _ = word.compare_exchange(r.0, new, Ordering::Relaxed, Ordering::Relaxed);
                    }
                }
            }
            !covered
        });
        let list = releases.entry(address).or_default();
        if list.last() != Some(&(block, release)) {
            list.push((block, release));
        }
    }

    /// Whether this block acquired a release of `r`'s writer block that covers it.
    fn ordered_after(&self, r: Record) -> bool {
        r.release() != 0 && self.acquired.get(&r.block()).is_some_and(|&newest| newest >= r.release())
    }

    /// Checks an access of `size` bytes at offset `off` of allocation `alloc` (index `index` in
    /// the launch's list) by `thread` against the words' last writes in this launch, and records
    /// it if it writes.
    #[allow(clippy::too_many_arguments)]
    pub fn access(
        &mut self,
        launch: &LaunchOrder,
        index: usize,
        alloc: &Allocation,
        off: u64,
        size: u64,
        thread: u32,
        write: bool,
        atomic: bool,
    ) -> Result<(), Conflict> {
        let words = match write {
            true => alloc.writers(),
            false => match alloc.writers_if_any() {
                Some(w) => w,
                None => return Ok(()),
            },
        };
        let (first, last) = (off / 4, (off + size - 1) / 4);
        for w in first..=last {
            let lo = off.max(w * 4) - w * 4;
            let hi = (off + size).min(w * 4 + 4) - w * 4;
            let bytes = ((1u8 << hi) - 1) & !((1u8 << lo) - 1);
            let r = Record(words[w as usize].load(Ordering::Relaxed));
            let this_launch = r.launch() == launch.launch;
            if this_launch
                && r.block() != self.block
                && r.bytes() & bytes != 0
                && !(atomic && r.atomic())
                && !self.ordered_after(r)
            {
                return Err(Conflict {
                    writer_block: r.block(),
                    writer_thread: r.thread(),
                    byte: w * 4 + (r.bytes() & bytes).trailing_zeros() as u64,
                    writer_atomic: r.atomic(),
                });
            }
            if write {
                let keep = if this_launch && r.block() == self.block && r.release() == 0 { r.bytes() } else { 0 };
                let new = Record::new(launch.launch, self.block, thread, bytes | keep, atomic);
                words[w as usize].store(new.0, Ordering::Relaxed);
            }
        }
        if write && launch.can_release {
            self.unreleased.push(Unreleased {
                alloc: index as u32,
                word: first,
                words: (last - first + 1) as u32,
                clock: self.clock,
            });
        }
        Ok(())
    }
}
