//! Host launcher of kernels/conv2d.cu: the implicit-GEMM convolution with its fused epilogue
//! (bias, per-sample channel bias, residual, ReLU), folded nearest x2 upsample and two-source
//! (skip concat) input.
//!
//! Written against the driver only (`&dyn Driver`, device addresses): the CUDA backend fills a
//! `Conv2dLaunch` from its tensors and calls `launch_conv2d`. Shapes are checked here and every
//! problem is an error naming the bad value; nothing is launched then.
use super::modules::KernelTable;
use crate::backend::{Conv2dGeometry, Precision};
use crate::driver::{DevicePtr, Driver, Function, KernelArgs, LaunchConfig, Module};
use crate::error::{Error, Result};

/// One convolution: dims, device addresses and storage types. Activations are NHWC, weights
/// `[Co][kh][kw][Ci]` with `Ci = channels_a + channels_b`; `bias` (Co) and `channel_bias`
/// (N x Co) are f32; `residual` has the output's shape and storage type.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dLaunch {
    pub batch: usize,
    /// Stored input size (of `a` and `b`), before the folded upsample.
    pub height: usize,
    pub width: usize,
    /// Input channels read from `a` (channels 0..channels_a) and from `b` (the rest; 0: no concat).
    pub channels_a: usize,
    pub channels_b: usize,
    /// The convolution reads the nearest x2 upsampling of the input (logical 2H x 2W).
    pub upsample: bool,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub geometry: Conv2dGeometry,
    pub relu: bool,
    /// Storage type of `a` and `b`.
    pub input_dtype: Precision,
    /// Storage type of the weights: f32 runs the f32 kernel, bf16/f16 the tensor-core kernels.
    pub weight_dtype: Precision,
    /// Storage type of `out` and `residual`.
    pub out_dtype: Precision,
    pub a: DevicePtr,
    pub b: Option<DevicePtr>,
    pub weight: DevicePtr,
    pub bias: Option<DevicePtr>,
    pub channel_bias: Option<DevicePtr>,
    pub residual: Option<DevicePtr>,
    pub out: DevicePtr,
}

