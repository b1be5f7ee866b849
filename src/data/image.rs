//! PNG files in and out, and comparison grids a person can look at.
//!
//! Reading accepts what holds 8-bit RGB exactly:
//! - 8-bit RGB;
//! - 8-bit RGBA, only if every pixel is opaque (alpha 255): the alpha is then dropped;
//! - palette images (any bit depth), expanded to their 8-bit RGB colours by the `png` crate, since
//!   that is lossless; a palette with transparent entries (tRNS) is accepted only if no pixel uses
//!   one;
//! - a tRNS chunk on an RGB image (one colour marked transparent) is ignored.
//!
//! Grayscale (with or without alpha) and 16-bit images are rejected with "expected 8-bit RGB,
//! found ...": converting them would change the data a caller thinks it is feeding the model.
//!
//! Writing quantises [0, 1] floats to 8 bits as round(255 p) after clamping to [0, 1], so an image
//! read back from a PNG and written again is bit-exact; NaN or Inf is an error, not a silent 0.

use std::io::{Cursor, Write};
use std::path::Path;

use png::{BitDepth, ColorType, Transformations};

use super::{write_atomically, ImageBatch};
use crate::error::{check_finite, Error, Result};

/// Nearest-neighbour upscaling of grids by default: 32x32 images become 128x128.
pub const DEFAULT_GRID_SCALE: usize = 4;
/// Cells per grid row by default.
pub const DEFAULT_CELLS_PER_ROW: usize = 8;
/// Neutral grey of the gaps in a grid.
pub const GRID_BACKGROUND: u8 = 128;
/// Output pixels between the images of one cell.
pub const GRID_INNER_GAP: usize = 2;
/// Output pixels between cells, and around the grid.
pub const GRID_CELL_GAP: usize = 8;
/// Largest scale a grid may use.
pub const MAX_GRID_SCALE: usize = 64;
/// Largest image (in pixels) read or written, so that a corrupt header cannot ask for gigabytes.
pub const MAX_PIXELS: usize = 1 << 26;

/// One RGB image in [0, 1], planar (3 x H x W).
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

/// Reads a PNG file of any size as 8-bit RGB (see the module documentation for what is accepted).
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_png(&bytes, &path.display().to_string(), None)
}

/// Reads a PNG file that must be `height` x `width` (checked from the header, before decoding).
pub fn read_png_sized(path: &Path, height: usize, width: usize) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_png(&bytes, &path.display().to_string(), Some((height, width)))
}

/// Decodes PNG bytes; `what` names the source in errors.
pub fn decode_png(bytes: &[u8], what: &str, expected: Option<(usize, usize)>) -> Result<RgbImage> {
    let bad = |reason: String| Error::BadImage { what: what.to_string(), reason };
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    let info = decoder.read_header_info().map_err(|e| bad(format!("not a readable PNG file: {e}")))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let (color_type, bit_depth) = (info.color_type, info.bit_depth);
    match (color_type, bit_depth) {
        (ColorType::Rgb | ColorType::Rgba, BitDepth::Eight) => {}
        (ColorType::Indexed, _) => {
            // png 0.18.1 panics expanding a palette that is not whole RGB entries (found by
            // fuzz/png; image-rs/image-png#694): refuse it first.
            if let Some(length) = palette_length(bytes).filter(|l| l % 3 != 0) {
                return Err(bad(format!(
                    "corrupt PNG data: a palette (PLTE) of {length} bytes is not whole RGB entries"
                )));
            }
            decoder.set_transformations(Transformations::EXPAND)
        }
        _ => {
            return Err(bad(format!(
                "expected 8-bit RGB, found {} (convert it to 8-bit RGB first)",
                describe(color_type, bit_depth)
            )))
        }
    }
    if let Some((h, w)) = expected {
        if (height, width) != (h, w) {
            return Err(bad(format!(
                "image is {width}x{height} ({}), expected {w}x{h} RGB",
                describe(color_type, bit_depth)
            )));
        }
    }
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(bad(format!("image is {width}x{height}, larger than {MAX_PIXELS} pixels")));
    }
    let mut reader = decoder.read_info().map_err(|e| bad(format!("not a readable PNG file: {e}")))?;
    let size = reader.output_buffer_size().ok_or_else(|| bad("image too large".to_string()))?;
    let mut buffer = vec![0u8; size];
    let frame = reader.next_frame(&mut buffer).map_err(|e| bad(format!("corrupt PNG data: {e}")))?;
    let channels = match (frame.color_type, frame.bit_depth) {
        (ColorType::Rgb, BitDepth::Eight) => 3,
        (ColorType::Rgba, BitDepth::Eight) => 4,
        (ct, bd) => return Err(bad(format!("expected 8-bit RGB, decoded {}", describe(ct, bd)))),
    };
    let plane = width * height;
    let mut pixels = vec![0f32; 3 * plane];
    for y in 0..height {
        let row = &buffer[y * frame.line_size..][..width * channels];
        for (x, px) in row.chunks_exact(channels).enumerate() {
            if channels == 4 && px[3] != 255 {
                return Err(bad(format!(
                    "pixel ({x}, {y}) has alpha {}; expected 8-bit RGB, or RGBA with every pixel \
                     opaque (alpha 255)",
                    px[3]
                )));
            }
            for c in 0..3 {
                pixels[c * plane + y * width + x] = f32::from(px[c]) / 255.0;
            }
        }
    }
    Ok(RgbImage { height, width, pixels })
}

