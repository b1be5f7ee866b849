//! Single-head softmax attention over the H*W positions of NCHW tensors, and its gradient.
//!
//! q, k and v are the channel thirds of one N x 3C x H x W tensor `qkv` (the one 1x1 convolution
//! that projects all three), so each is a C x L block of its sample's 3C x L. Per sample, with
//! L = H*W positions and C channels: `s_ij = (q_i . k_j) / sqrt(C)`,
//! `lse_i = log sum_j exp(s_ij)`, `p_ij = exp(s_ij - lse_i)`, `out[c][i] = sum_j p_ij v[c][j]`.
//! The L x L probabilities are built in a scratch matrix one sample at a time (row-parallel), then
//! contracted with the channel rows of v (channel-parallel), which are contiguous in NCHW.
use rayon::prelude::*;

use super::elementwise::{axpy, dot};

/// `scores[j] = scale * sum_c q[c][i] k[c][j]` for query i of one sample (q, k: C x L).
fn score_row(q: &[f32], k: &[f32], positions: usize, i: usize, scale: f32, scores: &mut [f32]) {
    scores.fill(0.0);
    for (q_c, k_c) in q.chunks(positions).zip(k.chunks(positions)) {
        axpy(q_c[i], k_c, scores);
    }
    scores.iter_mut().for_each(|s| *s *= scale);
}

/// Sample n's q, k and v (each C x L) in `qkv` (N x 3C x L).
fn thirds(qkv: &[f32], n: usize, cl: usize) -> (&[f32], &[f32], &[f32]) {
    let sample = &qkv[n * 3 * cl..][..3 * cl];
    (&sample[..cl], &sample[cl..2 * cl], &sample[2 * cl..])
}

/// out (N x C x L) and logsumexp (N x L) of attention(q, k, v), q, k, v the thirds of `qkv`.
pub fn forward(channels: usize, positions: usize, qkv: &[f32], out: &mut [f32], logsumexp: &mut [f32]) {
    let (c, l) = (channels, positions);
    let scale = 1.0 / (c as f32).sqrt();
    let mut probs = vec![0.0f32; l * l];
    for (n, (out_n, lse_n)) in out.chunks_mut(c * l).zip(logsumexp.chunks_mut(l)).enumerate() {
        let (q_n, k_n, v_n) = thirds(qkv, n, c * l);
        probs.par_chunks_mut(l).zip(lse_n.par_iter_mut()).enumerate().for_each(|(i, (p, lse))| {
            score_row(q_n, k_n, l, i, scale, p);
            // log-sum-exp in f64 around the row maximum: exact enough to rebuild p in the backward.
            let max = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let sum: f64 = p.iter().map(|&s| ((s - max) as f64).exp()).sum();
            *lse = (max as f64 + sum.ln()) as f32;
            p.iter_mut().for_each(|s| *s = (*s - *lse).exp());
        });
        out_n.par_chunks_mut(l).zip(v_n.par_chunks(l)).for_each(|(out_c, v_c)| {
            for (i, o) in out_c.iter_mut().enumerate() {
                *o = dot(&probs[i * l..(i + 1) * l], v_c);
            }
        });
    }
}

/// dq, dk, dv (the thirds of `dqkv`, as q, k, v of `qkv`) += the vector-Jacobian product of
/// `forward`: with `dP = dO^T V` and `dS = P * (dP - rowsum(dO * O))`: `dq = scale dS K`,
/// `dk = scale dS^T Q`, `dv = P^T dO`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    channels: usize,
    positions: usize,
    qkv: &[f32],
    out: &[f32],
    logsumexp: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let (c, l) = (channels, positions);
    let scale = 1.0 / (c as f32).sqrt();
    let mut probs = vec![0.0f32; l * l];
    let mut dscores = vec![0.0f32; l * l];
    for n in 0..out.len() / (c * l) {
        let r = n * c * l..(n + 1) * c * l;
        let (q_n, k_n, v_n) = thirds(qkv, n, c * l);
        let (o_n, do_n) = (&out[r.clone()], &dout[r]);
        let lse_n = &logsumexp[n * l..(n + 1) * l];
        // Row-parallel: p_i, and dS_i = p_i * (dP_i - delta_i) with dP_ij = sum_c dO[c][i] v[c][j].
        probs.par_chunks_mut(l).zip(dscores.par_chunks_mut(l)).enumerate().for_each(|(i, (p, ds))| {
            score_row(q_n, k_n, l, i, scale, p);
            p.iter_mut().for_each(|s| *s = (*s - lse_n[i]).exp());
            ds.fill(0.0);
            let mut delta = 0.0f64;
            for ch in 0..c {
                let g = do_n[ch * l + i];
                axpy(g, &v_n[ch * l..(ch + 1) * l], ds);
                delta += (g * o_n[ch * l + i]) as f64;
            }
            let delta = delta as f32;
            for (d, &pj) in ds.iter_mut().zip(p.iter()) {
                *d = pj * (*d - delta);
            }
        });
        // Channel-parallel: each channel row of dq, dk, dv is contiguous.
        let (dq_n, dkv_n) = dqkv[n * 3 * c * l..][..3 * c * l].split_at_mut(c * l);
        let (dk_n, dv_n) = dkv_n.split_at_mut(c * l);
        dq_n.par_chunks_mut(l).zip(dk_n.par_chunks_mut(l)).zip(dv_n.par_chunks_mut(l)).enumerate().for_each(
            |(ch, ((dq_c, dk_c), dv_c))| {
                let (q_c, k_c, do_c) =
                    (&q_n[ch * l..(ch + 1) * l], &k_n[ch * l..(ch + 1) * l], &do_n[ch * l..(ch + 1) * l]);
                let mut acc = vec![0.0f32; l];
                for (i, d) in dq_c.iter_mut().enumerate() {
                    *d += scale * dot(&dscores[i * l..(i + 1) * l], k_c);
                    axpy(q_c[i], &dscores[i * l..(i + 1) * l], &mut acc);
                }
                dk_c.iter_mut().zip(&acc).for_each(|(d, &a)| *d += scale * a);
                acc.fill(0.0);
                for (i, &g) in do_c.iter().enumerate() {
                    axpy(g, &probs[i * l..(i + 1) * l], &mut acc);
                }
                dv_c.iter_mut().zip(&acc).for_each(|(d, &a)| *d += a);
            },
        );
    }
}
