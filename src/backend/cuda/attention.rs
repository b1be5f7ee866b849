//! Host launcher of kernels/attention.cu: fused single-head attention over the H*W positions
//! (flash-style; the per-query log-sum-exp saved in f32 for the backward).
//!
//! Written against the driver only: the CUDA backend fills an `AttentionLaunch` and calls
//! `launch_attention`. Shapes are checked here; nothing is launched on an error.
use super::compile::HalfTypes;
use super::conv::SplitKWorkspace;
use super::modules::KernelTable;
use crate::backend::Precision;
use crate::driver::{DevicePtr, Driver, Function, KernelArgs, LaunchConfig, Module};
use crate::error::{Error, Result};

/// One attention: q, k, v and out are N x L x C (NHWC, L = H*W) in `dtype`; logsumexp is N x L f32.
/// q's, k's and v's rows are `qkv_stride` elements apart: C for tensors of their own, 3C for the
/// channel thirds of one N x L x 3C tensor (the UNet's fused q/k/v projection); out's C.
#[derive(Clone, Copy, Debug)]
pub struct AttentionLaunch {
    pub batch: usize,
    /// L = H*W.
    pub positions: usize,
    pub channels: usize,
    pub qkv_stride: usize,
    pub dtype: Precision,
    pub q: DevicePtr,
    pub k: DevicePtr,
    pub v: DevicePtr,
    pub out: DevicePtr,
    pub logsumexp: DevicePtr,
}

/// Queries per block and threads per block of attention_forward (kernels/attention.cu).
const QUERIES_PER_BLOCK: usize = 8;
const THREADS: u32 = 128;
const KEYS_PER_TILE: usize = 16;
/// The tensor-core forward's tiling (kernels/attention_mma.cu, `attention_mma`).
const MMA_FORWARD_WARPS: usize = 4;
const MMA_KEYS_PER_TILE: usize = 32;
/// The fewest key tiles a part of a key split takes (each part pays for loading its block's
/// queries; two tiles keep that under half of its work).
const MIN_SPLIT_TILES: usize = 2;
/// The key split's merge (kernels/attention_mma.cu).
const SPLIT_COMBINE_KERNEL: &str = "attention_split_combine";
const COMBINE_THREADS: u32 = 256;
/// The backward's split's sum of parts (kernels/attention.cu, for both modules' kernels).
const BACKWARD_SPLIT_REDUCE_KERNEL: &str = "attention_backward_split_reduce";
/// The register accumulator variants: `_c4`, `_c8`, `_c16` hold up to 64, 128, 256 channels.
const CHANNEL_VARIANTS: [usize; 3] = [4, 8, 16];
/// At most 256 channels: the SIMT forward's register accumulators and the split combine's (8 a lane).
pub const MAX_CHANNELS: usize = 256;

fn dtype_name(d: Precision) -> &'static str {
    match d {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// The kernel names of attention.cu (version 1, plain instructions, any storage type).
pub fn simt_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for d in ["f32", "f16", "bf16"] {
        for c in CHANNEL_VARIANTS {
            names.push(format!("attention_forward_{d}_c{c}"));
        }
    }
    names.extend(BACKWARD_KERNELS.map(String::from));
    // The splits' merges, which both modules' kernels use.
    names.extend([SPLIT_COMBINE_KERNEL, BACKWARD_SPLIT_REDUCE_KERNEL].map(String::from));
    names
}

/// The backward kernels of attention.cu (its backward section, `launch_attention_backward_simt`):
/// f32 SIMT, any storage type.
pub const BACKWARD_KERNELS: [&str; 2] = ["attention_backward_dq", "attention_backward_dkdv"];

/// Padded head dims of the tensor-core variants (`_d64`, `_d128`, `_d256`).
const MMA_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The kernel names of attention_mma.cu (version 2, tensor cores, bf16/f16): forward and backward.
pub fn mma_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for d in ["bf16", "f16"] {
        for dim in MMA_HEAD_DIMS {
            names.push(format!("attention_forward_mma_{d}_d{dim}"));
            names.push(format!("attention_backward_mma_{d}_d{dim}"));
        }
        names.push(format!("attention_backward_row_terms_{d}"));
    }
    names
}