impl Conv2dLaunch {
    /// The input size the convolution sees (after the folded upsample).
    pub fn logical_input_size(&self) -> (usize, usize) {
        let factor = if self.upsample { 2 } else { 1 };
        (self.height * factor, self.width * factor)
    }
    /// Output height and width (0 when the kernel does not fit: `validate` reports that).
    pub fn output_size(&self) -> (usize, usize) {
        let (h, w) = self.logical_input_size();
        let g = &self.geometry;
        let (ph, pw) = (h + g.pad_top + g.pad_bottom, w + g.pad_left + g.pad_right);
        if g.stride == 0 || ph < self.kernel_h || pw < self.kernel_w {
            return (0, 0);
        }
        g.output_size(h, w, self.kernel_h, self.kernel_w)
    }
    pub fn in_channels(&self) -> usize {
        self.channels_a + self.channels_b
    }
    /// Elements of the output (N x OH x OW x Co).
    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.output_size();
        self.batch * oh * ow * self.out_channels
    }

    /// Checks dims, pointers and storage types; the error names the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("conv2d: {msg}")));
        if self.batch == 0 || self.height == 0 || self.width == 0 {
            return bad(format!("empty input {}x{}x{} (N x H x W)", self.batch, self.height, self.width));
        }
        if self.channels_a == 0 || self.out_channels == 0 || self.kernel_h == 0 || self.kernel_w == 0 {
            return bad(format!(
                "channels_a {}, out_channels {}, kernel {}x{}: all must be at least 1",
                self.channels_a, self.out_channels, self.kernel_h, self.kernel_w
            ));
        }
        if self.geometry.stride == 0 {
            return bad("stride 0".into());
        }
        if self.output_size().0 == 0 {
            let (h, w) = self.logical_input_size();
            return bad(format!(
                "kernel {}x{} larger than the padded input ({}x{} with padding {:?})",
                self.kernel_h, self.kernel_w, h, w, self.geometry
            ));
        }
        match (self.channels_b, self.b) {
            (0, Some(_)) => return bad("a second input `b` was given with channels_b = 0".into()),
            (c, None) if c > 0 => return bad(format!("channels_b = {c} but no second input `b`")),
            _ => {}
        }
        if self.weight_dtype == Precision::F32
            && (self.input_dtype != Precision::F32 || self.out_dtype != Precision::F32)
        {
            return bad(format!(
                "f32 weights need f32 input and output (got input {}, output {})",
                self.input_dtype, self.out_dtype
            ));
        }
        if self.weight_dtype != Precision::F32 {
            for (what, dtype) in [("input", self.input_dtype), ("output", self.out_dtype)] {
                if dtype != self.weight_dtype && dtype != Precision::F32 {
                    return bad(format!(
                        "{what} storage {dtype} with {} weights (it must be {} or f32)",
                        self.weight_dtype, self.weight_dtype
                    ));
                }
            }
        }
        // The kernels index with 32-bit integers.
        let (h, w) = (self.height, self.width);
        let sizes = [
            ("input a", self.batch * h * w * self.channels_a),
            ("input b", self.batch * h * w * self.channels_b),
            ("weights", self.out_channels * self.kernel_h * self.kernel_w * self.in_channels()),
            ("output", self.output_len()),
        ];
        for (what, len) in sizes {
            if len > i32::MAX as usize {
                return bad(format!("{what} has {len} elements; the kernel indexes at most {}", i32::MAX));
            }
        }
        let pointers = [
            ("a", Some(self.a), self.input_dtype),
            ("b", self.b, self.input_dtype),
            ("weight", Some(self.weight), self.weight_dtype),
            ("bias", self.bias, Precision::F32),
            ("channel_bias", self.channel_bias, Precision::F32),
            ("residual", self.residual, self.out_dtype),
            ("out", Some(self.out), self.out_dtype),
        ];
        for (what, ptr, dtype) in pointers {
            if let Some(p) = ptr {
                if p == 0 {
                    return bad(format!("null device pointer for `{what}`"));
                }
                if p % dtype.bytes() as u64 != 0 {
                    return bad(format!("`{what}` at {p:#x} is not aligned to its {dtype} elements"));
                }
            }
        }
        Ok(())
    }

    /// The `ConvParams` struct of kernels/conv2d.cu, as the kernel's by-value parameter bytes.
    fn params_bytes(&self) -> Vec<u8> {
        let (oh, ow) = self.output_size();
        let g = &self.geometry;
        let fields = [
            self.batch,
            self.height,
            self.width,
            self.channels_a,
            self.channels_b,
            self.upsample as usize,
            self.out_channels,
            self.kernel_h,
            self.kernel_w,
            g.stride,
            g.pad_top,
            g.pad_left,
            oh,
            ow,
            self.relu as usize,
        ];
        fields.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()
    }
}

/// Which kernel of conv2d.cu runs a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv2dVersion {
    /// Version 1: SIMT tiles, f32 arithmetic (the only one for f32 weights; all-bf16 and all-f16
    /// too, for comparison).
    Simt,
    /// Version 2: tensor cores (bf16/f16 weights), cp.async when the inputs allow it.
    TensorCore,
}

fn dtype_name(d: Precision) -> &'static str {
    match d {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// The kernel names of conv2d.cu (version 1, plain instructions): forward and input gradient.
pub fn simt_kernel_names() -> Vec<String> {
    let dtypes = ["f32", "bf16", "f16"];
    let forward = dtypes.iter().map(|d| format!("conv2d_simt_{d}_{d}_{d}"));
    forward.chain(dtypes.iter().map(|d| format!("conv2d_backward_input_simt_{d}"))).collect()
}

/// The kernel names of conv2d_mma.cu (version 2, tensor cores): forward and input gradient.
pub fn mma_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for w in ["bf16", "f16"] {
        for out in [w, "f32"] {
            names.push(format!("conv2d_mma_{w}_{w}_{out}"));
            for input in [w, "f32"] {
                names.push(format!("conv2d_mma_gather_{input}_{w}_{out}"));
            }
        }
        for dout in ["f32", w] {
            names.push(format!("conv2d_backward_input_mma_{dout}_{w}"));
            names.push(format!("conv2d_backward_input_mma_gather_{dout}_{w}"));
        }
    }
    names
}

