//! Global-memory traffic as a GPU's L1 sees it: per warp-level access (a request), the 32-byte
//! sectors its active lanes touch. Sectors per request is Nsight Compute's coalescing measure
//! (`l1tex__t_sectors_pipe_lsu_mem_global_op_ld` over `..._requests_...`): 4 for a warp reading 32
//! consecutive f32, 32 for one whose lanes each read a different sector. Counted here from the
//! addresses the kernel really computes, so a kernel's coalescing can be judged without a GPU.

/// Sizes in bytes; `*_bytes` is what the lanes asked for, `*_sectors` what the memory system moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalTraffic {
    pub load_requests: u64,
    pub load_sectors: u64,
    pub load_bytes: u64,
    pub store_requests: u64,
    pub store_sectors: u64,
    pub store_bytes: u64,
}

pub const SECTOR_BYTES: u64 = 32;

impl GlobalTraffic {
    /// One warp-level access: each active lane's (address, bytes). cp.async counts as a load.
    pub fn record(&mut self, store: bool, lanes: &[(u64, u64)]) {
        if lanes.is_empty() {
            return;
        }
        // At most 32 lanes of at most 32 bytes each: two sectors a lane.
        let mut sectors = [0u64; 64];
        let mut n = 0;
        let mut bytes = 0;
        for &(address, size) in lanes {
            bytes += size;
            let (first, last) = (address / SECTOR_BYTES, (address + size.max(1) - 1) / SECTOR_BYTES);
            for s in first..=last.min(first + 1) {
                sectors[n] = s;
                n += 1;
            }
        }
        let sectors = &mut sectors[..n];
        sectors.sort_unstable();
        let distinct = 1 + sectors.windows(2).filter(|w| w[0] != w[1]).count() as u64;
        if store {
            self.store_requests += 1;
            self.store_sectors += distinct;
            self.store_bytes += bytes;
        } else {
            self.load_requests += 1;
            self.load_sectors += distinct;
            self.load_bytes += bytes;
        }
    }

    pub fn add(&mut self, other: &GlobalTraffic) {
        self.load_requests += other.load_requests;
        self.load_sectors += other.load_sectors;
        self.load_bytes += other.load_bytes;
        self.store_requests += other.store_requests;
        self.store_sectors += other.store_sectors;
        self.store_bytes += other.store_bytes;
    }

    /// Bytes asked for over bytes moved (1.0: every byte of every sector used; above 1 where lanes
    /// read the same bytes, a broadcast), loads and stores.
    pub fn load_efficiency(&self) -> f64 {
        ratio(self.load_bytes, self.load_sectors * SECTOR_BYTES)
    }
    pub fn store_efficiency(&self) -> f64 {
        ratio(self.store_bytes, self.store_sectors * SECTOR_BYTES)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}
