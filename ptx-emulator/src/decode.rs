//! Decoding: the syntax tree of one function becomes `ir::Function`. Register names become
//! slots (scoped, for inline-asm blocks), immediates, symbols and special registers become
//! constant slots, labels become instruction indices, and every opcode and modifier is checked
//! here, once: an unknown one is a load error naming it and its PTX line.

use std::collections::HashMap;

use crate::ir::*;
use crate::parse::{FunctionAst, Instr, Operand, Stmt, VarDecl};
use crate::report::LoadError;

/// Module-level symbols a function may name.
pub struct ModuleSymbols<'a> {
    /// `.global` variables: their device addresses.
    pub globals: HashMap<String, u64>,
    /// `.const` variables: offsets in the module's const bank.
    pub consts: HashMap<String, u64>,
    /// Module-level `.shared` declarations (laid out per kernel when referenced).
    pub shared: &'a [VarDecl],
    /// `.func`s with bodies, inlined at their call sites.
    pub funcs: HashMap<String, &'a FunctionAst>,
}

#[derive(Clone, Debug)]
enum Sym {
    Shared(u64),
    DynShared,
    Local(u64),
    Param(u64),
    Value(u64),
}

struct Decoder<'a> {
    syms: &'a ModuleSymbols<'a>,
    nslots: u32,
    scopes: Vec<HashMap<String, Slot>>,
    reg_bits: Vec<u8>,
    consts: HashMap<u64, Slot>,
    /// Constant slots holding the dynamic shared base (known at the end).
    dyn_shared_slots: Vec<Slot>,
    specials: HashMap<String, Slot>,
    special_list: Vec<(Slot, Special)>,
    symbols: HashMap<String, Sym>,
    shared_top: u64,
    dyn_align: u64,
    local_top: u64,
    labels: HashMap<String, u32>,
    fixups: Vec<(usize, String, u32)>,
    insts: Vec<Inst>,
    /// Label prefix of the inlined call being decoded (empty at the top level).
    prefix: String,
    /// Where `ret` branches inside an inlined call (empty at the top level).
    ret_label: String,
    call_stack: Vec<String>,
    inline_count: u32,
    /// The per-thread carry flag of add.cc/addc/..., a hidden slot.
    carry_flag: Option<Slot>,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

fn special(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Special::Tid(d),
            "%ntid" => Special::Ntid(d),
            "%ctaid" => Special::Ctaid(d),
            "%nctaid" => Special::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Special::LaneId,
        "%warpid" => Special::WarpId,
        "%nwarpid" => Special::NWarpId,
        "%lanemask_eq" => Special::LanemaskEq,
        "%lanemask_lt" => Special::LanemaskLt,
        "%lanemask_le" => Special::LanemaskLe,
        "%lanemask_gt" => Special::LanemaskGt,
        "%lanemask_ge" => Special::LanemaskGe,
        "%smid" => Special::SmId,
        "%nsmid" => Special::NSmId,
        "%gridid" => Special::GridId,
        "%dynamic_smem_size" => Special::DynamicSmemSize,
        "%total_smem_size" => Special::TotalSmemSize,
        "%clock" | "%clock64" | "%globaltimer" | "%clock_hi" => Special::Clock,
        _ => return None,
    })
}

/// An opcode's modifiers, consumed by the opcode's decoder; leftovers are errors.
struct Mods {
    line: u32,
    opcode: String,
    words: Vec<String>,
}

