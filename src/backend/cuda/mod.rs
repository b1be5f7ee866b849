//! The CUDA backend: hand-written kernels (kernels/*.cu) compiled by NVRTC at run time and launched
//! through a `Driver` (cudarc on a GPU, the PTX emulator elsewhere). Everything above the driver
//! (tensor layout, launch configuration, argument packing) is this one implementation.
//!
//! Ops do not return errors: a bad call or a refused launch is stored and reported by the next
//! `synchronize` (as a GPU reports a kernel fault), and nothing is launched for it.
//!
//! Forward ops run on the device. Backward ops: the element-wise ones, the dense layer, pooling,
//! upsampling, concat, the classifiers' shortcut, `conv2d_backward_input` (tensor cores for
//! bf16/f16 weights with f32 or 16-bit gradients, SIMT for f32), GroupNorm(+SiLU) and attention
//! (flash-style: tensor cores for bf16/f16 activations, f32 SIMT otherwise) run here too, for every
//! storage type a plan holds.
pub mod attention;
pub mod compile;
pub mod conv;
pub mod modules;
pub mod tensor;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use self::attention::{AttentionKernels, AttentionLaunch};
use self::compile::{HalfTypes, ImageKind, KernelCompiler};
use self::conv::{Conv2dKernels, Conv2dLaunch, SplitKWorkspace, Upsampling};
use self::modules::KernelModules;
use self::tensor::{decode, encode, from_storage_order, to_storage_order};
pub use self::tensor::{CudaTensor, DeviceMemory};
use super::{
    AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, GradientStore, KernelFileStartUp, KernelStartUp,
    LayerGradient, LayerInput, Precision, StepColumn, StepSource, TensorShape, Timestamp, STEP_COLUMNS,
};
use crate::driver::{DevicePtr, Driver, Graph, KernelArgs, LaunchConfig};
use crate::error::{Error, Result};

/// Threads per block of the 1-D kernels.
const THREADS: u32 = 256;
/// kernels/embedding.cu's `linear` block: warps (each an output at a time)...
const LINEAR_WARPS: usize = 8;

/// ...and samples (staged in shared memory; the kernel takes it as an argument): 8, or the largest
/// power of two up to the batch.
fn linear_tile(batch: usize) -> usize {
    match batch {
        8.. => 8,
        4.. => 4,
        2.. => 2,
        _ => 1,
    }
}

/// GroupNorm's partial-statistics scratch: (count, mean, M2) per (sample, group, chunk), at most this many.
const GROUPNORM_PARTIALS: usize = 1 << 16;

/// The storage-type code the kernels take (common.cuh `DtypeCode`).
/// Where q, k and v (or dq, dk, dv) start in a tensor whose positions are rows of 3C: the first
/// row's thirds, C `channels` apart (NHWC on the device).
fn thirds(t: &CudaTensor, channels: usize) -> [DevicePtr; 3] {
    let third = (channels * t.dtype.bytes()) as u64;
    [t.ptr, t.ptr + third, t.ptr + 2 * third]
}

/// The attention launch over `qkv` (N x 3C x H x W) with C `channels`, its q, k, v the thirds.
fn attention_launch(
    qkv: &CudaTensor,
    channels: usize,
    positions: usize,
    out: &CudaTensor,
    logsumexp: &CudaTensor,
) -> AttentionLaunch {
    let [q, k, v] = thirds(qkv, channels);
    AttentionLaunch {
        batch: qkv.shape[0],
        positions,
        channels,
        qkv_stride: 3 * channels,
        dtype: qkv.dtype,
        q,
        k,
        v,
        out: out.ptr,
        logsumexp: logsumexp.ptr,
    }
}

/// The storage-type code of the kernels' run-time type arguments (kernels/common.cuh `DtypeCode`).
pub fn dtype_code(d: Precision) -> i32 {
    match d {
        Precision::F32 => 0,
        Precision::F16 => 1,
        Precision::Bf16 => 2,
    }
}

pub struct CudaBackend {
    driver: Arc<dyn Driver>,
    modules: KernelModules,
    precision: Precision,
    /// The first error since the last `synchronize`.
    error: Mutex<Option<Error>>,
    conv: OnceLock<Conv2dKernels>,
    attention: OnceLock<AttentionKernels>,
    /// Every allocation of this backend, counted (`memory`).
    memory: Arc<DeviceMemory>,
    groupnorm_partials: CudaTensor,
    groupnorm_arrivals: CudaTensor,
    /// The most chunks GroupNorm's partial kernels split a (sample, group slice) into (`usize::MAX`
    /// but where a test caps it: `cap_groupnorm_chunks`).
    groupnorm_max_chunks: usize,
    /// The convolutions' split-K partial sums: sized once from the SM count for every split the
    /// launcher can choose (`SplitKWorkspace::bytes_for`), so no step allocates and recorded steps
    /// keep valid pointers. `None` with `PURIFIER_CONV_SPLIT_K=off` (the benchmark's A/B switch).
    split_k_partials: Option<CudaTensor>,
    /// One u32 of fault bits the kernels set where the host cannot check an argument (a step
    /// cursor outside its table: `STEP_CURSOR_FAULT`); `synchronize` reads and clears it.
    faults: CudaTensor,
    /// Whether a kernel that may set a fault has been issued (else `synchronize` skips the read).
    faults_armed: AtomicBool,
}

impl CudaBackend {
    /// A backend over `driver` whose plans store activations in `precision`. Compiles nothing yet
    /// (each kernel file is compiled, or read from the disk cache, on first use) but fails at once
    /// when NVRTC is missing.
    pub fn new(driver: Arc<dyn Driver>, precision: Precision, image: ImageKind) -> Result<Self> {
        let compiler = KernelCompiler::new(&driver.info().arch())?;
        Self::with_compiler(driver, precision, compiler, image)
    }

    pub fn with_compiler(
        driver: Arc<dyn Driver>,
        precision: Precision,
        compiler: KernelCompiler,
        image: ImageKind,
    ) -> Result<Self> {
        crate::switches::check()?;
        // Its precision's tensor-core kernels only (none for f32): the slowest modules of a cold start.
        let compiler = compiler.for_halves(HalfTypes::for_precision(precision));
        let memory = Arc::new(DeviceMemory::default());
        // Three floats per (sample, group, chunk), then the backward's two means per (sample, group).
        let groupnorm_partials = allocate(&driver, &memory, &[GROUPNORM_PARTIALS * 5], Precision::F32)?;
        // One u32 arrival counter per (sample, group): zero now, and reset by the last block of each
        // launch that counts in one (kernels/groupnorm.cu, last_to_arrive).
        let groupnorm_arrivals = allocate(&driver, &memory, &[GROUPNORM_PARTIALS], Precision::F32)?;
        driver.memset_u32(groupnorm_arrivals.ptr, 0, GROUPNORM_PARTIALS)?;
        let split_k_bytes = SplitKWorkspace::bytes_for(driver.info().multiprocessors as usize);
        let split_k_partials = if crate::switches::conv_split_k() {
            Some(allocate(&driver, &memory, &[split_k_bytes / 4], Precision::F32)?)
        } else {
            None
        };
        let faults = allocate(&driver, &memory, &[1], Precision::F32)?;
        driver.memset_u32(faults.ptr, 0, 1)?;
        Ok(Self {
            modules: KernelModules::new(driver.clone(), compiler, image),
            driver,
            precision,
            error: Mutex::new(None),
            conv: OnceLock::new(),
            attention: OnceLock::new(),
            memory,
            groupnorm_partials,
            groupnorm_arrivals,
            groupnorm_max_chunks: usize::MAX,
            split_k_partials,
            faults,
            faults_armed: AtomicBool::new(false),
        })
    }

    /// The CUDA backend on a driver that holds no memory and runs no kernels
    /// (`driver::sizing`): networks load and plans are made exactly as on a GPU of compute
    /// capability 8.0, so `memory()` tells what they would take on one, without allocating it and
    /// without NVRTC. Running anything on it is an error.
    pub fn sizing(precision: Precision) -> Result<Self> {
        let driver: Arc<dyn Driver> = Arc::new(crate::driver::sizing::SizingDriver::new((8, 0)));
        let compiler = KernelCompiler::disabled(&driver.info().arch());
        Self::with_compiler(driver, precision, compiler, ImageKind::Cubin)
    }

    /// Caps the chunks GroupNorm's partial kernels split a (sample, group slice) into, as the
    /// statistics scratch does at large batch (cifar10 from batch 1024): at 1, the tests' shapes
    /// give a thread more vectors than it loads at once, the kernels' path of those batches.
    #[doc(hidden)]
    pub fn cap_groupnorm_chunks(&mut self, chunks: usize) {
        self.groupnorm_max_chunks = chunks.max(1);
    }