/// The kernels hot enough that ptxas must not spill in them (the input gradient's: f32 gradients
/// against 16-bit weights, what every bf16/f16 plan's VJP runs).
pub const SIMT_HOT_KERNELS: &[&str] = &["conv2d_simt_f32_f32_f32"];
pub const MMA_HOT_KERNELS: &[&str] = &[
    "conv2d_mma_bf16_bf16_bf16",
    "conv2d_mma_f16_f16_f16",
    "conv2d_backward_input_mma_f32_bf16",
    "conv2d_backward_input_mma_f32_f16",
];

/// The functions of the loaded convolution modules (conv2d.cu always, conv2d_mma.cu when given).
pub struct Conv2dKernels(KernelTable);

impl Conv2dKernels {
    pub fn load(driver: &dyn Driver, simt_module: Module, mma_module: Option<Module>) -> Result<Self> {
        let mma = mma_module.map(|m| (m, mma_kernel_names()));
        KernelTable::load(driver, "conv2d", (simt_module, simt_kernel_names()), mma).map(Self)
    }
    /// Whether the tensor-core kernels are loaded.
    pub fn has_tensor_cores(&self) -> bool {
        self.0.has_tensor_cores()
    }
    fn get(&self, name: &str) -> Result<Function> {
        self.0.get(name)
    }
}

/// The kernel name, launch configuration and whether the vector (cp.async) loader is used.
fn plan(args: &Conv2dLaunch, version: Conv2dVersion) -> Result<(String, LaunchConfig)> {
    let (oh, ow) = args.output_size();
    let positions = args.batch * oh * ow;
    let (i, w, o) = (dtype_name(args.input_dtype), dtype_name(args.weight_dtype), dtype_name(args.out_dtype));
    let (name, block_m, block_n, threads) = match (version, args.weight_dtype) {
        (Conv2dVersion::Simt, _) => {
            if args.input_dtype != args.weight_dtype || args.out_dtype != args.weight_dtype {
                return Err(Error::invalid(format!(
                    "conv2d: the SIMT kernel needs one storage type throughout (got input {i}, weights {w}, output {o})"
                )));
            }
            (format!("conv2d_simt_{w}_{w}_{w}"), 64, 64, 256)
        }
        (Conv2dVersion::TensorCore, Precision::F32) => {
            return Err(Error::invalid("conv2d: the tensor-core kernel needs bf16 or f16 weights, got f32"))
        }
        (Conv2dVersion::TensorCore, _) => {
            let aligned16 = [Some(args.a), args.b, Some(args.weight)].iter().flatten().all(|p| p % 16 == 0);
            let vector = args.input_dtype == args.weight_dtype
                && args.channels_a.is_multiple_of(8)
                && args.channels_b.is_multiple_of(8)
                && aligned16;
            let name =
                if vector { format!("conv2d_mma_{i}_{w}_{o}") } else { format!("conv2d_mma_gather_{i}_{w}_{o}") };
            (name, 128, 64, 128)
        }
    };
    let grid_x = positions.div_ceil(block_m);
    let grid_y = args.out_channels.div_ceil(block_n);
    if grid_x > i32::MAX as usize || grid_y > 65535 {
        return Err(Error::invalid(format!("conv2d: grid {grid_x} x {grid_y} too large")));
    }
    let config =
        LaunchConfig { grid: [grid_x as u32, grid_y as u32, 1], block: [threads, 1, 1], dynamic_shared_bytes: 0 };
    Ok((name, config))
}

/// Runs the convolution with the fastest loaded kernel for its storage types: tensor cores for
/// bf16/f16 weights, the SIMT kernel for f32 (and for bf16/f16 throughout when conv2d_mma.cu is
/// not loaded).
pub fn launch_conv2d(driver: &dyn Driver, kernels: &Conv2dKernels, args: &Conv2dLaunch) -> Result<()> {
    let version = if args.weight_dtype == Precision::F32 || !kernels.has_tensor_cores() {
        Conv2dVersion::Simt
    } else {
        Conv2dVersion::TensorCore
    };
    launch_conv2d_version(driver, kernels, args, version)
}

