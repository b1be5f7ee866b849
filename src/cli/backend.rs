//! The one place a command gets its backend from `--device`.
use purifier::backend::Backend;
use purifier::device;
use purifier::error::{Error, Result};

use super::args::DeviceArgs;

pub(super) fn backend(args: &DeviceArgs) -> Result<impl Backend> {
    let (backend, note) = device::select(args.device, purifier::backend::Precision::F32)?;
    let purifier::device::SelectedBackend::Cpu(backend) = backend else {
        return Err(Error::Device("the commands run on the CPU backend only in this build".into()));
    };
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(backend)
}
