//! The CPU UNet against the PyTorch goldens of tests/golden (float64 reference, random weights
//! regenerated bit-exactly from the seed), and its input VJP against finite differences.
mod common;

use common::*;
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::model::params::{deterministic_tensor, DeterministicParams, ParamLister};
use purifier::model::{Unet, UnetConfig};

fn check_golden(config: UnetConfig, file: &str) {
    let golden = golden(file);
    let b = CpuBackend;
    let seed = golden.get_indices("seed").unwrap().1[0] as u64;
    let unet = Unet::load(&config, &mut DeterministicParams::new(&b, seed)).unwrap();
    let (shape, x) = tensor(&golden, "x");
    let (_, t) = tensor(&golden, "t");
    let (_, v) = tensor(&golden, "v");
    let mut plan = unet.plan(&b, shape[0], true).unwrap();
    let x_dev = b.upload(&x, &shape).unwrap();
    let eps = b.download(unet.forward(&b, &mut plan, &x_dev, &t).unwrap()).unwrap();
    let temb = b.download(plan.temb()).unwrap();
    let temb_err = relative_error(&temb, &tensor(&golden, "temb").1);
    let eps_err = relative_error(&eps, &tensor(&golden, "eps").1);
    let v_dev = b.upload(&v, &shape).unwrap();
    let grad = b.download(unet.input_vjp(&b, &mut plan, &v_dev).unwrap()).unwrap();
    let grad_err = relative_error(&grad, &tensor(&golden, "grad_x").1);
    println!("{file}: temb {temb_err:.2e}, eps {eps_err:.2e}, grad_x {grad_err:.2e}");
    assert!(temb_err < 1e-5, "temb relative error {temb_err:e}");
    assert!(eps_err < 1e-5, "eps relative error {eps_err:e}");
    assert!(grad_err < 1e-5, "grad_x relative error {grad_err:e}");
}

#[test]
fn cifar10_small_matches_pytorch() {
    check_golden(UnetConfig::cifar10_small(), "unet_cifar10_small.safetensors");
}

#[test]
fn cifar10_matches_pytorch() {
    check_golden(UnetConfig::cifar10(), "unet_cifar10.safetensors");
}

#[test]
fn parameter_counts_match_method() {
    let b = CpuBackend;
    for (config, expected) in [(UnetConfig::cifar10(), 35_746_307), (UnetConfig::cifar10_small(), 8_952_067)] {
        let mut lister = ParamLister::new(&b);
        Unet::load(&config, &mut lister).unwrap();
        assert_eq!(lister.count(), expected, "{}", config.name);
    }
}

#[test]
fn weight_generator_matches_python() {
    let golden = golden("unet_cifar10_small.safetensors");
    for name in ["conv_in.weight", "down.0.block.0.norm1.weight", "temb.dense.0.bias"] {
        let (shape, expected) = tensor(&golden, &format!("generated.{name}"));
        assert_eq!(deterministic_tensor(name, &shape, 1), expected, "{name}");
    }
}

/// <v, J d> from the VJP against (f(x + h d) - f(x - h d)) / 2h . v on random directions d.
#[test]
fn input_vjp_matches_finite_differences() {
    let b = CpuBackend;
    let unet = Unet::load(&UnetConfig::cifar10_small(), &mut DeterministicParams::new(&b, 7)).unwrap();
    let shape = [1, 3, 32, 32];
    let n: usize = shape.iter().product();
    let x = uniform(n, 1);
    let v = uniform(n, 2);
    let t = [40.0];
    let mut plan = unet.plan(&b, 1, true).unwrap();
    let x_dev = b.upload(&x, &shape).unwrap();
    unet.forward(&b, &mut plan, &x_dev, &t).unwrap();
    let v_dev = b.upload(&v, &shape).unwrap();
    let grad = b.download(unet.input_vjp(&b, &mut plan, &v_dev).unwrap()).unwrap();
    let mut eval = |x: &[f32]| {
        let x_dev = b.upload(x, &shape).unwrap();
        let eps = b.download(unet.forward(&b, &mut plan, &x_dev, &t).unwrap()).unwrap();
        dot(&eps, &v)
    };
    for seed in 10..13 {
        let d = uniform(n, seed);
        let h = 1e-2f32;
        let plus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x + h * d).collect();
        let minus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x - h * d).collect();
        let fd = (eval(&plus) - eval(&minus)) / (2.0 * h as f64);
        let analytic = dot(&grad, &d);
        // Scale by the typical size of a random projection of the gradient, so a direction whose
        // projection cancels to near zero does not turn f32 rounding into a large relative error.
        let typical = (dot(&grad, &grad) * dot(&d, &d) / n as f64).sqrt();
        let rel = (fd - analytic).abs() / analytic.abs().max(typical);
        println!("direction {seed}: vjp {analytic:.6}, finite difference {fd:.6}, relative {rel:.2e}");
        assert!(rel < 2e-3, "VJP {analytic} vs finite difference {fd}");
    }
}

/// A batch that cannot fit is refused before anything is allocated, with an error that says
/// how much it needs and what to do.
#[test]
fn oversized_batch_is_a_clear_error() {
    let b = CpuBackend;
    let unet = Unet::load(&UnetConfig::cifar10(), &mut ParamLister::new(&b)).unwrap();
    let available = b.available_memory().expect("/proc/meminfo on Linux");
    let batch = 1 << 20; // a million images: terabytes of activations
    let message = unet.plan(&b, batch, true).err().expect("must not fit").to_string();
    assert!(
        message.contains("batch of 1048576") && message.contains("GiB") && message.contains("--batch"),
        "{message}"
    );
    assert!(available > 0);
}
