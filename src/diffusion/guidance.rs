//! The guidance shift `delta_t` of the three purification modes (METHOD.md section 3).
use crate::error::{Error, Result};

/// Which gradient path the adversarial guidance takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientPath {
    /// Through the noise predictor: `L(x0_hat(x_t))`, one UNet VJP per step (the default).
    X0,
    /// Cheap: `L(x_t / sqrt(abar_t))`, no UNet backward.
    Xt,
}

/// The purification mode and its settings.
#[derive(Clone, Debug, PartialEq)]
pub enum Guidance {
    /// DiffPure-style: `delta_t = 0`.
    None,
    /// GDMP-style: `delta_t = -s sigma_t^2 grad ||x_t - sqrt(abar_t) x_in||^2`.
    Pixel { scale: f32 },
    /// Guidance in the latent space of an adversarially trained auxiliary classifier:
    /// `L = -lambda_f ||f_A(z) - f_A(x_in)||^2 / dim(f) + lambda_c log p_A(y_hat | z)`,
    /// `delta_t = s sigma_t^2 grad_{x_t} L`.
    Adversarial { scale: f32, lambda_features: f32, lambda_class: f32, path: GradientPath },
}

impl Guidance {
    pub fn name(&self) -> &'static str {
        match self {
            Guidance::None => "none",
            Guidance::Pixel { .. } => "pixel",
            Guidance::Adversarial { .. } => "adversarial",
        }
    }

    pub fn validate(&self) -> Result<()> {
        let finite = |v: f32, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!("{what} must be a finite number >= 0, got {v}")))
            }
        };
        match *self {
            Guidance::None => Ok(()),
            Guidance::Pixel { scale } => finite(scale, "guidance scale"),
            Guidance::Adversarial { scale, lambda_features, lambda_class, .. } => {
                finite(scale, "guidance scale")?;
                finite(lambda_features, "lambda_f")?;
                finite(lambda_class, "lambda_c")
            }
        }
    }
}
