//! Choosing the backend from `--device cpu|cuda|emulator|auto`: the one place that decides.
//!
//! - `cpu`: the CPU reference backend (f32);
//! - `cuda`: the CUDA backend on the first GPU (cudarc; NVRTC compiles the kernels for it);
//! - `emulator`: the same CUDA backend on the project's PTX emulator, so anyone can run the CUDA
//!   path without a GPU and compare it with `--device cpu`;
//! - `auto`: `cuda` when a usable GPU and NVRTC are there, else the CPU with a warning saying why;
//!   never the emulator.
//!
//! Commands are written once, generic over `Backend`; `with_backend!` instantiates a command's
//! body for whichever backend was selected.
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::compile::{nvrtc_available, ImageKind};
use crate::backend::cuda::CudaBackend;
use crate::backend::Precision;
use crate::driver::cuda::CudaDriver;
use crate::driver::emulated::EmulatedDriver;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Emulator,
    Auto,
}

/// The backend a `--device` choice selected.
pub enum SelectedBackend {
    Cpu(CpuBackend),
    /// Boxed: the CUDA backend is much larger than the (empty) CPU one.
    Cuda(Box<CudaBackend>),
}

/// Runs `$body` with `$b` bound to the selected backend (by value), whatever its type: the body is
/// compiled once per backend type.
#[macro_export]
macro_rules! with_backend {
    ($selected:expr, $b:ident => $body:expr) => {
        match $selected {
            $crate::device::SelectedBackend::Cpu($b) => $body,
            $crate::device::SelectedBackend::Cuda(boxed) => {
                let $b = *boxed;
                $body
            }
        }
    };
}

/// The CUDA backend on the first GPU, storing activations in `precision`; an error naming what is
/// missing (driver, device, a GPU too old, NVRTC).
pub fn cuda_backend(precision: Precision) -> Result<CudaBackend> {
    let driver = CudaDriver::new(0)?;
    if !nvrtc_available() {
        return Err(Error::Device(format!(
            "{} found, but NVRTC (libnvrtc.so.13) was not: the CUDA backend compiles its kernels at run time; \
             install PyPI nvidia-cuda-nvrtc==13.0.88 and put its lib folder on LD_LIBRARY_PATH",
            driver.info().name
        )));
    }
    CudaBackend::new(Arc::new(driver), precision, ImageKind::Cubin)
}

/// The CUDA backend on the PTX emulator (sm_80), storing activations in `precision`.
pub fn emulator_backend(precision: Precision) -> Result<CudaBackend> {
    CudaBackend::new(Arc::new(EmulatedDriver::new()), precision, ImageKind::Ptx)
}

use crate::driver::Driver as _;

/// The backend for a `--device` choice and an activation precision, with a line for the user when
/// the choice was not literal (`auto` falling back to the CPU).
pub fn select(choice: DeviceChoice, precision: Precision) -> Result<(SelectedBackend, Option<String>)> {
    // A mistyped A/B switch is an error whatever the device (`auto` would fall back to the CPU).
    crate::switches::check()?;
    let cpu = || -> Result<SelectedBackend> {
        if precision != Precision::F32 {
            return Err(Error::invalid(format!(
                "the CPU backend computes in f32; --precision {precision} needs --device cuda or emulator"
            )));
        }
        Ok(SelectedBackend::Cpu(CpuBackend))
    };
    match choice {
        DeviceChoice::Cpu => Ok((cpu()?, None)),
        DeviceChoice::Cuda => Ok((SelectedBackend::Cuda(Box::new(cuda_backend(precision)?)), None)),
        DeviceChoice::Emulator => Ok((SelectedBackend::Cuda(Box::new(emulator_backend(precision)?)), None)),
        DeviceChoice::Auto => match cuda_backend(precision) {
            Ok(b) => Ok((SelectedBackend::Cuda(Box::new(b)), None)),
            Err(reason) => Ok((cpu()?, Some(format!("warning: device auto: using the CPU backend ({reason})")))),
        },
    }
}
