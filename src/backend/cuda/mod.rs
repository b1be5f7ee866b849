//! The CUDA backend: hand-written kernels (kernels/*.cu) compiled by NVRTC at run time and launched
//! through a `Driver` (cudarc on a GPU, the PTX emulator elsewhere).
pub mod attention;
pub mod compile;
pub mod conv;
pub mod modules;
