//! Counter-based Gaussian noise, shared bit-for-bit with the GPU backends.
//!
//! The spec (every backend implements exactly this, so CPU and GPU draw the same noise):
//! - Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), with
//!   multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57 and Weyl key increments W0 = 0x9E3779B9,
//!   W1 = 0xBB67AE85; checked against Random123's known-answer vectors (tests below).
//! - Element `i` of a tensor filled with `(seed, stream)` uses the block `b = i / 4` and
//!   key = (seed low 32 bits, seed high 32 bits),
//!   counter = (b low 32 bits, b high 32 bits, stream low 32 bits, stream high 32 bits).
//! - The four outputs r0..r3 become uniforms `u_k = (r_k + 0.5) / 2^32`, strictly inside (0, 1), so
//!   the logarithm below is always finite.
//! - Box-Muller on (u0, u1) gives `n0 = sqrt(-2 ln u0) cos(2 pi u1)`, `n1 = sqrt(-2 ln u0) sin(2 pi u1)`;
//!   on (u2, u3) it gives n2, n3. Element i takes `n_{i % 4}`.
//! - All of it in f64, rounded to f32 once at the end: the rounding hides the last-ulp differences
//!   between the f64 libm of the host and the GPU's.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The high and low 32 bits of the 64-bit product `a * b`.
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let product = a as u64 * b as u64;
    ((product >> 32) as u32, product as u32)
}

/// Philox4x32 with 10 rounds: the key is bumped between rounds (9 bumps), as in Random123.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four standard normals of Philox block `block` for `(seed, stream)` (see the module comment).
pub fn gaussian_block(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    let r = block_bits(seed, stream, block);
    let uniform = |x: u32| (x as f64 + 0.5) / 4_294_967_296.0;
    let (a0, b0) = box_muller(uniform(r[0]), uniform(r[1]));
    let (a1, b1) = box_muller(uniform(r[2]), uniform(r[3]));
    [a0 as f32, b0 as f32, a1 as f32, b1 as f32]
}

/// Four uniforms in (0, 1) from Philox block `block` of `(seed, stream)`: host-side randomness
/// (an attack's random start) drawn from the same generator as the noise.
pub fn uniform_block(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    block_bits(seed, stream, block).map(|x| ((x >> 8) as f32 + 0.5) / 16_777_216.0)
}

/// Philox's 128 random bits for block `block` of `(seed, stream)`: key = seed, counter = (block, stream).
fn block_bits(seed: u64, stream: u64, block: u64) -> [u32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32];
    philox4x32_10(counter, key)
}

fn box_muller(u0: f64, u1: f64) -> (f64, f64) {
    let radius = (-2.0 * u0.ln()).sqrt();
    let angle = 2.0 * std::f64::consts::PI * u1;
    (radius * angle.cos(), radius * angle.sin())
}

/// Fills `out` so that `out[i]` is normal number `i % 4` of block `i / 4`.
pub fn fill_gaussian(out: &mut [f32], seed: u64, stream: u64) {
    use rayon::prelude::*;
    // Chunks of whole blocks (a multiple of 4), so each chunk knows its first block.
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(chunk_index, chunk)| {
        let first_block = (chunk_index * CHUNK / 4) as u64;
        for (j, quad) in chunk.chunks_mut(4).enumerate() {
            let normals = gaussian_block(seed, stream, first_block + j as u64);
            quad.copy_from_slice(&normals[..quad.len()]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `tests/kat_vectors`, the three `philox4x32 10` lines (counter[4], key[2], result[4]).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn fill_matches_blocks_at_chunk_edges() {
        let mut out = vec![0.0; 4096 * 2 + 6];
        fill_gaussian(&mut out, 42, 7);
        for i in [0, 1, 3, 4, 4095, 4096, 4099, 8192, 8197] {
            assert_eq!(out[i], gaussian_block(42, 7, (i / 4) as u64)[i % 4], "element {i}");
        }
    }
}
