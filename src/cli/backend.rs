//! The one place a command gets its backend from `--device`.
//! Commands run one generic body on whichever backend was selected, through
//! `purifier::with_backend!`.
use purifier::device::{self, SelectedBackend};
use purifier::error::Result;

use super::args::DeviceArgs;

/// The backend of `--device` / `--precision` (device.rs decides); a note when the choice was not
/// literal (`auto` falling back) goes to standard error.
pub(super) fn backend(args: &DeviceArgs) -> Result<SelectedBackend> {
    let (backend, note) = device::select(args.device, args.precision)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(backend)
}
