//! A labelled contact sheet of images a person can read: one cell per image, its versions side
//! by side (input | purified, or clean | adversarial | purified), and caption lines under them
//! (the class, what the classifier said before and after); cells wrap into rows, and a title
//! line says what the columns are.
use std::path::Path;

use super::font::{draw_text, text_width, GLYPH_HEIGHT};
use super::image::{quantize, write_rgb_png, MAX_GRID_SCALE, MAX_PIXELS};
use super::ImageBatch;
use crate::error::{Error, Result};

/// Dark grey behind everything: images and coloured captions stand out on it.
pub const SHEET_BACKGROUND: u8 = 40;
/// Caption colours: plain text, a right answer, a wrong one.
pub const TEXT: [u8; 3] = [225, 225, 225];
pub const RIGHT: [u8; 3] = [110, 215, 110];
pub const WRONG: [u8; 3] = [245, 105, 95];
/// Pixels between the images of a cell, between cells, and around the sheet.
const INNER_GAP: usize = 4;
const CELL_GAP: usize = 16;
const MARGIN: usize = 12;

/// One caption line.
#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    pub text: String,
    pub colour: [u8; 3],
}

impl Caption {
    pub fn new(text: impl Into<String>, colour: [u8; 3]) -> Self {
        Caption { text: text.into(), colour }
    }
}

/// Writes the sheet: `columns` are versions of the same images (same count and size), drawn
/// side by side in each cell, nearest-neighbour upscaled by `scale` (more, up to 8, when the
/// captions need the room); `captions[i]` are the lines under cell i; `cells_per_row` cells to
/// a row. Text is as large as the cells allow (1 to 3 pixels per font pixel); a line still too
/// long for its cell is cut with "..".
pub fn write_labelled_sheet(
    path: &Path,
    title: &str,
    columns: &[&ImageBatch],
    captions: &[Vec<Caption>],
    cells_per_row: usize,
    scale: usize,
) -> Result<()> {
    let fail = |msg: String| Error::invalid(format!("sheet {}: {msg}", path.display()));
    let Some(first) = columns.first() else { return Err(fail("no image columns".into())) };
    let (count, height, width) = (first.count, first.height, first.width);
    if count == 0 || cells_per_row == 0 || scale == 0 || scale > MAX_GRID_SCALE {
        return Err(fail(format!(
            "{count} images, {cells_per_row} cells per row, scale {scale} (1..={MAX_GRID_SCALE})"
        )));
    }
    if let Some(bad) = columns.iter().find(|c| (c.count, c.height, c.width) != (count, height, width)) {
        return Err(fail(format!(
            "cannot show {} images of {}x{} beside {count} images of {height}x{width}",
            bad.count, bad.height, bad.width
        )));
    }
    if captions.len() != count {
        return Err(fail(format!("{} captions for {count} images", captions.len())));
    }
    let quantized = columns
        .iter()
        .enumerate()
        .map(|(k, c)| quantize(&c.pixels, || format!("sheet {} column {k}", path.display())))
        .collect::<Result<Vec<_>>>()?;

    let ncols = columns.len();
    // Images upscaled (up to 8x) until the longest caption fits at twice the font's size.
    let longest = captions.iter().flatten().map(|c| c.text.chars().count()).max().unwrap_or(0).max(1);
    let needed = text_width(&"m".repeat(longest), 2);
    let scale =
        (scale..=scale.max(8)).find(|&s| ncols * width * s + (ncols - 1) * INNER_GAP >= needed).unwrap_or(scale.max(8));
    let cell_width = ncols * width * scale + (ncols - 1) * INNER_GAP;
    let text_scale = (1..=3).rev().find(|&s| text_width(&"m".repeat(longest), s) <= cell_width).unwrap_or(1);
    let line_height = (GLYPH_HEIGHT + 3) * text_scale;
    let lines = captions.iter().map(Vec::len).max().unwrap_or(0);
    let cell_height = height * scale + if lines > 0 { 4 + lines * line_height } else { 0 };
    let across = cells_per_row.min(count);
    let down = count.div_ceil(across);
    let title_height = line_height + 6;
    let sheet_width = 2 * MARGIN + across * cell_width + (across - 1) * CELL_GAP;
    let sheet_height = 2 * MARGIN + title_height + down * cell_height + (down - 1) * CELL_GAP;
    if sheet_width.saturating_mul(sheet_height) > MAX_PIXELS {
        return Err(fail(format!("{sheet_width}x{sheet_height} is too large; use fewer images")));
    }

    let mut rgb = vec![SHEET_BACKGROUND; 3 * sheet_width * sheet_height];
    let fit = |text: &str, room: usize| fit_text(text, room, text_scale);
    draw_text(&mut rgb, sheet_width, MARGIN, MARGIN, &fit(title, sheet_width - 2 * MARGIN), text_scale, TEXT);
    let plane = height * width;
    for i in 0..count {
        let left = MARGIN + (i % across) * (cell_width + CELL_GAP);
        let top = MARGIN + title_height + (i / across) * (cell_height + CELL_GAP);
        for (k, column) in quantized.iter().enumerate() {
            let image = &column[i * 3 * plane..(i + 1) * 3 * plane];
            let x0 = left + k * (width * scale + INNER_GAP);
            for gy in 0..height * scale {
                let row = &mut rgb[3 * ((top + gy) * sheet_width + x0)..][..3 * width * scale];
                for (gx, px) in row.chunks_exact_mut(3).enumerate() {
                    let (y, x) = (gy / scale, gx / scale);
                    for c in 0..3 {
                        px[c] = image[c * plane + y * width + x];
                    }
                }
            }
        }
        for (line, caption) in captions[i].iter().enumerate() {
            let y = top + height * scale + 4 + line * line_height;
            draw_text(&mut rgb, sheet_width, left, y, &fit(&caption.text, cell_width), text_scale, caption.colour);
        }
    }
    write_rgb_png(path, &rgb, sheet_height, sheet_width)
}

/// `text`, cut to fit `room` pixels at `scale` (ending in ".." when cut).
fn fit_text(text: &str, room: usize, scale: usize) -> String {
    if text_width(text, scale) <= room {
        return text.to_string();
    }
    let mut cut: String = text.chars().collect();
    while !cut.is_empty() && text_width(&format!("{cut}.."), scale) > room {
        cut.pop();
    }
    format!("{cut}..")
}
