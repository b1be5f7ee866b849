//! A backend that times every op of another one: `purifier bench`'s per-op breakdown. Each op is
//! bracketed by the inner backend's timestamps (host clock readings on the CPU, device events on a
//! GPU), resolved into durations when the times are taken, after a synchronize.
//!
//! Each op also counts its work, for the benchmark's roofline: the FLOPs of its arithmetic (a
//! multiply-add is 2) and the minimal bytes it must move (every input read once, every output
//! written once, in the tensors' storage types). Ops whose FLOPs are a few per element count only
//! bytes: they are bound by memory.
use std::cell::RefCell;
use std::collections::BTreeMap;

use super::{
    AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, GradientStore, LayerGradient, LayerInput, NoGraph,
    Precision, StepColumn, StepSource, TensorShape, Timestamp,
};
use crate::error::Result;

/// What one op costs: arithmetic and minimal memory traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    fn memory(bytes: f64) -> Self {
        Self { flops: 0.0, bytes }
    }
}

/// Calls, seconds and work of one op name.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpStats {
    pub calls: usize,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// Per op name, what was timed; and per (op, shape) for the ops whose cost depends most on their
/// shape (convolutions, GroupNorm, attention, forward and backward): where tuning should look.
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub ops: BTreeMap<&'static str, OpStats>,
    pub shapes: BTreeMap<(&'static str, String), OpStats>,
}

impl OpTimes {
    /// (op, stats), slowest first.
    pub fn sorted(&self) -> Vec<(&'static str, OpStats)> {
        let mut rows: Vec<_> = self.ops.iter().map(|(&name, &stats)| (name, stats)).collect();
        rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        rows
    }
    /// (op, shape, stats), slowest first.
    pub fn sorted_shapes(&self) -> Vec<(&'static str, &str, OpStats)> {
        let mut rows: Vec<_> = self.shapes.iter().map(|((op, shape), &stats)| (*op, shape.as_str(), stats)).collect();
        rows.sort_by(|a, b| b.2.seconds.total_cmp(&a.2.seconds));
        rows
    }
    pub fn total_seconds(&self) -> f64 {
        self.ops.values().map(|s| s.seconds).sum()
    }
}

/// Bytes of an input gradient's traffic: written once, and read too where it accumulates.
fn gradient_bytes<T: TensorShape>(tensors: &[&T], store: GradientStore) -> f64 {
    if store.accumulates() {
        2.0 * bytes(tensors)
    } else {
        bytes(tensors)
    }
}

/// Bytes of the tensors as stored.
fn bytes<T: TensorShape>(tensors: &[&T]) -> f64 {
    tensors.iter().map(|t| (t.numel() * t.dtype().bytes()) as f64).sum()
}

/// Bytes a layer input reads: its sources, not the concatenated or upsampled view.
fn input_bytes<T: TensorShape>(x: &LayerInput<'_, T>) -> f64 {
    bytes(&[x.a]) + x.b.map_or(0.0, |b| bytes(&[b]))
}

/// A convolution's multiply-adds: every output element sums C_in * kh * kw products.
fn conv_flops<T: TensorShape>(out_elements: usize, w: &T) -> f64 {
    let w = w.shape();
    2.0 * out_elements as f64 * (w[1] * w[2] * w[3]) as f64
}

/// The sub-pixel upsample convolution's multiply-adds (`Backend::upsample_conv2d`, w Co x Ci x 4 x 4):
/// every output element sums C_in * 4 products (its phase's 2x2 window), as does its gradient's
/// transpose (a quarter of the elements, 16 taps each).
fn subpixel_flops<T: TensorShape>(out_elements: usize, w: &T) -> f64 {
    2.0 * out_elements as f64 * (w.shape()[1] * 4) as f64
}

/// Attention with output `out` (N x C x H x W): q k^T and p v, each N * HW * HW * C multiply-adds.
fn attention_flops<T: TensorShape>(out: &T) -> f64 {
    let s = out.shape();
    let positions = (s[2] * s[3]) as f64;
    4.0 * s[0] as f64 * positions * positions * s[1] as f64
}

/// "C channels at HxW" of an N x C x H x W tensor.
fn channels_at<T: TensorShape>(t: &T) -> String {
    match t.shape() {
        [_, c, h, w] => format!("{c} ch, {h}x{w}"),
        other => format!("{other:?}"),
    }
}

