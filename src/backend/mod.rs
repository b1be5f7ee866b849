//! The backend interface: every computation of the engine (the UNet, the classifiers, the sampler,
//! the guidance and the attacks) is written once over this trait.
//!
//! Shaped for a GPU:
//! - tensors live in the backend's own memory (`Backend::Tensor`) and cross to the host only at the
//!   edges (`upload`, `download`);
//! - every op writes into an output the caller allocated once, in a plan made per (config, batch),
//!   never allocating per call;
//! - ops are coarse enough to be single fused kernels: GroupNorm+SiLU, a convolution with its bias,
//!   per-sample channel bias (the time embedding), residual and ReLU epilogue, a whole attention;
//! - backward ops write their input gradients or accumulate into them (`GradientStore`): the first
//!   gradient to reach a tensor writes it (no zeroing pass), the others add to it where gradients
//!   meet (skip connections, residuals, shortcuts).
//!
//! - each tensor knows its storage type (`TensorShape::dtype`): f32, f16 or bf16, chosen per tensor
//!   by the plan (activations in `Backend::precision`; x_t, noise, gradients, norm statistics and
//!   log-sum-exp always f32); ops compute in f32 and round once when they store;
//! - ops return nothing: a launch error is stored and reported by `synchronize`, which every public
//!   entry point of the engine calls before it returns;
//! - timing goes through `timestamp` / `elapsed_ms` (device events on a GPU), not host clocks;
//! - per-step scalars are read from a step table through a device cursor (`StepColumn`,
//!   `StepSource`), and a whole step can be recorded once and replayed (`begin_capture`,
//!   `end_capture`, `replay`: a CUDA graph; the CPU runs eagerly).
//!
//! Shapes are given in NCHW / OIHW order; how a backend stores them (NHWC, ...) is its own business.
//!
//! The reference implementation is `cpu::CpuBackend` (plain f32, the spec).

pub mod cpu;
pub mod cuda;
pub mod profiled;

use crate::error::Result;

/// Storage type of a tensor (and the precision a backend's plans choose for activations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// What every backend tensor can say about itself.
pub trait TensorShape {
    fn shape(&self) -> &[usize];
    /// The storage type of the elements.
    fn dtype(&self) -> Precision;
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
}

/// Geometry of a 2-D convolution. Padding is per side (top, left, bottom, right) because the UNet's
/// Downsample pads only right and bottom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl Conv2dGeometry {
    /// Stride 1, the same padding on every side ("same" for 3x3 with pad 1, 1x1 with pad 0).
    pub const fn same(pad: usize) -> Self {
        Self::strided(1, pad)
    }
    pub const fn strided(stride: usize, pad: usize) -> Self {
        Self { stride, pad_top: pad, pad_left: pad, pad_bottom: pad, pad_right: pad }
    }
    /// Output spatial size for an input of `h` x `w` and a `kh` x `kw` kernel.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        let oh = (h + self.pad_top + self.pad_bottom - kh) / self.stride + 1;
        let ow = (w + self.pad_left + self.pad_right - kw) / self.stride + 1;
        (oh, ow)
    }
}

/// The input of a convolution or a GroupNorm as the kernels read it: the channel concatenation of
/// `a` and `b` (`b` the UNet's skip connection; `None`: `a` alone), optionally nearest-x2
/// upsampled (the UNet's Upsample, convolutions only). A GPU folds both into its input indexing,
/// so no concatenated or upsampled tensor is ever written.
pub struct LayerInput<'a, T> {
    pub a: &'a T,
    pub b: Option<&'a T>,
    pub upsample2x: bool,
}

impl<T> Clone for LayerInput<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for LayerInput<'_, T> {}

