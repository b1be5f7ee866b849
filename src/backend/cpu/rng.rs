//! Counter-based random numbers, keyed per image: the one definition every backend reproduces
//! bit for bit (the CUDA noise kernel included), so that an image's noise depends only on the
//! seed, the image's index in the whole input and what the draw is for, never on the batch it
//! was computed in, the thread count or the backend.
//!
//! The spec:
//! - Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), with
//!   multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57 and Weyl key increments W0 = 0x9E3779B9,
//!   W1 = 0xBB67AE85; checked against Random123's known-answer vectors (tests below).
//! - A draw is named by `(seed, stream, image, block)`: `seed` is the user's seed (or a salted
//!   one), `stream` says what the draw is for (a purification's q-sample or reverse step, an
//!   attack's random start: the callers' layouts are in src/purify.rs and src/attack.rs), `image`
//!   is the image's 0-based index in the whole input of the run, and `block` counts groups of
//!   four numbers within the image. Philox's input is
//!   key = (seed low 32 bits, seed high 32 bits),
//!   counter = (block, image, stream low 32 bits, stream high 32 bits),
//!   so `block` and `image` are 32-bit (an image has far fewer than 2^34 elements).
//! - Element `e` of an image (0-based, row-major within the image: `e = (c * H + y) * W + x` for
//!   NCHW) takes output `e % 4` of block `e / 4`; in a batch tensor (N x ...), element `j` of
//!   sample `n` is element `e = j - n * (numel / N)` of the image whose index sample n carries.
//! - Gaussians: the four outputs r0..r3 become uniforms `u_k = (r_k + 0.5) / 2^32`, strictly
//!   inside (0, 1), so the logarithm below is always finite. Box-Muller on (u0, u1) gives
//!   `n0 = sqrt(-2 ln u0) cos(2 pi u1)`, `n1 = sqrt(-2 ln u0) sin(2 pi u1)`; on (u2, u3) it gives
//!   n2, n3. All of it in f64, rounded to f32 once at the end: the rounding hides the last-ulp
//!   differences between the f64 libm of the host and the GPU's (kernels/common.cuh has its own
//!   `sincos_f64`), but for rare last-bit cases. So the noise
//!   agrees across backends, and results agree bit for bit on one backend, to the precision's
//!   tolerance across backends.
//! - The CUDA kernel (kernels/diffusion.cu, `fill_gaussian`) implements exactly this, reading the
//!   image indices from an f32 device tensor; tests/noise_kernel.rs checks it on the emulator.
//! - Uniforms (host-side draws such as an attack's random start): `((r_k >> 8) + 0.5) / 2^24`.

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

/// The four standard normals of block `block` of image `image`, for `(seed, stream)` (see the
/// module comment).
pub fn gaussian_block(seed: u64, stream: u64, image: u32, block: u32) -> [f32; 4] {
    let r = block_bits(seed, stream, image, block);
    let uniform = |x: u32| (x as f64 + 0.5) / 4_294_967_296.0;
    let (a0, b0) = box_muller(uniform(r[0]), uniform(r[1]));
    let (a1, b1) = box_muller(uniform(r[2]), uniform(r[3]));
    [a0 as f32, b0 as f32, a1 as f32, b1 as f32]
}

/// Four uniforms in (0, 1) from block `block` of image `image`, for `(seed, stream)`: host-side
/// randomness (an attack's random start) drawn from the same generator as the noise.
pub fn uniform_block(seed: u64, stream: u64, image: u32, block: u32) -> [f32; 4] {
    block_bits(seed, stream, image, block).map(|x| ((x >> 8) as f32 + 0.5) / 16_777_216.0)
}

/// Philox's 128 random bits: key = seed, counter = (block, image, stream).
fn block_bits(seed: u64, stream: u64, image: u32, block: u32) -> [u32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [block, image, stream as u32, (stream >> 32) as u32];
    philox4x32_10(counter, key)
}

