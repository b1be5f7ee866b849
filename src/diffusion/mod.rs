//! The diffusion process (METHOD.md section 2) and the purification modes (section 3).
pub mod guidance;
pub mod schedule;
pub mod step_table;

pub use guidance::{GradientPath, Guidance};
pub use schedule::{ReverseStep, Sampler, Schedule};
