//! The networks: the DDPM UNet noise predictor and the CIFAR ResNet classifiers.
pub mod classifier;
pub mod config;
pub mod params;
pub mod unet;

pub use classifier::{Classifier, ClassifierPlan};
pub use config::UnetConfig;
pub use unet::{Unet, UnetPlan};
