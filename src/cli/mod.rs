//! The command line: one file per command (its flags, then what it does, top to bottom), the
//! flags several commands share (`args`), the backend choice (`backend`), the engine pieces they
//! share (`pipeline`) and the JSON reports (`report`).
use clap::{Parser, Subcommand};

use purifier::Result;

mod args;
mod attack;
mod backend;
mod bench;
mod classify;
mod eps;
mod inspect;
mod outputs;
mod pipeline;
mod purify;
mod report;

#[derive(Parser)]
#[command(
    name = "purifier",
    version,
    about = "Diffusion-model adversarial purification (DDPM UNet, hand-written forward and backward)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Purify images: diffuse to t*, run (guided) reverse steps, write PNGs and a comparison grid.
    Purify(purify::PurifyArgs),
    /// Top-1 accuracy of a CIFAR ResNet classifier on labelled images.
    Classify(classify::ClassifyArgs),
    /// What a weights file holds: network kind, config, parameter count, and whether it loads.
    Inspect(inspect::InspectArgs),
    /// Run the noise predictor on tensors from a safetensors file (and optionally its input VJP).
    Eps(eps::EpsArgs),
    /// Attack the defended model C(purify(x)): PGD with EOT, exact gradients through every
    /// reverse step; clean and robust accuracy judged over several purifications.
    Attack(attack::AttackArgs),
    /// Benchmark: UNet forward and forward + VJP per batch size, purification per mode, cold
    /// start, memory; with --baseline, PyTorch on the same weights side by side.
    Bench(bench::BenchArgs),
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Purify(args) => purify::run(&args),
            Command::Classify(args) => classify::run(&args),
            Command::Inspect(args) => inspect::run(&args),
            Command::Eps(args) => eps::run(&args),
            Command::Attack(args) => attack::run(&args),
            Command::Bench(args) => bench::run(&args),
        }
    }
}
