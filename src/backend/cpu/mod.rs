//! The CPU reference backend: plain f32 arithmetic, NCHW, obviously right. It is the spec every GPU kernel is
//! checked against, so it stays clear rather than clever; the one hot op, the convolution, is a
//! register-tiled product (see `conv`) so the CPU UNet stays usable.
//!
//! Shapes are checked with `assert!`: an op called with inconsistent shapes is a bug in the
//! caller, not bad user input. Loops run on rayon's pool, split over samples, channels or rows.
mod attention;
mod conv;
mod elementwise;
mod norm;
pub mod rng;

use rayon::prelude::*;

use super::*;
use crate::error::Error;
use elementwise::PAR_CHUNK;

/// A tensor in host memory: row-major f32 in the logical (NCHW / OIHW) shape. An f16 or bf16
/// tensor holds f32 values that are exactly representable in its type: every op computes in f32
/// and rounds once when it stores (`store`), as the GPU kernels do.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub dtype: Precision,
}

impl CpuTensor {
    /// An f32 tensor.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(data.len(), element_count(shape), "CpuTensor::new: {} values for shape {shape:?}", data.len());
        Self { shape: shape.to_vec(), data, dtype: Precision::F32 }
    }
}

impl TensorShape for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> Precision {
        self.dtype
    }
}

/// `v` rounded (to nearest even) to storage type `dtype`, back as f32.
pub fn round_to(dtype: Precision, v: f32) -> f32 {
    match dtype {
        Precision::F32 => v,
        Precision::F16 => half::f16::from_f32(v).to_f32(),
        Precision::Bf16 => half::bf16::from_f32(v).to_f32(),
    }
}

/// Rounds every value of tensors written by an op to their storage type (a no-op for f32).
fn store(tensors: &mut [&mut CpuTensor]) {
    for t in tensors {
        if t.dtype != Precision::F32 {
            let dtype = t.dtype;
            t.data.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = round_to(dtype, *v)));
        }
    }
}

/// See the module comment.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// The shape of `t` as `R` dimensions; panics naming `what` if it has another rank.
fn dims<const R: usize>(t: &CpuTensor, what: &str) -> [usize; R] {
    assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{what}: data does not fill shape {:?}", t.shape);
    t.shape[..].try_into().unwrap_or_else(|_| panic!("{what}: expected a {R}-D tensor, got shape {:?}", t.shape))
}

/// N, C, H, W of the attention whose q, k, v are the channel thirds of `qkv` (N x 3C x H x W).
fn attention_dims(qkv: &CpuTensor, what: &str) -> [usize; 4] {
    let [n, c3, h, w] = dims(qkv, what);
    assert!(c3 % 3 == 0, "{what}: {c3} channels, not three equal thirds (q, k, v)");
    [n, c3 / 3, h, w]
}

/// The reference accumulates into every gradient; a `GradientStore::Write` zeroes it first.
fn clear_for(gradient: GradientStore, tensors: &mut [&mut CpuTensor]) {
    if gradient == GradientStore::Write {
        for t in tensors.iter_mut() {
            t.data.fill(0.0);
        }
    }
}

fn expect_shape(t: &CpuTensor, expected: &[usize], what: &str) {
    assert!(t.shape == expected, "{what}: shape {:?}, expected {expected:?}", t.shape);
    assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{what}: data does not fill shape {:?}", t.shape);
}

/// (N, C, product of the remaining dims) of a tensor of rank >= 2.
fn batch_channels_rest(t: &CpuTensor, what: &str) -> (usize, usize, usize) {
    assert!(t.shape.len() >= 2, "{what}: expected N x C x ..., got shape {:?}", t.shape);
    (t.shape[0], t.shape[1], t.shape[2..].iter().product())
}

fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The row of `step.table` that `step.cursor` names, checked.
fn step_row<'a>(step: StepSource<'a, CpuTensor>, what: &str) -> &'a [f32] {
    let [rows, columns] = dims(step.table, &format!("{what}: step table"));
    assert_eq!(columns, STEP_COLUMNS, "{what}: a step table has {STEP_COLUMNS} columns, not {columns}");
    expect_shape(step.cursor, &[1], &format!("{what}: step cursor"));
    let cursor = step.cursor.data[0];
    assert!(
        cursor >= 0.0 && cursor.fract() == 0.0 && (cursor as usize) < rows,
        "{what}: step cursor {cursor} is not a row of a {rows}-row step table"
    );
    let row = cursor as usize;
    &step.table.data[row * STEP_COLUMNS..(row + 1) * STEP_COLUMNS]
}

/// A 64-bit value stored as four 16-bit pieces from column `first` on.
fn row_u64(row: &[f32], first: StepColumn) -> u64 {
    (0..4).map(|k| (row[first as usize + k] as u64) << (16 * k)).sum()
}

