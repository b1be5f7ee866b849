//! Floating-point helpers: IEEE rounding in the four directions for f32 results computed
//! exactly (as an f64 value plus its exact error), flush-to-zero, and PTX min/max.

use crate::ir::Rnd;

/// Flush an f32 subnormal to a zero of the same sign (`.ftz`).
#[inline]
pub fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        if x.is_sign_negative() {
            -0.0
        } else {
            0.0
        }
    } else {
        x
    }
}

#[inline]
pub fn f(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
#[inline]
pub fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}
#[inline]
pub fn d(x: u64) -> f64 {
    f64::from_bits(x)
}
#[inline]
pub fn db(x: f64) -> u64 {
    x.to_bits()
}

/// The exact error of `a + b` rounded to f64 (Knuth's two-sum).
#[inline]
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    (s, err)
}

/// `s + err` (exact) rounded to odd at f64 precision: then rounding it to f32 in any mode gives
/// the correctly rounded f32 of the exact value (53 >= 24 + 2 bits).
#[inline]
pub fn round_to_odd(s: f64, err: f64) -> f64 {
    if err == 0.0 || !s.is_finite() {
        return s;
    }
    let mut bits = s.to_bits();
    // If the exact value is nearer to zero than s, truncation is one ulp toward zero.
    if (err > 0.0) != (s > 0.0) {
        bits -= 1;
    }
    f64::from_bits(bits | 1)
}

fn next_up32(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

fn next_down32(x: f32) -> f32 {
    -next_up32(-x)
}

/// An f64 value rounded to f32 with rounding mode `rnd` (Default = nearest even).
pub fn f64_to_f32(x: f64, rnd: Rnd) -> f32 {
    let n = x as f32;
    if x.is_nan() || (n as f64) == x {
        return n;
    }
    match rnd {
        Rnd::Rz => {
            if (n as f64).abs() > x.abs() {
                if x > 0.0 {
                    next_down32(n)
                } else {
                    next_up32(n)
                }
            } else {
                n
            }
        }
        Rnd::Rm => {
            if (n as f64) > x {
                next_down32(n)
            } else {
                n
            }
        }
        Rnd::Rp => {
            if (n as f64) < x {
                next_up32(n)
            } else {
                n
            }
        }
        _ => n,
    }
}

/// The exact value `s + err` rounded to f32 with `rnd`.
#[inline]
pub fn round_exact_to_f32(s: f64, err: f64, rnd: Rnd) -> f32 {
    f64_to_f32(round_to_odd(s, err), rnd)
}

pub fn add32(a: f32, b: f32, rnd: Rnd) -> f32 {
    match rnd {
        Rnd::Default | Rnd::Rn => a + b,
        _ => {
            let (s, e) = two_sum(a as f64, b as f64);
            round_exact_to_f32(s, e, rnd)
        }
    }
}

pub fn mul32(a: f32, b: f32, rnd: Rnd) -> f32 {
    match rnd {
        Rnd::Default | Rnd::Rn => a * b,
        // The product of two f32 is exact in f64.
        _ => f64_to_f32(a as f64 * b as f64, rnd),
    }
}

/// Fused multiply-add of f32 with one rounding.
#[inline]
pub fn fma32(a: f32, b: f32, c: f32, rnd: Rnd) -> f32 {
    let p = a as f64 * b as f64;
    let s = p + c as f64;
    // Nearest: the f64 sum rounds to the right f32 unless it landed exactly on an f32 midpoint
    // (low 29 mantissa bits 1000...0), where the sum's own rounding may have crossed it.
    if matches!(rnd, Rnd::Default | Rnd::Rn) && (s.to_bits() & 0x1fff_ffff) != 0x1000_0000 {
        return s as f32;
    }
    let (s, e) = two_sum(p, c as f64);
    if !s.is_finite() {
        return a.mul_add(b, c);
    }
    round_exact_to_f32(s, e, rnd)
}

/// f64 result of an operation with exact error `err`, rounded in a direction.
pub fn nudge64(s: f64, err: f64, rnd: Rnd) -> f64 {
    if err == 0.0 || !s.is_finite() {
        return s;
    }
    let up = |x: f64| {
        if x == 0.0 {
            f64::from_bits(1)
        } else if x > 0.0 {
            f64::from_bits(x.to_bits() + 1)
        } else {
            f64::from_bits(x.to_bits() - 1)
        }
    };
    let down = |x: f64| -up(-x);
    match rnd {
        Rnd::Rm if err < 0.0 => down(s),
        Rnd::Rp if err > 0.0 => up(s),
        Rnd::Rz if err < 0.0 && s > 0.0 => down(s),
        Rnd::Rz if err > 0.0 && s < 0.0 => up(s),
        _ => s,
    }
}

/// PTX min/max: a NaN operand yields the other; -0 is below +0.
pub fn min32(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { a } else { b };
    }
    if a < b {
        a
    } else {
        b
    }
}

pub fn max32(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { b } else { a };
    }
    if a > b {
        a
    } else {
        b
    }
}

pub fn min64(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { a } else { b };
    }
    a.min(b)
}

pub fn max64(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        return b;
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { b } else { a };
    }
    a.max(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_fma_rounding() {
        // 1 + 2^-30 is not an f32: rm keeps 1, rp goes one ulp up, rn keeps 1.
        let t = 2f32.powi(-15);
        assert_eq!(fma32(t, t, 1.0, Rnd::Rm), 1.0);
        assert_eq!(fma32(t, t, 1.0, Rnd::Rp), 1.0 + f32::EPSILON);
        assert_eq!(fma32(t, t, 1.0, Rnd::Rn), 1.0);
        assert_eq!(fma32(-t, t, 1.0, Rnd::Rz), 1.0 - f32::EPSILON / 2.0);
        // Double rounding trap: exact value just above a midpoint between two f32s.
        let a = 1.0 + f32::EPSILON; // 1 + 2^-23
        let c = 2f32.powi(-24);
        // a*1 + c = 1 + 2^-23 + 2^-24: a tie between 1+2^-23 and 1+2^-22: even is 1+2^-22.
        assert_eq!(fma32(a, 1.0, c, Rnd::Rn), 1.0 + 2.0 * f32::EPSILON);
        assert_eq!(f64_to_f32(1.0 + 2f64.powi(-30), Rnd::Rp), 1.0 + f32::EPSILON);
    }
}
