//! The gradient through the purification and the PGD-EOT attack built on it (METHOD.md
//! section 5). Each test fails when the thing it names is wrong.
mod common;

use common::*;
use purifier::attack::{apgd_checkpoints, AttackSettings, Defence, Loss, Norm};
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::data::load_images;
use purifier::data::tensor_file::TensorFile;
use purifier::diffusion::{Guidance, Sampler};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{NoiseDraw, Purifier, PurifySettings};

const IMAGE: usize = 3 * 32 * 32;

fn small_unet(b: &CpuBackend) -> Unet<CpuBackend> {
    Unet::load(&UnetConfig::cifar10_small(), &mut DeterministicParams::new(b, 3)).unwrap()
}

fn resnet20(b: &CpuBackend) -> Classifier<CpuBackend> {
    Classifier::load(b, &TensorFile::open(shared_path("weights/resnet20_cifar10.safetensors")).unwrap()).unwrap()
}

/// Real test images (pixels in [0, 1]) and labels.
fn test_images(count: usize) -> (Vec<f32>, Vec<u8>) {
    let images = load_images(&[shared_path("data/cifar10/test_lossless.bin")], Some(count)).unwrap();
    let pixels = images.to_model_range().iter().map(|x| (x + 1.0) / 2.0).collect();
    (pixels, images.labels.unwrap())
}

/// d/dh sum(w * purify(x + h d)) at h = 0 by central differences, against `grad . d` from
/// `input_vjp`, for a fixed noise draw.
fn check_purification_gradient(settings: PurifySettings, h: f32, tolerance: f64) {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let purifier = Purifier::new(&b, &unet, None, settings).unwrap();
    let batch = 2;
    let n = batch * IMAGE;
    let x: Vec<f32> = uniform(n, 30).iter().map(|u| 0.7 * u).collect();
    let w = uniform(n, 31);
    let d = uniform(n, 32);
    let noise = NoiseDraw { seed: 9, draw: 4 };
    let mut plan = purifier.plan_differentiable(batch).unwrap();
    let mut objective = |x: &[f32]| {
        purifier.purify_on_backend(&mut plan, x, &[0, 1], noise).unwrap();
        dot(&b.download(plan.output()).unwrap(), &w)
    };
    let plus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x + h * d).collect();
    let minus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x - h * d).collect();
    let fd = (objective(&plus) - objective(&minus)) / (2.0 * h as f64);

    let mut plan = purifier.plan_differentiable(batch).unwrap();
    purifier.purify_on_backend(&mut plan, &x, &[0, 1], noise).unwrap();
    let w_dev = b.upload(&w, &[batch, 3, 32, 32]).unwrap();
    let grad = b.download(purifier.input_vjp(&mut plan, &w_dev).unwrap()).unwrap();
    let analytic = dot(&grad, &d);
    let rel = (fd - analytic).abs() / analytic.abs();
    println!(
        "{} steps: gradient . d = {analytic:.6}, finite difference {fd:.6}, relative {rel:.2e}",
        purifier.steps().len()
    );
    assert!(rel < tolerance, "purification gradient {analytic} vs finite difference {fd}");
}

#[test]
fn ddpm_purification_gradient_matches_finite_differences() {
    let settings = PurifySettings { t_star: 3, sampler: Sampler::Ddpm, ..Default::default() };
    check_purification_gradient(settings, 1e-3, 2e-3);
}

#[test]
fn ddim_purification_gradient_matches_finite_differences() {
    let settings = PurifySettings { t_star: 60, sampler: Sampler::Ddim { stride: 20 }, ..Default::default() };
    // At this draw's point the central difference's error shrinks like h^2 (relative 5.7e-3,
    // 2.5e-3, 6.9e-4 at h = 2e-3, 1e-3, 5e-4): curvature, not a wrong gradient; the smaller step
    // is still far above the f32 noise floor.
    check_purification_gradient(settings, 5e-4, 2e-3);
}

/// With the constraint at kappa = 0 the guidance shift is zero, so a guided purification is the
/// unguided one and its BPDA gradient must be the exact gradient too.
#[test]
fn guided_gradient_with_a_zero_shift_is_exact() {
    let settings =
        PurifySettings { t_star: 3, guidance: Guidance::Pixel { scale: 5.0 }, kappa: 0.0, ..Default::default() };
    check_purification_gradient(settings, 1e-3, 2e-3);
}

