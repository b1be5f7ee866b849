//! Coalescing guards, on the emulator: it counts every warp-level global access in the 32-byte
//! sectors it touches (`ptx_emulator::GlobalTraffic`), from the addresses the kernels compute, so
//! the share of each moved sector a kernel uses is a fixed property of its indexing, not a timing.
//! The kernels whose accesses were laid out for whole sectors keep them (examples/
//! emulator_memory_traffic measures every kernel of a UNet pass): GroupNorm's element-wise and
//! partial kernels (before: 12-32% of the bytes moved were used), the convolutions' epilogue
//! stores (before: 25% for 16-bit outputs, 50% for f32) and the f32 (SIMT) convolutions' stores
//! and transposed-weight loads (before: 25% and 38%; their float4 loaders now use every byte).
//! The same counters give the tensor-core convolutions' shared-memory wavefronts per mma
//! (`ptx_emulator::SmWork`, bank conflicts counted): their swizzled tiles keep every ldmatrix and
//! cp.async at one wavefront a phase.

use std::collections::BTreeMap;
use std::sync::Arc;

use purifier::backend::cuda::compile::ImageKind;
use purifier::backend::cuda::CudaBackend;
use purifier::backend::{Backend, Conv2dGeometry, ConvEpilogue, GradientStore, LayerGradient, LayerInput, Precision};
use purifier::driver::emulated::{EmulatedDriver, KernelTotals};

fn emulator(precision: Precision) -> (Arc<EmulatedDriver>, CudaBackend) {
    assert!(
        purifier::backend::cuda::compile::nvrtc_available(),
        "NVRTC is not loadable: put libnvrtc.so.13's folder on LD_LIBRARY_PATH"
    );
    let driver = Arc::new(EmulatedDriver::new());
    let backend = CudaBackend::new(driver.clone(), precision, ImageKind::Ptx).unwrap();
    (driver, backend)
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect()
}

/// The totals of the one kernel whose name starts with `prefix`.
fn kernel<'a>(totals: &'a BTreeMap<String, KernelTotals>, prefix: &str) -> (&'a str, &'a KernelTotals) {
    let found: Vec<_> = totals.iter().filter(|(name, _)| name.starts_with(prefix)).collect();
    assert_eq!(found.len(), 1, "one kernel named {prefix}*, ran: {:?}", totals.keys().collect::<Vec<_>>());
    (found[0].0.as_str(), found[0].1)
}

fn assert_uses(totals: &BTreeMap<String, KernelTotals>, prefix: &str, load_at_least: f64, store_at_least: f64) {
    let (name, t) = kernel(totals, prefix);
    let (load, store) = (t.global.load_efficiency(), t.global.store_efficiency());
    println!("{name}: {:.0}% of loaded and {:.0}% of stored sector bytes used", 100.0 * load, 100.0 * store);
    assert!(load >= load_at_least, "{name}: loads use {load:.3} of the sectors' bytes, expected >= {load_at_least}");
    assert!(
        store >= store_at_least,
        "{name}: stores use {store:.3} of the sectors' bytes, expected >= {store_at_least}"
    );
}

/// bf16 at 2 channels a group (the cifar10-small UNet's first level): the case that used 4 bytes of
/// each sector. At 4x4 the partial kernels split no (sample, group slice) into chunks, so what they
/// load is the tensors alone, not the finalizing warps' few words of partial sums; and the applies
/// run in them (a slice of 16 pixels). At 32x32, batch 1, the slices are too large for one block to
/// apply: the apply kernels follow.
#[test]
fn groupnorm_moves_whole_sectors() {
    let (driver, b) = emulator(Precision::Bf16);
    // The forward's and the backward's kernel totals (the backward as a narrowed plan calls it:
    // f32 dout, dx in the activations' type).
    let run = |shape: [usize; 4]| {
        let len = shape.iter().product();
        let x = b.upload_as(&values(len), &shape, Precision::Bf16).unwrap();
        let gamma = b.upload(&values(64), &[64]).unwrap();
        let beta = b.upload(&values(64), &[64]).unwrap();
        let mut out = b.zeros_as(&shape, Precision::Bf16).unwrap();
        let mut stats = b.zeros(&[shape[0], 32, 2]).unwrap();
        driver.kernel_totals(true);
        b.group_norm(LayerInput::one(&x), &gamma, &beta, 32, 1e-6, true, &mut out, &mut stats);
        b.synchronize().unwrap();
        let forward = driver.kernel_totals(true);
        let dout = b.upload(&values(len), &shape).unwrap();
        let mut dx = b.zeros_as(&shape, Precision::Bf16).unwrap();
        let dx_store = LayerGradient::one(&mut dx, GradientStore::Write);
        b.group_norm_backward(LayerInput::one(&x), &gamma, &beta, &stats, 32, true, &dout, dx_store);
        b.synchronize().unwrap();
        (forward, driver.kernel_totals(true))
    };
    let (forward, backward) = run([1, 64, 32, 32]);
    assert_uses(&forward, "groupnorm_apply", 0.75, 1.0);
    assert_uses(&backward, "groupnorm_backward_apply", 0.7, 1.0);
    let (forward, backward) = run([2, 64, 4, 4]);
    for (totals, apply) in [(&forward, "groupnorm_apply"), (&backward, "groupnorm_backward_apply")] {
        assert!(!totals.contains_key(apply), "at 4x4 {apply} runs in the partial kernel");
    }
    assert_uses(&forward, "groupnorm_partial_stats", 0.9, 0.9);
    assert_uses(&backward, "groupnorm_backward_partial", 0.9, 0.9);
}