    /// The device bytes this backend holds now and at most so far (weights, plans, scratch).
    pub fn memory(&self) -> &DeviceMemory {
        &self.memory
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// Starts compiling every kernel file in the background, in parallel (`KernelModules::
    /// compile_in_background`); the commands call it as soon as the backend exists, so NVRTC runs
    /// while the weights load and a cold start costs the slowest file, not all of them in turn.
    pub fn compile_kernels_in_background(&self) {
        self.modules.compile_in_background();
    }

    /// Keeps the first error; later ones are consequences.
    fn fail(&self, error: Error) {
        self.error.lock().unwrap().get_or_insert(error);
    }

    fn record(&self, result: Result<()>) {
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// Checks a condition of an op's arguments; on failure stores the error and returns false.
    fn check(&self, ok: bool, message: impl FnOnce() -> String) -> bool {
        if !ok {
            self.fail(Error::invalid(message()));
        }
        ok
    }

    fn check_shape(&self, t: &CudaTensor, expected: &[usize], what: &str) -> bool {
        self.check(t.shape == expected, || format!("{what}: shape {:?}, expected {expected:?}", t.shape))
    }

    fn launch(&self, file: &str, kernel: &str, config: LaunchConfig, args: KernelArgs) {
        let result = self.modules.function(file, kernel).and_then(|f| Ok(self.driver.launch(f, config, &args)?));
        self.record(result);
    }

    /// A 1-D grid for `n` independent elements (grid-stride kernels: capped, at least one block).
    fn grid_for(&self, n: usize) -> LaunchConfig {
        let cap = (self.driver.info().multiprocessors.max(1) as usize) * 16;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, cap.max(1));
        LaunchConfig::linear(blocks as u32, THREADS)
    }

    fn elementwise(&self, kernel: &str, n: usize, args: KernelArgs) {
        if n > 0 {
            self.launch("elementwise.cu", kernel, self.grid_for(n), args);
        }
    }

    fn conv_kernels(&self) -> Result<&Conv2dKernels> {
        if let Some(k) = self.conv.get() {
            return Ok(k);
        }
        let simt = self.modules.module("conv2d.cu")?;
        let mma = self.modules.module("conv2d_mma.cu")?;
        let kernels = Conv2dKernels::load(self.driver.as_ref(), simt, Some((mma, self.modules.compiler().halves())))?;
        Ok(self.conv.get_or_init(|| kernels))
    }

    fn split_k_workspace(&self) -> Option<SplitKWorkspace> {
        self.split_k_partials.as_ref().map(|partials| SplitKWorkspace {
            ptr: partials.ptr,
            bytes: partials.allocated,
            multiprocessors: self.driver.info().multiprocessors as usize,
        })
    }

    fn attention_kernels(&self) -> Result<&AttentionKernels> {
        if let Some(k) = self.attention.get() {
            return Ok(k);
        }
        let simt = self.modules.module("attention.cu")?;
        let mma = self.modules.module("attention_mma.cu")?;
        let kernels =
            AttentionKernels::load(self.driver.as_ref(), simt, Some((mma, self.modules.compiler().halves())))?;
        Ok(self.attention.get_or_init(|| kernels))
    }

    /// N, C, H, W of the attention whose q, k, v are the channel thirds of `qkv` (N x 3C x H x W);
    /// None (an error stored) where qkv is not that.
    fn attention_dims(&self, qkv: &CudaTensor, what: &str) -> Option<[usize; 4]> {
        let [n, c3, h, w] = self.nchw(qkv, what)?;
        let thirds = self.check(c3 % 3 == 0, || format!("{what}: {c3} channels, not three equal thirds (q, k, v)"));
        thirds.then_some([n, c3 / 3, h, w])
    }

    /// GroupNorm's partial-sum launch for `launch` over `n` samples of `pixels` pixels, with the
    /// element-wise kernels' (aligned) vector width `vec`: its grid, block and vector width, and
    /// the chunks each (sample, group slice) is split into (None: an error stored).
    fn groupnorm_partials(
        &self,
        launch: &GroupNormLaunch,
        vec: i32,
        n: usize,
        groups: usize,
        pixels: usize,
        op: &str,
    ) -> Option<GroupNormPartials> {
        let mut layout =
            groupnorm_partials(launch, vec, n, groups, pixels, self.driver.info().multiprocessors as usize);
        layout.chunks = layout.chunks.min(self.groupnorm_max_chunks);
        let fits = self.check(n * groups * layout.chunks <= GROUPNORM_PARTIALS, || {
            format!("{op}: batch {n} x {groups} groups exceeds the statistics scratch")
        });
        fits.then_some(layout)
    }

    /// The logical N x C x H x W shape GroupNorm `op` reads from `x` (a two-source concat of one
    /// storage type, not upsampled), with its parameters and statistics checked; None (an error
    /// stored) where any is wrong, or where the shape is empty (nothing to do).
    fn group_norm_operands(
        &self,
        op: &str,
        x: LayerInput<'_, CudaTensor>,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        stats: &CudaTensor,
        groups: usize,
    ) -> Option<[usize; 4]> {
        let shape = match x.logical_shape() {
            Ok(s) if !x.upsample2x => Ok(s),
            Ok(_) => Err("an upsampled input is not supported".to_string()),
            Err(e) => Err(e),
        };
        let shape = match shape {
            Ok(s) => s,
            Err(e) => {
                self.fail(Error::invalid(format!("{op}: {e}")));
                return None;
            }
        };
        let [n, c, ..] = shape;
        let elements: usize = shape.iter().product();
        let ok = self.check(groups > 0 && c % groups == 0, || format!("{op}: {c} channels, {groups} groups"))
            && self.check_shape(gamma, &[c], &format!("{op}: gamma"))
            && self.check_shape(beta, &[c], &format!("{op}: beta"))
            && self.check(gamma.dtype == Precision::F32 && beta.dtype == Precision::F32, || {
                format!("{op}: gamma and beta must be f32")
            })
            && self.check_shape(stats, &[n, groups, 2], &format!("{op}: stats"))
            && self.check(stats.dtype == Precision::F32, || format!("{op}: stats must be f32"))
            && self.check(x.b.is_none_or(|b| b.dtype == x.a.dtype), || format!("{op}: concat of two storage types"))
            && self.check(elements < i32::MAX as usize, || format!("{op}: {shape:?} has 2^31 elements or more"))
            && self.check(n <= 65535, || format!("{op}: batch {n} over the grid limit 65535"));
        (ok && elements > 0).then_some(shape)
    }

    /// (N, C, H, W) of a 4-D tensor, or an error stored.
    fn nchw(&self, t: &CudaTensor, what: &str) -> Option<[usize; 4]> {
        match *t.shape() {
            [n, c, h, w] => Some([n, c, h, w]),
            _ => {
                self.fail(Error::invalid(format!("{what}: expected an N x C x H x W tensor, got {:?}", t.shape)));
                None
            }
        }
    }
}

fn allocate(
    driver: &Arc<dyn Driver>,
    memory: &Arc<DeviceMemory>,
    shape: &[usize],
    dtype: Precision,
) -> Result<CudaTensor> {
    let elements: usize = shape.iter().product();
    // Never a zero-byte allocation: every tensor has an address of its own.
    let bytes = (elements * dtype.bytes()).max(4);
    let ptr = driver.alloc(bytes)?;
    memory.allocated(bytes);
    Ok(CudaTensor {
        ptr,
        shape: shape.to_vec(),
        dtype,
        driver: driver.clone(),
        memory: memory.clone(),
        allocated: bytes,
    })
}

/// Kernel arguments of a tensor operand: its address and storage-type code.
trait TensorArgs {
    fn tensor(self, t: &CudaTensor) -> Self;
}

impl TensorArgs for KernelArgs {
    fn tensor(self, t: &CudaTensor) -> Self {
        self.ptr(t.ptr).i32(dtype_code(t.dtype))
    }
}

/// A recorded sequence of launches on a driver (a CUDA graph), destroyed with this handle.
pub struct CudaGraph {
    graph: Graph,
    driver: Arc<dyn Driver>,
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // As for tensors: a failure here cannot be reported; the next driver call reports it.
        let _ = self.driver.destroy_graph(self.graph);
    }
}

impl CudaBackend {
    /// Checks the step table and cursor of a table-driven op; their kernel arguments
    /// (table, rows, cursor, faults), or None with an error stored. The cursor lives on the device:
    /// a kernel that finds it outside the table writes nothing and sets a fault `synchronize` reports.
    fn step_args(&self, step: StepSource<'_, CudaTensor>, what: &str) -> Option<KernelArgs> {
        let rows = match step.table.shape[..] {
            [rows, STEP_COLUMNS] if rows > 0 && rows <= i32::MAX as usize => rows,
            _ => {
                self.fail(Error::invalid(format!(
                    "{what}: a step table is rows x {STEP_COLUMNS}, got {:?}",
                    step.table.shape
                )));
                return None;
            }
        };
        let ok = self.check(step.table.dtype == Precision::F32, || format!("{what}: the step table must be f32"))
            && self.check_shape(step.cursor, &[1], &format!("{what}: step cursor"))
            && self.check(step.cursor.dtype == Precision::F32, || format!("{what}: the step cursor must be f32"));
        self.faults_armed.store(true, Ordering::Relaxed);
        ok.then(|| KernelArgs::new().ptr(step.table.ptr).i32(rows as i32).ptr(step.cursor.ptr).ptr(self.faults.ptr))
    }

    /// The faults the kernels set since the last call, as an error (and cleared).
    fn take_faults(&self) -> Result<()> {
        if !self.faults_armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut bits = [0u8; 4];
        self.driver.copy_to_host(self.faults.ptr, &mut bits)?;
        if u32::from_le_bytes(bits) == 0 {
            return Ok(());
        }
        self.driver.memset_u32(self.faults.ptr, 0, 1)?;
        Err(Error::Device(
            "a step-table op (q-sample, reverse step, ...) ran with its step cursor outside the step table and \
             wrote nothing: the sampler's steps and its table disagree"
                .into(),
        ))
    }