impl Mods {
    fn new(opcode: &str, line: u32) -> (String, Mods) {
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or("").to_string();
        let words = parts.map(|s| s.to_string()).collect();
        (base, Mods { line, opcode: opcode.to_string(), words })
    }
    fn err<T>(&self, what: String) -> Result<T, LoadError> {
        Err(LoadError::at(self.line, format!("{what} in '{}'", self.opcode)))
    }
    fn take(&mut self, w: &str) -> bool {
        if let Some(i) = self.words.iter().position(|x| x == w) {
            self.words.remove(i);
            true
        } else {
            false
        }
    }
    fn take_any(&mut self, ws: &[&'static str]) -> Option<&'static str> {
        ws.iter().copied().find(|w| self.take(w))
    }
    /// Qualifiers with no effect on a functional model (ordering, caching, scope, alignment).
    fn drop_ignorable(&mut self, ws: &[&str]) {
        self.words.retain(|w| !ws.contains(&w.as_str()));
    }
    fn types(&mut self) -> Vec<Ty> {
        let mut out = Vec::new();
        self.words.retain(|w| match Ty::parse(w) {
            Some(t) => {
                out.push(t);
                false
            }
            None => true,
        });
        out
    }
    fn rnd(&mut self) -> Rnd {
        match self.take_any(&["rn", "rz", "rm", "rp", "rna", "rni", "rzi", "rmi", "rpi"]) {
            Some("rn") => Rnd::Rn,
            Some("rz") => Rnd::Rz,
            Some("rm") => Rnd::Rm,
            Some("rp") => Rnd::Rp,
            Some("rna") => Rnd::Rna,
            Some("rni") => Rnd::Rni,
            Some("rzi") => Rnd::Rzi,
            Some("rmi") => Rnd::Rmi,
            Some("rpi") => Rnd::Rpi,
            _ => Rnd::Default,
        }
    }
    fn flags(&mut self) -> Flags {
        Flags {
            sat: self.take("sat"),
            ftz: self.take("ftz"),
            approx: self.take("approx"),
            relu: self.take("relu"),
            neg_c: false,
            satfinite: self.take("satfinite"),
            nan: self.take("NaN"),
            ..Flags::default()
        }
    }
    fn space(&mut self) -> Space {
        match self.take_any(&["global", "shared", "local", "param", "const"]) {
            Some("global") => Space::Global,
            Some("shared") => {
                // `.shared::cta` is the same window; `::cluster` is not modelled.
                Space::Shared
            }
            Some("local") => Space::Local,
            Some("param") => Space::Param,
            Some("const") => Space::Const,
            _ => {
                if self.take("shared::cta") {
                    Space::Shared
                } else {
                    Space::Generic
                }
            }
        }
    }
    fn vec(&mut self) -> u8 {
        match self.take_any(&["v2", "v4", "v8"]) {
            Some("v2") => 2,
            Some("v4") => 4,
            Some("v8") => 8,
            _ => 1,
        }
    }
    fn done(&self) -> Result<(), LoadError> {
        match self.words.first() {
            Some(w) => self.err(format!("unsupported modifier '.{w}'")),
            None => Ok(()),
        }
    }
    fn one_type(&mut self) -> Result<Ty, LoadError> {
        let t = self.types();
        if t.len() != 1 {
            return self.err(format!("expected one type, found {}", t.len()));
        }
        Ok(t[0])
    }
}

const MEMORY_ORDER: &[&str] = &[
    "weak",
    "relaxed",
    "acquire",
    "release",
    "acq_rel",
    "volatile",
    "cta",
    "gpu",
    "sys",
    "cluster",
    "nc",
    "ca",
    "cg",
    "cs",
    "lu",
    "cv",
    "wb",
    "wt",
    "L1::evict_normal",
    "L1::evict_unchanged",
    "L1::evict_first",
    "L1::evict_last",
    "L1::no_allocate",
    "L2::evict_normal",
    "L2::evict_first",
    "L2::evict_last",
    "L2::64B",
    "L2::128B",
    "L2::256B",
];

impl<'a> Decoder<'a> {
    fn new_slot(&mut self, bits: u8) -> Slot {
        let s = self.nslots;
        self.nslots += 1;
        self.reg_bits.push(bits);
        s
    }

    fn const_slot(&mut self, v: u64) -> Slot {
        if let Some(&s) = self.consts.get(&v) {
            return s;
        }
        let s = self.new_slot(64);
        self.consts.insert(v, s);
        s
    }

    fn lookup_reg(&self, name: &str) -> Option<Slot> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }

    fn symbol_value(&mut self, name: &str, line: u32) -> Result<Option<Slot>, LoadError> {
        if !self.symbols.contains_key(name) {
            if let Some(&a) = self.syms.globals.get(name) {
                self.symbols.insert(name.to_string(), Sym::Value(a));
            } else if let Some(&o) = self.syms.consts.get(name) {
                self.symbols.insert(name.to_string(), Sym::Value(o));
            } else if let Some(d) = self.syms.shared.iter().find(|d| d.name == name) {
                let d = d.clone();
                self.declare_shared(&d, line)?;
            } else {
                return Ok(None);
            }
        }
        Ok(Some(match self.symbols[name].clone() {
            Sym::Shared(o) | Sym::Local(o) | Sym::Param(o) | Sym::Value(o) => self.const_slot(o),
            Sym::DynShared => {
                let s = self.new_slot(64);
                self.dyn_shared_slots.push(s);
                s
            }
        }))
    }

    fn declare_shared(&mut self, d: &VarDecl, _line: u32) -> Result<(), LoadError> {
        if d.is_extern || d.count == Some(0) {
            self.dyn_align = self.dyn_align.max(d.align);
            self.symbols.insert(d.name.clone(), Sym::DynShared);
        } else {
            let o = align_up(self.shared_top, d.align);
            self.shared_top = o + d.bytes();
            self.symbols.insert(d.name.clone(), Sym::Shared(o));
        }
        Ok(())
    }

    /// A source operand as a slot.
    fn src(&mut self, op: &Operand, ty: Ty, line: u32) -> Result<Slot, LoadError> {
        match op {
            Operand::Name(n) => {
                if let Some(s) = self.lookup_reg(n) {
                    return Ok(s);
                }
                if let Some(sp) = special(n) {
                    if let Some(&s) = self.specials.get(n) {
                        return Ok(s);
                    }
                    let s = self.new_slot(32);
                    self.specials.insert(n.clone(), s);
                    self.special_list.push((s, sp));
                    return Ok(s);
                }
                match self.symbol_value(n, line)? {
                    Some(s) => Ok(s),
                    None => Err(LoadError::at(line, format!("unknown name '{n}'"))),
                }
            }
            Operand::Int(v) => {
                let v = if ty == Ty::F32 {
                    (*v as f32).to_bits() as u64
                } else if ty == Ty::F64 {
                    (*v as f64).to_bits()
                } else {
                    *v as u64
                };
                Ok(self.const_slot(v))
            }
            Operand::F32(b) => Ok(if ty == Ty::F64 {
                self.const_slot((f32::from_bits(*b) as f64).to_bits())
            } else {
                self.const_slot(*b as u64)
            }),
            Operand::F64(b) => Ok(if ty == Ty::F32 {
                self.const_slot((f64::from_bits(*b) as f32).to_bits() as u64)
            } else {
                self.const_slot(*b)
            }),
            _ => Err(LoadError::at(line, format!("unexpected operand {op:?}"))),
        }
    }

    fn dst(&mut self, op: &Operand, line: u32) -> Result<Slot, LoadError> {
        match op {
            Operand::Name(n) => {
                self.lookup_reg(n).ok_or_else(|| LoadError::at(line, format!("'{n}' is not a declared register")))
            }
            Operand::Sink => {
                let s = self.new_slot(64);
                Ok(s)
            }
            _ => Err(LoadError::at(line, format!("expected a register destination, found {op:?}"))),
        }
    }

    fn addr(&mut self, op: &Operand, line: u32) -> Result<(Slot, i64), LoadError> {
        match op {
            Operand::Addr { base: Some(b), offset } => {
                Ok((self.src(&Operand::Name(b.clone()), Ty::U64, line)?, *offset))
            }
            Operand::Addr { base: None, offset } => Ok((self.const_slot(0), *offset)),
            _ => Err(LoadError::at(line, format!("expected an address, found {op:?}"))),
        }
    }

    fn operands<'o>(&self, i: &'o Instr, n: std::ops::RangeInclusive<usize>) -> Result<&'o [Operand], LoadError> {
        if !n.contains(&i.operands.len()) {
            return Err(LoadError::at(
                i.line,
                format!("'{}' takes {:?} operands, found {}", i.opcode, n, i.operands.len()),
            ));
        }
        Ok(&i.operands)
    }

    fn stmts(&mut self, body: &[Stmt]) -> Result<(), LoadError> {
        for st in body {
            match st {
                Stmt::Reg { ty, name, count } => {
                    let bits = crate::parse::type_size(ty).unwrap_or(8) as u8 * 8;
                    match count {
                        Some(n) => {
                            for k in 0..*n {
                                let s = self.new_slot(bits);
                                self.scopes.last_mut().unwrap().insert(format!("{name}{k}"), s);
                            }
                        }
                        None => {
                            let s = self.new_slot(bits);
                            self.scopes.last_mut().unwrap().insert(name.clone(), s);
                        }
                    }
                }
                Stmt::Var(v) => match v.space.as_str() {
                    ".shared" => self.declare_shared(v, v.line)?,
                    // A `.param` in a body is a call's argument or return buffer: thread-local storage.
                    ".local" | ".param" => {
                        let o = align_up(self.local_top, v.align);
                        self.local_top = o + v.bytes();
                        self.symbols.insert(v.name.clone(), Sym::Local(o));
                    }
                    s => {
                        return Err(LoadError::at(v.line, format!("unsupported '{s}' declaration in a function body")))
                    }
                },
                Stmt::Label(l) => {
                    self.labels.insert(format!("{}{l}", self.prefix), self.insts.len() as u32);
                }
                Stmt::Instr(i) => self.instr(i)?,
                Stmt::Open => self.scopes.push(HashMap::new()),
                Stmt::Close => {
                    self.scopes.pop();
                }
            }
        }
        Ok(())
    }

    /// A call to a `.func`, expanded in place: the callee's registers get fresh slots, its labels
    /// a unique prefix, its parameters and return values name the caller's call buffers (thread
    /// local), its `ret` branches past the body. Recursion is refused.
    fn inline_call(&mut self, callee: &str, rets: &[String], args: &[String], line: u32) -> Result<(), LoadError> {
        let f = self
            .syms
            .funcs
            .get(callee)
            .ok_or_else(|| LoadError::at(line, format!("call of unknown or body-less function '{callee}'")))?;
        if self.call_stack.iter().any(|c| c == callee) || self.call_stack.len() >= 16 {
            return Err(LoadError::at(line, format!("recursive call of '{callee}' is not supported")));
        }
        if f.params.len() != args.len() || f.returns.len() != rets.len() {
            return Err(LoadError::at(line, format!("call of '{callee}' with the wrong number of arguments")));
        }
        let mut saved = Vec::new();
        for (p, a) in f.params.iter().chain(&f.returns).zip(args.iter().chain(rets)) {
            let sym = match self.symbols.get(a.as_str()) {
                Some(s @ Sym::Local(_)) => s.clone(),
                _ => return Err(LoadError::at(line, format!("call argument '{a}' is not a .param buffer"))),
            };
            saved.push((p.name.clone(), self.symbols.insert(p.name.clone(), sym)));
        }
        self.inline_count += 1;
        let new_prefix = format!("{}__inl{}_", self.prefix, self.inline_count);
        let prefix = std::mem::replace(&mut self.prefix, new_prefix);
        let ret_label = std::mem::replace(&mut self.ret_label, format!("{}__return", self.prefix));
        self.call_stack.push(callee.to_string());
        self.scopes.push(HashMap::new());
        let body = f.body.as_ref().expect("funcs holds bodies only");
        let result = self.stmts(body);
        self.scopes.pop();
        self.call_stack.pop();
        let here = self.insts.len() as u32;
        self.labels.insert(std::mem::replace(&mut self.ret_label, ret_label), here);
        self.prefix = prefix;
        for (name, old) in saved {
            match old {
                Some(o) => self.symbols.insert(name, o),
                None => self.symbols.remove(&name),
            };
        }
        result
    }

    /// Operands of the carry instructions, and the hidden carry-flag slot.
    fn carry_operands(&mut self, inst: &mut Inst, i: &Instr) -> Result<(), LoadError> {
        if !matches!(inst.ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64 | Ty::B32 | Ty::B64) {
            return Err(LoadError::at(i.line, format!("unsupported type {:?} in '{}'", inst.ty, i.opcode)));
        }
        let n = if matches!(inst.op, Op::MadCarry { .. }) { 4 } else { 3 };
        self.operands(i, n..=n)?;
        inst.d[0] = self.dst(&i.operands[0], i.line)?;
        for (k, op) in i.operands.iter().enumerate().skip(1) {
            inst.s[k - 1] = self.src(op, inst.ty, i.line)?;
        }
        let cc = *self.carry_flag.get_or_insert_with(|| {
            let s = self.nslots;
            self.nslots += 1;
            self.reg_bits.push(8);
            s
        });
        inst.s[3] = cc;
        inst.d[1] = cc;
        Ok(())
    }

    fn instr(&mut self, i: &Instr) -> Result<(), LoadError> {
        let line = i.line;
        let (base, mut m) = Mods::new(&i.opcode, line);
        let mut inst = Inst::new(Op::Nop, line);
        if let Some((neg, p)) = &i.guard {
            inst.guard = self.src(&Operand::Name(p.clone()), Ty::Pred, line)?;
            inst.guard_neg = *neg;
        }
        let ops = &i.operands;
        match base.as_str() {
            "mov" => {
                let ty = m.one_type()?;
                self.operands(i, 2..=2)?;
                inst.ty = ty;
                match (&ops[0], &ops[1]) {
                    (d, Operand::Vector(parts)) => {
                        let n = parts.len() as u8;
                        inst.op = Op::Pack { n, w: (ty.bits() / n as u32) as u8 };
                        inst.d[0] = self.dst(d, line)?;
                        for (k, p) in parts.iter().enumerate() {
                            inst.s[k] = self.src(p, Ty::B64, line)?;
                        }
                    }
                    (Operand::Vector(parts), s) => {
                        let n = parts.len() as u8;
                        inst.op = Op::Unpack { n, w: (ty.bits() / n as u32) as u8 };
                        inst.s[0] = self.src(s, ty, line)?;
                        for (k, p) in parts.iter().enumerate() {
                            inst.d[k] = self.dst(p, line)?;
                        }
                    }
                    (d, s) => {
                        inst.op = Op::Mov;
                        inst.d[0] = self.dst(d, line)?;
                        inst.s[0] = self.src(s, ty, line)?;
                    }
                }
            }
            "addc" | "subc" | "madc" => {
                let hi = m.take("hi");
                m.take("lo");
                let carry_out = m.take("cc");
                inst.ty = m.one_type()?;
                inst.op = match base.as_str() {
                    "madc" => Op::MadCarry { hi, carry_in: true, carry_out },
                    b => Op::AddCarry { sub: b == "subc", carry_in: true, carry_out },
                };
                self.carry_operands(&mut inst, i)?;
            }
            "add" | "sub" | "mad" if m.words.iter().any(|w| w == "cc") => {
                m.take("cc");
                let hi = m.take("hi");
                m.take("lo");
                inst.ty = m.one_type()?;
                inst.op = match base.as_str() {
                    "mad" => Op::MadCarry { hi, carry_in: false, carry_out: true },
                    b => Op::AddCarry { sub: b == "sub", carry_in: false, carry_out: true },
                };
                self.carry_operands(&mut inst, i)?;
            }
            "add" | "sub" | "mul" | "mad" | "fma" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl"
            | "shr" | "copysign" => {
                let mode = match m.take_any(&["lo", "hi", "wide"]) {
                    Some("hi") => MulMode::Hi,
                    Some("wide") => MulMode::Wide,
                    _ => MulMode::Lo,
                };
                inst.rnd = m.rnd();
                inst.flags = m.flags();
                m.take("full");
                inst.ty = m.one_type()?;
                inst.op = match base.as_str() {
                    "add" => Op::Add,
                    "sub" => Op::Sub,
                    "mul" => Op::Mul(mode),
                    "mad" if inst.ty.float() => Op::Fma,
                    "mad" => Op::Mad(mode),
                    "fma" => Op::Fma,
                    "div" => Op::Div,
                    "rem" => Op::Rem,
                    "min" => Op::Min,
                    "max" => Op::Max,
                    "and" => Op::And,
                    "or" => Op::Or,
                    "xor" => Op::Xor,
                    "shl" => Op::Shl,
                    "shr" => Op::Shr,
                    _ => Op::Copysign,
                };
                let three = matches!(inst.op, Op::Mad(_) | Op::Fma);
                self.operands(i, if three { 4..=4 } else { 3..=3 })?;
                inst.d[0] = self.dst(&ops[0], line)?;
                let shift = matches!(inst.op, Op::Shl | Op::Shr);
                for (k, op) in ops.iter().enumerate().skip(1) {
                    let t = if shift && k == 2 { Ty::U32 } else { inst.ty };
                    inst.s[k - 1] = self.src(op, t, line)?;
                }
            }
            "abs" | "neg" | "not" | "cnot" | "popc" | "clz" | "brev" | "sqrt" | "rsqrt" | "rcp" | "ex2" | "lg2"
            | "sin" | "cos" | "tanh" => {
                inst.rnd = m.rnd();
                inst.flags = m.flags();
                m.take("full");
                inst.ty = m.one_type()?;
                inst.op = match base.as_str() {
                    "abs" => Op::Abs,
                    "neg" => Op::Neg,
                    "not" => Op::Not,
                    "cnot" => Op::Cnot,
                    "popc" => Op::Popc,
                    "clz" => Op::Clz,
                    "brev" => Op::Brev,
                    "sqrt" => Op::FUnary(FUnary::Sqrt),
                    "rsqrt" => Op::FUnary(FUnary::Rsqrt),
                    "rcp" => Op::FUnary(FUnary::Rcp),
                    "ex2" => Op::FUnary(FUnary::Ex2),
                    "lg2" => Op::FUnary(FUnary::Lg2),
                    "sin" => Op::FUnary(FUnary::Sin),
                    "cos" => Op::FUnary(FUnary::Cos),
                    _ => Op::FUnary(FUnary::Tanh),
                };
                if let Op::FUnary(f) = inst.op {
                    let ok = match inst.ty {
                        Ty::F32 => true,
                        Ty::F64 => matches!(f, FUnary::Sqrt | FUnary::Rcp | FUnary::Rsqrt | FUnary::Ex2 | FUnary::Lg2),
                        Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2 => matches!(f, FUnary::Ex2 | FUnary::Tanh),
                        _ => false,
                    };
                    if !ok {
                        return m.err(format!("unsupported type {:?}", inst.ty));
                    }
                }
                self.operands(i, 2..=2)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                inst.s[0] = self.src(&ops[1], inst.ty, line)?;
            }
            "bfe" | "bfi" | "prmt" => {
                inst.ty = m.one_type()?;
                inst.op = match base.as_str() {
                    "bfe" => Op::Bfe,
                    "bfi" => Op::Bfi,
                    _ => Op::Prmt,
                };
                let n = if inst.op == Op::Bfi { 5 } else { 4 };
                self.operands(i, n..=n)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                for (k, op) in ops.iter().enumerate().skip(1) {
                    let t = if k <= 2 || inst.op == Op::Prmt { inst.ty } else { Ty::U32 };
                    inst.s[k - 1] = self.src(op, t, line)?;
                }
            }
            "setp" => {
                let cmp = match m.take_any(&[
                    "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu", "leu", "gtu",
                    "geu", "num", "nan",
                ]) {
                    Some(c) => match c {
                        "eq" => Cmp::Eq,
                        "ne" => Cmp::Ne,
                        "lt" => Cmp::Lt,
                        "le" => Cmp::Le,
                        "gt" => Cmp::Gt,
                        "ge" => Cmp::Ge,
                        "lo" => Cmp::Lo,
                        "ls" => Cmp::Ls,
                        "hi" => Cmp::Hi,
                        "hs" => Cmp::Hs,
                        "equ" => Cmp::Equ,
                        "neu" => Cmp::Neu,
                        "ltu" => Cmp::Ltu,
                        "leu" => Cmp::Leu,
                        "gtu" => Cmp::Gtu,
                        "geu" => Cmp::Geu,
                        "num" => Cmp::Num,
                        _ => Cmp::Nan,
                    },
                    None => return m.err("missing comparison".into()),
                };
                let bop = match m.take_any(&["and", "or", "xor"]) {
                    Some("and") => Some(BoolOp::And),
                    Some("or") => Some(BoolOp::Or),
                    Some("xor") => Some(BoolOp::Xor),
                    _ => None,
                };
                inst.flags = m.flags();
                inst.ty = m.one_type()?;
                inst.op = Op::Setp { cmp, bop };
                self.operands(i, if bop.is_some() { 4..=4 } else { 3..=3 })?;
                match &ops[0] {
                    Operand::Pair(p, q) => {
                        inst.d[0] = self.dst(&Operand::Name(p.clone()), line)?;
                        inst.d[1] = self.dst(&Operand::Name(q.clone()), line)?;
                    }
                    d => inst.d[0] = self.dst(d, line)?,
                }
                inst.s[0] = self.src(&ops[1], inst.ty, line)?;
                inst.s[1] = self.src(&ops[2], inst.ty, line)?;
                if bop.is_some() {
                    match &ops[3] {
                        Operand::Name(n) if n.starts_with('!') => {
                            inst.s[2] = self.src(&Operand::Name(n[1..].to_string()), Ty::Pred, line)?;
                            inst.flags.neg_c = true;
                        }
                        o => inst.s[2] = self.src(o, Ty::Pred, line)?,
                    }
                }
            }
            "selp" => {
                inst.ty = m.one_type()?;
                inst.op = Op::Selp;
                self.operands(i, 4..=4)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                inst.s[0] = self.src(&ops[1], inst.ty, line)?;
                inst.s[1] = self.src(&ops[2], inst.ty, line)?;
                inst.s[2] = self.src(&ops[3], Ty::Pred, line)?;
            }
            "cvt" => {
                inst.rnd = m.rnd();
                inst.flags = m.flags();
                let t = m.types();
                if t.len() != 2 {
                    return m.err("cvt needs a destination and a source type".into());
                }
                inst.ty = t[0];
                inst.ty2 = t[1];
                inst.op = Op::Cvt;
                // Two-source packing form: cvt.rn.f16x2.f32 d, a, b.
                let packed = matches!(inst.ty, Ty::F16x2 | Ty::BF16x2);
                self.operands(i, if packed { 3..=3 } else { 2..=2 })?;
                inst.d[0] = self.dst(&ops[0], line)?;
                inst.s[0] = self.src(&ops[1], inst.ty2, line)?;
                if packed {
                    inst.s[1] = self.src(&ops[2], inst.ty2, line)?;
                }
            }
            "cvta" => {
                let to = m.take("to");
                let space = m.space();
                inst.ty = m.one_type()?;
                if space == Space::Generic {
                    return m.err("cvta needs a state space".into());
                }
                inst.op = Op::Cvta { space, to };
                self.operands(i, 2..=2)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                inst.s[0] = self.src(&ops[1], Ty::U64, line)?;
            }
            "ld" | "st" => {
                m.drop_ignorable(MEMORY_ORDER);
                let space = m.space();
                inst.vec = m.vec();
                inst.ty = m.one_type()?;
                self.operands(i, 2..=2)?;
                let (data, addr) = if base == "ld" { (&ops[0], &ops[1]) } else { (&ops[1], &ops[0]) };
                let space = match (space, addr) {
                    (Space::Param, Operand::Addr { base: Some(b), .. })
                        if matches!(self.symbols.get(b.as_str()), Some(Sym::Local(_))) =>
                    {
                        Space::Local
                    }
                    _ => space,
                };
                (inst.addr, inst.off) = self.addr(addr, line)?;
                let regs: Vec<&Operand> = match data {
                    Operand::Vector(v) => v.iter().collect(),
                    o => vec![o],
                };
                if regs.len() != inst.vec as usize || inst.vec > 4 {
                    return m.err(format!("vector width {} with {} registers", inst.vec, regs.len()));
                }
                for (k, r) in regs.iter().enumerate() {
                    if base == "ld" {
                        inst.d[k] = self.dst(r, line)?;
                    } else {
                        inst.s[k] = self.src(r, inst.ty, line)?;
                    }
                }
                inst.op = if base == "ld" { Op::Ld { space } } else { Op::St { space } };
            }
            "atom" | "red" => {
                let acq_rel = m.words.iter().any(|w| w == "acq_rel");
                inst.flags.acquire = acq_rel || m.words.iter().any(|w| w == "acquire");
                inst.flags.release = acq_rel || m.words.iter().any(|w| w == "release");
                inst.flags.cta_scope = m.words.iter().any(|w| w == "cta");
                m.drop_ignorable(MEMORY_ORDER);
                m.take("noftz");
                let space = m.space();
                let op = match m.take_any(&["add", "min", "max", "inc", "dec", "and", "or", "xor", "exch", "cas"]) {
                    Some("add") => AtomOp::Add,
                    Some("min") => AtomOp::Min,
                    Some("max") => AtomOp::Max,
                    Some("inc") => AtomOp::Inc,
                    Some("dec") => AtomOp::Dec,
                    Some("and") => AtomOp::And,
                    Some("or") => AtomOp::Or,
                    Some("xor") => AtomOp::Xor,
                    Some("exch") => AtomOp::Exch,
                    Some("cas") => AtomOp::Cas,
                    _ => return m.err("missing atomic operation".into()),
                };
                inst.ty = m.one_type()?;
                inst.op = Op::Atom { space, op };
                let red = base == "red";
                let n = if red {
                    2
                } else if op == AtomOp::Cas {
                    4
                } else {
                    3
                };
                self.operands(i, n..=n)?;
                let mut k = 0;
                if !red {
                    inst.d[0] = self.dst(&ops[0], line)?;
                    k = 1;
                } else {
                    inst.d[0] = self.new_slot(64);
                }
                (inst.addr, inst.off) = self.addr(&ops[k], line)?;
                for (j, op) in ops.iter().enumerate().skip(k + 1) {
                    inst.s[j - k - 1] = self.src(op, inst.ty, line)?;
                }
            }
            "bra" => {
                m.take("uni");
                inst.op = Op::Bra;
                self.operands(i, 1..=1)?;
                match &ops[0] {
                    Operand::Name(l) => self.fixups.push((self.insts.len(), format!("{}{l}", self.prefix), line)),
                    o => return Err(LoadError::at(line, format!("bad branch target {o:?}"))),
                }
            }
            "ret" if !self.ret_label.is_empty() => {
                // `ret` of an inlined device function: a branch past its body.
                m.take("uni");
                inst.op = Op::Bra;
                self.fixups.push((self.insts.len(), self.ret_label.clone(), line));
            }
            "call" => {
                m.take("uni");
                m.done()?;
                let names = |o: &Operand| -> Result<Vec<String>, LoadError> {
                    match o {
                        Operand::Vector(v) => v
                            .iter()
                            .map(|x| match x {
                                Operand::Name(n) => Ok(n.clone()),
                                o => Err(LoadError::at(line, format!("call argument {o:?} is not a .param name"))),
                            })
                            .collect(),
                        o => Err(LoadError::at(line, format!("bad call operand {o:?}"))),
                    }
                };
                let (rets, callee, args) = match ops.as_slice() {
                    [r @ Operand::Vector(_), Operand::Name(f), a @ Operand::Vector(_)] => (names(r)?, f, names(a)?),
                    [Operand::Name(f), a @ Operand::Vector(_)] => (Vec::new(), f, names(a)?),
                    [r @ Operand::Vector(_), Operand::Name(f)] => (names(r)?, f, Vec::new()),
                    [Operand::Name(f)] => (Vec::new(), f, Vec::new()),
                    _ => {
                        return Err(LoadError::at(
                            line,
                            "unsupported call form (indirect calls are not supported)".into(),
                        ))
                    }
                };
                if i.guard.is_some() {
                    return Err(LoadError::at(line, "predicated calls are not supported".into()));
                }
                return self.inline_call(callee, &rets, &args, line);
            }
            "ret" | "exit" | "trap" => {
                m.take("uni");
                inst.op = match base.as_str() {
                    "trap" => Op::Trap,
                    "exit" => Op::Exit,
                    _ => Op::Ret,
                };
            }
            "bar" | "barrier" => {
                if m.take("warp") {
                    m.take("sync");
                    inst.op = Op::BarWarp;
                    self.operands(i, 1..=1)?;
                    inst.s[0] = self.src(&ops[0], Ty::U32, line)?;
                } else {
                    m.take("aligned");
                    let arrive = m.take("arrive");
                    if !arrive && !m.take("sync") && !m.words.is_empty() {
                        return m.err(format!("unsupported barrier form '.{}'", m.words[0]));
                    }
                    m.take("aligned");
                    inst.op = Op::Bar { arrive };
                    self.operands(i, 1..=2)?;
                    inst.s[0] = self.src(&ops[0], Ty::U32, line)?;
                    if ops.len() == 2 {
                        inst.s[1] = self.src(&ops[1], Ty::U32, line)?;
                    }
                }
            }
            "shfl" => {
                if !m.take("sync") {
                    return m.err("only shfl.sync is supported (sm_70+)".into());
                }
                let mode = match m.take_any(&["up", "down", "bfly", "idx"]) {
                    Some("up") => ShflMode::Up,
                    Some("down") => ShflMode::Down,
                    Some("bfly") => ShflMode::Bfly,
                    Some("idx") => ShflMode::Idx,
                    _ => return m.err("missing shfl mode".into()),
                };
                inst.ty = m.one_type()?;
                inst.op = Op::Shfl(mode);
                self.operands(i, 5..=5)?;
                match &ops[0] {
                    Operand::Pair(d, p) => {
                        inst.d[0] = self.dst(&Operand::Name(d.clone()), line)?;
                        inst.d[1] = self.dst(&Operand::Name(p.clone()), line)?;
                    }
                    d => inst.d[0] = self.dst(d, line)?,
                }
                for k in 0..4 {
                    inst.s[k] = self.src(&ops[k + 1], Ty::B32, line)?;
                }
            }
            "vote" => {
                if !m.take("sync") {
                    return m.err("only vote.sync is supported (sm_70+)".into());
                }
                let mode = match m.take_any(&["all", "any", "uni", "ballot"]) {
                    Some("all") => VoteMode::All,
                    Some("any") => VoteMode::Any,
                    Some("uni") => VoteMode::Uni,
                    Some("ballot") => VoteMode::Ballot,
                    _ => return m.err("missing vote mode".into()),
                };
                inst.ty = m.one_type()?;
                inst.op = Op::Vote(mode);
                self.operands(i, 3..=3)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                match &ops[1] {
                    Operand::Name(n) if n.starts_with('!') => {
                        inst.s[0] = self.src(&Operand::Name(n[1..].to_string()), Ty::Pred, line)?;
                        inst.flags.neg_c = true;
                    }
                    o => inst.s[0] = self.src(o, Ty::Pred, line)?,
                }
                inst.s[1] = self.src(&ops[2], Ty::B32, line)?;
            }
            "activemask" => {
                inst.ty = m.one_type()?;
                inst.op = Op::Activemask;
                self.operands(i, 1..=1)?;
                inst.d[0] = self.dst(&ops[0], line)?;
            }
            "redux" => {
                if !m.take("sync") {
                    return m.err("redux needs .sync".into());
                }
                let op = match m.take_any(&["add", "min", "max", "and", "or", "xor"]) {
                    Some("add") => AtomOp::Add,
                    Some("min") => AtomOp::Min,
                    Some("max") => AtomOp::Max,
                    Some("and") => AtomOp::And,
                    Some("or") => AtomOp::Or,
                    Some("xor") => AtomOp::Xor,
                    _ => return m.err("missing redux operation".into()),
                };
                inst.ty = m.one_type()?;
                if !matches!(inst.ty, Ty::U32 | Ty::S32 | Ty::B32) {
                    return m.err(format!("redux type {:?} not supported", inst.ty));
                }
                inst.op = Op::Redux(op);
                self.operands(i, 3..=3)?;
                inst.d[0] = self.dst(&ops[0], line)?;
                inst.s[0] = self.src(&ops[1], inst.ty, line)?;
                inst.s[1] = self.src(&ops[2], Ty::B32, line)?;
            }
            "mma" => {
                m.take("sync");
                m.take("aligned");
                let k = match m.take_any(&["m16n8k16", "m16n8k8"]) {
                    Some("m16n8k16") => 16,
                    Some(_) => 8,
                    None => return m.err("unsupported mma shape".into()),
                };
                if !(m.take("row") && m.take("col")) {
                    return m.err("mma needs .row.col".into());
                }
                let t = m.types();
                let ty = match t.as_slice() {
                    [Ty::F32, Ty::F16, Ty::F16, Ty::F32] => MmaType::F16,
                    [Ty::F32, Ty::BF16, Ty::BF16, Ty::F32] => MmaType::Bf16,
                    [Ty::F32, Ty::TF32, Ty::TF32, Ty::F32] if k == 8 => MmaType::Tf32,
                    _ => {
                        return m.err(format!("unsupported mma types {t:?} (f32 accumulators with f16, bf16 or tf32)"))
                    }
                };
                let (na, nb) = match (k, ty) {
                    (16, MmaType::Tf32) => unreachable!(),
                    (16, _) => (4, 2),
                    (_, MmaType::Tf32) => (4, 2),
                    _ => (2, 1),
                };
                self.operands(i, 4..=4)?;
                let mut regs = |op: &Operand, n: usize, dst: bool| -> Result<Vec<Slot>, LoadError> {
                    let Operand::Vector(v) = op else {
                        return Err(LoadError::at(line, format!("mma operand {op:?} is not a vector")));
                    };
                    if v.len() != n {
                        return Err(LoadError::at(
                            line,
                            format!("mma operand has {} registers, {n} expected", v.len()),
                        ));
                    }
                    v.iter().map(|r| if dst { self.dst(r, line) } else { self.src(r, Ty::B32, line) }).collect()
                };
                let d = regs(&ops[0], 4, true)?;
                let a = regs(&ops[1], na, false)?;
                let b = regs(&ops[2], nb, false)?;
                let c = regs(&ops[3], 4, false)?;
                let mut mo = MmaOperands {
                    kind: MmaKind { k, ty },
                    d: [NONE; 4],
                    a: [NONE; 4],
                    b: [NONE; 2],
                    c: [NONE; 4],
                    na: na as u8,
                    nb: nb as u8,
                };
                mo.d.copy_from_slice(&d);
                mo.a[..na].copy_from_slice(&a);
                mo.b[..nb].copy_from_slice(&b);
                mo.c.copy_from_slice(&c);
                inst.op = Op::Mma(Box::new(mo));
                inst.s[0] = self.const_slot(0xffff_ffff);
            }
            "ldmatrix" => {
                m.take("sync");
                m.take("aligned");
                if !m.take("m8n8") {
                    return m.err("only ldmatrix .m8n8 is supported".into());
                }
                inst.vec = match m.take_any(&["x1", "x2", "x4"]) {
                    Some("x1") => 1,
                    Some("x2") => 2,
                    Some(_) => 4,
                    None => return m.err("ldmatrix needs .x1/.x2/.x4".into()),
                };
                let trans = m.take("trans");
                if !(m.take("shared") || m.take("shared::cta")) {
                    return m.err("ldmatrix reads .shared".into());
                }
                inst.ty = m.one_type()?;
                if inst.ty != Ty::B16 {
                    return m.err("ldmatrix type must be .b16".into());
                }
                self.operands(i, 2..=2)?;
                let Operand::Vector(v) = &ops[0] else {
                    return m.err("ldmatrix destination must be a vector".into());
                };
                if v.len() != inst.vec as usize {
                    return m.err(format!("ldmatrix .x{} with {} registers", inst.vec, v.len()));
                }
                for (k, r) in v.iter().enumerate() {
                    inst.d[k] = self.dst(r, line)?;
                }
                (inst.addr, inst.off) = self.addr(&ops[1], line)?;
                inst.op = Op::Ldmatrix { trans };
                inst.s[0] = self.const_slot(0xffff_ffff);
            }
            "cp" => {
                if !m.take("async") {
                    return m.err("only cp.async is supported".into());
                }
                if m.take("commit_group") {
                    inst.op = Op::CpAsyncCommit;
                } else if m.take("wait_group") {
                    self.operands(i, 1..=1)?;
                    let Operand::Int(n) = ops[0] else {
                        return m.err("wait_group takes an immediate".into());
                    };
                    inst.op = Op::CpAsyncWait { n: n as u32, all: false };
                } else if m.take("wait_all") {
                    inst.op = Op::CpAsyncWait { n: 0, all: true };
                } else {
                    let cg = m.take("cg");
                    let ca = m.take("ca");
                    if cg == ca {
                        return m.err("cp.async needs .ca or .cg".into());
                    }
                    if !(m.take("shared") || m.take("shared::cta")) || !m.take("global") {
                        return m.err("cp.async copies .global to .shared".into());
                    }
                    m.drop_ignorable(&["L2::64B", "L2::128B", "L2::256B"]);
                    self.operands(i, 3..=4)?;
                    let size = match ops[2] {
                        Operand::Int(n @ (4 | 8 | 16)) => n as u8,
                        _ => return m.err("cp.async size must be 4, 8 or 16".into()),
                    };
                    if cg && size != 16 {
                        return m.err("cp.async.cg copies 16 bytes".into());
                    }
                    (inst.addr, inst.off) = self.addr(&ops[0], line)?;
                    let (src, off2) = self.addr(&ops[1], line)?;
                    inst.s[0] = src;
                    if ops.len() == 4 {
                        inst.s[1] = self.src(&ops[3], Ty::U32, line)?;
                    }
                    inst.op = Op::CpAsync { size, off2 };
                }
            }
            "membar" | "fence" => {
                inst.flags.cta_scope = m.words.iter().any(|w| w == "cta");
                m.drop_ignorable(&["cta", "gl", "gpu", "sys", "sc", "acq_rel", "cluster"]);
                inst.op = Op::Fence;
            }
            _ => return Err(LoadError::at(line, format!("unsupported instruction '{}'", i.opcode))),
        }
        m.done()?;
        self.insts.push(inst);
        Ok(())
    }
}

