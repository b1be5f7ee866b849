//! Host launcher of kernels/attention.cu: fused single-head attention over the H*W positions
//! (flash-style; the per-query log-sum-exp saved in f32 for the backward).
//!
//! Written against the driver only: the CUDA backend fills an `AttentionLaunch` and calls
//! `launch_attention`. Shapes are checked here; nothing is launched on an error.
use crate::backend::Precision;
use crate::driver::{DevicePtr, Driver, Function, KernelArgs, LaunchConfig, Module};
use crate::error::{Error, Result};

/// One attention: q, k, v and out are N x L x C (NHWC, L = H*W) in `dtype`; logsumexp is N x L f32.
#[derive(Clone, Copy, Debug)]
pub struct AttentionLaunch {
    pub batch: usize,
    /// L = H*W.
    pub positions: usize,
    pub channels: usize,
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
/// The register accumulator variants: `_c4`, `_c8`, `_c16` hold up to 64, 128, 256 channels.
const CHANNEL_VARIANTS: [usize; 3] = [4, 8, 16];
pub const MAX_CHANNELS: usize = 256;

fn dtype_name(d: Precision) -> &'static str {
    match d {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// Every kernel name in attention.cu.
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for d in ["f32", "f16", "bf16"] {
        for c in CHANNEL_VARIANTS {
            names.push(format!("attention_forward_{d}_c{c}"));
        }
    }
    names
}

/// The kernels hot enough that ptxas must not spill in them.
pub const HOT_KERNELS: &[&str] =
    &["attention_forward_f32_c16", "attention_forward_bf16_c16", "attention_forward_f16_c16"];

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

    fn plan(&self) -> (String, LaunchConfig) {
        let per_lane = self.channels.div_ceil(KEYS_PER_TILE);
        let variant = CHANNEL_VARIANTS.into_iter().find(|&v| v >= per_lane).unwrap_or(16);
        let name = format!("attention_forward_{}_c{variant}", dtype_name(self.dtype));
        let c = self.channels;
        // Value rows are padded to the variant's register slots (kernels/attention.cu).
        let v_stride = KEYS_PER_TILE * variant;
        let shared_floats = QUERIES_PER_BLOCK * c + KEYS_PER_TILE * (c + 1) + KEYS_PER_TILE * v_stride;
        let config = LaunchConfig {
            grid: [self.positions.div_ceil(QUERIES_PER_BLOCK) as u32, self.batch as u32, 1],
            block: [THREADS, 1, 1],
            dynamic_shared_bytes: (shared_floats * 4) as u32,
        };
        (name, config)
    }
}

/// The functions of a loaded attention.cu module.
pub struct AttentionKernels {
    functions: Vec<(String, Function)>,
}

impl AttentionKernels {
    pub fn load(driver: &dyn Driver, module: Module) -> Result<Self> {
        let functions = kernel_names()
            .into_iter()
            .map(|name| Ok((name.clone(), driver.function(module, &name)?)))
            .collect::<Result<_>>()?;
        Ok(Self { functions })
    }
    fn get(&self, name: &str) -> Result<Function> {
        self.functions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| Error::invalid(format!("attention: no kernel `{name}` in the loaded module")))
    }
}

/// out = softmax(q k^T / sqrt(C)) v per sample, logsumexp per query.
pub fn launch_attention(driver: &dyn Driver, kernels: &AttentionKernels, args: &AttentionLaunch) -> Result<()> {
    args.validate()?;
    let (name, config) = args.plan();
    let function = kernels.get(&name)?;
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
        .f32(scale);
    driver.launch(function, config, &kernel_args)?;
    Ok(())
}
