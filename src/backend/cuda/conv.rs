//! Host launcher of kernels/conv2d.cu: the implicit-GEMM convolution with its fused epilogue
//! (bias, per-sample channel bias, residual, ReLU), folded nearest x2 upsample (or its sub-pixel
//! form) and two-source (skip concat) input.
//!
//! Written against the driver only (`&dyn Driver`, device addresses): the CUDA backend fills a
//! `Conv2dLaunch` from its tensors and calls `launch_conv2d`. Shapes are checked here and every
//! problem is an error naming the bad value; nothing is launched then.
//!
//! Split-K: a grid (tensor-core or SIMT) with fewer blocks than the GPU has SMs (batch 1's small
//! levels) runs with its K loop cut into slices (`split_k_slices`), partial sums in the backend's
//! workspace (`SplitKWorkspace`), and a reduction kernel that adds them in a fixed order and applies
//! the epilogue; `plan_conv2d` / `plan_conv2d_backward_input` say what a launch runs.
use super::compile::HalfTypes;
use super::modules::KernelTable;
use crate::backend::{Conv2dGeometry, Precision};
use crate::driver::{DevicePtr, Driver, Function, KernelArgs, LaunchConfig, Module};
use crate::error::{Error, Result};
use crate::switches;

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
    /// Whether (and how) the convolution reads the nearest x2 upsampling of the input.
    pub upsample: Upsampling,
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
    /// f32, N rows of `out_channels` values, `channel_bias_stride` elements apart.
    pub channel_bias: Option<DevicePtr>,
    pub channel_bias_stride: usize,
    pub residual: Option<DevicePtr>,
    pub out: DevicePtr,
}

/// How a convolution reads the nearest x2 upsampling of its input (the UNet's Upsample), if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsampling {
    /// The input as stored.
    None,
    /// Folded into the input indexing: a logical 2H x 2W input, pixel (y, x) read at (y/2, x/2).
    /// Any kernel.
    Nearest,
    /// The sub-pixel form (kernels/conv_common.cuh): a 3x3, stride-1, pad-1 kernel only, whose
    /// weights come folded into four 2x2 phases (`crate::backend::subpixel_weights`: Co x Ci x 4 x 4,
    /// stored `[Co][phase][tap][Ci]`); 16 taps an output quad where `Nearest` reads 36.
    SubPixel,
}

/// The implicit GEMM a launch runs: M rows (positions), N columns (channels), depth K, once for each
/// of `phases` (grid z: the sub-pixel forward's four, each over the stored input's positions and
/// storing a quarter of the output; else 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub phases: usize,
}

impl Gemm {
    /// Blocks of `block_m` x `block_n` tiles over all phases.
    fn blocks(&self, block_m: usize, block_n: usize) -> usize {
        self.phases * self.m.div_ceil(block_m) * self.n.div_ceil(block_n)
    }
    /// Elements of the output (one per row and column of every phase).
    fn outputs(&self) -> usize {
        self.phases * self.m * self.n
    }
}

/// Sub-pixel phases and the taps of each (2x2).
const SUBPIXEL_PHASES: usize = 4;
const SUBPIXEL_TAPS: usize = 4;

impl Conv2dLaunch {
    /// Outputs a thread of the split-K reduction takes: 4 (`_v4`) where Co, the channel-bias stride
    /// and every tensor it reads or writes allow 4-element accesses, else 1.
    fn reduce_vector(&self) -> usize {
        let out_bytes = self.out_dtype.bytes() as u64;
        let vector = self.out_channels.is_multiple_of(4)
            && (self.channel_bias.is_none() || self.channel_bias_stride.is_multiple_of(4))
            && [self.bias, self.channel_bias].iter().flatten().all(|p| p.is_multiple_of(16))
            && [Some(self.out), self.residual].iter().flatten().all(|p| p.is_multiple_of(4 * out_bytes));
        if vector {
            4
        } else {
            1
        }
    }

