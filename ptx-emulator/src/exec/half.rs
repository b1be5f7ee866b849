//! f16, bf16 (scalar and x2) and tf32: arithmetic and conversions. Values are widened exactly,
//! computed exactly (or rounded to odd at f64 precision, which keeps the information any
//! narrower rounding needs), then rounded once to the destination format in the requested mode.

use super::float::*;
use super::lanes::*;
use crate::ir::*;

/// A binary floating-point format narrower than f64: exponent and mantissa bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Format {
    pub ebits: u32,
    pub mbits: u32,
}

pub const F16: Format = Format { ebits: 5, mbits: 10 };
pub const BF16: Format = Format { ebits: 8, mbits: 7 };
pub const TF32: Format = Format { ebits: 8, mbits: 10 };

impl Format {
    fn bias(self) -> i32 {
        (1 << (self.ebits - 1)) - 1
    }
    fn nan(self) -> u32 {
        // The canonical NaN of cvt: all exponent and mantissa bits set.
        (1 << (self.ebits + self.mbits)) - 1
    }
    fn inf(self) -> u32 {
        ((1 << self.ebits) - 1) << self.mbits
    }
    fn max_finite(self) -> u32 {
        self.inf() - 1
    }

    /// The exact value of an encoding.
    #[inline]
    pub fn decode(self, bits: u32) -> f64 {
        if self == BF16 {
            // bf16 is the top half of an f32.
            return f32::from_bits(bits << 16) as f64;
        }
        if self == F16 {
            return f16_to_f64(bits);
        }
        self.decode_slow(bits)
    }

    fn decode_slow(self, bits: u32) -> f64 {
        let sign = (bits >> (self.ebits + self.mbits)) & 1;
        let e = ((bits >> self.mbits) & ((1 << self.ebits) - 1)) as i32;
        let m = (bits & ((1 << self.mbits) - 1)) as f64;
        let v = if e == (1 << self.ebits) - 1 {
            if m == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        } else if e == 0 {
            m * 2f64.powi(1 - self.bias() - self.mbits as i32)
        } else {
            (1.0 + m / 2f64.powi(self.mbits as i32)) * 2f64.powi(e - self.bias())
        };
        if sign == 1 {
            -v
        } else {
            v
        }
    }

    /// `x` rounded to this format with `rnd` (Default = nearest even); `x` must carry at least two
    /// bits more than the format (round-to-odd f64 values do).
    pub fn encode(self, x: f64, rnd: Rnd, satfinite: bool) -> u32 {
        let sbit = 1u32 << (self.ebits + self.mbits);
        if x.is_nan() {
            return self.nan();
        }
        let neg = x.is_sign_negative();
        let sign = if neg { sbit } else { 0 };
        let a = x.abs();
        if a.is_infinite() {
            return sign | if satfinite { self.max_finite() } else { self.inf() };
        }
        if a == 0.0 {
            return sign;
        }
        let emin = 1 - self.bias();
        let e = (a.log2().floor() as i32).max(emin);
        // log2 may be off by one near powers of two: fix the exponent exactly.
        let e = if a >= 2f64.powi(e + 1) {
            e + 1
        } else if a < 2f64.powi(e) && e > emin {
            e - 1
        } else {
            e
        };
        let quantum = 2f64.powi(e - self.mbits as i32);
        let q = a / quantum;
        let t = q.trunc();
        let frac = q - t;
        let up = match rnd {
            Rnd::Rz | Rnd::Rzi => false,
            Rnd::Rm | Rnd::Rmi => neg && frac > 0.0,
            Rnd::Rp | Rnd::Rpi => !neg && frac > 0.0,
            Rnd::Rna => frac >= 0.5,
            _ => frac > 0.5 || (frac == 0.5 && t % 2.0 == 1.0),
        };
        let n = t + up as u64 as f64;
        let v = n * quantum;
        let max = self.decode(self.max_finite());
        if v > max {
            let to_inf = !satfinite
                && match rnd {
                    Rnd::Rz => false,
                    Rnd::Rm => neg,
                    Rnd::Rp => !neg,
                    _ => true,
                };
            return sign | if to_inf { self.inf() } else { self.max_finite() };
        }
        if v < 2f64.powi(emin) {
            return sign | n as u32;
        }
        let e2 = if v >= 2f64.powi(e + 1) { e + 1 } else { e };
        let mant = (v / 2f64.powi(e2 - self.mbits as i32)) as u32 - (1 << self.mbits);
        sign | (((e2 + self.bias()) as u32) << self.mbits) | mant
    }
}

/// f16 bits to f64, by moving the fields (exact).
#[inline]
fn f16_to_f64(bits: u32) -> f64 {
    let sign = ((bits >> 15) & 1) as u64;
    let e = (bits >> 10) & 0x1f;
    let m = (bits & 0x3ff) as u64;
    let v = if e == 0x1f {
        f64::from_bits(0x7ff0_0000_0000_0000 | (m << 42))
    } else if e == 0 {
        // Subnormal: m * 2^-24, exact.
        m as f64 * (1.0 / 16_777_216.0)
    } else {
        f64::from_bits((((e as u64) + 1023 - 15) << 52) | (m << 42))
    };
    if sign == 1 {
        -v
    } else {
        v
    }
}