pub fn decode_function(f: &FunctionAst, syms: &ModuleSymbols) -> Result<Function, LoadError> {
    let mut d = Decoder {
        syms,
        nslots: 0,
        scopes: vec![HashMap::new()],
        reg_bits: Vec::new(),
        consts: HashMap::new(),
        dyn_shared_slots: Vec::new(),
        specials: HashMap::new(),
        special_list: Vec::new(),
        symbols: HashMap::new(),
        shared_top: 0,
        dyn_align: 16,
        local_top: 0,
        labels: HashMap::new(),
        fixups: Vec::new(),
        insts: Vec::new(),
        prefix: String::new(),
        ret_label: String::new(),
        call_stack: Vec::new(),
        inline_count: 0,
        carry_flag: None,
    };
    // Parameters: laid out in order with their alignment, as the driver packs them.
    let mut params = Vec::new();
    let mut off = 0u64;
    for p in &f.params {
        off = align_up(off, p.alignment());
        params.push(ParamInfo { name: p.name.clone(), offset: off as u32, size: p.size() as u32 });
        d.symbols.insert(p.name.clone(), Sym::Param(off));
        off += p.size();
    }
    let body = f.body.as_ref().ok_or_else(|| LoadError::at(f.line, format!("function '{}' has no body", f.name)))?;
    d.stmts(body)?;
    // Falling off the end returns.
    d.insts.push(Inst::new(Op::Ret, f.line));
    for (idx, label, line) in std::mem::take(&mut d.fixups) {
        let t = *d.labels.get(&label).ok_or_else(|| LoadError::at(line, format!("unknown label '{label}'")))?;
        d.insts[idx].target = t;
    }
    let dyn_off = align_up(d.shared_top, d.dyn_align);
    let mut consts: Vec<(Slot, u64)> = d.consts.iter().map(|(&v, &s)| (s, v)).collect();
    consts.extend(d.dyn_shared_slots.iter().map(|&s| (s, dyn_off)));
    consts.sort();
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut function = Function {
        name: f.name.clone(),
        insts: d.insts,
        nslots: d.nslots,
        consts,
        specials: d.special_list,
        params,
        param_bytes: off as u32,
        static_shared: d.shared_top as u32,
        dynamic_shared_offset: dyn_off as u32,
        local_bytes: d.local_top as u32,
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        read_before_written: None,
    };
    function.read_before_written = crate::liveness::read_before_written(&function);
    Ok(function)
}
