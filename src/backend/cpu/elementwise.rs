//! The small ops: activations, linear layers, the timestep embedding, layout ops (upsample,
//! concat, shortcut, pooling) and the sampler's and guidance's per-element math. All take plain
//! slices whose shapes `super` has checked.
use rayon::prelude::*;

use crate::backend::StepCoefficients;

/// Elements per parallel task of the element-wise loops: small tensors stay on one thread.
pub const PAR_CHUNK: usize = 1 << 14;

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// d silu / dx = s (1 + x (1 - s)), s = sigmoid(x).
pub fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// Dot product in 8 fixed lanes: vectorises, and the summation order never depends on the machine.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0.0f32; 8];
    for (x, y) in a8.zip(b8) {
        for j in 0..8 {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// y += a x.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Softmax of one row, through f64 (max-shifted), rounded once.
pub fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    for (p, &z) in out.iter_mut().zip(logits) {
        *p = ((z as f64 - max).exp() / sum) as f32;
    }
}

/// A class label stored as f32, checked to be an integer in 0..classes.
pub fn class_index(label: f32, classes: usize) -> usize {
    assert!(
        label >= 0.0 && label.fract() == 0.0 && (label as usize) < classes,
        "label {label} is not a class index in 0..{classes}"
    );
    label as usize
}

/// Sinusoidal embedding: `out[n] = concat(sin(t_n f), cos(t_n f))`, `f_i = exp(-ln(10000) i / (half - 1))`.
/// The angle `t f_i` is formed in f64 and only the sine and cosine are rounded to f32: with t up to
/// 999, an f32 angle would already be off by ~3e-5 rad before the sine is taken.
pub fn timestep_embedding(t: &[f32], dim: usize, out: &mut [f32]) {
    let half = dim / 2;
    let frequencies: Vec<f64> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / (half - 1) as f64).exp()).collect();
    for (row, &step) in out.chunks_mut(dim).zip(t) {
        let (sin, cos) = row.split_at_mut(half);
        for ((s, c), &f) in sin.iter_mut().zip(cos.iter_mut()).zip(&frequencies) {
            let angle = step as f64 * f;
            *s = angle.sin() as f32;
            *c = angle.cos() as f32;
        }
    }
}

/// out (N x out) = W silu?(x) + b, x (N x in), W (out x in).
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, in_features: usize, silu_input: bool, out: &mut [f32]) {
    let out_features = w.len() / in_features;
    out.par_chunks_mut(out_features).zip(x.par_chunks(in_features)).for_each(|(out_n, x_n)| {
        let h: Vec<f32> = if silu_input { x_n.iter().map(|&v| silu(v)).collect() } else { x_n.to_vec() };
        for (o, (dst, w_o)) in out_n.iter_mut().zip(w.chunks(in_features)).enumerate() {
            *dst = dot(w_o, &h) + b.map_or(0.0, |b| b[o]);
        }
    });
}

/// dx += (W^T dout) * silu'(x) (or without the silu factor).
pub fn linear_backward(x: &[f32], w: &[f32], in_features: usize, silu_input: bool, dout: &[f32], dx: &mut [f32]) {
    let out_features = w.len() / in_features;
    dx.par_chunks_mut(in_features).zip(x.par_chunks(in_features)).zip(dout.par_chunks(out_features)).for_each(
        |((dx_n, x_n), dout_n)| {
            let mut g = vec![0.0f32; in_features];
            for (&d, w_o) in dout_n.iter().zip(w.chunks(in_features)) {
                axpy(d, w_o, &mut g);
            }
            for ((dx, &v), &g) in dx_n.iter_mut().zip(x_n).zip(&g) {
                *dx += if silu_input { g * silu_grad(v) } else { g };
            }
        },
    );
}

/// out[., 2y + a, 2x + b] = x[., y, x] for planes of h x w.
pub fn upsample_nearest2x(x: &[f32], width: usize, out: &mut [f32]) {
    // Each input row becomes two identical output rows of twice the width.
    out.par_chunks_mut(4 * width).zip(x.par_chunks(width)).for_each(|(out_rows, row)| {
        let (top, bottom) = out_rows.split_at_mut(2 * width);
        for (pair, &v) in top.chunks_mut(2).zip(row) {
            pair.fill(v);
        }
        bottom.copy_from_slice(top);
    });
}

/// dx[., y, x] += sum of the 2x2 block of dout it was copied to.
pub fn upsample_nearest2x_backward(dout: &[f32], width: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(width).zip(dout.par_chunks(4 * width)).for_each(|(row, dout_rows)| {
        let (top, bottom) = dout_rows.split_at(2 * width);
        for (x, d) in row.iter_mut().enumerate() {
            *d += top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1];
        }
    });
}

/// CIFAR ResNet option-A shortcut: out[n, pad + c, y, x] = x[n, c, 2y, 2x], zero channels around.
/// Shapes: x (N x C x H x W), out (N x (C + 2 pad) x ceil(H/2) x ceil(W/2)).
pub fn shortcut_subsample_pad(x: &[f32], channels: usize, height: usize, width: usize, pad: usize, out: &mut [f32]) {
    let (oh, ow) = (height.div_ceil(2), width.div_ceil(2));
    let out_channels = channels + 2 * pad;
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, dst)| {
        let (n, oc) = (plane / out_channels, plane % out_channels);
        if oc < pad || oc >= pad + channels {
            dst.fill(0.0);
            return;
        }
        let src = &x[(n * channels + oc - pad) * height * width..][..height * width];
        for y in 0..oh {
            for x in 0..ow {
                dst[y * ow + x] = src[2 * y * width + 2 * x];
            }
        }
    });
}