/// The kernels hot enough that ptxas must not spill in them.
pub const SIMT_HOT_KERNELS: &[&str] = &["attention_forward_f32_c16", "attention_forward_f32_c8"];
pub const MMA_HOT_KERNELS: &[&str] = &[
    "attention_forward_mma_bf16_d128",
    "attention_forward_mma_f16_d128",
    "attention_forward_mma_bf16_d256",
    "attention_forward_mma_f16_d256",
    "attention_backward_mma_bf16_d128",
    "attention_backward_mma_bf16_d256",
];

/// Which kernel of the attention modules runs a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionVersion {
    /// Version 1 (attention.cu): f32 arithmetic, any storage type.
    Simt,
    /// Version 2 (attention_mma.cu): tensor cores, bf16/f16 with C a multiple of 8.
    TensorCore,
    /// Version 3: version 2 with the keys split into `splits` parts (grid z), each part's rows and
    /// log-sum-exp in f32 to the split-K workspace, merged by a second launch; for grids short of
    /// the GPU's SMs (batch 1: 16x16 positions are 4 blocks of 64 queries).
    TensorCoreSplitKeys { splits: usize },
    /// Version 1 with its keys split the same way (the f32 path; parts and merge as version 3's).
    SimtSplitKeys { splits: usize },
}

impl AttentionVersion {
    fn splits(self) -> Option<usize> {
        match self {
            AttentionVersion::TensorCoreSplitKeys { splits } | AttentionVersion::SimtSplitKeys { splits } => {
                Some(splits)
            }
            _ => None,
        }
    }
    fn tensor_cores(self) -> bool {
        matches!(self, AttentionVersion::TensorCore | AttentionVersion::TensorCoreSplitKeys { .. })
    }
}

