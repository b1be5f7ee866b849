//! The schedule, the reverse steps, the gradient constraint and the purification modes: each test
//! checks a property that fails when the thing it names is wrong.
mod common;

use common::*;
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::data::tensor_file::TensorFile;
use purifier::diffusion::{GradientPath, Guidance, Sampler, Schedule};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{Purifier, PurifySettings};

#[test]
fn schedule_matches_closed_forms() {
    let s = Schedule::ddpm();
    assert_eq!(s.num_steps(), 1000);
    assert!((s.beta(1) - 1e-4).abs() < 1e-15 && (s.beta(1000) - 0.02).abs() < 1e-15);
    assert_eq!(s.alpha_bar(0), 1.0);
    let product: f64 = (1..=100).map(|t| 1.0 - s.beta(t)).product();
    assert!((s.alpha_bar(100) - product).abs() < 1e-14);
    // abar_100 of this schedule is about 0.8970 (a published figure of the linear schedule:
    // sqrt(1 - abar_100) ~ 0.32 is the noise level DiffPure's t = 0.1 corresponds to).
    assert!((s.alpha_bar(100) - 0.897).abs() < 1e-3, "{}", s.alpha_bar(100));
}

/// The DDPM posterior q(x_{t-1} | x_t, x0) by Gaussian conditioning of the joint of
/// (x_{t-1}, x_t) given x0, independently of the formulas of METHOD.md the code uses.
#[test]
fn ddpm_posterior_coefficients_match_gaussian_conditioning() {
    let s = Schedule::ddpm();
    for t in [1usize, 2, 10, 100, 500, 1000] {
        let step = s.reverse_step(t, t - 1, Sampler::Ddpm);
        let (abar, abar_prev) = (s.alpha_bar(t), s.alpha_bar(t - 1));
        let alpha = 1.0 - s.beta(t);
        // x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t = sqrt(alpha) x_{t-1} + sqrt(beta) n.
        let cov = alpha.sqrt() * (1.0 - abar_prev);
        let var_t = 1.0 - abar;
        let ct = cov / var_t;
        let c0 = abar_prev.sqrt() - ct * abar.sqrt();
        let variance = (1.0 - abar_prev) - cov * cov / var_t;
        let c = step.coefficients;
        assert!((c.ct as f64 - ct).abs() < 1e-6 * ct.abs().max(1.0), "ct at t = {t}");
        assert!((c.c0 as f64 - c0).abs() < 1e-6 * c0.abs().max(1e-3), "c0 at t = {t}: {} vs {c0}", c.c0);
        assert!((step.guidance_variance as f64 - variance).abs() <= 1e-6 * variance.max(1e-12), "sigma^2 at t = {t}");
        let expected_noise = if t == 1 { 0.0 } else { variance.sqrt() };
        assert!((step.noise_std as f64 - expected_noise).abs() < 1e-6, "noise at t = {t}");
    }
}

/// With the true noise, a DDIM jump lands exactly on sqrt(abar') x0 + sqrt(1 - abar') eps.
#[test]
fn ddim_jump_is_exact_for_the_true_noise() {
    let s = Schedule::ddpm();
    let steps = s.reverse_steps(100, Sampler::Ddim { stride: 30 }).unwrap();
    assert_eq!(
        steps.iter().map(|st| (st.t, st.t_prev)).collect::<Vec<_>>(),
        vec![(100, 70), (70, 40), (40, 10), (10, 0)]
    );
    let (x0, eps) = (0.3f64, -1.2f64);
    for st in steps {
        let (a, ap) = (s.alpha_bar(st.t), s.alpha_bar(st.t_prev));
        let x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
        let x_prev = st.coefficients.c0 as f64 * x0 + st.coefficients.ct as f64 * x_t;
        assert!((x_prev - (ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps)).abs() < 1e-6);
        assert_eq!(st.noise_std, 0.0);
    }
    assert!(s.reverse_steps(0, Sampler::Ddpm).is_err());
    assert!(s.reverse_steps(1001, Sampler::Ddpm).is_err());
    assert_eq!(s.reverse_steps(100, Sampler::Ddpm).unwrap().len(), 100);
}

/// The counter-based noise has the right moments, and q-sample brings x_in to level t with
/// mean sqrt(abar) x_in and variance 1 - abar.
#[test]
fn q_sample_statistics() {
    let b = CpuBackend;
    let s = Schedule::ddpm();
    let shape = [64, 3, 32, 32];
    let n: usize = shape.iter().product();
    let x_in = b.upload(&vec![0.5; n], &shape).unwrap();
    let mut noise = b.zeros(&shape).unwrap();
    let mut x_t = b.zeros(&shape).unwrap();
    let images: Vec<f32> = (0..shape[0]).map(|g| g as f32).collect();
    b.fill_gaussian(&mut noise, &b.upload(&images, &[shape[0]]).unwrap(), 42, 0);
    let (a, sd) = s.diffuse_weights(100);
    b.axpby(a, &x_in, sd, &noise, &mut x_t);
    let v = b.download(&x_t).unwrap();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let abar = s.alpha_bar(100);
    // Standard errors: sqrt(var / n) ~ 0.0007 for the mean, ~0.0004 for the variance.
    assert!((mean - abar.sqrt() * 0.5).abs() < 0.004, "mean {mean}");
    assert!((var - (1.0 - abar)).abs() < 0.003, "variance {var} vs {}", 1.0 - abar);
}

