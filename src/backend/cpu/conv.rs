//! 2-D convolution and its input gradient, both as one small "gather GEMM".
//!
//! The input of a sample is first copied into zero-padded *phase planes*: for stride s, plane
//! (py, px) of channel c holds `x_padded[c][py + s*i][px + s*j]`. A tap (ky, kx) of a strided
//! convolution then reads plane (ky % s, kx % s) at a fixed offset `(ky / s) * wq + kx / s`, with
//! stride 1. Output position (oy, ox) is computed at the "wide" index `q = oy * wq + ox`, so every
//! tap is a constant shift of one contiguous range of q: the columns ox >= ow in between are garbage
//! that is computed and dropped (a few percent at 32x32). This turns the convolution, for any
//! stride and asymmetric padding, into
//!
//! `out_wide[co][q] = sum_{ci, tap} w[co][ci][tap] * planes[ci][tap_offset + q]`,
//!
//! a matrix product whose right-hand rows are shifted slices of the planes, computed in register
//! tiles of MR output channels x NR positions (`tile`). The input gradient is its exact adjoint:
//! the same product with the transposed weights, scatter-added back to the planes, whose padding
//! is then dropped when they are gathered into `dx`.
use rayon::prelude::*;

use super::super::Conv2dGeometry;

/// Output channels per register tile.
const MR: usize = 4;
/// Output positions per register tile (two 8-wide AVX vectors per row).
const NR: usize = 16;
/// Rows of the product summed per pass over a position tile (see `forward`).
const K_CHUNK: usize = 256;

/// The sizes of one convolution and where its taps read in the phase planes.
pub struct ConvLayout {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub out_height: usize,
    pub out_width: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    /// Width of a phase plane (the row stride of the wide output grid).
    plane_width: usize,
    /// Length of one phase plane, with room for the last tile's shifted reads.
    plane_len: usize,
    /// stride^2 planes per channel.
    channel_len: usize,
    /// Wide output positions, rounded up to whole tiles.
    wide_positions: usize,
    /// Per tap (ky, kx) in row-major order: where it reads within a channel's planes.
    tap_offsets: Vec<usize>,
}

impl ConvLayout {
    /// Shapes are NCHW input and OIHW weights; panics on inconsistent ones (a programming error).
    pub fn new(x_shape: &[usize], w_shape: &[usize], geometry: Conv2dGeometry) -> Self {
        assert!(x_shape.len() == 4 && w_shape.len() == 4, "conv2d: x {x_shape:?} and w {w_shape:?} must be 4-D");
        let [batch, in_channels, height, width] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        let [out_channels, w_in, kh, kw] = [w_shape[0], w_shape[1], w_shape[2], w_shape[3]];
        assert_eq!(
            w_in, in_channels,
            "conv2d: w {w_shape:?} does not take the {in_channels} channels of x {x_shape:?}"
        );
        let s = geometry.stride;
        assert!(s >= 1, "conv2d: stride must be at least 1");
        let padded_h = height + geometry.pad_top + geometry.pad_bottom;
        let padded_w = width + geometry.pad_left + geometry.pad_right;
        assert!(
            padded_h >= kh && padded_w >= kw,
            "conv2d: kernel {kh}x{kw} larger than padded input {padded_h}x{padded_w}"
        );
        let (out_height, out_width) = geometry.output_size(height, width, kh, kw);
        let plane_height = padded_h.div_ceil(s);
        let plane_width = padded_w.div_ceil(s);
        let wide_positions = (out_height * plane_width).div_ceil(NR) * NR;
        let mut tap_offsets = Vec::with_capacity(kh * kw);
        let mut max_shift = 0;
        for ky in 0..kh {
            for kx in 0..kw {
                let phase = (ky % s) * s + kx % s;
                let shift = (ky / s) * plane_width + kx / s;
                max_shift = max_shift.max(shift);
                tap_offsets.push((phase, shift));
            }
        }
        let plane_len = (plane_height * plane_width).max(wide_positions + max_shift);
        let tap_offsets = tap_offsets.into_iter().map(|(phase, shift)| phase * plane_len + shift).collect();
        Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            out_height,
            out_width,
            stride: s,
            pad_top: geometry.pad_top,
            pad_left: geometry.pad_left,
            plane_width,
            plane_len,
            channel_len: s * s * plane_len,
            wide_positions,
            tap_offsets,
        }
    }

    fn taps(&self) -> usize {
        self.tap_offsets.len()
    }

    /// Calls `visit(iy, ix0, base)` for each input row iy and column phase: input columns
    /// ix0, ix0 + s, ... live at base, base + 1, ... of the channel's planes.
    fn row_segments(&self, mut visit: impl FnMut(usize, usize, usize)) {
        let s = self.stride;
        for iy in 0..self.height {
            let yp = iy + self.pad_top;
            for px in 0..s {
                // First input column whose padded column falls in phase px.
                let ix0 = (px + s - self.pad_left % s) % s;
                if ix0 >= self.width {
                    continue;
                }
                let xp = ix0 + self.pad_left;
                let base = ((yp % s) * s + xp % s) * self.plane_len + (yp / s) * self.plane_width + xp / s;
                visit(iy, ix0, base);
            }
        }
    }

    /// Copies one input channel (H x W) into its (already zeroed) phase planes.
    fn scatter_channel(&self, x: &[f32], planes: &mut [f32]) {
        let (w, s) = (self.width, self.stride);
        self.row_segments(|iy, ix0, base| {
            let row = &x[iy * w..(iy + 1) * w];
            for (dst, &v) in planes[base..].iter_mut().zip(row[ix0..].iter().step_by(s)) {
                *dst = v;
            }
        });
    }

    /// dx (one channel) += the phase planes' entries of the real (unpadded) input positions.
    fn gather_channel_add(&self, planes: &[f32], dx: &mut [f32]) {
        let (w, s) = (self.width, self.stride);
        self.row_segments(|iy, ix0, base| {
            let row = &mut dx[iy * w..(iy + 1) * w];
            for (d, &g) in row[ix0..].iter_mut().step_by(s).zip(&planes[base..]) {
                *d += g;
            }
        });
    }
}