impl<'a, T: TensorShape> LayerInput<'a, T> {
    /// One tensor, read as it is.
    pub fn one(a: &'a T) -> Self {
        Self { a, b: None, upsample2x: false }
    }
    /// concat(a, b) along channels.
    pub fn concat(a: &'a T, b: &'a T) -> Self {
        Self { a, b: Some(b), upsample2x: false }
    }
    /// The nearest-x2 upsampling of `a`.
    pub fn upsampled(a: &'a T) -> Self {
        Self { a, b: None, upsample2x: true }
    }
    /// The logical NCHW shape read (channels of both sources, upsampled size), or a message
    /// naming what does not fit (sources that differ outside channels, a rank other than 4).
    pub fn logical_shape(&self) -> std::result::Result<[usize; 4], String> {
        let &[n, c, h, w] = self.a.shape() else {
            return Err(format!("expected an N x C x H x W input, got shape {:?}", self.a.shape()));
        };
        let mut channels = c;
        if let Some(b) = self.b {
            match *b.shape() {
                [bn, bc, bh, bw] if (bn, bh, bw) == (n, h, w) => channels += bc,
                _ => {
                    return Err(format!(
                        "concat of {:?} and {:?}: they differ outside channels",
                        self.a.shape(),
                        b.shape()
                    ))
                }
            }
        }
        let scale = if self.upsample2x { 2 } else { 1 };
        Ok([n, channels, h * scale, w * scale])
    }
}

/// Where a backward op puts the gradient of the `LayerInput` it read (not upsampled): `a`'s
/// channels into `a`, a concat's other channels into `b`, each written or added as its
/// `GradientStore` says, with `plus` (a gradient of the whole input that reached it by another
/// path: a residual's, a shortcut's) added on the way. A GPU folds the split and the sum into its
/// stores, so no concatenated gradient is written and no pass of its own adds the two paths.
pub struct LayerGradient<'a, T> {
    pub a: &'a mut T,
    pub a_store: GradientStore,
    pub b: Option<(&'a mut T, GradientStore)>,
    /// Same shape as the whole input (both sources' channels).
    pub plus: Option<&'a T>,
    /// A copy of what `a` holds afterwards, in the copy's own storage type: where this is the last
    /// gradient to reach `a`, the UNet keeps it rounded to the activations' type for the
    /// convolutions that read it next (their 16-bit operand path), at no pass of its own.
    pub a_copy: Option<&'a mut T>,
}

impl<'a, T> LayerGradient<'a, T> {
    /// One tensor's gradient.
    pub fn one(a: &'a mut T, store: GradientStore) -> Self {
        Self { a, a_store: store, b: None, plus: None, a_copy: None }
    }
    /// The gradient of concat(a, b), split into its two sources.
    pub fn concat(a: &'a mut T, a_store: GradientStore, b: &'a mut T, b_store: GradientStore) -> Self {
        Self { a, a_store, b: Some((b, b_store)), plus: None, a_copy: None }
    }
    /// The same, with `plus` added to what is stored.
    pub fn plus(self, plus: &'a T) -> Self {
        Self { plus: Some(plus), ..self }
    }
    /// The same, with `a`'s final value copied into `copy` too (where `copy` is `Some`).
    pub fn copy_a_into(self, copy: Option<&'a mut T>) -> Self {
        Self { a_copy: copy, ..self }
    }
}

/// What a convolution adds to its output before writing it:
/// `out = relu?(conv(x) + bias[c] + channel_bias[n, column + c] + residual[n, c, y, x])`.
pub struct ConvEpilogue<'a, T> {
    /// Per-sample, per-output-channel bias, f32 N x W, its columns `channel_bias_column` to
    /// `channel_bias_column + C_out` (W = C_out, column 0: a tensor of its own): the ResnetBlock's
    /// time-embedding projection, every block's in one tensor that one launch computes.
    pub channel_bias: Option<&'a T>,
    pub channel_bias_column: usize,
    /// Added element-wise (same shape as the output): the residual branch.
    pub residual: Option<&'a T>,
    /// Apply ReLU last (the classifiers' conv-bn-relu, with batch-norm folded into the conv).
    pub relu: bool,
}

impl<T> Default for ConvEpilogue<'_, T> {
    fn default() -> Self {
        Self { channel_bias: None, channel_bias_column: 0, residual: None, relu: false }
    }
}

/// Scratch the plan provides to one attention backward (nothing is allocated inside a reverse
/// step: graph capture); its contents afterwards are unspecified.
pub struct AttentionScratch<'a, T> {
    /// N x HW f32, the log-sum-exp's shape: a GPU keeps each query's D_i = dout_i . out_i there.
    pub row_terms: &'a mut T,
    /// q's shape and storage type: a GPU keeps dout rounded to it once there, the operand its
    /// tensor cores stream (a backend that reads dout as it is, the CPU or f32 storage, checks it
    /// and leaves it alone).
    pub dout_rounded: &'a mut T,
}