fn format_of(t: Ty) -> Option<(Format, bool)> {
    match t {
        Ty::F16 => Some((F16, false)),
        Ty::F16x2 => Some((F16, true)),
        Ty::BF16 => Some((BF16, false)),
        Ty::BF16x2 => Some((BF16, true)),
        _ => None,
    }
}

/// Apply `f` to each 16-bit half (or the one value) with widened exact operands.
fn lanes16(pair: bool, x: u64, y: u64, z: u64, f: &impl Fn(u32, u32, u32) -> u32) -> u64 {
    if pair {
        let lo = f(x as u32 & 0xffff, y as u32 & 0xffff, z as u32 & 0xffff);
        let hi = f((x >> 16) as u32 & 0xffff, (y >> 16) as u32 & 0xffff, (z >> 16) as u32 & 0xffff);
        (lo as u64) | ((hi as u64) << 16)
    } else {
        f(x as u32 & 0xffff, y as u32 & 0xffff, z as u32 & 0xffff) as u64
    }
}

pub fn exec(inst: &Inst, regs: &mut [u64], mask: u32) -> Result<(), String> {
    let Some((fmt, pair)) = format_of(inst.ty) else {
        return Err(format!("{:?} on type {:?} is not supported", inst.op, inst.ty));
    };
    let rnd = inst.rnd;
    let fl = inst.flags;
    if fl.ftz {
        return Err(format!("{:?}.ftz on {:?} is not supported", inst.op, inst.ty));
    }
    let dec = move |b: u32| fmt.decode(b);
    // Round an exact-or-odd-rounded value, with .sat (clamp to [0,1]) and .relu (negatives to 0).
    let enc = move |v: f64| {
        let v = if fl.sat && !v.is_nan() { v.clamp(0.0, 1.0) } else { v };
        let v = if fl.relu && v <= 0.0 { 0.0 } else { v };
        fmt.encode(v, rnd, fl.satfinite)
    };
    let [a, b, c, _] = inst.s;
    let d = inst.d[0];
    match &inst.op {
        Op::Add | Op::Sub | Op::Mul(MulMode::Lo) => {
            let op = inst.op.clone();
            map2(regs, mask, d, a, b, |x, y| {
                lanes16(pair, x, y, 0, &|x, y, _| {
                    let (x, y) = (dec(x), dec(y));
                    let (s, e) = match op {
                        Op::Add => two_sum(x, y),
                        Op::Sub => two_sum(x, -y),
                        _ => (x * y, x.mul_add(y, -(x * y))),
                    };
                    enc(round_to_odd(s, e))
                })
            })
        }
        Op::Fma => map3(regs, mask, d, a, b, c, |x, y, z| {
            lanes16(pair, x, y, z, &|x, y, z| {
                // The product of two 16-bit floats is exact in f64; one rounding after the sum.
                let p = dec(x) * dec(y);
                let (s, e) = two_sum(p, dec(z));
                enc(round_to_odd(s, e))
            })
        }),
        Op::Neg | Op::Abs => {
            let sbit = 1u32 << 15;
            let neg = inst.op == Op::Neg;
            map1(regs, mask, d, a, |x| lanes16(pair, x, 0, 0, &|x, _, _| if neg { x ^ sbit } else { x & !sbit }))
        }
        Op::Min | Op::Max => {
            let mx = inst.op == Op::Max;
            let nan_prop = fl.nan;
            map2(regs, mask, d, a, b, |x, y| {
                lanes16(pair, x, y, 0, &|xb, yb, _| {
                    let (x, y) = (dec(xb), dec(yb));
                    if x.is_nan() || y.is_nan() {
                        return if nan_prop || (x.is_nan() && y.is_nan()) {
                            fmt.nan()
                        } else if x.is_nan() {
                            yb
                        } else {
                            xb
                        };
                    }
                    let r = if mx { max64(x, y) } else { min64(x, y) };
                    if r == x && (r != 0.0 || r.is_sign_negative() == x.is_sign_negative()) {
                        xb
                    } else {
                        yb
                    }
                })
            })
        }
        Op::FUnary(f) => {
            let f = *f;
            map1(regs, mask, d, a, |x| {
                lanes16(pair, x, 0, 0, &|x, _, _| {
                    let v = dec(x);
                    let r = match f {
                        FUnary::Ex2 => v.exp2(),
                        FUnary::Tanh => v.tanh(),
                        _ => f64::NAN,
                    };
                    fmt.encode(r, Rnd::Rn, false)
                })
            })
        }
        Op::Setp { cmp, bop } if !pair => {
            let (cmp, bop) = (*cmp, *bop);
            let d1 = inst.d[1];
            let neg_c = fl.neg_c;
            for_lanes(mask, |l| {
                let r = super::alu::cmp_f(
                    dec(regs[a as usize * 32 + l] as u32 & 0xffff),
                    dec(regs[b as usize * 32 + l] as u32 & 0xffff),
                    cmp,
                );
                let cc = bop.map(|_| (regs[c as usize * 32 + l] & 1 == 1) ^ neg_c);
                let comb = |v: bool| match (bop, cc) {
                    (Some(BoolOp::And), Some(c)) => v && c,
                    (Some(BoolOp::Or), Some(c)) => v || c,
                    (Some(BoolOp::Xor), Some(c)) => v ^ c,
                    _ => v,
                };
                regs[d as usize * 32 + l] = comb(r) as u64;
                if d1 != NONE {
                    regs[d1 as usize * 32 + l] = comb(!r) as u64;
                }
            });
        }
        _ => return Err(format!("{:?} on type {:?} is not supported", inst.op, inst.ty)),
    }
    Ok(())
}