impl AttentionLaunch {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("attention: {msg}")));
        if self.batch == 0 || self.positions == 0 || self.channels == 0 {
            return bad(format!(
                "empty input: batch {}, positions {}, channels {}",
                self.batch, self.positions, self.channels
            ));
        }
        if self.channels > MAX_CHANNELS {
            return bad(format!("{} channels; this kernel holds at most {MAX_CHANNELS}", self.channels));
        }
        if self.batch > 65535 {
            return bad(format!("batch {} over the grid limit 65535", self.batch));
        }
        if self.qkv_stride < self.channels || self.qkv_stride > i32::MAX as usize {
            return bad(format!("q, k, v rows {} elements apart, for {} channels", self.qkv_stride, self.channels));
        }
        if self.positions.div_ceil(QUERIES_PER_BLOCK) > i32::MAX as usize {
            return bad(format!("{} positions over the grid limit", self.positions));
        }
        let pointers = [
            ("q", self.q, self.dtype),
            ("k", self.k, self.dtype),
            ("v", self.v, self.dtype),
            ("out", self.out, self.dtype),
            ("logsumexp", self.logsumexp, Precision::F32),
        ];
        for (what, p, dtype) in pointers {
            if p == 0 {
                return bad(format!("null device pointer for `{what}`"));
            }
            if p % dtype.bytes() as u64 != 0 {
                return bad(format!("`{what}` at {p:#x} is not aligned to its {dtype} elements"));
            }
        }
        Ok(())
    }

    /// Whether the tensor-core kernel can run this launch.
    fn tensor_core_ok(&self) -> bool {
        self.dtype != Precision::F32
            && self.channels.is_multiple_of(8)
            && self.qkv_stride.is_multiple_of(8)
            && [self.q, self.k, self.v].iter().all(|p| p.is_multiple_of(16))
            && self.out.is_multiple_of(4)
    }

    /// Bytes of the split-K workspace a key split into `splits` parts fills: each part's rows and
    /// log-sum-exp, f32.
    fn split_bytes(&self, splits: usize) -> usize {
        splits * self.batch * self.positions * (self.channels + 1) * 4
    }

    /// Grid z of a launch with `version`: 1, or its parts where it splits the keys (2 or more, each
    /// with a tile of `keys_per_tile`).
    fn key_splits(&self, version: AttentionVersion, keys_per_tile: usize) -> Result<usize> {
        let Some(splits) = version.splits() else { return Ok(1) };
        let tiles = self.positions.div_ceil(keys_per_tile);
        // One part would write `out` itself, and the merge would then overwrite it.
        if splits < 2 || splits > tiles.min(65535) {
            return Err(Error::invalid(format!(
                "attention: {splits} key splits of {tiles} key tiles (2 parts or more, each with a tile)"
            )));
        }
        Ok(splits)
    }

    fn plan(&self, version: AttentionVersion) -> Result<(String, LaunchConfig)> {
        let c = self.channels;
        if version.tensor_cores() {
            if !self.tensor_core_ok() {
                return Err(Error::invalid(format!(
                    "attention: the tensor-core kernel needs bf16/f16 storage, channels and q, k, v's row stride \
                     multiples of 8 and 16-byte aligned q, k, v (got {}, {c} channels, rows {} apart)",
                    self.dtype, self.qkv_stride
                )));
            }
            let dim = MMA_HEAD_DIMS.into_iter().find(|&d| d >= c).unwrap_or(256);
            // kernels/attention_mma.cu: 16 queries a warp; the queries and a key and a value tile
            // in shared memory, rows of D + 8 halves (66 KiB at D = 256).
            let queries = 16 * MMA_FORWARD_WARPS;
            let rows = queries + 2 * MMA_KEYS_PER_TILE;
            let splits = self.key_splits(version, MMA_KEYS_PER_TILE)?;
            let config = LaunchConfig {
                grid: [self.positions.div_ceil(queries) as u32, self.batch as u32, splits as u32],
                block: [32 * MMA_FORWARD_WARPS as u32, 1, 1],
                dynamic_shared_bytes: (rows * (dim + 8) * 2) as u32,
            };
            return Ok((format!("attention_forward_mma_{}_d{dim}", dtype_name(self.dtype)), config));
        }
        let per_lane = c.div_ceil(KEYS_PER_TILE);
        let variant = CHANNEL_VARIANTS.into_iter().find(|&v| v >= per_lane).unwrap_or(16);
        let name = format!("attention_forward_{}_c{variant}", dtype_name(self.dtype));
        // Value rows are padded to the variant's register slots (kernels/attention.cu).
        let v_stride = KEYS_PER_TILE * variant;
        let shared_floats = QUERIES_PER_BLOCK * c + KEYS_PER_TILE * (c + 1) + KEYS_PER_TILE * v_stride;
        let splits = self.key_splits(version, KEYS_PER_TILE)?;
        let config = LaunchConfig {
            grid: [self.positions.div_ceil(QUERIES_PER_BLOCK) as u32, self.batch as u32, splits as u32],
            block: [THREADS, 1, 1],
            dynamic_shared_bytes: (shared_floats * 4) as u32,
        };
        Ok((name, config))
    }
}

/// The functions of the loaded attention modules (attention.cu always, attention_mma.cu when given).
pub struct AttentionKernels(KernelTable);

impl AttentionKernels {
    /// `mma_module`: the tensor-core module with the 16-bit types it was compiled for.
    pub fn load(driver: &dyn Driver, simt_module: Module, mma_module: Option<(Module, HalfTypes)>) -> Result<Self> {
        let mma = mma_module.map(|(m, halves)| (m, halves, mma_kernel_names()));
        KernelTable::load(driver, "attention", (simt_module, simt_kernel_names()), mma).map(Self)
    }
    /// Whether the tensor-core kernels are loaded.
    pub fn has_tensor_cores(&self) -> bool {
        self.0.has_tensor_cores()
    }
    fn get(&self, name: &str) -> Result<Function> {
        self.0.get(name)
    }
}

/// The version `launch_attention` runs: tensor cores for bf16/f16 when loaded and the shape allows
/// it, else the SIMT kernel; either with the keys split when its grid leaves SMs idle and the
/// workspace holds the parts (enough parts for about two blocks an SM, as split-K convolutions
/// aim at, each part at least `MIN_SPLIT_TILES` key tiles).
pub fn attention_version(
    args: &AttentionLaunch,
    has_tensor_cores: bool,
    workspace: Option<&SplitKWorkspace>,
) -> AttentionVersion {
    let tensor_cores = has_tensor_cores && args.tensor_core_ok();
    let (unsplit, queries, keys) = if tensor_cores {
        (AttentionVersion::TensorCore, 16 * MMA_FORWARD_WARPS, MMA_KEYS_PER_TILE)
    } else {
        (AttentionVersion::Simt, QUERIES_PER_BLOCK, KEYS_PER_TILE)
    };
    let Some(ws) = workspace else { return unsplit };
    let blocks = args.positions.div_ceil(queries) * args.batch;
    let tiles = args.positions.div_ceil(keys);
    let mut splits = (2 * ws.multiprocessors).div_ceil(blocks.max(1)).min(tiles / MIN_SPLIT_TILES);
    while splits > 1 && args.split_bytes(splits) > ws.bytes {
        splits -= 1;
    }
    match (splits > 1, tensor_cores) {
        (false, _) => unsplit,
        (true, true) => AttentionVersion::TensorCoreSplitKeys { splits },
        (true, false) => AttentionVersion::SimtSplitKeys { splits },
    }
}

