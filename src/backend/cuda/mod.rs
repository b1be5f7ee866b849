//! The CUDA backend's kernels and their host launchers (the backend itself lands beside them).
pub mod attention;
pub mod conv;
