//! The CIFAR ResNet classifier against the PyTorch golden (shared ResNet-20 weights) and against
//! the accuracy measured on the lossless test images.
mod common;

use common::*;
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::data::cifar::read_cifar;
use purifier::data::tensor_file::TensorFile;
use purifier::model::Classifier;

fn resnet20(b: &CpuBackend) -> Classifier<CpuBackend> {
    Classifier::load(b, &TensorFile::open(shared_path("weights/resnet20_cifar10.safetensors")).unwrap()).unwrap()
}

/// (logits, features, input gradient) relative errors of `net` against a golden file: x, v,
/// logits, grad_x = d sum(logits * v) / dp with respect to the [0, 1] pixels, and `features` if
/// the file has them.
fn errors_against_golden(b: &CpuBackend, net: &Classifier<CpuBackend>, file: &str) -> (f64, Option<f64>, f64) {
    let golden = golden(file);
    let (shape, pixels) = tensor(&golden, "x");
    let (_, v) = tensor(&golden, "v");
    // The engine's classifier takes x = 2p - 1; the golden's gradient is with respect to p.
    let x: Vec<f32> = pixels.iter().map(|p| 2.0 * p - 1.0).collect();
    let mut plan = net.plan(b, shape[0], true).unwrap();
    net.forward(b, &mut plan, &b.upload(&x, &shape).unwrap()).unwrap();
    let logits_err = relative_error(&b.download(&plan.logits).unwrap(), &tensor(&golden, "logits").1);
    let features_err = golden
        .contains("features")
        .then(|| relative_error(&b.download(&plan.features).unwrap(), &tensor(&golden, "features").1));
    let v_dev = b.upload(&v, &[shape[0], 10]).unwrap();
    let grad_x = b.download(net.input_vjp(b, &mut plan, Some(&v_dev), None).unwrap()).unwrap();
    let grad_p: Vec<f32> = grad_x.iter().map(|g| 2.0 * g).collect();
    let grad_err = relative_error(&grad_p, &tensor(&golden, "grad_x").1);
    println!("{}: logits {logits_err:.2e}, features {features_err:?}, grad {grad_err:.2e}", net.name);
    (logits_err, features_err, grad_err)
}

#[test]
fn resnet20_matches_pytorch() {
    let b = CpuBackend;
    let net = resnet20(&b);
    assert_eq!(net.depth, 20);
    let (logits, features, grad) = errors_against_golden(&b, &net, "resnet20.safetensors");
    assert!(logits < 1e-5 && features.unwrap() < 1e-5 && grad < 1e-5);
}

/// The feature path of the VJP (the adversarial guidance uses it) against finite differences.
#[test]
fn feature_vjp_matches_finite_differences() {
    let b = CpuBackend;
    let net = resnet20(&b);
    let shape = [1, 3, 32, 32];
    let n = 3 * 32 * 32;
    let x: Vec<f32> = uniform(n, 3).iter().map(|u| 0.8 * u).collect();
    let w = uniform(64, 4);
    let mut plan = net.plan(&b, 1, true).unwrap();
    let mut features_dot = |x: &[f32]| {
        net.forward(&b, &mut plan, &b.upload(x, &shape).unwrap()).unwrap();
        dot(&b.download(&plan.features).unwrap(), &w)
    };
    let base = features_dot(&x);
    assert!(base.is_finite());
    net.forward(&b, &mut plan, &b.upload(&x, &shape).unwrap()).unwrap();
    let w_dev = b.upload(&w, &[1, 64]).unwrap();
    let grad = b.download(net.input_vjp(&b, &mut plan, None, Some(&w_dev)).unwrap()).unwrap();
    let d = uniform(n, 5);
    let h = 1e-3f32;
    let plus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x + h * d).collect();
    let minus: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x - h * d).collect();
    let mut plan2 = net.plan(&b, 1, false).unwrap();
    let mut eval = |x: &[f32]| {
        net.forward(&b, &mut plan2, &b.upload(x, &shape).unwrap()).unwrap();
        dot(&b.download(&plan2.features).unwrap(), &w)
    };
    let fd = (eval(&plus) - eval(&minus)) / (2.0 * h as f64);
    let analytic = dot(&grad, &d);
    let typical = (dot(&grad, &grad) * dot(&d, &d) / n as f64).sqrt();
    let rel = (fd - analytic).abs() / analytic.abs().max(typical);
    println!("vjp {analytic}, finite difference {fd}, relative {rel:.2e}");
    assert!(rel < 1e-2, "feature VJP {analytic} vs finite difference {fd}");
}

