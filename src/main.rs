//! The `purifier` command line: purify, classify, inspect, eps.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use purifier::device::DeviceChoice;
use purifier::diffusion::{GradientPath, Guidance, Sampler};
use purifier::Result;

mod commands;

#[derive(Parser)]
#[command(
    name = "purifier",
    version,
    about = "Diffusion-model adversarial purification (DDPM UNet, hand-written forward and backward)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Purify images: diffuse to t*, run (guided) reverse steps, write PNGs and a comparison grid.
    Purify(PurifyArgs),
    /// Top-1 accuracy of a CIFAR ResNet classifier on labelled images.
    Classify(ClassifyArgs),
    /// What a weights file holds: network kind, config, parameter count, and whether it loads.
    Inspect(InspectArgs),
    /// Run the noise predictor on tensors from a safetensors file (and optionally its input VJP).
    Eps(EpsArgs),
}

#[derive(Args)]
pub struct DeviceArgs {
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    None,
    Pixel,
    Adversarial,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    Ddpm,
    Ddim,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PathArg {
    X0,
    Xt,
}

#[derive(Args)]
pub struct PurifyArgs {
    /// Images: CIFAR-10 binary files (.bin), PNG files (32x32 RGB), or folders of PNGs.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    /// DDPM UNet weights (safetensors, published key names; config inferred).
    #[arg(long, default_value = "weights/ddpm_cifar10_small.safetensors")]
    pub weights: PathBuf,
    /// Instead of --weights, use deterministic UNTRAINED weights of a config (cifar10-small or
    /// cifar10) with this seed: a smoke test of the pipeline, not a purification.
    #[arg(long, value_name = "SEED")]
    pub untrained_seed: Option<u64>,
    #[arg(long, default_value = "cifar10-small", requires = "untrained_seed")]
    pub untrained_config: String,
    /// Output folder for purified PNGs and grid.png.
    #[arg(long, default_value = "out/purified")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ModeArg::None)]
    pub mode: ModeArg,
    /// Diffusion level t* (1..1000).
    #[arg(long, default_value_t = 100)]
    pub t_star: usize,
    #[arg(long, value_enum, default_value_t = SamplerArg::Ddpm)]
    pub sampler: SamplerArg,
    /// Steps per network call for --sampler ddim.
    #[arg(long, default_value_t = 10)]
    pub stride: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Guidance scale s (pixel and adversarial modes).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    /// Weight of the feature term of the adversarial objective.
    #[arg(long, default_value_t = 1.0)]
    pub lambda_f: f32,
    /// Weight of the class term of the adversarial objective.
    #[arg(long, default_value_t = 1.0)]
    pub lambda_c: f32,
    /// Gradient path of the adversarial guidance.
    #[arg(long, value_enum, default_value_t = PathArg::X0)]
    pub gradient_path: PathArg,
    /// Gradient constraint ||delta|| <= kappa ||x_t - mu|| ("inf" turns it off).
    #[arg(long, default_value_t = 0.5)]
    pub kappa: f32,
    /// Auxiliary adversarially trained CIFAR ResNet (adversarial mode).
    #[arg(long)]
    pub auxiliary: Option<PathBuf>,
    /// Classifier whose accuracy is reported before and after purification (needs labels).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Also write a JSON summary (settings, timings, accuracy) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl PurifyArgs {
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
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// Classifier weights (CIFAR ResNet, safetensors).
    #[arg(long)]
    pub classifier: PathBuf,
    /// Labelled images: CIFAR-10 binary files.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub count: Option<usize>,
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A safetensors weights file.
    pub weights: PathBuf,
    /// Also list the UNet's layers in execution order with their output shapes.
    #[arg(long)]
    pub layers: bool,
}

#[derive(Args)]
pub struct EpsArgs {
    /// DDPM UNet weights.
    #[arg(long)]
    pub weights: PathBuf,
    /// Holds `x` (N x 3 x 32 x 32, f32, in [-1, 1]), `t` (N step indices 0..999) and, with --vjp, `v`.
    #[arg(long)]
    pub input: PathBuf,
    /// Gets `eps` and, with --vjp, `grad_x` = d sum(eps * v) / dx.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub vjp: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Purify(args) => commands::purify(&args),
        Command::Classify(args) => commands::classify(&args),
        Command::Inspect(args) => commands::inspect(&args),
        Command::Eps(args) => commands::eps(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
