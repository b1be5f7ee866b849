//! How far a guided purification jumps when its input moves by a rounding-sized amount, on the
//! CPU alone: the measurement behind tests/common/guidance_checks.rs's allowance for adversarial
//! guidance. For each input (`check_purification`'s images, weights and settings: reduced UNet,
//! ResNet-20 auxiliary network, t* = 5, scale 1e4), the CPU purifies it and then `draws` copies
//! whose every pixel is scaled by 1 + `change` u (u uniform in [-1, 1)), and prints each copy's
//! distance from the first as a share of the guidance's effect (the guided result's distance from
//! the unguided one), beside the unguided purification's own change under the same copies.
//!
//! The unguided purification is smooth (SiLU, GroupNorm, attention): its change is a floor set by
//! `change`. A guided copy far above that floor has crossed a kink of the guidance: an auxiliary
//! ReLU whose input changed sign flips its gradient mask, and on the `x0` path the UNet VJP spreads
//! that over the image. Another backend's rounding moves the same kinks, so its misses against the
//! CPU come in the same discrete sizes.
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example guidance_kinks -- [mode] [change] [first seed] [inputs] [draws]
//! (mode adversarial-x0, adversarial-xt or pixel, default adversarial-x0; change default 1e-7;
//! inputs default 20 from seed 1; draws default 6).

#[path = "../tests/common/mod.rs"]
mod test_common;

use purifier::backend::cpu::CpuBackend;
use purifier::diffusion::Guidance;
use test_common::guidance_checks::{guidance, images, purify};
use test_common::{relative_error, uniform};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let mode = arg(0, "adversarial-x0");
    let change: f32 = arg(1, "1e-7").parse().expect("change: a number");
    let first: u64 = arg(2, "1").parse().expect("first seed: an integer");
    let inputs: u64 = arg(3, "20").parse().expect("inputs: an integer");
    let draws: u64 = arg(4, "6").parse().expect("draws: an integer");
    let b = CpuBackend;
    let guided = guidance(&mode, 1e4);
    println!(
        "{mode}, inputs scaled by 1 + {change:e} u, {draws} draws an input; changes as shares of the guidance's effect"
    );
    let mut jumped = 0;
    for seed in first..first + inputs {
        let x = images(1, seed);
        let want = purify(&b, guided.clone(), &x);
        let unguided = purify(&b, Guidance::None, &x);
        let effect = relative_error(&want, &unguided);
        let (mut shares, mut floor) = (Vec::new(), 0.0f64);
        for draw in 0..draws {
            let u = uniform(x.len(), seed ^ (77 + draw));
            let moved: Vec<f32> = x.iter().zip(&u).map(|(x, u)| x * (1.0 + change * u)).collect();
            shares.push(relative_error(&purify(&b, guided.clone(), &moved), &want) / effect);
            floor = floor.max(relative_error(&purify(&b, Guidance::None, &moved), &unguided) / effect);
        }
        // Far above the smooth floor: a kink crossed.
        let jumps = shares.iter().filter(|&&s| s > 10.0 * floor).count();
        jumped += (jumps > 0) as usize;
        let shown: Vec<String> = shares.iter().map(|s| format!("{s:.1e}")).collect();
        println!(
            "seed {seed}: effect {effect:.3e}; unguided floor {floor:.1e}; guided {}{}",
            shown.join(" "),
            if jumps > 0 { format!("  ({jumps} of {draws} jumped)") } else { String::new() }
        );
    }
    println!("{jumped} of {inputs} inputs have a kink within a change of {change:e}");
}
