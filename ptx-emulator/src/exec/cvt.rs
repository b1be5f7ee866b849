//! `cvt`: every integer/float conversion with its rounding and saturation modes.

use super::float::*;
use super::lanes::*;
use crate::ir::*;

/// Round an f64 to an integral value with a PTX integer rounding mode.
fn round_int(x: f64, rnd: Rnd) -> f64 {
    match rnd {
        Rnd::Rni | Rnd::Rn => x.round_ties_even(),
        Rnd::Rzi | Rnd::Rz | Rnd::Default => x.trunc(),
        Rnd::Rmi | Rnd::Rm => x.floor(),
        Rnd::Rpi | Rnd::Rp => x.ceil(),
        Rnd::Rna => x.round(),
    }
}

fn int_range(ty: Ty) -> (f64, f64) {
    let b = ty.bits();
    if ty.signed() {
        (-(2f64.powi(b as i32 - 1)), 2f64.powi(b as i32 - 1) - 1.0)
    } else {
        (0.0, 2f64.powi(b as i32) - 1.0)
    }
}

/// Float to integer: rounded, clamped to the destination range (PTX saturates float-to-int by
/// default), NaN to 0.
fn f2i(x: f64, dst: Ty, rnd: Rnd) -> u64 {
    if x.is_nan() {
        return 0;
    }
    let (lo, hi) = int_range(dst);
    let r = round_int(x, rnd).clamp(lo, hi);
    let v = if dst.signed() { r as i64 as u64 } else { r as u64 };
    v & low(dst.bits())
}

/// Integer (as i128) to f32 with rounding.
fn i2f32(v: i128, rnd: Rnd) -> f32 {
    let s = v as f64;
    let err = (v - s as i128) as f64;
    round_exact_to_f32(s, err, rnd)
}

fn i2f64(v: i128, rnd: Rnd) -> f64 {
    let s = v as f64;
    let err = (v - s as i128) as f64;
    nudge64(s, err, rnd)
}

pub fn exec(inst: &Inst, regs: &mut [u64], mask: u32) -> Result<(), String> {
    let (dt, st) = (inst.ty, inst.ty2);
    let rnd = inst.rnd;
    let sat = inst.flags.sat;
    let fz = inst.flags.ftz;
    let (dd, a) = (inst.d[0], inst.s[0]);
    let ext = move |x: u64| -> i128 {
        if st.signed() {
            sext(x, st.bits()) as i128
        } else {
            (x & low(st.bits())) as i128
        }
    };
    let is_half = |t: Ty| matches!(t, Ty::F16 | Ty::BF16 | Ty::F16x2 | Ty::BF16x2 | Ty::TF32);
    if is_half(dt) || is_half(st) {
        return super::half::cvt(inst, regs, mask);
    }
    match (dt.float(), st.float()) {
        (false, false) => {
            let (lo, hi) = int_range(dt);
            map1(regs, mask, dd, a, |x| {
                let v = ext(x);
                let v = if sat { v.clamp(lo as i128, hi as i128) } else { v };
                (v as u64) & low(dt.bits())
            })
        }
        (true, false) => match dt {
            Ty::F32 => map1(regs, mask, dd, a, |x| fb(i2f32(ext(x), rnd))),
            Ty::F64 => map1(regs, mask, dd, a, |x| db(i2f64(ext(x), rnd))),
            _ => return Err(format!("cvt to {dt:?} is not supported")),
        },
        (false, true) => match st {
            Ty::F32 => map1(regs, mask, dd, a, |x| {
                let v = f(x);
                f2i(if fz { ftz32(v) } else { v } as f64, dt, rnd)
            }),
            Ty::F64 => map1(regs, mask, dd, a, |x| f2i(d(x), dt, rnd)),
            _ => return Err(format!("cvt from {st:?} is not supported")),
        },
        (true, true) => {
            let int_rnd = matches!(rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi);
            let sat_f = |x: f64| {
                if !sat {
                    x
                } else if x.is_nan() {
                    0.0
                } else {
                    x.clamp(0.0, 1.0)
                }
            };
            match (dt, st) {
                (Ty::F32, Ty::F32) => map1(regs, mask, dd, a, |x| {
                    let mut v = f(x);
                    if fz {
                        v = ftz32(v);
                    }
                    if int_rnd && v.is_finite() {
                        v = round_int(v as f64, rnd) as f32;
                    }
                    let v = sat_f(v as f64) as f32;
                    fb(if fz { ftz32(v) } else { v })
                }),
                (Ty::F64, Ty::F64) => map1(regs, mask, dd, a, |x| {
                    let mut v = d(x);
                    if int_rnd && v.is_finite() {
                        v = round_int(v, rnd);
                    }
                    db(sat_f(v))
                }),
                (Ty::F64, Ty::F32) => map1(regs, mask, dd, a, |x| {
                    let v = f(x);
                    db(sat_f(if fz { ftz32(v) } else { v } as f64))
                }),
                (Ty::F32, Ty::F64) => map1(regs, mask, dd, a, |x| {
                    let v = sat_f(d(x));
                    let r = f64_to_f32(v, rnd);
                    fb(if fz { ftz32(r) } else { r })
                }),
                _ => return Err(format!("cvt.{dt:?}.{st:?} is not supported")),
            }
        }
    }
    Ok(())
}
