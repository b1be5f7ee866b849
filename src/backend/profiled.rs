//! A backend that times every op of another one: `purifier bench`'s per-op breakdown. Each op is
//! bracketed by the inner backend's timestamps (host clock readings on the CPU, device events on a
//! GPU), resolved into durations when the times are taken, after a synchronize.
use std::cell::RefCell;
use std::collections::BTreeMap;

use super::{Backend, Conv2dGeometry, ConvEpilogue, LayerInput, NoGraph, Precision, StepColumn, StepSource, Timestamp};
use crate::error::Result;

/// Calls and seconds per op name.
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub ops: BTreeMap<&'static str, (usize, f64)>,
}

impl OpTimes {
    /// (op, calls, seconds), slowest first.
    pub fn sorted(&self) -> Vec<(&'static str, usize, f64)> {
        let mut rows: Vec<_> = self.ops.iter().map(|(&name, &(calls, seconds))| (name, calls, seconds)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }
    pub fn total_seconds(&self) -> f64 {
        self.ops.values().map(|&(_, s)| s).sum()
    }
}

pub struct Profiled<'a, B: Backend> {
    inner: &'a B,
    /// (op, timestamp before, timestamp after) of every op since the last `take`.
    marks: RefCell<Vec<(&'static str, Timestamp, Timestamp)>>,
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
        for (op, start, end) in marks {
            let entry = times.ops.entry(op).or_default();
            entry.0 += 1;
            entry.1 += self.inner.elapsed_ms(&start, &end)? / 1e3;
        }
        Ok(times)
    }
    fn timed<T>(&self, op: &'static str, run: impl FnOnce() -> T) -> T {
        let start = self.inner.timestamp();
        let result = run();
        match (start, self.inner.timestamp()) {
            (Ok(start), Ok(end)) => self.marks.borrow_mut().push((op, start, end)),
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
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn timestamp(&self) -> Result<Timestamp> {
        self.inner.timestamp()
    }
    fn elapsed_ms(&self, start: &Timestamp, end: &Timestamp) -> Result<f64> {
        self.inner.elapsed_ms(start, end)
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
        self.timed("copy", || self.inner.copy(src, dst))
    }
    fn fill(&self, t: &mut B::Tensor, value: f32) {
        self.timed("fill", || self.inner.fill(t, value))
    }
    fn add_assign(&self, dst: &mut B::Tensor, src: &B::Tensor) {
        self.timed("add_assign", || self.inner.add_assign(dst, src))
    }
    fn timestep_embedding(&self, t: &B::Tensor, out: &mut B::Tensor) {
        self.timed("timestep_embedding", || self.inner.timestep_embedding(t, out))
    }
    fn linear(&self, x: &B::Tensor, w: &B::Tensor, b: Option<&B::Tensor>, silu_input: bool, out: &mut B::Tensor) {
        self.timed("linear", || self.inner.linear(x, w, b, silu_input, out))
    }
    fn linear_backward(&self, x: &B::Tensor, w: &B::Tensor, silu_input: bool, dout: &B::Tensor, dx: &mut B::Tensor) {
        self.timed("linear_backward", || self.inner.linear_backward(x, w, silu_input, dout, dx))
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
        self.timed("group_norm", || self.inner.group_norm(x, gamma, beta, groups, eps, silu, out, stats))
    }
    fn group_norm_backward(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        stats: &B::Tensor,
        groups: usize,
        silu: bool,
        dout: &B::Tensor,
        dx: &mut B::Tensor,
    ) {
        self.timed("group_norm_backward", || {
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
        self.timed("conv2d", || self.inner.conv2d(x, w, bias, geometry, epilogue, out))
    }
    fn conv2d_backward_input(&self, dout: &B::Tensor, w: &B::Tensor, geometry: Conv2dGeometry, dx: &mut B::Tensor) {
        self.timed("conv2d_backward_input", || self.inner.conv2d_backward_input(dout, w, geometry, dx))
    }
    fn attention(&self, q: &B::Tensor, k: &B::Tensor, v: &B::Tensor, out: &mut B::Tensor, logsumexp: &mut B::Tensor) {
        self.timed("attention", || self.inner.attention(q, k, v, out, logsumexp))
    }
    fn attention_backward(
        &self,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        out: &B::Tensor,
        logsumexp: &B::Tensor,
        dout: &B::Tensor,
        dq: &mut B::Tensor,
        dk: &mut B::Tensor,
        dv: &mut B::Tensor,
    ) {
        self.timed("attention_backward", || self.inner.attention_backward(q, k, v, out, logsumexp, dout, dq, dk, dv))
    }
    fn upsample_nearest2x(&self, x: &B::Tensor, out: &mut B::Tensor) {
        self.timed("upsample_nearest2x", || self.inner.upsample_nearest2x(x, out))
    }
    fn upsample_nearest2x_backward(&self, dout: &B::Tensor, dx: &mut B::Tensor) {
        self.timed("upsample_nearest2x_backward", || self.inner.upsample_nearest2x_backward(dout, dx))
    }
    fn concat_channels(&self, a: &B::Tensor, b: &B::Tensor, out: &mut B::Tensor) {
        self.timed("concat_channels", || self.inner.concat_channels(a, b, out))
    }
    fn concat_channels_backward(&self, dout: &B::Tensor, da: &mut B::Tensor, db: &mut B::Tensor) {
        self.timed("concat_channels_backward", || self.inner.concat_channels_backward(dout, da, db))
    }
    fn channel_affine(&self, x: &B::Tensor, scale: &B::Tensor, shift: &B::Tensor, out: &mut B::Tensor) {
        self.timed("channel_affine", || self.inner.channel_affine(x, scale, shift, out))
    }
    fn channel_affine_backward(&self, dout: &B::Tensor, scale: &B::Tensor, dx: &mut B::Tensor) {
        self.timed("channel_affine_backward", || self.inner.channel_affine_backward(dout, scale, dx))
    }
    fn relu(&self, x: &mut B::Tensor) {
        self.timed("relu", || self.inner.relu(x))
    }
    fn relu_backward(&self, y: &B::Tensor, dy: &B::Tensor, dx: &mut B::Tensor) {
        self.timed("relu_backward", || self.inner.relu_backward(y, dy, dx))
    }
    fn shortcut_subsample_pad(&self, x: &B::Tensor, pad: usize, out: &mut B::Tensor) {
        self.timed("shortcut_subsample_pad", || self.inner.shortcut_subsample_pad(x, pad, out))
    }
    fn shortcut_subsample_pad_backward(&self, dout: &B::Tensor, pad: usize, dx: &mut B::Tensor) {
        self.timed("shortcut_subsample_pad_backward", || self.inner.shortcut_subsample_pad_backward(dout, pad, dx))
    }
    fn global_avg_pool(&self, x: &B::Tensor, out: &mut B::Tensor) {
        self.timed("global_avg_pool", || self.inner.global_avg_pool(x, out))
    }
    fn global_avg_pool_backward(&self, dout: &B::Tensor, dx: &mut B::Tensor) {
        self.timed("global_avg_pool_backward", || self.inner.global_avg_pool_backward(dout, dx))
    }
    fn axpby(&self, a: f32, x: &B::Tensor, b: f32, y: &B::Tensor, out: &mut B::Tensor) {
        self.timed("axpby", || self.inner.axpby(a, x, b, y, out))
    }
    fn clamp(&self, x: &mut B::Tensor, lo: f32, hi: f32) {
        self.timed("clamp", || self.inner.clamp(x, lo, hi))
    }
    fn clamp_backward(&self, x: &B::Tensor, lo: f32, hi: f32, grad: &mut B::Tensor) {
        self.timed("clamp_backward", || self.inner.clamp_backward(x, lo, hi, grad))
    }
    fn fill_gaussian(&self, out: &mut B::Tensor, image_indices: &B::Tensor, seed: u64, stream: u64) {
        self.timed("fill_gaussian", || self.inner.fill_gaussian(out, image_indices, seed, stream))
    }
    fn step_unet_indices(&self, step: StepSource<'_, B::Tensor>, t: &mut B::Tensor) {
        self.timed("step_unet_indices", || self.inner.step_unet_indices(step, t))
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
        self.timed("axpby_step", || self.inner.axpby_step(step, a, x, b, y, out))
    }
    fn q_sample(&self, x: &B::Tensor, image_indices: &B::Tensor, step: StepSource<'_, B::Tensor>, x_t: &mut B::Tensor) {
        self.timed("q_sample", || self.inner.q_sample(x, image_indices, step, x_t))
    }
    fn reverse_step(
        &self,
        x_t: &mut B::Tensor,
        eps: &B::Tensor,
        delta: Option<&B::Tensor>,
        image_indices: &B::Tensor,
        step: StepSource<'_, B::Tensor>,
    ) {
        self.timed("reverse_step", || self.inner.reverse_step(x_t, eps, delta, image_indices, step))
    }
    fn predict_x0_and_mean(
        &self,
        x_t: &B::Tensor,
        eps: &B::Tensor,
        step: StepSource<'_, B::Tensor>,
        x0_hat: &mut B::Tensor,
        mu: &mut B::Tensor,
    ) {
        self.timed("predict_x0_and_mean", || self.inner.predict_x0_and_mean(x_t, eps, step, x0_hat, mu))
    }
    fn mask_clipped(&self, x_t: &B::Tensor, eps: &B::Tensor, step: StepSource<'_, B::Tensor>, u: &mut B::Tensor) {
        self.timed("mask_clipped", || self.inner.mask_clipped(x_t, eps, step, u))
    }
    fn constrain_guidance(&self, delta: &mut B::Tensor, x_t: &B::Tensor, mu: &B::Tensor, kappa: f32) {
        self.timed("constrain_guidance", || self.inner.constrain_guidance(delta, x_t, mu, kappa))
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
        self.timed("guidance_objective_grad", || {
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
        })
    }
    fn cross_entropy_grad(&self, logits: &B::Tensor, labels: &B::Tensor, dlogits: &mut B::Tensor) {
        self.timed("cross_entropy_grad", || self.inner.cross_entropy_grad(logits, labels, dlogits))
    }
}
