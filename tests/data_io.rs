//! Data I/O: round trips of CIFAR-10 records, PNG files, grids and safetensors files, the real
//! CIFAR-10 test file, and a clear error for every kind of bad input.

use std::path::{Path, PathBuf};

use purifier::data::cifar::{self, CLASS_NAMES, RECORD_BYTES};
use purifier::data::image::{self, read_png, write_comparison_grid, write_image_grid, write_png};
use purifier::data::tensor_file::{write_safetensors, write_safetensors_f16, Dtype, TensorFile};
use purifier::data::{load_images, ImageBatch};
use purifier::Error;

const TEST_LOSSLESS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/cifar10/test_lossless.bin");

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("data_io").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Files in `dir`, sorted, so tests can check that nothing (no temporary file) was left behind.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no extra crate.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Values in [0, 1] that are exact at 8 bits.
fn pixels_8bit(n: usize, seed: u64) -> Vec<f32> {
    bytes(n, seed).into_iter().map(|b| f32::from(b) / 255.0).collect()
}

fn batch(count: usize, labels: Option<Vec<u8>>, seed: u64) -> ImageBatch {
    let names = (0..count).map(|i| format!("img_{i}")).collect();
    ImageBatch::new(32, 32, pixels_8bit(count * 3072, seed), labels, names).unwrap()
}

/// Writes a PNG with any colour type and depth, straight through the png crate.
fn write_raw_png(path: &Path, width: u32, height: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(color);
    encoder.set_depth(depth);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(data).unwrap();
    writer.finish().unwrap();
}

fn message(error: Error) -> String {
    error.to_string()
}

// ---------------------------------------------------------------------------------------------
// ImageBatch