/// The attacker's losses (cross-entropy and DLR of ResNet-20 on the purified images): their
/// gradients with respect to the pixels against finite differences.
#[test]
fn defence_loss_gradient_matches_finite_differences() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let classifier = resnet20(&b);
    let settings = PurifySettings { t_star: 2, ..Default::default() };
    let purifier = Purifier::new(&b, &unet, None, settings).unwrap();
    let defence = Defence::purified(&purifier, &classifier);
    // Wrong labels: the loss of correctly classified images is ~1e-6, too flat to differentiate.
    let (pixels, labels) = test_images(2);
    let labels: Vec<u8> = labels.iter().map(|l| (l + 1) % 10).collect();
    let mut plan = defence.plan(2).unwrap();
    let noise = NoiseDraw { seed: 1, draw: 0 };
    for loss in [Loss::CrossEntropy, Loss::Dlr] {
        let (losses, _, grad) = defence.loss_gradient(&mut plan, &pixels, &labels, &[0, 1], loss, noise).unwrap();
        assert!(losses.iter().all(|l| l.is_finite()));
        // Along a random direction the directional derivative is ~1e-3 of |grad| |d| and drowns in
        // the ResNet's ReLU kinks; along the gradient itself it is |grad| |d|, and a gradient that
        // is wrong in scale or direction fails there.
        let norm = dot(&grad, &grad).sqrt() as f32;
        let d: Vec<f32> = grad.iter().map(|g| g / norm).collect();
        let h = 5e-5;
        let mut loss_at = |p: &[f32]| {
            defence.loss_gradient(&mut plan, p, &labels, &[0, 1], loss, noise).unwrap().0.iter().sum::<f64>()
        };
        let fd = (loss_at(&pixels.iter().zip(&d).map(|(p, d)| p + h * d).collect::<Vec<_>>())
            - loss_at(&pixels.iter().zip(&d).map(|(p, d)| p - h * d).collect::<Vec<_>>()))
            / (2.0 * h as f64);
        let analytic = dot(&grad, &d);
        let rel = (fd - analytic).abs() / analytic.abs();
        println!("{loss:?}: gradient . d = {analytic:.4}, finite difference {fd:.4}, relative {rel:.2e}");
        assert!(rel < 2e-2, "{loss:?}: gradient {analytic} vs finite difference {fd}");
    }
}

/// PGD-EOT and APGD-EOT (both losses) stay in the threat model and raise the attacker's loss.
#[test]
fn attacks_stay_in_the_ball_and_raise_the_loss() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let classifier = resnet20(&b);
    let purifier = Purifier::new(&b, &unet, None, PurifySettings { t_star: 2, ..Default::default() }).unwrap();
    let defence = Defence::purified(&purifier, &classifier);
    let (pixels, labels) = test_images(2);
    let mut plan = defence.plan(2).unwrap();
    let attacks = [
        AttackSettings::pgd(Norm::Linf, 4, 2, 7),
        AttackSettings::pgd(Norm::L2, 4, 2, 7),
        AttackSettings::apgd(Loss::CrossEntropy, Norm::Linf, 4, 2, 7),
        AttackSettings::apgd(Loss::CrossEntropy, Norm::L2, 4, 2, 7),
        AttackSettings::apgd(Loss::Dlr, Norm::Linf, 4, 2, 7),
    ];
    for settings in attacks {
        let (name, norm, loss) = (settings.name(), settings.norm, settings.loss);
        let (adversarial, traces) = defence.attack(&mut plan, &pixels, &labels, &[0, 1], &settings, |_| {}).unwrap();
        // PGD: one estimate per step; APGD: the start, then one after each step.
        let expected = if name.starts_with("APGD") { 5 } else { 4 };
        assert_eq!(traces.len(), expected, "{name}");
        assert!(adversarial.iter().all(|p| (0.0..=1.0).contains(p)), "{name} left [0, 1]");
        for (a, o) in adversarial.chunks(IMAGE).zip(pixels.chunks(IMAGE)) {
            let distance = match norm {
                Norm::Linf => a.iter().zip(o).map(|(a, o)| (a - o).abs() as f64).fold(0.0, f64::max),
                Norm::L2 => a.iter().zip(o).map(|(a, o)| ((a - o) as f64).powi(2)).sum::<f64>().sqrt(),
            };
            assert!(distance <= settings.eps as f64 * (1.0 + 1e-5), "{name} {norm:?}: perturbation {distance} > eps");
            assert!(distance > 0.3 * settings.eps as f64, "{name} {norm:?}: the attack barely moved ({distance})");
        }
        // The loss at the adversarial images, on draws the attacker never saw, beats the clean loss.
        let mean_loss = |p: &[f32], plan: &mut _| {
            (0..4)
                .map(|v| {
                    let noise = NoiseDraw { seed: 99, draw: v };
                    defence.loss_gradient(plan, p, &labels, &[0, 1], loss, noise).unwrap().0
                })
                .map(|l| l.iter().sum::<f64>())
                .sum::<f64>()
        };
        let (clean, attacked) = (mean_loss(&pixels, &mut plan), mean_loss(&adversarial, &mut plan));
        println!("{name} {norm:?}: loss {clean:.4} clean, {attacked:.4} attacked");
        assert!(attacked > clean + 0.5, "{name} {norm:?}: the attack did not raise the loss ({clean} -> {attacked})");
    }
}