/// kappa clips the shift to exactly kappa ||x_t - mu||, per sample, and leaves small shifts alone.
#[test]
fn gradient_constraint_clips_exactly() {
    let b = CpuBackend;
    let shape = [3, 3, 4, 4];
    let per = 48;
    let x_t = uniform(3 * per, 1);
    let mu = uniform(3 * per, 2);
    let mut delta = uniform(3 * per, 3);
    // Sample 1 gets a tiny shift that must stay as it is.
    for v in &mut delta[per..2 * per] {
        *v *= 1e-3;
    }
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let kappa = 0.5f32;
    let (xt_dev, mu_dev) = (b.upload(&x_t, &shape).unwrap(), b.upload(&mu, &shape).unwrap());
    let mut delta_dev = b.upload(&delta, &shape).unwrap();
    b.constrain_guidance(&mut delta_dev, &xt_dev, &mu_dev, kappa);
    let out = b.download(&delta_dev).unwrap();
    for n in 0..3 {
        let r = n * per..(n + 1) * per;
        let step: Vec<f32> = x_t[r.clone()].iter().zip(&mu[r.clone()]).map(|(a, b)| a - b).collect();
        let bound = kappa as f64 * norm(&step);
        let (before, after) = (norm(&delta[r.clone()]), norm(&out[r.clone()]));
        if before > bound {
            assert!((after - bound).abs() < 1e-5 * bound, "sample {n}: {after} vs bound {bound}");
            // Same direction: only the length changes.
            let cos = dot(&out[r.clone()], &delta[r.clone()]) / (after * before);
            assert!((cos - 1.0).abs() < 1e-6);
        } else {
            assert_eq!(&out[r.clone()], &delta[r.clone()], "sample {n} was within the bound");
        }
    }
    assert!(
        norm(&delta[per..2 * per])
            < kappa as f64
                * norm(&x_t[per..2 * per].iter().zip(&mu[per..2 * per]).map(|(a, b)| a - b).collect::<Vec<_>>())
    );
    let mut unclipped = b.upload(&delta, &shape).unwrap();
    b.constrain_guidance(&mut unclipped, &xt_dev, &mu_dev, f32::INFINITY);
    assert_eq!(b.download(&unclipped).unwrap(), delta, "kappa = inf must be a no-op");
}

fn small_unet(b: &CpuBackend) -> Unet<CpuBackend> {
    Unet::load(&UnetConfig::cifar10_small(), &mut DeterministicParams::new(b, 3)).unwrap()
}

fn resnet20(b: &CpuBackend) -> Classifier<CpuBackend> {
    Classifier::load(b, &TensorFile::open(shared_path("weights/resnet20_cifar10.safetensors")).unwrap()).unwrap()
}

/// Checks `grad . d` against central differences of the objective along a random direction.
fn check_guidance_gradient(purifier: &Purifier<CpuBackend>, t: usize, h: f32, tolerance: f64) {
    let step = Schedule::ddpm().reverse_step(t, t - 1, Sampler::Ddpm);
    let n = 3 * 32 * 32;
    let x_in: Vec<f32> = uniform(n, 20).iter().map(|u| 0.7 * u).collect();
    let noise = uniform(n, 21);
    let x_t: Vec<f32> = x_in
        .iter()
        .zip(&noise)
        .map(|(x, z)| step.coefficients.sqrt_abar * x + 0.3 * step.coefficients.sqrt_one_minus_abar * z)
        .collect();
    let mut plan = purifier.plan(1).unwrap();
    let (_, grad) = purifier.guidance_objective(&mut plan, &x_in, &x_t, &step).unwrap();
    let d = uniform(n, 22);
    let plus: Vec<f32> = x_t.iter().zip(&d).map(|(x, d)| x + h * d).collect();
    let minus: Vec<f32> = x_t.iter().zip(&d).map(|(x, d)| x - h * d).collect();
    let fd = (purifier.guidance_objective(&mut plan, &x_in, &plus, &step).unwrap().0
        - purifier.guidance_objective(&mut plan, &x_in, &minus, &step).unwrap().0)
        / (2.0 * h as f64);
    let analytic = dot(&grad, &d);
    let typical = (dot(&grad, &grad) * dot(&d, &d) / n as f64).sqrt();
    let rel = (fd - analytic).abs() / analytic.abs().max(typical);
    println!("t = {t}: gradient . d = {analytic:.6}, finite difference {fd:.6}, relative {rel:.2e}");
    assert!(rel < tolerance, "guidance gradient {analytic} vs finite difference {fd}");
}

