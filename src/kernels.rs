//! The CUDA kernel sources of kernels/, embedded into the binary by build.rs so it is
//! self-contained; the CUDA backend hands them to NVRTC at run time. (Empty until it lands.)
include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
