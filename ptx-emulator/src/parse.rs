//! PTX text to a light syntax tree: module-level variables and functions, each function a flat
//! list of statements (declarations, labels, instructions, scope braces) with their PTX line.
//! Names stay strings here; `decode` resolves them once per module.

use crate::report::LoadError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Word(String),
    Num(u64),
    /// A float literal in PTX hex form: `0f...` (f32 bits) or `0d...` (f64 bits).
    F32(u32),
    F64(u64),
    Str(String),
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: u32,
}

fn lex(text: &str) -> Result<Vec<Token>, LoadError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1u32);
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'%' || c == b'.';
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            out.push(Token { tok: Tok::Str(text[start..i.min(b.len())].to_string()), line });
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            let s = &text[start..i];
            out.push(Token { tok: number(s).ok_or_else(|| LoadError::at(line, format!("bad number '{s}'")))?, line });
        } else if is_word(c) {
            let start = i;
            // `::` belongs to the word in qualifiers such as `.L2::128B` or `.L1::no_allocate`.
            while i < b.len() && (is_word(b[i]) || (b[i] == b':' && b.get(i + 1) == Some(&b':'))) {
                i += if b[i] == b':' { 2 } else { 1 };
            }
            out.push(Token { tok: Tok::Word(text[start..i].to_string()), line });
        } else if b"{}[](),;:@!+-|<>=".contains(&c) {
            out.push(Token { tok: Tok::Punct(c as char), line });
            i += 1;
        } else {
            return Err(LoadError::at(line, format!("unexpected character '{}'", c as char)));
        }
    }
    Ok(out)
}

fn number(s: &str) -> Option<Tok> {
    let s2 = s.trim_end_matches(['U', 'u']);
    if let Some(h) = s2.strip_prefix("0f").or_else(|| s2.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(Tok::F32);
    }
    if let Some(h) = s2.strip_prefix("0d").or_else(|| s2.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok().map(Tok::F64);
    }
    if let Some(h) = s2.strip_prefix("0x").or_else(|| s2.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok().map(Tok::Num);
    }
    if s2.contains('.') || s2.contains('e') {
        return s2.parse::<f64>().ok().map(|v| Tok::F64(v.to_bits()));
    }
    if s2.len() > 1 && s2.starts_with('0') && s2.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
        return u64::from_str_radix(&s2[1..], 8).ok().map(Tok::Num);
    }
    s2.parse::<u64>().ok().map(Tok::Num)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// A register, special register or symbol name.
    Name(String),
    /// An integer literal (negative ones as two's complement).
    Int(i64),
    F32(u32),
    F64(u64),
    /// `[base+offset]`, base a name or absent (`[imm]`).
    Addr {
        base: Option<String>,
        offset: i64,
    },
    /// `{a, b, ...}`
    Vector(Vec<Operand>),
    /// `a|b` (shfl's value and predicate outputs).
    Pair(String, String),
    /// `_`, a sink.
    Sink,
}

#[derive(Clone, Debug)]
pub struct Instr {
    pub line: u32,
    pub guard: Option<(bool, String)>,
    pub opcode: String,
    pub operands: Vec<Operand>,
}

#[derive(Clone, Debug)]
pub struct VarDecl {
    pub line: u32,
    pub space: String,
    pub align: u64,
    /// Element type (e.g. ".b8", ".f32") and count (None for scalars; Some(0) for `[]`).
    pub ty: String,
    pub count: Option<u64>,
    pub name: String,
    pub init: Vec<Operand>,
    pub is_extern: bool,
}

impl VarDecl {
    pub fn elem_size(&self) -> u64 {
        type_size(&self.ty).unwrap_or(1)
    }
    pub fn bytes(&self) -> u64 {
        self.elem_size() * self.count.unwrap_or(1)
    }
}

#[derive(Clone, Debug)]
pub enum Stmt {
    /// `.reg .ty names` where a name may be `%r<56>` (count given).
    Reg {
        ty: String,
        name: String,
        count: Option<u32>,
    },
    Var(VarDecl),
    Label(String),
    Instr(Instr),
    Open,
    Close,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub ty: String,
    pub align: u64,
    pub count: Option<u64>,
}