/// out = softmax(q k^T / sqrt(C)) v per sample, logsumexp per query, with the fastest loaded
/// kernel (`attention_version`).
pub fn launch_attention(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    args: &AttentionLaunch,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    let version = attention_version(args, kernels.has_tensor_cores(), workspace);
    launch_attention_version(driver, kernels, args, version, workspace)
}

/// The same with a chosen kernel version (tests and benchmarks compare them); a key split needs a
/// workspace that holds its parts.
pub fn launch_attention_version(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    args: &AttentionLaunch,
    version: AttentionVersion,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    args.validate()?;
    let (name, config) = args.plan(version)?;
    let function = kernels.get(&name)?;
    let (partial_out, partial_lse) = match version.splits() {
        Some(splits) => match workspace {
            Some(ws) if args.split_bytes(splits) <= ws.bytes => {
                (ws.ptr, ws.ptr + (splits * args.batch * args.positions * args.channels * 4) as u64)
            }
            _ => {
                return Err(Error::invalid(format!(
                    "attention: a key split into {splits} parts needs {} bytes of workspace, the backend has {}",
                    args.split_bytes(splits),
                    workspace.map_or(0, |ws| ws.bytes)
                )))
            }
        },
        None => (0, 0),
    };
    // The CPU reference's scale, rounded to f32 the same way.
    let scale = 1.0 / (args.channels as f32).sqrt();
    let kernel_args = KernelArgs::new()
        .ptr(args.q)
        .ptr(args.k)
        .ptr(args.v)
        .ptr(args.out)
        .ptr(args.logsumexp)
        .i32(args.positions as i32)
        .i32(args.channels as i32)
        .i32(args.qkv_stride as i32)
        .f32(scale)
        .ptr(partial_out)
        .ptr(partial_lse);
    driver.launch(function, config, &kernel_args)?;
    if let Some(splits) = version.splits() {
        let rows = args.batch * args.positions;
        let combine = KernelArgs::new()
            .ptr(partial_out)
            .ptr(partial_lse)
            .i32(splits as i32)
            .ptr(args.out)
            .i32(super::dtype_code(args.dtype))
            .ptr(args.logsumexp)
            .i32(rows as i32)
            .i32(args.channels as i32);
        // A warp per row (kernels/attention.cu).
        let blocks = rows.div_ceil(COMBINE_THREADS as usize / 32).clamp(1, 65535);
        // Both launches belong to this one op: a profiler's events around the op time them together.
        driver.launch(
            kernels.get(SPLIT_COMBINE_KERNEL)?,
            LaunchConfig::linear(blocks as u32, COMBINE_THREADS),
            &combine,
        )?;
    }
    Ok(())
}

/// The kernel a launch would use (for reports and tests).
pub fn kernel_for(args: &AttentionLaunch, version: AttentionVersion) -> Result<String> {
    args.validate()?;
    Ok(args.plan(version)?.0)
}