/// The exact value of a register of type `t` (integers, f32, f64, f16, bf16).
fn value_of(t: Ty, x: u64) -> f64 {
    match t {
        Ty::F32 => f(x) as f64,
        Ty::F64 => d(x),
        Ty::F16 => F16.decode(x as u32 & 0xffff),
        Ty::BF16 => BF16.decode(x as u32 & 0xffff),
        _ if t.signed() => sext(x, t.bits()) as f64,
        _ => (x & low(t.bits())) as f64,
    }
}

pub fn cvt(inst: &Inst, regs: &mut [u64], mask: u32) -> Result<(), String> {
    let (dt, st) = (inst.ty, inst.ty2);
    let rnd = inst.rnd;
    let fl = inst.flags;
    let (d, a, b) = (inst.d[0], inst.s[0], inst.s[1]);
    let prep = move |v: f64| {
        let v = if fl.sat && !v.is_nan() { v.clamp(0.0, 1.0) } else { v };
        if fl.relu && v <= 0.0 {
            0.0
        } else {
            v
        }
    };
    let narrow = |fmt: Format| move |v: f64| fmt.encode(prep(v), rnd, fl.satfinite) as u64;
    let src_ok = matches!(st, Ty::F32 | Ty::F64 | Ty::F16 | Ty::BF16) || (!st.float() && st != Ty::Pred);
    match (dt, st) {
        (Ty::F16 | Ty::BF16, _) if src_ok => {
            if matches!(rnd, Rnd::Default) && st.float() && st.bits() > 16 {
                return Err("cvt narrowing a float needs a rounding modifier".into());
            }
            let fmt = if dt == Ty::F16 { F16 } else { BF16 };
            let n = narrow(fmt);
            map1(regs, mask, d, a, |x| n(value_of(st, x)))
        }
        (Ty::F16x2 | Ty::BF16x2, Ty::F32) => {
            let fmt = if dt == Ty::F16x2 { F16 } else { BF16 };
            let n = narrow(fmt);
            // The first source goes to the upper half.
            map2(regs, mask, d, a, b, |x, y| (n(f(x) as f64) << 16) | n(f(y) as f64))
        }
        (Ty::TF32, Ty::F32) => {
            // tf32 in an f32 container: 10 mantissa bits kept, the low 13 bits zero.
            let r = if rnd == Rnd::Default { Rnd::Rna } else { rnd };
            map1(regs, mask, d, a, |x| {
                let v = f(x);
                if v.is_nan() {
                    return 0x7fff_ffff;
                }
                let t = TF32.encode(v as f64, r, fl.satfinite);
                let sign = (t >> 18) & 1;
                let rest = t & 0x3_ffff;
                ((sign << 31) | (rest << 13)) as u64
            })
        }
        (Ty::F32, Ty::F16 | Ty::BF16) => map1(regs, mask, d, a, |x| {
            let v = prep(value_of(st, x));
            if v.is_nan() {
                0x7fff_ffff
            } else {
                fb(v as f32)
            }
        }),
        (Ty::F64, Ty::F16 | Ty::BF16) => map1(regs, mask, d, a, |x| db(prep(value_of(st, x)))),
        (_, Ty::F16 | Ty::BF16) if !dt.float() => {
            let rnd = if rnd == Rnd::Default { Rnd::Rzi } else { rnd };
            let (lo, hi) = if dt.signed() {
                (-(2f64.powi(dt.bits() as i32 - 1)), 2f64.powi(dt.bits() as i32 - 1) - 1.0)
            } else {
                (0.0, 2f64.powi(dt.bits() as i32) - 1.0)
            };
            map1(regs, mask, d, a, |x| {
                let v = value_of(st, x);
                if v.is_nan() {
                    return 0;
                }
                let r = match rnd {
                    Rnd::Rni | Rnd::Rn => v.round_ties_even(),
                    Rnd::Rmi | Rnd::Rm => v.floor(),
                    Rnd::Rpi | Rnd::Rp => v.ceil(),
                    _ => v.trunc(),
                }
                .clamp(lo, hi);
                (if dt.signed() { r as i64 as u64 } else { r as u64 }) & low(dt.bits())
            })
        }
        _ => return Err(format!("cvt.{dt:?}.{st:?} is not supported")),
    }
    Ok(())
}