    /// The input size the convolution sees (after the folded upsample).
    pub fn logical_input_size(&self) -> (usize, usize) {
        let factor = if self.upsample == Upsampling::None { 1 } else { 2 };
        (self.height * factor, self.width * factor)
    }
    /// The implicit GEMM of the forward (`Gemm`).
    pub fn gemm(&self) -> Gemm {
        let (n, k_per_tap) = (self.out_channels, self.in_channels());
        if self.upsample == Upsampling::SubPixel {
            let m = self.batch * self.height * self.width;
            return Gemm { m, n, k: SUBPIXEL_TAPS * k_per_tap, phases: SUBPIXEL_PHASES };
        }
        let (oh, ow) = self.output_size();
        Gemm { m: self.batch * oh * ow, n, k: self.kernel_h * self.kernel_w * k_per_tap, phases: 1 }
    }
    /// Elements of the weights: Co x kh x kw x Ci, or Co x 16 x Ci in the sub-pixel form.
    pub fn weight_len(&self) -> usize {
        let taps = match self.upsample {
            Upsampling::SubPixel => SUBPIXEL_PHASES * SUBPIXEL_TAPS,
            _ => self.kernel_h * self.kernel_w,
        };
        self.out_channels * taps * self.in_channels()
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
        let g = &self.geometry;
        let same_3x3 = (self.kernel_h, self.kernel_w, g.stride) == (3, 3, 1)
            && [g.pad_top, g.pad_left, g.pad_bottom, g.pad_right] == [1; 4];
        if self.upsample == Upsampling::SubPixel && !same_3x3 {
            return bad(format!(
                "the sub-pixel upsample takes a 3x3 kernel, stride 1, padding 1 (got {}x{}, {g:?})",
                self.kernel_h, self.kernel_w
            ));
        }
        if self.channel_bias.is_some() && self.channel_bias_stride < self.out_channels {
            return bad(format!(
                "channel_bias rows {} elements apart, fewer than the {} output channels",
                self.channel_bias_stride, self.out_channels
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
            ("weights", self.weight_len()),
            ("output", self.output_len()),
            ("channel_bias", if self.channel_bias.is_some() { self.batch * self.channel_bias_stride } else { 0 }),
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

    /// The `ConvParams` struct of kernels/conv2d.cu, as the kernel's by-value parameter bytes, for
    /// the forward or (`backward`: this is the forward of an input gradient) the input gradient; the
    /// sub-pixel form as kernels/conv_common.cuh reads it (2x2 phase-0 windows forward, 16 taps
    /// backward). Public for the tests that launch the split-K reductions themselves.
    pub fn params_bytes(&self, backward: bool) -> Vec<u8> {
        let (oh, ow) = self.output_size();
        let g = &self.geometry;
        let (shift, kh, kw, pad_top, pad_left) = match self.upsample {
            Upsampling::None => (0, self.kernel_h, self.kernel_w, g.pad_top, g.pad_left),
            Upsampling::Nearest => (1, self.kernel_h, self.kernel_w, g.pad_top, g.pad_left),
            Upsampling::SubPixel if backward => (0, SUBPIXEL_PHASES, SUBPIXEL_TAPS, 0, 0),
            Upsampling::SubPixel => (0, 2, 2, 1, 1),
        };
        let fields = [
            self.batch,
            self.height,
            self.width,
            self.channels_a,
            self.channels_b,
            shift,
            self.out_channels,
            kh,
            kw,
            g.stride,
            pad_top,
            pad_left,
            oh,
            ow,
            self.relu as usize,
            self.channel_bias_stride,
            (self.upsample == Upsampling::SubPixel) as usize,
            self.weight_len() / self.out_channels,
        ];
        fields.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()
    }
}

/// Which kernel of conv2d.cu / conv2d_mma.cu runs a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv2dVersion {
    /// Version 1: SIMT tiles, f32 arithmetic (the only one for f32 weights; all-bf16 and all-f16
    /// too, for comparison).
    Simt,
    /// Version 2: tensor cores (bf16/f16 weights), cp.async when the inputs allow it; the whole K
    /// loop in each block, 128 positions x 64 channels a block.
    TensorCore,
    /// Version 2 with the wide tile, 128 x 128 a block (warps of 64 x 64): per mma a third fewer
    /// shared-memory wavefronts and fewer loader instructions, half the blocks. The cp.async loaders
    /// only; the same bits as `TensorCore` (K summed in the same order). For grids that still give
    /// every SM a block.
    TensorCoreWide,
    /// Version 3: version 2 with its K loop cut into `slices` parts of whole k-steps (one per
    /// k-step when K has fewer: `SplitK::slices` says how many run), each block's f32
    /// partial sums to the split-K workspace, then a reduction kernel adds them in a fixed order
    /// and applies the epilogue. For grids too small to fill the GPU (batch 1, 4x4 and 8x8 levels).
    TensorCoreSplitK { slices: usize },
    /// Version 1 with its K loop cut into `slices` parts (f32 weights: version 3's split for the
    /// SIMT tiles), the same workspace and reduction. For grids too small to fill the GPU: the f32
    /// UNet at batch 1 gave a 4x4 level 4 blocks each 144 k-tiles deep.
    SimtSplitK { slices: usize },
    /// Version 4, the input gradient only (kernels/conv2d.cu): a warp takes a dx pixel, then the
    /// next, `pixels_per_warp` of them, its lanes along dout's channels, the weights in shared
    /// memory. For layers with at most 4 input channels, kernels up to 3x3 and dout in 4-channel
    /// loads (conv_in's dx: a GEMM 3 columns wide, where the tiles above waste 61 of their 64),
    /// whatever the storage types.
    Narrow { pixels_per_warp: usize },
}

impl Conv2dVersion {
    /// The split-K slices of a split version.
    fn slices(self) -> Option<usize> {
        match self {
            Conv2dVersion::TensorCoreSplitK { slices } | Conv2dVersion::SimtSplitK { slices } => Some(slices),
            _ => None,
        }
    }
}

/// Split-K never cuts K into more parts than this...
pub const SPLIT_K_MAX_SLICES: usize = 16;
/// ...nor into parts of fewer k-steps (32 k each, `split_k_slices`' unit for both versions) than
/// this: a part pays a pipeline fill and its partial sums' round trip through memory.
pub const SPLIT_K_MIN_SLICE_TILES: usize = 4;
/// The tiles of the tensor-core kernels (forward and input gradient): 128 positions x 64
/// channels x 32 k per block and k-step.
const MMA_BLOCK_M: usize = 128;
const MMA_BLOCK_N: usize = 64;
const MMA_BLOCK_K: usize = 32;
/// The wide tile's channels (`Conv2dVersion::TensorCoreWide`).
const MMA_WIDE_BLOCK_N: usize = 128;
/// Pipeline stages of the tensor-core kernels (kernels/conv2d_mma.cu).
const MMA_STAGES: usize = 3;
/// The narrow input gradient (`Conv2dVersion::Narrow`, kernels/conv2d.cu's `narrow` namespace):
/// dx channels and kernel size at most, threads (8 warps) a block, and the most pixels a warp takes.
const NARROW_CHANNELS: usize = 4;
const NARROW_KERNEL: usize = 3;
const NARROW_THREADS: u32 = 256;
const NARROW_WARPS: usize = 8;
const NARROW_MAX_PIXELS_PER_WARP: usize = 16;
/// ...and the fewest dout channels it takes (4 a lane: half a warp busy at least). Below that (the
/// classifiers' first convolution, 3 -> 16) the tensor cores keep the layer.
const NARROW_MIN_DOUT_CHANNELS: usize = 64;
/// The SMs the narrow kernel plans for where no workspace gives the GPU's count (split-K switched
/// off): an H200's.
const NARROW_DEFAULT_MULTIPROCESSORS: usize = 132;
/// Dynamic shared memory a block may have without the driver's opt-in.
const DEFAULT_SHARED_LIMIT: usize = 48 * 1024;
/// The SIMT kernels' tiles (kernels/conv2d.cu): 64 positions x 64 channels x 16 k, 256 threads.
const SIMT_BLOCK_M: usize = 64;
const SIMT_BLOCK_N: usize = 64;
const SIMT_BLOCK_K: usize = 16;
const SIMT_THREADS: u32 = 256;

/// Dynamic shared memory of a tensor-core forward block with `block_n` channels: the stages' A
/// (128 rows) and B (`block_n` rows) tiles, rows of 32 halves (36,864 or 49,152 bytes).
fn forward_shared_bytes(block_n: usize) -> usize {
    MMA_STAGES * (MMA_BLOCK_M + block_n) * MMA_BLOCK_K * 2
}

/// Dynamic shared memory of a tensor-core input-gradient block with `block_n` input channels: the
/// stages' A tiles (128 rows of 32 halves, dout rounded to the weights' type) and B tiles (32 k
/// rows of `block_n` + 8 halves) (38,400 or 50,688 bytes).
fn backward_shared_bytes(block_n: usize) -> usize {
    MMA_STAGES * (MMA_BLOCK_M * MMA_BLOCK_K + MMA_BLOCK_K * (block_n + 8)) * 2
}
/// Threads per block of the split-K reduction kernels.
const REDUCE_THREADS: u32 = 256;
/// Outputs from which a split-K reduction takes 4 a thread (where the accesses allow it): a thread
/// an element would then want about as many threads as an H200 holds at once (132 SMs x 2048), so
/// issue slots bound it; below, one wave of a thread an element runs shallower. In the latency
/// model of examples/emulator_launch_depth.rs (cifar10 bf16) 4 a thread won at batch 16 and lost
/// at batch 1, where these outputs are 16K to 128K. Either way the same sums in the same order.
const REDUCE_VECTOR_OUTPUTS: usize = 1 << 18;

/// Device scratch for split-K's partial sums and the multiprocessor count the split is planned
/// for. The CUDA backend allocates one when it is made (`bytes_for`), before any step is
/// recorded, and every split launch reuses it: the stream is in order, so one convolution's
/// reduction has read it before the next one writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitKWorkspace {
    pub ptr: DevicePtr,
    pub bytes: usize,
    pub multiprocessors: usize,
}

impl SplitKWorkspace {
    /// Bytes that hold every split `split_k_slices` chooses on `multiprocessors` SMs: it splits
    /// only grids of fewer blocks than SMs, into slices x blocks < 2 x SMs + blocks < 3 x SMs
    /// blocks, each with at most a 128 x 64 tile of f32 sums (H200, 132 SMs: 12.4 MiB; Jetson Orin,
    /// 16 SMs: 1.5 MiB).
    pub fn bytes_for(multiprocessors: usize) -> usize {
        3 * multiprocessors.max(1) * MMA_BLOCK_M * MMA_BLOCK_N * 4
    }
}

/// Into how many K slices a tensor-core launch of `blocks` output tiles and `k_tiles` k-steps is
/// cut on a GPU of `multiprocessors` SMs: 1 when the grid has a block for every SM; otherwise
/// enough slices for about twice as many blocks as SMs, at most `SPLIT_K_MAX_SLICES`, each at least
/// `SPLIT_K_MIN_SLICE_TILES` k-steps. Slice z of Z takes k-steps [z T / Z, (z + 1) T / Z) of the T
/// (whole k-steps, sizes within one of each other).
pub fn split_k_slices(blocks: usize, k_tiles: usize, multiprocessors: usize) -> usize {
    if blocks == 0 || blocks >= multiprocessors {
        return 1;
    }
    let wanted = (2 * multiprocessors).div_ceil(blocks).min(SPLIT_K_MAX_SLICES);
    wanted.min(k_tiles / SPLIT_K_MIN_SLICE_TILES).max(1)
}

/// A split-K launch: the slices (grid z) of its `k_tiles` k-steps, the workspace bytes it fills, and
/// the reduction kernel that follows (`<base>` or, 4 elements a thread, `<base>_v4`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitK {
    pub slices: usize,
    pub k_tiles: usize,
    pub workspace_bytes: usize,
    pub reduce_kernel: String,
    pub reduce_config: LaunchConfig,
}

/// What a launch runs: the kernel and its configuration, and for split-K the reduction after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub kernel: String,
    pub config: LaunchConfig,
    pub split: Option<SplitK>,
}