/// Scalars of one DDPM reverse step t -> t-1 (METHOD.md section 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    /// sqrt(abar_t)
    pub sqrt_abar: f32,
    /// sqrt(1 - abar_t)
    pub sqrt_one_minus_abar: f32,
    /// c0_t: weight of x0_hat in the posterior mean.
    pub c0: f32,
    /// ct_t: weight of x_t in the posterior mean.
    pub ct: f32,
}

/// Columns of a step table: the per-step scalars of a purification, one row per step, in a backend
/// tensor (rows x `STEP_COLUMNS`, f32) written once per purification, so that a reverse step
/// sends nothing from the host and every launch of a step has the same arguments at every step
/// (what a recorded CUDA graph needs). Ops read row `cursor[0]` (`StepSource`); the cursor is a
/// one-element f32 tensor the step advances itself (`Backend::advance_step_cursor`).
///
/// The sampler's table (src/diffusion/step_table.rs) has the diffusion to t* in row 0 and the
/// reverse steps, in the order they run, in rows 1.. . Integers (the UNet's step index, the noise's seed and stream) are stored exactly: 64-bit values
/// as four 16-bit pieces, low first. kernels/diffusion.cu has the same numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum StepColumn {
    /// sqrt(abar_t)
    SqrtAbar = 0,
    /// sqrt(1 - abar_t)
    SqrtOneMinusAbar = 1,
    /// c0_t, the weight of x0_hat in the posterior mean.
    C0 = 2,
    /// ct_t, the weight of x_t in the posterior mean.
    Ct = 3,
    /// sigma_t of the fresh noise (0: none; the noise of `q_sample` is scaled by `SqrtOneMinusAbar`).
    NoiseStd = 4,
    /// The UNet's 0-based step index t - 1 (`step_unet_indices`).
    UnetStep = 5,
    /// The noise's seed, four 16-bit pieces (columns 6..=9).
    Seed = 6,
    /// The noise's Philox stream, four 16-bit pieces (columns 10..=13).
    Stream = 10,
    /// Free for the caller's own per-step weights (`axpby_step`): the sampler keeps its guidance
    /// factors there (src/diffusion/step_table.rs).
    User0 = 14,
    User1 = 15,
    User2 = 16,
    User3 = 17,
    /// Always 0 and 1: weights for `axpby_step` that do not change with the step.
    Zero = 18,
    One = 19,
}

/// Floats per step-table row.
pub const STEP_COLUMNS: usize = 20;

/// The sub-pixel form of a 3x3, padding-1 convolution of a nearest-x2 upsampled input
/// (`Backend::upsample_conv2d`), from its weights `w` (Co x Ci x 3 x 3, row-major): Co x Ci x 4 x 4,
/// element [co, ci, phase, tap] with phase = 2 py + px the output pixel's parity (2i + py, 2j + px)
/// and tap = 2 ty + tx the input pixel (i - 1 + py + ty, j - 1 + px + tx) it reads. The upsampled
/// rows 2i + py - 1 .. 2i + py + 1 land on input rows i - 1 + py and i + py: the first takes kernel
/// row 0 alone where py = 0 (rows 0 and 1 where py = 1), the second the rest; the same in x. So
/// each phase's tap sums the 3x3 taps landing on its pixel, in f32 (its one rounding, to the
/// storage type, comes when it is uploaded).
pub fn subpixel_weights(w: &[f32], out_channels: usize, in_channels: usize) -> Vec<f32> {
    assert_eq!(w.len(), out_channels * in_channels * 9, "subpixel_weights: Co x Ci x 3 x 3 weights");
    // Kernel rows (or columns) of parity p's window row (column) t.
    let rows = |p: usize, t: usize| match (p, t) {
        (0, 0) => 0..1,
        (0, _) => 1..3,
        (_, 0) => 0..2,
        _ => 2..3,
    };
    let mut out = vec![0.0f32; out_channels * in_channels * 16];
    for (k, kernel) in w.chunks_exact(9).enumerate() {
        for (phase, tap) in (0..4).flat_map(|phase| (0..4).map(move |tap| (phase, tap))) {
            let (py, px, ty, tx) = (phase / 2, phase % 2, tap / 2, tap % 2);
            let sum: f32 = rows(py, ty).flat_map(|ky| rows(px, tx).map(move |kx| kernel[ky * 3 + kx])).sum();
            out[k * 16 + phase * 4 + tap] = sum;
        }
    }
    out
}

