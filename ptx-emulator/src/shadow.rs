//! Race check for shared memory: per byte, the last writer and the readers since the last
//! ordering point. Ordering points are block barriers (a block-wide epoch) and `bar.warp.sync`
//! (a per-warp epoch, ordering only lanes of that warp). Shuffles and votes order nothing.
//! Epochs only grow (also across blocks run by the same worker), so nothing is ever cleared.

#[derive(Clone, Copy, Default)]
struct Access {
    epoch: u32,
    warp_epoch: u32,
    line: u32,
    tid: u16,
    atomic: bool,
}

#[derive(Clone, Copy, Default)]
struct ByteShadow {
    write: Access,
    read: Access,
    /// Two or more distinct threads read since the last barrier.
    many_readers: bool,
}

pub struct Race {
    /// The earlier access: thread, PTX line, and whether it was a write.
    pub other_tid: u32,
    pub other_line: u32,
    pub other_write: bool,
    pub byte: u64,
}

pub struct SharedShadow {
    bytes: Vec<ByteShadow>,
    epoch: u32,
    warp_epochs: Vec<u32>,
}

impl Default for SharedShadow {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedShadow {
    pub fn new() -> Self {
        SharedShadow { bytes: Vec::new(), epoch: 1, warp_epochs: Vec::new() }
    }

    /// Prepare for a new block with `size` shared bytes and `warps` warps.
    pub fn start_block(&mut self, size: usize, warps: usize) {
        if self.bytes.len() < size {
            self.bytes.resize(size, ByteShadow::default());
        }
        self.epoch += 1;
        self.warp_epochs.clear();
        self.warp_epochs.resize(warps, 0);
    }

    pub fn barrier(&mut self) {
        self.epoch += 1;
    }

    pub fn warp_sync(&mut self, warp: usize) {
        self.warp_epochs[warp] += 1;
    }

    #[inline]
    fn ordered(&self, a: &Access, tid: u16) -> bool {
        a.epoch != self.epoch
            || a.tid == tid
            || (a.tid as usize / 32 == tid as usize / 32 && self.warp_epochs[tid as usize / 32] != a.warp_epoch)
    }

    /// Record an access of `len` bytes at `off` by thread `tid`; the first conflicting byte, if any.
    pub fn access(&mut self, off: usize, len: usize, tid: u32, line: u32, write: bool, atomic: bool) -> Option<Race> {
        let tid16 = tid as u16;
        let me =
            Access { epoch: self.epoch, warp_epoch: self.warp_epochs[tid as usize / 32], line, tid: tid16, atomic };
        for i in off..off + len {
            let b = self.bytes[i];
            // Against the last write: any access races unless ordered or both atomic.
            if b.write.epoch == self.epoch && !self.ordered(&b.write, tid16) && !(atomic && b.write.atomic) {
                return Some(Race {
                    other_tid: b.write.tid as u32,
                    other_line: b.write.line,
                    other_write: true,
                    byte: i as u64,
                });
            }
            if write && b.read.epoch == self.epoch && !(atomic && b.read.atomic) {
                let other = !self.ordered(&b.read, tid16);
                if other || (b.many_readers && b.read.tid as usize / 32 != tid as usize / 32) {
                    return Some(Race {
                        other_tid: b.read.tid as u32,
                        other_line: b.read.line,
                        other_write: false,
                        byte: i as u64,
                    });
                }
            }
            let replace_reader = b.read.epoch != self.epoch || b.read.tid == tid16 || self.ordered(&b.read, tid16);
            let s = &mut self.bytes[i];
            if write {
                s.write = me;
                if atomic {
                    // An atomic also reads: keep it as a reader that only atomics may follow.
                    s.read = me;
                    s.many_readers = false;
                } else {
                    s.read = Access::default();
                    s.many_readers = false;
                }
            } else if replace_reader {
                let keep_many = s.read.epoch == self.epoch && s.many_readers;
                s.read = me;
                s.many_readers = keep_many;
            } else {
                s.many_readers = true;
            }
        }
        None
    }
}