/// Runs the convolution with a chosen kernel version (tests and benchmarks compare them).
pub fn launch_conv2d_version(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dLaunch,
    version: Conv2dVersion,
) -> Result<()> {
    args.validate()?;
    let (name, config) = plan(args, version)?;
    let function = kernels.get(&name)?;
    let kernel_args = KernelArgs::new()
        .ptr(args.a)
        .ptr(args.b.unwrap_or(0))
        .ptr(args.weight)
        .ptr(args.bias.unwrap_or(0))
        .ptr(args.channel_bias.unwrap_or(0))
        .ptr(args.residual.unwrap_or(0))
        .ptr(args.out)
        .bytes(&args.params_bytes());
    driver.launch(function, config, &kernel_args)?;
    Ok(())
}

/// The kernel a launch would use (for reports and tests).
pub fn kernel_for(args: &Conv2dLaunch, version: Conv2dVersion) -> Result<String> {
    args.validate()?;
    Ok(plan(args, version)?.0)
}

/// The input gradient of a convolution: `dx = ` (or `+=`) the transposed convolution of `dout` with the
/// weights, dx the logical input (a concat's both parts, an upsample's full size: the caller
/// splits and folds). dout and dx NHWC, weights `[Co][kh][kw][Ci]`. Storage types: f32 weights
/// with f32 dout and dx (the SIMT kernel); bf16/f16 weights with dout and dx each f32 (what the
/// plans' gradients are) or the weights' type (the tensor-core kernel; the SIMT kernel takes one
/// type throughout).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dBackwardInputLaunch {
    pub batch: usize,
    /// The logical input size (dx).
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub geometry: Conv2dGeometry,
    pub dout_dtype: Precision,
    pub weight_dtype: Precision,
    pub dx_dtype: Precision,
    pub dout: DevicePtr,
    pub weight: DevicePtr,
    pub dx: DevicePtr,
    /// dx += (true) or dx = (false).
    pub accumulate: bool,
}

/// Tiles of the tensor-core input gradient (kernels/conv2d_mma.cu, namespace `bwd`).
const BACKWARD_MMA_BLOCK_M: usize = 128;
const BACKWARD_MMA_BLOCK_N: usize = 64;

