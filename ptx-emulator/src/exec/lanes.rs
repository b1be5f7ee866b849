//! Per-lane loops over a warp's register file (slot-major: `regs[slot * 32 + lane]`), one
//! decoded instruction for all lanes of a mask.

use crate::ir::Slot;

#[inline(always)]
pub fn for_lanes(mask: u32, mut f: impl FnMut(usize)) {
    if mask == u32::MAX {
        for l in 0..32 {
            f(l)
        }
    } else {
        let mut m = mask;
        while m != 0 {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            f(l);
        }
    }
}

#[inline(always)]
pub fn map1(regs: &mut [u64], mask: u32, d: Slot, a: Slot, f: impl Fn(u64) -> u64) {
    let (d, a) = (d as usize * 32, a as usize * 32);
    for_lanes(mask, |l| regs[d + l] = f(regs[a + l]));
}

#[inline(always)]
pub fn map2(regs: &mut [u64], mask: u32, d: Slot, a: Slot, b: Slot, f: impl Fn(u64, u64) -> u64) {
    let (d, a, b) = (d as usize * 32, a as usize * 32, b as usize * 32);
    for_lanes(mask, |l| regs[d + l] = f(regs[a + l], regs[b + l]));
}

#[inline(always)]
pub fn map3(regs: &mut [u64], mask: u32, d: Slot, a: Slot, b: Slot, c: Slot, f: impl Fn(u64, u64, u64) -> u64) {
    let (d, a, b, c) = (d as usize * 32, a as usize * 32, b as usize * 32, c as usize * 32);
    for_lanes(mask, |l| regs[d + l] = f(regs[a + l], regs[b + l], regs[c + l]));
}

#[inline(always)]
pub fn map4(regs: &mut [u64], mask: u32, d: Slot, s: [Slot; 4], f: impl Fn(u64, u64, u64, u64) -> u64) {
    let d = d as usize * 32;
    let [a, b, c, e] = s.map(|x| x as usize * 32);
    for_lanes(mask, |l| regs[d + l] = f(regs[a + l], regs[b + l], regs[c + l], regs[e + l]));
}

/// Mask of the low `bits` bits.
#[inline(always)]
pub fn low(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extend the low `bits` bits of `x`.
#[inline(always)]
pub fn sext(x: u64, bits: u32) -> i64 {
    if bits >= 64 {
        x as i64
    } else {
        let sh = 64 - bits;
        ((x << sh) as i64) >> sh
    }
}
