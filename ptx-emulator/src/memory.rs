//! Device memory: global allocations with an initcheck shadow (one byte per data byte: written
//! since allocation or not), and the generic address windows of the other state spaces.
//!
//! Blocks of a launch run in parallel and share global memory, as on a GPU: allocations are
//! accessed through raw pointers; plain accesses from different blocks to the same bytes are the
//! kernel's own race (as on hardware); atomics use real atomic instructions.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Generic address windows (disjoint from global allocations, which start at `GLOBAL_BASE`).
pub const SHARED_WINDOW: u64 = 0x0000_1000_0000_0000;
pub const LOCAL_WINDOW: u64 = 0x0000_2000_0000_0000;
pub const PARAM_WINDOW: u64 = 0x0000_3000_0000_0000;
pub const CONST_WINDOW: u64 = 0x0000_4000_0000_0000;
pub const WINDOW_SIZE: u64 = 0x0000_0100_0000_0000;
pub const GLOBAL_BASE: u64 = 0x0000_7f00_0000_0000;

pub struct Allocation {
    pub id: u32,
    pub base: u64,
    pub size: u64,
    /// 16-byte aligned storage (atomics and vector accesses need natural alignment on the host).
    data: UnsafeCell<Vec<u128>>,
    /// 1 where the byte was written since allocation.
    init: UnsafeCell<Vec<u8>>,
    /// Per 4-byte word, its last kernel write (`ordering`): made at the first kernel write.
    writers: OnceLock<Box<[AtomicU64]>>,
}

// SAFETY: the bytes are accessed through raw pointers within bounds checked by the caller; races
// between blocks on the same bytes are the emulated program's races, as on a GPU.
unsafe impl Sync for Allocation {}
unsafe impl Send for Allocation {}

impl Allocation {
    pub fn data_ptr(&self) -> *mut u8 {
        unsafe { (*self.data.get()).as_mut_ptr() as *mut u8 }
    }
    pub fn init_ptr(&self) -> *mut u8 {
        unsafe { (*self.init.get()).as_mut_ptr() }
    }
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
    /// First byte in `[off, off+len)` never written, if any.
    pub fn first_uninit(&self, off: u64, len: u64) -> Option<u64> {
        let p = self.init_ptr();
        (off..off + len).find(|&i| unsafe { *p.add(i as usize) } == 0)
    }
    pub fn mark_init(&self, off: u64, len: u64) {
        unsafe { std::ptr::write_bytes(self.init_ptr().add(off as usize), 1, len as usize) }
    }
    /// The last kernel write of each 4-byte word (`ordering::Record`), made on first use.
    pub fn writers(&self) -> &[AtomicU64] {
        self.writers.get_or_init(|| (0..self.size.div_ceil(4)).map(|_| AtomicU64::new(0)).collect())
    }
    /// `writers`, if a kernel ever wrote here.
    pub fn writers_if_any(&self) -> Option<&[AtomicU64]> {
        self.writers.get().map(|w| &w[..])
    }
}

/// All global allocations, sorted by base address.
#[derive(Default)]
pub struct GlobalMemory {
    allocs: Vec<Arc<Allocation>>,
    next_base: u64,
    next_id: u32,
    /// Freed ranges, for reports about use after free.
    freed: Vec<(u32, u64, u64)>,
    pub used: u64,
    /// The last launch's number (`ordering`: a word's writer counts only within its launch).
    launches: AtomicU32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemError {
    /// Not inside a live allocation: a description of the nearest one.
    OutOfBounds(String),
    Uninitialized {
        first_byte: u64,
        detail: String,
    },
}

impl GlobalMemory {
    pub fn new() -> Self {
        GlobalMemory { next_base: GLOBAL_BASE, ..Default::default() }
    }

    /// A new allocation, 256-byte aligned, with a gap after it so that small overruns land in
    /// no allocation.
    pub fn alloc(&mut self, size: u64) -> u64 {
        let base = self.next_base;
        self.next_base = (base + size.max(1) + 256 + 255) & !255;
        let id = self.next_id;
        self.next_id += 1;
        let a = Allocation {
            id,
            base,
            size,
            data: UnsafeCell::new(vec![0; (size as usize).div_ceil(16)]),
            init: UnsafeCell::new(vec![0; size as usize]),
            writers: OnceLock::new(),
        };
        self.allocs.push(Arc::new(a));
        self.used += size;
        base
    }

    pub fn free(&mut self, ptr: u64) -> Result<(), String> {
        match self.allocs.iter().position(|a| a.base == ptr) {
            Some(i) => {
                let a = self.allocs.remove(i);
                self.used -= a.size;
                self.freed.push((a.id, a.base, a.size));
                Ok(())
            }
            None => Err(format!("free of {ptr:#x}, which is not the start of a live allocation")),
        }
    }

    pub fn allocations(&self) -> &[Arc<Allocation>] {
        &self.allocs
    }