#[test]
fn image_batch_helpers() {
    let b = batch(5, Some(vec![0, 1, 2, 3, 4]), 1);
    assert_eq!(b.shape(), [5, 3, 32, 32]);
    assert_eq!(b.image(2), &b.pixels[2 * 3072..3 * 3072]);

    let x = b.to_model_range();
    assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(x[7], 2.0 * b.pixels[7] - 1.0);
    let back = ImageBatch::from_model_range(&x, 32, 32, b.labels.clone(), b.names.clone()).unwrap();
    for (a, c) in back.pixels.iter().zip(&b.pixels) {
        assert!((a - c).abs() < 1e-6);
    }
    // Overshoot is clamped; NaN is an error.
    let over = ImageBatch::from_model_range(&[1.5; 3072], 32, 32, None, vec!["o".into()]).unwrap();
    assert!(over.pixels.iter().all(|&p| p == 1.0));
    let mut nan = vec![0.0; 3072];
    nan[5] = f32::NAN;
    let err = message(ImageBatch::from_model_range(&nan, 32, 32, None, vec!["n".into()]).unwrap_err());
    assert!(err.contains("non-finite") && err.contains("element 5"), "{err}");

    let s = b.select(1..3).unwrap();
    assert_eq!(
        (s.count, s.labels.as_deref(), s.names.clone()),
        (2, Some(&[1u8, 2][..]), vec!["img_1".to_string(), "img_2".into()])
    );
    assert_eq!(s.image(0), b.image(1));
    assert_eq!(b.take(2).count, 2);
    assert_eq!(b.take(99).count, 5);
    let err = message(b.select(3..9).unwrap_err());
    assert!(err.contains("3..9") && err.contains("5 images"), "{err}");

    let err = message(ImageBatch::new(32, 32, vec![0.5; 3072], None, vec![]).unwrap_err());
    assert!(err.contains("0 names for 1 images"), "{err}");
    let err = message(ImageBatch::new(32, 32, vec![0.5; 3000], None, vec![]).unwrap_err());
    assert!(err.contains("3000"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10

#[test]
fn cifar_round_trip() {
    let dir = scratch("cifar_round_trip");
    let path = dir.join("mine.bin");
    let original = batch(12, Some((0..12).map(|i| (i % 10) as u8).collect()), 2);
    cifar::write_cifar(&path, &original).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 12 * RECORD_BYTES as u64);
    let read = cifar::read_cifar(&path, None).unwrap();
    assert_eq!(read.pixels, original.pixels);
    assert_eq!(read.labels, original.labels);
    assert_eq!(read.names[7], "mine_0007");
    assert_eq!(listing(&dir), vec!["mine.bin"]);

    let limited = cifar::read_cifar(&path, Some(5)).unwrap();
    assert_eq!(limited.count, 5);
    assert_eq!(limited.pixels[..], original.pixels[..5 * 3072]);

    // Writing needs labels.
    let err = message(cifar::write_cifar(&dir.join("nolabels.bin"), &batch(2, None, 3)).unwrap_err());
    assert!(err.contains("labels"), "{err}");
}

#[test]
fn reads_the_real_cifar10_test_file() {
    let path = Path::new(TEST_LOSSLESS);
    let all = cifar::read_cifar(path, None).unwrap();
    assert_eq!((all.count, all.height, all.width), (932, 32, 32));
    assert_eq!(all.pixels.len(), 932 * 3072);
    let labels = all.labels.as_ref().unwrap();
    // The official test set starts cat, ship, ship, airplane.
    assert_eq!(&labels[..4], &[3, 8, 8, 0]);
    assert_eq!(CLASS_NAMES[labels[0] as usize], "cat");
    // Every class occurs.
    for class in 0..10u8 {
        assert!(labels.contains(&class), "class {class} missing");
    }
    assert!(all.pixels.iter().all(|p| (0.0..=1.0).contains(p)));
    assert_eq!(all.names[0], "test_lossless_0000");
    assert_eq!(all.names[931], "test_lossless_0931");

    // Through load_images, with a limit.
    let some = load_images(&[path.to_path_buf()], Some(10)).unwrap();
    assert_eq!(some.count, 10);
    assert_eq!(some.pixels[..], all.pixels[..10 * 3072]);
    assert_eq!(some.labels.as_deref(), Some(&labels[..10]));
}

#[test]
fn cifar_bad_inputs() {
    let dir = scratch("cifar_bad_inputs");
    let good = batch(3, Some(vec![1, 2, 3]), 4);
    let path = dir.join("good.bin");
    cifar::write_cifar(&path, &good).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    // One record 3072 bytes short: the last record holds only its label byte.
    let short = dir.join("short.bin");
    std::fs::write(&short, &bytes[..bytes.len() - 3072]).unwrap();
    let err = message(cifar::read_cifar(&short, None).unwrap_err());
    assert!(err.contains("short.bin") && err.contains("3073") && err.contains("6147"), "{err}");

    // A label of 12 in the second record.
    let mut labelled = bytes.clone();
    labelled[RECORD_BYTES] = 12;
    let bad_label = dir.join("label12.bin");
    std::fs::write(&bad_label, &labelled).unwrap();
    let err = message(cifar::read_cifar(&bad_label, None).unwrap_err());
    assert!(err.contains("label12.bin") && err.contains("record 1") && err.contains("label 12"), "{err}");
    let err = message(load_images(&[bad_label], None).unwrap_err());
    assert!(err.contains("label 12"), "{err}");

    // An empty file.
    let empty = dir.join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = message(cifar::read_cifar(&empty, None).unwrap_err());
    assert!(err.contains("empty.bin") && err.contains("empty"), "{err}");

    // A missing file.
    let missing = dir.join("missing.bin");
    let err = cifar::read_cifar(&missing, None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(message(err).contains("missing.bin"));
}

// ---------------------------------------------------------------------------------------------
// PNG

#[test]
fn png_round_trip_is_exact_at_8_bits() {
    let dir = scratch("png_round_trip");
    let path = dir.join("round.png");
    let pixels = pixels_8bit(3 * 20 * 28, 5);
    write_png(&path, &pixels, 20, 28).unwrap();
    let image = read_png(&path).unwrap();
    assert_eq!((image.height, image.width), (20, 28));
    assert_eq!(image.pixels, pixels);
    assert_eq!(listing(&dir), vec!["round.png"]);

    // Off-grid values round to the nearest level; out-of-range values clamp.
    let mut odd = vec![0.5f32; 3 * 4];
    odd[0] = -0.3;
    odd[1] = 1.7;
    odd[2] = 0.2 / 255.0;
    odd[3] = 0.6 / 255.0;
    write_png(&path, &odd, 2, 2).unwrap();
    let image = read_png(&path).unwrap();
    assert_eq!(&image.pixels[..4], &[0.0, 1.0, 0.0, 1.0 / 255.0]);
    assert_eq!(image.pixels[4], 128.0 / 255.0);
}

#[test]
fn png_accepts_opaque_rgba_and_palette() {
    let dir = scratch("png_rgba_palette");
    let rgb = bytes(32 * 32 * 3, 6);
    let expected: Vec<f32> =
        (0..3).flat_map(|c| (0..1024).map(move |i| (c, i))).map(|(c, i)| f32::from(rgb[i * 3 + c]) / 255.0).collect();

    let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
    let opaque = dir.join("opaque.png");
    write_raw_png(&opaque, 32, 32, png::ColorType::Rgba, png::BitDepth::Eight, &rgba);
    assert_eq!(read_png(&opaque).unwrap().pixels, expected);

    let mut see_through = rgba.clone();
    see_through[4 * 37 + 3] = 10;
    let transparent = dir.join("transparent.png");
    write_raw_png(&transparent, 32, 32, png::ColorType::Rgba, png::BitDepth::Eight, &see_through);
    let err = message(read_png(&transparent).unwrap_err());
    assert!(err.contains("transparent.png") && err.contains("alpha 10") && err.contains("(5, 1)"), "{err}");

    // A 4-colour palette image.
    let palette = [255u8, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30];
    let indices: Vec<u8> = (0..32 * 32).map(|i| (i % 4) as u8).collect();
    let path = dir.join("palette.png");
    {
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 32, 32);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(&palette[..]);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&indices).unwrap();
        writer.finish().unwrap();
    }
    let image = read_png(&path).unwrap();
    for i in 0..1024 {
        let k = i % 4;
        for c in 0..3 {
            assert_eq!(image.pixels[c * 1024 + i], f32::from(palette[3 * k + c]) / 255.0);
        }
    }
}

#[test]
fn load_images_from_pngs_and_directories() {
    let dir = scratch("load_pngs");
    let pngs = dir.join("pngs");
    std::fs::create_dir(&pngs).unwrap();
    let b = batch(3, None, 7);
    for (i, name) in ["b", "a", "c"].iter().enumerate() {
        write_png(&pngs.join(format!("{name}.png")), b.image(i), 32, 32).unwrap();
    }
    std::fs::write(pngs.join("notes.txt"), "not an image").unwrap();

    let loaded = load_images(std::slice::from_ref(&pngs), None).unwrap();
    assert_eq!(loaded.names, vec!["a", "b", "c"]);
    assert_eq!(loaded.image(0), b.image(1));
    assert_eq!(loaded.image(1), b.image(0));
    assert_eq!(loaded.labels, None);

    // A single file, the directory again (repeated names get a suffix) and a CIFAR file, limited.
    let cifar_path = dir.join("set.bin");
    cifar::write_cifar(&cifar_path, &batch(4, Some(vec![9, 8, 7, 6]), 8)).unwrap();
    let mixed = load_images(&[pngs.join("c.png"), pngs.clone(), cifar_path.clone()], Some(6)).unwrap();
    assert_eq!(mixed.names, vec!["c", "a", "b", "c_2", "set_0000", "set_0001"]);
    assert_eq!(mixed.labels, None, "labels only when every source has them");
    let cifar_only = load_images(&[cifar_path], None).unwrap();
    assert_eq!(cifar_only.labels, Some(vec![9, 8, 7, 6]));
}

#[test]
fn png_bad_inputs() {
    let dir = scratch("png_bad_inputs");

    let small = dir.join("small.png");
    write_png(&small, &pixels_8bit(3 * 16 * 16, 9), 16, 16).unwrap();
    assert_eq!(read_png(&small).unwrap().width, 16, "any size reads through read_png");
    let err = message(load_images(std::slice::from_ref(&small), None).unwrap_err());
    assert!(err.contains("small.png") && err.contains("16x16") && err.contains("32x32"), "{err}");

    let gray = dir.join("gray.png");
    write_raw_png(&gray, 32, 32, png::ColorType::Grayscale, png::BitDepth::Eight, &bytes(1024, 10));
    let err = message(read_png(&gray).unwrap_err());
    assert!(err.contains("gray.png") && err.contains("expected 8-bit RGB, found 8-bit grayscale"), "{err}");

    let deep = dir.join("deep.png");
    write_raw_png(&deep, 32, 32, png::ColorType::Rgb, png::BitDepth::Sixteen, &bytes(32 * 32 * 6, 11));
    let err = message(load_images(&[deep], None).unwrap_err());
    assert!(err.contains("deep.png") && err.contains("expected 8-bit RGB, found 16-bit RGB"), "{err}");

    let text = dir.join("text.png");
    std::fs::write(&text, "this is not a PNG").unwrap();
    let err = message(read_png(&text).unwrap_err());
    assert!(err.contains("text.png") && err.contains("not a readable PNG"), "{err}");

    let good = dir.join("good.png");
    write_png(&good, &pixels_8bit(3 * 32 * 32, 12), 32, 32).unwrap();
    let truncated = dir.join("truncated.png");
    let full = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let err = message(read_png(&truncated).unwrap_err());
    assert!(err.contains("truncated.png"), "{err}");

    let empty_dir = dir.join("nothing");
    std::fs::create_dir(&empty_dir).unwrap();
    let err = message(load_images(&[empty_dir], None).unwrap_err());
    assert!(err.contains("nothing") && err.contains("no .png files"), "{err}");

    let other = dir.join("weights.npy");
    std::fs::write(&other, b"x").unwrap();
    let err = message(load_images(&[other], None).unwrap_err());
    assert!(err.contains("weights.npy") && err.contains("unknown file type"), "{err}");

    let missing = dir.join("missing.png");
    let err = load_images(&[missing], None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(message(err).contains("missing.png"));
    let err = message(load_images(&[dir.join("missing_dir")], None).unwrap_err());
    assert!(err.contains("missing_dir"), "{err}");
}

#[test]
fn writing_nan_fails_and_leaves_no_file() {
    let dir = scratch("nan_writes");
    let mut pixels = pixels_8bit(3 * 32 * 32, 13);
    pixels[100] = f32::NAN;

    let path = dir.join("nan.png");
    let err = message(write_png(&path, &pixels, 32, 32).unwrap_err());
    assert!(err.contains("nan.png") && err.contains("non-finite") && err.contains("element 100"), "{err}");
    assert!(listing(&dir).is_empty(), "left behind: {:?}", listing(&dir));

    // An existing file survives a failed overwrite untouched.
    let keep = dir.join("keep.png");
    let good = pixels_8bit(3 * 32 * 32, 14);
    write_png(&keep, &good, 32, 32).unwrap();
    let before = std::fs::read(&keep).unwrap();
    assert!(write_png(&keep, &pixels, 32, 32).is_err());
    assert_eq!(std::fs::read(&keep).unwrap(), before);

    // CIFAR records and grids too.
    let mut b = batch(2, Some(vec![0, 1]), 15);
    b.pixels[3000] = f32::INFINITY;
    let err = message(cifar::write_cifar(&dir.join("nan.bin"), &b).unwrap_err());
    assert!(err.contains("nan.bin") && err.contains("non-finite"), "{err}");
    let clean = batch(2, None, 16);
    let err = message(write_image_grid(&dir.join("grid.png"), &[&clean.pixels, &b.pixels], 32, 32, 2, 4).unwrap_err());
    assert!(err.contains("grid.png") && err.contains("column 1"), "{err}");
    assert_eq!(listing(&dir), vec!["keep.png"]);

    // A directory that does not exist: a write error naming the path.
    let err = message(write_png(&dir.join("no_such_dir/out.png"), &good, 32, 32).unwrap_err());
    assert!(err.contains("cannot write") && err.contains("no_such_dir"), "{err}");
}

#[test]
fn comparison_grid_layout() {
    let dir = scratch("grid");
    let inputs = batch(5, None, 17);
    let purified = batch(5, None, 18);
    let clean = batch(5, None, 19);
    let path = dir.join("grid.png");
    let (scale, per_row) = (4, 3);
    write_comparison_grid(&path, &inputs, &purified, None, per_row, scale).unwrap();
    let grid = read_png(&path).unwrap();
    let (gap, inner) = (image::GRID_CELL_GAP, image::GRID_INNER_GAP);
    let cell_w = 2 * 32 * scale + inner;
    let cell_h = 32 * scale;
    assert_eq!(grid.width, 2 * gap + 3 * cell_w + 2 * gap);
    assert_eq!(grid.height, 2 * gap + 2 * cell_h + gap);

    let plane = grid.width * grid.height;
    let at = |c: usize, x: usize, y: usize| grid.pixels[c * plane + y * grid.width + x];
    let grey = f32::from(image::GRID_BACKGROUND) / 255.0;
    assert_eq!(at(0, 0, 0), grey);
    // Image 4 sits in row 1, cell 1; its purified half starts after the input and the inner gap.
    let (cx, cy) = (gap + (cell_w + gap), gap + (cell_h + gap));
    for (x, y) in [(0, 0), (31, 0), (5, 17), (31, 31)] {
        for c in 0..3 {
            let want_in = inputs.image(4)[c * 1024 + y * 32 + x];
            let want_out = purified.image(4)[c * 1024 + y * 32 + x];
            for (dx, dy) in [(0, 0), (scale - 1, scale - 1)] {
                assert_eq!(at(c, cx + x * scale + dx, cy + y * scale + dy), want_in);
                assert_eq!(at(c, cx + 32 * scale + inner + x * scale + dx, cy + y * scale + dy), want_out);
            }
        }
    }
    // The inner gap and the empty last cell are background.
    assert_eq!(at(1, cx + 32 * scale, cy + 10), grey);
    let empty_cell_x = gap + 2 * (cell_w + gap);
    assert_eq!(at(2, empty_cell_x + 50, cy + 50), grey);

    // Three columns: clean | input | purified.
    write_comparison_grid(&path, &inputs, &purified, Some(&clean), 8, 1).unwrap();
    let grid = read_png(&path).unwrap();
    assert_eq!(grid.width, 2 * gap + 5 * (3 * 32 + 2 * inner) + 4 * gap);
    assert_eq!(grid.height, 2 * gap + 32);
    assert_eq!(grid.pixels[gap * grid.width + gap], clean.pixels[0]);

    // Bad layouts.
    let err = message(write_comparison_grid(&path, &inputs, &batch(4, None, 20), None, 3, 4).unwrap_err());
    assert!(err.contains("4 images"), "{err}");
    let err = message(write_image_grid(&path, &[&inputs.pixels], 32, 32, 0, 4).unwrap_err());
    assert!(err.contains("cells per row"), "{err}");
    let err = message(write_image_grid(&path, &[&inputs.pixels], 32, 32, 3, 0).unwrap_err());
    assert!(err.contains("scale 0"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// Writes tensors of any dtype with the safetensors crate, for the reader tests.
fn write_raw_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (name.to_string(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn safetensors_f32_round_trip() {
    let dir = scratch("st_f32");
    let path = dir.join("out.safetensors");
    let a: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    let b = vec![f32::NAN, f32::INFINITY, -0.0, 1e-30];
    write_safetensors(&path, &[("layer.weight", &[2, 3, 4], &a), ("b", &[4], &b), ("empty", &[0, 3], &[])]).unwrap();
    assert_eq!(listing(&dir), vec!["out.safetensors"]);

    let file = TensorFile::open(&path).unwrap();
    assert_eq!(file.names(), vec!["b", "empty", "layer.weight"]);
    assert_eq!(file.shape("layer.weight").unwrap(), &[2, 3, 4]);
    assert_eq!(file.dtype("layer.weight").unwrap(), Dtype::F32);
    assert_eq!(file.get_f32("layer.weight").unwrap(), (vec![2, 3, 4], a.clone()));
    assert_eq!(file.require_f32("layer.weight", &[2, 3, 4]).unwrap(), a);
    // Non-finite values pass through: the caller decides.
    let (_, got) = file.get_f32("b").unwrap();
    assert!(got[0].is_nan() && got[1] == f32::INFINITY && got[2].to_bits() == (-0.0f32).to_bits());
    assert_eq!(file.get_f32("empty").unwrap(), (vec![0, 3], vec![]));

    // Missing tensors, wrong shapes, with the names in the message.
    let err = message(file.require_f32("weight", &[2, 3, 4]).unwrap_err());
    assert!(err.contains("out.safetensors") && err.contains("`weight`") && err.contains("layer.weight"), "{err}");
    let err = message(file.get_f32("nothing").unwrap_err());
    assert!(err.contains("missing tensor `nothing`") && err.contains("3 tensors"), "{err}");
    let err = file.require_f32("layer.weight", &[6, 4]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    let err = message(err);
    assert!(err.contains("layer.weight") && err.contains("[2, 3, 4]") && err.contains("[6, 4]"), "{err}");

    // Bad writer arguments.
    let err = message(write_safetensors(dir.join("x.safetensors"), &[("t", &[5], &a)]).unwrap_err());
    assert!(err.contains("`t`") && err.contains("24 values"), "{err}");
    let err = message(write_safetensors(dir.join("x.safetensors"), &[("t", &[4], &b), ("t", &[4], &b)]).unwrap_err());
    assert!(err.contains("twice"), "{err}");
    assert_eq!(listing(&dir), vec!["out.safetensors"]);
}

#[test]
fn safetensors_f16_bf16_f64_and_indices() {
    let dir = scratch("st_types");
    let values = [0.5f32, -2.0, 1.0 / 3.0, 1000.0, 0.0, -0.125];

    // Our f16 writer.
    let f16_path = dir.join("half.safetensors");
    write_safetensors_f16(&f16_path, &[("x", &[2, 3], &values)]).unwrap();
    let file = TensorFile::open(&f16_path).unwrap();
    assert_eq!(file.dtype("x").unwrap(), Dtype::F16);
    let (shape, got) = file.get_f32("x").unwrap();
    assert_eq!(shape, vec![2, 3]);
    for (g, v) in got.iter().zip(values) {
        assert_eq!(*g, half::f16::from_f32(v).to_f32());
    }
    let err = message(write_safetensors_f16(dir.join("big.safetensors"), &[("big", &[1], &[1e6])]).unwrap_err());
    assert!(err.contains("`big`") && err.contains("F16 range"), "{err}");

    // BF16, F64, I64, I32, U8 and float indices, written by the safetensors crate.
    let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    let f64s: Vec<u8> = values.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect();
    let steps: Vec<i64> = vec![999, 500, 0, -1];
    let i64s: Vec<u8> = steps.iter().flat_map(|v| v.to_le_bytes()).collect();
    let i32s: Vec<u8> = [7i32, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let whole: Vec<u8> = [3.0f32, 8.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let frac: Vec<u8> = [3.0f32, 8.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let path = dir.join("types.safetensors");
    write_raw_safetensors(
        &path,
        &[
            ("bf16", Dtype::BF16, vec![6], bf16),
            ("f64", Dtype::F64, vec![3, 2], f64s),
            ("steps", Dtype::I64, vec![4], i64s),
            ("i32", Dtype::I32, vec![2], i32s),
            ("labels", Dtype::U8, vec![3], vec![3, 8, 0]),
            ("whole", Dtype::F32, vec![3], whole),
            ("frac", Dtype::F32, vec![2], frac),
        ],
    );
    let file = TensorFile::open(&path).unwrap();
    let (_, got) = file.get_f32("bf16").unwrap();
    for (g, v) in got.iter().zip(values) {
        assert_eq!(*g, half::bf16::from_f32(v).to_f32());
    }
    assert_eq!(file.get_f32("f64").unwrap(), (vec![3, 2], values.to_vec()));
    assert_eq!(file.get_indices("steps").unwrap(), (vec![4], steps));
    assert_eq!(file.get_indices("i32").unwrap().1, vec![7, 3]);
    assert_eq!(file.get_indices("labels").unwrap().1, vec![3, 8, 0]);
    assert_eq!(file.get_indices("whole").unwrap().1, vec![3, 8, 0]);
    let err = message(file.get_indices("frac").unwrap_err());
    assert!(err.contains("`frac`") && err.contains("non-integer 8.5"), "{err}");
    let err = file.get_f32("steps").unwrap_err();
    assert!(matches!(err, Error::WrongDtype { .. }));
    let err = message(err);
    assert!(err.contains("types.safetensors") && err.contains("`steps`") && err.contains("I64"), "{err}");
    let err = message(file.get_indices("missing").unwrap_err());
    assert!(err.contains("`missing`"), "{err}");
}

#[test]
fn safetensors_bad_inputs() {
    let dir = scratch("st_bad");
    let good = dir.join("good.safetensors");
    write_safetensors(&good, &[("w", &[8], &[1.0; 8])]).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4]).unwrap();
    let err = TensorFile::open(&truncated).unwrap_err();
    assert!(matches!(err, Error::NotSafetensors { .. }));
    let err = message(err);
    assert!(err.contains("truncated.safetensors") && err.contains("truncated"), "{err}");

    let header_only = dir.join("header_cut.safetensors");
    std::fs::write(&header_only, &bytes[..20]).unwrap();
    let err = message(TensorFile::open(&header_only).unwrap_err());
    assert!(err.contains("header_cut.safetensors") && err.contains("header length"), "{err}");

    let tiny = dir.join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    let err = message(TensorFile::open(&tiny).unwrap_err());
    assert!(err.contains("tiny.safetensors") && err.contains("3 bytes"), "{err}");

    let text = dir.join("text.safetensors");
    std::fs::write(&text, "this is a text file, not tensors\n".repeat(10)).unwrap();
    let err = TensorFile::open(&text).unwrap_err();
    assert!(matches!(err, Error::NotSafetensors { .. }));
    assert!(message(err).contains("text.safetensors is not a valid safetensors file"));

    // A valid header whose JSON is not safetensors metadata.
    let json = dir.join("json.safetensors");
    let header = br#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#;
    let mut raw = (header.len() as u64).to_le_bytes().to_vec();
    raw.extend_from_slice(header);
    raw.extend_from_slice(&[0; 4]);
    std::fs::write(&json, &raw).unwrap();
    let err = TensorFile::open(&json).unwrap_err();
    assert!(matches!(err, Error::NotSafetensors { .. }), "{err}");

    let missing = dir.join("missing.safetensors");
    let err = TensorFile::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(message(err).contains("missing.safetensors"));
}
