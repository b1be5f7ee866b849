//! Integer, bit, f32 and f64 arithmetic, comparisons and selection.

use super::float::*;
use super::lanes::*;
use crate::ir::*;

type R = Result<(), String>;

fn unsupported(inst: &Inst) -> String {
    format!("{:?} on type {:?} is not supported", inst.op, inst.ty)
}

pub fn exec(inst: &Inst, regs: &mut [u64], mask: u32) -> R {
    let ty = inst.ty;
    let bits = ty.bits();
    let m = low(bits);
    let [a, b, c, _] = inst.s;
    let dd = inst.d[0];
    let rnd = inst.rnd;
    let fz = inst.flags.ftz;
    let z = move |x: f32| if fz { ftz32(x) } else { x };
    match &inst.op {
        Op::Mov => map1(regs, mask, dd, a, |x| x),
        Op::Pack { n, w } => {
            let (n, w) = (*n as usize, *w as u32);
            let s = inst.s;
            let d = dd as usize * 32;
            for_lanes(mask, |l| {
                let mut v = 0u64;
                for k in 0..n {
                    v |= (regs[s[k] as usize * 32 + l] & low(w)) << (k as u32 * w);
                }
                regs[d + l] = v;
            });
        }
        Op::Unpack { n, w } => {
            let (n, w) = (*n as usize, *w as u32);
            let sa = a as usize * 32;
            for_lanes(mask, |l| {
                let v = regs[sa + l];
                for k in 0..n {
                    regs[inst.d[k] as usize * 32 + l] = (v >> (k as u32 * w)) & low(w);
                }
            });
        }
        Op::Add | Op::Sub => {
            let sub = inst.op == Op::Sub;
            match ty {
                Ty::F32 => map2(regs, mask, dd, a, b, |x, y| {
                    let (x, y) = (z(f(x)), z(f(y)));
                    let r = add32(x, if sub { -y } else { y }, rnd);
                    fb(z(sat32(r, inst.flags.sat)))
                }),
                Ty::F64 => map2(regs, mask, dd, a, b, |x, y| {
                    let y = if sub { -d(y) } else { d(y) };
                    let (s, e) = two_sum(d(x), y);
                    db(nudge64(s, e, rnd))
                }),
                Ty::S32 if inst.flags.sat => map2(regs, mask, dd, a, b, |x, y| {
                    let (x, y) = (x as i32, y as i32);
                    (if sub { x.saturating_sub(y) } else { x.saturating_add(y) }) as u32 as u64
                }),
                _ if !ty.float() => {
                    map2(regs, mask, dd, a, b, |x, y| (if sub { x.wrapping_sub(y) } else { x.wrapping_add(y) }) & m)
                }
                _ => return super::half::exec(inst, regs, mask),
            }
        }
        Op::AddCarry { sub, carry_in, carry_out } => {
            let (sub, ci, co) = (*sub, *carry_in, *carry_out);
            let cc = inst.s[3] as usize * 32;
            let (sa, sb, d) = (a as usize * 32, b as usize * 32, dd as usize * 32);
            for_lanes(mask, |l| {
                let (x, y) = (regs[sa + l] & m, regs[sb + l] & m);
                let cin = if ci { regs[cc + l] & 1 } else { 0 };
                // Sub: a - b - borrow; the flag is the borrow out.
                let (r, flag) = if sub {
                    let r = (x as u128).wrapping_sub(y as u128).wrapping_sub(cin as u128);
                    ((r as u64) & m, ((x as u128) < (y as u128) + cin as u128) as u64)
                } else {
                    let r = x as u128 + y as u128 + cin as u128;
                    ((r as u64) & m, (r >> bits) as u64 & 1)
                };
                regs[d + l] = r;
                if co {
                    regs[cc + l] = flag;
                }
            });
        }
        Op::MadCarry { hi, carry_in, carry_out } => {
            let (hi, ci, co) = (*hi, *carry_in, *carry_out);
            let cc = inst.s[3] as usize * 32;
            let (sa, sb, sc, d) = (a as usize * 32, b as usize * 32, c as usize * 32, dd as usize * 32);
            let signed = ty.signed();
            for_lanes(mask, |l| {
                let (x, y, z) = (regs[sa + l], regs[sb + l], regs[sc + l] & m);
                let p = if hi { mul_hi(x, y, bits, signed) } else { x.wrapping_mul(y) & m };
                let cin = if ci { regs[cc + l] & 1 } else { 0 };
                let r = p as u128 + z as u128 + cin as u128;
                regs[d + l] = (r as u64) & m;
                if co {
                    regs[cc + l] = (r >> bits) as u64 & 1;
                }
            });
        }
        Op::Mul(mode) => match (ty, mode) {
            (Ty::F32, _) => {
                map2(regs, mask, dd, a, b, |x, y| fb(z(sat32(mul32(z(f(x)), z(f(y)), rnd), inst.flags.sat))))
            }
            (Ty::F64, _) => map2(regs, mask, dd, a, b, |x, y| {
                let (x, y) = (d(x), d(y));
                let p = x * y;
                db(nudge64(p, x.mul_add(y, -p), rnd))
            }),
            (_, MulMode::Lo) if !ty.float() => map2(regs, mask, dd, a, b, |x, y| x.wrapping_mul(y) & m),
            (_, MulMode::Wide) if !ty.float() => {
                let s = ty.signed();
                map2(regs, mask, dd, a, b, |x, y| {
                    if s {
                        (sext(x, bits).wrapping_mul(sext(y, bits))) as u64 & low(2 * bits)
                    } else {
                        ((x & m) * (y & m)) & low(2 * bits)
                    }
                })
            }
            (_, MulMode::Hi) if !ty.float() => {
                let s = ty.signed();
                map2(regs, mask, dd, a, b, |x, y| mul_hi(x, y, bits, s))
            }
            _ => return super::half::exec(inst, regs, mask),
        },
        Op::Mad(mode) => {
            let s = ty.signed();
            match mode {
                MulMode::Lo => map3(regs, mask, dd, a, b, c, |x, y, w| x.wrapping_mul(y).wrapping_add(w) & m),
                MulMode::Wide => map3(regs, mask, dd, a, b, c, |x, y, w| {
                    let p = if s { sext(x, bits).wrapping_mul(sext(y, bits)) as u64 } else { (x & m) * (y & m) };
                    p.wrapping_add(w) & low(2 * bits)
                }),
                MulMode::Hi => map3(regs, mask, dd, a, b, c, |x, y, w| {
                    let h = mul_hi(x, y, bits, s);
                    if inst.flags.sat && bits == 32 {
                        ((h as i32 as i64) + (w as i32 as i64)).clamp(i32::MIN as i64, i32::MAX as i64) as i32 as u32
                            as u64
                    } else {
                        h.wrapping_add(w) & m
                    }
                }),
            }
        }
        Op::Fma => match ty {
            Ty::F32 => map3(regs, mask, dd, a, b, c, |x, y, w| {
                fb(z(sat32(fma32(z(f(x)), z(f(y)), z(f(w)), rnd), inst.flags.sat)))
            }),
            Ty::F64 if matches!(rnd, Rnd::Default | Rnd::Rn) => {
                map3(regs, mask, dd, a, b, c, |x, y, w| db(d(x).mul_add(d(y), d(w))))
            }
            Ty::F64 => return Err("fma.f64 with directed rounding is not supported".into()),
            _ => return super::half::exec(inst, regs, mask),
        },
        Op::Div => match ty {
            Ty::F32 if matches!(rnd, Rnd::Default | Rnd::Rn) => {
                // div.rn is IEEE; div.approx/div.full are within 2 ulp on hardware: exact is inside that.
                map2(regs, mask, dd, a, b, |x, y| fb(z(z(f(x)) / z(f(y)))))
            }
            Ty::F32 => map2(regs, mask, dd, a, b, |x, y| {
                let (x, y) = (f(x) as f64, f(y) as f64);
                let q = x / y;
                // Exact remainder sign tells where the true quotient lies.
                let r = (-q).mul_add(y, x);
                let err = if r == 0.0 { 0.0 } else { r.signum() * y.signum() };
                fb(round_exact_to_f32(q, err, rnd))
            }),
            Ty::F64 if matches!(rnd, Rnd::Default | Rnd::Rn) => map2(regs, mask, dd, a, b, |x, y| db(d(x) / d(y))),
            _ if !ty.float() => {
                let s = ty.signed();
                map2(regs, mask, dd, a, b, |x, y| {
                    if s {
                        let (x, y) = (sext(x, bits), sext(y, bits));
                        // Division by zero has no trap on a GPU; the result is unspecified: all ones here.
                        if y == 0 {
                            m
                        } else {
                            x.wrapping_div(y) as u64 & m
                        }
                    } else {
                        (x & m).checked_div(y & m).unwrap_or(m)
                    }
                })
            }
            _ => return Err(unsupported(inst)),
        },
        Op::Rem => {
            let s = ty.signed();
            map2(regs, mask, dd, a, b, |x, y| {
                if s {
                    let (x, y) = (sext(x, bits), sext(y, bits));
                    if y == 0 {
                        x as u64 & m
                    } else {
                        x.wrapping_rem(y) as u64 & m
                    }
                } else {
                    let (x, y) = (x & m, y & m);
                    if y == 0 {
                        x
                    } else {
                        x % y
                    }
                }
            })
        }
        Op::Abs | Op::Neg => {
            let neg = inst.op == Op::Neg;
            match ty {
                Ty::F32 => map1(regs, mask, dd, a, |x| fb(z(if neg { -f(x) } else { f(x).abs() }))),
                Ty::F64 => map1(regs, mask, dd, a, |x| db(if neg { -d(x) } else { d(x).abs() })),
                _ if !ty.float() => map1(regs, mask, dd, a, |x| {
                    let v = sext(x, bits);
                    (if neg { v.wrapping_neg() } else { v.wrapping_abs() }) as u64 & m
                }),
                _ => return super::half::exec(inst, regs, mask),
            }
        }
        Op::Min | Op::Max => {
            let mx = inst.op == Op::Max;
            match ty {
                Ty::F32 => map2(regs, mask, dd, a, b, |x, y| {
                    let (x, y) = (z(f(x)), z(f(y)));
                    if inst.flags.nan && (x.is_nan() || y.is_nan()) {
                        return 0x7fff_ffff;
                    }
                    fb(if mx { max32(x, y) } else { min32(x, y) })
                }),
                Ty::F64 => {
                    map2(regs, mask, dd, a, b, |x, y| db(if mx { max64(d(x), d(y)) } else { min64(d(x), d(y)) }))
                }
                _ if ty.signed() => map2(regs, mask, dd, a, b, |x, y| {
                    let (x, y) = (sext(x, bits), sext(y, bits));
                    (if mx { x.max(y) } else { x.min(y) }) as u64 & m
                }),
                _ if !ty.float() => map2(regs, mask, dd, a, b, |x, y| {
                    let (x, y) = (x & m, y & m);
                    if mx {
                        x.max(y)
                    } else {
                        x.min(y)
                    }
                }),
                _ => return super::half::exec(inst, regs, mask),
            }
        }
        Op::And => map2(regs, mask, dd, a, b, |x, y| x & y & m),
        Op::Or => map2(regs, mask, dd, a, b, |x, y| (x | y) & m),
        Op::Xor => map2(regs, mask, dd, a, b, |x, y| (x ^ y) & m),
        Op::Not => {
            let mm = if ty == Ty::Pred { 1 } else { m };
            map1(regs, mask, dd, a, |x| !x & mm)
        }
        Op::Cnot => map1(regs, mask, dd, a, |x| ((x & m) == 0) as u64),
        Op::Shl => map2(regs, mask, dd, a, b, |x, y| {
            let y = y as u32;
            if y >= bits {
                0
            } else {
                (x << y) & m
            }
        }),
        Op::Shr => {
            let s = ty.signed();
            map2(regs, mask, dd, a, b, |x, y| {
                let y = (y as u32).min(bits);
                if s {
                    (sext(x, bits) >> y.min(63)) as u64 & m
                } else if y >= bits {
                    0
                } else {
                    (x & m) >> y
                }
            })
        }
        Op::Popc => map1(regs, mask, dd, a, |x| (x & m).count_ones() as u64),
        Op::Clz => map1(regs, mask, dd, a, |x| ((x & m).leading_zeros() - (64 - bits)) as u64),
        Op::Brev => map1(regs, mask, dd, a, |x| (x & m).reverse_bits() >> (64 - bits)),
        Op::Bfe => {
            let s = ty.signed();
            map3(regs, mask, dd, a, b, c, |x, pos, len| {
                let (pos, len) = ((pos & 0xff) as u32, (len & 0xff) as u32);
                let msb = if len == 0 { 0 } else { pos + len - 1 };
                let sbit = if !s || len == 0 { 0 } else { (x >> msb.min(bits - 1)) & 1 };
                let mut r = 0u64;
                for i in 0..bits {
                    let bit = if i < len && pos + i < bits { (x >> (pos + i)) & 1 } else { sbit };
                    r |= bit << i;
                }
                r
            })
        }
        Op::Bfi => map4(regs, mask, dd, inst.s, |x, y, pos, len| {
            let (pos, len) = ((pos & 0xff) as u32, (len & 0xff) as u32);
            let mut r = y & m;
            for i in 0..len {
                if pos + i >= bits {
                    break;
                }
                r = (r & !(1 << (pos + i))) | (((x >> i) & 1) << (pos + i));
            }
            r
        }),
        Op::Prmt => map3(regs, mask, dd, a, b, c, |x, y, sel| {
            let bytes = (x & 0xffff_ffff) | ((y & 0xffff_ffff) << 32);
            let mut r = 0u64;
            for i in 0..4 {
                let s = (sel >> (4 * i)) & 0xf;
                let byte = (bytes >> (8 * (s & 7))) & 0xff;
                let byte = if s & 8 != 0 {
                    if byte & 0x80 != 0 {
                        0xff
                    } else {
                        0
                    }
                } else {
                    byte
                };
                r |= byte << (8 * i);
            }
            r
        }),
        Op::Copysign => match ty {
            Ty::F32 => map2(regs, mask, dd, a, b, |x, y| fb(f(y).copysign(f(x)))),
            Ty::F64 => map2(regs, mask, dd, a, b, |x, y| db(d(y).copysign(d(x)))),
            _ => return Err(unsupported(inst)),
        },
        Op::FUnary(op) => match ty {
            Ty::F32 => {
                let op = *op;
                let approx = inst.flags.approx;
                map1(regs, mask, dd, a, |x| {
                    let x = z(f(x));
                    let r = match op {
                        FUnary::Sqrt if approx => x.sqrt(),
                        FUnary::Sqrt => f64_to_f32((x as f64).sqrt(), rnd),
                        FUnary::Rsqrt => (1.0 / (x as f64).sqrt()) as f32,
                        FUnary::Rcp if approx => (1.0 / x as f64) as f32,
                        FUnary::Rcp => {
                            let q = 1.0 / x as f64;
                            let r = (-q).mul_add(x as f64, 1.0);
                            let err = if r == 0.0 { 0.0 } else { r.signum() * (x as f64).signum() };
                            round_exact_to_f32(q, err, rnd)
                        }
                        FUnary::Ex2 => (x as f64).exp2() as f32,
                        FUnary::Lg2 => (x as f64).log2() as f32,
                        FUnary::Sin => (x as f64).sin() as f32,
                        FUnary::Cos => (x as f64).cos() as f32,
                        FUnary::Tanh => (x as f64).tanh() as f32,
                    };
                    fb(z(r))
                })
            }
            Ty::F64 => {
                let op = *op;
                map1(regs, mask, dd, a, |x| {
                    let x = d(x);
                    db(match op {
                        FUnary::Sqrt => x.sqrt(),
                        FUnary::Rcp => 1.0 / x,
                        FUnary::Rsqrt => 1.0 / x.sqrt(),
                        FUnary::Ex2 => x.exp2(),
                        _ => x.log2(),
                    })
                })
            }
            _ => return super::half::exec(inst, regs, mask),
        },
        Op::Setp { cmp, bop } => {
            let cmp = *cmp;
            let d0 = dd as usize * 32;
            let d1 = inst.d[1];
            let (sa, sb) = (a as usize * 32, b as usize * 32);
            let neg_c = inst.flags.neg_c;
            let half = matches!(ty, Ty::F16 | Ty::BF16 | Ty::F16x2 | Ty::BF16x2);
            if half {
                return super::half::exec(inst, regs, mask);
            }
            for_lanes(mask, |l| {
                let (x, y) = (regs[sa + l], regs[sb + l]);
                let r = match ty {
                    Ty::F32 => cmp_f(z(f(x)) as f64, z(f(y)) as f64, cmp),
                    Ty::F64 => cmp_f(d(x), d(y), cmp),
                    _ if ty.signed() => cmp_i(sext(x, bits) as i128, sext(y, bits) as i128, cmp),
                    _ => cmp_i((x & m) as i128, (y & m) as i128, cmp),
                };
                let (p, q) = match bop {
                    None => (r, !r),
                    Some(op) => {
                        let cc = (regs[c as usize * 32 + l] & 1 == 1) ^ neg_c;
                        let comb = |v: bool| match op {
                            BoolOp::And => v && cc,
                            BoolOp::Or => v || cc,
                            BoolOp::Xor => v ^ cc,
                        };
                        (comb(r), comb(!r))
                    }
                };
                regs[d0 + l] = p as u64;
                if d1 != NONE {
                    regs[d1 as usize * 32 + l] = q as u64;
                }
            });
        }
        Op::Selp => map3(regs, mask, dd, a, b, c, |x, y, p| if p & 1 == 1 { x } else { y }),
        _ => return Err(format!("internal: {:?} reached the arithmetic unit", inst.op)),
    }
    Ok(())
}