/// The 64-bit `value` as the four exact 16-bit pieces a step table stores (low first).
pub fn step_table_u64(value: u64) -> [f32; 4] {
    std::array::from_fn(|k| ((value >> (16 * k)) & 0xffff) as f32)
}

/// Where a table-driven op finds its step's scalars: row `cursor[0]` of `table`.
pub struct StepSource<'a, T> {
    pub table: &'a T,
    pub cursor: &'a T,
}

impl<T> Clone for StepSource<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for StepSource<'_, T> {}

/// The graph type of a backend that records none (`Backend::begin_capture` says false): it has
/// no values.
#[derive(Debug)]
pub enum NoGraph {}

/// Image indices (`Backend::fill_gaussian`) live in f32 tensors, which hold every integer below
/// 2^24 exactly: a run may hold at most this many images.
pub const IMAGE_INDEX_LIMIT: u64 = 1 << 24;

/// A point on a backend's timeline, from `Backend::timestamp`.
#[derive(Clone, Copy, Debug)]
pub enum Timestamp {
    /// A host clock reading (a synchronous backend: the op has finished when the call returns).
    Host(std::time::Instant),
    /// A device event recorded in the stream.
    Device(crate::driver::Event),
}

/// What one kernel file costs to make ready on a device (`Backend::kernel_start_up`), in seconds.
#[derive(Clone, Debug)]
pub struct KernelFileStartUp {
    /// e.g. "conv2d_mma.cu".
    pub file: String,
    /// NVRTC compiling it from source (no cache, neither ours nor NVRTC's), beside the other
    /// files as a first run compiles them.
    pub compile_s: f64,
    /// Reading its image back from the on-disk cache (checksum verified); `None` when the cache
    /// is off (`PURIFIER_KERNEL_CACHE=off`) or cannot be written.
    pub cache_read_s: Option<f64>,
    /// Loading the image on the device (the driver's module load).
    pub load_s: f64,
    /// The image's size in bytes.
    pub image_bytes: usize,
}

/// A backend's kernel start-up, file by file: cold (compiled by NVRTC) against warm (read from
/// the cache), each with the device's module load.
#[derive(Clone, Debug)]
pub struct KernelStartUp {
    pub files: Vec<KernelFileStartUp>,
    /// Wall-clock seconds of compiling every file side by side, `compile_workers` at once, as a
    /// first run does (the slowest file, where the host has a core for each).
    pub cold_compile_wall_s: f64,
    pub compile_workers: usize,
}

impl KernelStartUp {
    /// Every file compiled and loaded: a first run's start-up, or any run with the cache off.
    pub fn cold_s(&self) -> f64 {
        self.cold_compile_wall_s + self.files.iter().map(|f| f.load_s).sum::<f64>()
    }

    /// NVRTC's seconds summed over the files (each timed beside the others).
    pub fn compile_sum_s(&self) -> f64 {
        self.files.iter().map(|f| f.compile_s).sum()
    }
    /// Every file read from the cache and loaded; `None` unless every file was cached.
    pub fn warm_s(&self) -> Option<f64> {
        self.files.iter().map(|f| f.cache_read_s.map(|read| read + f.load_s)).sum()
    }
}

/// An open range of work (`Backend::range_push`), closed when dropped.
pub struct Range<'a, B: Backend + ?Sized>(&'a B);

impl<B: Backend + ?Sized> Drop for Range<'_, B> {
    fn drop(&mut self) {
        self.0.range_pop();
    }
}

/// Opens a range named `name` on `b` until the returned guard is dropped.
pub fn range<'a, B: Backend + ?Sized>(b: &'a B, name: &str) -> Range<'a, B> {
    b.range_push(name);
    Range(b)
}

/// How a backward op stores into an input-gradient buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientStore {
    /// Overwrite it: the first gradient to reach the tensor. Its old contents are never read, so
    /// the buffer needs no zeroing.
    Write,
    /// Accumulate (`dx += ...`): where a gradient meets another already stored.
    Add,
}

impl GradientStore {
    pub fn accumulates(self) -> bool {
        self == GradientStore::Add
    }
}

/// The compute interface. All tensors are `Self::Tensor`. Scalars that change from one reverse
/// step to the next come from a step table in the backend (`StepSource`), so that a step's
/// launches are the same at every step; scalars fixed for a run (the guidance's lambdas, kappa,
/// clamp bounds) come from the host.
pub trait Backend {
    type Tensor: TensorShape;
    /// A recorded sequence of ops that can be run again (a CUDA graph); `NoGraph` where the
    /// backend runs everything eagerly.
    type Graph;