/// A convolution's shape: kernel, stride, channels in -> out, and the output's size (`at`, N x C x
/// H x W: the output of the forward, dx of the input gradient).
fn conv_shape<T: TensorShape>(w: &T, geometry: Conv2dGeometry, at: &T) -> String {
    let (w, at) = (w.shape(), at.shape());
    format!("{}x{} s{} {} -> {}, {}x{}", w[2], w[3], geometry.stride, w[1], w[0], at[2], at[3])
}

/// The sub-pixel upsample convolution's shape as `conv_shape` writes the 3x3 convolution it computes
/// (w in the sub-pixel form, Co x Ci x 4 x 4; `at` the output of the forward, dx of the gradient).
fn subpixel_shape<T: TensorShape>(w: &T, at: &T) -> String {
    let (w, at) = (w.shape(), at.shape());
    format!("3x3 s1 {} -> {}, {}x{}", w[1], w[0], at[2], at[3])
}

/// (op, shape where it is kept, cost, timestamps before and after).
type Mark = (&'static str, Option<String>, Cost, Timestamp, Timestamp);

pub struct Profiled<'a, B: Backend> {
    inner: &'a B,
    /// (op, cost, timestamp before, timestamp after) of every op since the last `take`.
    marks: RefCell<Vec<Mark>>,
    /// The first error of a timestamp, reported by `take`.
    error: RefCell<Option<crate::Error>>,
}

impl<'a, B: Backend> Profiled<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Self { inner, marks: RefCell::default(), error: RefCell::default() }
    }
    /// What has been timed so far (after waiting for it), and a fresh start.
    pub fn take(&self) -> Result<OpTimes> {
        let marks = std::mem::take(&mut *self.marks.borrow_mut());
        if let Some(error) = self.error.borrow_mut().take() {
            return Err(error);
        }
        self.inner.synchronize()?;
        let mut times = OpTimes::default();
        for (op, shape, cost, start, end) in marks {
            let seconds = self.inner.elapsed_ms(&start, &end)? / 1e3;
            self.inner.release_timestamp(start);
            self.inner.release_timestamp(end);
            let add = |entry: &mut OpStats| {
                entry.calls += 1;
                entry.seconds += seconds;
                entry.flops += cost.flops;
                entry.bytes += cost.bytes;
            };
            add(times.ops.entry(op).or_default());
            if let Some(shape) = shape {
                add(times.shapes.entry((op, shape)).or_default());
            }
        }
        Ok(times)
    }
    /// An op whose work is not counted (memory management, host transfers).
    fn timed<T>(&self, op: &'static str, run: impl FnOnce() -> T) -> T {
        self.counted(op, Cost::default(), run)
    }
    fn counted<T>(&self, op: &'static str, cost: Cost, run: impl FnOnce() -> T) -> T {
        self.counted_as(op, None, cost, run)
    }
    /// `counted`, also kept per `shape`.
    fn counted_as<T>(&self, op: &'static str, shape: Option<String>, cost: Cost, run: impl FnOnce() -> T) -> T {
        let start = self.inner.timestamp();
        let result = run();
        match (start, self.inner.timestamp()) {
            (Ok(start), Ok(end)) => self.marks.borrow_mut().push((op, shape, cost, start, end)),
            (Err(e), _) | (_, Err(e)) => {
                self.error.borrow_mut().get_or_insert(e);
            }
        }
        result
    }
}

