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
mod kernels;
mod outputs;
mod pipeline;
mod progress;
mod purify;
mod report;

#[derive(Parser)]
#[command(
    name = "purifier",
    version,
    about = "Diffusion-model adversarial purification (DDPM UNet, hand-written forward and backward)"
)]
pub struct Cli {
    /// No progress on standard error (bars or log lines); warnings and errors still show.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// Every command's `--help` shows its long description and one option per paragraph, with
/// each value described: one layout for all (`-h` gives the short form of each).
#[derive(Subcommand)]
enum Command {
    /// Purify images: diffuse to t*, run (guided) reverse steps, write PNGs and a comparison grid.
    ///
    /// Reads CIFAR-10 binaries, PNG files or folders of PNGs (32x32 RGB); writes one purified PNG
    /// per image and grid.png into --out, and with --classifier the accuracy before and after.
    /// Every output is checked before the compute starts and moved into place together at the end.
    Purify(purify::PurifyArgs),
    /// Top-1 accuracy of a CIFAR classifier on labelled images.
    ///
    /// Reads CIFAR-10 binary files (which carry labels) and a ResNet or WideResNet in safetensors
    /// form; prints the accuracy and the time taken.
    Classify(classify::ClassifyArgs),
    /// What a weights file holds: network kind, config, parameter count, and whether it loads.
    ///
    /// Recognises the DDPM UNet (published key names) and the CIFAR ResNets and WideResNets; with
    /// --layers, lists the network's layers in execution order with their output shapes.
    Inspect(inspect::InspectArgs),
    /// Run the noise predictor on tensors from a safetensors file (and optionally its input VJP).
    ///
    /// For checking the engine against another implementation: the input file holds `x` and `t`
    /// (and `v` with --vjp); the output file gets `eps` (and `grad_x`).
    Eps(eps::EpsArgs),
    /// Attack the defended model C(purify(x)), or the classifier alone: PGD or APGD with EOT.
    ///
    /// Gradients are exact through every reverse step (the guidance shift is held constant:
    /// BPDA on the guidance only). Clean and robust accuracy are judged by a vote over several
    /// purifications of each final image. With --defence none the same attacks run on the
    /// classifier alone: the undefended baseline.
    Attack(attack::AttackArgs),
    /// Benchmark: UNet forward and forward + VJP per batch size, purification per mode, cold
    /// start, memory; with --baseline, PyTorch on the same weights side by side.
    ///
    /// Deterministic weights of --config (or --weights) and deterministic inputs; prints a table
    /// and, with --json, writes every figure.
    Bench(bench::BenchArgs),
    /// Compile the CUDA kernels into the disk cache now, so later runs start warm.
    ///
    /// For the GPU here or, with --arch, one that is not (NVRTC needs no GPU: a deployment image
    /// for a Jetson Orin is --arch sm_87); for each --precision, every kernel file side by side
    /// as a first run compiles them, with the time each took (or that it was cached already).
    Kernels(kernels::KernelsArgs),
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> Result<()> {
        let progress = progress::Progress::new(self.quiet);
        match self.command {
            Command::Purify(args) => purify::run(&args, progress),
            Command::Classify(args) => classify::run(&args, progress),
            Command::Inspect(args) => inspect::run(&args),
            Command::Eps(args) => eps::run(&args),
            Command::Attack(args) => attack::run(&args, progress),
            Command::Bench(args) => bench::run(&args, progress),
            Command::Kernels(args) => kernels::run(&args),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option of every command says what it is, and so does every value it takes.
    #[test]
    fn every_option_and_value_is_described() {
        let mut missing = Vec::new();
        let cli = super::Cli::command();
        for command in cli.get_subcommands() {
            assert!(command.get_long_about().is_some(), "{} has no long description", command.get_name());
            for arg in command.get_arguments() {
                let name = format!("{} --{}", command.get_name(), arg.get_id());
                if arg.get_help().is_none() && arg.get_id() != "help" {
                    missing.push(name.clone());
                }
                let takes_free_text = arg.get_possible_values().is_empty();
                for value in arg.get_possible_values() {
                    let described = value.get_help().is_some()
                        || arg.get_help().is_some_and(|h| {
                            // Values described in the option's own text (--device).
                            h.to_string().contains(&format!("{} (", value.get_name()))
                        });
                    if !described && !takes_free_text && arg.get_action().takes_values() {
                        missing.push(format!("{name} value {}", value.get_name()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "undescribed: {missing:?}");
    }
}
