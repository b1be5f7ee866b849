//! Choosing the backend from `--device cpu|cuda|auto`.
//!
//! Only the CPU reference backend exists in this version; the CUDA backend (NVRTC kernels through
//! cudarc) comes next. `cuda` therefore fails with a clear message instead of pretending, and
//! `auto` says that it fell back to the CPU.
use crate::backend::cpu::CpuBackend;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Auto,
}

/// The backend for a `--device` choice, with a line for the user when the choice was not literal.
pub fn select(choice: DeviceChoice) -> Result<(CpuBackend, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((CpuBackend, None)),
        DeviceChoice::Cuda => Err(Error::Device(
            "this build has no CUDA backend yet (the CPU reference backend is the only one); use --device cpu or auto"
                .into(),
        )),
        DeviceChoice::Auto => {
            Ok((CpuBackend, Some("device auto: using the CPU backend (no CUDA backend in this build)".into())))
        }
    }
}
