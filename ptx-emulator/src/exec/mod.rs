//! Instruction execution by family. `block` owns scheduling, branches, barriers and warp
//! collectives; everything else runs here for the lanes of a mask.

pub mod alu;
pub mod async_copy;
pub mod cvt;
pub mod float;
pub mod half;
pub mod lanes;
pub mod mem;
pub mod tensor;
pub mod warp;
