//! kernels/diffusion.cu's `fill_gaussian` on the PTX emulator against the CPU generator
//! (src/backend/cpu/rng.rs): the same keying per image (seed, stream, the image's index in the
//! whole input, element), NCHW and NHWC, for images in any order. NVRTC compiles the kernel; it
//! needs `LD_LIBRARY_PATH` to hold libnvrtc.so.13 (CI installs it; without it this test fails
//! under CI=true and says it skipped otherwise).
use purifier::backend::cpu::rng;
use purifier::backend::cuda::compile::{nvrtc_available, ImageKind, KernelCompiler};
use purifier::driver::emulated::EmulatedDriver;
use purifier::driver::{Driver, KernelArgs, LaunchConfig, ModuleImage};

fn diffusion_ptx() -> Option<String> {
    if !nvrtc_available() {
        assert!(std::env::var("CI").map(|v| v != "true").unwrap_or(true), "NVRTC not found under CI=true");
        println!("skipped: NVRTC not found (put libnvrtc.so.13's folder on LD_LIBRARY_PATH)");
        return None;
    }
    let compiler = KernelCompiler::with_cache_dir("sm_80", None).unwrap();
    Some(String::from_utf8(compiler.compile_file("diffusion.cu", ImageKind::Ptx).unwrap()).unwrap())
}

/// Runs the kernel for a batch of `images` of shape channels x height x width (f32 output) and
/// returns the output in the kernel's layout.
fn gpu_noise(ptx: &str, images: &[u32], shape: [usize; 3], nhwc: bool, seed: u64, stream: u64) -> Vec<f32> {
    let d = EmulatedDriver::new();
    let module = d.load_module(ModuleImage::Ptx(ptx)).unwrap();
    let kernel = d.function(module, "fill_gaussian").unwrap();
    let [channels, height, width] = shape;
    let sample_len = channels * height * width;
    let n = images.len() * sample_len;
    let out = d.alloc(n * 4).unwrap();
    d.memset_u32(out, 0x7fc0_0000, n).unwrap(); // NaN: every element must be written
    let indices: Vec<u8> = images.iter().flat_map(|&g| (g as f32).to_le_bytes()).collect();
    let indices_ptr = d.alloc(indices.len()).unwrap();
    d.copy_to_device(indices_ptr, &indices).unwrap();
    let args = KernelArgs::new()
        .ptr(out)
        .i32(0) // f32 storage
        .ptr(indices_ptr)
        .u64(images.len() as u64)
        .u64(sample_len as u64)
        .i32(nhwc as i32)
        .i32(channels as i32)
        .i32(height as i32)
        .i32(width as i32)
        .u64(seed)
        .u64(stream);
    d.launch(kernel, LaunchConfig::linear(2, 64), &args).unwrap(); // fewer threads than blocks: grid-stride
    d.synchronize().unwrap();
    let mut bytes = vec![0u8; n * 4];
    d.copy_to_host(out, &mut bytes).unwrap();
    bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn fill_gaussian_kernel_keys_noise_per_image_like_the_cpu() {
    let Some(ptx) = diffusion_ptx() else { return };
    let images = [7, 0, 11];
    // 3 x 19 x 23 = 1311 elements per image: the last Philox block of an image is cut short.
    let shape = [3, 19, 23];
    let (seed, stream) = (0x1234_5678_9ABC_DEF0, (1u64 << 32) + 5);
    let sample_len: usize = shape.iter().product();
    let mut cpu = vec![0.0; images.len() * sample_len];
    rng::fill_gaussian(&mut cpu, &images, seed, stream);
    let nchw = gpu_noise(&ptx, &images, shape, false, seed, stream);
    let nhwc = gpu_noise(&ptx, &images, shape, true, seed, stream);
    let [c_len, h_len, w_len] = shape;
    let (mut exact, mut total) = (0, 0);
    for s in 0..images.len() {
        for c in 0..c_len {
            for y in 0..h_len {
                for x in 0..w_len {
                    let e = (c * h_len + y) * w_len + x;
                    let expected = cpu[s * sample_len + e];
                    let from_nchw = nchw[s * sample_len + e];
                    let from_nhwc = nhwc[((s * h_len + y) * w_len + x) * c_len + c];
                    assert_eq!(from_nchw.to_bits(), from_nhwc.to_bits(), "layouts differ at image {s}, {c},{y},{x}");
                    // The GPU's f64 log/sin/cos may differ from the host's in the last f64 bits;
                    // rounded to f32 that is at most one ulp, and rarely even that.
                    let ulps = (from_nchw.to_bits() as i64 - expected.to_bits() as i64).abs();
                    assert!(ulps <= 1, "image {} element {e}: kernel {from_nchw}, CPU {expected}", images[s]);
                    exact += usize::from(ulps == 0);
                    total += 1;
                }
            }
        }
    }
    println!("{exact} of {total} elements bit-identical to the CPU");
    assert!(exact * 100 >= total * 99, "only {exact} of {total} bit-identical");
    // Image 11 alone in a batch gets what it got third in the batch above.
    let alone = gpu_noise(&ptx, &[11], shape, false, seed, stream);
    assert_eq!(alone[..], nchw[2 * sample_len..]);
}