#[inline]
fn sat32(x: f32, sat: bool) -> f32 {
    if !sat {
        x
    } else if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

fn mul_hi(x: u64, y: u64, bits: u32, signed: bool) -> u64 {
    let m = low(bits);
    if signed {
        let p = (sext(x, bits) as i128) * (sext(y, bits) as i128);
        ((p >> bits) as u64) & m
    } else {
        let p = ((x & m) as u128) * ((y & m) as u128);
        ((p >> bits) as u64) & m
    }
}

pub fn cmp_f(x: f64, y: f64, c: Cmp) -> bool {
    let nan = x.is_nan() || y.is_nan();
    match c {
        Cmp::Eq => !nan && x == y,
        Cmp::Ne => !nan && x != y,
        Cmp::Lt | Cmp::Lo => !nan && x < y,
        Cmp::Le | Cmp::Ls => !nan && x <= y,
        Cmp::Gt | Cmp::Hi => !nan && x > y,
        Cmp::Ge | Cmp::Hs => !nan && x >= y,
        Cmp::Equ => nan || x == y,
        Cmp::Neu => nan || x != y,
        Cmp::Ltu => nan || x < y,
        Cmp::Leu => nan || x <= y,
        Cmp::Gtu => nan || x > y,
        Cmp::Geu => nan || x >= y,
        Cmp::Num => !nan,
        Cmp::Nan => nan,
    }
}

fn cmp_i(x: i128, y: i128, c: Cmp) -> bool {
    match c {
        Cmp::Eq | Cmp::Equ => x == y,
        Cmp::Ne | Cmp::Neu => x != y,
        Cmp::Lt | Cmp::Lo | Cmp::Ltu => x < y,
        Cmp::Le | Cmp::Ls | Cmp::Leu => x <= y,
        Cmp::Gt | Cmp::Hi | Cmp::Gtu => x > y,
        Cmp::Ge | Cmp::Hs | Cmp::Geu => x >= y,
        Cmp::Num => true,
        Cmp::Nan => false,
    }
}