    /// A short human-readable name, e.g. "cpu (2 threads)".
    fn name(&self) -> String;
    /// The storage type the backend's plans give activations (the network's weights and
    /// intermediate tensors); x_t, noise, gradients and statistics stay f32.
    fn precision(&self) -> Precision;
    /// Bytes of memory free for new tensors, when the backend can tell (plans check it before
    /// allocating, so a batch too large is an error, not a crash).
    fn available_memory(&self) -> Option<usize>;
    /// The most bytes of device memory this backend has held in tensors at once, when it counts
    /// them (the CUDA backend does; the CPU's tensors are ordinary host memory).
    fn peak_memory(&self) -> Option<usize> {
        None
    }
    /// Starts a new `peak_memory` from what is held now.
    fn reset_peak_memory(&self) {}

    /// Waits for the work issued so far and reports the first error stored since the last call
    /// (a kernel fault, a launch the device refused). Every public entry point calls it before
    /// returning, so an error surfaces where it happened, not at a later download.
    fn synchronize(&self) -> Result<()>;
    /// The current point of the backend's timeline (a device event on a GPU).
    fn timestamp(&self) -> Result<Timestamp>;
    /// Milliseconds between two timestamps of this backend (synchronises first where needed).
    fn elapsed_ms(&self, start: &Timestamp, end: &Timestamp) -> Result<f64>;
    /// Frees what a timestamp holds (a device event); it must not be used after. A no-op for
    /// host clock readings.
    fn release_timestamp(&self, _timestamp: Timestamp) {}
    /// The measured dense bf16 tensor-core throughput of the device (FLOP/s), the compute ceiling
    /// of the benchmark's roofline; `None` for a backend without tensor cores (the CPU).
    fn tensor_core_peak(&self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// Makes every kernel ready now, measuring the cost file by file: each compiled from source
    /// (the cold start), then read back from the disk cache where it is on (the warm start), and
    /// loaded on the device once. Call it before anything else runs on the backend (a file already
    /// loaded is an error). `None` where nothing is compiled at run time (the CPU).
    fn kernel_start_up(&self) -> Result<Option<KernelStartUp>> {
        Ok(None)
    }

    /// Opens a named range of work (an NVTX range on a GPU, so Nsight shows sampler steps and
    /// network layers by name); a no-op by default. Prefer `backend::range`, which closes it.
    fn range_push(&self, _name: &str) {}
    /// Closes the innermost range `range_push` opened.
    fn range_pop(&self) {}

    // ---- graphs: a whole reverse step recorded once and replayed ----
    /// Starts recording the ops issued from now on instead of running them, where the backend can
    /// replay recordings; returns false (and records nothing) where it cannot, as on the CPU.
    /// While recording, nothing may cross to or from the host (`write`, `download`, `timestamp`).
    fn begin_capture(&self) -> Result<bool>;
    /// Ends the recording `begin_capture` started (an error if none is under way).
    fn end_capture(&self) -> Result<Self::Graph>;
    /// Issues a recording again: the same ops, on the same tensors, with the same arguments.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;

    // ---- memory: the only host <-> device crossings ----
    /// A zero-filled f32 tensor. Called when plans are made, never inside a step.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor> {
        self.zeros_as(shape, Precision::F32)
    }
    /// A zero-filled tensor of storage type `dtype`.
    fn zeros_as(&self, shape: &[usize], dtype: Precision) -> Result<Self::Tensor>;
    /// A new f32 tensor holding `data` (row-major in `shape`).
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.upload_as(data, shape, Precision::F32)
    }
    /// A new tensor of storage type `dtype` holding `data` rounded once to it.
    fn upload_as(&self, data: &[f32], shape: &[usize], dtype: Precision) -> Result<Self::Tensor>;
    /// Overwrite an existing tensor with host data of the same number of elements.
    fn write(&self, dst: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    /// The tensor's values as f32, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// dst = src (same shape).
    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor);
    /// Every element = value.
    fn fill(&self, t: &mut Self::Tensor, value: f32);
    /// dst += src (same shape): where two gradients meet (identity shortcuts, residuals).
    fn add_assign(&self, dst: &mut Self::Tensor, src: &Self::Tensor);

    // ---- network ops ----
    /// Sinusoidal embedding of per-sample step indices `t` (N) into `out` (N x dim):
    /// `concat(sin(t f), cos(t f))`, `f_i = exp(-ln(10000) i / (dim/2 - 1))`.
    fn timestep_embedding(&self, t: &Self::Tensor, out: &mut Self::Tensor);

    /// `out = W silu?(x) + b` for x (N x in), W (out x in), b (out).
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        silu_input: bool,
        out: &mut Self::Tensor,
    );
    /// dx = (or += with `GradientStore::Add`) d/dx of `linear` (with `silu_input` as in the forward).
    fn linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        silu_input: bool,
        dout: &Self::Tensor,
        dx: &mut Self::Tensor,
        store: GradientStore,
    );

    /// GroupNorm over `groups` groups (then SiLU if `silu`), x (N x C x H x W; may be a two-source
    /// concat, not upsampled), gamma/beta (C). Saves per-(sample, group) mean and 1/std in `stats`
    /// (N x groups x 2, f32) for the backward.
    #[allow(clippy::too_many_arguments)]
    fn group_norm(
        &self,
        x: LayerInput<'_, Self::Tensor>,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        groups: usize,
        eps: f32,
        silu: bool,
        out: &mut Self::Tensor,
        stats: &mut Self::Tensor,
    );
    /// d/dx of `group_norm`, stored as `dx` says (`LayerGradient`), from the forward's input (read
    /// as the forward read it: a two-source concat in place) and saved stats.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_backward(
        &self,
        x: LayerInput<'_, Self::Tensor>,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        stats: &Self::Tensor,
        groups: usize,
        silu: bool,
        dout: &Self::Tensor,
        dx: LayerGradient<'_, Self::Tensor>,
    );

    /// 2-D convolution of x (N x Ci x H x W as `LayerInput` reads it: a two-source concat and/or
    /// a nearest-x2 upsample folded in), w (Co x Ci x kh x kw), plus bias and the epilogue.
    fn conv2d(
        &self,
        x: LayerInput<'_, Self::Tensor>,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        geometry: Conv2dGeometry,
        epilogue: ConvEpilogue<'_, Self::Tensor>,
        out: &mut Self::Tensor,
    );
    /// dx += conv2d's vector-Jacobian product with respect to its input (the transposed
    /// convolution of `dout`), dx the logical input (concatenated, upsampled: the caller splits and
    /// folds it). The epilogue's residual gets `dout` itself; callers add it.
    fn conv2d_backward_input(
        &self,
        dout: &Self::Tensor,
        w: &Self::Tensor,
        geometry: Conv2dGeometry,
        dx: &mut Self::Tensor,
        store: GradientStore,
    );

    /// The UNet's Upsample convolution: conv2d (3x3, stride 1, padding 1) of the nearest-x2
    /// upsampling of x (N x Ci x H x W) into out (N x Co x 2H x 2W), plus bias and the epilogue, with
    /// `w` in the sub-pixel form `subpixel_weights` makes of the 3x3 weights (Co x Ci x 4 x 4). Each
    /// output phase (oy % 2, ox % 2) is a 2x2 convolution of x itself: 16 taps an output quad
    /// instead of 36, and no upsampled tensor.
    fn upsample_conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        epilogue: ConvEpilogue<'_, Self::Tensor>,
        out: &mut Self::Tensor,
    );
    /// dx = (or +=) `upsample_conv2d`'s vector-Jacobian product with respect to x (N x Ci x H x W),
    /// from dout (N x Co x 2H x 2W): no upsampled gradient is formed.
    fn upsample_conv2d_backward_input(
        &self,
        dout: &Self::Tensor,
        w: &Self::Tensor,
        dx: &mut Self::Tensor,
        store: GradientStore,
    );

    /// Single-head softmax attention over the H*W positions of q, k, v, the channel thirds of
    /// `qkv` (N x 3C x H x W: q is channels [0, C), k [C, 2C), v [2C, 3C), as the one 1x1
    /// convolution that projects all three writes them): `out[:, :, i] = sum_j softmax_j(q_i . k_j
    /// / sqrt(C)) v_j`, out N x C x H x W. Saves the per-query log-sum-exp (N x HW) so the backward
    /// can rebuild the probabilities without storing them.
    fn attention(&self, qkv: &Self::Tensor, out: &mut Self::Tensor, logsumexp: &mut Self::Tensor);
    /// dqkv = (or += with `GradientStore::Add`) the attention's vector-Jacobian product (dq, dk, dv
    /// its thirds, as q, k, v of `qkv`), with `scratch` the plan provides (`AttentionScratch`).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        qkv: &Self::Tensor,
        out: &Self::Tensor,
        logsumexp: &Self::Tensor,
        dout: &Self::Tensor,
        scratch: AttentionScratch<'_, Self::Tensor>,
        dqkv: &mut Self::Tensor,
        store: GradientStore,
    );

    /// Nearest-neighbour upsampling by 2 in H and W.
    fn upsample_nearest2x(&self, x: &Self::Tensor, out: &mut Self::Tensor);
    /// dx = (or +=) the sum of each element's four copies' gradients.
    fn upsample_nearest2x_backward(&self, dout: &Self::Tensor, dx: &mut Self::Tensor, store: GradientStore);

    /// Per-channel affine map `out[n, c] = x[n, c] * scale[c] + shift[c]` (input normalisation, a
    /// BatchNorm at inference); `scale` and `shift` are f32 tensors of C values, uploaded once.
    /// Backward is `dx = (or +=) dout * scale[c]`.
    fn channel_affine(&self, x: &Self::Tensor, scale: &Self::Tensor, shift: &Self::Tensor, out: &mut Self::Tensor);
    fn channel_affine_backward(
        &self,
        dout: &Self::Tensor,
        scale: &Self::Tensor,
        dx: &mut Self::Tensor,
        store: GradientStore,
    );

    /// x = max(x, 0), in place (the pre-activation of the WideResNet's blocks).
    fn relu(&self, x: &mut Self::Tensor);
    /// dx = (or +=) dy where y > 0, and 0 (or nothing) elsewhere: ReLU's backward from its output y.
    fn relu_backward(&self, y: &Self::Tensor, dy: &Self::Tensor, dx: &mut Self::Tensor, store: GradientStore);

    /// CIFAR ResNet "option A" shortcut: out = x[:, :, ::2, ::2] with `pad` zero channels on each side.
    fn shortcut_subsample_pad(&self, x: &Self::Tensor, pad: usize, out: &mut Self::Tensor);
    /// dx = (or +=) dout's unpadded channels at the even positions, 0 (or nothing) at the others.
    fn shortcut_subsample_pad_backward(
        &self,
        dout: &Self::Tensor,
        pad: usize,
        dx: &mut Self::Tensor,
        store: GradientStore,
    );

    /// Mean over H and W: x (N x C x H x W) -> out (N x C).
    fn global_avg_pool(&self, x: &Self::Tensor, out: &mut Self::Tensor);
    /// dx = (or +=) dout spread evenly over the plane.
    fn global_avg_pool_backward(&self, dout: &Self::Tensor, dx: &mut Self::Tensor, store: GradientStore);

    // ---- element-wise and per-sample ops of the sampler, the guidance and the attacks ----
    /// out = a x + b y.
    fn axpby(&self, a: f32, x: &Self::Tensor, b: f32, y: &Self::Tensor, out: &mut Self::Tensor);
    /// x = clamp(x, lo, hi), in place.
    fn clamp(&self, x: &mut Self::Tensor, lo: f32, hi: f32);
    /// The clamp's backward, in place: `grad` zeroed where `x` (the clamp's input) lies outside
    /// [lo, hi].
    fn clamp_backward(&self, x: &Self::Tensor, lo: f32, hi: f32, grad: &mut Self::Tensor);
    /// Standard normal samples keyed per image: `out` is N x ... (the first axis the images),
    /// `image_indices` (N) holds each sample's index in the whole input, and element e of sample n
    /// depends only on (seed, stream, image_indices[n], e) as `cpu::rng` defines it, so an image
    /// gets the same noise in any batch, at any place in it, on every backend. `image_indices` is
    /// an f32 tensor of integers below `IMAGE_INDEX_LIMIT` (2^24, all exact in f32), written once
    /// per purification, so a step sends nothing from the host.
    fn fill_gaussian(&self, out: &mut Self::Tensor, image_indices: &Self::Tensor, seed: u64, stream: u64);

    // Table-driven ops: their step scalars come from the step table row the cursor names
    // (`StepColumn`), so a step's launches are the same at every step.

    /// The UNet's per-sample step indices: `t[n] = row[UnetStep]` for every sample.
    fn step_unet_indices(&self, step: StepSource<'_, Self::Tensor>, t: &mut Self::Tensor);
    /// `cursor += by` (one element, an integer below 2^24): the last op of a step moves it on.
    fn advance_step_cursor(&self, cursor: &mut Self::Tensor, by: i32);
    /// `out = row[a] x + row[b] y` (the guidance's per-step weights).
    #[allow(clippy::too_many_arguments)]
    fn axpby_step(
        &self,
        step: StepSource<'_, Self::Tensor>,
        a: StepColumn,
        x: &Self::Tensor,
        b: StepColumn,
        y: &Self::Tensor,
        out: &mut Self::Tensor,
    );
    /// The diffusion to the row's level: `x_t = sqrt(abar) x + sqrt(1 - abar) z`, z the noise of
    /// (row's seed, row's stream, `image_indices`) exactly as `fill_gaussian` draws it.
    fn q_sample(
        &self,
        x: &Self::Tensor,
        image_indices: &Self::Tensor,
        step: StepSource<'_, Self::Tensor>,
        x_t: &mut Self::Tensor,
    );
    /// One whole reverse step, in place: `x0_hat = clip((x_t - sqrt(1-abar) eps) / sqrt(abar), -1, 1)`,
    /// `x_t <- c0 x0_hat + ct x_t (+ delta) (+ sigma z)`, sigma = row[NoiseStd] (no noise when 0),
    /// z the noise of (row's seed, row's stream, `image_indices`) as `fill_gaussian` draws it.
    /// Element-wise, so writing x_t in place is safe; bit for bit what `predict_x0_and_mean`,
    /// `add_assign` of delta and `axpby(1, mu, sigma, z)` give.
    fn reverse_step(
        &self,
        x_t: &mut Self::Tensor,
        eps: &Self::Tensor,
        delta: Option<&Self::Tensor>,
        image_indices: &Self::Tensor,
        step: StepSource<'_, Self::Tensor>,
    );
    /// The network's step prediction: `x0_hat = clip((x_t - sqrt(1-abar) eps) / sqrt(abar), -1, 1)`
    /// and the posterior mean `mu = c0 x0_hat + ct x_t`.
    fn predict_x0_and_mean(
        &self,
        x_t: &Self::Tensor,
        eps: &Self::Tensor,
        step: StepSource<'_, Self::Tensor>,
        x0_hat: &mut Self::Tensor,
        mu: &mut Self::Tensor,
    );
    /// The gradient of the clip in `x0_hat`: `u` zeroed where the unclipped x0 estimate
    /// `(x_t - sqrt(1-abar) eps) / sqrt(abar)` lies outside [-1, 1], in place.
    fn mask_clipped(
        &self,
        x_t: &Self::Tensor,
        eps: &Self::Tensor,
        step: StepSource<'_, Self::Tensor>,
        u: &mut Self::Tensor,
    );
    /// The gradient constraint, per sample n:
    /// `delta[n] *= min(1, kappa ||x_t[n] - mu[n]|| / ||delta[n]||)` (kappa = inf: no-op).
    fn constrain_guidance(&self, delta: &mut Self::Tensor, x_t: &Self::Tensor, mu: &Self::Tensor, kappa: f32);

    /// Gradients of the adversarial-guidance objective with respect to features (N x F) and
    /// logits (N x K): `L = -lambda_f ||f - f_ref||^2 / F + lambda_c log softmax(logits)[y]`.
    /// Writes (not accumulates) `dfeatures` and `dlogits`, and returns nothing to the host.
    #[allow(clippy::too_many_arguments)]
    fn guidance_objective_grad(
        &self,
        features: &Self::Tensor,
        reference_features: &Self::Tensor,
        logits: &Self::Tensor,
        labels: &Self::Tensor,
        lambda_f: f32,
        lambda_c: f32,
        dfeatures: &mut Self::Tensor,
        dlogits: &mut Self::Tensor,
    );
    /// Gradient of the summed cross-entropy `sum_n -log softmax(logits[n])[labels[n]]` with respect
    /// to the logits (written, not accumulated); labels are class indices stored as f32.
    fn cross_entropy_grad(&self, logits: &Self::Tensor, labels: &Self::Tensor, dlogits: &mut Self::Tensor);
}