/// One attention backward on the tensor cores: `dq, dk, dv +=` the VJP of the forward `forward`
/// describes (its q, k, v, out and log-sum-exp), for `dout`. Gradients each in their own storage
/// type (f32 in the plans, or the activations' type).
#[derive(Clone, Copy, Debug)]
pub struct AttentionBackwardLaunch {
    pub forward: AttentionLaunch,
    pub dout: DevicePtr,
    pub dout_dtype: Precision,
    /// Scratch, batch x positions f32: each query's D_i = dout_i . out_i.
    pub row_terms: DevicePtr,
    /// Scratch, q's size and storage type (16-byte aligned): dout rounded to it once.
    pub dout_rounded: DevicePtr,
    pub dq: DevicePtr,
    pub dq_dtype: Precision,
    pub dk: DevicePtr,
    pub dk_dtype: Precision,
    pub dv: DevicePtr,
    pub dv_dtype: Precision,
    /// Elements between one position's dq (dk, dv) row and the next's (as the forward's
    /// `qkv_stride`: the gradient of the fused q/k/v tensor has its layout).
    pub grad_stride: usize,
    /// dq, dk, dv += (true) or = (false).
    pub accumulate: bool,
}

/// The backward's tiling (kernels/attention_mma.cu, `attention_backward_tiles`): 64 resident rows
/// a block (queries for dq, keys for dk/dv), 32 streamed rows a stage, two stages.
const BACKWARD_BLOCK_ROWS: usize = 64;
const BACKWARD_STREAM_ROWS: usize = 32;
const BACKWARD_STAGES: usize = 2;
/// The SIMT backward's (kernels/attention.cu): 8 rows a block, streamed tiles of 16, 128 threads.
const SIMT_BACKWARD_ROWS: usize = 8;
const SIMT_BACKWARD_TILE: usize = 16;

/// Warps sharing 16 resident rows at padded head dim `dim` (`AttentionBackwardShape::SPLIT`).
fn backward_split(dim: usize) -> usize {
    if dim == 256 {
        2
    } else {
        1
    }
}

impl AttentionBackwardLaunch {
    pub fn validate(&self) -> Result<()> {
        self.forward
            .validate()
            .map_err(|e| Error::invalid(e.to_string().replace("attention:", "attention backward:")))?;
        let f = &self.forward;
        if self.grad_stride < f.channels || self.grad_stride > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "attention backward: dq, dk, dv rows {} elements apart, for {} channels",
                self.grad_stride, f.channels
            )));
        }
        let gradients = [
            ("dout", self.dout, self.dout_dtype),
            ("row_terms", self.row_terms, Precision::F32),
            ("dout_rounded", self.dout_rounded, self.forward.dtype),
            ("dq", self.dq, self.dq_dtype),
            ("dk", self.dk, self.dk_dtype),
            ("dv", self.dv, self.dv_dtype),
        ];
        for (what, p, dtype) in gradients {
            if p == 0 {
                return Err(Error::invalid(format!("attention backward: null device pointer for `{what}`")));
            }
            if p % dtype.bytes() as u64 != 0 {
                return Err(Error::invalid(format!(
                    "attention backward: `{what}` at {p:#x} is not aligned to its {dtype} elements"
                )));
            }
        }
        Ok(())
    }

    /// Whether the tensor-core kernels can run it (the forward's conditions, and the rounded dout
    /// 16-byte aligned: it is read by 16-byte copies like q, k and v).
    pub fn tensor_core_ok(&self) -> bool {
        self.forward.tensor_core_ok() && self.dout_rounded.is_multiple_of(16)
    }

    /// Whether the tensor-core kernels can run on a device with `max_shared_per_block` bytes of
    /// shared memory per block: at D = 256 they take about 149 KiB (H100/H200, A100 and Jetson
    /// Orin have it; sm_86/89 cards, 99 KiB, run the SIMT backward instead).
    pub fn tensor_cores_fit(&self, max_shared_per_block: usize) -> bool {
        self.tensor_core_ok()
            && self.plan(1).is_ok_and(|(_, config)| config.dynamic_shared_bytes as usize <= max_shared_per_block)
    }

    /// A split into `splits` parts (1: none) of the streamed tiles of `stream_rows` rows needs a tile
    /// for every part.
    fn check_splits(&self, splits: usize, stream_rows: usize) -> Result<()> {
        let tiles = self.forward.positions.div_ceil(stream_rows);
        if splits == 0 || splits > tiles.min(65535) {
            return Err(Error::invalid(format!(
                "attention backward: {splits} splits of {tiles} streamed tiles (each part needs one)"
            )));
        }
        Ok(())
    }

    /// Bytes of the split-K workspace a split into `splits` parts fills: dq's, dk's and dv's parts, f32.
    fn split_bytes(&self, splits: usize) -> usize {
        3 * splits * self.forward.batch * self.forward.positions * self.forward.channels * 4
    }

    /// The tensor-core backward's kernel (dk/dv blocks, then dq blocks, along grid x) and launch
    /// configuration, the streamed rows split into `splits` parts (grid z; 1: none).
    fn plan(&self, splits: usize) -> Result<(String, LaunchConfig)> {
        let f = &self.forward;
        if !self.tensor_core_ok() {
            return Err(Error::invalid(format!(
                "attention backward: the tensor-core kernels need bf16/f16 storage, channels and q, k, v's row \
                 stride multiples of 8 and 16-byte aligned q, k, v and dout_rounded (got {}, {} channels, rows {} \
                 apart)",
                f.dtype, f.channels, f.qkv_stride
            )));
        }
        let dim = MMA_HEAD_DIMS.into_iter().find(|&d| d >= f.channels).unwrap_or(256);
        let split = backward_split(dim);
        let warps = BACKWARD_BLOCK_ROWS / 16 * split;
        let row_bytes = (dim + 8) * 2;
        // Resident rows, then the streamed stages (two tensors each).
        let tile_bytes = (2 * BACKWARD_BLOCK_ROWS + BACKWARD_STAGES * 2 * BACKWARD_STREAM_ROWS) * row_bytes;
        // Where warps pair up: each pair's swap of two 16 x 32 f32 blocks.
        let exchange = if split == 2 { BACKWARD_BLOCK_ROWS / 16 * 2 * 16 * BACKWARD_STREAM_ROWS * 4 } else { 0 };
        // The dk/dv kernel streams the queries' log-sum-exp and D_i with them.
        let row_values = BACKWARD_STAGES * 2 * BACKWARD_STREAM_ROWS * 4;
        let t = dtype_name(f.dtype);
        self.check_splits(splits, BACKWARD_STREAM_ROWS)?;
        let config = LaunchConfig {
            grid: [2 * f.positions.div_ceil(BACKWARD_BLOCK_ROWS) as u32, f.batch as u32, splits as u32],
            block: [32 * warps as u32, 1, 1],
            // The dk/dv blocks' (the dq blocks' is the same less the row values).
            dynamic_shared_bytes: (tile_bytes + row_values + exchange) as u32,
        };
        Ok((format!("attention_backward_mma_{t}_d{dim}"), config))
    }
}

