//! The tensor-core convolution grids of the `cifar10` UNet (forward and input gradient), unsplit and
//! as the launcher plans them (split-K where the grid under-fills the GPU, the wide 128 x 128 tile
//! where its grid still gives every SM a block), at batch 1 and 64 on a
//! 132-SM GPU (H200) and a 16-SM one (Jetson Orin), and the split-K workspace each would hold.
//!
//! The layer shapes come from the network itself: one forward + input VJP at batch 1 on the CPU
//! reference, through the profiling wrapper, which keys every convolution by its shape. Each shape
//! is then planned by the launcher's own functions (`conv2d_version`, `plan_conv2d`, and the input
//! gradient's), with bf16 weights, activations and f32 gradients as a bf16 plan runs them.
//!
//! Run: cargo run --release --example conv_grids
use purifier::backend::cpu::CpuBackend;
use purifier::backend::cuda::conv::{self, Conv2dBackwardInputLaunch, Conv2dLaunch, SplitKWorkspace, Upsampling};
use purifier::backend::profiled::Profiled;
use purifier::backend::{Backend, Conv2dGeometry, Precision};
use purifier::model::params::DeterministicParams;
use purifier::model::{Unet, UnetConfig};

/// One convolution shape as the profiler keys it: "3x3 s1 128 -> 256, 16x16" (kernel, stride, C_in
/// -> C_out, the output's size for the forward, dx's for the input gradient).
struct Shape {
    kernel: usize,
    stride: usize,
    in_channels: usize,
    out_channels: usize,
    size: usize,
}

fn parse(key: &str) -> Shape {
    let number = |s: &str| -> usize { s.parse().unwrap_or_else(|_| panic!("unexpected shape key `{key}`")) };
    let words: Vec<&str> = key.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let [kernel, stride, ci, "->", co, size] = words[..] else { panic!("unexpected shape key `{key}`") };
    let first = |s: &str| number(s.split('x').next().unwrap_or(s));
    Shape {
        kernel: first(kernel),
        stride: number(stride.trim_start_matches('s')),
        in_channels: number(ci),
        out_channels: number(co),
        size: first(size),
    }
}

/// The UNet's geometry for a kernel and stride: 3x3 pad 1, 1x1, or the downsample's stride 2 with
/// padding right and bottom.
fn geometry(kernel: usize, stride: usize) -> Conv2dGeometry {
    match (kernel, stride) {
        (3, 2) => Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 },
        (k, 1) => Conv2dGeometry::same(k / 2),
        other => panic!("no UNet convolution has kernel and stride {other:?}"),
    }
}

/// The forward of a shape (`subpixel`: the Upsample's, its input half the output's size).
fn forward_launch(s: &Shape, batch: usize, subpixel: bool) -> Conv2dLaunch {
    // The input whose output is `size` (a concat changes neither M, N nor K).
    let input = if subpixel { s.size / 2 } else { s.size * s.stride };
    Conv2dLaunch {
        batch,
        height: input,
        width: input,
        channels_a: s.in_channels,
        channels_b: 0,
        upsample: if subpixel { Upsampling::SubPixel } else { Upsampling::None },
        out_channels: s.out_channels,
        kernel_h: s.kernel,
        kernel_w: s.kernel,
        geometry: geometry(s.kernel, s.stride),
        relu: false,
        input_dtype: Precision::Bf16,
        weight_dtype: Precision::Bf16,
        out_dtype: Precision::Bf16,
        a: 0x1000,
        b: None,
        weight: 0x2000,
        bias: None,
        channel_bias: None,
        channel_bias_stride: s.out_channels,
        residual: None,
        out: 0x3000,
    }
}

/// The input gradient of a shape (`subpixel`: the Upsample's; `size` is dx's either way).
fn backward_launch(s: &Shape, batch: usize, subpixel: bool) -> Conv2dBackwardInputLaunch {
    Conv2dBackwardInputLaunch {
        batch,
        height: s.size,
        width: s.size,
        in_channels: s.in_channels,
        out_channels: s.out_channels,
        kernel_h: s.kernel,
        kernel_w: s.kernel,
        geometry: geometry(s.kernel, s.stride),
        dout_dtype: Precision::F32,
        weight_dtype: Precision::Bf16,
        dx_dtype: Precision::F32,
        dout: 0x1000,
        weight: 0x2000,
        dx: 0x3000,
        accumulate: false,
        subpixel,
    }
}