impl Param {
    pub fn size(&self) -> u64 {
        type_size(&self.ty).unwrap_or(1) * self.count.unwrap_or(1)
    }
    pub fn alignment(&self) -> u64 {
        if self.align > 0 {
            self.align
        } else {
            type_size(&self.ty).unwrap_or(1)
        }
    }
}

#[derive(Clone, Debug)]
pub struct FunctionAst {
    pub name: String,
    pub is_entry: bool,
    pub line: u32,
    pub returns: Vec<Param>,
    pub params: Vec<Param>,
    /// None for a prototype (`.extern .func` without body).
    pub body: Option<Vec<Stmt>>,
}

#[derive(Clone, Debug, Default)]
pub struct ModuleAst {
    pub target: String,
    pub globals: Vec<VarDecl>,
    pub functions: Vec<FunctionAst>,
}

pub fn type_size(ty: &str) -> Option<u64> {
    Some(match ty {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" | ".tf32" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn line(&self) -> u32 {
        self.toks.get(self.pos).or(self.toks.last()).map(|t| t.line).unwrap_or(0)
    }
    fn next(&mut self) -> Result<Tok, LoadError> {
        let t = self.toks.get(self.pos).ok_or_else(|| LoadError::at(self.line(), "unexpected end of PTX".into()))?;
        self.pos += 1;
        Ok(t.tok.clone())
    }
    fn err<T>(&self, what: String) -> Result<T, LoadError> {
        Err(LoadError::at(self.line(), what))
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, c: char) -> Result<(), LoadError> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            self.err(format!("expected '{c}', found {:?}", self.peek()))
        }
    }
    fn word(&mut self) -> Result<String, LoadError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => self.err(format!("expected a name, found {t:?}")),
        }
    }
    fn peek_word(&self) -> Option<&str> {
        match self.peek() {
            Some(Tok::Word(w)) => Some(w),
            _ => None,
        }
    }
    fn skip_to_semicolon(&mut self) -> Result<(), LoadError> {
        while !self.eat_punct(';') {
            self.next()?;
        }
        Ok(())
    }
    fn int(&mut self) -> Result<i64, LoadError> {
        let neg = self.eat_punct('-');
        match self.next()? {
            Tok::Num(n) => Ok(if neg { (n as i64).wrapping_neg() } else { n as i64 }),
            t => self.err(format!("expected a number, found {t:?}")),
        }
    }

    /// Variable declaration after its space word: `.align N .ty name[count] = {...};`
    fn var_decl(&mut self, space: String, is_extern: bool, line: u32) -> Result<VarDecl, LoadError> {
        let mut align = 0;
        let mut ty = String::new();
        loop {
            let w = self.word()?;
            match w.as_str() {
                ".align" => align = self.int()? as u64,
                ".v2" | ".v4" | ".ptr" | ".global" | ".shared" | ".local" | ".const" => {}
                _ if w.starts_with('.') => ty = w,
                _ => {
                    let name = w;
                    let mut count = None;
                    if self.eat_punct('[') {
                        count = Some(if self.is_punct(']') { 0 } else { self.int()? as u64 });
                        self.expect_punct(']')?;
                    }
                    let mut init = Vec::new();
                    if self.eat_punct('=') {
                        if self.eat_punct('{') {
                            while !self.eat_punct('}') {
                                init.push(self.operand()?);
                                self.eat_punct(',');
                            }
                        } else {
                            init.push(self.operand()?);
                        }
                    }
                    self.expect_punct(';')?;
                    if align == 0 {
                        align = type_size(&ty).unwrap_or(1);
                    }
                    return Ok(VarDecl { line, space, align, ty, count, name, init, is_extern });
                }
            }
        }
    }

    fn params(&mut self) -> Result<Vec<Param>, LoadError> {
        let mut out = Vec::new();
        self.expect_punct('(')?;
        while !self.eat_punct(')') {
            let mut p = Param { name: String::new(), ty: String::new(), align: 0, count: None };
            loop {
                let w = self.word()?;
                match w.as_str() {
                    ".param" | ".reg" | ".ptr" | ".global" | ".shared" | ".local" | ".const" => {}
                    ".align" => p.align = self.int()? as u64,
                    _ if w.starts_with('.') => p.ty = w,
                    _ => {
                        p.name = w;
                        if self.eat_punct('[') {
                            p.count = Some(self.int()? as u64);
                            self.expect_punct(']')?;
                        }
                        break;
                    }
                }
            }
            out.push(p);
            self.eat_punct(',');
        }
        Ok(out)
    }

    fn operand(&mut self) -> Result<Operand, LoadError> {
        match self.next()? {
            Tok::Punct('-') => match self.next()? {
                Tok::Num(n) => Ok(Operand::Int((n as i64).wrapping_neg())),
                Tok::F64(b) => Ok(Operand::F64((-f64::from_bits(b)).to_bits())),
                t => self.err(format!("bad operand after '-': {t:?}")),
            },
            Tok::Punct('!') => {
                let w = self.word()?;
                Ok(Operand::Name(format!("!{w}")))
            }
            Tok::Num(n) => Ok(Operand::Int(n as i64)),
            Tok::F32(b) => Ok(Operand::F32(b)),
            Tok::F64(b) => Ok(Operand::F64(b)),
            Tok::Word(w) => {
                if w == "_" {
                    return Ok(Operand::Sink);
                }
                if self.eat_punct('|') {
                    let p = self.word()?;
                    return Ok(Operand::Pair(w, p));
                }
                // A symbol plus offset outside brackets (e.g. `sym+4` in initialisers) is not expected.
                Ok(Operand::Name(w))
            }
            Tok::Punct('[') => {
                let mut base = None;
                let mut offset = 0i64;
                if let Some(Tok::Word(_)) = self.peek() {
                    base = Some(self.word()?);
                    if self.eat_punct('+') || self.is_punct('-') {
                        offset = self.int()?;
                    }
                } else {
                    offset = self.int()?;
                }
                self.expect_punct(']')?;
                Ok(Operand::Addr { base, offset })
            }
            Tok::Punct('{') => {
                let mut v = Vec::new();
                while !self.eat_punct('}') {
                    v.push(self.operand()?);
                    self.eat_punct(',');
                }
                Ok(Operand::Vector(v))
            }
            t => self.err(format!("unexpected operand {t:?}")),
        }
    }

    fn body(&mut self) -> Result<Vec<Stmt>, LoadError> {
        let mut out = Vec::new();
        let mut depth = 0;
        self.expect_punct('{')?;
        loop {
            let line = self.line();
            if self.eat_punct('{') {
                depth += 1;
                out.push(Stmt::Open);
                continue;
            }
            if self.eat_punct('}') {
                if depth == 0 {
                    return Ok(out);
                }
                depth -= 1;
                out.push(Stmt::Close);
                continue;
            }
            let mut guard = None;
            if self.eat_punct('@') {
                let neg = self.eat_punct('!');
                guard = Some((neg, self.word()?));
            }
            let w = self.word()?;
            if guard.is_none() && self.eat_punct(':') {
                out.push(Stmt::Label(w));
                continue;
            }
            match w.as_str() {
                ".reg" => {
                    let ty = self.word()?;
                    let ty = if ty.starts_with(".v") { self.word()? } else { ty };
                    loop {
                        let name = self.word()?;
                        let mut count = None;
                        if self.eat_punct('<') {
                            count = Some(self.int()? as u32);
                            self.expect_punct('>')?;
                        }
                        out.push(Stmt::Reg { ty: ty.clone(), name, count });
                        if !self.eat_punct(',') {
                            break;
                        }
                    }
                    self.expect_punct(';')?;
                }
                ".shared" | ".local" | ".param" | ".const" | ".global" => {
                    let d = self.var_decl(w.clone(), false, line)?;
                    out.push(Stmt::Var(d));
                }
                ".pragma" | ".loc" | ".file" | ".maxntid" | ".reqntid" | ".minnctapersm" | ".maxnreg" => {
                    self.skip_to_semicolon()?
                }
                _ if w.starts_with('.') => return self.err(format!("unsupported directive '{w}' in a function body")),
                _ => {
                    let mut operands = Vec::new();
                    if !self.eat_punct(';') {
                        loop {
                            // call's `(ret), f, (a, b)` lists: parse as vectors.
                            if self.eat_punct('(') {
                                let mut v = Vec::new();
                                while !self.eat_punct(')') {
                                    v.push(self.operand()?);
                                    self.eat_punct(',');
                                }
                                operands.push(Operand::Vector(v));
                            } else {
                                operands.push(self.operand()?);
                            }
                            if self.eat_punct(';') {
                                break;
                            }
                            self.expect_punct(',')?;
                        }
                    }
                    out.push(Stmt::Instr(Instr { line, guard, opcode: w, operands }));
                }
            }
        }
    }

    fn module(&mut self) -> Result<ModuleAst, LoadError> {
        let mut m = ModuleAst::default();
        while self.pos < self.toks.len() {
            let line = self.line();
            let mut is_extern = false;
            let mut w = self.word()?;
            while matches!(w.as_str(), ".visible" | ".extern" | ".weak" | ".common") {
                is_extern |= w == ".extern";
                w = self.word()?;
            }
            match w.as_str() {
                ".version" | ".address_size" => {
                    self.next()?;
                }
                ".target" => {
                    m.target = self.word()?;
                    while self.eat_punct(',') {
                        self.word()?;
                    }
                }
                ".file" | ".section" => self.skip_to_semicolon()?,
                ".global" | ".shared" | ".const" => m.globals.push(self.var_decl(w, is_extern, line)?),
                ".entry" | ".func" => {
                    let is_entry = w == ".entry";
                    let mut returns = Vec::new();
                    if self.is_punct('(') {
                        returns = self.params()?;
                    }
                    let name = self.word()?;
                    let params = if self.is_punct('(') { self.params()? } else { Vec::new() };
                    while let Some(d) = self.peek_word() {
                        if !d.starts_with('.') {
                            break;
                        }
                        // Performance directives (.maxntid 256, 1, 1 / .noreturn ...)
                        self.word()?;
                        while matches!(self.peek(), Some(Tok::Num(_))) || self.is_punct(',') {
                            self.next()?;
                        }
                    }
                    let body = if self.eat_punct(';') { None } else { Some(self.body()?) };
                    m.functions.push(FunctionAst { name, is_entry, line, returns, params, body });
                }
                _ => return self.err(format!("unsupported module directive '{w}'")),
            }
        }
        Ok(m)
    }
}

pub fn parse(text: &str) -> Result<ModuleAst, LoadError> {
    let toks = lex(text)?;
    Parser { toks, pos: 0 }.module()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entry_with_vectors_and_addresses() {
        let m = parse(
            ".version 9.0\n.target sm_80\n.address_size 64\n.extern .shared .align 16 .b8 dyn[];\n\
             .visible .entry k(.param .u64 k_param_0, .param .align 4 .b8 k_param_1[8])\n{\n.reg .f32 %f<5>;\n\
             .reg .b64 %rd<3>;\nld.param.u64 %rd1, [k_param_0];\n@!%p1 bra $L__BB0_2;\n\
             ld.global.v2.f32 {%f1, %f2}, [%rd1+-8];\n$L__BB0_2:\nret;\n}\n",
        )
        .unwrap();
        assert_eq!(m.globals[0].count, Some(0));
        let f = &m.functions[0];
        assert_eq!(f.params[1].size(), 8);
        let body = f.body.as_ref().unwrap();
        let Stmt::Instr(i) = &body[4] else { panic!() };
        assert_eq!(i.line, 11);
        assert_eq!(i.operands[1], Operand::Addr { base: Some("%rd1".into()), offset: -8 });
    }
}