fn row_coefficients(row: &[f32]) -> StepCoefficients {
    StepCoefficients {
        sqrt_abar: row[StepColumn::SqrtAbar as usize],
        sqrt_one_minus_abar: row[StepColumn::SqrtOneMinusAbar as usize],
        c0: row[StepColumn::C0 as usize],
        ct: row[StepColumn::Ct as usize],
    }
}

/// The image indices of `fill_gaussian` and its table-driven relatives, checked.
fn image_numbers(image_indices: &CpuTensor, samples: usize, what: &str) -> Vec<u32> {
    expect_shape(image_indices, &[samples], &format!("{what}: image_indices"));
    assert_eq!(image_indices.dtype, Precision::F32, "{what}: image_indices must be stored in f32");
    image_indices
        .data
        .iter()
        .map(|&g| {
            assert!(
                g >= 0.0 && g.fract() == 0.0 && (g as u64) < IMAGE_INDEX_LIMIT,
                "{what}: image index {g} is not an integer in 0..2^24"
            );
            g as u32
        })
        .collect()
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Graph = NoGraph;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn precision(&self) -> Precision {
        Precision::F32
    }

    /// `MemAvailable` of /proc/meminfo (Linux); elsewhere unknown.
    fn available_memory(&self) -> Option<usize> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Work runs when the op is called; there is never a stored error.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn timestamp(&self) -> Result<Timestamp> {
        Ok(Timestamp::Host(std::time::Instant::now()))
    }

    fn elapsed_ms(&self, start: &Timestamp, end: &Timestamp) -> Result<f64> {
        match (start, end) {
            (Timestamp::Host(a), Timestamp::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e3),
            _ => Err(Error::invalid("elapsed_ms: timestamps of another backend")),
        }
    }

    /// Every op runs when it is called: nothing is recorded.
    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }

    fn end_capture(&self) -> Result<NoGraph> {
        Err(Error::invalid("end_capture: the CPU backend records no graphs (begin_capture said so)"))
    }

    fn replay(&self, graph: &NoGraph) -> Result<()> {
        match *graph {}
    }

    fn zeros_as(&self, shape: &[usize], dtype: Precision) -> Result<CpuTensor> {
        Ok(CpuTensor { shape: shape.to_vec(), data: vec![0.0; element_count(shape)], dtype })
    }

    fn upload_as(&self, data: &[f32], shape: &[usize], dtype: Precision) -> Result<CpuTensor> {
        if data.len() != element_count(shape) {
            return Err(Error::invalid(format!(
                "upload: {} values for shape {shape:?}, which holds {}",
                data.len(),
                element_count(shape)
            )));
        }
        let mut t = CpuTensor { shape: shape.to_vec(), data: data.to_vec(), dtype };
        store(&mut [&mut t]);
        Ok(t)
    }

    fn write(&self, dst: &mut CpuTensor, data: &[f32]) -> Result<()> {
        if data.len() != dst.data.len() {
            return Err(Error::invalid(format!(
                "write: {} values into a tensor of shape {:?}, which holds {}",
                data.len(),
                dst.shape,
                dst.data.len()
            )));
        }
        dst.data.copy_from_slice(data);
        store(&mut [dst]);
        Ok(())
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn copy(&self, src: &CpuTensor, dst: &mut CpuTensor) {
        expect_shape(dst, &src.shape, "copy: dst");
        dst.data.copy_from_slice(&src.data);
        store(&mut [dst]);
    }

    fn fill(&self, t: &mut CpuTensor, value: f32) {
        t.data.par_chunks_mut(PAR_CHUNK).for_each(|c| c.fill(value));
        store(&mut [t]);
    }

    fn add_assign(&self, dst: &mut CpuTensor, src: &CpuTensor) {
        expect_shape(src, &dst.shape, "add_assign: src");
        dst.data.par_chunks_mut(PAR_CHUNK).zip(src.data.par_chunks(PAR_CHUNK)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        });
        store(&mut [dst]);
    }

    fn timestep_embedding(&self, t: &CpuTensor, out: &mut CpuTensor) {
        let [n] = dims(t, "timestep_embedding: t");
        let [out_n, dim] = dims(out, "timestep_embedding: out");
        assert_eq!(out_n, n, "timestep_embedding: out {:?} for {n} steps", out.shape);
        assert!(dim % 2 == 0 && dim >= 4, "timestep_embedding: dim {dim} must be even and at least 4");
        elementwise::timestep_embedding(&t.data, dim, &mut out.data);
        store(&mut [out]);
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, b: Option<&CpuTensor>, silu_input: bool, out: &mut CpuTensor) {
        let [n, in_features] = dims(x, "linear: x");
        let [out_features, w_in] = dims(w, "linear: w");
        assert_eq!(w_in, in_features, "linear: w {:?} for x {:?}", w.shape, x.shape);
        if let Some(b) = b {
            expect_shape(b, &[out_features], "linear: b");
        }
        expect_shape(out, &[n, out_features], "linear: out");
        elementwise::linear(&x.data, &w.data, b.map(|b| &b.data[..]), in_features, silu_input, &mut out.data);
        store(&mut [out]);
    }

    fn linear_backward(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        silu_input: bool,
        dout: &CpuTensor,
        dx: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        let [n, in_features] = dims(x, "linear_backward: x");
        let [out_features, w_in] = dims(w, "linear_backward: w");
        assert_eq!(w_in, in_features, "linear_backward: w {:?} for x {:?}", w.shape, x.shape);
        expect_shape(dout, &[n, out_features], "linear_backward: dout");
        expect_shape(dx, &x.shape, "linear_backward: dx");
        clear_for(gradient, &mut [&mut *dx]);
        elementwise::linear_backward(&x.data, &w.data, in_features, silu_input, &dout.data, &mut dx.data);
        store(&mut [dx]);
    }

    fn group_norm(
        &self,
        x: LayerInput<'_, CpuTensor>,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        groups: usize,
        eps: f32,
        silu: bool,
        out: &mut CpuTensor,
        stats: &mut CpuTensor,
    ) {
        assert!(!x.upsample2x, "group_norm: an upsampled input is not supported");
        let joined = materialise(x, "group_norm: x");
        let x = joined.as_ref();
        let shape = group_norm_shape(x, gamma, beta, groups, "group_norm");
        expect_shape(out, &x.shape, "group_norm: out");
        expect_shape(stats, &[x.shape[0], groups, 2], "group_norm: stats");
        norm::forward(shape, &x.data, &gamma.data, &beta.data, eps, silu, &mut out.data, &mut stats.data);
        store(&mut [out, stats]);
    }

    fn group_norm_backward(
        &self,
        x: LayerInput<'_, CpuTensor>,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        stats: &CpuTensor,
        groups: usize,
        silu: bool,
        dout: &CpuTensor,
        dx: LayerGradient<'_, CpuTensor>,
    ) {
        assert!(!x.upsample2x, "group_norm_backward: an upsampled input is not supported");
        let joined = materialise(x, "group_norm_backward: x");
        let x = joined.as_ref();
        let shape = group_norm_shape(x, gamma, beta, groups, "group_norm_backward");
        expect_shape(stats, &[x.shape[0], groups, 2], "group_norm_backward: stats");
        expect_shape(dout, &x.shape, "group_norm_backward: dout");
        // The whole input's gradient in f32, plus the other path's, then stored into dx's sources.
        let mut whole = CpuTensor { shape: x.shape.clone(), data: vec![0.0; x.data.len()], dtype: Precision::F32 };
        norm::backward(shape, &x.data, &gamma.data, &beta.data, &stats.data, silu, &dout.data, &mut whole.data);
        if let Some(plus) = dx.plus {
            expect_shape(plus, &x.shape, "group_norm_backward: plus");
            whole.data.par_iter_mut().zip(&plus.data).for_each(|(g, &p)| *g += p);
        }
        match dx.b {
            None => {
                expect_shape(dx.a, &x.shape, "group_norm_backward: dx");
                clear_for(dx.a_store, &mut [&mut *dx.a]);
                dx.a.data.par_iter_mut().zip(&whole.data).for_each(|(g, &v)| *g += v);
                store(&mut [dx.a]);
            }
            Some((b, b_store)) => split_channels(&whole, dx.a, b, [dx.a_store, b_store], "group_norm_backward: dx"),
        }
        if let Some(copy) = dx.a_copy {
            expect_shape(copy, &dx.a.shape, "group_norm_backward: copy of dx");
            copy.data.copy_from_slice(&dx.a.data);
            store(&mut [copy]);
        }
    }

    fn conv2d(
        &self,
        x: LayerInput<'_, CpuTensor>,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        geometry: Conv2dGeometry,
        epilogue: ConvEpilogue<'_, CpuTensor>,
        out: &mut CpuTensor,
    ) {
        let joined = materialise(x, "conv2d: x");
        let x = joined.as_ref();
        dims::<4>(x, "conv2d: x");
        dims::<4>(w, "conv2d: w");
        let layout = conv::ConvLayout::new(&x.shape, &w.shape, geometry);
        let (n, co) = (layout.batch, layout.out_channels);
        expect_shape(out, &[n, co, layout.out_height, layout.out_width], "conv2d: out");
        let epilogue = conv_epilogue(bias, &epilogue, out, "conv2d");
        conv::forward(&layout, &x.data, &w.data, &epilogue, &mut out.data);
        store(&mut [out]);
    }

    fn conv2d_backward_input(
        &self,
        dout: &CpuTensor,
        w: &CpuTensor,
        geometry: Conv2dGeometry,
        dx: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        dims::<4>(dx, "conv2d_backward_input: dx");
        dims::<4>(w, "conv2d_backward_input: w");
        let layout = conv::ConvLayout::new(&dx.shape, &w.shape, geometry);
        let expected = [layout.batch, layout.out_channels, layout.out_height, layout.out_width];
        expect_shape(dout, &expected, "conv2d_backward_input: dout");
        clear_for(gradient, &mut [&mut *dx]);
        conv::backward_input(&layout, &dout.data, &w.data, &mut dx.data);
        store(&mut [dx]);
    }

    fn upsample_conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        epilogue: ConvEpilogue<'_, CpuTensor>,
        out: &mut CpuTensor,
    ) {
        let [n, ci, h, wd, co] = subpixel_dims(x, w, "upsample_conv2d");
        expect_shape(out, &[n, co, 2 * h, 2 * wd], "upsample_conv2d: out");
        let epilogue = conv_epilogue(bias, &epilogue, out, "upsample_conv2d");
        conv::subpixel_forward([n, ci, h, wd], &x.data, &w.data, &epilogue, &mut out.data);
        store(&mut [out]);
    }

    fn upsample_conv2d_backward_input(
        &self,
        dout: &CpuTensor,
        w: &CpuTensor,
        dx: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        let [n, ci, h, wd, co] = subpixel_dims(dx, w, "upsample_conv2d_backward_input");
        expect_shape(dout, &[n, co, 2 * h, 2 * wd], "upsample_conv2d_backward_input: dout");
        clear_for(gradient, &mut [&mut *dx]);
        conv::subpixel_backward_input([n, ci, h, wd], &dout.data, &w.data, &mut dx.data);
        store(&mut [dx]);
    }

    fn attention(&self, qkv: &CpuTensor, out: &mut CpuTensor, logsumexp: &mut CpuTensor) {
        let [n, c, h, w] = attention_dims(qkv, "attention: qkv");
        expect_shape(out, &[n, c, h, w], "attention: out");
        expect_shape(logsumexp, &[n, h * w], "attention: logsumexp");
        attention::forward(c, h * w, &qkv.data, &mut out.data, &mut logsumexp.data);
        store(&mut [out, logsumexp]);
    }

    fn attention_backward(
        &self,
        qkv: &CpuTensor,
        out: &CpuTensor,
        logsumexp: &CpuTensor,
        dout: &CpuTensor,
        scratch: AttentionScratch<'_, CpuTensor>,
        dqkv: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        let [n, c, h, w] = attention_dims(qkv, "attention_backward: qkv");
        // The reference keeps its D_i per query on the stack and reads dout as it is: the scratch
        // is checked, not used.
        expect_shape(scratch.row_terms, &[n, h * w], "attention_backward: row_terms");
        expect_shape(scratch.dout_rounded, &out.shape, "attention_backward: dout_rounded");
        assert!(
            scratch.row_terms.dtype == Precision::F32 && scratch.dout_rounded.dtype == qkv.dtype,
            "attention_backward: row_terms is f32 ({}), dout_rounded qkv's storage type {} ({})",
            scratch.row_terms.dtype,
            qkv.dtype,
            scratch.dout_rounded.dtype
        );
        expect_shape(out, &[n, c, h, w], "attention_backward: out");
        expect_shape(dout, &[n, c, h, w], "attention_backward: dout");
        expect_shape(dqkv, &qkv.shape, "attention_backward: dqkv");
        expect_shape(logsumexp, &[n, h * w], "attention_backward: logsumexp");
        clear_for(gradient, &mut [&mut *dqkv]);
        attention::backward(c, h * w, &qkv.data, &out.data, &logsumexp.data, &dout.data, &mut dqkv.data);
        store(&mut [dqkv]);
    }

    fn upsample_nearest2x(&self, x: &CpuTensor, out: &mut CpuTensor) {
        let [n, c, h, w] = dims(x, "upsample_nearest2x: x");
        expect_shape(out, &[n, c, 2 * h, 2 * w], "upsample_nearest2x: out");
        elementwise::upsample_nearest2x(&x.data, w, &mut out.data);
        store(&mut [out]);
    }

    fn upsample_nearest2x_backward(&self, dout: &CpuTensor, dx: &mut CpuTensor, gradient: GradientStore) {
        let [n, c, h, w] = dims(dx, "upsample_nearest2x_backward: dx");
        expect_shape(dout, &[n, c, 2 * h, 2 * w], "upsample_nearest2x_backward: dout");
        clear_for(gradient, &mut [&mut *dx]);
        elementwise::upsample_nearest2x_backward(&dout.data, w, &mut dx.data);
        store(&mut [dx]);
    }

    fn channel_affine(&self, x: &CpuTensor, scale: &CpuTensor, shift: &CpuTensor, out: &mut CpuTensor) {
        let (scale, shift) = (&scale.data[..], &shift.data[..]);
        let (_, c, plane) = batch_channels_rest(x, "channel_affine: x");
        assert!(
            scale.len() == c && shift.len() == c,
            "channel_affine: {} scales and {} shifts for {c} channels",
            scale.len(),
            shift.len()
        );
        expect_shape(out, &x.shape, "channel_affine: out");
        out.data.par_chunks_mut(plane).zip(x.data.par_chunks(plane)).enumerate().for_each(|(i, (o, x))| {
            let (s, t) = (scale[i % c], shift[i % c]);
            o.iter_mut().zip(x).for_each(|(o, &v)| *o = v * s + t);
        });
        store(&mut [out]);
    }

    fn channel_affine_backward(
        &self,
        dout: &CpuTensor,
        scale: &CpuTensor,
        dx: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        let scale = &scale.data[..];
        let (_, c, plane) = batch_channels_rest(dx, "channel_affine_backward: dx");
        assert_eq!(scale.len(), c, "channel_affine_backward: {} scales for {c} channels", scale.len());
        expect_shape(dout, &dx.shape, "channel_affine_backward: dout");
        clear_for(gradient, &mut [&mut *dx]);
        dx.data.par_chunks_mut(plane).zip(dout.data.par_chunks(plane)).enumerate().for_each(|(i, (g, d))| {
            let s = scale[i % c];
            g.iter_mut().zip(d).for_each(|(g, &v)| *g += v * s);
        });
        store(&mut [dx]);
    }

    fn relu(&self, x: &mut CpuTensor) {
        x.data.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        store(&mut [x]);
    }

    fn relu_backward(&self, y: &CpuTensor, dy: &CpuTensor, dx: &mut CpuTensor, gradient: GradientStore) {
        expect_shape(dy, &y.shape, "relu_backward: dy");
        expect_shape(dx, &y.shape, "relu_backward: dx");
        clear_for(gradient, &mut [&mut *dx]);
        dx.data
            .par_chunks_mut(PAR_CHUNK)
            .zip(y.data.par_chunks(PAR_CHUNK).zip(dy.data.par_chunks(PAR_CHUNK)))
            .for_each(|(g, (y, d))| {
                for ((g, &y), &d) in g.iter_mut().zip(y).zip(d) {
                    if y > 0.0 {
                        *g += d;
                    }
                }
            });
        store(&mut [dx]);
    }

    fn shortcut_subsample_pad(&self, x: &CpuTensor, pad: usize, out: &mut CpuTensor) {
        let [n, c, h, w] = dims(x, "shortcut_subsample_pad: x");
        expect_shape(out, &[n, c + 2 * pad, h.div_ceil(2), w.div_ceil(2)], "shortcut_subsample_pad: out");
        elementwise::shortcut_subsample_pad(&x.data, c, h, w, pad, &mut out.data);
        store(&mut [out]);
    }

    fn shortcut_subsample_pad_backward(
        &self,
        dout: &CpuTensor,
        pad: usize,
        dx: &mut CpuTensor,
        gradient: GradientStore,
    ) {
        let [n, c, h, w] = dims(dx, "shortcut_subsample_pad_backward: dx");
        expect_shape(dout, &[n, c + 2 * pad, h.div_ceil(2), w.div_ceil(2)], "shortcut_subsample_pad_backward: dout");
        clear_for(gradient, &mut [&mut *dx]);
        elementwise::shortcut_subsample_pad_backward(&dout.data, c, h, w, pad, &mut dx.data);
        store(&mut [dx]);
    }

    fn global_avg_pool(&self, x: &CpuTensor, out: &mut CpuTensor) {
        let [n, c, h, w] = dims(x, "global_avg_pool: x");
        expect_shape(out, &[n, c], "global_avg_pool: out");
        elementwise::global_avg_pool(&x.data, h * w, &mut out.data);
        store(&mut [out]);
    }

    fn global_avg_pool_backward(&self, dout: &CpuTensor, dx: &mut CpuTensor, gradient: GradientStore) {
        let [n, c, h, w] = dims(dx, "global_avg_pool_backward: dx");
        expect_shape(dout, &[n, c], "global_avg_pool_backward: dout");
        clear_for(gradient, &mut [&mut *dx]);
        elementwise::global_avg_pool_backward(&dout.data, h * w, &mut dx.data);
        store(&mut [dx]);
    }

    fn axpby(&self, a: f32, x: &CpuTensor, b: f32, y: &CpuTensor, out: &mut CpuTensor) {
        expect_shape(y, &x.shape, "axpby: y");
        expect_shape(out, &x.shape, "axpby: out");
        out.data
            .par_chunks_mut(PAR_CHUNK)
            .zip(x.data.par_chunks(PAR_CHUNK).zip(y.data.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (x, y))| {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    *o = a * x + b * y;
                }
            });
        store(&mut [out]);
    }

    fn clamp(&self, x: &mut CpuTensor, lo: f32, hi: f32) {
        assert!(lo <= hi, "clamp: lo {lo} > hi {hi}");
        x.data.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = v.clamp(lo, hi)));
        store(&mut [x]);
    }

    fn clamp_backward(&self, x: &CpuTensor, lo: f32, hi: f32, grad: &mut CpuTensor) {
        expect_shape(grad, &x.shape, "clamp_backward: grad");
        grad.data.par_chunks_mut(PAR_CHUNK).zip(x.data.par_chunks(PAR_CHUNK)).for_each(|(g, x)| {
            for (g, &x) in g.iter_mut().zip(x) {
                if !(lo..=hi).contains(&x) {
                    *g = 0.0;
                }
            }
        });
        store(&mut [grad]);
    }

    fn fill_gaussian(&self, out: &mut CpuTensor, image_indices: &CpuTensor, seed: u64, stream: u64) {
        let n = out.shape.first().copied().unwrap_or(0);
        let images = image_numbers(image_indices, n, "fill_gaussian");
        rng::fill_gaussian(&mut out.data, &images, seed, stream);
        store(&mut [out]);
    }

    fn step_unet_indices(&self, step: StepSource<'_, CpuTensor>, t: &mut CpuTensor) {
        let index = step_row(step, "step_unet_indices")[StepColumn::UnetStep as usize];
        let [_] = dims(t, "step_unet_indices: t");
        assert_eq!(t.dtype, Precision::F32, "step_unet_indices: t must be stored in f32");
        t.data.fill(index);
    }

    fn advance_step_cursor(&self, cursor: &mut CpuTensor, by: i32) {
        expect_shape(cursor, &[1], "advance_step_cursor: cursor");
        assert_eq!(cursor.dtype, Precision::F32, "advance_step_cursor: the cursor must be stored in f32");
        cursor.data[0] += by as f32;
    }

    fn axpby_step(
        &self,
        step: StepSource<'_, CpuTensor>,
        a: StepColumn,
        x: &CpuTensor,
        b: StepColumn,
        y: &CpuTensor,
        out: &mut CpuTensor,
    ) {
        let row = step_row(step, "axpby_step");
        self.axpby(row[a as usize], x, row[b as usize], y, out);
    }

    fn q_sample(&self, x: &CpuTensor, image_indices: &CpuTensor, step: StepSource<'_, CpuTensor>, x_t: &mut CpuTensor) {
        let row = step_row(step, "q_sample");
        expect_shape(x_t, &x.shape, "q_sample: x_t");
        let samples = x.shape.first().copied().unwrap_or(0);
        let images = image_numbers(image_indices, samples, "q_sample");
        let (a, s) = (row[StepColumn::SqrtAbar as usize], row[StepColumn::SqrtOneMinusAbar as usize]);
        let (seed, stream) = (row_u64(row, StepColumn::Seed), row_u64(row, StepColumn::Stream));
        let sample_len = x.data.len() / samples.max(1);
        x_t.data.par_chunks_mut(sample_len.max(1)).zip(x.data.par_chunks(sample_len.max(1))).zip(&images).for_each(
            |((out, x), &image)| {
                for (block, (out, x)) in out.chunks_mut(4).zip(x.chunks(4)).enumerate() {
                    let z = rng::gaussian_block(seed, stream, image, block as u32);
                    for ((o, &x), &z) in out.iter_mut().zip(x).zip(&z) {
                        *o = a * x + s * z;
                    }
                }
            },
        );
        store(&mut [x_t]);
    }

    fn reverse_step(
        &self,
        x_t: &mut CpuTensor,
        eps: &CpuTensor,
        delta: Option<&CpuTensor>,
        image_indices: &CpuTensor,
        step: StepSource<'_, CpuTensor>,
    ) {
        let row = step_row(step, "reverse_step");
        expect_shape(eps, &x_t.shape, "reverse_step: eps");
        if let Some(d) = delta {
            expect_shape(d, &x_t.shape, "reverse_step: delta");
        }
        let samples = x_t.shape.first().copied().unwrap_or(0);
        let images = image_numbers(image_indices, samples, "reverse_step");
        let sample_len = (x_t.data.len() / samples.max(1)).max(1);
        let k = row_coefficients(row);
        let sigma = row[StepColumn::NoiseStd as usize];
        let (seed, stream) = (row_u64(row, StepColumn::Seed), row_u64(row, StepColumn::Stream));
        x_t.data.par_chunks_mut(sample_len).enumerate().for_each(|(n, x)| {
            let eps = &eps.data[n * sample_len..(n + 1) * sample_len];
            let delta = delta.map(|d| &d.data[n * sample_len..(n + 1) * sample_len]);
            for (block, x) in x.chunks_mut(4).enumerate() {
                // The same operations, in the same order, as predict_x0_and_mean, add_assign and
                // axpby(1, mu, sigma, z): the fused step changes no bit.
                let z =
                    if sigma != 0.0 { rng::gaussian_block(seed, stream, images[n], block as u32) } else { [0.0; 4] };
                for (j, x) in x.iter_mut().enumerate() {
                    let e = block * 4 + j;
                    let x0 = elementwise::x0_unclipped(*x, eps[e], &k).clamp(-1.0, 1.0);
                    let mut mu = k.c0 * x0 + k.ct * *x;
                    if let Some(d) = delta {
                        mu += d[e];
                    }
                    // axpby(1, mu, sigma, z) computes 1 * mu + sigma * z, and 1 * mu is mu exactly.
                    *x = if sigma != 0.0 { mu + sigma * z[j] } else { mu };
                }
            }
        });
        store(&mut [x_t]);
    }

    fn predict_x0_and_mean(
        &self,
        x_t: &CpuTensor,
        eps: &CpuTensor,
        step: StepSource<'_, CpuTensor>,
        x0_hat: &mut CpuTensor,
        mu: &mut CpuTensor,
    ) {
        let k = row_coefficients(step_row(step, "predict_x0_and_mean"));
        expect_shape(eps, &x_t.shape, "predict_x0_and_mean: eps");
        expect_shape(x0_hat, &x_t.shape, "predict_x0_and_mean: x0_hat");
        expect_shape(mu, &x_t.shape, "predict_x0_and_mean: mu");
        elementwise::predict_x0_and_mean(&x_t.data, &eps.data, k, &mut x0_hat.data, &mut mu.data);
        store(&mut [x0_hat, mu]);
    }

    fn mask_clipped(&self, x_t: &CpuTensor, eps: &CpuTensor, step: StepSource<'_, CpuTensor>, u: &mut CpuTensor) {
        let k = row_coefficients(step_row(step, "mask_clipped"));
        expect_shape(eps, &x_t.shape, "mask_clipped: eps");
        expect_shape(u, &x_t.shape, "mask_clipped: u");
        elementwise::mask_clipped(&x_t.data, &eps.data, k, &mut u.data);
        store(&mut [u]);
    }

    fn constrain_guidance(&self, delta: &mut CpuTensor, x_t: &CpuTensor, mu: &CpuTensor, kappa: f32) {
        expect_shape(x_t, &delta.shape, "constrain_guidance: x_t");
        expect_shape(mu, &delta.shape, "constrain_guidance: mu");
        assert!(
            !delta.shape.is_empty() && delta.shape[0] > 0,
            "constrain_guidance: delta {:?} has no batch",
            delta.shape
        );
        assert!(kappa >= 0.0, "constrain_guidance: kappa {kappa} must be >= 0");
        let sample_len = delta.data.len() / delta.shape[0];
        elementwise::constrain_guidance(&mut delta.data, &x_t.data, &mu.data, sample_len, kappa);
        store(&mut [delta]);
    }

    fn guidance_objective_grad(
        &self,
        features: &CpuTensor,
        reference_features: &CpuTensor,
        logits: &CpuTensor,
        labels: &CpuTensor,
        lambda_f: f32,
        lambda_c: f32,
        dfeatures: &mut CpuTensor,
        dlogits: &mut CpuTensor,
    ) {
        let [n, _] = dims(features, "guidance_objective_grad: features");
        let [logits_n, _] = dims(logits, "guidance_objective_grad: logits");
        assert_eq!(logits_n, n, "guidance_objective_grad: logits {:?} for features {:?}", logits.shape, features.shape);
        expect_shape(reference_features, &features.shape, "guidance_objective_grad: reference_features");
        expect_shape(labels, &[n], "guidance_objective_grad: labels");
        expect_shape(dfeatures, &features.shape, "guidance_objective_grad: dfeatures");
        expect_shape(dlogits, &logits.shape, "guidance_objective_grad: dlogits");
        elementwise::guidance_objective_grad(
            &features.data,
            &reference_features.data,
            &logits.data,
            &labels.data,
            lambda_f,
            lambda_c,
            &mut dfeatures.data,
            &mut dlogits.data,
        );
        store(&mut [dfeatures, dlogits]);
    }

    fn cross_entropy_grad(&self, logits: &CpuTensor, labels: &CpuTensor, dlogits: &mut CpuTensor) {
        let [n, _] = dims(logits, "cross_entropy_grad: logits");
        expect_shape(labels, &[n], "cross_entropy_grad: labels");
        expect_shape(dlogits, &logits.shape, "cross_entropy_grad: dlogits");
        elementwise::cross_entropy_grad(&logits.data, &labels.data, &mut dlogits.data);
        store(&mut [dlogits]);
    }
}

