//! conv_in's input gradient alone (cifar10: dx 3 channels, dout 128, 3x3, 32x32; a bf16 plan's
//! types: bf16 dout and weights, f32 dx) through each kernel that can take it, on the PTX
//! emulator planned for an H200's 132 SMs: the narrow kernel the launcher picks (version 4) and the
//! tensor cores' gather (version 2, split where its grid under-fills the GPU, as before the narrow
//! kernel). For each: the launch model's time (`purifier::driver::launch_model`), its
//! warp-instructions and the issue floor they set (all SMs' schedulers busy).
//!
//! Run: source scripts/nvrtc.sh && cargo run --release --example emulator_conv_in_gradient -- [batch...]
//! (default 1 16 64 256).

mod common;

use purifier::backend::cuda::compile::{HalfTypes, ImageKind, KernelCompiler};
use purifier::backend::cuda::conv::{self, Conv2dBackwardInputLaunch, Conv2dKernels, Conv2dVersion, SplitKWorkspace};
use purifier::backend::{Conv2dGeometry, Precision};
use purifier::driver::emulated::EmulatedDriver;
use purifier::driver::launch_model::CLOCK_HZ;
use purifier::driver::{Driver, ModuleImage};

fn main() {
    let batches: Vec<usize> = std::env::args().skip(1).map(|b| b.parse().expect("batch: a positive integer")).collect();
    let batches = if batches.is_empty() { vec![1, 16, 64, 256] } else { batches };
    let compiler = KernelCompiler::with_cache_dir("sm_80", None).expect("NVRTC (source scripts/nvrtc.sh)");
    let ptx = |file| String::from_utf8(compiler.compile_file(file, ImageKind::Ptx).unwrap()).unwrap();
    let (simt_ptx, mma_ptx) = (ptx("conv2d.cu"), ptx("conv2d_mma.cu"));
    let sms = common::H200_SMS;
    let d = EmulatedDriver::with_multiprocessors(sms).timed().with_kernel_registers(common::h200_registers());
    let simt = d.load_module(ModuleImage::Ptx(&simt_ptx)).unwrap();
    let mma = d.load_module(ModuleImage::Ptx(&mma_ptx)).unwrap();
    let kernels = Conv2dKernels::load(&d, simt, Some((mma, HalfTypes::Both))).unwrap();
    let bytes = SplitKWorkspace::bytes_for(sms as usize);
    let workspace = SplitKWorkspace { ptr: d.alloc(bytes).unwrap(), bytes, multiprocessors: sms as usize };
    let issue_slots = f64::from(sms) * 4.0;
    for batch in batches {
        let pixels = batch * 32 * 32;
        let dout = d.alloc(pixels * 128 * 2).unwrap();
        d.memset_u32(dout, 0x3c24_3c24, pixels * 64).unwrap();
        let weight = d.alloc(128 * 27 * 2).unwrap();
        d.memset_u32(weight, 0x3c24_3c24, 128 * 27 / 2).unwrap();
        let launch = Conv2dBackwardInputLaunch {
            batch,
            height: 32,
            width: 32,
            in_channels: 3,
            out_channels: 128,
            kernel_h: 3,
            kernel_w: 3,
            geometry: Conv2dGeometry::same(1),
            dout_dtype: Precision::Bf16,
            weight_dtype: Precision::Bf16,
            dx_dtype: Precision::F32,
            dout,
            weight,
            dx: d.alloc(pixels * 3 * 4).unwrap(),
            accumulate: false,
            subpixel: false,
        };
        let picked = conv::conv2d_backward_input_version(&launch, true, Some(&workspace));
        // (As the launcher split it: split_k_slices over the unsplit grid, 32 k a k-step.)
        let grid = conv::plan_conv2d_backward_input(&launch, Conv2dVersion::TensorCore).unwrap().config.grid;
        let slices = conv::split_k_slices((grid[0] * grid[1]) as usize, launch.gemm().k.div_ceil(32), sms as usize);
        let gather = if slices > 1 { Conv2dVersion::TensorCoreSplitK { slices } } else { Conv2dVersion::TensorCore };
        d.kernel_totals(true);
        for version in [picked, gather] {
            conv::launch_conv2d_backward_input_version(&d, &kernels, &launch, version, Some(&workspace)).unwrap();
            d.synchronize().unwrap();
            let totals = d.kernel_totals(true);
            let cycles: f64 = totals.values().map(|t| t.model.total).sum();
            let instructions: u64 = totals.values().map(|t| t.sm.warp_instructions).sum();
            let names: Vec<&str> = totals.keys().map(String::as_str).collect();
            println!(
                "batch {batch:>3} {:<58} model {:>7.1} us, {:>6.1} M warp-instructions (issue floor {:>6.1} us)",
                names.join(" + "),
                cycles / CLOCK_HZ * 1e6,
                instructions as f64 / 1e6,
                instructions as f64 / issue_slots / CLOCK_HZ * 1e6
            );
        }
        for ptr in [launch.dout, launch.weight, launch.dx] {
            d.free(ptr).unwrap();
        }
    }
}