/// A 3x3 convolution and its input gradient, 64 channels: at 8x8, batch 1, split on the emulator's
/// 16 SMs (partial sums in f32); at 16x16, batch 8 (16 blocks), unsplit with a bf16 output.
#[test]
fn conv_epilogues_store_channel_pairs() {
    let (driver, b) = emulator(Precision::Bf16);
    for (batch, size, split) in [(1, 8, true), (8, 16, false)] {
        let totals = conv_and_input_gradient(&driver, &b, [batch, 64, size, size]);
        if split {
            // Raw f32 sums, a row's four lanes 32 contiguous bytes.
            assert_uses(&totals, "conv2d_mma_partial_bf16_bf16", 0.9, 1.0);
            assert_uses(&totals, "conv2d_backward_input_mma_partial_f32_bf16", 0.9, 1.0);
        } else {
            // bf16 out: a row's four lanes 16 bytes, the other half of the sector another store's.
            assert_uses(&totals, "conv2d_mma_bf16_bf16_bf16", 0.9, 0.5);
            assert_uses(&totals, "conv2d_backward_input_mma_f32_bf16", 0.9, 1.0);
        }
    }
}

/// One bf16 3x3 convolution (with bias) of `shape` (N, C, H, W; C in and out) and its input gradient
/// from an f32 dout, written: what each kernel that ran did.
fn conv_and_input_gradient(
    driver: &EmulatedDriver,
    b: &CudaBackend,
    shape: [usize; 4],
) -> BTreeMap<String, KernelTotals> {
    let channels = shape[1];
    let w = b.upload_as(&values(channels * channels * 9), &[channels, channels, 3, 3], Precision::Bf16).unwrap();
    let bias = b.upload(&values(channels), &[channels]).unwrap();
    let len = shape.iter().product();
    let x = b.upload_as(&values(len), &shape, Precision::Bf16).unwrap();
    let mut out = b.zeros_as(&shape, Precision::Bf16).unwrap();
    let dout = b.upload(&values(len), &shape).unwrap();
    let mut dx = b.zeros(&shape).unwrap();
    driver.kernel_totals(true);
    let same = Conv2dGeometry::same(1);
    b.conv2d(LayerInput::one(&x), &w, Some(&bias), same, ConvEpilogue::default(), &mut out);
    b.conv2d_backward_input(&dout, &w, same, &mut dx, GradientStore::Write);
    b.synchronize().unwrap();
    driver.kernel_totals(true)
}

/// The f32 path (SIMT kernels): a thread's four channels stored in one access, and the input
/// gradient's transposed weights read with lanes along Ci (contiguous in memory).
#[test]
fn simt_convs_use_whole_sectors() {
    let (driver, b) = emulator(Precision::F32);
    // 8 x 16 x 16: 32 blocks, a full grid on the emulator's 16 SMs; 2 x 4 x 4: one block, split-K.
    for shape in [[8, 64, 16, 16], [2, 64, 4, 4]] {
        let len = shape.iter().product();
        let w = b.upload(&values(64 * 64 * 9), &[64, 64, 3, 3]).unwrap();
        let x = b.upload(&values(len), &shape).unwrap();
        let mut out = b.zeros(&shape).unwrap();
        let mut dx = b.zeros(&shape).unwrap();
        driver.kernel_totals(true);
        let same = Conv2dGeometry::same(1);
        b.conv2d(LayerInput::one(&x), &w, None, same, ConvEpilogue::default(), &mut out);
        b.conv2d_backward_input(&x, &w, same, &mut dx, GradientStore::Add);
        b.synchronize().unwrap();
        let totals = driver.kernel_totals(true);
        let infix = if shape[0] == 8 { "" } else { "partial_" };
        // The vector loaders (a float4 of 4 channels a thread) and stores use every byte.
        assert_uses(&totals, &format!("conv2d_simt_{infix}f32"), 0.99, 0.99);
        assert_uses(&totals, &format!("conv2d_backward_input_simt_{infix}f32"), 0.99, 0.99);
    }
}

/// Shared-memory wavefronts per m16n8k16 of the tensor-core convolutions, forward and input
/// gradient, narrow and wide tiles: exactly what conflict-free tiles need (per k-tile of a block:
/// ldmatrix 4 wavefronts an x4, the tiles' cp.async writes and the f32 A stores 128 bytes a
/// wavefront): narrow 288 for 128 mma, wide 384 for 256. The padded rows they replaced took 3 and
/// 2 (every cp.async phase two wavefronts). (The wide forward, which the launcher no longer picks
/// by default, is held to 1.5 in tests/cuda_kernels.rs, `emulator_conv_wide_tile`.)
#[test]
fn conv_tiles_have_no_bank_conflicts() {
    let (driver, b) = emulator(Precision::Bf16);
    // 16 emulated SMs: 64 channels at batch 8, 16x16 take the narrow tile; 128 channels the wide
    // one in the input gradient.
    let narrow = ("", 2.25);
    for (channels, forward, backward) in [(64, narrow, narrow), (128, narrow, ("wide_", 1.5))] {
        let totals = conv_and_input_gradient(&driver, &b, [8, channels, 16, 16]);
        for (prefix, per_mma) in [
            (format!("conv2d_mma_{}bf16_bf16_bf16", forward.0), forward.1),
            (format!("conv2d_backward_input_mma_{}f32_bf16", backward.0), backward.1),
        ] {
            let (name, t) = kernel(&totals, &prefix);
            let mma16 = t.sm.mma_macs as f64 / (16.0 * 8.0 * 16.0);
            let wavefronts = t.sm.shared_wavefronts as f64 / mma16;
            println!("{name}: {wavefronts:.3} shared wavefronts per mma ({} mma)", t.sm.mma);
            assert!(
                t.sm.mma > 0 && (wavefronts - per_mma).abs() < 1e-9,
                "{name}: {wavefronts} wavefronts per mma, want {per_mma}"
            );
        }
    }
}