impl Conv2dBackwardInputLaunch {
    /// The forward this is the gradient of (its dims and pointer checks are the same; dx plays the
    /// input, dout the output).
    fn forward(&self) -> Conv2dLaunch {
        Conv2dLaunch {
            batch: self.batch,
            height: self.height,
            width: self.width,
            channels_a: self.in_channels,
            channels_b: 0,
            upsample: false,
            out_channels: self.out_channels,
            kernel_h: self.kernel_h,
            kernel_w: self.kernel_w,
            geometry: self.geometry,
            relu: false,
            input_dtype: self.dx_dtype,
            weight_dtype: self.weight_dtype,
            out_dtype: self.dout_dtype,
            a: self.dx,
            b: None,
            weight: self.weight,
            bias: None,
            channel_bias: None,
            residual: None,
            out: self.dout,
        }
    }
    pub fn output_size(&self) -> (usize, usize) {
        self.forward().output_size()
    }
    pub fn validate(&self) -> Result<()> {
        let (d, w, x) = (self.dout_dtype, self.weight_dtype, self.dx_dtype);
        let problem = match w {
            Precision::F32 if d != Precision::F32 || x != Precision::F32 => {
                Some("f32 weights need f32 dout and dx".into())
            }
            Precision::F32 => None,
            _ if [d, x].iter().any(|&t| t != w && t != Precision::F32) => {
                Some(format!("{w} weights take dout and dx in f32 or {w}"))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(Error::invalid(format!("conv2d backward input: dout {d}, weights {w}, dx {x}: {problem}")));
        }
        self.forward()
            .validate()
            .map_err(|e| Error::invalid(e.to_string().replace("conv2d:", "conv2d backward input:")))
    }
}

/// The kernel name and launch configuration of an input gradient.
fn backward_plan(args: &Conv2dBackwardInputLaunch, version: Conv2dVersion) -> Result<(String, LaunchConfig)> {
    let (d, w, x) = (dtype_name(args.dout_dtype), dtype_name(args.weight_dtype), dtype_name(args.dx_dtype));
    let (name, block_m, block_n, threads, shared) = match (version, args.weight_dtype) {
        (Conv2dVersion::Simt, _) => {
            if args.dout_dtype != args.weight_dtype || args.dx_dtype != args.weight_dtype {
                return Err(Error::invalid(format!(
                    "conv2d backward input: the SIMT kernel needs one storage type throughout \
                     (got dout {d}, weights {w}, dx {x}); the tensor-core kernel takes f32 gradients"
                )));
            }
            (format!("conv2d_backward_input_simt_{w}"), 64, 64, 256, 0)
        }
        (Conv2dVersion::TensorCore, Precision::F32) => {
            return Err(Error::invalid(
                "conv2d backward input: the tensor-core kernel needs bf16 or f16 weights, got f32",
            ))
        }
        (Conv2dVersion::TensorCore, _) => {
            // 16-byte chunks: 4 f32 or 8 16-bit dout channels (never across a tap), 8 weight channels.
            let dout_chunk = 16 / args.dout_dtype.bytes();
            let vector = args.out_channels.is_multiple_of(dout_chunk)
                && args.in_channels.is_multiple_of(8)
                && args.dout.is_multiple_of(16)
                && args.weight.is_multiple_of(16);
            let name = if vector {
                format!("conv2d_backward_input_mma_{d}_{w}")
            } else {
                format!("conv2d_backward_input_mma_gather_{d}_{w}")
            };
            // 3 stages of A (128 x 40 halves: dout rounded to the weights' type) and B (32 x 72 halves).
            let shared = 3 * (BACKWARD_MMA_BLOCK_M * 40 * 2 + 32 * 72 * 2);
            (name, BACKWARD_MMA_BLOCK_M, BACKWARD_MMA_BLOCK_N, 128, shared)
        }
    };
    let positions = args.batch * args.height * args.width;
    let grid = [positions.div_ceil(block_m), args.in_channels.div_ceil(block_n)];
    if grid[0] > i32::MAX as usize || grid[1] > 65535 {
        return Err(Error::invalid(format!("conv2d backward input: grid {} x {} too large", grid[0], grid[1])));
    }
    let config = LaunchConfig {
        grid: [grid[0] as u32, grid[1] as u32, 1],
        block: [threads, 1, 1],
        dynamic_shared_bytes: shared as u32,
    };
    Ok((name, config))
}

/// dx = (or +=) conv2d's vector-Jacobian product with respect to its input, with the fastest loaded
/// kernel: tensor cores for bf16/f16 weights (f32 or 16-bit dout and dx), the SIMT kernel for f32
/// (and for one 16-bit type throughout when conv2d_mma.cu is not loaded).
pub fn launch_conv2d_backward_input(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dBackwardInputLaunch,
) -> Result<()> {
    let version = if args.weight_dtype == Precision::F32 || !kernels.has_tensor_cores() {
        Conv2dVersion::Simt
    } else {
        Conv2dVersion::TensorCore
    };
    launch_conv2d_backward_input_version(driver, kernels, args, version)
}

/// The input gradient with a chosen kernel version (tests compare them).
pub fn launch_conv2d_backward_input_version(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dBackwardInputLaunch,
    version: Conv2dVersion,
) -> Result<()> {
    args.validate()?;
    let (name, config) = backward_plan(args, version)?;
    let function = kernels.get(&name)?;
    let params = args.forward().params_bytes();
    let kernel_args = match version {
        Conv2dVersion::Simt => {
            KernelArgs::new().ptr(args.dout).ptr(args.weight).ptr(args.dx).bytes(&params).i32(args.accumulate as i32)
        }
        Conv2dVersion::TensorCore => KernelArgs::new()
            .ptr(args.dout)
            .ptr(args.weight)
            .ptr(args.dx)
            .i32(super::dtype_code(args.dx_dtype))
            .bytes(&params)
            .i32(args.accumulate as i32),
    };
    driver.launch(function, config, &kernel_args)?;
    Ok(())
}

/// The kernel an input gradient would use (for reports and tests).
pub fn backward_input_kernel_for(args: &Conv2dBackwardInputLaunch, version: Conv2dVersion) -> Result<String> {
    args.validate()?;
    Ok(backward_plan(args, version)?.0)
}
