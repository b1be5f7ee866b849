//! Whole networks and purifications on a backend against the CPU reference, on the same
//! deterministic weights and fresh random inputs: one body per check, run on the GPU by
//! tests/cuda_end_to_end.rs (the GPU suite). Each returns the relative L2 distances it found, for
//! the caller to print and hold against its tolerance.
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::diffusion::{GradientPath, Guidance};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{Purifier, PurifySettings};

/// Seed of the random inputs: PURIFIER_TEST_SEED, else fresh each run (printed by the callers).
pub fn seed() -> u64 {
    std::env::var("PURIFIER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    })
}

const WEIGHTS_SEED: u64 = 3;

/// The layout of the CIFAR UNets (every kind of layer: 1x1 shortcuts, the skip concat, upsample,
/// the downsample's padding, attention at 16x16) at a fraction of their cost, for the emulator
/// tests that run many UNet calls (guided steps, recorded steps, attacks).
pub fn reduced_unet() -> UnetConfig {
    UnetConfig {
        name: "reduced (ch 32, mult 1,1, 1 block)".into(),
        channels: 32,
        channel_mult: vec![1, 1],
        res_blocks: 1,
        attention_resolutions: vec![16],
        resolution: 32,
    }
}

fn unet_eps_and_vjp<B: Backend>(b: &B, config: &UnetConfig, x: &[f32], t: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let unet = Unet::load(config, &mut DeterministicParams::new(b, WEIGHTS_SEED)).unwrap();
    let n = t.len();
    let mut plan = unet.plan(b, n, true).unwrap();
    let x = b.upload(x, &[n, 3, 32, 32]).unwrap();
    let v = b.upload(v, &[n, 3, 32, 32]).unwrap();
    let eps = b.download(unet.forward(b, &mut plan, &x, t).unwrap()).unwrap();
    let grad = b.download(unet.input_vjp(b, &mut plan, &v).unwrap()).unwrap();
    (eps, grad)
}

/// The UNet's eps and input VJP at batch `n` (step indices spread over the schedule):
/// (eps error, VJP error).
pub fn unet_against_cpu<B: Backend>(b: &B, config: &UnetConfig, n: usize, seed: u64) -> (f64, f64) {
    let x = super::uniform(n * 3 * 32 * 32, seed);
    let v = super::uniform(n * 3 * 32 * 32, seed ^ 0x5eed);
    let t: Vec<f32> = (0..n).map(|i| ((7 + 331 * i) % 1000) as f32).collect();
    let (eps, grad) = unet_eps_and_vjp(b, config, &x, &t, &v);
    let (eps_ref, grad_ref) = unet_eps_and_vjp(&CpuBackend, config, &x, &t, &v);
    (super::relative_error(&eps, &eps_ref), super::relative_error(&grad, &grad_ref))
}

fn classifier_outputs<B: Backend>(b: &B, wide: bool, x: &[f32], n: usize, seed: u64) -> [Vec<f32>; 3] {
    let mut src = DeterministicParams::new(b, 11);
    let net = if wide {
        Classifier::load_wide(&mut src, 16, 2).unwrap()
    } else {
        Classifier::load_with(&mut src, 20).unwrap()
    };
    let mut plan = net.plan(b, n, true).unwrap();
    let x = b.upload(x, &[n, 3, 32, 32]).unwrap();
    net.forward(b, &mut plan, &x).unwrap();
    let (logits, features) = (b.download(&plan.logits).unwrap(), b.download(&plan.features).unwrap());
    let dlogits = b.upload(&super::uniform(logits.len(), seed ^ 1), &[n, net.num_classes]).unwrap();
    let dfeatures = b.upload(&super::uniform(features.len(), seed ^ 2), &[n, net.feature_dim()]).unwrap();
    let grad = b.download(net.input_vjp(b, &mut plan, Some(&dlogits), Some(&dfeatures)).unwrap()).unwrap();
    [logits, features, grad]
}

/// ResNet-20 (or WRN-16-2 when `wide`) at batch `n`: (logits, features, input VJP) errors, and
/// the fraction of the VJP's elements off by more than 1e-5 of its norm (`relu_vjp_agrees`).
pub fn classifier_against_cpu<B: Backend>(b: &B, wide: bool, n: usize, seed: u64) -> [f64; 4] {
    let x = super::uniform(n * 3 * 32 * 32, seed);
    let got = classifier_outputs(b, wide, &x, n, seed);
    let want = classifier_outputs(&CpuBackend, wide, &x, n, seed);
    let [logits, features, vjp] = [0, 1, 2].map(|i| super::relative_error(&got[i], &want[i]));
    let norm = want[2].iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let off = got[2].iter().zip(&want[2]).filter(|(g, w)| ((**g - **w) as f64).abs() > 1e-5 * norm).count();
    [logits, features, vjp, off as f64 / want[2].len() as f64]
}

/// Whether a ReLU network's input VJP agrees with the CPU's: within `tolerance` (relative L2), or
/// off only where rounding put a pre-activation on the other side of zero on one backend, so that
/// its ReLU took the other branch there. Such a flip changes the gradient on that unit's receptive
/// field in its own sample alone, which for a deep unit can span its whole image: at most half the
/// elements of the tests' batches of two or more, and 1e-2 overall. (Measured in f32 on the
/// emulator, WRN-16-2: seed 485622900, 78 of 6144 elements in a 2x3 corner patch of one image,
/// relative L2 4.1e-3; seed 413021716, 7.2% of the elements, 4.05e-3.) A wrong kernel moves every
/// sample, and by more.
pub fn relu_vjp_agrees(error: f64, fraction_off: f64, tolerance: f64) -> bool {
    error < tolerance || (fraction_off <= 0.5 && error < 1e-2)
}

/// The guidance modes and paths a purification can run, by name.
pub fn guidance(name: &str) -> Guidance {
    let adversarial = |path| Guidance::Adversarial { scale: 1.0, lambda_features: 1.0, lambda_class: 1.0, path };
    match name {
        "none" => Guidance::None,
        "pixel" => Guidance::Pixel { scale: 1.0 },
        "adversarial-x0" => adversarial(GradientPath::X0),
        "adversarial-xt" => adversarial(GradientPath::Xt),
        other => panic!("unknown guidance {other}"),
    }
}

fn purified<B: Backend>(b: &B, mode: &str, t_star: usize, x: &[f32], n: usize) -> Vec<f32> {
    let unet = Unet::load(&UnetConfig::cifar10_small(), &mut DeterministicParams::new(b, 5)).unwrap();
    let auxiliary = Classifier::load_with(&mut DeterministicParams::new(b, 11), 20).unwrap();
    let settings = PurifySettings { t_star, seed: 21, guidance: guidance(mode), ..Default::default() };
    let purifier = Purifier::new(b, &unet, Some(&auxiliary), settings).unwrap();
    let mut plan = purifier.plan(n).unwrap();
    purifier.purify(&mut plan, x, 0).unwrap().0
}

/// A whole purification (cifar10-small, deterministic weights, the same seed) in `mode`: the
/// relative L2 distance of the purified batch to the CPU's.
pub fn purification_against_cpu<B: Backend>(b: &B, mode: &str, t_star: usize, n: usize, seed: u64) -> f64 {
    let x = super::uniform(n * 3 * 32 * 32, seed);
    super::relative_error(&purified(b, mode, t_star, &x, n), &purified(&CpuBackend, mode, t_star, &x, n))
}