/// Sample n's channel bias of output channel c: `values[n * stride + c]`.
pub struct ChannelBias<'a> {
    pub values: &'a [f32],
    pub stride: usize,
}

/// What `conv2d` adds after the sum over taps, in this order, before the optional ReLU.
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub channel_bias: Option<ChannelBias<'a>>,
    /// Same shape as the output.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// bias[co] + channel_bias[n, co]: what every output of sample n, channel co adds first.
    fn constant(&self, n: usize, co: usize) -> f32 {
        let bias = self.bias.map_or(0.0, |b| b[co]);
        self.channel_bias.as_ref().map_or(bias, |cb| bias + cb.values[n * cb.stride + co])
    }
    /// `v` (the sum over taps plus `constant`) plus residual[at], then ReLU.
    fn finish(&self, v: f32, at: usize) -> f32 {
        let v = self.residual.map_or(v, |res| v + res[at]);
        if self.relu {
            v.max(0.0)
        } else {
            v
        }
    }
}

/// `acc[r][j] += sum_k a[k][r] * b[rows[k] + q0 + j]` on one MR x NR register tile (`acc` is
/// row-major MR x NR). Written with fixed-size arrays so the compiler keeps the tile in registers
/// and vectorises over j; the sum over k is in order, so the result does not depend on the
/// instruction set.
#[inline(always)]
fn tile_kernel(acc: &mut [f32], a: &[f32], b: &[f32], rows: &[usize], q0: usize) {
    let mut regs = [[0.0f32; NR]; MR];
    for (r, reg) in regs.iter_mut().enumerate() {
        reg.copy_from_slice(&acc[r * NR..(r + 1) * NR]);
    }
    for (a_k, &row) in a.chunks_exact(MR).zip(rows) {
        let b_k: &[f32; NR] = b[row + q0..row + q0 + NR].try_into().unwrap();
        for r in 0..MR {
            for j in 0..NR {
                regs[r][j] += a_k[r] * b_k[j];
            }
        }
    }
    for (r, reg) in regs.iter().enumerate() {
        acc[r * NR..(r + 1) * NR].copy_from_slice(reg);
    }
}

/// The same kernel compiled for AVX2 (twice the vector width of baseline x86-64). No FMA: a
/// separate multiply and add round exactly as the portable version does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tile_kernel_avx2(acc: &mut [f32], a: &[f32], b: &[f32], rows: &[usize], q0: usize) {
    tile_kernel(acc, a, b, rows, q0)
}

fn tile(acc: &mut [f32], a: &[f32], b: &[f32], rows: &[usize], q0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { tile_kernel_avx2(acc, a, b, rows, q0) };
    }
    tile_kernel(acc, a, b, rows, q0)
}

