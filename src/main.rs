//! The `purifier` command line: purify, classify, inspect, eps, attack, bench.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use purifier::attack::{AttackSettings, Loss, Method, Norm};
use purifier::backend::Precision;
use purifier::device::DeviceChoice;
use purifier::diffusion::{GradientPath, Guidance, Sampler};
use purifier::purify::PurifySettings;
use purifier::Result;

mod bench;
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
    /// Attack the defended model C(purify(x)): PGD with EOT, exact gradients through every
    /// reverse step; clean and robust accuracy judged over several purifications.
    Attack(AttackArgs),
    /// Benchmark: UNet forward and forward + VJP per batch size, purification per mode, cold
    /// start, memory; with --baseline, PyTorch on the same weights side by side.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu (the f32 reference), cuda (a GPU), emulator (the CUDA backend on the
    /// project's PTX emulator, no GPU needed, slow), auto (cuda when usable, else cpu; never the
    /// emulator).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Storage type of the network's activations and convolution weights on the CUDA backend
    /// (x_t, noise, statistics stay f32); the CPU backend computes in f32 only.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
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
    #[arg(long, default_value = "cifar10-small", requires = "untrained_seed")]
    pub untrained_config: String,
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
    /// Seed of all noise (for attack: of the attack's draws and of the judging purifications).
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
            "mode": self.guidance().name(), "t_star": self.t_star, "sampler": format!("{:?}", self.sampler()),
            "seed": self.seed, "kappa": self.kappa, "scale": self.scale, "lambda_f": self.lambda_f,
            "lambda_c": self.lambda_c, "gradient_path": format!("{:?}", self.gradient_path()),
        })
    }
}

#[derive(Args)]
pub struct PurifyArgs {
    /// Images: CIFAR-10 binary files (.bin), PNG files (32x32 RGB), or folders of PNGs.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub purification: PurificationArgs,
    /// Output folder for purified PNGs and grid.png.
    #[arg(long, default_value = "out/purified")]
    pub out: PathBuf,
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttackArg {
    /// PGD on the cross-entropy, fixed step.
    Pgd,
    /// APGD on the cross-entropy.
    ApgdCe,
    /// APGD on the DLR loss.
    ApgdDlr,
    /// AutoAttack's version for stochastic defences: APGD-CE, then APGD-DLR on the images that
    /// survived it (Croce & Hein 2020 use 100 iterations and EOT 20).
    AutoattackRand,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NormArg {
    Linf,
    L2,
}

#[derive(Args)]
pub struct AttackArgs {
    /// Labelled images: CIFAR-10 binary files.
    #[arg(long = "input", short, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub count: Option<usize>,
    #[command(flatten)]
    pub purification: PurificationArgs,
    /// Classifier of the defended model C(purify(x)) (CIFAR ResNet, safetensors).
    #[arg(long)]
    pub classifier: PathBuf,
    /// The attack.
    #[arg(long, value_enum, default_value_t = AttackArg::Pgd)]
    pub attack: AttackArg,
    /// Threat model: l_inf or l_2 ball, on pixels in [0, 1].
    #[arg(long, value_enum, default_value_t = NormArg::Linf)]
    pub norm: NormArg,
    /// Radius of the ball, a number or a fraction like 8/255 (default: 8/255 for linf, 0.5 for l2).
    #[arg(long, value_parser = parse_number, allow_hyphen_values = true)]
    pub eps: Option<f32>,
    /// PGD step (default: 2/255 for linf, eps/4 for l2; APGD adapts its own from 2 eps).
    #[arg(long, value_parser = parse_number, allow_hyphen_values = true)]
    pub step_size: Option<f32>,
    /// Iterations of each attack.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Purifications whose gradients each iteration averages (expectation over transformation).
    #[arg(long, default_value_t = 10)]
    pub eot: usize,
    /// Purifications that judge each final image: robust if a strict majority is classified
    /// correctly (the report also gives "all of them").
    #[arg(long, default_value_t = 5)]
    pub votes: usize,
    /// Start at the clean image instead of a random point of the ball.
    #[arg(long)]
    pub no_random_start: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Also write the adversarial images as PNGs and grid.png (clean | adversarial | purified) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write a JSON report (settings, seeds, accuracies, per-iteration trace) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl AttackArgs {
    /// The attacks to run in turn (AutoAttack's second one only on the images the first left robust).
    pub fn attack_settings(&self) -> Vec<AttackSettings> {
        let norm = match self.norm {
            NormArg::Linf => Norm::Linf,
            NormArg::L2 => Norm::L2,
        };
        let pgd = AttackSettings::pgd(norm, self.iterations, self.eot, self.purification.seed);
        let eps = self.eps.unwrap_or(pgd.eps);
        let step_size = self.step_size.unwrap_or(match norm {
            Norm::Linf => pgd.step_size,
            Norm::L2 => eps / 4.0,
        });
        let base = AttackSettings { eps, step_size, random_start: !self.no_random_start, ..pgd };
        let apgd = |loss, seed_offset: u64| AttackSettings {
            method: Method::Apgd,
            loss,
            seed: base.seed.wrapping_add(seed_offset),
            ..base.clone()
        };
        match self.attack {
            AttackArg::Pgd => vec![base],
            AttackArg::ApgdCe => vec![apgd(Loss::CrossEntropy, 0)],
            AttackArg::ApgdDlr => vec![apgd(Loss::Dlr, 0)],
            AttackArg::AutoattackRand => vec![apgd(Loss::CrossEntropy, 0), apgd(Loss::Dlr, 1)],
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// UNet config with deterministic weights (what --baseline compares).
    #[arg(long, default_value = "cifar10-small")]
    pub config: String,
    /// Time this weights file instead (no --baseline).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch sizes of the UNet measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub batches: Vec<usize>,
    /// Timed runs per measurement (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Purification modes to time.
    #[arg(long, value_delimiter = ',', default_value = "none,pixel,adversarial")]
    pub modes: Vec<String>,
    /// Reverse steps of each timed purification.
    #[arg(long, default_value_t = 10)]
    pub t_star: usize,
    /// Batch of the timed purifications.
    #[arg(long, default_value_t = 16)]
    pub purify_batch: usize,
    /// Batch of the per-op breakdown (one forward + input VJP).
    #[arg(long, default_value_t = 16)]
    pub profile_batch: usize,
    /// A Python with PyTorch: also time bench/torch_baseline.py on the same weights and inputs.
    #[arg(long, value_name = "PYTHON")]
    pub baseline: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// A number, or a fraction `a/b` (8/255).
fn parse_number(text: &str) -> std::result::Result<f32, String> {
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
        Command::Attack(args) => commands::attack(&args),
        Command::Bench(args) => commands::bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