/// The data length of the first PLTE chunk of PNG `bytes`, if the chunk walk reaches one.
fn palette_length(bytes: &[u8]) -> Option<usize> {
    let mut at = 8; // the signature
    while let Some(header) = bytes.get(at..at + 8) {
        let length = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
        match &header[4..8] {
            b"PLTE" => return Some(length),
            b"IDAT" | b"IEND" => return None,
            _ => at = at.checked_add(12)?.checked_add(length)?, // length, type, data, CRC
        }
    }
    None
}

fn describe(color_type: ColorType, bit_depth: BitDepth) -> String {
    let colour = match color_type {
        ColorType::Grayscale => "grayscale",
        ColorType::GrayscaleAlpha => "grayscale with alpha",
        ColorType::Rgb => "RGB",
        ColorType::Rgba => "RGBA",
        ColorType::Indexed => "palette",
    };
    format!("{}-bit {colour}", bit_depth as u8)
}

/// Quantises [0, 1] values to bytes: round(255 p) after clamping p to [0, 1]. A NaN or Inf is an
/// error naming `what` and the element.
pub fn quantize(values: &[f32], what: impl FnOnce() -> String) -> Result<Vec<u8>> {
    check_finite(values, what)?;
    Ok(values.iter().map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect())
}

/// Writes a planar 3 x H x W image in [0, 1] as an 8-bit RGB PNG, atomically.
pub fn write_png(path: &Path, pixels: &[f32], height: usize, width: usize) -> Result<()> {
    let plane = height * width;
    if plane == 0 || pixels.len() != 3 * plane {
        return Err(Error::invalid(format!(
            "{} values are not one 3x{height}x{width} image (writing {})",
            pixels.len(),
            path.display()
        )));
    }
    let bytes = quantize(pixels, || format!("image for {}", path.display()))?;
    let mut rgb = vec![0u8; 3 * plane];
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        for c in 0..3 {
            px[c] = bytes[c * plane + i];
        }
    }
    write_rgb_png(path, &rgb, height, width)
}

/// Writes interleaved 8-bit RGB rows as a PNG, atomically.
pub(crate) fn write_rgb_png(path: &Path, rgb: &[u8], height: usize, width: usize) -> Result<()> {
    let too_large = || Error::invalid(format!("image {width}x{height} is too large for {}", path.display()));
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(too_large());
    }
    let w = u32::try_from(width).map_err(|_| too_large())?;
    let h = u32::try_from(height).map_err(|_| too_large())?;
    let mut encoded = Vec::new();
    {
        let encode_error =
            |e: png::EncodingError| Error::invalid(format!("cannot encode PNG for {}: {e}", path.display()));
        let mut encoder = png::Encoder::new(&mut encoded, w, h);
        encoder.set_color(ColorType::Rgb);
        encoder.set_depth(BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer.write_image_data(rgb).map_err(encode_error)?;
        writer.finish().map_err(encode_error)?;
    }
    write_atomically(path, |out| {
        out.write_all(&encoded).map_err(|e| Error::Write { path: path.to_path_buf(), source: e })
    })
}