/// [N, Ci, H, W, Co] of the sub-pixel upsample convolution's stored input x (or its gradient) and
/// weights (Co x Ci x 4 x 4); panics naming `what` on others.
fn subpixel_dims(x: &CpuTensor, w: &CpuTensor, what: &str) -> [usize; 5] {
    let [n, ci, h, wd] = dims(x, &format!("{what}: x"));
    let [co, w_ci, kh, kw] = dims(w, &format!("{what}: w"));
    assert!(
        w_ci == ci && (kh, kw) == (4, 4),
        "{what}: w {:?} is not the sub-pixel form of a 3x3 kernel on {ci} channels",
        w.shape
    );
    [n, ci, h, wd, co]
}

/// A convolution's epilogue as the reference computes it, its operands checked against `out`
/// (N x Co x OH x OW).
fn conv_epilogue<'a>(
    bias: Option<&'a CpuTensor>,
    epilogue: &ConvEpilogue<'a, CpuTensor>,
    out: &CpuTensor,
    what: &str,
) -> conv::Epilogue<'a> {
    let (n, co) = (out.shape[0], out.shape[1]);
    if let Some(b) = bias {
        expect_shape(b, &[co], &format!("{what}: bias"));
    }
    if let Some(cb) = epilogue.channel_bias {
        let column = epilogue.channel_bias_column;
        let width = cb.shape.get(1).copied().unwrap_or(0);
        assert!(
            cb.shape.len() == 2 && cb.shape[0] == n && column + co <= width,
            "{what}: channel_bias {:?} has no columns {column}..{} for {n} samples",
            cb.shape,
            column + co
        );
    }
    if let Some(r) = epilogue.residual {
        expect_shape(r, &out.shape, &format!("{what}: residual"));
    }
    conv::Epilogue {
        bias: bias.map(|b| &b.data[..]),
        channel_bias: epilogue
            .channel_bias
            .map(|t| conv::ChannelBias { values: &t.data[epilogue.channel_bias_column..], stride: t.shape[1] }),
        residual: epilogue.residual.map(|t| &t.data[..]),
        relu: epilogue.relu,
    }
}