/// "x x y (x z) blocks" of a plan (z: the sub-pixel form's phases, times split-K's slices), with its
/// slices, or "wide" for the 128 x 128 tile.
fn grid_text(plan: &conv::LaunchPlan) -> String {
    let [x, y, z] = plan.config.grid;
    let grid = if z > 1 { format!("{x}x{y}x{z}") } else { format!("{x}x{y}") };
    match &plan.split {
        Some(split) => format!("{grid} = {:>4} ({} k-steps / {})", plan.blocks(), split.k_tiles, split.slices),
        None if plan.kernel.contains("_wide_") => format!("{grid} = {:>4} wide", plan.blocks()),
        None => format!("{grid} = {:>4}", plan.blocks()),
    }
}

fn main() -> purifier::Result<()> {
    let cpu = CpuBackend;
    let profiled = Profiled::new(&cpu);
    let unet = Unet::load(&UnetConfig::cifar10(), &mut DeterministicParams::new(&profiled, 1))?;
    let mut plan = unet.plan(&profiled, 1, true)?;
    let x = profiled.upload(&vec![0.1; 3 * 32 * 32], &[1, 3, 32, 32])?;
    let v = profiled.upload(&vec![0.1; 3 * 32 * 32], &[1, 3, 32, 32])?;
    unet.forward(&profiled, &mut plan, &x, &[99.0])?;
    unet.input_vjp(&profiled, &mut plan, &v)?;
    let times = profiled.take()?;

    let sms_list = [132usize, 16];
    for &sms in &sms_list {
        let bytes = SplitKWorkspace::bytes_for(sms);
        println!("{sms} SMs: split-K workspace {bytes} bytes ({:.1} MiB)", bytes as f64 / (1 << 20) as f64);
    }
    let ops = [
        ("conv2d", "forward"),
        ("upsample_conv2d", "forward, the Upsample's (sub-pixel form)"),
        ("conv2d_backward_input", "input gradient"),
        ("upsample_conv2d_backward_input", "input gradient, the Upsample's (sub-pixel form)"),
    ];
    for (op, title) in ops {
        let subpixel = op.starts_with("upsample");
        for batch in [1usize, 64] {
            println!("\n{title}, batch {batch} (shape: kernel stride C_in -> C_out, output or dx size; calls)");
            print!("{:<30} {:>5}", "shape", "calls");
            for &sms in &sms_list {
                print!(" | {:<14} {:<36}", format!("{sms} SMs unsplit"), "planned");
            }
            println!();
            let mut largest = vec![0usize; sms_list.len()];
            for ((name, key), stats) in &times.shapes {
                if *name != op {
                    continue;
                }
                let shape = parse(key);
                print!("{key:<30} {:>5}", stats.calls);
                for (i, &sms) in sms_list.iter().enumerate() {
                    let workspace =
                        SplitKWorkspace { ptr: 0x10000, bytes: SplitKWorkspace::bytes_for(sms), multiprocessors: sms };
                    let (unsplit, planned) = if !op.ends_with("backward_input") {
                        let launch = forward_launch(&shape, batch, subpixel);
                        let version = conv::conv2d_version(&launch, true, Some(&workspace));
                        let unsplit = conv::plan_conv2d(&launch, conv::Conv2dVersion::TensorCore)?;
                        (unsplit, conv::plan_conv2d(&launch, version)?)
                    } else {
                        let launch = backward_launch(&shape, batch, subpixel);
                        let version = conv::conv2d_backward_input_version(&launch, true, Some(&workspace));
                        let unsplit = conv::plan_conv2d_backward_input(&launch, conv::Conv2dVersion::TensorCore)?;
                        (unsplit, conv::plan_conv2d_backward_input(&launch, version)?)
                    };
                    if let Some(split) = &planned.split {
                        largest[i] = largest[i].max(split.workspace_bytes);
                    }
                    print!(" | {:<14} {:<36}", grid_text(&unsplit), grid_text(&planned));
                }
                println!();
            }
            for (i, &sms) in sms_list.iter().enumerate() {
                println!("  {sms} SMs: largest split-K workspace used {} bytes", largest[i]);
            }
        }
    }
    Ok(())
}