    /// Checks `image_indices` for a noise-drawing op over `out`'s samples.
    fn check_image_indices(&self, image_indices: &CudaTensor, out: &CudaTensor, what: &str) -> bool {
        let samples = out.shape.first().copied().unwrap_or(0);
        self.check_shape(image_indices, &[samples], &format!("{what}: image_indices"))
            && self.check(image_indices.dtype == Precision::F32, || {
                format!("{what}: image_indices must be stored in f32, not {}", image_indices.dtype)
            })
    }

    /// (samples, sample length, NHWC?, C, H, W) of a noise-drawing op's tensor, and its grid.
    fn noise_layout(&self, t: &CudaTensor) -> (KernelArgs, LaunchConfig) {
        let samples = t.shape.first().copied().unwrap_or(0);
        let sample_len = t.len() / samples.max(1);
        let [c, h, w] = match *t.shape() {
            [_, c, h, w] => [c, h, w],
            _ => [1, 1, 1],
        };
        let args = KernelArgs::new()
            .u64(samples as u64)
            .u64(sample_len as u64)
            .i32(t.is_nhwc() as i32)
            .i32(c as i32)
            .i32(h as i32)
            .i32(w as i32);
        (args, self.grid_for(samples * sample_len.div_ceil(4)))
    }

    /// conv2d of `x` read with `upsampling` (the sub-pixel form: `w` Co x Ci x 4 x 4, checked by
    /// the caller, for a 3x3 kernel): the shape checks, then the launcher's kernel.
    #[allow(clippy::too_many_arguments)]
    fn launch_conv2d(
        &self,
        x: LayerInput<'_, CudaTensor>,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        geometry: Conv2dGeometry,
        upsampling: Upsampling,
        epilogue: ConvEpilogue<'_, CudaTensor>,
        out: &mut CudaTensor,
    ) {
        let Some([n, ca, h, wd]) = self.nchw(x.a, "conv2d: x") else { return };
        let Some([co, ci, kh, kw]) = self.nchw(w, "conv2d: w") else { return };
        let (kh, kw) = if upsampling == Upsampling::SubPixel { (3, 3) } else { (kh, kw) };
        let cb = x.b.map_or(0, |b| b.shape.get(1).copied().unwrap_or(0));
        let ok = self.check(
            x.b.is_none_or(|b| b.shape.len() == 4 && b.shape[0] == n && b.shape[2] == h && b.shape[3] == wd),
            || format!("conv2d: concat of {:?} and {:?}", x.a.shape, x.b.map(|b| b.shape.clone())),
        ) && self
            .check(ci == ca + cb, || format!("conv2d: weights {:?} for {} input channels", w.shape, ca + cb))
            && self.check(x.b.is_none_or(|b| b.dtype == x.a.dtype), || "conv2d: concat of two storage types".into())
            && self.check(epilogue.residual.is_none_or(|r| r.dtype == out.dtype && r.shape == out.shape), || {
                "conv2d: the residual must have the output's shape and storage type".into()
            });
        if !ok {
            return;
        }
        let args = Conv2dLaunch {
            batch: n,
            height: h,
            width: wd,
            channels_a: ca,
            channels_b: cb,
            upsample: upsampling,
            out_channels: co,
            kernel_h: kh,
            kernel_w: kw,
            geometry,
            relu: epilogue.relu,
            input_dtype: x.a.dtype,
            weight_dtype: w.dtype,
            out_dtype: out.dtype,
            a: x.a.ptr,
            b: x.b.map(|b| b.ptr),
            weight: w.ptr,
            bias: bias.map(|b| b.ptr),
            // Column `channel_bias_column` of row 0 (checked below to lie inside the tensor).
            channel_bias: epilogue.channel_bias.map(|b| b.ptr + (epilogue.channel_bias_column * 4) as u64),
            channel_bias_stride: epilogue.channel_bias.map_or(co, |b| b.shape.get(1).copied().unwrap_or(0)),
            residual: epilogue.residual.map(|r| r.ptr),
            out: out.ptr,
        };
        let (oh, ow) = args.output_size();
        if !self.check_shape(out, &[n, co, oh, ow], "conv2d: out")
            || !bias.is_none_or(|b| {
                self.check(b.shape == [co] && b.dtype == Precision::F32, || "conv2d: bias must be f32 (C_out)".into())
            })
            || !epilogue.channel_bias.is_none_or(|b| {
                let column = epilogue.channel_bias_column;
                let fits = b.shape.len() == 2 && b.shape[0] == n && column + co <= b.shape[1];
                self.check(fits && b.dtype == Precision::F32, || {
                    format!(
                        "conv2d: channel_bias must be f32 N x W with columns {column}..{} (N = {n}), got {} {:?}",
                        column + co,
                        b.dtype,
                        b.shape
                    )
                })
            })
        {
            return;
        }
        let workspace = self.split_k_workspace();
        let result =
            self.conv_kernels().and_then(|k| conv::launch_conv2d(self.driver.as_ref(), k, &args, workspace.as_ref()));
        self.record(result);
    }

    /// The input gradient of `launch_conv2d` without a folded upsample or (`subpixel`) in the
    /// sub-pixel form.
    fn launch_conv2d_backward_input(
        &self,
        dout: &CudaTensor,
        w: &CudaTensor,
        geometry: Conv2dGeometry,
        subpixel: bool,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        let Some([n, ci, h, wd]) = self.nchw(dx, "conv2d_backward_input: dx") else { return };
        let Some([co, w_ci, kh, kw]) = self.nchw(w, "conv2d_backward_input: w") else { return };
        let (kh, kw) = if subpixel { (3, 3) } else { (kh, kw) };
        // Storage types: the launcher checks them (f32 weights: f32 throughout; 16-bit weights: dout
        // and dx in f32 or the weights' type, on the tensor cores).
        if !self.check(w_ci == ci, || format!("conv2d_backward_input: weights {:?} for dx {:?}", w.shape, dx.shape)) {
            return;
        }
        let args = conv::Conv2dBackwardInputLaunch {
            batch: n,
            height: h,
            width: wd,
            in_channels: ci,
            out_channels: co,
            kernel_h: kh,
            kernel_w: kw,
            geometry,
            dout_dtype: dout.dtype,
            weight_dtype: w.dtype,
            dx_dtype: dx.dtype,
            dout: dout.ptr,
            weight: w.ptr,
            dx: dx.ptr,
            accumulate: store.accumulates(),
            subpixel,
        };
        let (oh, ow) = args.output_size();
        if !self.check_shape(dout, &[n, co, oh, ow], "conv2d_backward_input: dout") {
            return;
        }
        let workspace = self.split_k_workspace();
        let result = self
            .conv_kernels()
            .and_then(|k| conv::launch_conv2d_backward_input(self.driver.as_ref(), k, &args, workspace.as_ref()));
        self.record(result);
    }

    /// Whether `w` has the sub-pixel form's shape (Co x Ci x 4 x 4); an error is recorded if not.
    fn check_subpixel_weights(&self, w: &CudaTensor, what: &str) -> bool {
        self.check(w.shape.len() == 4 && w.shape[2..] == [4, 4], || {
            format!("{what}: w {:?} is not the sub-pixel form of a 3x3 kernel (Co x Ci x 4 x 4)", w.shape)
        })
    }
}

/// Appends another argument list (a kernel's arguments built in parts).
trait ArgsAppend {
    fn append(self, more: KernelArgs) -> Self;
}

impl ArgsAppend for KernelArgs {
    fn append(mut self, more: KernelArgs) -> Self {
        for p in more.params() {
            self = self.bytes(p);
        }
        self
    }
}

/// The kernels' `GroupNormShape` struct (seven i32).
fn groupnorm_shape_bytes(fields: [usize; 7]) -> Vec<u8> {
    fields.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()
}

/// GroupNorm's launch shape (kernels/groupnorm.cu).
struct GroupNormLaunch {
    /// The partial kernels' groups a block: the fewest (doubling, dividing the group count, at most
    /// 32) whose channels span 32 bytes of `element_bytes` elements at each pixel, so the warps load
    /// whole sectors; 1 where no block of 1024 threads is a multiple of their channels.
    groups_per_block: usize,
    /// The channels of a group.
    channels_per_group: usize,
    /// The element-wise kernels' channels a thread: the largest of 8, 4, 2, 1 that divides Ca, Cb
    /// and the group size (then narrowed to the tensors' alignment: `aligned_vec`).
    vec: i32,
}

/// The least common multiple of `width` and a warp.
fn lcm_warp(width: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    width / gcd(width, 32) * 32
}

fn groupnorm_launch(ca: usize, cb: usize, groups: usize, element_bytes: usize) -> GroupNormLaunch {
    let channels_per_group = (ca + cb) / groups;
    let mut groups_per_block = 1;
    while channels_per_group * groups_per_block * element_bytes < 32
        && groups.is_multiple_of(2 * groups_per_block)
        && groups_per_block < 32
    {
        groups_per_block *= 2;
    }
    if lcm_warp(channels_per_group * groups_per_block) > 1024 {
        groups_per_block = 1;
    }
    let vec = [8, 4, 2, 1]
        .into_iter()
        .find(|&v| ca.is_multiple_of(v) && cb.is_multiple_of(v) && channels_per_group.is_multiple_of(v))
        .unwrap_or(1);
    GroupNormLaunch { groups_per_block, channels_per_group, vec: vec as i32 }
}

