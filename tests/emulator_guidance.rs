//! The gradients of the engine on the CUDA backend over the PTX emulator, against the CPU
//! reference, in f32 storage: the full UNet input-VJP, both classifiers' input-VJPs, one guided
//! reverse step in each mode and gradient path, whole guided purifications (t* = 5) and one
//! PGD-EOT iteration through a purification, each on the same weights, inputs and seeds on both
//! backends and compared by relative L2.
//!
//! Tolerance: ENGINE.md's 1e-5 for f32 wherever one network pass is compared; the multi-step
//! results say why theirs is what it is where it differs.
//!
//! Cost: the emulator runs a cifar10-small UNet forward at batch 1 in about 12 s on an idle 2-core
//! machine, so cifar10-small appears once (the full input-VJP). The guided steps, purifications and
//! the attack use `reduced_unet()`: 32 channels at both of its two levels (32x32 and 16x16), one
//! ResnetBlock per level, attention at 16x16. Every op and code path of the big UNet is in it
//! (GroupNorm+SiLU, 3x3 convolutions with the time-embedding bias and residual epilogues, the
//! 1x1 shortcut convolutions of the up path, the skip concat, the folded upsample, Downsample's
//! asymmetric padding, attention, and all their backwards); only the sizes are smaller. Its
//! forward takes about a quarter of cifar10-small's on the emulator, its VJP about a third.
//! The emulator needs NVRTC (LD_LIBRARY_PATH).
mod common;

use std::time::Instant;

use common::guidance_checks::{check_guided_step, check_pgd_iteration, check_purification, guidance};
use common::networks::{self, seed};

use purifier::backend::Precision;
use purifier::device::emulator_backend;
use purifier::model::UnetConfig;

// ---- the networks' input-VJPs (the bodies shared with the GPU suite, tests/common/networks.rs) ----

/// The whole cifar10-small UNet backward with respect to its input (every backward kernel of the
/// UNet, chained as the x0 guidance path and the attacks chain them), batch 1.
#[test]
fn unet_small_input_vjp_matches_cpu() {
    let seed = seed();
    let started = Instant::now();
    let emulator = emulator_backend(Precision::F32).unwrap();
    let (e_eps, e_grad) = networks::unet_against_cpu(&emulator, &UnetConfig::cifar10_small(), 1, seed);
    println!(
        "cifar10-small forward + input VJP, batch 1, f32, emulator and CPU: {:.1} s; relative L2 eps {e_eps:.2e}, \
         grad_x {e_grad:.2e} (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    assert!(e_eps < 1e-5 && e_grad < 1e-5, "eps {e_eps:.3e}, grad_x {e_grad:.3e} (seed {seed})");
}

/// Logits, features and the input-VJP of `sum(dlogits * logits) + sum(dfeatures * features)`
/// (the adversarial guidance's two terms at once) at batch 2, at an input with no ReLU kink
/// (`classifier_against_cpu_off_kinks`).
fn check_classifier_vjp(wide: bool) {
    let name = if wide { "WRN-16-2" } else { "ResNet-20" };
    let started = Instant::now();
    let emulator = emulator_backend(Precision::F32).unwrap();
    let (seed, c) = networks::classifier_against_cpu_off_kinks(&emulator, wide, 2, seed());
    println!(
        "{name} forward + input VJP, batch 2, f32, emulator and CPU: {:.1} s; relative L2 logits {:.2e}, \
         features {:.2e}, dx {:.2e} (seed {seed})",
        started.elapsed().as_secs_f64(),
        c.logits,
        c.features,
        c.vjp
    );
    assert!(c.logits < 1e-5 && c.features < 1e-5 && c.vjp < 1e-5, "{name}: {c:?} (seed {seed})");
}

#[test]
fn resnet20_input_vjp_matches_cpu() {
    check_classifier_vjp(false);
}

#[test]
fn wide_resnet_input_vjp_matches_cpu() {
    check_classifier_vjp(true);
}

// ---- guided steps, guided purifications and a PGD-EOT iteration (tests/common/guidance_checks.rs) ----

fn emulator() -> purifier::backend::cuda::CudaBackend {
    emulator_backend(Precision::F32).unwrap()
}

#[test]
fn pixel_guided_step_matches_cpu() {
    check_guided_step(&emulator(), "pixel");
}

#[test]
fn adversarial_x0_guided_step_matches_cpu() {
    check_guided_step(&emulator(), "adversarial-x0");
}

#[test]
fn adversarial_xt_guided_step_matches_cpu() {
    check_guided_step(&emulator(), "adversarial-xt");
}

#[test]
fn adversarial_x0_purification_matches_cpu() {
    check_purification(&emulator(), guidance("adversarial-x0", 1e4), 1e-5);
}

#[test]
fn pixel_purification_matches_cpu() {
    check_purification(&emulator(), guidance("pixel", 1e4), 1e-5);
}

#[test]
fn pgd_iteration_through_purification_matches_cpu() {
    check_pgd_iteration(&emulator());
}