impl LaunchPlan {
    /// Blocks of the main kernel (all slices).
    pub fn blocks(&self) -> usize {
        self.config.grid.iter().map(|&g| g as usize).product()
    }
}

/// The split-K part of a plan over a GEMM's outputs in k-tiles of `block_k`: grid z (at most one
/// slice per k-tile: none is empty; the phases' blocks in each) and the reduction `reduce_kernel`,
/// a thread per `vector` outputs (1, or 4 where the accesses allow it: its `_v4` form) from
/// `REDUCE_VECTOR_OUTPUTS` outputs, else a thread per output.
fn split_plan(gemm: Gemm, block_k: usize, slices: usize, reduce_kernel: &str, vector: usize) -> Result<SplitK> {
    if slices == 0 {
        return Err(Error::invalid("conv2d: split-K with 0 slices"));
    }
    let outputs = gemm.outputs();
    // The reductions index in 32 bits (a split's outputs fit the workspace, far below).
    if outputs > i32::MAX as usize {
        return Err(Error::invalid(format!("conv2d: split-K over {outputs} outputs (at most 2^31 - 1)")));
    }
    let k_tiles = gemm.k.div_ceil(block_k);
    let slices = slices.min(k_tiles).min(65535 / gemm.phases);
    let vector = if outputs >= REDUCE_VECTOR_OUTPUTS { vector } else { 1 };
    let blocks = (outputs / vector).div_ceil(REDUCE_THREADS as usize).clamp(1, 65535);
    Ok(SplitK {
        slices,
        k_tiles,
        workspace_bytes: slices * outputs * 4,
        reduce_kernel: if vector == 4 { format!("{reduce_kernel}_v4") } else { reduce_kernel.to_string() },
        reduce_config: LaunchConfig::linear(blocks as u32, REDUCE_THREADS),
    })
}

/// The version a launch with 16-bit weights runs when nothing forces one (the multiprocessor count
/// comes with the workspace): the wide tile where `wide` allows it (`switches::wide_conv_tiles`: by
/// default the input gradient's, not the forward's), the loads are vector ones, its grid gives every
/// SM a block and N fills its 128 columns as well as the narrow tile's 64 (Co 128, 256, 384, not 64
/// or 192); otherwise the narrow tile, split when its grid under-fills the GPU and the slices' sums
/// fit the workspace.
fn tensor_core_version(gemm: Gemm, vector: bool, wide: bool, workspace: Option<&SplitKWorkspace>) -> Conv2dVersion {
    let Some(ws) = workspace else { return Conv2dVersion::TensorCore };
    let wide_fills_n = gemm.n.div_ceil(MMA_WIDE_BLOCK_N) * 2 == gemm.n.div_ceil(MMA_BLOCK_N);
    if vector && wide && wide_fills_n && gemm.blocks(MMA_BLOCK_M, MMA_WIDE_BLOCK_N) >= ws.multiprocessors {
        return Conv2dVersion::TensorCoreWide;
    }
    split_slices(gemm.blocks(MMA_BLOCK_M, MMA_BLOCK_N), gemm, ws)
        .map_or(Conv2dVersion::TensorCore, |slices| Conv2dVersion::TensorCoreSplitK { slices })
}