/// GroupNorm's partial-sum launch (kernels/groupnorm.cu `SliceWalk`).
#[derive(Debug, PartialEq, Eq)]
struct GroupNormPartials {
    /// Channels a thread loads at once: the element-wise kernels' vector where the block is a
    /// multiple of the slice's vectors, else 1 (threads take elements in turn).
    vec: i32,
    /// Threads: a multiple of a warp and of a pixel's vectors in the slice (each thread keeps
    /// one), at most 256 and no more than (rounded up to that multiple) the slice's vectors; else 256.
    block: u32,
    /// Pixel chunks a (sample, group slice) is split into: enough blocks to fill the device (four
    /// an SM) at batch 1, but no more than leaves every thread a vector: a block whose threads load
    /// one element each spends nearly all its time reducing (cifar10 at batch 1 once ran 465 blocks
    /// of 256 threads on 128K elements, its slowest kernel by the emulator's latency model). And at
    /// least enough that a thread has no more vectors than it loads at once (`batch_vectors`, 16
    /// elements, at most 4 vectors), so that the forward's second pass reads no memory, where the
    /// partial sums' scratch allows.
    chunks: usize,
}

/// kernels/groupnorm.cu's `batch_vectors`: the vectors a partial kernel's thread loads at once.
fn groupnorm_batch_vectors(vec: i32) -> usize {
    if vec >= 4 {
        16 / vec as usize
    } else {
        4
    }
}

fn groupnorm_partials(
    launch: &GroupNormLaunch,
    vec: i32,
    n: usize,
    groups: usize,
    pixels: usize,
    multiprocessors: usize,
) -> GroupNormPartials {
    let width = launch.channels_per_group * launch.groups_per_block;
    let unit = lcm_warp(width / vec as usize);
    let (vec, block) = if unit <= 256 {
        // Vectors of the whole slice, rounded up to whole units, at most 256 threads.
        let units = (pixels * width / vec as usize).div_ceil(unit).clamp(1, 256 / unit);
        (vec, unit * units)
    } else {
        (1, 256)
    };
    let vectors_per_slice = pixels * width / vec as usize;
    let target_blocks = multiprocessors.max(1) * 4;
    let filling = target_blocks.div_ceil((n * groups / launch.groups_per_block).max(1));
    let holding = vectors_per_slice.div_ceil(block * groupnorm_batch_vectors(vec));
    let chunks = filling
        .min(vectors_per_slice.div_ceil(block))
        .max(holding)
        .clamp(1, pixels.max(1))
        .min((GROUPNORM_PARTIALS / (n * groups).max(1)).max(1));
    GroupNormPartials { vec, block: block as u32, chunks }
}

/// Load batches (kernels/groupnorm.cu `batch_vectors`) a thread of a partial kernel may walk to
/// apply its whole (sample, group slice) itself, once the slice's stats (or means) are stored.
const GROUPNORM_FUSED_APPLY_BATCHES: usize = 4;

/// Whether the apply runs in the partial kernel (kernels/groupnorm.cu `apply_slice`,
/// `backward_apply_slice`): where a slice's vectors give a thread at most
/// `GROUPNORM_FUSED_APPLY_BATCHES` load batches. That saves the apply's launch (2.6 us of fixed cost
/// each on the H200 in src/driver/launch_model.rs; 51 a cifar10 forward, 51 an input VJP); a larger
/// slice, which the block that stores its stats would walk alone where the apply kernel spreads it
/// over the GPU, keeps the launch.
fn groupnorm_fuses_apply(partials: &GroupNormPartials, launch: &GroupNormLaunch, pixels: usize) -> bool {
    let width = launch.channels_per_group * launch.groups_per_block;
    let vectors = (pixels * width).div_ceil(partials.vec as usize);
    let per_thread = vectors.div_ceil(partials.block as usize);
    per_thread <= GROUPNORM_FUSED_APPLY_BATCHES * groupnorm_batch_vectors(partials.vec)
}

/// The element-wise GroupNorm kernels' launch (kernels/groupnorm.cu `for_each_column`): block x a
/// pixel's channel vectors (at most 256), block y rows of pixels up to 256 threads, grid y the
/// samples and grid x the pixel rows, at most as many blocks as 16 an SM over the samples (each
/// thread then steps over pixels).
fn groupnorm_apply_config(channels: usize, vec: i32, n: usize, pixels: usize, multiprocessors: usize) -> LaunchConfig {
    let columns = (channels / vec.max(1) as usize).clamp(1, 256);
    let rows = (256 / columns).min(pixels).max(1);
    let cap = (multiprocessors.max(1) * 16).div_ceil(n.max(1));
    let blocks = pixels.div_ceil(rows).clamp(1, cap.max(1));
    LaunchConfig {
        grid: [blocks as u32, n as u32, 1],
        block: [columns as u32, rows as u32, 1],
        dynamic_shared_bytes: 0,
    }
}