/// Into how many parts the backward's kernels (the tensor cores' or, `tensor_cores` false, the
/// SIMT ones) split their streamed rows (keys for dq, queries for dk and dv): as the forward's key
/// split (`attention_version`), when its grid leaves SMs idle and the workspace holds the parts;
/// 1 otherwise.
pub fn backward_splits(
    args: &AttentionBackwardLaunch,
    tensor_cores: bool,
    workspace: Option<&SplitKWorkspace>,
) -> usize {
    let Some(ws) = workspace else { return 1 };
    let f = &args.forward;
    // The tensor cores' dq and dk/dv blocks run in one launch; the SIMT kernels one after the other.
    let (block_rows, stream_rows, launched_together) = if tensor_cores {
        (BACKWARD_BLOCK_ROWS, BACKWARD_STREAM_ROWS, 2)
    } else {
        (SIMT_BACKWARD_ROWS, SIMT_BACKWARD_TILE, 1)
    };
    let blocks = launched_together * f.positions.div_ceil(block_rows) * f.batch;
    let tiles = f.positions.div_ceil(stream_rows);
    let mut splits = (2 * ws.multiprocessors).div_ceil(blocks.max(1)).min(tiles / MIN_SPLIT_TILES).max(1);
    while splits > 1 && args.split_bytes(splits) > ws.bytes {
        splits -= 1;
    }
    splits
}