#[test]
fn pixel_guidance_gradient_matches_finite_differences() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let settings = PurifySettings { guidance: Guidance::Pixel { scale: 1.0 }, ..Default::default() };
    let purifier = Purifier::new(&b, &unet, None, settings).unwrap();
    check_guidance_gradient(&purifier, 50, 1e-2, 1e-3);
}

/// The x0 path differentiates through the UNet (one VJP): the whole chain against finite
/// differences of L(x0_hat(x_t)) with the real ResNet-20 as the auxiliary network. (Dropping the
/// UNet's VJP term from the gradient makes this fail by a wide margin; checked when written.)
#[test]
fn adversarial_x0_path_gradient_matches_finite_differences() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let aux = resnet20(&b);
    let guidance =
        Guidance::Adversarial { scale: 1.0, lambda_features: 1.0, lambda_class: 1.0, path: GradientPath::X0 };
    let purifier = Purifier::new(&b, &unet, Some(&aux), PurifySettings { guidance, ..Default::default() }).unwrap();
    check_guidance_gradient(&purifier, 100, 1e-4, 5e-3);
}

#[test]
fn adversarial_xt_path_gradient_matches_finite_differences() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let aux = resnet20(&b);
    let guidance =
        Guidance::Adversarial { scale: 1.0, lambda_features: 0.5, lambda_class: 2.0, path: GradientPath::Xt };
    let purifier = Purifier::new(&b, &unet, Some(&aux), PurifySettings { guidance, ..Default::default() }).unwrap();
    // The ResNet's ReLU kinks leave about 1e-2 of f32 finite-difference noise here.
    check_guidance_gradient(&purifier, 30, 1e-4, 2e-2);
}

/// End to end on the CPU: the same seed gives the same output, another seed another; modes
/// differ; the output is in [-1, 1]; the constraint bounds what guidance can change.
#[test]
fn purification_is_seeded_and_modes_differ() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let x = uniform(2 * 3072, 30);
    let run = |settings: PurifySettings| {
        let purifier = Purifier::new(&b, &unet, None, settings).unwrap();
        let mut plan = purifier.plan(2).unwrap();
        purifier.purify(&mut plan, &x, 0).unwrap().0
    };
    let base = PurifySettings { t_star: 20, sampler: Sampler::Ddim { stride: 5 }, ..Default::default() };
    let a = run(base.clone());
    assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(a, run(base.clone()), "same seed, same output");
    let ddpm = PurifySettings { sampler: Sampler::Ddpm, t_star: 5, ..base.clone() };
    assert_ne!(run(ddpm.clone()), run(PurifySettings { seed: 1, ..ddpm.clone() }), "another seed, another output");
    let pixel = run(PurifySettings { guidance: Guidance::Pixel { scale: 1e4 }, ..ddpm.clone() });
    let unguided = run(ddpm.clone());
    assert_ne!(pixel, unguided, "pixel guidance changes the result");
    let unconstrained =
        run(PurifySettings { guidance: Guidance::Pixel { scale: 1e4 }, kappa: f32::INFINITY, ..ddpm.clone() });
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    assert!(dist(&pixel, &unguided) < dist(&unconstrained, &unguided), "the constraint must bound the guidance");
}

#[test]
fn bad_settings_are_refused() {
    let b = CpuBackend;
    let unet = small_unet(&b);
    let purifier = |settings| Purifier::new(&b, &unet, None, settings).err().map(|e| e.to_string());
    let msg = purifier(PurifySettings { t_star: 0, ..Default::default() }).unwrap();
    assert!(msg.contains("t*") && msg.contains("between 1 and 1000"), "{msg}");
    assert!(purifier(PurifySettings { t_star: 1001, ..Default::default() }).unwrap().contains("1001"));
    assert!(purifier(PurifySettings { kappa: -1.0, ..Default::default() }).unwrap().contains("kappa"));
    assert!(purifier(PurifySettings { guidance: Guidance::Pixel { scale: f32::NAN }, ..Default::default() })
        .unwrap()
        .contains("scale"));
    let adversarial =
        Guidance::Adversarial { scale: 1.0, lambda_features: 1.0, lambda_class: 1.0, path: GradientPath::X0 };
    assert!(purifier(PurifySettings { guidance: adversarial, ..Default::default() }).unwrap().contains("auxiliary"));
    assert!(purifier(PurifySettings { sampler: Sampler::Ddim { stride: 0 }, ..Default::default() })
        .unwrap()
        .contains("stride"));
    let ok = Purifier::new(&b, &unet, None, PurifySettings::default()).unwrap();
    let mut plan = ok.plan(1).unwrap();
    let mut x = vec![0.0f32; 3072];
    x[5] = f32::NAN;
    assert!(ok.purify(&mut plan, &x, 0).unwrap_err().to_string().contains("non-finite"));
    assert!(ok.purify(&mut plan, &x[..100], 0).is_err());
}