/// The version an f32 launch runs (the SIMT tiles): split like the tensor cores' narrow tile when its
/// grid under-fills the GPU and the slices' sums fit the workspace.
fn simt_version(gemm: Gemm, workspace: Option<&SplitKWorkspace>) -> Conv2dVersion {
    let Some(ws) = workspace else { return Conv2dVersion::Simt };
    split_slices(gemm.blocks(SIMT_BLOCK_M, SIMT_BLOCK_N), gemm, ws)
        .map_or(Conv2dVersion::Simt, |slices| Conv2dVersion::SimtSplitK { slices })
}

/// The slices of a grid of `blocks` over a GEMM (`split_k_slices`, counted in 32-k steps for both
/// versions, so a slice has at least 128 k either way), where it splits and the slices' sums fit
/// the workspace.
fn split_slices(blocks: usize, gemm: Gemm, ws: &SplitKWorkspace) -> Option<usize> {
    let slices = split_k_slices(blocks, gemm.k.div_ceil(MMA_BLOCK_K), ws.multiprocessors);
    (slices > 1 && slices * gemm.outputs() * 4 <= ws.bytes).then_some(slices)
}

/// The workspace a split plan needs, or an error naming the sizes.
fn split_workspace(split: &SplitK, workspace: Option<&SplitKWorkspace>, op: &str) -> Result<DevicePtr> {
    match workspace {
        Some(ws) if split.workspace_bytes <= ws.bytes => Ok(ws.ptr),
        Some(ws) => Err(Error::invalid(format!(
            "{op}: split-K into {} slices needs {} bytes of workspace, the backend has {}",
            split.slices, split.workspace_bytes, ws.bytes
        ))),
        None => Err(Error::invalid(format!("{op}: split-K needs a workspace and none was given"))),
    }
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
    let mut names = Vec::new();
    for d in ["f32", "bf16", "f16"] {
        names.push(format!("conv2d_simt_{d}_{d}_{d}"));
        if d != "f32" {
            names.push(format!("conv2d_simt_f32_{d}_{d}"));
        }
        names.push(format!("conv2d_backward_input_simt_{d}"));
        if d != "f32" {
            names.push(format!("conv2d_backward_input_simt_f32_{d}_f32"));
            names.push(format!("conv2d_backward_input_simt_{d}_{d}_f32"));
        }
        names.push(format!("conv2d_simt_partial_{d}"));
        names.push(format!("conv2d_backward_input_simt_partial_{d}"));
        names.push(format!("conv2d_backward_input_narrow_f32_{d}"));
        if d != "f32" {
            names.push(format!("conv2d_backward_input_narrow_{d}_{d}"));
        }
    }
    // Split-K's reductions, which both modules' split launches use.
    for reduce in [FORWARD_REDUCE_KERNEL, BACKWARD_REDUCE_KERNEL] {
        names.extend([reduce.to_string(), format!("{reduce}_v4")]);
    }
    names
}

/// The kernel names of conv2d_mma.cu (version 2, tensor cores): forward and input gradient.
pub fn mma_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for w in ["bf16", "f16"] {
        for out in [w, "f32"] {
            names.push(format!("conv2d_mma_{w}_{w}_{out}"));
            names.push(format!("conv2d_mma_wide_{w}_{w}_{out}"));
            for input in [w, "f32"] {
                names.push(format!("conv2d_mma_gather_{input}_{w}_{out}"));
            }
        }
        for dout in ["f32", w] {
            names.push(format!("conv2d_backward_input_mma_{dout}_{w}"));
            names.push(format!("conv2d_backward_input_mma_wide_{dout}_{w}"));
            for loads in [Loads::Gather, Loads::GatherWeights] {
                let infix = loads.infix();
                names.push(format!("conv2d_backward_input_mma{infix}_{dout}_{w}"));
                names.push(format!("conv2d_backward_input_mma{infix}_partial_{dout}_{w}"));
            }
            names.push(format!("conv2d_backward_input_mma_partial_{dout}_{w}"));
        }
        // Split-K: partial sums are f32 whatever the output's type.
        names.push(format!("conv2d_mma_partial_{w}_{w}"));
        for input in [w, "f32"] {
            names.push(format!("conv2d_mma_gather_partial_{input}_{w}"));
        }
    }
    names
}

/// The split-K reductions (conv2d.cu, for both modules' split launches).
const FORWARD_REDUCE_KERNEL: &str = "conv2d_split_reduce";
const BACKWARD_REDUCE_KERNEL: &str = "conv2d_backward_input_split_reduce";

/// The kernels hot enough that ptxas must not spill in them. conv2d.cu's: the f32 path's forward
/// (and its split-K form), and conv_in's input gradient in every plan (the narrow kernel; a 16-bit
/// plan's dout in f32 or the weights' type).
pub const SIMT_HOT_KERNELS: &[&str] = &[
    "conv2d_simt_f32_f32_f32",
    "conv2d_simt_partial_f32",
    "conv2d_backward_input_narrow_f32_f32",
    "conv2d_backward_input_narrow_f32_bf16",
    "conv2d_backward_input_narrow_bf16_bf16",
    "conv2d_backward_input_narrow_f32_f16",
    "conv2d_backward_input_narrow_f16_f16",
];
/// conv2d_mma.cu's: the input gradient's (f32 gradients against 16-bit weights, what every
/// bf16/f16 plan's VJP runs) and the forwards, with their split-K forms, what the small levels run
/// at small batches.
pub const MMA_HOT_KERNELS: &[&str] = &[
    "conv2d_mma_bf16_bf16_bf16",
    "conv2d_mma_f16_f16_f16",
    "conv2d_backward_input_mma_f32_bf16",
    "conv2d_backward_input_mma_f32_f16",
    "conv2d_mma_partial_bf16_bf16",
    "conv2d_mma_partial_f16_f16",
    "conv2d_backward_input_mma_partial_f32_bf16",
    "conv2d_backward_input_mma_partial_f32_f16",
    "conv2d_mma_wide_bf16_bf16_bf16",
    "conv2d_mma_wide_f16_f16_f16",
    "conv2d_backward_input_mma_wide_f32_bf16",
    "conv2d_backward_input_mma_wide_f32_f16",
];

