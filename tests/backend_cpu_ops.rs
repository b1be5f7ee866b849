//! The CPU backend's ops against naive references and finite differences.
//!
//! Every backward op is checked against central differences of its forward in random directions:
//! for a random cotangent g and direction d, `<backward(g), d>` must match
//! `(<g, f(x + h d)> - <g, f(x - h d)>) / 2h`. The error is measured against the typical size of
//! such a product, `||backward(g)|| ||d|| / sqrt(len)`, so a zero-ish projection cannot hide a bug.
//! Each backward is also run into a randomly pre-filled buffer to check that it accumulates.
use purifier::backend::cpu::{rng, CpuBackend, CpuTensor};
use purifier::backend::GradientStore::{Add, Write};
use purifier::backend::{
    AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, LayerGradient, LayerInput, StepColumn, StepSource,
    STEP_COLUMNS,
};

// ---------------------------------------------------------------------------------------------
// helpers

/// SplitMix64: reproducible test data without another dependency.
struct TestRng(u64);

impl TestRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn tensor(&mut self, shape: &[usize]) -> CpuTensor {
        let data = (0..shape.iter().product()).map(|_| self.uniform()).collect();
        CpuTensor::new(shape, data)
    }
}

fn zeros(shape: &[usize]) -> CpuTensor {
    CpuTensor::new(shape, vec![0.0; shape.iter().product()])
}