/// dx[n, c, 2y, 2x] += dout[n, pad + c, y, x].
pub fn shortcut_subsample_pad_backward(
    dout: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    pad: usize,
    dx: &mut [f32],
) {
    let (oh, ow) = (height.div_ceil(2), width.div_ceil(2));
    let out_channels = channels + 2 * pad;
    dx.par_chunks_mut(height * width).enumerate().for_each(|(plane, dst)| {
        let (n, c) = (plane / channels, plane % channels);
        let src = &dout[(n * out_channels + pad + c) * oh * ow..][..oh * ow];
        for y in 0..oh {
            for x in 0..ow {
                dst[2 * y * width + 2 * x] += src[y * ow + x];
            }
        }
    });
}

/// out[i] = mean of plane i (summed in f64).
pub fn global_avg_pool(x: &[f32], plane: usize, out: &mut [f32]) {
    out.par_iter_mut().zip(x.par_chunks(plane)).for_each(|(o, p)| {
        *o = (p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32;
    });
}

/// dx[plane i] += dout[i] / plane.
pub fn global_avg_pool_backward(dout: &[f32], plane: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(plane).zip(dout.par_iter()).for_each(|(p, &d)| {
        let g = d / plane as f32;
        p.iter_mut().for_each(|v| *v += g);
    });
}

/// The unclipped estimate `(x_t - sqrt(1 - abar) eps) / sqrt(abar)`, in this order of operations.
pub fn x0_unclipped(x_t: f32, eps: f32, k: &StepCoefficients) -> f32 {
    (x_t - k.sqrt_one_minus_abar * eps) / k.sqrt_abar
}

pub fn predict_x0_and_mean(x_t: &[f32], eps: &[f32], k: StepCoefficients, x0_hat: &mut [f32], mu: &mut [f32]) {
    x0_hat
        .par_chunks_mut(PAR_CHUNK)
        .zip(mu.par_chunks_mut(PAR_CHUNK))
        .zip(x_t.par_chunks(PAR_CHUNK).zip(eps.par_chunks(PAR_CHUNK)))
        .for_each(|((x0_c, mu_c), (xt_c, eps_c))| {
            for (((x0, m), &xt), &e) in x0_c.iter_mut().zip(mu_c).zip(xt_c).zip(eps_c) {
                *x0 = x0_unclipped(xt, e, &k).clamp(-1.0, 1.0);
                *m = k.c0 * *x0 + k.ct * xt;
            }
        });
}

/// u = 0 where the unclipped x0 lies outside [-1, 1] (the clip passes the gradient on the boundary,
/// as PyTorch's clamp does).
pub fn mask_clipped(x_t: &[f32], eps: &[f32], k: StepCoefficients, u: &mut [f32]) {
    u.par_chunks_mut(PAR_CHUNK).zip(x_t.par_chunks(PAR_CHUNK).zip(eps.par_chunks(PAR_CHUNK))).for_each(
        |(u_c, (xt_c, eps_c))| {
            for ((u, &xt), &e) in u_c.iter_mut().zip(xt_c).zip(eps_c) {
                if !(-1.0..=1.0).contains(&x0_unclipped(xt, e, &k)) {
                    *u = 0.0;
                }
            }
        },
    );
}

/// Per sample (rows of `sample_len`): delta *= min(1, kappa ||x_t - mu|| / ||delta||), norms in f64.
pub fn constrain_guidance(delta: &mut [f32], x_t: &[f32], mu: &[f32], sample_len: usize, kappa: f32) {
    if kappa.is_infinite() && kappa > 0.0 {
        return;
    }
    delta.par_chunks_mut(sample_len).zip(x_t.par_chunks(sample_len).zip(mu.par_chunks(sample_len))).for_each(
        |(d, (xt, m))| {
            let delta_norm = d.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            if delta_norm == 0.0 {
                return;
            }
            let step_norm = xt.iter().zip(m).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
            let factor = (kappa as f64 * step_norm / delta_norm).min(1.0) as f32;
            d.iter_mut().for_each(|v| *v *= factor);
        },
    );
}

/// dfeatures = -2 lambda_f (f - f_ref) / F; dlogits = lambda_c (onehot(y) - softmax(logits)).
#[allow(clippy::too_many_arguments)]
pub fn guidance_objective_grad(
    features: &[f32],
    reference: &[f32],
    logits: &[f32],
    labels: &[f32],
    lambda_f: f32,
    lambda_c: f32,
    dfeatures: &mut [f32],
    dlogits: &mut [f32],
) {
    let feature_len = features.len() / labels.len();
    let scale = -2.0 * lambda_f / feature_len as f32;
    for ((d, &f), &r) in dfeatures.iter_mut().zip(features).zip(reference) {
        *d = scale * (f - r);
    }
    let classes = logits.len() / labels.len();
    for ((d, z), &label) in dlogits.chunks_mut(classes).zip(logits.chunks(classes)).zip(labels) {
        let y = class_index(label, classes);
        softmax(z, d);
        for (j, p) in d.iter_mut().enumerate() {
            *p = lambda_c * (if j == y { 1.0 } else { 0.0 } - *p);
        }
    }
}

/// dlogits = softmax(logits) - onehot(y), per row.
pub fn cross_entropy_grad(logits: &[f32], labels: &[f32], dlogits: &mut [f32]) {
    let classes = logits.len() / labels.len();
    for ((d, z), &label) in dlogits.chunks_mut(classes).zip(logits.chunks(classes)).zip(labels) {
        let y = class_index(label, classes);
        softmax(z, d);
        d[y] -= 1.0;
    }
}