/// The functions of the loaded convolution modules (conv2d.cu always, conv2d_mma.cu when given).
pub struct Conv2dKernels(KernelTable);

impl Conv2dKernels {
    /// `mma_module`: the tensor-core module with the 16-bit types it was compiled for.
    pub fn load(driver: &dyn Driver, simt_module: Module, mma_module: Option<(Module, HalfTypes)>) -> Result<Self> {
        let mma = mma_module.map(|(m, halves)| (m, halves, mma_kernel_names()));
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

/// The kernels, grids and (split-K) reduction of a forward launch with `version`.
pub fn plan_conv2d(args: &Conv2dLaunch, version: Conv2dVersion) -> Result<LaunchPlan> {
    args.validate()?;
    let gemm = args.gemm();
    let (i, w, o) = (dtype_name(args.input_dtype), dtype_name(args.weight_dtype), dtype_name(args.out_dtype));
    let (name, block_m, block_n, block_k, threads, shared) = match (version, args.weight_dtype) {
        (Conv2dVersion::Simt | Conv2dVersion::SimtSplitK { .. }, _) => {
            // One storage type throughout, or (unsplit) an f32 input to 16-bit weights and output.
            let f32_input = args.input_dtype == Precision::F32 && version == Conv2dVersion::Simt;
            if (args.input_dtype != args.weight_dtype && !f32_input) || args.out_dtype != args.weight_dtype {
                return Err(Error::invalid(format!(
                    "conv2d: the SIMT kernel needs one storage type throughout, or an f32 input unsplit \
                     (got input {i}, weights {w}, output {o}, {version:?})"
                )));
            }
            let name = match version {
                Conv2dVersion::Simt => format!("conv2d_simt_{i}_{w}_{w}"),
                _ => format!("conv2d_simt_partial_{w}"),
            };
            (name, SIMT_BLOCK_M, SIMT_BLOCK_N, SIMT_BLOCK_K, SIMT_THREADS, 0)
        }
        (Conv2dVersion::Narrow { .. }, _) => {
            return Err(Error::invalid("conv2d: the narrow kernel (version 4) computes input gradients only"))
        }
        (_, Precision::F32) => {
            return Err(Error::invalid("conv2d: the tensor-core kernel needs bf16 or f16 weights, got f32"))
        }
        (_, _) => {
            let kernel = TensorCoreEntries { op: "conv2d", base: "conv2d_mma", types: format!("{i}_{w}_{o}") };
            let loads = if forward_loads_vectors(args) { Loads::Vector } else { Loads::Gather };
            let (name, block_n) = kernel.pick(version, loads, &format!("{i}_{w}"))?;
            (name, MMA_BLOCK_M, block_n, MMA_BLOCK_K, 128, forward_shared_bytes(block_n))
        }
    };
    let grid_x = gemm.m.div_ceil(block_m);
    let grid_y = gemm.n.div_ceil(block_n);
    if grid_x > i32::MAX as usize || grid_y > 65535 {
        return Err(Error::invalid(format!("conv2d: grid {grid_x} x {grid_y} too large")));
    }
    let split = match version.slices() {
        Some(slices) => Some(split_plan(gemm, block_k, slices, FORWARD_REDUCE_KERNEL, args.reduce_vector())?),
        None => None,
    };
    // The sub-pixel form's phases, then split-K's slices of each, along z.
    let grid_z = (gemm.phases * split.as_ref().map_or(1, |s| s.slices)) as u32;
    let config = LaunchConfig {
        grid: [grid_x as u32, grid_y as u32, grid_z],
        block: [threads, 1, 1],
        dynamic_shared_bytes: shared as u32,
    };
    Ok(LaunchPlan { kernel: name, config, split })
}

/// Whether the tensor-core forward loads with 16-byte cp.async: inputs in the weights' type, both
/// sources' channels multiples of 8, every tensor 16-byte aligned.
fn forward_loads_vectors(args: &Conv2dLaunch) -> bool {
    let aligned16 = [Some(args.a), args.b, Some(args.weight)].iter().flatten().all(|p| p % 16 == 0);
    args.input_dtype == args.weight_dtype
        && args.channels_a.is_multiple_of(8)
        && args.channels_b.is_multiple_of(8)
        && aligned16
}

/// How the tensor-core input gradient loads: dout by 16-byte cp.async where it comes in 16-byte
/// chunks of 4 f32 or 8 16-bit channels (never across a tap) and is aligned; the weights where
/// they have 8 input channels a chunk and are aligned.
fn backward_loads(args: &Conv2dBackwardInputLaunch) -> Loads {
    let dout_chunk = 16 / args.dout_dtype.bytes();
    let dout_vector = args.out_channels.is_multiple_of(dout_chunk) && args.dout.is_multiple_of(16);
    let weight_vector = args.in_channels.is_multiple_of(8) && args.weight.is_multiple_of(16);
    match (dout_vector, weight_vector) {
        (true, true) => Loads::Vector,
        (true, false) => Loads::GatherWeights,
        _ => Loads::Gather,
    }
}

/// How a tensor-core launch loads its operand tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loads {
    /// Both by 16-byte cp.async (`<base>_<types>`, and the wide tile's `<base>_wide_<types>`).
    Vector,
    /// The activations (dout) by cp.async, the weights element by element
    /// (`<base>_gather_w_<types>`, the input gradient only): conv_in's, Ci = 3 under a 128-channel
    /// dout, where dout is nearly all a k-step loads.
    GatherWeights,
    /// Both element by element (`<base>_gather_<types>`).
    Gather,
}

impl Loads {
    fn infix(self) -> &'static str {
        match self {
            Loads::Vector => "",
            Loads::GatherWeights => "_gather_w",
            Loads::Gather => "_gather",
        }
    }
}

/// The tensor-core entries of one op in conv2d_mma.cu: `<base><loads>_<types>` (`Loads::infix`),
/// `<base>_wide_<types>` (cp.async only), and the split-K forms
/// `<base><loads>_partial_<partial types>`.
struct TensorCoreEntries {
    op: &'static str,
    base: &'static str,
    types: String,
}

