//! The entry points of the fuzz targets (fuzz/fuzz_targets) and of the corpus replay test
//! (tests/fuzz_corpus.rs): each feeds arbitrary bytes to one reader exactly as the engine reads
//! a file, and must return (an error is fine) without panicking, hanging or allocating without
//! bound.
use super::cifar;
use super::image::decode_png;
use super::tensor_file::TensorFile;
use crate::model::UnetConfig;

/// A safetensors file: parse the header, then read every tensor as values and as indices, and
/// infer a UNet config from it, as `inspect` and the loaders do.
pub fn safetensors_bytes(data: &[u8]) {
    let Ok(file) = TensorFile::from_bytes(data.to_vec(), "fuzz.safetensors") else { return };
    for name in file.names() {
        let _ = file.shape(name);
        let _ = file.dtype(name);
        let _ = file.get_f32(name);
        let _ = file.get_indices(name);
    }
    let _ = UnetConfig::infer(&file);
}

/// A CIFAR-10 binary file, through the size check and record parser of `read_cifar`.
pub fn cifar_bytes(data: &[u8]) {
    let _ = cifar::decode_cifar(data, "fuzz.bin", None);
    let _ = cifar::decode_cifar(data, "fuzz.bin", Some(1));
}

/// A PNG file, decoded as the image loader does (32x32 expected) and at any size.
pub fn png_bytes(data: &[u8]) {
    let _ = decode_png(data, "fuzz.png", Some((32, 32)));
    let _ = decode_png(data, "fuzz.png", None);
}
