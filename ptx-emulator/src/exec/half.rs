//! f16 and bf16 arithmetic, scalar and x2 (milestone 3).

use crate::ir::*;

pub fn exec(inst: &Inst, _regs: &mut [u64], _mask: u32) -> Result<(), String> {
    Err(format!("{:?} on {:?} is not supported yet", inst.op, inst.ty))
}

pub fn cvt(inst: &Inst, _regs: &mut [u64], _mask: u32) -> Result<(), String> {
    Err(format!("cvt between {:?} and {:?} is not supported yet", inst.ty, inst.ty2))
}
