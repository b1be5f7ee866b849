//! Warp-level matrix instructions with the PTX ISA's fragment layouts: `mma.sync` (m16n8k16
//! f16/bf16 and m16n8k8 f16/bf16/tf32, f32 accumulators) and `ldmatrix` (m8n8 x1/x2/x4, .trans).
//! Products are exact and each output is summed in f64 and rounded once to f32: within what a
//! tensor core may give (its accumulation order and internal rounding are unspecified).

use super::half::{BF16, F16};
use super::lanes::*;
use crate::ir::*;

/// Element (row, col) of A (16 x K) held by (lane, register, half) for m16n8k16 / m16n8k8.
fn a_coord(kind: MmaKind, lane: usize, reg: usize, half: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    match kind.k {
        16 if kind.ty != MmaType::Tf32 => {
            let i = reg * 2 + half;
            let row = if i < 2 || (4..6).contains(&i) { g } else { g + 8 };
            let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
            (row, col)
        }
        8 if kind.ty == MmaType::Tf32 => {
            let row = if reg.is_multiple_of(2) { g } else { g + 8 };
            let col = if reg < 2 { t } else { t + 4 };
            (row, col)
        }
        _ => {
            // m16n8k8 f16/bf16: a0,a1 rows g; a2,a3 rows g+8.
            let row = if reg == 0 { g } else { g + 8 };
            (row, t * 2 + half)
        }
    }
}

/// Element (k, n) of B (K x 8) held by (lane, register, half).
fn b_coord(kind: MmaKind, lane: usize, reg: usize, half: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    if kind.ty == MmaType::Tf32 {
        (if reg == 0 { t } else { t + 4 }, g)
    } else {
        (t * 2 + half + reg * 8, g)
    }
}

/// Element (row, col) of C/D (16 x 8) held by (lane, register).
fn c_coord(lane: usize, reg: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    (if reg < 2 { g } else { g + 8 }, t * 2 + (reg & 1))
}

pub fn mma(m: &MmaOperands, regs: &mut [u64]) {
    let kind = m.kind;
    let k = kind.k as usize;
    let val = |bits: u32| -> f64 {
        match kind.ty {
            MmaType::F16 => F16.decode(bits & 0xffff),
            MmaType::Bf16 => BF16.decode(bits & 0xffff),
            // A tensor core reads the tf32 bits of the f32 register.
            MmaType::Tf32 => f32::from_bits(bits & 0xffff_e000) as f64,
        }
    };
    let per_reg = if kind.ty == MmaType::Tf32 { 1 } else { 2 };
    let mut a = [[0f64; 16]; 16];
    let mut b = [[0f64; 8]; 16];
    let mut c = [[0f64; 8]; 16];
    for lane in 0..32 {
        for (r, &s) in m.a[..m.na as usize].iter().enumerate() {
            let x = regs[s as usize * 32 + lane] as u32;
            for h in 0..per_reg {
                let (row, col) = a_coord(kind, lane, r, h);
                a[row][col] = val(x >> (16 * h));
            }
        }
        for (r, &s) in m.b[..m.nb as usize].iter().enumerate() {
            let x = regs[s as usize * 32 + lane] as u32;
            for h in 0..per_reg {
                let (row, col) = b_coord(kind, lane, r, h);
                b[row][col] = val(x >> (16 * h));
            }
        }
        for (r, &s) in m.c.iter().enumerate() {
            let (row, col) = c_coord(lane, r);
            c[row][col] = f32::from_bits(regs[s as usize * 32 + lane] as u32) as f64;
        }
    }
    for lane in 0..32 {
        for (r, &s) in m.d.iter().enumerate() {
            let (row, col) = c_coord(lane, r);
            let mut acc = c[row][col];
            for kk in 0..k {
                acc += a[row][kk] * b[kk][col];
            }
            regs[s as usize * 32 + lane] = (acc as f32).to_bits() as u64;
        }
    }
}

/// Distribute the rows `rows[matrix][row]` (8 b16 each) of an ldmatrix to the lanes' registers.
pub fn ldmatrix_distribute(inst: &Inst, regs: &mut [u64], rows: &[[[u16; 8]; 8]], trans: bool) {
    for_lanes(u32::MAX, |lane| {
        for (i, m) in rows.iter().enumerate() {
            let (r, c) = (lane / 4, (lane % 4) * 2);
            let (lo, hi) = if trans { (m[c][r], m[c + 1][r]) } else { (m[r][c], m[r][c + 1]) };
            regs[inst.d[i] as usize * 32 + lane] = lo as u64 | (hi as u64) << 16;
        }
    });
}