/// The widest of `vec`, vec / 2, ..., 1 to which every (pointer, storage type) is aligned: the
/// element-wise GroupNorm kernels move `vec` elements in one access.
fn aligned_vec(vec: i32, tensors: &[(DevicePtr, Precision)]) -> i32 {
    let mut vec = vec;
    while vec > 1 && tensors.iter().any(|&(ptr, dtype)| ptr % (vec as u64 * dtype.bytes() as u64) != 0) {
        vec /= 2;
    }
    vec
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Graph = CudaGraph;

    fn name(&self) -> String {
        format!("cuda ({}, {})", self.driver.info().name, self.precision)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn available_memory(&self) -> Option<usize> {
        self.driver.free_memory().ok()
    }

    fn peak_memory(&self) -> Option<usize> {
        Some(self.memory.peak())
    }
    fn reset_peak_memory(&self) {
        self.memory.reset_peak()
    }

    fn synchronize(&self) -> Result<()> {
        let device = self.driver.synchronize();
        if let Some(e) = self.error.lock().unwrap().take() {
            return Err(e);
        }
        device?;
        self.take_faults()
    }

    fn timestamp(&self) -> Result<Timestamp> {
        Ok(Timestamp::Device(self.driver.record_event()?))
    }

    fn elapsed_ms(&self, start: &Timestamp, end: &Timestamp) -> Result<f64> {
        match (start, end) {
            (Timestamp::Device(a), Timestamp::Device(b)) => {
                self.driver.synchronize()?;
                Ok(self.driver.elapsed_ms(*a, *b)? as f64)
            }
            _ => Err(Error::invalid("elapsed_ms: timestamps of another backend")),
        }
    }

    fn release_timestamp(&self, timestamp: Timestamp) {
        if let Timestamp::Device(event) = timestamp {
            self.record(self.driver.destroy_event(event).map_err(Into::into));
        }
    }

    fn begin_capture(&self) -> Result<bool> {
        self.driver.begin_capture()?;
        Ok(true)
    }

    fn end_capture(&self) -> Result<CudaGraph> {
        Ok(CudaGraph { graph: self.driver.end_capture()?, driver: self.driver.clone() })
    }

    fn replay(&self, graph: &CudaGraph) -> Result<()> {
        Ok(self.driver.replay(graph.graph)?)
    }

    fn range_push(&self, name: &str) {
        crate::driver::nvtx::push(name);
    }

    fn range_pop(&self) {
        crate::driver::nvtx::pop();
    }

    /// kernels/peak.cu's mma.sync loop on every multiprocessor, its iteration count doubled until
    /// one launch lasts 20 ms (or, on the emulator, until the count is large enough to stop).
    fn tensor_core_peak(&self) -> Result<Option<f64>> {
        const THREADS: u32 = 128;
        const CHAINS: f64 = 8.0; // PEAK_CHAINS
        let blocks = self.driver.info().multiprocessors.max(1) * 8;
        let sink = allocate(&self.driver, &self.memory, &[(blocks * THREADS) as usize], Precision::F32)?;
        let function = self.modules.function("peak.cu", "mma_peak_bf16")?;
        let mut iterations: i32 = 1;
        let result = loop {
            let args = KernelArgs::new().ptr(sink.ptr).i32(iterations);
            let start = self.driver.record_event()?;
            self.driver.launch(function, LaunchConfig::linear(blocks, THREADS), &args)?;
            let end = self.driver.record_event()?;
            self.driver.synchronize()?;
            let ms = self.driver.elapsed_ms(start, end)? as f64;
            self.driver.destroy_event(start)?;
            self.driver.destroy_event(end)?;
            if ms >= 20.0 || iterations >= 1 << 20 {
                let mmas = blocks as f64 * (THREADS / 32) as f64 * iterations as f64 * CHAINS;
                break mmas * 4096.0 / (ms / 1e3);
            }
            iterations *= 2;
        };
        Ok(Some(result))
    }

    fn kernel_start_up(&self) -> Result<Option<KernelStartUp>> {
        let compiler = self.modules.compiler();
        let kind = self.modules.kind();
        let seconds = |started: Instant| started.elapsed().as_secs_f64();
        let names: Vec<&'static str> = compile::kernel_files().collect();
        // Cold: compiled from source with no cache, side by side as a first run compiles them.
        let cold = modules::compile_side_by_side(&compiler.uncached(), kind, &names);
        let mut files = Vec::new();
        for (file, (image, compile_s)) in names.into_iter().zip(cold.files) {
            let image = image?;
            // The warm start reads what a first run stored (stored here if this is the first run).
            if compiler.cached_file(file, kind)?.is_none() {
                compiler.cache_file(file, kind, &image)?;
            }
            let started = Instant::now();
            let cached = compiler.cached_file(file, kind)?;
            let cache_read_s = cached.is_some().then(|| seconds(started));
            let started = Instant::now();
            self.modules.insert_image(file, cached.as_deref().unwrap_or(&image))?;
            self.driver.synchronize()?;
            files.push(KernelFileStartUp {
                file: file.to_string(),
                compile_s,
                cache_read_s,
                load_s: seconds(started),
                image_bytes: image.len(),
            });
        }
        Ok(Some(KernelStartUp { files, cold_compile_wall_s: cold.wall_s, compile_workers: cold.workers }))
    }

    fn zeros_as(&self, shape: &[usize], dtype: Precision) -> Result<CudaTensor> {
        let t = allocate(&self.driver, &self.memory, shape, dtype)?;
        let words = (t.bytes().max(4)).div_ceil(4);
        self.driver.memset_u32(t.ptr, 0, words)?;
        Ok(t)
    }

    fn upload_as(&self, data: &[f32], shape: &[usize], dtype: Precision) -> Result<CudaTensor> {
        let elements: usize = shape.iter().product();
        if data.len() != elements {
            return Err(Error::invalid(format!(
                "upload: {} values for shape {shape:?}, which holds {elements}",
                data.len()
            )));
        }
        let t = allocate(&self.driver, &self.memory, shape, dtype)?;
        self.driver.copy_to_device(t.ptr, &encode(&to_storage_order(data, shape), dtype))?;
        Ok(t)
    }

    fn write(&self, dst: &mut CudaTensor, data: &[f32]) -> Result<()> {
        if data.len() != dst.len() {
            return Err(Error::invalid(format!(
                "write: {} values into a tensor of shape {:?}, which holds {}",
                data.len(),
                dst.shape,
                dst.len()
            )));
        }
        self.driver.copy_to_device(dst.ptr, &encode(&to_storage_order(data, &dst.shape), dst.dtype))?;
        Ok(())
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.synchronize()?;
        let mut bytes = vec![0u8; t.bytes()];
        self.driver.copy_to_host(t.ptr, &mut bytes)?;
        Ok(from_storage_order(&decode(&bytes, t.dtype), &t.shape))
    }

    fn copy(&self, src: &CudaTensor, dst: &mut CudaTensor) {
        if !self.check_shape(dst, &src.shape, "copy: dst") {
            return;
        }
        if src.dtype == dst.dtype {
            self.record(self.driver.copy_device_to_device(dst.ptr, src.ptr, src.bytes()).map_err(Into::into));
        } else {
            let n = src.len();
            self.elementwise("convert", n, KernelArgs::new().tensor(src).tensor(dst).u64(n as u64));
        }
    }

    fn fill(&self, t: &mut CudaTensor, value: f32) {
        let n = t.len();
        if t.dtype == Precision::F32 {
            self.record(self.driver.memset_u32(t.ptr, value.to_bits(), n).map_err(Into::into));
        } else {
            self.elementwise("fill", n, KernelArgs::new().tensor(t).u64(n as u64).f32(value));
        }
    }

    fn add_assign(&self, dst: &mut CudaTensor, src: &CudaTensor) {
        if self.check_shape(src, &dst.shape, "add_assign: src") {
            let n = dst.len();
            self.elementwise("add_assign", n, KernelArgs::new().tensor(dst).tensor(src).u64(n as u64));
        }
    }

    fn timestep_embedding(&self, t: &CudaTensor, out: &mut CudaTensor) {
        let (&[n], &[out_n, dim]) = (&t.shape[..], &out.shape[..]) else {
            return self.fail(Error::invalid(format!(
                "timestep_embedding: t {:?} must be (N) and out {:?} (N x dim)",
                t.shape, out.shape
            )));
        };
        let ok = self.check(out_n == n && dim % 2 == 0 && dim >= 4 && t.dtype == Precision::F32, || {
            format!("timestep_embedding: out {:?} for t {:?} ({}; dim even, >= 4)", out.shape, t.shape, t.dtype)
        });
        if ok {
            let args = KernelArgs::new().ptr(t.ptr).tensor(out).i32(n as i32).i32(dim as i32);
            self.launch("embedding.cu", "timestep_embedding", self.grid_for(n * dim), args);
        }
    }

    fn linear(&self, x: &CudaTensor, w: &CudaTensor, b: Option<&CudaTensor>, silu_input: bool, out: &mut CudaTensor) {
        let (&[n, fin], &[fout, w_in]) = (&x.shape[..], &w.shape[..]) else {
            return self.fail(Error::invalid(format!("linear: x {:?}, w {:?} must be 2-D", x.shape, w.shape)));
        };
        let ok = self.check(w_in == fin, || format!("linear: w {:?} for x {:?}", w.shape, x.shape))
            && self.check_shape(out, &[n, fout], "linear: out")
            && b.is_none_or(|b| {
                self.check(b.shape == [fout] && b.dtype == Precision::F32, || {
                    format!("linear: bias {:?} {} (expected [{fout}] f32)", b.shape, b.dtype)
                })
            });
        // kernels/embedding.cu's tile: its samples' inputs in shared memory a block of 8 warps.
        let tile = linear_tile(n);
        let shared = tile * fin * 4;
        let ok = ok
            && self.check(shared <= 48 << 10, || {
                format!(
                    "linear: {fin} inputs at batch {n} (at most {} staged in a block's 48 KiB)",
                    (48 << 10) / (4 * tile)
                )
            });
        if ok {
            let config = LaunchConfig {
                grid: [fout.div_ceil(LINEAR_WARPS) as u32, n.div_ceil(tile) as u32, 1],
                block: [LINEAR_WARPS as u32 * 32, 1, 1],
                dynamic_shared_bytes: shared as u32,
            };
            let args = KernelArgs::new()
                .tensor(x)
                .tensor(w)
                .ptr(b.map_or(0, |b| b.ptr))
                .tensor(out)
                .i32(n as i32)
                .i32(fin as i32)
                .i32(fout as i32)
                .i32(silu_input as i32)
                .i32(tile as i32);
            self.launch("embedding.cu", "linear", config, args);
        }
    }

    fn linear_backward(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        silu_input: bool,
        dout: &CudaTensor,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        let (&[n, fin], &[fout, w_in]) = (&x.shape[..], &w.shape[..]) else {
            return self.fail(Error::invalid(format!("linear_backward: x {:?}, w {:?} must be 2-D", x.shape, w.shape)));
        };
        let ok = self.check(w_in == fin, || format!("linear_backward: w {:?} for x {:?}", w.shape, x.shape))
            && self.check_shape(dout, &[n, fout], "linear_backward: dout")
            && self.check_shape(dx, &x.shape, "linear_backward: dx");
        if ok {
            let args = KernelArgs::new()
                .tensor(x)
                .tensor(w)
                .tensor(dout)
                .tensor(dx)
                .i32(n as i32)
                .i32(fin as i32)
                .i32(fout as i32)
                .i32(silu_input as i32)
                .i32(store.accumulates() as i32);
            self.launch("embedding.cu", "linear_backward", self.grid_for(n * fin), args);
        }
    }

    fn group_norm(
        &self,
        x: LayerInput<'_, CudaTensor>,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        groups: usize,
        eps: f32,
        silu: bool,
        out: &mut CudaTensor,
        stats: &mut CudaTensor,
    ) {
        let Some(shape) = self.group_norm_operands("group_norm", x, gamma, beta, stats, groups) else { return };
        let [n, c, h, w] = shape;
        let (ca, cb) = (x.a.shape[1], c - x.a.shape[1]);
        if !self.check_shape(out, &shape, "group_norm: out") {
            return;
        }
        let pixels = h * w;
        let launch = groupnorm_launch(ca, cb, groups, x.a.dtype.bytes());
        let groups_per_block = launch.groups_per_block;
        let b_ptr = x.b.map_or(0, |b| b.ptr);
        let f32 = Precision::F32;
        let pointers =
            [(x.a.ptr, x.a.dtype), (b_ptr, x.a.dtype), (out.ptr, out.dtype), (gamma.ptr, f32), (beta.ptr, f32)];
        let vec = aligned_vec(launch.vec, &pointers);
        let Some(partials) = self.groupnorm_partials(&launch, vec, n, groups, pixels, "group_norm") else { return };
        let chunks = partials.chunks;
        let shape_bytes = groupnorm_shape_bytes([n, pixels, ca, cb, groups, chunks, groups_per_block]);
        let dt = dtype_code(x.a.dtype);
        let fused = groupnorm_fuses_apply(&partials, &launch, pixels);
        let partial = KernelArgs::new()
            .ptr(x.a.ptr)
            .i32(dt)
            .ptr(b_ptr)
            .i32(dt)
            .ptr(self.groupnorm_partials.ptr)
            .ptr(self.groupnorm_arrivals.ptr)
            .ptr(stats.ptr)
            .f32(eps)
            .ptr(gamma.ptr)
            .ptr(beta.ptr)
            .ptr(if fused { out.ptr } else { 0 })
            .i32(dtype_code(out.dtype))
            .i32(silu as i32)
            .i32(partials.vec)
            .bytes(&shape_bytes);
        let grid = LaunchConfig {
            grid: [chunks as u32, (groups / groups_per_block) as u32, n as u32],
            block: [partials.block, 1, 1],
            dynamic_shared_bytes: 0,
        };
        self.launch("groupnorm.cu", "groupnorm_partial_stats", grid, partial);
        if fused {
            return;
        }
        let apply = KernelArgs::new()
            .ptr(x.a.ptr)
            .i32(dt)
            .ptr(b_ptr)
            .i32(dt)
            .ptr(stats.ptr)
            .ptr(gamma.ptr)
            .ptr(beta.ptr)
            .tensor(out)
            .i32(silu as i32)
            .i32(vec)
            .bytes(&shape_bytes);
        let sms = self.driver.info().multiprocessors as usize;
        self.launch("groupnorm.cu", "groupnorm_apply", groupnorm_apply_config(c, vec, n, pixels, sms), apply);
    }

    fn group_norm_backward(
        &self,
        x: LayerInput<'_, CudaTensor>,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        stats: &CudaTensor,
        groups: usize,
        silu: bool,
        dout: &CudaTensor,
        dx: LayerGradient<'_, CudaTensor>,
    ) {
        let Some(shape) = self.group_norm_operands("group_norm_backward", x, gamma, beta, stats, groups) else {
            return;
        };
        let [n, c, h, w] = shape;
        let (ca, cb) = (x.a.shape[1], c - x.a.shape[1]);
        let ok = self.check_shape(dout, &shape, "group_norm_backward: dout")
            && self.check_shape(dx.a, &x.a.shape, "group_norm_backward: dx")
            && self.check(dx.b.is_some() == x.b.is_some(), || {
                "group_norm_backward: dx must be split as x is (one tensor or a concat's two)".into()
            })
            && x.b
                .zip(dx.b.as_ref())
                .is_none_or(|(b, (db, _))| self.check_shape(db, &b.shape, "group_norm_backward: dx"))
            && dx.plus.is_none_or(|p| self.check_shape(p, &shape, "group_norm_backward: plus"))
            && dx.a_copy.as_ref().is_none_or(|c| self.check_shape(c, &x.a.shape, "group_norm_backward: copy of dx"));
        if !ok {
            return;
        }
        let pixels = h * w;
        // Whole sectors of x, the narrower of x and dout.
        let element_bytes = x.a.dtype.bytes().min(dout.dtype.bytes());
        let launch = groupnorm_launch(ca, cb, groups, element_bytes);
        let groups_per_block = launch.groups_per_block;
        let f32 = Precision::F32;
        let b_ptr = x.b.map_or(0, |b| b.ptr);
        let (db_ptr, db_dtype, db_store) =
            dx.b.as_ref().map_or((0, f32, GradientStore::Write), |(b, store)| (b.ptr, b.dtype, *store));
        let (plus_ptr, plus_dtype) = dx.plus.map_or((0, f32), |p| (p.ptr, p.dtype));
        let (copy_ptr, copy_dtype) = dx.a_copy.as_ref().map_or((0, f32), |c| (c.ptr, c.dtype));
        let pointers = [
            (x.a.ptr, x.a.dtype),
            (b_ptr, x.a.dtype),
            (dout.ptr, dout.dtype),
            (dx.a.ptr, dx.a.dtype),
            (db_ptr, db_dtype),
            (plus_ptr, plus_dtype),
            (copy_ptr, copy_dtype),
            (gamma.ptr, f32),
            (beta.ptr, f32),
        ];
        let vec = aligned_vec(launch.vec, &pointers);
        let Some(partials) = self.groupnorm_partials(&launch, vec, n, groups, pixels, "group_norm_backward") else {
            return;
        };
        let chunks = partials.chunks;
        let shape_bytes = groupnorm_shape_bytes([n, pixels, ca, cb, groups, chunks, groups_per_block]);
        let dt = dtype_code(x.a.dtype);
        let inputs = || {
            KernelArgs::new()
                .ptr(x.a.ptr)
                .i32(dt)
                .ptr(b_ptr)
                .i32(dt)
                .tensor(dout)
                .ptr(stats.ptr)
                .ptr(gamma.ptr)
                .ptr(beta.ptr)
                .i32(silu as i32)
                .ptr(self.groupnorm_partials.ptr)
        };
        let grid = LaunchConfig {
            grid: [chunks as u32, (groups / groups_per_block) as u32, n as u32],
            block: [partials.block, 1, 1],
            dynamic_shared_bytes: 0,
        };
        // kernels/groupnorm.cu's GradientSplit: four pointers, then six ints.
        let mut split = Vec::with_capacity(56);
        for ptr in [dx.a.ptr, db_ptr, plus_ptr, copy_ptr] {
            split.extend(ptr.to_le_bytes());
        }
        let codes = [dx.a.dtype, db_dtype, plus_dtype, copy_dtype].map(dtype_code);
        let accumulates = [dx.a_store.accumulates() as i32, db_store.accumulates() as i32];
        for v in codes.into_iter().chain(accumulates) {
            split.extend(v.to_le_bytes());
        }
        let fused = groupnorm_fuses_apply(&partials, &launch, pixels);
        let partial = inputs()
            .ptr(self.groupnorm_arrivals.ptr)
            .bytes(&split)
            .i32(fused as i32)
            .i32(partials.vec)
            .bytes(&shape_bytes);
        self.launch("groupnorm.cu", "groupnorm_backward_partial", grid, partial);
        if fused {
            return;
        }
        let apply = inputs().bytes(&split).i32(vec).bytes(&shape_bytes);
        let config = groupnorm_apply_config(c, vec, n, pixels, self.driver.info().multiprocessors as usize);
        self.launch("groupnorm.cu", "groupnorm_backward_apply", config, apply);
    }

    fn conv2d(
        &self,
        x: LayerInput<'_, CudaTensor>,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        geometry: Conv2dGeometry,
        epilogue: ConvEpilogue<'_, CudaTensor>,
        out: &mut CudaTensor,
    ) {
        let upsampling = if x.upsample2x { Upsampling::Nearest } else { Upsampling::None };
        self.launch_conv2d(x, w, bias, geometry, upsampling, epilogue, out);
    }

    fn conv2d_backward_input(
        &self,
        dout: &CudaTensor,
        w: &CudaTensor,
        geometry: Conv2dGeometry,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        self.launch_conv2d_backward_input(dout, w, geometry, false, dx, store);
    }

    fn upsample_conv2d(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        epilogue: ConvEpilogue<'_, CudaTensor>,
        out: &mut CudaTensor,
    ) {
        if self.check_subpixel_weights(w, "upsample_conv2d") {
            let same = Conv2dGeometry::same(1);
            self.launch_conv2d(LayerInput::one(x), w, bias, same, Upsampling::SubPixel, epilogue, out);
        }
    }

    fn upsample_conv2d_backward_input(
        &self,
        dout: &CudaTensor,
        w: &CudaTensor,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        if self.check_subpixel_weights(w, "upsample_conv2d_backward_input") {
            self.launch_conv2d_backward_input(dout, w, Conv2dGeometry::same(1), true, dx, store);
        }
    }

    fn attention(&self, qkv: &CudaTensor, out: &mut CudaTensor, logsumexp: &mut CudaTensor) {
        let Some([n, c, h, w]) = self.attention_dims(qkv, "attention: qkv") else { return };
        let ok = self.check_shape(out, &[n, c, h, w], "attention: out")
            && self.check_shape(logsumexp, &[n, h * w], "attention: logsumexp")
            && self.check(out.dtype == qkv.dtype && logsumexp.dtype == Precision::F32, || {
                "attention: qkv and out share one storage type; logsumexp is f32".into()
            });
        if !ok {
            return;
        }
        let args = attention_launch(qkv, c, h * w, out, logsumexp);
        // The split-K workspace is free between ops (the stream is in order): a key split's parts.
        let workspace = self.split_k_workspace();
        let result = self
            .attention_kernels()
            .and_then(|kernels| attention::launch_attention(self.driver.as_ref(), kernels, &args, workspace.as_ref()));
        self.record(result);
    }

    fn attention_backward(
        &self,
        qkv: &CudaTensor,
        out: &CudaTensor,
        logsumexp: &CudaTensor,
        dout: &CudaTensor,
        scratch: AttentionScratch<'_, CudaTensor>,
        dqkv: &mut CudaTensor,
        store: GradientStore,
    ) {
        let Some([n, c, h, w]) = self.attention_dims(qkv, "attention_backward: qkv") else { return };
        let positions = h * w;
        let AttentionScratch { row_terms, dout_rounded } = scratch;
        let ok = self.check_shape(out, &[n, c, h, w], "attention_backward: out")
            && self.check_shape(dout, &out.shape, "attention_backward: dout")
            && self.check_shape(dqkv, &qkv.shape, "attention_backward: dqkv")
            && self.check_shape(logsumexp, &[n, positions], "attention_backward: logsumexp")
            && self.check_shape(row_terms, &[n, positions], "attention_backward: row_terms")
            && self.check_shape(dout_rounded, &out.shape, "attention_backward: dout_rounded")
            && self.check(
                [out.dtype, dout_rounded.dtype].iter().all(|&d| d == qkv.dtype)
                    && logsumexp.dtype == Precision::F32
                    && row_terms.dtype == Precision::F32,
                || {
                    "attention_backward: qkv, out and dout_rounded share one storage type; logsumexp and row_terms \
                     are f32"
                        .into()
                },
            )
            && self.check(n <= 65535 && positions <= i32::MAX as usize, || {
                format!("attention_backward: batch {n} or {positions} positions over the grid limits")
            });
        if !ok || qkv.is_empty() {
            return;
        }
        let [dq, dk, dv] = thirds(dqkv, c);
        let launch = attention::AttentionBackwardLaunch {
            forward: attention_launch(qkv, c, positions, out, logsumexp),
            dout: dout.ptr,
            dout_dtype: dout.dtype,
            row_terms: row_terms.ptr,
            dout_rounded: dout_rounded.ptr,
            dq,
            dq_dtype: dqkv.dtype,
            dk,
            dk_dtype: dqkv.dtype,
            dv,
            dv_dtype: dqkv.dtype,
            grad_stride: 3 * c,
            accumulate: store.accumulates(),
        };
        // The split-K workspace is free between ops: a split's parts (`backward_splits`). The tensor
        // cores where they fit, else (f32, or a device with too little shared memory for their
        // tiles) kernels/attention.cu's backward.
        let workspace = self.split_k_workspace();
        let tensor_cores = launch.tensor_cores_fit(self.driver.info().max_shared_per_block);
        let splits = attention::backward_splits(&launch, tensor_cores, workspace.as_ref());
        let result = self.attention_kernels().and_then(|kernels| {
            let run = if tensor_cores {
                attention::launch_attention_backward_mma
            } else {
                attention::launch_attention_backward_simt
            };
            run(self.driver.as_ref(), kernels, &launch, splits, workspace.as_ref())
        });
        self.record(result);
    }

    fn upsample_nearest2x(&self, x: &CudaTensor, out: &mut CudaTensor) {
        let Some([n, c, h, w]) = self.nchw(x, "upsample_nearest2x: x") else { return };
        if self.check_shape(out, &[n, c, 2 * h, 2 * w], "upsample_nearest2x: out") {
            let args = KernelArgs::new().tensor(x).tensor(out).i32(n as i32).i32(h as i32).i32(w as i32).i32(c as i32);
            self.elementwise("upsample_nearest2x", out.len(), args);
        }
    }

    fn upsample_nearest2x_backward(&self, dout: &CudaTensor, dx: &mut CudaTensor, store: GradientStore) {
        let Some([n, c, h, w]) = self.nchw(dx, "upsample_nearest2x_backward: dx") else { return };
        if self.check_shape(dout, &[n, c, 2 * h, 2 * w], "upsample_nearest2x_backward: dout") {
            let args = KernelArgs::new()
                .tensor(dout)
                .tensor(dx)
                .i32(n as i32)
                .i32(h as i32)
                .i32(w as i32)
                .i32(c as i32)
                .i32(store.accumulates() as i32);
            self.elementwise("upsample_nearest2x_backward", dx.len(), args);
        }
    }

    fn channel_affine(&self, x: &CudaTensor, scale: &CudaTensor, shift: &CudaTensor, out: &mut CudaTensor) {
        let c = x.shape.get(1).copied().unwrap_or(0);
        let ok = self.check(x.shape.len() >= 2, || format!("channel_affine: x {:?} has no channels", x.shape))
            && self.check_shape(scale, &[c], "channel_affine: scale")
            && self.check_shape(shift, &[c], "channel_affine: shift")
            && self.check(scale.dtype == Precision::F32 && shift.dtype == Precision::F32, || {
                "channel_affine: scale and shift must be f32".into()
            })
            && self.check_shape(out, &x.shape, "channel_affine: out")
            && self.check(x.shape.len() == 4 || x.shape.len() == 2, || {
                format!("channel_affine: x {:?}: 2-D or 4-D tensors only", x.shape)
            });
        if ok {
            let n = x.len();
            let args =
                KernelArgs::new().tensor(x).ptr(scale.ptr).ptr(shift.ptr).tensor(out).u64(n as u64).i32(c as i32);
            self.elementwise("channel_affine", n, args);
        }
    }

    fn channel_affine_backward(
        &self,
        dout: &CudaTensor,
        scale: &CudaTensor,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        let c = dx.shape.get(1).copied().unwrap_or(0);
        let ok = self.check(dx.shape.len() == 4 || dx.shape.len() == 2, || {
            format!("channel_affine_backward: dx {:?}: 2-D or 4-D tensors only", dx.shape)
        }) && self.check_shape(scale, &[c], "channel_affine_backward: scale")
            && self.check(scale.dtype == Precision::F32, || "channel_affine_backward: scale must be f32".into())
            && self.check_shape(dout, &dx.shape, "channel_affine_backward: dout");
        if ok {
            let n = dx.len();
            let args = KernelArgs::new()
                .tensor(dout)
                .ptr(scale.ptr)
                .tensor(dx)
                .u64(n as u64)
                .i32(c as i32)
                .i32(store.accumulates() as i32);
            self.elementwise("channel_affine_backward", n, args);
        }
    }

    fn relu(&self, x: &mut CudaTensor) {
        let n = x.len();
        self.elementwise("relu_inplace", n, KernelArgs::new().tensor(x).u64(n as u64));
    }

    fn relu_backward(&self, y: &CudaTensor, dy: &CudaTensor, dx: &mut CudaTensor, store: GradientStore) {
        if self.check_shape(dy, &y.shape, "relu_backward: dy") && self.check_shape(dx, &y.shape, "relu_backward: dx") {
            let n = y.len();
            let accumulate = store.accumulates() as i32;
            let args = KernelArgs::new().tensor(y).tensor(dy).tensor(dx).u64(n as u64).i32(accumulate);
            self.elementwise("relu_backward", n, args);
        }
    }

    fn shortcut_subsample_pad(&self, x: &CudaTensor, pad: usize, out: &mut CudaTensor) {
        let Some([n, c, h, w]) = self.nchw(x, "shortcut_subsample_pad: x") else { return };
        if self.check_shape(out, &[n, c + 2 * pad, h.div_ceil(2), w.div_ceil(2)], "shortcut_subsample_pad: out") {
            let args = KernelArgs::new()
                .tensor(x)
                .tensor(out)
                .i32(n as i32)
                .i32(h as i32)
                .i32(w as i32)
                .i32(c as i32)
                .i32(pad as i32);
            self.elementwise("shortcut_subsample_pad", out.len(), args);
        }
    }

    fn shortcut_subsample_pad_backward(
        &self,
        dout: &CudaTensor,
        pad: usize,
        dx: &mut CudaTensor,
        store: GradientStore,
    ) {
        let Some([n, c, h, w]) = self.nchw(dx, "shortcut_subsample_pad_backward: dx") else { return };
        let expected = [n, c + 2 * pad, h.div_ceil(2), w.div_ceil(2)];
        if self.check_shape(dout, &expected, "shortcut_subsample_pad_backward: dout") {
            let args = KernelArgs::new()
                .tensor(dout)
                .tensor(dx)
                .i32(n as i32)
                .i32(h as i32)
                .i32(w as i32)
                .i32(c as i32)
                .i32(pad as i32)
                .i32(store.accumulates() as i32);
            // Writing visits every dx element, accumulating only the even positions.
            let threads = if store.accumulates() { n * h.div_ceil(2) * w.div_ceil(2) * c } else { dx.len() };
            self.elementwise("shortcut_subsample_pad_backward", threads, args);
        }
    }

    fn global_avg_pool(&self, x: &CudaTensor, out: &mut CudaTensor) {
        let Some([n, c, h, w]) = self.nchw(x, "global_avg_pool: x") else { return };
        if self.check_shape(out, &[n, c], "global_avg_pool: out") {
            let args = KernelArgs::new().tensor(x).tensor(out).i32(n as i32).i32((h * w) as i32).i32(c as i32);
            self.elementwise("global_avg_pool", n * c, args);
        }
    }

    fn global_avg_pool_backward(&self, dout: &CudaTensor, dx: &mut CudaTensor, store: GradientStore) {
        let Some([n, c, h, w]) = self.nchw(dx, "global_avg_pool_backward: dx") else { return };
        if self.check_shape(dout, &[n, c], "global_avg_pool_backward: dout") {
            let args = KernelArgs::new()
                .tensor(dout)
                .tensor(dx)
                .i32(n as i32)
                .i32((h * w) as i32)
                .i32(c as i32)
                .i32(store.accumulates() as i32);
            self.elementwise("global_avg_pool_backward", dx.len(), args);
        }
    }

    fn axpby(&self, a: f32, x: &CudaTensor, b: f32, y: &CudaTensor, out: &mut CudaTensor) {
        if self.check_shape(y, &x.shape, "axpby: y") && self.check_shape(out, &x.shape, "axpby: out") {
            let n = x.len();
            let args = KernelArgs::new().f32(a).tensor(x).f32(b).tensor(y).tensor(out).u64(n as u64);
            self.elementwise("axpby", n, args);
        }
    }

    fn clamp(&self, x: &mut CudaTensor, lo: f32, hi: f32) {
        if self.check(lo <= hi, || format!("clamp: lo {lo} > hi {hi}")) {
            let n = x.len();
            self.elementwise("clamp_inplace", n, KernelArgs::new().tensor(x).u64(n as u64).f32(lo).f32(hi));
        }
    }

    fn clamp_backward(&self, x: &CudaTensor, lo: f32, hi: f32, grad: &mut CudaTensor) {
        if self.check_shape(grad, &x.shape, "clamp_backward: grad") {
            let n = x.len();
            let args = KernelArgs::new().tensor(x).f32(lo).f32(hi).tensor(grad).u64(n as u64);
            self.elementwise("clamp_backward", n, args);
        }
    }

    fn fill_gaussian(&self, out: &mut CudaTensor, image_indices: &CudaTensor, seed: u64, stream: u64) {
        if !self.check_image_indices(image_indices, out, "fill_gaussian") || out.is_empty() {
            return;
        }
        let (layout, grid) = self.noise_layout(out);
        let args = KernelArgs::new().tensor(out).ptr(image_indices.ptr).append(layout).u64(seed).u64(stream);
        self.launch("diffusion.cu", "fill_gaussian", grid, args);
    }

    fn step_unet_indices(&self, step: StepSource<'_, CudaTensor>, t: &mut CudaTensor) {
        let Some(step_args) = self.step_args(step, "step_unet_indices") else { return };
        let ok = self.check(t.shape.len() == 1 && t.dtype == Precision::F32, || {
            format!("step_unet_indices: t must be an f32 vector, got {:?} {}", t.shape, t.dtype)
        });
        if ok {
            let n = t.len();
            self.launch("diffusion.cu", "step_unet_indices", self.grid_for(n), step_args.ptr(t.ptr).i32(n as i32));
        }
    }

    fn advance_step_cursor(&self, cursor: &mut CudaTensor, by: i32) {
        let ok = self.check_shape(cursor, &[1], "advance_step_cursor: cursor")
            && self.check(cursor.dtype == Precision::F32, || "advance_step_cursor: the cursor must be f32".into());
        if ok {
            let args = KernelArgs::new().ptr(cursor.ptr).i32(by);
            self.launch("diffusion.cu", "advance_step_cursor", LaunchConfig::linear(1, 32), args);
        }
    }

    fn axpby_step(
        &self,
        step: StepSource<'_, CudaTensor>,
        a: StepColumn,
        x: &CudaTensor,
        b: StepColumn,
        y: &CudaTensor,
        out: &mut CudaTensor,
    ) {
        let Some(step_args) = self.step_args(step, "axpby_step") else { return };
        if self.check_shape(y, &x.shape, "axpby_step: y") && self.check_shape(out, &x.shape, "axpby_step: out") {
            let n = x.len();
            let args = step_args.i32(a as i32).tensor(x).i32(b as i32).tensor(y).tensor(out).u64(n as u64);
            self.launch("diffusion.cu", "axpby_step", self.grid_for(n), args);
        }
    }

    fn q_sample(
        &self,
        x: &CudaTensor,
        image_indices: &CudaTensor,
        step: StepSource<'_, CudaTensor>,
        x_t: &mut CudaTensor,
    ) {
        let Some(step_args) = self.step_args(step, "q_sample") else { return };
        if !self.check_shape(x_t, &x.shape, "q_sample: x_t")
            || !self.check_image_indices(image_indices, x_t, "q_sample")
            || x_t.is_empty()
        {
            return;
        }
        let (layout, grid) = self.noise_layout(x_t);
        let args = KernelArgs::new().tensor(x).ptr(image_indices.ptr).append(step_args).tensor(x_t).append(layout);
        self.launch("diffusion.cu", "q_sample", grid, args);
    }

    fn reverse_step(
        &self,
        x_t: &mut CudaTensor,
        eps: &CudaTensor,
        delta: Option<&CudaTensor>,
        image_indices: &CudaTensor,
        step: StepSource<'_, CudaTensor>,
    ) {
        let Some(step_args) = self.step_args(step, "reverse_step") else { return };
        let ok = self.check_shape(eps, &x_t.shape, "reverse_step: eps")
            && delta.is_none_or(|d| self.check_shape(d, &x_t.shape, "reverse_step: delta"))
            && self.check_image_indices(image_indices, x_t, "reverse_step");
        if !ok || x_t.is_empty() {
            return;
        }
        let (layout, grid) = self.noise_layout(x_t);
        let (delta_ptr, delta_dtype) = delta.map_or((0, 0), |d| (d.ptr, dtype_code(d.dtype)));
        let args = KernelArgs::new()
            .tensor(x_t)
            .tensor(eps)
            .ptr(delta_ptr)
            .i32(delta_dtype)
            .ptr(image_indices.ptr)
            .append(step_args)
            .append(layout);
        self.launch("diffusion.cu", "reverse_step", grid, args);
    }

    fn predict_x0_and_mean(
        &self,
        x_t: &CudaTensor,
        eps: &CudaTensor,
        step: StepSource<'_, CudaTensor>,
        x0_hat: &mut CudaTensor,
        mu: &mut CudaTensor,
    ) {
        let Some(step_args) = self.step_args(step, "predict_x0_and_mean") else { return };
        let ok = self.check_shape(eps, &x_t.shape, "predict_x0_and_mean: eps")
            && self.check_shape(x0_hat, &x_t.shape, "predict_x0_and_mean: x0_hat")
            && self.check_shape(mu, &x_t.shape, "predict_x0_and_mean: mu");
        if ok {
            let n = x_t.len();
            let args =
                KernelArgs::new().tensor(x_t).tensor(eps).tensor(x0_hat).tensor(mu).u64(n as u64).append(step_args);
            self.launch("diffusion.cu", "predict_x0_and_mean", self.grid_for(n), args);
        }
    }

    fn mask_clipped(&self, x_t: &CudaTensor, eps: &CudaTensor, step: StepSource<'_, CudaTensor>, u: &mut CudaTensor) {
        let Some(step_args) = self.step_args(step, "mask_clipped") else { return };
        if self.check_shape(eps, &x_t.shape, "mask_clipped: eps") && self.check_shape(u, &x_t.shape, "mask_clipped: u")
        {
            let n = x_t.len();
            let args = KernelArgs::new().tensor(x_t).tensor(eps).tensor(u).u64(n as u64).append(step_args);
            self.launch("diffusion.cu", "mask_clipped", self.grid_for(n), args);
        }
    }

    fn constrain_guidance(&self, delta: &mut CudaTensor, x_t: &CudaTensor, mu: &CudaTensor, kappa: f32) {
        let ok = self.check_shape(x_t, &delta.shape, "constrain_guidance: x_t")
            && self.check_shape(mu, &delta.shape, "constrain_guidance: mu")
            && self.check(delta.shape.first().is_some_and(|&n| n > 0), || "constrain_guidance: no batch".into())
            && self.check(kappa >= 0.0, || format!("constrain_guidance: kappa {kappa} must be >= 0"));
        if !ok || kappa == f32::INFINITY {
            return;
        }
        let batch = delta.shape[0];
        let sample_len = delta.len() / batch;
        let args = KernelArgs::new().tensor(delta).tensor(x_t).tensor(mu).u64(sample_len as u64).f32(kappa);
        self.launch("diffusion.cu", "constrain_guidance", LaunchConfig::linear(batch as u32, THREADS), args);
    }

    fn guidance_objective_grad(
        &self,
        features: &CudaTensor,
        reference_features: &CudaTensor,
        logits: &CudaTensor,
        labels: &CudaTensor,
        lambda_f: f32,
        lambda_c: f32,
        dfeatures: &mut CudaTensor,
        dlogits: &mut CudaTensor,
    ) {
        let (&[n, f], &[logits_n, k]) = (&features.shape[..], &logits.shape[..]) else {
            return self.fail(Error::invalid("guidance_objective_grad: features and logits must be 2-D"));
        };
        let ok = self.check(logits_n == n, || format!("guidance_objective_grad: logits {:?}", logits.shape))
            && self.check_shape(reference_features, &features.shape, "guidance_objective_grad: reference_features")
            && self.check_shape(labels, &[n], "guidance_objective_grad: labels")
            && self.check(labels.dtype == Precision::F32, || "guidance_objective_grad: labels must be f32".into())
            && self.check_shape(dfeatures, &features.shape, "guidance_objective_grad: dfeatures")
            && self.check_shape(dlogits, &logits.shape, "guidance_objective_grad: dlogits");
        if ok {
            let args = KernelArgs::new()
                .tensor(features)
                .tensor(reference_features)
                .tensor(logits)
                .ptr(labels.ptr)
                .f32(lambda_f)
                .f32(lambda_c)
                .tensor(dfeatures)
                .tensor(dlogits)
                .i32(n as i32)
                .i32(f as i32)
                .i32(k as i32);
            self.launch("diffusion.cu", "guidance_objective_grad", self.grid_for(n * f), args);
        }
    }

    fn cross_entropy_grad(&self, logits: &CudaTensor, labels: &CudaTensor, dlogits: &mut CudaTensor) {
        let &[n, k] = &logits.shape[..] else {
            return self.fail(Error::invalid("cross_entropy_grad: logits must be 2-D"));
        };
        let ok = self.check_shape(labels, &[n], "cross_entropy_grad: labels")
            && self.check(labels.dtype == Precision::F32, || "cross_entropy_grad: labels must be f32".into())
            && self.check_shape(dlogits, &logits.shape, "cross_entropy_grad: dlogits");
        if ok {
            let args = KernelArgs::new().tensor(logits).ptr(labels.ptr).tensor(dlogits).i32(n as i32).i32(k as i32);
            self.launch("diffusion.cu", "cross_entropy_grad", self.grid_for(n), args);
        }
    }
}