/// The reference implementation's checkpoints for 100 iterations: 22, then intervals of 19, 16,
/// 13, 10, 7 and 6.
#[test]
fn apgd_checkpoints_follow_the_reference_schedule() {
    assert_eq!(apgd_checkpoints(100), vec![22, 41, 57, 70, 80, 87, 93, 99]);
    assert_eq!(apgd_checkpoints(5), vec![1, 2, 3, 4, 5]);
    assert!(apgd_checkpoints(0).is_empty());
}

#[test]
fn attack_refuses_bad_settings_and_inputs() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let classifier = resnet20(&b);
    let purifier = Purifier::new(&b, &unet, None, PurifySettings { t_star: 1, ..Default::default() }).unwrap();
    let defence = Defence::purified(&purifier, &classifier);
    let (pixels, labels) = test_images(1);
    let mut plan = defence.plan(1).unwrap();
    let good = AttackSettings::pgd(Norm::Linf, 1, 1, 0);
    let error = |settings: &AttackSettings, p: &[f32], plan: &mut _| {
        defence.attack(plan, p, &labels, &[0], settings, |_| {}).unwrap_err().to_string()
    };
    assert!(error(&AttackSettings { eps: -1.0, ..good.clone() }, &pixels, &mut plan).contains("eps"));
    assert!(error(&AttackSettings { eps: f32::NAN, ..good.clone() }, &pixels, &mut plan).contains("eps"));
    assert!(error(&AttackSettings { step_size: 0.0, ..good.clone() }, &pixels, &mut plan).contains("step size"));
    assert!(error(&AttackSettings { eot: 0, ..good.clone() }, &pixels, &mut plan).contains("--eot"));
    let mut outside = pixels.clone();
    outside[5] = 1.5;
    assert!(error(&good, &outside, &mut plan).contains("[0, 1]"));
    assert!(error(&good, &pixels[..100], &mut plan).contains("batch of 1"));
    let indices_error = |indices: &[u64], plan: &mut _| {
        defence.attack(plan, &pixels, &labels, indices, &good, |_| {}).unwrap_err().to_string()
    };
    assert!(indices_error(&[0, 1], &mut plan).contains("2 image indices for a batch of 1"));
    assert!(indices_error(&[1 << 24], &mut plan).contains("image index 16777216 is too large"));

    // input_vjp needs a tape, and a purification before it.
    let mut plain = purifier.plan(1).unwrap();
    let g = b.zeros(&[1, 3, 32, 32]).unwrap();
    assert!(purifier.input_vjp(&mut plain, &g).unwrap_err().to_string().contains("without a tape"));
    let mut fresh = purifier.plan_differentiable(1).unwrap();
    assert!(purifier
        .input_vjp(&mut fresh, &g)
        .unwrap_err()
        .to_string()
        .contains("purification on the same plan first"));
}
