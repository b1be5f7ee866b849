//! The one place a command gets its backend from `--device`.
use purifier::backend::Backend;
use purifier::device;
use purifier::error::Result;

use super::args::DeviceArgs;

pub(super) fn backend(args: &DeviceArgs) -> Result<impl Backend> {
    let (backend, note) = device::select(args.device)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(backend)
}