fn box_muller(u0: f64, u1: f64) -> (f64, f64) {
    let radius = (-2.0 * u0.ln()).sqrt();
    let angle = 2.0 * std::f64::consts::PI * u1;
    (radius * angle.cos(), radius * angle.sin())
}

/// The `len` standard normals of image `image` for `(seed, stream)`, written into `out`
/// (`out[e]` is normal `e % 4` of block `e / 4`).
pub fn fill_gaussian_image(out: &mut [f32], seed: u64, stream: u64, image: u32) {
    for (block, quad) in out.chunks_mut(4).enumerate() {
        let normals = gaussian_block(seed, stream, image, block as u32);
        quad.copy_from_slice(&normals[..quad.len()]);
    }
}

/// Fills a batch: `out` holds `images.len()` equal parts, part `n` gets the noise of image
/// `images[n]`. Threads split the work by image, which changes no value.
pub fn fill_gaussian(out: &mut [f32], images: &[u32], seed: u64, stream: u64) {
    use rayon::prelude::*;
    assert!(
        !images.is_empty() && out.len().is_multiple_of(images.len()),
        "fill_gaussian: {} values do not split into {} images",
        out.len(),
        images.len()
    );
    let per_image = out.len() / images.len();
    out.par_chunks_mut(per_image)
        .zip(images.par_iter())
        .for_each(|(part, &image)| fill_gaussian_image(part, seed, stream, image));
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

    /// The documented key/counter mapping, spelled out once more from Philox itself.
    #[test]
    fn blocks_use_the_documented_key_and_counter() {
        let (seed, stream, image, block) = (0x0123_4567_89AB_CDEF_u64, 0xFEDC_BA98_7654_3210_u64, 17, 5);
        let r = philox4x32_10([5, 17, 0x7654_3210, 0xFEDC_BA98], [0x89AB_CDEF, 0x0123_4567]);
        let u = |x: u32| (x as f64 + 0.5) / 4_294_967_296.0;
        let (n0, n1) = box_muller(u(r[0]), u(r[1]));
        let (n2, n3) = box_muller(u(r[2]), u(r[3]));
        assert_eq!(gaussian_block(seed, stream, image, block), [n0 as f32, n1 as f32, n2 as f32, n3 as f32]);
        let uniforms = r.map(|x| ((x >> 8) as f32 + 0.5) / 16_777_216.0);
        assert_eq!(uniform_block(seed, stream, image, block), uniforms);
    }

    #[test]
    fn fill_matches_blocks_per_image() {
        let per_image = 3 * 5 * 7; // not a multiple of 4: the last block of an image is cut short
        let images = [4, 0, 9];
        let mut out = vec![0.0; per_image * images.len()];
        fill_gaussian(&mut out, &images, 42, 7);
        for (n, &image) in images.iter().enumerate() {
            for e in [0, 1, 3, 4, per_image - 1] {
                let expected = gaussian_block(42, 7, image, (e / 4) as u32)[e % 4];
                assert_eq!(out[n * per_image + e], expected, "image {image}, element {e}");
            }
        }
    }

    /// An image's noise is the same whether it is first in a batch, third in another, or alone.
    #[test]
    fn image_noise_does_not_depend_on_its_place_in_the_batch() {
        let per_image = 3 * 32 * 32;
        let mut first = vec![0.0; per_image * 2];
        fill_gaussian(&mut first, &[5, 6], 1, 3);
        let mut third = vec![0.0; per_image * 4];
        fill_gaussian(&mut third, &[2, 3, 5, 9], 1, 3);
        let mut alone = vec![0.0; per_image];
        fill_gaussian(&mut alone, &[5], 1, 3);
        assert_eq!(first[..per_image], third[2 * per_image..3 * per_image]);
        assert_eq!(first[..per_image], alone[..]);
        // Another image, stream or seed is other noise.
        assert_ne!(first[..per_image], first[per_image..]);
        fill_gaussian(&mut alone, &[5], 1, 4);
        assert_ne!(first[..per_image], alone[..]);
        fill_gaussian(&mut alone, &[5], 2, 3);
        assert_ne!(first[..per_image], alone[..]);
    }
}