impl<B: Backend> Backend for Profiled<'_, B> {
    type Tensor = B::Tensor;
    /// Timing every op takes a timestamp around it, which a recording cannot hold: the profiled
    /// backend runs every op eagerly.
    type Graph = NoGraph;

    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }
    fn end_capture(&self) -> Result<NoGraph> {
        Err(crate::Error::invalid("end_capture: the profiled backend records no graphs"))
    }
    fn replay(&self, graph: &NoGraph) -> Result<()> {
        match *graph {}
    }

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }
    fn precision(&self) -> Precision {
        self.inner.precision()
    }
    fn available_memory(&self) -> Option<usize> {
        self.inner.available_memory()
    }
    fn peak_memory(&self) -> Option<usize> {
        self.inner.peak_memory()
    }
    fn reset_peak_memory(&self) {
        self.inner.reset_peak_memory()
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn timestamp(&self) -> Result<Timestamp> {
        self.inner.timestamp()
    }
    fn elapsed_ms(&self, start: &Timestamp, end: &Timestamp) -> Result<f64> {
        self.inner.elapsed_ms(start, end)
    }
    fn release_timestamp(&self, timestamp: Timestamp) {
        self.inner.release_timestamp(timestamp)
    }
    fn tensor_core_peak(&self) -> Result<Option<f64>> {
        self.inner.tensor_core_peak()
    }
    fn kernel_start_up(&self) -> Result<Option<crate::backend::KernelStartUp>> {
        self.inner.kernel_start_up()
    }
    fn range_push(&self, name: &str) {
        self.inner.range_push(name)
    }
    fn range_pop(&self) {
        self.inner.range_pop()
    }
    fn zeros_as(&self, shape: &[usize], dtype: Precision) -> Result<B::Tensor> {
        self.timed("zeros", || self.inner.zeros_as(shape, dtype))
    }
    fn upload_as(&self, data: &[f32], shape: &[usize], dtype: Precision) -> Result<B::Tensor> {
        self.timed("upload", || self.inner.upload_as(data, shape, dtype))
    }
    fn write(&self, dst: &mut B::Tensor, data: &[f32]) -> Result<()> {
        self.timed("write", || self.inner.write(dst, data))
    }
    fn download(&self, t: &B::Tensor) -> Result<Vec<f32>> {
        self.timed("download", || self.inner.download(t))
    }
    fn copy(&self, src: &B::Tensor, dst: &mut B::Tensor) {
        self.counted("copy", Cost::memory(2.0 * bytes(&[src])), || self.inner.copy(src, dst))
    }
    fn fill(&self, t: &mut B::Tensor, value: f32) {
        self.counted("fill", Cost::memory(bytes(&[&*t])), || self.inner.fill(t, value))
    }
    fn add_assign(&self, dst: &mut B::Tensor, src: &B::Tensor) {
        self.counted("add_assign", Cost::memory(2.0 * bytes(&[&*dst]) + bytes(&[src])), || {
            self.inner.add_assign(dst, src)
        })
    }
    fn timestep_embedding(&self, t: &B::Tensor, out: &mut B::Tensor) {
        self.counted("timestep_embedding", Cost::memory(bytes(&[t, &*out])), || self.inner.timestep_embedding(t, out))
    }
    fn linear(&self, x: &B::Tensor, w: &B::Tensor, b: Option<&B::Tensor>, silu_input: bool, out: &mut B::Tensor) {
        self.counted(
            "linear",
            Cost {
                flops: 2.0 * (out.numel() * w.shape()[1]) as f64,
                bytes: bytes(&[x, w, &*out]) + b.map_or(0.0, |b| bytes(&[b])),
            },
            || self.inner.linear(x, w, b, silu_input, out),
        )
    }
    fn linear_backward(
        &self,
        x: &B::Tensor,
        w: &B::Tensor,
        silu_input: bool,
        dout: &B::Tensor,
        dx: &mut B::Tensor,
        store: GradientStore,
    ) {
        self.counted(
            "linear_backward",
            Cost {
                flops: 2.0 * (dout.numel() * w.shape()[1]) as f64,
                bytes: bytes(&[x, w, dout]) + gradient_bytes(&[&*dx], store),
            },
            || self.inner.linear_backward(x, w, silu_input, dout, dx, store),
        )
    }
    fn group_norm(
        &self,
        x: LayerInput<'_, B::Tensor>,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        groups: usize,
        eps: f32,
        silu: bool,
        out: &mut B::Tensor,
        stats: &mut B::Tensor,
    ) {
        let (shape, cost) = (channels_at(&*out), Cost::memory(input_bytes(&x) + bytes(&[gamma, beta, &*out, &*stats])));
        self.counted_as("group_norm", Some(shape), cost, || {
            self.inner.group_norm(x, gamma, beta, groups, eps, silu, out, stats)
        })
    }
    fn group_norm_backward(
        &self,
        x: LayerInput<'_, B::Tensor>,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        stats: &B::Tensor,
        groups: usize,
        silu: bool,
        dout: &B::Tensor,
        dx: LayerGradient<'_, B::Tensor>,
    ) {
        let mut cost = input_bytes(&x) + bytes(&[gamma, beta, stats, dout]) + gradient_bytes(&[&*dx.a], dx.a_store);
        cost += dx.b.as_ref().map_or(0.0, |(b, store)| gradient_bytes(&[&**b], *store));
        cost += dx.plus.map_or(0.0, |p| bytes(&[p])) + dx.a_copy.as_ref().map_or(0.0, |c| bytes(&[&**c]));
        self.counted_as("group_norm_backward", Some(channels_at(dout)), Cost::memory(cost), || {
            self.inner.group_norm_backward(x, gamma, beta, stats, groups, silu, dout, dx)
        })
    }
    fn conv2d(
        &self,
        x: LayerInput<'_, B::Tensor>,
        w: &B::Tensor,
        bias: Option<&B::Tensor>,
        geometry: Conv2dGeometry,
        epilogue: ConvEpilogue<'_, B::Tensor>,
        out: &mut B::Tensor,
    ) {
        self.counted_as(
            "conv2d",
            Some(conv_shape(w, geometry, &*out)),
            Cost {
                flops: conv_flops(out.numel(), w),
                bytes: input_bytes(&x)
                    + bytes(&[w, &*out])
                    + [bias, epilogue.channel_bias, epilogue.residual]
                        .into_iter()
                        .flatten()
                        .map(|t| bytes(&[t]))
                        .sum::<f64>(),
            },
            || self.inner.conv2d(x, w, bias, geometry, epilogue, out),
        )
    }
    fn conv2d_backward_input(
        &self,
        dout: &B::Tensor,
        w: &B::Tensor,
        geometry: Conv2dGeometry,
        dx: &mut B::Tensor,
        store: GradientStore,
    ) {
        self.counted_as(
            "conv2d_backward_input",
            Some(conv_shape(w, geometry, &*dx)),
            Cost { flops: conv_flops(dout.numel(), w), bytes: bytes(&[dout, w]) + gradient_bytes(&[&*dx], store) },
            || self.inner.conv2d_backward_input(dout, w, geometry, dx, store),
        )
    }
    fn upsample_conv2d(
        &self,
        x: &B::Tensor,
        w: &B::Tensor,
        bias: Option<&B::Tensor>,
        epilogue: ConvEpilogue<'_, B::Tensor>,
        out: &mut B::Tensor,
    ) {
        let extra = [bias, epilogue.channel_bias, epilogue.residual].into_iter().flatten().map(|t| bytes(&[t]));
        self.counted_as(
            "upsample_conv2d",
            Some(subpixel_shape(w, &*out)),
            Cost { flops: subpixel_flops(out.numel(), w), bytes: bytes(&[x, w, &*out]) + extra.sum::<f64>() },
            || self.inner.upsample_conv2d(x, w, bias, epilogue, out),
        )
    }
    fn upsample_conv2d_backward_input(
        &self,
        dout: &B::Tensor,
        w: &B::Tensor,
        dx: &mut B::Tensor,
        store: GradientStore,
    ) {
        self.counted_as(
            "upsample_conv2d_backward_input",
            Some(subpixel_shape(w, &*dx)),
            Cost { flops: subpixel_flops(dout.numel(), w), bytes: bytes(&[dout, w]) + gradient_bytes(&[&*dx], store) },
            || self.inner.upsample_conv2d_backward_input(dout, w, dx, store),
        )
    }
    fn attention(&self, qkv: &B::Tensor, out: &mut B::Tensor, logsumexp: &mut B::Tensor) {
        self.counted_as(
            "attention",
            Some(channels_at(&*out)),
            Cost { flops: attention_flops(&*out), bytes: bytes(&[qkv, &*out, &*logsumexp]) },
            || self.inner.attention(qkv, out, logsumexp),
        )
    }
    fn attention_backward(
        &self,
        qkv: &B::Tensor,
        out: &B::Tensor,
        logsumexp: &B::Tensor,
        dout: &B::Tensor,
        scratch: AttentionScratch<'_, B::Tensor>,
        dqkv: &mut B::Tensor,
        store: GradientStore,
    ) {
        self.counted_as(
            "attention_backward",
            Some(channels_at(out)),
            Cost {
                flops: 2.5 * attention_flops(out),
                bytes: bytes(&[qkv, out, logsumexp, dout]) + gradient_bytes(&[&*dqkv], store),
            },
            || self.inner.attention_backward(qkv, out, logsumexp, dout, scratch, dqkv, store),
        )
    }
    fn upsample_nearest2x(&self, x: &B::Tensor, out: &mut B::Tensor) {
        self.counted("upsample_nearest2x", Cost::memory(bytes(&[x, &*out])), || self.inner.upsample_nearest2x(x, out))
    }
    fn upsample_nearest2x_backward(&self, dout: &B::Tensor, dx: &mut B::Tensor, store: GradientStore) {
        let cost = Cost::memory(bytes(&[dout]) + gradient_bytes(&[&*dx], store));
        self.counted("upsample_nearest2x_backward", cost, || self.inner.upsample_nearest2x_backward(dout, dx, store))
    }
    fn channel_affine(&self, x: &B::Tensor, scale: &B::Tensor, shift: &B::Tensor, out: &mut B::Tensor) {
        self.counted("channel_affine", Cost::memory(bytes(&[x, scale, shift, &*out])), || {
            self.inner.channel_affine(x, scale, shift, out)
        })
    }
    fn channel_affine_backward(&self, dout: &B::Tensor, scale: &B::Tensor, dx: &mut B::Tensor, store: GradientStore) {
        let cost = Cost::memory(bytes(&[dout, scale]) + gradient_bytes(&[&*dx], store));
        self.counted("channel_affine_backward", cost, || self.inner.channel_affine_backward(dout, scale, dx, store))
    }
    fn relu(&self, x: &mut B::Tensor) {
        self.counted("relu", Cost::memory(2.0 * bytes(&[&*x])), || self.inner.relu(x))
    }
    fn relu_backward(&self, y: &B::Tensor, dy: &B::Tensor, dx: &mut B::Tensor, store: GradientStore) {
        let cost = Cost::memory(bytes(&[y, dy]) + gradient_bytes(&[&*dx], store));
        self.counted("relu_backward", cost, || self.inner.relu_backward(y, dy, dx, store))
    }
    fn shortcut_subsample_pad(&self, x: &B::Tensor, pad: usize, out: &mut B::Tensor) {
        self.counted("shortcut_subsample_pad", Cost::memory(bytes(&[&*out]) * 2.0), || {
            self.inner.shortcut_subsample_pad(x, pad, out)
        })
    }
    fn shortcut_subsample_pad_backward(&self, dout: &B::Tensor, pad: usize, dx: &mut B::Tensor, store: GradientStore) {
        let cost = Cost::memory(bytes(&[dout]) + gradient_bytes(&[&*dx], store));
        self.counted("shortcut_subsample_pad_backward", cost, || {
            self.inner.shortcut_subsample_pad_backward(dout, pad, dx, store)
        })
    }
    fn global_avg_pool(&self, x: &B::Tensor, out: &mut B::Tensor) {
        self.counted("global_avg_pool", Cost::memory(bytes(&[x, &*out])), || self.inner.global_avg_pool(x, out))
    }
    fn global_avg_pool_backward(&self, dout: &B::Tensor, dx: &mut B::Tensor, store: GradientStore) {
        let cost = Cost::memory(bytes(&[dout]) + gradient_bytes(&[&*dx], store));
        self.counted("global_avg_pool_backward", cost, || self.inner.global_avg_pool_backward(dout, dx, store))
    }
    fn axpby(&self, a: f32, x: &B::Tensor, b: f32, y: &B::Tensor, out: &mut B::Tensor) {
        self.counted("axpby", Cost::memory(bytes(&[x, y, &*out])), || self.inner.axpby(a, x, b, y, out))
    }
    fn clamp(&self, x: &mut B::Tensor, lo: f32, hi: f32) {
        self.counted("clamp", Cost::memory(2.0 * bytes(&[&*x])), || self.inner.clamp(x, lo, hi))
    }
    fn clamp_backward(&self, x: &B::Tensor, lo: f32, hi: f32, grad: &mut B::Tensor) {
        self.counted("clamp_backward", Cost::memory(bytes(&[x]) + 2.0 * bytes(&[&*grad])), || {
            self.inner.clamp_backward(x, lo, hi, grad)
        })
    }
    fn fill_gaussian(&self, out: &mut B::Tensor, image_indices: &B::Tensor, seed: u64, stream: u64) {
        self.counted("fill_gaussian", Cost::memory(bytes(&[&*out])), || {
            self.inner.fill_gaussian(out, image_indices, seed, stream)
        })
    }
    fn step_unet_indices(&self, step: StepSource<'_, B::Tensor>, t: &mut B::Tensor) {
        self.counted("step_unet_indices", Cost::memory(bytes(&[&*t])), || self.inner.step_unet_indices(step, t))
    }
    fn advance_step_cursor(&self, cursor: &mut B::Tensor, by: i32) {
        self.timed("advance_step_cursor", || self.inner.advance_step_cursor(cursor, by))
    }
    fn axpby_step(
        &self,
        step: StepSource<'_, B::Tensor>,
        a: StepColumn,
        x: &B::Tensor,
        b: StepColumn,
        y: &B::Tensor,
        out: &mut B::Tensor,
    ) {
        self.counted("axpby_step", Cost::memory(bytes(&[x, y, &*out])), || self.inner.axpby_step(step, a, x, b, y, out))
    }
    fn q_sample(&self, x: &B::Tensor, image_indices: &B::Tensor, step: StepSource<'_, B::Tensor>, x_t: &mut B::Tensor) {
        self.counted("q_sample", Cost::memory(bytes(&[x, &*x_t])), || self.inner.q_sample(x, image_indices, step, x_t))
    }
    fn reverse_step(
        &self,
        x_t: &mut B::Tensor,
        eps: &B::Tensor,
        delta: Option<&B::Tensor>,
        image_indices: &B::Tensor,
        step: StepSource<'_, B::Tensor>,
    ) {
        // x_t read and written, eps and delta read.
        let traffic = 2.0 * bytes(&[&*x_t]) + bytes(&[eps]) + delta.map_or(0.0, |d| bytes(&[d]));
        self.counted("reverse_step", Cost::memory(traffic), || {
            self.inner.reverse_step(x_t, eps, delta, image_indices, step)
        })
    }
    fn predict_x0_and_mean(
        &self,
        x_t: &B::Tensor,
        eps: &B::Tensor,
        step: StepSource<'_, B::Tensor>,
        x0_hat: &mut B::Tensor,
        mu: &mut B::Tensor,
    ) {
        self.counted("predict_x0_and_mean", Cost::memory(bytes(&[x_t, eps, &*x0_hat, &*mu])), || {
            self.inner.predict_x0_and_mean(x_t, eps, step, x0_hat, mu)
        })
    }
    fn mask_clipped(&self, x_t: &B::Tensor, eps: &B::Tensor, step: StepSource<'_, B::Tensor>, u: &mut B::Tensor) {
        self.counted("mask_clipped", Cost::memory(bytes(&[x_t, eps]) + 2.0 * bytes(&[&*u])), || {
            self.inner.mask_clipped(x_t, eps, step, u)
        })
    }
    fn constrain_guidance(&self, delta: &mut B::Tensor, x_t: &B::Tensor, mu: &B::Tensor, kappa: f32) {
        self.counted("constrain_guidance", Cost::memory(bytes(&[x_t, mu]) + 3.0 * bytes(&[&*delta])), || {
            self.inner.constrain_guidance(delta, x_t, mu, kappa)
        })
    }
    fn guidance_objective_grad(
        &self,
        features: &B::Tensor,
        reference_features: &B::Tensor,
        logits: &B::Tensor,
        labels: &B::Tensor,
        lambda_f: f32,
        lambda_c: f32,
        dfeatures: &mut B::Tensor,
        dlogits: &mut B::Tensor,
    ) {
        self.counted(
            "guidance_objective_grad",
            Cost::memory(bytes(&[features, reference_features, logits, &*dfeatures, &*dlogits])),
            || {
                self.inner.guidance_objective_grad(
                    features,
                    reference_features,
                    logits,
                    labels,
                    lambda_f,
                    lambda_c,
                    dfeatures,
                    dlogits,
                )
            },
        )
    }
    fn cross_entropy_grad(&self, logits: &B::Tensor, labels: &B::Tensor, dlogits: &mut B::Tensor) {
        self.counted("cross_entropy_grad", Cost::memory(bytes(&[logits, &*dlogits])), || {
            self.inner.cross_entropy_grad(logits, labels, dlogits)
        })
    }
}