/// (x[:, :k], x[:, k:]) of an N x C x H x W tensor.
fn split_channels(x: &CpuTensor, k: usize) -> (CpuTensor, CpuTensor) {
    let &[n, c, h, w] = &x.shape[..] else { panic!("split_channels: {:?} is not N x C x H x W", x.shape) };
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for sample in x.data.chunks(c * h * w) {
        head.extend_from_slice(&sample[..k * h * w]);
        tail.extend_from_slice(&sample[k * h * w..]);
    }
    (CpuTensor::new(&[n, k, h, w], head), CpuTensor::new(&[n, c - k, h, w], tail))
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

/// max |a - b| / max(max |b|, 1e-30): the error relative to the reference's scale.
fn relative_max_error(a: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(reference).fold(0.0f64, |m, (&x, &r)| m.max((x as f64 - r).abs())) / scale
}

/// Checks `backward` (which must accumulate into its last argument) against central differences
/// of `forward` around `x`, in `directions` random directions; returns the worst normalised error.
fn check_vjp(
    name: &str,
    rng: &mut TestRng,
    x: &CpuTensor,
    forward: &dyn Fn(&CpuTensor) -> CpuTensor,
    backward: &dyn Fn(&CpuTensor, &mut CpuTensor),
    step: f32,
    tolerance: f64,
) -> f64 {
    let out_shape = forward(x).shape;
    let mut worst = 0.0f64;
    for _ in 0..3 {
        let cotangent = rng.tensor(&out_shape);
        let direction = rng.tensor(&x.shape);

        let mut grad = zeros(&x.shape);
        backward(&cotangent, &mut grad);
        let analytic = dot(&grad.data, &direction.data);

        let shifted = |sign: f32| {
            let mut p = x.clone();
            p.data.iter_mut().zip(&direction.data).for_each(|(v, &d)| *v += sign * step * d);
            dot(&cotangent.data, &forward(&p).data)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * step as f64);
        let typical = norm(&grad.data) * norm(&direction.data) / (x.data.len() as f64).sqrt();
        let error = (analytic - numeric).abs() / typical.max(1e-12);
        assert!(
            error < tolerance,
            "{name}: analytic {analytic:.6e} vs finite differences {numeric:.6e} (error {error:.2e} of typical {typical:.2e}, tolerance {tolerance:.0e})"
        );
        worst = worst.max(error);

        // Accumulation: into a pre-filled buffer, the result is the old contents plus the gradient.
        let prefill = rng.tensor(&x.shape);
        let mut accumulated = prefill.clone();
        backward(&cotangent, &mut accumulated);
        for ((&acc, &pre), &g) in accumulated.data.iter().zip(&prefill.data).zip(&grad.data) {
            assert!(
                ((acc - pre) - g).abs() <= 1e-5 * (1.0 + g.abs() + pre.abs()),
                "{name}: backward does not accumulate ({acc} != {pre} + {g})"
            );
        }
    }
    worst
}

// ---------------------------------------------------------------------------------------------
// convolution

/// The 7-loop definition, in f64.
fn conv_reference(x: &CpuTensor, w: &CpuTensor, g: Conv2dGeometry) -> Vec<f64> {
    let [n, ci, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [co, _, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    let (oh, ow) = g.output_size(h, wd, kh, kw);
    let mut out = vec![0.0f64; n * co * oh * ow];
    for b in 0..n {
        for o in 0..co {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0f64;
                    for i in 0..ci {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x.data[((b * ci + i) * h + iy as usize) * wd + ix as usize] as f64;
                                acc += xv * w.data[((o * ci + i) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    out[((b * co + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    out
}

struct ConvCase {
    x: [usize; 4],
    w: [usize; 4],
    geometry: Conv2dGeometry,
}

fn conv_cases() -> Vec<ConvCase> {
    let asym = |stride, pad_top, pad_left, pad_bottom, pad_right| Conv2dGeometry {
        stride,
        pad_top,
        pad_left,
        pad_bottom,
        pad_right,
    };
    vec![
        // ResnetBlock conv: 3x3, pad 1.
        ConvCase { x: [2, 5, 8, 8], w: [6, 5, 3, 3], geometry: Conv2dGeometry::same(1) },
        // UNet Downsample: pad right and bottom by 1, stride 2, no other padding.
        ConvCase { x: [2, 4, 8, 8], w: [5, 4, 3, 3], geometry: asym(2, 0, 0, 1, 1) },
        ConvCase { x: [1, 3, 7, 9], w: [4, 3, 3, 3], geometry: asym(2, 0, 0, 1, 1) },
        // 1x1 (nin_shortcut, attention projections), and a strided 1x1.
        ConvCase { x: [2, 7, 5, 6], w: [9, 7, 1, 1], geometry: Conv2dGeometry::same(0) },
        ConvCase { x: [1, 3, 6, 5], w: [2, 3, 1, 1], geometry: Conv2dGeometry::strided(2, 0) },
        // ResNet strided 3x3, odd sizes, rectangular kernels, stride 3, a 1-wide input.
        ConvCase { x: [1, 3, 9, 7], w: [5, 3, 3, 3], geometry: Conv2dGeometry::strided(2, 1) },
        ConvCase { x: [2, 2, 6, 7], w: [3, 2, 2, 3], geometry: asym(1, 1, 0, 0, 2) },
        ConvCase { x: [1, 2, 10, 11], w: [3, 2, 4, 2], geometry: asym(3, 2, 1, 0, 1) },
        ConvCase { x: [1, 2, 5, 1], w: [3, 2, 3, 3], geometry: asym(2, 1, 1, 1, 1) },
        // More channels than one tile in both directions, and few output channels (conv_out).
        ConvCase { x: [1, 17, 6, 6], w: [13, 17, 3, 3], geometry: Conv2dGeometry::same(1) },
        ConvCase { x: [2, 16, 5, 5], w: [3, 16, 3, 3], geometry: Conv2dGeometry::same(1) },
    ]
}

fn output_shape(case: &ConvCase) -> [usize; 4] {
    let (oh, ow) = case.geometry.output_size(case.x[2], case.x[3], case.w[2], case.w[3]);
    [case.x[0], case.w[0], oh, ow]
}

#[test]
fn conv2d_matches_naive_reference() {
    let backend = CpuBackend;
    let mut rng = TestRng(1);
    for case in conv_cases() {
        let (x, w) = (rng.tensor(&case.x), rng.tensor(&case.w));
        let mut out = rng.tensor(&output_shape(&case)); // garbage: the op must overwrite it
        backend.conv2d(LayerInput::one(&x), &w, None, case.geometry, ConvEpilogue::default(), &mut out);
        let error = relative_max_error(&out.data, &conv_reference(&x, &w, case.geometry));
        assert!(error < 1e-5, "conv2d {:?} * {:?} {:?}: error {error:e}", case.x, case.w, case.geometry);
    }
}

#[test]
fn conv2d_epilogue() {
    let backend = CpuBackend;
    let mut rng = TestRng(2);
    for case in conv_cases() {
        let shape = output_shape(&case);
        let (x, w) = (rng.tensor(&case.x), rng.tensor(&case.w));
        let bias = rng.tensor(&[case.w[0]]);
        // Columns 3.. of a wider tensor, as the UNet's blocks read their share of one.
        let (column, width) = (3, shape[1] + 5);
        let channel_bias = rng.tensor(&[shape[0], width]);
        let residual = rng.tensor(&shape);
        let plain = conv_reference(&x, &w, case.geometry);
        let plane = shape[2] * shape[3];
        for relu in [false, true] {
            let expected: Vec<f64> = plain
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let (n, c) = (i / plane / shape[1], i / plane % shape[1]);
                    let v = v
                        + bias.data[c] as f64
                        + channel_bias.data[n * width + column + c] as f64
                        + residual.data[i] as f64;
                    if relu {
                        v.max(0.0)
                    } else {
                        v
                    }
                })
                .collect();
            let mut out = rng.tensor(&shape);
            let epilogue = ConvEpilogue {
                channel_bias: Some(&channel_bias),
                channel_bias_column: column,
                residual: Some(&residual),
                relu,
            };
            backend.conv2d(LayerInput::one(&x), &w, Some(&bias), case.geometry, epilogue, &mut out);
            let error = relative_max_error(&out.data, &expected);
            assert!(error < 1e-5, "conv2d epilogue (relu {relu}) {:?} {:?}: error {error:e}", case.x, case.geometry);
        }
        // Bias alone, and channel bias alone.
        let mut out = zeros(&shape);
        backend.conv2d(LayerInput::one(&x), &w, Some(&bias), case.geometry, ConvEpilogue::default(), &mut out);
        let expected: Vec<f64> =
            plain.iter().enumerate().map(|(i, &v)| v + bias.data[i / plane % shape[1]] as f64).collect();
        assert!(relative_max_error(&out.data, &expected) < 1e-5);
        let epilogue =
            ConvEpilogue { channel_bias: Some(&channel_bias), channel_bias_column: column, ..Default::default() };
        backend.conv2d(LayerInput::one(&x), &w, None, case.geometry, epilogue, &mut out);
        let expected: Vec<f64> = plain
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (n, c) = (i / plane / shape[1], i / plane % shape[1]);
                v + channel_bias.data[n * width + column + c] as f64
            })
            .collect();
        assert!(relative_max_error(&out.data, &expected) < 1e-5);
    }
}

#[test]
fn conv2d_backward_input_is_the_adjoint() {
    let backend = CpuBackend;
    let mut rng = TestRng(3);
    for case in conv_cases() {
        let (x, w) = (rng.tensor(&case.x), rng.tensor(&case.w));
        let g = case.geometry;
        let forward = |x: &CpuTensor| {
            let mut out = zeros(&output_shape(&case));
            backend.conv2d(LayerInput::one(x), &w, None, g, ConvEpilogue::default(), &mut out);
            out
        };
        let backward = |dout: &CpuTensor, dx: &mut CpuTensor| backend.conv2d_backward_input(dout, &w, g, dx, Add);
        // Linear in x: the differences are exact up to rounding, whatever the step.
        check_vjp(&format!("conv2d {:?} {:?} {g:?}", case.x, case.w), &mut rng, &x, &forward, &backward, 0.5, 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// group norm

fn group_norm_reference(
    x: &CpuTensor,
    gamma: &[f32],
    beta: &[f32],
    groups: usize,
    eps: f64,
    silu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let len = c / groups * h * w;
    let mut out = vec![0.0; x.data.len()];
    let mut stats = vec![];
    for b in 0..n {
        for g in 0..groups {
            let start = (b * groups + g) * len;
            let block = &x.data[start..start + len];
            let mean = block.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = block.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            stats.extend([mean, rstd]);
            for (i, &v) in block.iter().enumerate() {
                let ch = g * (c / groups) + i / (h * w);
                let y = (v as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64;
                out[start + i] = if silu { y / (1.0 + (-y).exp()) } else { y };
            }
        }
    }
    (out, stats)
}

#[test]
fn group_norm_matches_reference_and_its_backward_matches_finite_differences() {
    let backend = CpuBackend;
    let mut rng = TestRng(4);
    for (shape, groups) in [([2, 8, 4, 4], 4), ([1, 6, 3, 5], 3), ([2, 4, 2, 2], 1), ([1, 4, 3, 3], 4)] {
        // An offset and scale per sample, so the normalisation has something to undo.
        let mut x = rng.tensor(&shape);
        let sample_len = x.data.len() / shape[0];
        x.data.iter_mut().enumerate().for_each(|(i, v)| *v = *v * 3.0 + (i / sample_len) as f32 - 0.5);
        let gamma = rng.tensor(&[shape[1]]);
        let beta = rng.tensor(&[shape[1]]);
        for silu in [false, true] {
            let (expected, expected_stats) = group_norm_reference(&x, &gamma.data, &beta.data, groups, 1e-6, silu);
            let mut out = rng.tensor(&shape);
            let mut stats = zeros(&[shape[0], groups, 2]);
            backend.group_norm(LayerInput::one(&x), &gamma, &beta, groups, 1e-6, silu, &mut out, &mut stats);
            assert!(relative_max_error(&out.data, &expected) < 1e-5, "group_norm {shape:?} silu {silu}");
            assert!(relative_max_error(&stats.data, &expected_stats) < 1e-6, "group_norm stats {shape:?}");

            let forward = |x: &CpuTensor| {
                let mut out = zeros(&shape);
                let mut stats = zeros(&[shape[0], groups, 2]);
                backend.group_norm(LayerInput::one(x), &gamma, &beta, groups, 1e-6, silu, &mut out, &mut stats);
                out
            };
            let backward = |dout: &CpuTensor, dx: &mut CpuTensor| {
                let x = LayerInput::one(&x);
                backend.group_norm_backward(x, &gamma, &beta, &stats, groups, silu, dout, LayerGradient::one(dx, Add))
            };
            check_vjp(
                &format!("group_norm {shape:?} groups {groups} silu {silu}"),
                &mut rng,
                &x,
                &forward,
                &backward,
                1e-2,
                5e-4,
            );

            // Read as a concat of its first channel and the rest (the groups straddling the two):
            // the gradient with respect to each source.
            let [n, c, h, w] = shape;
            let (head, tail) = split_channels(&x, 1);
            let concat_forward = |head: &CpuTensor, tail: &CpuTensor| {
                let mut out = zeros(&shape);
                let mut stats = zeros(&[n, groups, 2]);
                let input = LayerInput::concat(head, tail);
                backend.group_norm(input, &gamma, &beta, groups, 1e-6, silu, &mut out, &mut stats);
                out
            };
            let concat_backward = |dout: &CpuTensor, dhead: &mut CpuTensor, dtail: &mut CpuTensor| {
                let input = LayerInput::concat(&head, &tail);
                let dx = LayerGradient::concat(dhead, Add, dtail, Add);
                backend.group_norm_backward(input, &gamma, &beta, &stats, groups, silu, dout, dx)
            };
            let what = format!("group_norm of a concat {shape:?} groups {groups} silu {silu}");
            check_vjp(
                &format!("{what}: first source"),
                &mut rng,
                &head,
                &|head| concat_forward(head, &tail),
                &|g, d| concat_backward(g, d, &mut zeros(&[n, c - 1, h, w])),
                1e-2,
                5e-4,
            );
            check_vjp(
                &format!("{what}: second source"),
                &mut rng,
                &tail,
                &|tail| concat_forward(&head, tail),
                &|g, d| concat_backward(g, &mut zeros(&[n, 1, h, w]), d),
                1e-2,
                5e-4,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// attention

/// Naive attention in f64: (out, logsumexp).
fn attention_reference(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor) -> (Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let l = h * w;
    let mut out = vec![0.0; q.data.len()];
    let mut lse = vec![0.0; n * l];
    let at = |t: &CpuTensor, b: usize, ch: usize, i: usize| t.data[(b * c + ch) * l + i] as f64;
    for b in 0..n {
        for i in 0..l {
            let scores: Vec<f64> = (0..l)
                .map(|j| (0..c).map(|ch| at(q, b, ch, i) * at(k, b, ch, j)).sum::<f64>() / (c as f64).sqrt())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            lse[b * l + i] = max + sum.ln();
            for ch in 0..c {
                out[(b * c + ch) * l + i] = (0..l).map(|j| (scores[j] - max).exp() / sum * at(v, b, ch, j)).sum();
            }
        }
    }
    (out, lse)
}

/// The N x 3C x H x W tensor whose channel thirds are q, k, v (each N x C x H x W): what the
/// attention reads.
fn stack_thirds(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor) -> CpuTensor {
    let [n, c, h, w] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let sample = c * h * w;
    let mut data = Vec::with_capacity(3 * q.data.len());
    for b in 0..n {
        for t in [q, k, v] {
            data.extend_from_slice(&t.data[b * sample..(b + 1) * sample]);
        }
    }
    CpuTensor::new(&[n, 3 * c, h, w], data)
}

/// Third `which` (0 q, 1 k, 2 v) of an N x 3C x H x W tensor.
fn third(t: &CpuTensor, which: usize) -> CpuTensor {
    let [n, c3, h, w] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
    let sample = c3 / 3 * h * w;
    let data = (0..n).flat_map(|b| t.data[(3 * b + which) * sample..][..sample].iter().copied()).collect();
    CpuTensor::new(&[n, c3 / 3, h, w], data)
}

#[test]
fn attention_matches_reference_and_its_backward_matches_finite_differences() {
    let backend = CpuBackend;
    let mut rng = TestRng(5);
    for shape in [[2, 8, 3, 4], [1, 5, 4, 4], [1, 16, 2, 5]] {
        let lse_shape = [shape[0], shape[2] * shape[3]];
        // Scaled up so the softmax is far from uniform.
        let mut scaled = |s: f32| {
            let mut t = rng.tensor(&shape);
            t.data.iter_mut().for_each(|v| *v *= s);
            t
        };
        let (q, k, v) = (scaled(2.0), scaled(2.0), scaled(1.0));
        let (expected, expected_lse) = attention_reference(&q, &k, &v);
        let mut out = rng.tensor(&shape);
        let mut lse = rng.tensor(&lse_shape);
        let qkv = stack_thirds(&q, &k, &v);
        backend.attention(&qkv, &mut out, &mut lse);
        assert!(relative_max_error(&out.data, &expected) < 1e-5, "attention {shape:?}: out");
        assert!(relative_max_error(&lse.data, &expected_lse) < 1e-5, "attention {shape:?}: logsumexp");

        let run = |q: &CpuTensor, k: &CpuTensor, v: &CpuTensor| {
            let mut out = zeros(&shape);
            let mut lse = zeros(&lse_shape);
            backend.attention(&stack_thirds(q, k, v), &mut out, &mut lse);
            out
        };
        // One input at a time: its third of dqkv added to d.
        let backward = |which: usize, dout: &CpuTensor, d: &mut CpuTensor| {
            let mut dqkv = zeros(&qkv.shape);
            let (mut row_terms, mut dout_rounded) = (zeros(&lse_shape), zeros(&shape));
            let work = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut dout_rounded };
            backend.attention_backward(&qkv, &out, &lse, dout, work, &mut dqkv, Add);
            d.data.iter_mut().zip(&third(&dqkv, which).data).for_each(|(d, g)| *d += g);
        };
        check_vjp(
            &format!("attention {shape:?} dq"),
            &mut rng,
            &q,
            &|t| run(t, &k, &v),
            &|g, d| backward(0, g, d),
            1e-2,
            5e-4,
        );
        check_vjp(
            &format!("attention {shape:?} dk"),
            &mut rng,
            &k,
            &|t| run(&q, t, &v),
            &|g, d| backward(1, g, d),
            1e-2,
            5e-4,
        );
        check_vjp(
            &format!("attention {shape:?} dv"),
            &mut rng,
            &v,
            &|t| run(&q, &k, t),
            &|g, d| backward(2, g, d),
            0.5,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// small network ops

#[test]
fn timestep_embedding_matches_formula() {
    let backend = CpuBackend;
    let t = CpuTensor::new(&[4], vec![0.0, 1.0, 99.0, 999.0]);
    let dim = 16;
    let mut out = zeros(&[4, dim]);
    backend.timestep_embedding(&t, &mut out);
    let half = dim / 2;
    for (n, &step) in t.data.iter().enumerate() {
        for i in 0..half {
            let angle = step as f64 * (-(10000f64).ln() * i as f64 / (half - 1) as f64).exp();
            assert!((out.data[n * dim + i] as f64 - angle.sin()).abs() < 1e-7, "sin t {step} i {i}");
            assert!((out.data[n * dim + half + i] as f64 - angle.cos()).abs() < 1e-7, "cos t {step} i {i}");
        }
    }
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    let backend = CpuBackend;
    let mut rng = TestRng(6);
    let (x, w, b) = (rng.tensor(&[3, 13]), rng.tensor(&[7, 13]), rng.tensor(&[7]));
    for silu in [false, true] {
        let mut out = rng.tensor(&[3, 7]);
        backend.linear(&x, &w, Some(&b), silu, &mut out);
        let expected: Vec<f64> = (0..21)
            .map(|i| {
                let (n, o) = (i / 7, i % 7);
                let h = |v: f64| if silu { v / (1.0 + (-v).exp()) } else { v };
                b.data[o] as f64
                    + (0..13).map(|j| w.data[o * 13 + j] as f64 * h(x.data[n * 13 + j] as f64)).sum::<f64>()
            })
            .collect();
        assert!(relative_max_error(&out.data, &expected) < 1e-5, "linear silu {silu}");
        backend.linear(&x, &w, None, silu, &mut out);
        let no_bias: Vec<f64> = expected.iter().enumerate().map(|(i, &v)| v - b.data[i % 7] as f64).collect();
        assert!(relative_max_error(&out.data, &no_bias) < 1e-5, "linear without bias");

        let forward = |x: &CpuTensor| {
            let mut out = zeros(&[3, 7]);
            backend.linear(x, &w, Some(&b), silu, &mut out);
            out
        };
        let backward = |dout: &CpuTensor, dx: &mut CpuTensor| backend.linear_backward(&x, &w, silu, dout, dx, Add);
        let (step, tolerance) = if silu { (1e-2, 5e-4) } else { (0.5, 1e-5) };
        check_vjp(&format!("linear silu {silu}"), &mut rng, &x, &forward, &backward, step, tolerance);
    }
}

#[test]
fn layout_ops_forward_values() {
    let backend = CpuBackend;
    let mut rng = TestRng(7);
    let x = rng.tensor(&[2, 3, 3, 5]);
    let at = |t: &CpuTensor, n: usize, c: usize, y: usize, xx: usize| {
        t.data[((n * t.shape[1] + c) * t.shape[2] + y) * t.shape[3] + xx]
    };

    let mut up = rng.tensor(&[2, 3, 6, 10]);
    backend.upsample_nearest2x(&x, &mut up);
    let mut sub = rng.tensor(&[2, 7, 2, 3]);
    backend.shortcut_subsample_pad(&x, 2, &mut sub);
    for n in 0..2 {
        for c in 0..3 {
            for y in 0..6 {
                for xx in 0..10 {
                    assert_eq!(at(&up, n, c, y, xx), at(&x, n, c, y / 2, xx / 2));
                }
            }
        }
        for c in 0..7 {
            for y in 0..2 {
                for xx in 0..3 {
                    let expected = if (2..5).contains(&c) { at(&x, n, c - 2, 2 * y, 2 * xx) } else { 0.0 };
                    assert_eq!(at(&sub, n, c, y, xx), expected);
                }
            }
        }
    }

    let b = rng.tensor(&[2, 4, 3, 5]);
    // The concat a LayerInput reads, through a 1x1 convolution with identity weights.
    let mut cat = rng.tensor(&[2, 7, 3, 5]);
    let identity = CpuTensor::new(&[7, 7, 1, 1], (0..49).map(|i| if i % 8 == 0 { 1.0 } else { 0.0 }).collect());
    let one_by_one = Conv2dGeometry { stride: 1, pad_top: 0, pad_left: 0, pad_bottom: 0, pad_right: 0 };
    backend.conv2d(LayerInput::concat(&x, &b), &identity, None, one_by_one, ConvEpilogue::default(), &mut cat);
    for n in 0..2 {
        for c in 0..7 {
            for y in 0..3 {
                for xx in 0..5 {
                    let expected = if c < 3 { at(&x, n, c, y, xx) } else { at(&b, n, c - 3, y, xx) };
                    assert_eq!(at(&cat, n, c, y, xx), expected);
                }
            }
        }
    }

    let mut pooled = rng.tensor(&[2, 3]);
    backend.global_avg_pool(&x, &mut pooled);
    let expected: Vec<f64> = x.data.chunks(15).map(|p| p.iter().map(|&v| v as f64).sum::<f64>() / 15.0).collect();
    assert!(relative_max_error(&pooled.data, &expected) < 1e-6);

    let (scale, shift) = ([0.5, -2.0, 3.0], [0.1, 0.2, -0.3]);
    let mut affine = rng.tensor(&[2, 3, 3, 5]);
    let (scale_t, shift_t) = (CpuTensor::new(&[3], scale.to_vec()), CpuTensor::new(&[3], shift.to_vec()));
    backend.channel_affine(&x, &scale_t, &shift_t, &mut affine);
    for (i, (&o, &v)) in affine.data.iter().zip(&x.data).enumerate() {
        let c = i / 15 % 3;
        assert_eq!(o, v * scale[c] + shift[c]);
    }
}

#[test]
fn layout_ops_backward_match_finite_differences() {
    let backend = CpuBackend;
    let mut rng = TestRng(8);
    // All linear: exact up to rounding.
    let (step, tolerance) = (0.5, 1e-5);
    for shape in [[2, 3, 4, 6], [1, 2, 5, 3]] {
        let [n, c, h, w] = shape;
        let x = rng.tensor(&shape);

        let up = |x: &CpuTensor| {
            let mut out = zeros(&[n, c, 2 * h, 2 * w]);
            backend.upsample_nearest2x(x, &mut out);
            out
        };
        check_vjp(
            "upsample_nearest2x",
            &mut rng,
            &x,
            &up,
            &|g, d| backend.upsample_nearest2x_backward(g, d, Add),
            step,
            tolerance,
        );

        let sub = |x: &CpuTensor| {
            let mut out = zeros(&[n, c + 4, h.div_ceil(2), w.div_ceil(2)]);
            backend.shortcut_subsample_pad(x, 2, &mut out);
            out
        };
        check_vjp(
            "shortcut_subsample_pad",
            &mut rng,
            &x,
            &sub,
            &|g, d| backend.shortcut_subsample_pad_backward(g, 2, d, Add),
            step,
            tolerance,
        );

        let pool = |x: &CpuTensor| {
            let mut out = zeros(&[n, c]);
            backend.global_avg_pool(x, &mut out);
            out
        };
        check_vjp(
            "global_avg_pool",
            &mut rng,
            &x,
            &pool,
            &|g, d| backend.global_avg_pool_backward(g, d, Add),
            step,
            tolerance,
        );

        let scale = CpuTensor::new(&[c], (0..c).map(|i| 0.5 + i as f32).collect());
        let shift = CpuTensor::new(&[c], (0..c).map(|i| i as f32 - 1.0).collect());
        let affine = |x: &CpuTensor| {
            let mut out = zeros(&shape);
            backend.channel_affine(x, &scale, &shift, &mut out);
            out
        };
        check_vjp(
            "channel_affine",
            &mut rng,
            &x,
            &affine,
            &|g, d| backend.channel_affine_backward(g, &scale, d, Add),
            step,
            tolerance,
        );
    }
}

#[test]
fn relu_backward_and_add_assign_accumulate() {
    let backend = CpuBackend;
    let mut rng = TestRng(9);
    let (y, dy) = (rng.tensor(&[2, 3, 4, 4]), rng.tensor(&[2, 3, 4, 4]));
    let mut dx = CpuTensor::new(&y.shape, vec![1.0; y.data.len()]);
    backend.relu_backward(&y, &dy, &mut dx, Add);
    for ((&g, &yv), &d) in dx.data.iter().zip(&y.data).zip(&dy.data) {
        assert_eq!(g, if yv > 0.0 { 1.0 + d } else { 1.0 });
    }
    let mut written = CpuTensor::new(&y.shape, vec![f32::NAN; y.data.len()]);
    backend.relu_backward(&y, &dy, &mut written, Write);
    for ((&g, &yv), &d) in written.data.iter().zip(&y.data).zip(&dy.data) {
        assert_eq!(g, if yv > 0.0 { d } else { 0.0 });
    }
    let before = dx.clone();
    backend.add_assign(&mut dx, &dy);
    for ((&g, &b), &d) in dx.data.iter().zip(&before.data).zip(&dy.data) {
        assert_eq!(g, b + d);
    }
}

// ---------------------------------------------------------------------------------------------
// sampler, guidance and attack ops

#[test]
fn elementwise_sampler_ops() {
    let backend = CpuBackend;
    let mut rng = TestRng(10);
    let (x, y) = (rng.tensor(&[2, 3, 4, 4]), rng.tensor(&[2, 3, 4, 4]));

    let mut out = zeros(&x.shape);
    backend.axpby(0.75, &x, -1.5, &y, &mut out);
    for ((&o, &a), &b) in out.data.iter().zip(&x.data).zip(&y.data) {
        assert_eq!(o, 0.75 * a + -1.5 * b);
    }
    backend.copy(&x, &mut out);
    assert_eq!(out, x);
    backend.clamp(&mut out, -0.25, 0.5);
    assert!(out.data.iter().zip(&x.data).all(|(&o, &v)| o == v.clamp(-0.25, 0.5)));
    backend.fill(&mut out, 3.0);
    assert!(out.data.iter().all(|&v| v == 3.0));

    // x0 estimate, posterior mean and the clip mask.
    let mut row = vec![0.0; STEP_COLUMNS];
    for (column, value) in [
        (StepColumn::SqrtAbar, 0.6),
        (StepColumn::SqrtOneMinusAbar, 0.8),
        (StepColumn::C0, 0.3),
        (StepColumn::Ct, 0.65),
    ] {
        row[column as usize] = value;
    }
    let (table, cursor) = (CpuTensor::new(&[1, STEP_COLUMNS], row), CpuTensor::new(&[1], vec![0.0]));
    let k = StepSource { table: &table, cursor: &cursor };
    let mut x_t = rng.tensor(&x.shape);
    x_t.data.iter_mut().for_each(|v| *v *= 1.5);
    let eps = rng.tensor(&x.shape);
    let (mut x0, mut mu) = (zeros(&x.shape), zeros(&x.shape));
    backend.predict_x0_and_mean(&x_t, &eps, k, &mut x0, &mut mu);
    let mut u = CpuTensor::new(&x.shape, vec![2.0; x.data.len()]);
    backend.mask_clipped(&x_t, &eps, k, &mut u);
    let mut clipped = 0;
    for i in 0..x.data.len() {
        let raw = (x_t.data[i] - 0.8 * eps.data[i]) / 0.6;
        assert_eq!(x0.data[i], raw.clamp(-1.0, 1.0));
        assert_eq!(mu.data[i], 0.3 * x0.data[i] + 0.65 * x_t.data[i]);
        assert_eq!(u.data[i], if raw.abs() > 1.0 { 0.0 } else { 2.0 });
        clipped += (raw.abs() > 1.0) as usize;
    }
    assert!(clipped > 0 && clipped < x.data.len(), "the case should clip some elements, not all");
}

#[test]
fn constrain_guidance_limits_each_sample() {
    let backend = CpuBackend;
    let mut rng = TestRng(11);
    let shape = [3, 2, 3, 3];
    let (x_t, mu) = (rng.tensor(&shape), rng.tensor(&shape));
    let mut delta = rng.tensor(&shape);
    // Sample 1 small enough to be left alone, sample 2 zero.
    delta.data[18..36].iter_mut().for_each(|v| *v *= 1e-3);
    delta.data[36..].iter_mut().for_each(|v| *v = 0.0);
    let original = delta.clone();

    let mut unconstrained = delta.clone();
    backend.constrain_guidance(&mut unconstrained, &x_t, &mu, f32::INFINITY);
    assert_eq!(unconstrained, original);

    let kappa = 0.5;
    backend.constrain_guidance(&mut delta, &x_t, &mu, kappa);
    for n in 0..3 {
        let r = n * 18..(n + 1) * 18;
        let step: f64 = x_t.data[r.clone()]
            .iter()
            .zip(&mu.data[r.clone()])
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let before = norm(&original.data[r.clone()]);
        let factor = if before == 0.0 { 1.0 } else { (kappa as f64 * step / before).min(1.0) };
        for (&d, &o) in delta.data[r.clone()].iter().zip(&original.data[r]) {
            assert!((d as f64 - o as f64 * factor).abs() <= 1e-6 * o.abs() as f64, "sample {n}");
        }
        if n == 0 {
            assert!(factor < 1.0, "sample 0 should be limited");
        }
    }
}

/// log softmax(z)[y] in f64.
fn log_softmax(z: &[f32], y: usize) -> f64 {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
    z[y] as f64 - max - sum.ln()
}

#[test]
fn guidance_and_cross_entropy_gradients_match_finite_differences() {
    let backend = CpuBackend;
    let mut rng = TestRng(12);
    let (n, f, k) = (3, 10, 5);
    let (features, reference) = (rng.tensor(&[n, f]), rng.tensor(&[n, f]));
    let mut logits = rng.tensor(&[n, k]);
    logits.data.iter_mut().for_each(|v| *v *= 3.0);
    let labels = CpuTensor::new(&[n], vec![4.0, 0.0, 2.0]);
    let (lambda_f, lambda_c) = (0.7f32, 1.3f32);

    let objective = |features: &[f32], logits: &[f32]| -> f64 {
        let mut total = 0.0;
        for b in 0..n {
            let distance: f64 =
                (0..f).map(|i| (features[b * f + i] as f64 - reference.data[b * f + i] as f64).powi(2)).sum();
            total += -(lambda_f as f64) * distance / f as f64
                + lambda_c as f64 * log_softmax(&logits[b * k..(b + 1) * k], labels.data[b] as usize);
        }
        total
    };
    let (mut dfeatures, mut dlogits) = (rng.tensor(&[n, f]), rng.tensor(&[n, k])); // overwritten
    backend.guidance_objective_grad(
        &features,
        &reference,
        &logits,
        &labels,
        lambda_f,
        lambda_c,
        &mut dfeatures,
        &mut dlogits,
    );
    // The objective is evaluated in f64, so each partial derivative can be checked on its own.
    let h = 1e-3f32;
    for i in 0..n * f {
        let (mut plus, mut minus) = (features.data.clone(), features.data.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (objective(&plus, &logits.data) - objective(&minus, &logits.data)) / (plus[i] - minus[i]) as f64;
        assert!(
            (dfeatures.data[i] as f64 - numeric).abs() < 1e-4,
            "dfeatures[{i}]: {} vs {numeric}",
            dfeatures.data[i]
        );
    }
    for i in 0..n * k {
        let (mut plus, mut minus) = (logits.data.clone(), logits.data.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric =
            (objective(&features.data, &plus) - objective(&features.data, &minus)) / (plus[i] - minus[i]) as f64;
        assert!((dlogits.data[i] as f64 - numeric).abs() < 1e-4, "dlogits[{i}]: {} vs {numeric}", dlogits.data[i]);
    }

    // Cross-entropy: sum_n -log softmax(z_n)[y_n].
    let mut dce = rng.tensor(&[n, k]);
    backend.cross_entropy_grad(&logits, &labels, &mut dce);
    let loss =
        |z: &[f32]| -> f64 { (0..n).map(|b| -log_softmax(&z[b * k..(b + 1) * k], labels.data[b] as usize)).sum() };
    for i in 0..n * k {
        let (mut plus, mut minus) = (logits.data.clone(), logits.data.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (loss(&plus) - loss(&minus)) / (plus[i] - minus[i]) as f64;
        assert!((dce.data[i] as f64 - numeric).abs() < 1e-4, "cross-entropy d[{i}]: {} vs {numeric}", dce.data[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// memory and noise

#[test]
fn memory_ops_check_sizes() {
    let backend = CpuBackend;
    let t = backend.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
    assert_eq!(backend.download(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert!(backend.upload(&[1.0, 2.0], &[3]).is_err());
    let mut z = backend.zeros(&[2, 3]).unwrap();
    assert_eq!(z.data, vec![0.0; 6]);
    backend.write(&mut z, &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]).unwrap();
    assert_eq!(z.data, vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
    assert!(backend.write(&mut z, &[1.0]).is_err());
    assert!(backend.name().starts_with("cpu (f32, "));
}

#[test]
fn philox_known_answer_vectors() {
    // Random123 tests/kat_vectors, the three philox4x32 10 lines.
    assert_eq!(rng::philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    assert_eq!(rng::philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    assert_eq!(
        rng::philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

fn image_indices(indices: &[u32]) -> CpuTensor {
    CpuTensor::new(&[indices.len()], indices.iter().map(|&g| g as f32).collect())
}

#[test]
fn fill_gaussian_is_standard_normal_and_reproducible() {
    let backend = CpuBackend;
    let len = 1_000_000;
    let mut a = zeros(&[1, len]);
    backend.fill_gaussian(&mut a, &image_indices(&[0]), 1234, 0);
    let mean = a.data.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
    let var = a.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
    // Standard errors: 1e-3 for the mean, 1.4e-3 for the variance.
    assert!(mean.abs() < 5e-3, "mean {mean}");
    assert!((var - 1.0).abs() < 1e-2, "variance {var}");
    let tail = a.data.iter().filter(|v| v.abs() > 1.96).count() as f64 / len as f64;
    assert!((tail - 0.05).abs() < 2e-3, "two-sided 5% tail holds {tail}");

    // The same (seed, stream, image) gives the same noise, whatever the image's shape.
    let mut b = zeros(&[1, 10, 3, 7]);
    backend.fill_gaussian(&mut b, &image_indices(&[0]), 1234, 0);
    assert_eq!(&b.data[..], &a.data[..210]);
    // A different stream, seed or image gives different noise.
    let mut c = zeros(&[1, 210]);
    for (image, seed, stream) in [(0, 1234, 1), (0, 1235, 0), (1, 1234, 0)] {
        backend.fill_gaussian(&mut c, &image_indices(&[image]), seed, stream);
        assert!(c.data.iter().zip(&b.data).all(|(x, y)| x != y), "image {image}, seed {seed}, stream {stream}");
    }
    // Element 4i + j of an image is normal j of its Philox block i.
    assert_eq!(&a.data[8..12], &rng::gaussian_block(1234, 0, 0, 2));
}

/// Image g's noise is the same whether g is first in a batch or third, and a batch of images is
/// the images filled one by one.
#[test]
fn fill_gaussian_keys_noise_by_image_not_by_place_in_batch() {
    let backend = CpuBackend;
    let image = 3 * 32 * 32;
    let mut first = zeros(&[2, 3, 32, 32]);
    backend.fill_gaussian(&mut first, &image_indices(&[11, 12]), 5, 9);
    let mut third = zeros(&[4, 3, 32, 32]);
    backend.fill_gaussian(&mut third, &image_indices(&[7, 0, 11, 3]), 5, 9);
    assert_eq!(&first.data[..image], &third.data[2 * image..3 * image]);
    for (n, &g) in [7, 0, 11, 3].iter().enumerate() {
        let mut alone = zeros(&[1, 3, 32, 32]);
        backend.fill_gaussian(&mut alone, &image_indices(&[g]), 5, 9);
        assert_eq!(&alone.data[..], &third.data[n * image..(n + 1) * image], "image {g}");
    }
    assert_ne!(&third.data[..image], &third.data[image..2 * image]);
}

/// Parallel loops split outputs, never sums: results do not depend on the number of threads.
#[test]
fn results_do_not_depend_on_thread_count() {
    let run = || {
        let backend = CpuBackend;
        let mut rng = TestRng(14);
        let x = rng.tensor(&[2, 16, 12, 12]);
        let qkv = rng.tensor(&[2, 48, 12, 12]);
        let w = rng.tensor(&[20, 16, 3, 3]);
        let g = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
        let mut conv = zeros(&[2, 20, 6, 6]);
        backend.conv2d(LayerInput::one(&x), &w, None, g, ConvEpilogue::default(), &mut conv);
        let mut dx = zeros(&x.shape);
        backend.conv2d_backward_input(&conv, &w, g, &mut dx, Add);
        let (gamma, beta) = (rng.tensor(&[16]), rng.tensor(&[16]));
        let (mut norm, mut stats) = (zeros(&x.shape), zeros(&[2, 4, 2]));
        backend.group_norm(LayerInput::one(&x), &gamma, &beta, 4, 1e-6, true, &mut norm, &mut stats);
        let input = LayerInput::one(&x);
        backend.group_norm_backward(input, &gamma, &beta, &stats, 4, true, &norm, LayerGradient::one(&mut dx, Add));
        let (mut att, mut lse) = (zeros(&x.shape), zeros(&[2, 144]));
        backend.attention(&qkv, &mut att, &mut lse);
        let mut dqkv = zeros(&qkv.shape);
        let (mut row_terms, mut dout_rounded) = (zeros(&[2, 144]), zeros(&x.shape));
        let scratch = AttentionScratch { row_terms: &mut row_terms, dout_rounded: &mut dout_rounded };
        backend.attention_backward(&qkv, &att, &lse, &x, scratch, &mut dqkv, Add);
        [conv.data, dx.data, att.data, dqkv.data]
    };
    let with_threads = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(run);
    assert!(with_threads(1) == with_threads(3), "results differ between 1 and 3 threads");
}

// ---------------------------------------------------------------------------------------------
// timing (run with `cargo test --test backend_cpu_ops -- --ignored --nocapture`)

#[test]
#[ignore]
fn conv3x3_128_channels_32x32_timing() {
    let backend = CpuBackend;
    let mut rng = TestRng(13);
    let x = rng.tensor(&[1, 128, 32, 32]);
    let w = rng.tensor(&[128, 128, 3, 3]);
    let mut out = zeros(&[1, 128, 32, 32]);
    let mut dx = zeros(&[1, 128, 32, 32]);
    let g = Conv2dGeometry::same(1);
    // The fastest of many runs: the least disturbed by whatever else the machine is doing.
    let time = |f: &mut dyn FnMut()| {
        f();
        (0..40)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    };
    let forward = time(&mut || backend.conv2d(LayerInput::one(&x), &w, None, g, ConvEpilogue::default(), &mut out));
    let backward = time(&mut || backend.conv2d_backward_input(&out, &w, g, &mut dx, Add));
    let gmac = 128.0 * 128.0 * 9.0 * 1024.0 / 1e9;
    println!("conv 3x3 128->128 32x32 batch 1 on {}: forward {forward:.2} ms ({:.1} GMAC/s), backward-input {backward:.2} ms ({:.1} GMAC/s)", backend.name(), gmac / forward * 1e3, gmac / backward * 1e3);
    let down = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
    let mut half = zeros(&[1, 128, 16, 16]);
    let down_forward =
        time(&mut || backend.conv2d(LayerInput::one(&x), &w, None, down, ConvEpilogue::default(), &mut half));
    let down_backward = time(&mut || backend.conv2d_backward_input(&half, &w, down, &mut dx, Add));
    println!(
        "downsample 3x3 stride 2 128->128 32x32: forward {down_forward:.2} ms, backward-input {down_backward:.2} ms"
    );
}

/// The clamp's backward: the gradient passes where the input lies in [lo, hi] (ends included)
/// and is zero elsewhere; the clamp itself is the forward it differentiates.
#[test]
fn clamp_backward_passes_exactly_inside_the_range() {
    let b = CpuBackend;
    let mut rng = TestRng(41);
    let mut x = rng.tensor(&[2, 3, 4, 4]);
    x.data[0] = 0.5;
    x.data[1] = -0.5;
    x.data[2] = 0.50001;
    let g = rng.tensor(&[2, 3, 4, 4]);
    let mut grad = g.clone();
    b.clamp_backward(&x, -0.5, 0.5, &mut grad);
    let mut clamped = x.clone();
    b.clamp(&mut clamped, -0.5, 0.5);
    for i in 0..x.data.len() {
        let inside = (-0.5..=0.5).contains(&x.data[i]);
        assert_eq!(grad.data[i], if inside { g.data[i] } else { 0.0 }, "element {i}, x = {}", x.data[i]);
        assert_eq!(clamped.data[i] == x.data[i], inside, "element {i}");
    }
    assert!(grad.data[0] != 0.0 && grad.data[1] != 0.0 && grad.data[2] == 0.0);
}

/// ReLU in place, and its backward from the output.
#[test]
fn relu_clips_negatives_and_its_backward_follows_the_output() {
    let b = CpuBackend;
    let mut rng = TestRng(43);
    let x = rng.tensor(&[2, 3, 4, 4]);
    let mut y = x.clone();
    b.relu(&mut y);
    for (y, x) in y.data.iter().zip(&x.data) {
        assert_eq!(*y, x.max(0.0));
    }
    let dy = rng.tensor(&[2, 3, 4, 4]);
    let mut dx = zeros(&[2, 3, 4, 4]);
    b.relu_backward(&y, &dy, &mut dx, Write);
    for i in 0..x.data.len() {
        assert_eq!(dx.data[i], if x.data[i] > 0.0 { dy.data[i] } else { 0.0 });
    }
}

/// f16/bf16 tensors hold values rounded once to their type, on upload and on every op's store;
/// f32 tensors are untouched.
#[test]
fn half_precision_tensors_round_on_store() {
    use purifier::backend::{Precision, TensorShape};
    let backend = CpuBackend;
    let values = [1.0f32 + 1.0 / 1024.0 + 1.0 / 4096.0, -3.33337, 65519.0, 1e-3];
    for dtype in [Precision::F32, Precision::F16, Precision::Bf16] {
        let t = backend.upload_as(&values, &[4], dtype).unwrap();
        assert_eq!(t.dtype(), dtype);
        let expected: Vec<f32> = values.iter().map(|&v| purifier::backend::cpu::round_to(dtype, v)).collect();
        assert_eq!(t.data, expected, "{dtype}");
        let mut out = backend.zeros_as(&[4], dtype).unwrap();
        let ones = backend.upload(&[1.0; 4], &[4]).unwrap();
        backend.axpby(1.0, &t, 1.0 / 3.0, &ones, &mut out);
        for (o, &v) in out.data.iter().zip(&expected) {
            assert_eq!(*o, purifier::backend::cpu::round_to(dtype, v + 1.0 / 3.0), "{dtype}");
        }
    }
    // bf16 keeps 8 significant bits, f16 11: the first value shows the difference.
    assert_eq!(purifier::backend::cpu::round_to(Precision::Bf16, values[0]), 1.0);
    assert_eq!(purifier::backend::cpu::round_to(Precision::F16, values[0]), 1.0 + 1.0 / 1024.0);
}