/// The tensor a `LayerInput` reads: borrowed when it is one plain tensor, else built (the reference
/// backend may materialise what a GPU folds into its indexing).
fn materialise<'a>(input: LayerInput<'a, CpuTensor>, what: &str) -> std::borrow::Cow<'a, CpuTensor> {
    use std::borrow::Cow;
    let [n, c, h, w] = input.logical_shape().unwrap_or_else(|e| panic!("{what}: {e}"));
    if input.b.is_none() && !input.upsample2x {
        return Cow::Borrowed(input.a);
    }
    let dtype = input.a.dtype;
    let joined = match input.b {
        Some(b) => {
            let mut joined =
                CpuTensor { shape: vec![n, c, input.a.shape[2], input.a.shape[3]], data: Vec::new(), dtype };
            joined.data = vec![0.0; element_count(&joined.shape)];
            concat_channels(input.a, b, &mut joined);
            joined
        }
        None => input.a.clone(),
    };
    if !input.upsample2x {
        return Cow::Owned(joined);
    }
    let mut up = CpuTensor { shape: vec![n, c, h, w], data: vec![0.0; n * c * h * w], dtype };
    CpuBackend.upsample_nearest2x(&joined, &mut up);
    Cow::Owned(up)
}

fn group_norm_shape(
    x: &CpuTensor,
    gamma: &CpuTensor,
    beta: &CpuTensor,
    groups: usize,
    what: &str,
) -> norm::GroupNormShape {
    let (_, channels, spatial) = batch_channels_rest(x, what);
    assert!(groups > 0 && channels % groups == 0, "{what}: {channels} channels do not split into {groups} groups");
    expect_shape(gamma, &[channels], &format!("{what}: gamma"));
    expect_shape(beta, &[channels], &format!("{what}: beta"));
    norm::GroupNormShape { channels, spatial, groups }
}