/// Top-1 accuracy of a shared classifier on test_lossless.bin.
fn lossless_accuracy(weights: &str, depth: usize) -> f64 {
    let b = CpuBackend;
    let net = Classifier::load(&b, &TensorFile::open(shared_path(weights)).unwrap()).unwrap();
    assert_eq!(net.depth, depth, "depth inferred from the file");
    let images = read_cifar(&shared_path("data/cifar10/test_lossless.bin"), None).unwrap();
    assert_eq!(images.count, 932);
    let labels = images.labels.clone().unwrap();
    let x = images.to_model_range();
    let batch = 233; // 932 = 4 x 233
    let mut plan = net.plan(&b, batch, false).unwrap();
    let mut correct = 0;
    for (chunk, labels) in x.chunks(batch * 3072).zip(labels.chunks(batch)) {
        net.forward(&b, &mut plan, &b.upload(chunk, &[batch, 3, 32, 32]).unwrap()).unwrap();
        let logits = b.download(&plan.logits).unwrap();
        for (row, &label) in logits.chunks(10).zip(labels) {
            let predicted = (0..10).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap();
            correct += (predicted == label as usize) as usize;
        }
    }
    println!("ResNet-{depth}: {correct}/932 = {:.2}%", correct as f64 / 9.32);
    correct as f64 / 932.0
}

/// ResNet-20 reaches the accuracy measured for these weights (91.6% on test_lossless.bin).
#[test]
fn resnet20_accuracy_on_lossless_test_images() {
    assert!(lossless_accuracy("weights/resnet20_cifar10.safetensors", 20) >= 0.91);
}

/// The deepest shared network (measured there: 92.6%), so depth inference and the longer
/// stages are exercised too.
#[test]
fn resnet56_accuracy_on_lossless_test_images() {
    assert!(lossless_accuracy("weights/resnet56_cifar10.safetensors", 56) >= 0.92);
}

/// WideResNet-16-2 (RobustBench layout) with generated weights against PyTorch float64: both the
/// 1x1-conv and the identity shortcut, the pre-activation, the final bn-ReLU, no normalisation.
#[test]
fn wide_resnet_matches_pytorch() {
    use purifier::model::params::DeterministicParams;
    let b = CpuBackend;
    let net = Classifier::load_wide(&mut DeterministicParams::new(&b, 5), 16, 2).unwrap();
    assert_eq!(net.name, "WRN-16-2");
    assert_eq!(net.feature_dim(), 128);
    let (logits, _, grad) = errors_against_golden(&b, &net, "wide_resnet.safetensors");
    assert!(logits < 1e-5 && grad < 1e-5);
}

/// A WideResNet file in RobustBench's naming loads through `Classifier::load` with its depth and
/// width read off the tensors, and a file of neither layout is refused by name.
#[test]
fn wide_resnet_files_load_by_layout() {
    use purifier::model::params::DeterministicParams;
    let b = CpuBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrn.safetensors");
    let mut src = DeterministicParams::new(&b, 5);
    src.keep_host_copies = true;
    Classifier::load_wide(&mut src, 16, 2).unwrap();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        src.generated.iter().map(|(n, s, d)| (n.as_str(), &s[..], &d[..])).collect();
    purifier::data::tensor_file::write_safetensors(&path, &tensors).unwrap();
    let net = Classifier::load(&b, &TensorFile::open(&path).unwrap()).unwrap();
    assert_eq!((net.name.as_str(), net.depth), ("WRN-16-2", 16));

    let unet = dir.path().join("unet.safetensors");
    write_untrained_unet(&unet, &purifier::model::UnetConfig::cifar10_small(), 1);
    let err = match Classifier::load(&b, &TensorFile::open(&unet).unwrap()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a UNet loaded as a classifier"),
    };
    assert!(err.contains("block1.layer.0.conv1.weight") && err.contains("layer1.0.conv1.weight"), "{err}");
}