/// dq, dk, dv += the attention's VJP on the tensor cores (P rebuilt from the saved log-sum-exp):
/// the row terms D_i into `row_terms` and dout rounded into `dout_rounded`, then the dk/dv and dq
/// kernels in one launch; with `splits` > 1 (`backward_splits`), their streamed rows in that many
/// parts, each part's gradients in f32 to `workspace`, then one launch adds the parts.
pub fn launch_attention_backward_mma(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    args: &AttentionBackwardLaunch,
    splits: usize,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    args.validate()?;
    let (name, config) = args.plan(splits)?;
    let parts = split_parts(args, splits, workspace)?;
    let kernel = kernels.get(&name)?;
    let f = &args.forward;
    // Each query's D_i = dout_i . out_i and its rounded dout once, for both kernels: a warp per row,
    // 8 rows a block.
    let rows = f.batch * f.positions;
    if rows > i32::MAX as usize {
        return Err(Error::invalid(format!("attention backward: {rows} rows (batch x positions) over 2^31")));
    }
    let row_terms_kernel = kernels.get(&format!("attention_backward_row_terms_{}", dtype_name(f.dtype)))?;
    let row_terms_args = KernelArgs::new()
        .ptr(args.dout)
        .i32(super::dtype_code(args.dout_dtype))
        .ptr(f.out)
        .ptr(args.row_terms)
        .ptr(args.dout_rounded)
        .i32(rows as i32)
        .i32(f.channels as i32);
    driver.launch(row_terms_kernel, LaunchConfig::linear(rows.div_ceil(8) as u32, 256), &row_terms_args)?;
    let scale = 1.0 / (f.channels as f32).sqrt();
    let GradientTargets { gradients: [(dq, dt_dq), (dk, dt_dk), (dv, dt_dv)], stride, accumulate } =
        gradient_targets(args, parts, splits);
    let kernel_args = KernelArgs::new()
        .ptr(f.q)
        .ptr(f.k)
        .ptr(f.v)
        .ptr(args.dout_rounded)
        .ptr(args.row_terms)
        .ptr(f.logsumexp)
        .ptr(dq)
        .i32(dt_dq)
        .ptr(dk)
        .i32(dt_dk)
        .ptr(dv)
        .i32(dt_dv)
        .i32(f.positions as i32)
        .i32(f.channels as i32)
        .i32(f.qkv_stride as i32)
        .i32(stride as i32)
        .f32(scale)
        .i32(accumulate as i32);
    driver.launch(kernel, config, &kernel_args)?;
    reduce_parts(driver, kernels, args, parts, splits)
}

/// The workspace a backward split into `splits` parts writes its parts to (None unsplit), or an
/// error naming the sizes.
fn split_parts(
    args: &AttentionBackwardLaunch,
    splits: usize,
    workspace: Option<&SplitKWorkspace>,
) -> Result<Option<DevicePtr>> {
    match workspace {
        _ if splits == 1 => Ok(None),
        Some(ws) if args.split_bytes(splits) <= ws.bytes => Ok(Some(ws.ptr)),
        _ => Err(Error::invalid(format!(
            "attention backward: a split into {splits} parts needs {} bytes of workspace, the backend has {}",
            args.split_bytes(splits),
            workspace.map_or(0, |ws| ws.bytes)
        ))),
    }
}

/// Where the backward kernels write dq, dk and dv: the gradients themselves (rows `grad_stride`
/// apart, += where the launch accumulates), or, split, every part's gradients in f32 to the
/// workspace (dq's parts, then dk's, then dv's; rows C apart), written.
struct GradientTargets {
    /// Device address and storage code of dq, dk, dv.
    gradients: [(DevicePtr, i32); 3],
    /// Elements between rows.
    stride: usize,
    accumulate: bool,
}

fn gradient_targets(args: &AttentionBackwardLaunch, parts: Option<DevicePtr>, splits: usize) -> GradientTargets {
    let f = &args.forward;
    let slice = f.batch * f.positions * f.channels;
    let gradient = |which: usize, ptr: DevicePtr, dtype: Precision| match parts {
        Some(base) => (base + (which * splits * slice * 4) as u64, super::dtype_code(Precision::F32)),
        None => (ptr, super::dtype_code(dtype)),
    };
    GradientTargets {
        gradients: [
            gradient(0, args.dq, args.dq_dtype),
            gradient(1, args.dk, args.dk_dtype),
            gradient(2, args.dv, args.dv_dtype),
        ],
        stride: if parts.is_some() { f.channels } else { args.grad_stride },
        accumulate: args.accumulate && parts.is_none(),
    }
}