impl TensorCoreEntries {
    /// The entry `version` runs with `loads`, and its block's channels; the wide tile without the
    /// cp.async loaders is an error naming what it needs.
    fn pick(&self, version: Conv2dVersion, loads: Loads, partial_types: &str) -> Result<(String, usize)> {
        let (base, types, infix) = (self.base, &self.types, loads.infix());
        match version {
            Conv2dVersion::TensorCoreSplitK { .. } => {
                Ok((format!("{base}{infix}_partial_{partial_types}"), MMA_BLOCK_N))
            }
            Conv2dVersion::TensorCoreWide if loads != Loads::Vector => Err(Error::invalid(format!(
                "{}: the wide tensor-core tile has only the cp.async loader (16-bit inputs in the weights' type, \
                 channels multiples of 8, 16-byte aligned tensors)",
                self.op
            ))),
            Conv2dVersion::TensorCoreWide => Ok((format!("{base}_wide_{types}"), MMA_WIDE_BLOCK_N)),
            _ => Ok((format!("{base}{infix}_{types}"), MMA_BLOCK_N)),
        }
    }
}

/// The version `launch_conv2d` runs: tensor cores for bf16/f16 weights, the SIMT kernel for f32
/// (and for bf16/f16 throughout when conv2d_mma.cu is not loaded); either split-K when its grid
/// under-fills the GPU and a workspace holds the slices.
pub fn conv2d_version(
    args: &Conv2dLaunch,
    has_tensor_cores: bool,
    workspace: Option<&SplitKWorkspace>,
) -> Conv2dVersion {
    let gemm = args.gemm();
    if args.weight_dtype == Precision::F32 || !has_tensor_cores {
        return simt_version(gemm, workspace);
    }
    if args.input_dtype == Precision::F32 && small_gather(gemm, workspace) {
        return Conv2dVersion::Simt;
    }
    tensor_core_version(gemm, forward_loads_vectors(args), switches::wide_conv_tiles().forward, workspace)
}

/// Whether a 16-bit convolution with an f32 operand (conv_in reading x_t; conv_out's input gradient
/// into its f32 dx) runs the SIMT kernel, which rounds that operand to the weights' type as the
/// tensor cores do (the same products; only the order of the f32 sums differs): where the tensor
/// cores' element-wise gather would leave SMs idle and, with one k-step (27: 3 channels x 9 taps),
/// split-K cannot fill them. At batch 1 conv_in's gather was 16 blocks each 3360 warp-instructions
/// deep (every element rounded and stored to shared one at a time), the slowest launch of the
/// forward in the latency model (29.5 us; the SIMT tile, 32 blocks, 8.5 us:
/// examples/emulator_launch_depth.rs); on grids that fill the GPU the gather's tensor cores win
/// (at batch 256 its instruction count is about a third of the SIMT kernel's).
fn small_gather(gemm: Gemm, workspace: Option<&SplitKWorkspace>) -> bool {
    let blocks = gemm.blocks(MMA_BLOCK_M, MMA_BLOCK_N);
    gemm.k <= MMA_BLOCK_K && workspace.is_some_and(|ws| blocks < ws.multiprocessors)
}

/// Runs the convolution with the fastest loaded kernel for its storage types (`conv2d_version`).
pub fn launch_conv2d(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dLaunch,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    let version = conv2d_version(args, kernels.has_tensor_cores(), workspace);
    launch_conv2d_version(driver, kernels, args, version, workspace)
}

/// Runs the convolution with a chosen kernel version (tests and benchmarks compare them); split-K
/// needs a workspace that holds its slices.
pub fn launch_conv2d_version(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dLaunch,
    version: Conv2dVersion,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    let plan = plan_conv2d(args, version)?;
    let function = kernels.get(&plan.kernel)?;
    let params = args.params_bytes(false);
    let Some(split) = &plan.split else {
        let kernel_args = KernelArgs::new()
            .ptr(args.a)
            .ptr(args.b.unwrap_or(0))
            .ptr(args.weight)
            .ptr(args.bias.unwrap_or(0))
            .ptr(args.channel_bias.unwrap_or(0))
            .ptr(args.residual.unwrap_or(0))
            .ptr(args.out)
            .bytes(&params);
        driver.launch(function, plan.config, &kernel_args)?;
        return Ok(());
    };
    let partials = split_workspace(split, workspace, "conv2d")?;
    let reduce = kernels.get(&split.reduce_kernel)?;
    let partial_args =
        KernelArgs::new().ptr(args.a).ptr(args.b.unwrap_or(0)).ptr(args.weight).ptr(partials).bytes(&params);
    let reduce_args = KernelArgs::new()
        .ptr(partials)
        .i32(split.slices as i32)
        .ptr(args.bias.unwrap_or(0))
        .ptr(args.channel_bias.unwrap_or(0))
        .ptr(args.residual.unwrap_or(0))
        .ptr(args.out)
        .i32(super::dtype_code(args.out_dtype))
        .bytes(&params);
    // Both launches belong to this one op: a profiler's events around the op time them together.
    driver.launch(function, plan.config, &partial_args)?;
    driver.launch(reduce, split.reduce_config, &reduce_args)?;
    Ok(())
}

/// The kernel a launch would use (for reports and tests).
pub fn kernel_for(args: &Conv2dLaunch, version: Conv2dVersion) -> Result<String> {
    Ok(plan_conv2d(args, version)?.kernel)
}

/// The input gradient of a convolution: `dx = ` (or `+=`) the transposed convolution of `dout` with the
/// weights, dx the logical input (a concat's both parts, a folded upsample's full size: the caller
/// splits and folds), or in the sub-pixel form (`subpixel`) the stored input itself. dout and dx NHWC, weights `[Co][kh][kw][Ci]`. Storage types: f32 weights
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
    /// The gradient of `Upsampling::SubPixel`'s forward (3x3 kernel, stride 1, padding 1, weights in
    /// the sub-pixel form): dx H x W, dout 2H x 2W.
    pub subpixel: bool,
}

