//! Linear-beta schedule, forward diffusion coefficients, and the reverse steps (DDPM ancestral, or
//! DDIM with eta = 0 and a stride) as plain numbers; the tensors are moved by the purifier.
use crate::backend::StepCoefficients;
use crate::error::{Error, Result};

/// T = 1000 linear betas from 1e-4 to 0.02 (Ho et al. 2020), kept in f64 so that products over a
/// thousand steps lose nothing before the final rounding to f32.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// betas[t - 1] = beta_t, t = 1..T.
    betas: Vec<f64>,
    /// alpha_bars[t] = prod_{s <= t} (1 - beta_s), with alpha_bars[0] = 1.
    alpha_bars: Vec<f64>,
}

pub const NUM_STEPS: usize = 1000;

impl Schedule {
    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Self {
        let betas: Vec<f64> =
            (0..steps).map(|i| beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64).collect();
        let mut alpha_bars = vec![1.0];
        for b in &betas {
            alpha_bars.push(alpha_bars.last().unwrap() * (1.0 - b));
        }
        Self { betas, alpha_bars }
    }

    /// The DDPM schedule of METHOD.md.
    pub fn ddpm() -> Self {
        Self::linear(NUM_STEPS, 1e-4, 0.02)
    }

    pub fn num_steps(&self) -> usize {
        self.betas.len()
    }
    /// beta_t for t = 1..T.
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t - 1]
    }
    /// abar_t for t = 0..T (abar_0 = 1).
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alpha_bars[t]
    }

    /// Fails unless 1 <= t <= T.
    pub fn check_level(&self, t: usize, what: &str) -> Result<()> {
        if t == 0 || t > self.num_steps() {
            return Err(Error::invalid(format!(
                "{what} = {t} is out of range: it must be between 1 and {}",
                self.num_steps()
            )));
        }
        Ok(())
    }

    /// `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z`: the two weights.
    pub fn diffuse_weights(&self, t: usize) -> (f32, f32) {
        let a = self.alpha_bar(t);
        (a.sqrt() as f32, (1.0 - a).sqrt() as f32)
    }

    /// One reverse jump from `t` to `t_prev < t`. For t_prev = t - 1 this is the DDPM posterior
    /// q(x_{t-1} | x_t, x0) of METHOD.md; for longer jumps the same formulas hold with the jump's
    /// own beta, `1 - abar_t / abar_{t_prev}` (that of a DDPM over the sub-sequence).
    pub fn reverse_step(&self, t: usize, t_prev: usize, sampler: Sampler) -> ReverseStep {
        assert!(t_prev < t && t <= self.num_steps(), "reverse step {t} -> {t_prev}");
        let (abar, abar_prev) = (self.alpha_bar(t), self.alpha_bar(t_prev));
        let beta = 1.0 - abar / abar_prev;
        let alpha = 1.0 - beta;
        let posterior_variance = beta * (1.0 - abar_prev) / (1.0 - abar);
        let (c0, ct, noise_std) = match sampler {
            Sampler::Ddpm => (
                beta * abar_prev.sqrt() / (1.0 - abar),
                (1.0 - abar_prev) * alpha.sqrt() / (1.0 - abar),
                if t_prev == 0 { 0.0 } else { posterior_variance.sqrt() },
            ),
            // eta = 0: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps(x0), with
            // eps(x0) = (x_t - sqrt(abar) x0) / sqrt(1 - abar) from the clipped x0.
            Sampler::Ddim { .. } => {
                let k = ((1.0 - abar_prev) / (1.0 - abar)).sqrt();
                (abar_prev.sqrt() - k * abar.sqrt(), k, 0.0)
            }
        };
        ReverseStep {
            t,
            t_prev,
            coefficients: StepCoefficients {
                sqrt_abar: abar.sqrt() as f32,
                sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
                c0: c0 as f32,
                ct: ct as f32,
            },
            noise_std: noise_std as f32,
            guidance_variance: posterior_variance as f32,
        }
    }

    /// The reverse steps from `t_start` down to 0.
    pub fn reverse_steps(&self, t_start: usize, sampler: Sampler) -> Result<Vec<ReverseStep>> {
        self.check_level(t_start, "t*")?;
        let stride = match sampler {
            Sampler::Ddpm => 1,
            Sampler::Ddim { stride } if stride >= 1 => stride,
            Sampler::Ddim { .. } => return Err(Error::invalid("the DDIM stride must be at least 1")),
        };
        let mut steps = Vec::new();
        let mut t = t_start;
        while t > 0 {
            let t_prev = t.saturating_sub(stride);
            steps.push(self.reverse_step(t, t_prev, sampler));
            t = t_prev;
        }
        Ok(steps)
    }
}

/// How the reverse process walks from t* to 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// Ancestral DDPM, one network call per step.
    Ddpm,
    /// Deterministic DDIM (eta = 0) jumping `stride` steps per network call.
    Ddim { stride: usize },
}

/// The numbers of one reverse jump t -> t_prev.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReverseStep {
    /// 1-based level of x_t; the network sees the 0-based index t - 1.
    pub t: usize,
    pub t_prev: usize,
    pub coefficients: StepCoefficients,
    /// Standard deviation of the fresh noise (0 for DDIM and for the last step).
    pub noise_std: f32,
    /// sigma_t^2 of the guidance shift `delta = s sigma_t^2 grad` (the posterior variance of the
    /// jump, also for DDIM, whose own noise is zero).
    pub guidance_variance: f32,
}