/// out = concat(a, b) along channels.
fn concat_channels(a: &CpuTensor, b: &CpuTensor, out: &mut CpuTensor) {
    let (a_len, b_len) = concat_shapes(a, b, out, "concat_channels");
    // Per sample, out is a's block followed by b's.
    out.data.par_chunks_mut(a_len + b_len).zip(a.data.par_chunks(a_len).zip(b.data.par_chunks(b_len))).for_each(
        |(o, (a_n, b_n))| {
            o[..a_len].copy_from_slice(a_n);
            o[a_len..].copy_from_slice(b_n);
        },
    );
    store(&mut [out]);
}

/// da = whole[:, :Ca], db = whole[:, Ca:] (or +=, each as its `GradientStore` says).
fn split_channels(whole: &CpuTensor, da: &mut CpuTensor, db: &mut CpuTensor, gradient: [GradientStore; 2], what: &str) {
    let (a_len, b_len) = concat_shapes(da, db, whole, what);
    clear_for(gradient[0], &mut [&mut *da]);
    clear_for(gradient[1], &mut [&mut *db]);
    da.data
        .par_chunks_mut(a_len)
        .zip(db.data.par_chunks_mut(b_len))
        .zip(whole.data.par_chunks(a_len + b_len))
        .for_each(|((da_n, db_n), d)| {
            da_n.iter_mut().zip(&d[..a_len]).for_each(|(g, &v)| *g += v);
            db_n.iter_mut().zip(&d[a_len..]).for_each(|(g, &v)| *g += v);
        });
    store(&mut [da, db]);
}

/// Per-sample lengths of a and b, after checking that `joined` is their channel concatenation.
fn concat_shapes(a: &CpuTensor, b: &CpuTensor, joined: &CpuTensor, what: &str) -> (usize, usize) {
    let (n, ca, rest) = batch_channels_rest(a, what);
    let (_, cb, _) = batch_channels_rest(b, what);
    assert!(
        b.shape[0] == n && b.shape[2..] == a.shape[2..],
        "{what}: a {:?} and b {:?} differ outside channels",
        a.shape,
        b.shape
    );
    let mut expected = a.shape.clone();
    expected[1] = ca + cb;
    expect_shape(joined, &expected, what);
    (ca * rest, cb * rest)
}