    /// A number for the next launch, never 0; the 16 bits of a word's record wrap every 65535
    /// launches, and the records are then cleared so that an old write never passes for a new one.
    pub fn next_launch(&self) -> u16 {
        loop {
            let n = self.launches.fetch_add(1, Ordering::Relaxed).wrapping_add(1) as u16;
            if n != 0 {
                return n;
            }
            for a in &self.allocs {
                for w in a.writers_if_any().unwrap_or(&[]) {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// The allocation holding `[addr, addr+len)` and the offset in it.
    pub fn find(&self, addr: u64, len: u64) -> Result<(&Arc<Allocation>, u64), MemError> {
        find_in(&self.allocs, &self.freed, addr, len).map(|(i, o)| (&self.allocs[i], o))
    }

    pub fn freed(&self) -> &[(u32, u64, u64)] {
        &self.freed
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), MemError> {
        let (a, off) = self.find(addr, bytes.len() as u64)?;
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), a.data_ptr().add(off as usize), bytes.len()) };
        a.mark_init(off, bytes.len() as u64);
        Ok(())
    }

    /// Host read: no initcheck (a host copy of never-written memory is not a kernel bug).
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), MemError> {
        let (a, off) = self.find(addr, out.len() as u64)?;
        unsafe { std::ptr::copy_nonoverlapping(a.data_ptr().add(off as usize), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Device-to-device copy: the destination's init state follows the source's.
    pub fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), MemError> {
        let (sa, so) = self.find(src, len)?;
        let (da, dof) = self.find(dst, len)?;
        unsafe {
            std::ptr::copy(sa.data_ptr().add(so as usize), da.data_ptr().add(dof as usize), len as usize);
            std::ptr::copy(sa.init_ptr().add(so as usize), da.init_ptr().add(dof as usize), len as usize);
        }
        Ok(())
    }
}

/// Lookup in a base-sorted allocation list; on failure, the nearest allocation and the distance.
pub fn find_in(
    allocs: &[Arc<Allocation>],
    freed: &[(u32, u64, u64)],
    addr: u64,
    len: u64,
) -> Result<(usize, u64), MemError> {
    let i = allocs.partition_point(|a| a.base <= addr);
    if i > 0 {
        let a = &allocs[i - 1];
        if addr + len <= a.end() {
            return Ok((i - 1, addr - a.base));
        }
    }
    Err(MemError::OutOfBounds(describe_miss(allocs, freed, addr, len)))
}

pub fn describe_miss(allocs: &[Arc<Allocation>], freed: &[(u32, u64, u64)], addr: u64, len: u64) -> String {
    if let Some((id, b, s)) = freed.iter().find(|(_, b, s)| addr >= *b && addr < b + s) {
        return format!(
            "{len}-byte access at {addr:#x} is inside allocation #{id} ({b:#x}, {s} bytes), which was freed"
        );
    }
    let i = allocs.partition_point(|a| a.base <= addr);
    let before = if i > 0 { Some(&allocs[i - 1]) } else { None };
    let after = allocs.get(i);
    let d_before = before.map(|a| (addr + len).saturating_sub(a.end()));
    let d_after = after.map(|a| a.base - addr);
    match (before, after) {
        (Some(a), _) if addr < a.end() => format!(
            "{len}-byte access at {addr:#x} runs {} bytes past the end of allocation #{} ({:#x}, {} bytes)",
            addr + len - a.end(),
            a.id,
            a.base,
            a.size
        ),
        (Some(a), _) if after.is_none() || d_before.unwrap() <= d_after.unwrap() => format!(
            "{len}-byte access at {addr:#x} is {} bytes past the end of allocation #{} ({:#x}, {} bytes)",
            addr - a.end(),
            a.id,
            a.base,
            a.size
        ),
        (None, Some(b)) | (Some(_), Some(b)) => format!(
            "{len}-byte access at {addr:#x} is {} bytes before the start of allocation #{} ({:#x}, {} bytes)",
            b.base - addr,
            b.id,
            b.base,
            b.size
        ),
        _ => format!("{len}-byte access at {addr:#x}: no allocation is live"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_numbers_skip_zero_and_clear_the_writers_when_they_wrap() {
        let mut mem = GlobalMemory::new();
        let a = mem.alloc(8);
        let (alloc, _) = mem.find(a, 8).unwrap();
        assert_eq!(mem.next_launch(), 1);
        alloc.writers()[1].store(u64::MAX, Ordering::Relaxed);
        for n in 2..=u16::MAX {
            assert_eq!(mem.next_launch(), n);
        }
        assert_eq!(alloc.writers()[1].load(Ordering::Relaxed), u64::MAX);
        // Past 65535 the numbers start again at 1, and no record of an old launch is left.
        assert_eq!(mem.next_launch(), 1);
        assert_eq!(alloc.writers()[1].load(Ordering::Relaxed), 0);
    }
}
