//! Device memory known without allocating it: the CUDA backend counts every allocation
//! (`CudaBackend::memory`), and over the plan-sizing driver (`CudaBackend::sizing`) it makes the
//! same allocations with nothing behind them. The count is checked against the emulator driver's
//! own bookkeeping of the bytes it really holds, for the same networks and plans. The emulator
//! needs NVRTC (LD_LIBRARY_PATH); the sizing backend does not.
mod common;

use purifier::attack::Defence;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::{Backend, Precision, STEP_COLUMNS};
use purifier::device::emulator_backend;
use purifier::diffusion::{GradientPath, Guidance};
use purifier::model::params::DeterministicParams;
use purifier::model::{Classifier, Unet, UnetConfig};
use purifier::purify::{Purifier, PurifySettings};

/// (weights, defence plan) bytes of an adversarial-x0 defence on `b`, as the backend counts them,
/// and the bytes the driver itself says it gave out for both.
fn defence_bytes(b: &CudaBackend, batch: usize, t_star: usize) -> (usize, usize, usize) {
    let start = b.memory().in_use();
    let driver_free = b.driver().free_memory().unwrap();
    let unet = Unet::load(&UnetConfig::cifar10_small(), &mut DeterministicParams::new(b, 1)).unwrap();
    let aux = Classifier::load_wide(&mut DeterministicParams::new(b, 2), 16, 2).unwrap();
    let classifier = Classifier::load_with(&mut DeterministicParams::new(b, 3), 20).unwrap();
    let weights = b.memory().in_use() - start;
    let guidance =
        Guidance::Adversarial { scale: 1.0, lambda_features: 1.0, lambda_class: 1.0, path: GradientPath::X0 };
    let settings = PurifySettings { t_star, guidance, ..Default::default() };
    let purifier = Purifier::new(b, &unet, Some(&aux), settings).unwrap();
    let defence = Defence::purified(&purifier, &classifier);
    let plan = defence.plan(batch).unwrap();
    let plan_bytes = b.memory().in_use() - start - weights;
    let driver_held = driver_free - b.driver().free_memory().unwrap();
    drop(plan);
    assert_eq!(b.memory().in_use(), start + weights, "dropping the plan gives its bytes back");
    (weights, plan_bytes, driver_held)
}

/// The sizing backend counts what the emulator really allocates, byte for byte, and the
/// emulator driver's own count of held bytes agrees (up to its per-allocation rounding).
#[test]
fn sizing_counts_what_the_emulator_allocates() {
    for precision in [Precision::F32, Precision::Bf16] {
        let emulator = emulator_backend(precision).unwrap();
        let (weights, plan, held) = defence_bytes(&emulator, 2, 4);
        let sizing = CudaBackend::sizing(precision).unwrap();
        let (sized_weights, sized_plan, _) = defence_bytes(&sizing, 2, 4);
        println!(
            "{precision}: weights {weights} bytes, plan {plan} bytes (batch 2, t* 4), the emulator driver holds \
             {held}; sized {sized_weights}, {sized_plan}"
        );
        assert_eq!((sized_weights, sized_plan), (weights, plan));
        // The emulator driver's own count of what it gave out: the same bytes, up to its rounding
        // of each allocation.
        let counted = weights + plan;
        assert!(held >= counted && held - counted < counted / 100, "driver holds {held}, backend counted {counted}");
        assert!(emulator.memory().peak() >= counted);
    }
}

/// A plan's bytes are what its shapes say: the tape grows by one f32 image batch per reverse step,
/// and bf16 activations take less than f32 ones.
#[test]
fn sized_plans_scale_with_steps_batch_and_precision() {
    let f32_backend = CudaBackend::sizing(Precision::F32).unwrap();
    let (_, four_steps, _) = defence_bytes(&f32_backend, 2, 4);
    let (_, five_steps, _) = defence_bytes(&f32_backend, 2, 5);
    // One more tape entry (2 images, f32) and one more row of the sampler's step table.
    assert_eq!(five_steps - four_steps, 2 * 3 * 32 * 32 * 4 + STEP_COLUMNS * 4);
    let (_, batch_four, _) = defence_bytes(&f32_backend, 4, 4);
    assert!(batch_four > four_steps * 19 / 10 && batch_four <= 2 * four_steps, "{batch_four} vs {four_steps}");
    let (_, bf16_plan, _) = defence_bytes(&CudaBackend::sizing(Precision::Bf16).unwrap(), 2, 4);
    assert!(bf16_plan < four_steps, "bf16 {bf16_plan} vs f32 {four_steps}");
}

/// The sizing backend runs nothing: a download or a kernel is an error that says why.
#[test]
fn sizing_backend_refuses_to_compute() {
    let b = CudaBackend::sizing(Precision::F32).unwrap();
    let x = b.upload(&[1.0, 2.0], &[2]).unwrap();
    let e = b.download(&x).unwrap_err().to_string();
    assert!(e.contains("only counts allocations"), "{e}");
    let mut y = b.zeros(&[2]).unwrap();
    b.axpby(1.0, &x, 1.0, &x, &mut y);
    let e = b.synchronize().unwrap_err().to_string();
    assert!(e.contains("compiles no kernels"), "{e}");
}
