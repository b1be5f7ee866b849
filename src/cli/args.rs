//! What several commands share: the flags of a device and of a purification, and number parsing.
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use purifier::backend::Precision;
use purifier::device::DeviceChoice;
use purifier::diffusion::{GradientPath, Guidance, Sampler};
use purifier::purify::PurifySettings;

#[derive(Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu (the reference backend, the spec every other backend is checked
    /// against), cuda (an NVIDIA GPU, sm_80 or newer, kernels compiled by NVRTC), emulator (the
    /// CUDA backend on the project's PTX emulator: slow, for checking without a GPU), auto (cuda
    /// when a device and NVRTC are present, else cpu, said on standard error).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Storage type of the network's activations and convolution weights on the CUDA backend:
    /// f32 (full precision, the reference), bf16 (f32's range, 8 significant bits), f16 (11
    /// significant bits, a narrower range). x_t, the noise, statistics and gradients stay f32.
    /// The CPU backend computes in f32 and rounds on store.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

/// How the reverse process is guided (METHOD.md section 3).
#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// No guidance (DiffPure): plain reverse steps from the diffused input.
    None,
    /// Pull each step towards the input brought to the same noise level (GDMP-style).
    Pixel,
    /// Guidance in the feature and class space of an adversarially trained auxiliary network
    /// (--auxiliary), which keeps the input's meaning without pulling the perturbation back.
    Adversarial,
}

/// How the reverse steps are taken.
#[derive(Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    /// Ancestral DDPM: one UNet call per step, fresh noise at each step.
    Ddpm,
    /// Deterministic DDIM (eta 0), jumping --stride steps per UNet call.
    Ddim,
}

/// Where the adversarial guidance takes its gradient.
#[derive(Clone, Copy, ValueEnum)]
pub enum PathArg {
    /// Through the noise predictor's estimate of the clean image (one UNet backward per step).
    X0,
    /// At the scaled noisy image itself: no UNet backward, cheaper, less faithful.
    Xt,
}

/// What decides a purification: the denoiser, the mode and the sampler (purify and attack).
#[derive(Args)]
pub struct PurificationArgs {
    /// DDPM UNet weights (safetensors, published key names; config inferred).
    #[arg(long, default_value = "weights/ddpm_cifar10_small.safetensors")]
    pub weights: PathBuf,
    /// Instead of --weights, use deterministic UNTRAINED weights of a config (cifar10-small or
    /// cifar10) with this seed: a smoke test of the pipeline, not a purification.
    #[arg(long, value_name = "SEED")]
    pub untrained_seed: Option<u64>,
    /// UNet config of the untrained weights: cifar10-small or cifar10 (needs --untrained-seed).
    #[arg(long, value_name = "CONFIG", default_value = "cifar10-small", requires = "untrained_seed")]
    pub untrained_config: String,
    /// Purification mode: how the reverse steps are guided.
    #[arg(long, value_enum, default_value_t = ModeArg::None)]
    pub mode: ModeArg,
    /// Diffusion level t* (1..1000): the input is noised to step t*, then denoised back.
    #[arg(long, default_value_t = 100)]
    pub t_star: usize,
    /// Reverse-step sampler.
    #[arg(long, value_enum, default_value_t = SamplerArg::Ddpm)]
    pub sampler: SamplerArg,
    /// Steps per network call for --sampler ddim.
    #[arg(long, default_value_t = 10)]
    pub stride: usize,
    /// Seed of all noise (for attack: of the attack's draws and of the judging purifications).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Guidance scale s (pixel and adversarial modes).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub scale: f32,
    /// Weight of the feature term of the adversarial objective.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub lambda_f: f32,
    /// Weight of the class term of the adversarial objective.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub lambda_c: f32,
    /// Gradient path of the adversarial guidance.
    #[arg(long, value_enum, default_value_t = PathArg::X0)]
    pub gradient_path: PathArg,
    /// Gradient constraint ||delta|| <= kappa ||x_t - mu||, per image ("inf" turns it off).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub kappa: f32,
    /// Auxiliary adversarially trained CIFAR ResNet (adversarial mode).
    #[arg(long)]
    pub auxiliary: Option<PathBuf>,
}

impl PurificationArgs {
    pub fn gradient_path(&self) -> GradientPath {
        match self.gradient_path {
            PathArg::X0 => GradientPath::X0,
            PathArg::Xt => GradientPath::Xt,
        }
    }
    pub fn guidance(&self) -> Guidance {
        match self.mode {
            ModeArg::None => Guidance::None,
            ModeArg::Pixel => Guidance::Pixel { scale: self.scale },
            ModeArg::Adversarial => Guidance::Adversarial {
                scale: self.scale,
                lambda_features: self.lambda_f,
                lambda_class: self.lambda_c,
                path: self.gradient_path(),
            },
        }
    }
    pub fn sampler(&self) -> Sampler {
        match self.sampler {
            SamplerArg::Ddpm => Sampler::Ddpm,
            SamplerArg::Ddim => Sampler::Ddim { stride: self.stride },
        }
    }
    pub fn settings(&self) -> PurifySettings {
        PurifySettings {
            t_star: self.t_star,
            sampler: self.sampler(),
            guidance: self.guidance(),
            kappa: self.kappa,
            seed: self.seed,
        }
    }
    /// The files this purification reads (outputs must not overwrite them).
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        let weights = self.untrained_seed.is_none().then_some(self.weights.as_path());
        weights.into_iter().chain(self.auxiliary.as_deref())
    }
    /// The weights as the JSON reports record them.
    pub fn weights_name(&self) -> String {
        match self.untrained_seed {
            Some(seed) => format!("untrained (seed {seed})"),
            None => self.weights.display().to_string(),
        }
    }
    /// The settings as the JSON reports record them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": cli_name(self.mode), "t_star": self.t_star, "sampler": cli_name(self.sampler),
            "stride": matches!(self.sampler, SamplerArg::Ddim).then_some(self.stride),
            "seed": self.seed, "kappa": if self.kappa.is_finite() { serde_json::json!(self.kappa) } else { serde_json::json!("inf") }, "scale": self.scale, "lambda_f": self.lambda_f,
            "lambda_c": self.lambda_c, "gradient_path": cli_name(self.gradient_path),
        })
    }
}

/// A number, or a fraction `a/b` (8/255).
pub fn parse_number(text: &str) -> std::result::Result<f32, String> {
    let bad = || format!("'{text}' is not a number or a fraction like 8/255");
    let value = match text.split_once('/') {
        Some((a, b)) => {
            let (a, b): (f32, f32) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            a / b
        }
        None => text.trim().parse().map_err(|_| bad())?,
    };
    if value.is_finite() {
        Ok(value)
    } else {
        Err(bad())
    }
}

/// A value as the command line spells it (`x0`, `ddpm`), for reports.
pub fn cli_name(value: impl ValueEnum) -> String {
    value.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}