/// A split backward's last launch: each gradient = (or +=) the sum of its parts.
fn reduce_parts(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    args: &AttentionBackwardLaunch,
    parts: Option<DevicePtr>,
    splits: usize,
) -> Result<()> {
    let f = &args.forward;
    let slice = f.batch * f.positions * f.channels;
    if let Some(base) = parts {
        let reduce = KernelArgs::new()
            .ptr(base)
            .i32(splits as i32)
            .u64(slice as u64)
            .i32(f.channels as i32)
            .i32(args.grad_stride as i32)
            .ptr(args.dq)
            .i32(super::dtype_code(args.dq_dtype))
            .ptr(args.dk)
            .i32(super::dtype_code(args.dk_dtype))
            .ptr(args.dv)
            .i32(super::dtype_code(args.dv_dtype))
            .i32(args.accumulate as i32);
        let blocks = slice.div_ceil(COMBINE_THREADS as usize).clamp(1, 65535) as u32;
        let config = LaunchConfig { grid: [blocks, 3, 1], block: [COMBINE_THREADS, 1, 1], dynamic_shared_bytes: 0 };
        driver.launch(kernels.get(BACKWARD_SPLIT_REDUCE_KERNEL)?, config, &reduce)?;
    }
    Ok(())
}

/// dq, dk, dv = (or +=) the attention's VJP with the SIMT kernels of attention.cu (f32, or a device
/// with too little shared memory for the tensor-core tiles): 8 rows a block, streamed tiles of 16,
/// accumulators in shared memory; with `splits` > 1 (`backward_splits(.., false, ..)`) their
/// streamed tiles in that many parts, as `launch_attention_backward_mma`'s. `row_terms` and
/// `dout_rounded` go unused: these kernels compute D_i themselves and read dout as it is.
pub fn launch_attention_backward_simt(
    driver: &dyn Driver,
    kernels: &AttentionKernels,
    args: &AttentionBackwardLaunch,
    splits: usize,
    workspace: Option<&SplitKWorkspace>,
) -> Result<()> {
    args.validate()?;
    let f = &args.forward;
    args.check_splits(splits, SIMT_BACKWARD_TILE)?;
    let parts = split_parts(args, splits, workspace)?;
    let c = f.channels;
    let shared_floats = |accumulators: usize, extra: usize| {
        SIMT_BACKWARD_ROWS * c * accumulators + 2 * SIMT_BACKWARD_TILE * (c + 1) + extra
    };
    let config = |floats: usize| LaunchConfig {
        grid: [f.positions.div_ceil(SIMT_BACKWARD_ROWS) as u32, f.batch as u32, splits as u32],
        block: [128, 1, 1],
        dynamic_shared_bytes: (floats * 4) as u32,
    };
    // The CPU reference's scale, rounded to f32 the same way.
    let scale = 1.0 / (c as f32).sqrt();
    let inputs = || {
        KernelArgs::new()
            .ptr(f.q)
            .ptr(f.k)
            .ptr(f.v)
            .ptr(f.out)
            .i32(super::dtype_code(f.dtype))
            .ptr(args.dout)
            .i32(super::dtype_code(args.dout_dtype))
            .ptr(f.logsumexp)
    };
    let GradientTargets { gradients: [(dq, dt_dq), (dk, dt_dk), (dv, dt_dv)], stride, accumulate } =
        gradient_targets(args, parts, splits);
    let tail = |a: KernelArgs| {
        let strides = a.i32(f.positions as i32).i32(c as i32).i32(f.qkv_stride as i32).i32(stride as i32);
        strides.f32(scale).i32(accumulate as i32)
    };
    let (dq_kernel, dkdv_kernel) = (kernels.get(BACKWARD_KERNELS[0])?, kernels.get(BACKWARD_KERNELS[1])?);
    driver.launch(dq_kernel, config(shared_floats(3, 0)), &tail(inputs().ptr(dq).i32(dt_dq)))?;
    let dkdv_config = config(shared_floats(4, 2 * SIMT_BACKWARD_TILE));
    driver.launch(dkdv_kernel, dkdv_config, &tail(inputs().ptr(dk).i32(dt_dk).ptr(dv).i32(dt_dv)))?;
    reduce_parts(driver, kernels, args, parts, splits)
}

/// The tensor-core backward kernel a launch would use, the row terms' aside (for reports and tests).
pub fn backward_kernel_for(args: &AttentionBackwardLaunch) -> Result<String> {
    args.validate()?;
    Ok(args.plan(1)?.0)
}
