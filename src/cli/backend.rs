//! The one place a command gets its backend from `--device`.
//! Commands run one generic body on whichever backend was selected, through
//! `purifier::with_backend!`.
use purifier::device::{self, SelectedBackend};
use purifier::error::Result;

use super::args::DeviceArgs;

/// The backend for a command that runs the UNet, which uses nearly every kernel file: a CUDA
/// backend starts compiling them all in the background at once (in parallel, while the command
/// loads weights and data), so a cold kernel cache costs the slowest file, not their sum.
pub(super) fn unet_backend(args: &DeviceArgs) -> Result<SelectedBackend> {
    let selected = backend(args)?;
    if let SelectedBackend::Cuda(b) = &selected {
        b.compile_kernels_in_background();
    }
    Ok(selected)
}

/// The backend of `--device` / `--precision` (device.rs decides), each kernel file compiled when
/// first used; a note when the choice was not literal (`auto` falling back) goes to standard error.
pub(super) fn backend(args: &DeviceArgs) -> Result<SelectedBackend> {
    let (backend, note) = device::select(args.device, args.precision)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(backend)
}