impl Conv2dBackwardInputLaunch {
    /// Elements a thread of the split-K reduction takes: 4 (`_v4`) where dx's count and address
    /// allow 4-element accesses, else 1.
    fn reduce_vector(&self) -> usize {
        let elements = self.batch * self.height * self.width * self.in_channels;
        let vector = elements.is_multiple_of(4) && self.dx.is_multiple_of(4 * self.dx_dtype.bytes() as u64);
        if vector {
            4
        } else {
            1
        }
    }

    /// The forward this is the gradient of (its dims and pointer checks are the same; dx plays the
    /// input, dout the output).
    fn forward(&self) -> Conv2dLaunch {
        Conv2dLaunch {
            batch: self.batch,
            height: self.height,
            width: self.width,
            channels_a: self.in_channels,
            channels_b: 0,
            upsample: if self.subpixel { Upsampling::SubPixel } else { Upsampling::None },
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
            channel_bias_stride: self.out_channels,
            residual: None,
            out: self.dout,
        }
    }
    pub fn output_size(&self) -> (usize, usize) {
        self.forward().output_size()
    }
    /// The implicit GEMM: M = dx's positions, N = its channels, K = the taps (16 in the sub-pixel
    /// form) x dout's channels.
    pub fn gemm(&self) -> Gemm {
        let taps = if self.subpixel { SUBPIXEL_PHASES * SUBPIXEL_TAPS } else { self.kernel_h * self.kernel_w };
        let m = self.batch * self.height * self.width;
        Gemm { m, n: self.in_channels, k: taps * self.out_channels, phases: 1 }
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

/// The kernels, grid and (split-K) reduction of an input gradient with `version`.
pub fn plan_conv2d_backward_input(args: &Conv2dBackwardInputLaunch, version: Conv2dVersion) -> Result<LaunchPlan> {
    args.validate()?;
    if let Conv2dVersion::Narrow { pixels_per_warp } = version {
        return plan_narrow_backward_input(args, pixels_per_warp);
    }
    let (d, w, x) = (dtype_name(args.dout_dtype), dtype_name(args.weight_dtype), dtype_name(args.dx_dtype));
    let (name, block_m, block_n, block_k, threads, shared) = match (version, args.weight_dtype) {
        (Conv2dVersion::Simt | Conv2dVersion::SimtSplitK { .. }, _) => {
            // One storage type throughout, or (unsplit) an f32 dx with 16-bit weights (validate
            // has checked that dout is f32 or the weights' type).
            let f32_dx = args.dx_dtype == Precision::F32 && version == Conv2dVersion::Simt;
            let one_type = args.dout_dtype == args.weight_dtype && args.dx_dtype == args.weight_dtype;
            if !one_type && !f32_dx {
                return Err(Error::invalid(format!(
                    "conv2d backward input: the SIMT kernel needs one storage type throughout, or an f32 \
                     dx unsplit (got dout {d}, weights {w}, dx {x}, {version:?}); the tensor-core kernel \
                     takes f32 gradients"
                )));
            }
            let name = match version {
                Conv2dVersion::Simt if !one_type => format!("conv2d_backward_input_simt_{d}_{w}_f32"),
                Conv2dVersion::Simt => format!("conv2d_backward_input_simt_{w}"),
                _ => format!("conv2d_backward_input_simt_partial_{w}"),
            };
            (name, SIMT_BLOCK_M, SIMT_BLOCK_N, SIMT_BLOCK_K, SIMT_THREADS, 0)
        }
        (_, Precision::F32) => {
            return Err(Error::invalid(
                "conv2d backward input: the tensor-core kernel needs bf16 or f16 weights, got f32",
            ))
        }
        (_, _) => {
            let types = format!("{d}_{w}");
            let kernel = TensorCoreEntries {
                op: "conv2d backward input",
                base: "conv2d_backward_input_mma",
                types: types.clone(),
            };
            let (name, block_n) = kernel.pick(version, backward_loads(args), &types)?;
            (name, MMA_BLOCK_M, block_n, MMA_BLOCK_K, 128, backward_shared_bytes(block_n))
        }
    };
    let gemm = args.gemm();
    let grid = [gemm.m.div_ceil(block_m), gemm.n.div_ceil(block_n)];
    if grid[0] > i32::MAX as usize || grid[1] > 65535 {
        return Err(Error::invalid(format!("conv2d backward input: grid {} x {} too large", grid[0], grid[1])));
    }
    let split = match version.slices() {
        Some(slices) => Some(split_plan(gemm, block_k, slices, BACKWARD_REDUCE_KERNEL, args.reduce_vector())?),
        None => None,
    };
    let config = LaunchConfig {
        grid: [grid[0] as u32, grid[1] as u32, split.as_ref().map_or(1, |s| s.slices as u32)],
        block: [threads, 1, 1],
        dynamic_shared_bytes: shared as u32,
    };
    Ok(LaunchPlan { kernel: name, config, split })
}

/// Why the narrow kernel cannot take an input gradient, or None where it can.
fn narrow_problem(args: &Conv2dBackwardInputLaunch) -> Option<String> {
    if args.subpixel {
        Some("the sub-pixel form".into())
    } else if args.in_channels > NARROW_CHANNELS {
        Some(format!("{} input channels (at most {NARROW_CHANNELS})", args.in_channels))
    } else if args.out_channels < NARROW_MIN_DOUT_CHANNELS {
        Some(format!("{} output channels (at least {NARROW_MIN_DOUT_CHANNELS})", args.out_channels))
    } else if !args.out_channels.is_multiple_of(4) || !args.dout.is_multiple_of(4 * args.dout_dtype.bytes() as u64) {
        Some(format!("{} output channels at {:#x} (4-channel loads)", args.out_channels, args.dout))
    } else if args.kernel_h > NARROW_KERNEL || args.kernel_w > NARROW_KERNEL {
        Some(format!("a {}x{} kernel (at most {NARROW_KERNEL}x{NARROW_KERNEL})", args.kernel_h, args.kernel_w))
    } else if narrow_shared_bytes(args) > DEFAULT_SHARED_LIMIT {
        Some(format!(
            "{} output channels (its weights would need {} bytes of shared memory)",
            args.out_channels,
            narrow_shared_bytes(args)
        ))
    } else {
        None
    }
}

/// The narrow kernel's weights in shared memory: f32, taps x 4 rows of Co.
fn narrow_shared_bytes(args: &Conv2dBackwardInputLaunch) -> usize {
    args.kernel_h * args.kernel_w * NARROW_CHANNELS * args.out_channels * 4
}

/// Pixels a warp of the narrow kernel takes: as many as leave two blocks an SM (all of them busy
/// first), at most 16; one where the grid cannot fill the GPU anyway. A block stages the weights
/// once for all its warps' pixels, so more pixels a warp are fewer stagings.
fn narrow_pixels_per_warp(positions: usize, multiprocessors: usize) -> usize {
    (positions / (NARROW_WARPS * 2 * multiprocessors.max(1))).clamp(1, NARROW_MAX_PIXELS_PER_WARP)
}

fn plan_narrow_backward_input(args: &Conv2dBackwardInputLaunch, pixels_per_warp: usize) -> Result<LaunchPlan> {
    if let Some(problem) = narrow_problem(args) {
        return Err(Error::invalid(format!("conv2d backward input: the narrow kernel cannot take {problem}")));
    }
    if !(1..=NARROW_MAX_PIXELS_PER_WARP).contains(&pixels_per_warp) {
        return Err(Error::invalid(format!(
            "conv2d backward input: the narrow kernel takes 1 to {NARROW_MAX_PIXELS_PER_WARP} pixels a warp, got {pixels_per_warp}"
        )));
    }
    let blocks = args.gemm().m.div_ceil(NARROW_WARPS * pixels_per_warp);
    if blocks > i32::MAX as usize {
        return Err(Error::invalid(format!("conv2d backward input: grid {blocks} too large")));
    }
    let (d, w) = (dtype_name(args.dout_dtype), dtype_name(args.weight_dtype));
    Ok(LaunchPlan {
        kernel: format!("conv2d_backward_input_narrow_{d}_{w}"),
        config: LaunchConfig {
            grid: [blocks as u32, 1, 1],
            block: [NARROW_THREADS, 1, 1],
            dynamic_shared_bytes: narrow_shared_bytes(args) as u32,
        },
        split: None,
    })
}

/// The version `launch_conv2d_backward_input` runs: the narrow kernel for layers it takes (at
/// most 4 input channels), tensor cores for bf16/f16 weights (f32 or 16-bit dout and dx), the SIMT
/// kernel for f32 (and for one 16-bit type throughout when conv2d_mma.cu is not loaded); either
/// split-K when its grid under-fills the GPU and a workspace holds the slices.
pub fn conv2d_backward_input_version(
    args: &Conv2dBackwardInputLaunch,
    has_tensor_cores: bool,
    workspace: Option<&SplitKWorkspace>,
) -> Conv2dVersion {
    let gemm = args.gemm();
    if narrow_problem(args).is_none() {
        let multiprocessors = workspace.map_or(NARROW_DEFAULT_MULTIPROCESSORS, |ws| ws.multiprocessors);
        return Conv2dVersion::Narrow { pixels_per_warp: narrow_pixels_per_warp(gemm.m, multiprocessors) };
    }
    if args.weight_dtype == Precision::F32 || !has_tensor_cores {
        return simt_version(gemm, workspace);
    }
    // (Whatever dout's type: a rounded dout must give the same bits, so the same kernel.)
    if args.dx_dtype == Precision::F32 && small_gather(gemm, workspace) {
        return Conv2dVersion::Simt;
    }
    tensor_core_version(gemm, backward_loads(args) == Loads::Vector, switches::wide_conv_tiles().backward, workspace)
}

/// dx = (or +=) conv2d's vector-Jacobian product with respect to its input, with the fastest loaded
/// kernel (`conv2d_backward_input_version`).
pub fn launch_conv2d_backward_input(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dBackwardInputLaunch,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    let version = conv2d_backward_input_version(args, kernels.has_tensor_cores(), workspace);
    launch_conv2d_backward_input_version(driver, kernels, args, version, workspace)
}

/// The input gradient with a chosen kernel version (tests compare them); split-K needs a
/// workspace that holds its slices.
pub fn launch_conv2d_backward_input_version(
    driver: &dyn Driver,
    kernels: &Conv2dKernels,
    args: &Conv2dBackwardInputLaunch,
    version: Conv2dVersion,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    let plan = plan_conv2d_backward_input(args, version)?;
    let function = kernels.get(&plan.kernel)?;
    let params = args.forward().params_bytes(true);
    let kernel_args = match (version, &plan.split) {
        (Conv2dVersion::Simt, None) => {
            KernelArgs::new().ptr(args.dout).ptr(args.weight).ptr(args.dx).bytes(&params).i32(args.accumulate as i32)
        }
        (Conv2dVersion::Narrow { pixels_per_warp }, None) => KernelArgs::new()
            .ptr(args.dout)
            .ptr(args.weight)
            .ptr(args.dx)
            .i32(super::dtype_code(args.dx_dtype))
            .bytes(&params)
            .i32(args.accumulate as i32)
            .i32(pixels_per_warp as i32),
        (_, None) => KernelArgs::new()
            .ptr(args.dout)
            .ptr(args.weight)
            .ptr(args.dx)
            .i32(super::dtype_code(args.dx_dtype))
            .bytes(&params)
            .i32(args.accumulate as i32),
        (_, Some(split)) => {
            let partials = split_workspace(split, workspace, "conv2d backward input")?;
            let reduce = kernels.get(&split.reduce_kernel)?;
            let partial_args = KernelArgs::new().ptr(args.dout).ptr(args.weight).ptr(partials).bytes(&params);
            let total = args.batch * args.height * args.width * args.in_channels;
            let reduce_args = KernelArgs::new()
                .ptr(partials)
                .i32(split.slices as i32)
                .u64(total as u64)
                .ptr(args.dx)
                .i32(super::dtype_code(args.dx_dtype))
                .i32(args.accumulate as i32);
            // Both launches belong to this one op: a profiler's events around the op time them together.
            driver.launch(function, plan.config, &partial_args)?;
            driver.launch(reduce, split.reduce_config, &reduce_args)?;
            return Ok(());
        }
    };
    driver.launch(function, plan.config, &kernel_args)?;
    Ok(())
}

/// The kernel an input gradient would use (for reports and tests).
pub fn backward_input_kernel_for(args: &Conv2dBackwardInputLaunch, version: Conv2dVersion) -> Result<String> {
    Ok(plan_conv2d_backward_input(args, version)?.kernel)
}
