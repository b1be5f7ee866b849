//! The decoded, compact instruction form: register slots instead of names, resolved branch
//! targets, immediates and special registers turned into per-warp constant slots. Executing it
//! needs no string work.

/// A register slot index; `NONE` for no register.
pub type Slot = u32;
pub const NONE: Slot = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    B8,
    B16,
    B32,
    B64,
    B128,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    BF16,
    BF16x2,
    F32,
    F64,
    TF32,
    Pred,
}

impl Ty {
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "b128" => Ty::B128,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::BF16,
            "bf16x2" => Ty::BF16x2,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "tf32" => Ty::TF32,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    pub fn bits(self) -> u32 {
        match self {
            Ty::B8 | Ty::U8 | Ty::S8 | Ty::Pred => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::BF16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::BF16x2 | Ty::TF32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
            Ty::B128 => 128,
        }
    }
    pub fn bytes(self) -> u32 {
        self.bits() / 8
    }
    pub fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub fn float(self) -> bool {
        matches!(self, Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2 | Ty::F32 | Ty::F64 | Ty::TF32)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Generic,
    Global,
    Shared,
    Local,
    Param,
    Const,
}

/// Rounding modifier: float rounding (rn, rz, rm, rp, rna) or round-to-integer (rni ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rnd {
    Default,
    Rn,
    Rz,
    Rm,
    Rp,
    Rna,
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MulMode {
    Lo,
    Hi,
    Wide,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Inc,
    Dec,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    LanemaskEq,
    LanemaskLt,
    LanemaskLe,
    LanemaskGt,
    LanemaskGe,
    SmId,
    NSmId,
    GridId,
    DynamicSmemSize,
    TotalSmemSize,
    /// Clock registers read as 0: time is not modelled.
    Clock,
}

/// Unary float operations (`.approx` ones within the ISA's stated error; computed exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FUnary {
    Sqrt,
    Rsqrt,
    Rcp,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaType {
    F16,
    Bf16,
    Tf32,
}

/// An `mma.sync` shape (m16, n8, k8 or k16) and input type; accumulators are f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaKind {
    pub k: u8,
    pub ty: MmaType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MmaOperands {
    pub kind: MmaKind,
    pub d: [Slot; 4],
    pub a: [Slot; 4],
    pub b: [Slot; 2],
    pub c: [Slot; 4],
    pub na: u8,
    pub nb: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Mov,
    /// `mov.bN d, {a, b, ..}`: `n` parts of `w` bits each (parts in s[0..n]).
    Pack {
        n: u8,
        w: u8,
    },
    /// `mov.bN {a, b, ..}, s`: parts into d[0..n].
    Unpack {
        n: u8,
        w: u8,
    },
    Add,
    Sub,
    /// Extended-precision add/sub with the carry flag (a hidden per-thread slot, s[3] in, d[1]
    /// out): `add.cc`, `addc[.cc]`, `sub.cc`, `subc[.cc]`.
    AddCarry {
        sub: bool,
        carry_in: bool,
        carry_out: bool,
    },
    /// `mad.lo.cc`, `madc.{lo,hi}[.cc]`.
    MadCarry {
        hi: bool,
        carry_in: bool,
        carry_out: bool,
    },
    Mul(MulMode),
    Mad(MulMode),
    Div,
    Rem,
    Abs,
    Neg,
    Min,
    Max,
    And,
    Or,
    Xor,
    Not,
    Cnot,
    Shl,
    Shr,
    Popc,
    Clz,
    Brev,
    Bfe,
    Bfi,
    Prmt,
    Fma,
    FUnary(FUnary),
    Copysign,
    /// `setp.cmp[.bop]`: d[0] (and d[1] for the complement `p|q`), s[2] the combining predicate.
    Setp {
        cmp: Cmp,
        bop: Option<BoolOp>,
    },
    Selp,
    /// `cvt`: source type in `ty2`.
    Cvt,
    /// `cvta` (to generic) or `cvta.to` (from generic) for `space`.
    Cvta {
        space: Space,
        to: bool,
    },
    /// Vector count in `vec` (1, 2, 4, 8).
    Ld {
        space: Space,
    },
    St {
        space: Space,
    },
    Atom {
        space: Space,
        op: AtomOp,
    },
    Bra,
    Ret,
    Exit,
    Trap,
    /// `bar.sync`/`barrier.sync`/`bar.arrive` with barrier id s[0] and optional count s[1].
    Bar {
        arrive: bool,
    },
    BarWarp,
    Shfl(ShflMode),
    Vote(VoteMode),
    Activemask,
    Redux(AtomOp),
    /// `membar`/`fence`: no effect on the data of a sequentially run block; a device-scope one
    /// releases and acquires for the global ordering check (`ordering`).
    Fence,
    /// `mma.sync.aligned`: a whole-warp collective (mask slot in s[0]).
    Mma(Box<MmaOperands>),
    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16`: `vec` matrices into d[0..vec].
    Ldmatrix {
        trans: bool,
    },
    /// `cp.async.{ca,cg}.shared.global [addr], [s[0]] + off2, size, src-size (s[1] or NONE)`.
    CpAsync {
        size: u8,
        off2: i64,
    },
    CpAsyncCommit,
    /// `cp.async.wait_group n` (`wait_all` is n = 0 after a commit).
    CpAsyncWait {
        n: u32,
        all: bool,
    },
    Nop,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Flags {
    pub sat: bool,
    pub ftz: bool,
    pub approx: bool,
    pub relu: bool,
    /// The predicate source of `setp.*.bop` or `vote` is negated (`!%p`).
    pub neg_c: bool,
    /// `.satfinite`: out-of-range results become the largest finite value, NaN stays NaN.
    pub satfinite: bool,
    /// `.NaN` on min/max: a NaN operand gives NaN.
    pub nan: bool,
    /// Memory semantics of an atomic (`.acquire`, `.release`, `.acq_rel`) and a `.cta` scope on
    /// an atomic or fence (which then orders nothing between blocks): the global ordering check.
    pub acquire: bool,
    pub release: bool,
    pub cta_scope: bool,
}

#[derive(Clone, Debug)]
pub struct Inst {
    pub op: Op,
    pub ty: Ty,
    /// Second type: cvt's source, setp's operand type, ...
    pub ty2: Ty,
    pub rnd: Rnd,
    pub flags: Flags,
    pub d: [Slot; 4],
    pub s: [Slot; 4],
    /// Address base slot and offset for memory instructions.
    pub addr: Slot,
    pub off: i64,
    /// Vector width of ld/st (1 for scalars).
    pub vec: u8,
    /// Branch target (instruction index).
    pub target: u32,
    pub guard: Slot,
    pub guard_neg: bool,
    pub line: u32,
}

impl Inst {
    pub fn new(op: Op, line: u32) -> Self {
        Inst {
            op,
            ty: Ty::B32,
            ty2: Ty::B32,
            rnd: Rnd::Default,
            flags: Flags::default(),
            d: [NONE; 4],
            s: [NONE; 4],
            addr: NONE,
            off: 0,
            vec: 1,
            target: 0,
            guard: NONE,
            guard_neg: false,
            line,
        }
    }
}

/// A kernel parameter: its byte offset in the parameter buffer and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// One decoded function (kernel entry).
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub insts: Vec<Inst>,
    /// Slots per thread (registers, specials, constants).
    pub nslots: u32,
    /// Constant slots and their values (same in every lane).
    pub consts: Vec<(Slot, u64)>,
    pub specials: Vec<(Slot, Special)>,
    pub params: Vec<ParamInfo>,
    pub param_bytes: u32,
    /// Static shared bytes; dynamic shared memory starts at `dynamic_shared_offset`.
    pub static_shared: u32,
    pub dynamic_shared_offset: u32,
    pub local_bytes: u32,
    /// Unique to this decoding (clones share it): what a reused register file was last set up for.
    pub id: u64,
    /// The register slots a thread may read before writing them (`liveness`); `None`: register
    /// files are never reused for this function.
    pub read_before_written: Option<Vec<Slot>>,
}
