//! purifier: diffusion-model adversarial purification (see ../shared/METHOD.md).
//!
//! - `backend`: the compute interface and its CPU reference implementation;
//! - `model`: the DDPM UNet noise predictor and the CIFAR ResNet classifiers, written once over it;
//! - `diffusion`: the schedule, reverse steps and guidance modes;
//! - `purify`: the purification pipeline (and its gradient);
//! - `attack`: adaptive white-box attacks on the purification defence;
//! - `data`: CIFAR-10 binaries, PNG images and safetensors files;
//! - `device`: choosing a backend from `--device`;
//! - `driver`: the device interface under the CUDA backend (a GPU through cudarc, or the PTX emulator);
//! - `switches`: the benchmark's A/B switches (environment variables).
pub mod attack;
pub mod backend;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod driver;
pub mod error;
pub mod kernels;
pub mod model;
pub mod purify;
pub mod switches;

pub use error::{Error, Result};