/// out = epilogue(conv(x, w)) for x (N x Ci x H x W), w (Co x Ci x kh x kw), out (N x Co x oh x ow).
pub fn forward(layout: &ConvLayout, x: &[f32], w: &[f32], epilogue: &Epilogue<'_>, out: &mut [f32]) {
    let l = layout;
    let taps = l.taps();
    let depth = l.in_channels * taps;
    let channel_blocks = l.out_channels.div_ceil(MR);
    // Weights packed [channel block][ci * taps + tap][MR], zero rows past Co: a tile reads them in order.
    let mut packed = vec![0.0f32; channel_blocks * depth * MR];
    for co in 0..l.out_channels {
        let (block, r) = (co / MR, co % MR);
        for k in 0..depth {
            packed[(block * depth + k) * MR + r] = w[co * depth + k];
        }
    }
    let rows: Vec<usize> = (0..depth).map(|k| (k / taps) * l.channel_len + l.tap_offsets[k % taps]).collect();

    let position_tiles = l.wide_positions / NR;
    let in_plane = l.height * l.width;
    let out_plane = l.out_height * l.out_width;
    // The sum over k runs in chunks of about K_CHUNK rows, so that one position tile's slice of
    // those rows (K_CHUNK x NR floats) stays in L1 while every channel block uses it.
    let k_chunk = (K_CHUNK / taps).max(1) * taps;
    let mut planes = vec![0.0f32; l.in_channels * l.channel_len];
    // Results by [position tile][channel block][MR][NR]: one parallel task per position tile.
    let mut tiles = vec![0.0f32; position_tiles * channel_blocks * MR * NR];
    for n in 0..l.batch {
        let x_n = &x[n * l.in_channels * in_plane..(n + 1) * l.in_channels * in_plane];
        planes.par_chunks_mut(l.channel_len).zip(x_n.par_chunks(in_plane)).for_each(|(p, x_c)| {
            p.fill(0.0);
            l.scatter_channel(x_c, p);
        });
        tiles.par_chunks_mut(channel_blocks * MR * NR).enumerate().for_each(|(q_tile, dst)| {
            dst.fill(0.0);
            for k0 in (0..depth).step_by(k_chunk) {
                let k1 = (k0 + k_chunk).min(depth);
                for (block, acc) in dst.chunks_exact_mut(MR * NR).enumerate() {
                    let a = &packed[(block * depth + k0) * MR..(block * depth + k1) * MR];
                    tile(acc, a, &planes, &rows[k0..k1], q_tile * NR);
                }
            }
        });
        let out_n = &mut out[n * l.out_channels * out_plane..(n + 1) * l.out_channels * out_plane];
        out_n.par_chunks_mut(out_plane).enumerate().for_each(|(co, dst)| {
            let (block, r) = (co / MR, co % MR);
            let constant = epilogue.constant(n, co);
            let first = (n * l.out_channels + co) * out_plane;
            for oy in 0..l.out_height {
                for ox in 0..l.out_width {
                    let q = oy * l.plane_width + ox;
                    let v = tiles[((q / NR * channel_blocks + block) * MR + r) * NR + q % NR] + constant;
                    let i = oy * l.out_width + ox;
                    dst[i] = epilogue.finish(v, first + i);
                }
            }
        });
    }
}

/// dx += the transposed convolution of dout (N x Co x oh x ow) with w: the adjoint of `forward`.
pub fn backward_input(layout: &ConvLayout, dout: &[f32], w: &[f32], dx: &mut [f32]) {
    let l = layout;
    let taps = l.taps();
    let (ci_count, co_count) = (l.in_channels, l.out_channels);
    let channel_blocks = ci_count.div_ceil(MR);
    // Transposed weights packed [ci block][tap][co][MR], zero rows past Ci.
    let mut packed = vec![0.0f32; channel_blocks * taps * co_count * MR];
    for co in 0..co_count {
        for ci in 0..ci_count {
            for t in 0..taps {
                let (block, r) = (ci / MR, ci % MR);
                packed[((block * taps + t) * co_count + co) * MR + r] = w[(co * ci_count + ci) * taps + t];
            }
        }
    }
    let rows: Vec<usize> = (0..co_count).map(|co| co * l.wide_positions).collect();

    let position_tiles = l.wide_positions / NR;
    let in_plane = l.height * l.width;
    let out_plane = l.out_height * l.out_width;
    // dout on the wide grid, zero in the garbage columns so they scatter nothing.
    let mut dout_wide = vec![0.0f32; co_count * l.wide_positions];
    let mut dplanes = vec![0.0f32; channel_blocks * MR * l.channel_len];
    for n in 0..l.batch {
        let dout_n = &dout[n * co_count * out_plane..(n + 1) * co_count * out_plane];
        dout_wide.par_chunks_mut(l.wide_positions).zip(dout_n.par_chunks(out_plane)).for_each(|(wide, d)| {
            for oy in 0..l.out_height {
                let row = &d[oy * l.out_width..(oy + 1) * l.out_width];
                wide[oy * l.plane_width..][..l.out_width].copy_from_slice(row);
            }
        });
        dplanes.par_chunks_mut(MR * l.channel_len).enumerate().for_each(|(block, dst)| {
            dst.fill(0.0);
            // Taps inner: the position tile of dout (Co x NR floats) stays in L1 for all of them.
            let mut acc = [0.0f32; MR * NR];
            for q_tile in 0..position_tiles {
                for t in 0..taps {
                    let a = &packed[(block * taps + t) * co_count * MR..(block * taps + t + 1) * co_count * MR];
                    acc.fill(0.0);
                    tile(&mut acc, a, &dout_wide, &rows, q_tile * NR);
                    for (r, acc_r) in acc.chunks_exact(NR).enumerate() {
                        let base = r * l.channel_len + l.tap_offsets[t] + q_tile * NR;
                        for (d, &g) in dst[base..base + NR].iter_mut().zip(acc_r) {
                            *d += g;
                        }
                    }
                }
            }
        });
        let dx_n = &mut dx[n * ci_count * in_plane..(n + 1) * ci_count * in_plane];
        dx_n.par_chunks_mut(in_plane).zip(dplanes.par_chunks(l.channel_len)).for_each(|(d, p)| {
            l.gather_channel_add(p, d);
        });
    }
}