/// Writes a grid of cells, one per image index; each cell shows the image of every column side by
/// side (for example input | purified, or clean | attacked | purified), nearest-neighbour upscaled
/// by `scale`. Cells are `cells_per_row` to a row, separated by a neutral grey gap.
///
/// Each column is N x 3 x H x W planar in [0, 1], with the same N.
pub fn write_image_grid(
    path: &Path,
    columns: &[&[f32]],
    height: usize,
    width: usize,
    cells_per_row: usize,
    scale: usize,
) -> Result<()> {
    let fail = |msg: String| Error::invalid(format!("grid {}: {msg}", path.display()));
    if columns.is_empty() {
        return Err(fail("no image columns".to_string()));
    }
    if cells_per_row == 0 {
        return Err(fail("cells per row must be at least 1".to_string()));
    }
    if scale == 0 || scale > MAX_GRID_SCALE {
        return Err(fail(format!("scale {scale} is outside 1..={MAX_GRID_SCALE}")));
    }
    let image_len = 3 * height * width;
    if image_len == 0 {
        return Err(fail(format!("image size {height}x{width} is empty")));
    }
    let count = columns[0].len() / image_len;
    for (k, column) in columns.iter().enumerate() {
        if column.len() != count * image_len || column.is_empty() {
            return Err(fail(format!(
                "column {k} has {} values; expected {count} (>= 1) images of 3x{height}x{width}",
                column.len()
            )));
        }
    }
    let quantized = columns
        .iter()
        .enumerate()
        .map(|(k, column)| quantize(column, || format!("grid {} column {k}", path.display())))
        .collect::<Result<Vec<_>>>()?;

    let ncols = columns.len();
    let cells_across = cells_per_row.min(count);
    let cells_down = count.div_ceil(cells_across);
    let cell_width = ncols * width * scale + (ncols - 1) * GRID_INNER_GAP;
    let cell_height = height * scale;
    let grid_width = 2 * GRID_CELL_GAP + cells_across * cell_width + (cells_across - 1) * GRID_CELL_GAP;
    let grid_height = 2 * GRID_CELL_GAP + cells_down * cell_height + (cells_down - 1) * GRID_CELL_GAP;
    if grid_width.saturating_mul(grid_height) > MAX_PIXELS {
        return Err(fail(format!(
            "{grid_width}x{grid_height} is larger than {MAX_PIXELS} pixels; use fewer images or a \
             smaller scale"
        )));
    }

    let mut rgb = vec![GRID_BACKGROUND; 3 * grid_width * grid_height];
    let plane = height * width;
    for i in 0..count {
        let cell_x = GRID_CELL_GAP + (i % cells_across) * (cell_width + GRID_CELL_GAP);
        let cell_y = GRID_CELL_GAP + (i / cells_across) * (cell_height + GRID_CELL_GAP);
        for (k, column) in quantized.iter().enumerate() {
            let image = &column[i * image_len..(i + 1) * image_len];
            let left = cell_x + k * (width * scale + GRID_INNER_GAP);
            for gy in 0..cell_height {
                let y = gy / scale;
                let row = &mut rgb[3 * ((cell_y + gy) * grid_width + left)..][..3 * width * scale];
                for (gx, px) in row.chunks_exact_mut(3).enumerate() {
                    let x = gx / scale;
                    for c in 0..3 {
                        px[c] = image[c * plane + y * width + x];
                    }
                }
            }
        }
    }
    write_rgb_png(path, &rgb, grid_height, grid_width)
}

/// Writes a comparison grid: each cell is `clean` (when given) | `inputs` | `purified` for one image.
/// The batches must hold the same number of images of the same size.
pub fn write_comparison_grid(
    path: &Path,
    inputs: &ImageBatch,
    purified: &ImageBatch,
    clean: Option<&ImageBatch>,
    cells_per_row: usize,
    scale: usize,
) -> Result<()> {
    let mut batches: Vec<&ImageBatch> = clean.into_iter().collect();
    batches.push(inputs);
    batches.push(purified);
    for batch in &batches {
        if (batch.count, batch.height, batch.width) != (inputs.count, inputs.height, inputs.width) {
            return Err(Error::invalid(format!(
                "grid {}: cannot compare {} images of {}x{} with {} images of {}x{}",
                path.display(),
                batch.count,
                batch.height,
                batch.width,
                inputs.count,
                inputs.height,
                inputs.width
            )));
        }
    }
    let columns: Vec<&[f32]> = batches.iter().map(|b| b.pixels.as_slice()).collect();
    write_image_grid(path, &columns, inputs.height, inputs.width, cells_per_row, scale)
}
