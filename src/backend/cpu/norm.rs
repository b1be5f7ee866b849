//! GroupNorm, optionally fused with SiLU, and its input gradient.
use rayon::prelude::*;

use super::elementwise::{silu, silu_grad};

/// Sizes of a GroupNorm over x (N x C x spatial...), as the ops see it.
#[derive(Clone, Copy)]
pub struct GroupNormShape {
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
}

impl GroupNormShape {
    fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn group_len(&self) -> usize {
        self.channels_per_group() * self.spatial
    }
}

/// Normalises each (sample, group) block; `stats` gets (mean, 1/std) per block. The statistics
/// are accumulated in f64 (the biased variance, two passes), so a 1e-6 eps on a large group is not
/// lost to rounding; the backward reuses the stored f32 values to rebuild exactly the same y.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    shape: GroupNormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    fuse_silu: bool,
    out: &mut [f32],
    stats: &mut [f32],
) {
    let (cpg, spatial, groups) = (shape.channels_per_group(), shape.spatial, shape.groups);
    let len = shape.group_len();
    out.par_chunks_mut(len).zip(x.par_chunks(len)).zip(stats.par_chunks_mut(2)).enumerate().for_each(
        |(block, ((out_g, x_g), stats_g))| {
            let mean = x_g.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = x_g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            let (mean, rstd) = (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
            stats_g.copy_from_slice(&[mean, rstd]);
            let first_channel = (block % groups) * cpg;
            for (cl, (out_c, x_c)) in out_g.chunks_mut(spatial).zip(x_g.chunks(spatial)).enumerate() {
                let (g, b) = (gamma[first_channel + cl], beta[first_channel + cl]);
                for (o, &v) in out_c.iter_mut().zip(x_c) {
                    let y = (v - mean) * rstd * g + b;
                    *o = if fuse_silu { silu(y) } else { y };
                }
            }
        },
    );
}

/// dx += the vector-Jacobian product of `forward`:
/// `dx = rstd (g - mean(g) - xhat mean(g xhat))` with `g = dy * gamma` per group, dy the gradient at
/// the normalised-and-affine value y (through SiLU's derivative when fused).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: GroupNormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    fuse_silu: bool,
    dout: &[f32],
    dx: &mut [f32],
) {
    let (cpg, spatial, groups) = (shape.channels_per_group(), shape.spatial, shape.groups);
    let len = shape.group_len();
    dx.par_chunks_mut(len).zip(x.par_chunks(len)).zip(dout.par_chunks(len)).enumerate().for_each(
        |(block, ((dx_g, x_g), dout_g))| {
            let (mean, rstd) = (stats[2 * block], stats[2 * block + 1]);
            let first_channel = (block % groups) * cpg;
            // (xhat, gradient at xhat) of element i of channel cl of the group, recomputed from x.
            let at = |cl: usize, i: usize| {
                let c = first_channel + cl;
                let xhat = (x_g[cl * spatial + i] - mean) * rstd;
                let mut dy = dout_g[cl * spatial + i];
                if fuse_silu {
                    dy *= silu_grad(xhat * gamma[c] + beta[c]);
                }
                (xhat, dy * gamma[c])
            };
            let (mut sum_g, mut sum_g_xhat) = (0.0f64, 0.0f64);
            for cl in 0..cpg {
                for i in 0..spatial {
                    let (xhat, g) = at(cl, i);
                    sum_g += g as f64;
                    sum_g_xhat += (g * xhat) as f64;
                }
            }
            let (mean_g, mean_g_xhat) = ((sum_g / len as f64) as f32, (sum_g_xhat / len as f64) as f32);
            for cl in 0..cpg {
                for i in 0..spatial {
                    let (xhat, g) = at(cl, i);
                    dx_g[cl * spatial + i] += rstd * (g - mean_g - xhat * mean_g_xhat);
                }
            }
        },
    );
}