/// The sub-pixel upsample convolution (`Backend::upsample_conv2d`): out (N x Co x 2H x 2W) =
/// epilogue(the 3x3, padding-1 convolution of x's nearest-x2 upsampling), x (N x Ci x H x W), from
/// w in the sub-pixel form (Co x Ci x 4 x 4, `crate::backend::subpixel_weights`): each output phase
/// (py, px) is the 2x2 convolution of x padded 1 - py rows above and py below (the same in x), its
/// results interleaved into every other row and column.
pub fn subpixel_forward(x_shape: [usize; 4], x: &[f32], w: &[f32], epilogue: &Epilogue<'_>, out: &mut [f32]) {
    let [batch, _, h, wd] = x_shape;
    let out_channels = w.len() / (x_shape[1] * 16);
    let none = Epilogue { bias: None, channel_bias: None, residual: None, relu: false };
    let mut phase_out = vec![0.0f32; batch * out_channels * h * wd];
    for phase in 0..4 {
        let (layout, w_phase) = subpixel_phase(x_shape, w, phase);
        forward(&layout, x, &w_phase, &none, &mut phase_out);
        for_each_phase_pixel(batch * out_channels, h, wd, phase, |at, sub| out[at] = phase_out[sub]);
    }
    let plane = 4 * h * wd;
    out.par_chunks_mut(plane).enumerate().for_each(|(nc, dst)| {
        let constant = epilogue.constant(nc / out_channels, nc % out_channels);
        for (i, v) in dst.iter_mut().enumerate() {
            *v = epilogue.finish(*v + constant, nc * plane + i);
        }
    });
}

/// dx (N x Ci x H x W) += `subpixel_forward`'s transposed convolution of dout (N x Co x 2H x 2W): the
/// sum of each phase's 2x2 input gradient from its quarter of dout.
pub fn subpixel_backward_input(x_shape: [usize; 4], dout: &[f32], w: &[f32], dx: &mut [f32]) {
    let [batch, _, h, wd] = x_shape;
    let out_channels = w.len() / (x_shape[1] * 16);
    let mut phase_dout = vec![0.0f32; batch * out_channels * h * wd];
    for phase in 0..4 {
        let (layout, w_phase) = subpixel_phase(x_shape, w, phase);
        for_each_phase_pixel(batch * out_channels, h, wd, phase, |at, sub| phase_dout[sub] = dout[at]);
        backward_input(&layout, &phase_dout, &w_phase, dx);
    }
}

/// Phase `phase` (2 py + px) of the sub-pixel form: its 2x2 convolution's layout over x and its
/// weights (Co x Ci x 2 x 2).
fn subpixel_phase(x_shape: [usize; 4], w: &[f32], phase: usize) -> (ConvLayout, Vec<f32>) {
    let (py, px) = (phase / 2, phase % 2);
    let geometry = Conv2dGeometry { stride: 1, pad_top: 1 - py, pad_bottom: py, pad_left: 1 - px, pad_right: px };
    let kernels = w.len() / 16;
    let w_phase: Vec<f32> = (0..kernels).flat_map(|k| w[k * 16 + phase * 4..][..4].to_vec()).collect();
    let layout = ConvLayout::new(&x_shape, &[kernels / x_shape[1], x_shape[1], 2, 2], geometry);
    (layout, w_phase)
}

/// Calls `visit(at, sub)` for every pixel of phase `phase` in `planes` planes of 2h x 2w: `at` its
/// index there, `sub` its index in the phase's own planes of h x w.
fn for_each_phase_pixel(planes: usize, h: usize, w: usize, phase: usize, mut visit: impl FnMut(usize, usize)) {
    let (py, px) = (phase / 2, phase % 2);
    for p in 0..planes {
        for i in 0..h {
            for j in 0..w {
                visit((p * 2 * h + 2 * i + py) * 2 * w + 2 * j + px, (p * h + i) * w + j);
            }
        }
    }
}
