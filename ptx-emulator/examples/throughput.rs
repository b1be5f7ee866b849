//! Emulator speed: thread-instructions per second on kernels shaped like the project's (a tiled
//! f32 3x3 convolution as implicit GEMM, GroupNorm+SiLU with block reductions, an elementwise op).
//! Run: LD_LIBRARY_PATH=<nvidia/cu13/lib> cargo run --release -p ptx-emulator --example throughput

use std::time::Instant;

use ptx_emulator::{launch, Dims, GlobalMemory, Module};

const SRC: &str = r#"
// out[co][y][x] = sum_{ci,ky,kx} w[co][ci][ky][kx] * in[ci][y+ky-1][x+kx-1]: a 64x64 output tile
// per block (output channels x pixels), K = 9*Cin in chunks of 16 through shared memory.
extern "C" __global__ void conv3x3(const float* in, const float* w, float* out, int C, int H, int W, int Co) {
  __shared__ float As[16][64];
  __shared__ float Bs[16][64];
  int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int co0 = blockIdx.y * 64, p0 = blockIdx.x * 64;
  int K = C * 9, HW = H * W;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int e = threadIdx.x; e < 16 * 64; e += 256) {
      int kk = e / 64, j = e % 64;
      int k = k0 + kk;
      int co = co0 + j;
      As[kk][j] = (k < K && co < Co) ? w[co * K + k] : 0.f;
      int p = p0 + j;
      float v = 0.f;
      if (k < K && p < HW) {
        int ci = k / 9, r = k % 9, y = p / W + r / 3 - 1, x = p % W + r % 3 - 1;
        if (y >= 0 && y < H && x >= 0 && x < W) v = in[(ci * H + y) * W + x];
      }
      Bs[kk][j] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < 16; kk++) {
      float a[4], b[4];
      for (int i = 0; i < 4; i++) { a[i] = As[kk][ty * 4 + i]; b[i] = Bs[kk][tx * 4 + i]; }
      for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) {
    int co = co0 + ty * 4 + i, p = p0 + tx * 4 + j;
    if (co < Co && p < HW) out[co * HW + p] = acc[i][j];
  }
}
extern "C" __global__ void silu(float* y, const float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { float v = x[i]; y[i] = v / (1.f + __expf(-v)); }
}
"#;

fn main() {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("NVRTC not found: set LD_LIBRARY_PATH to the nvidia/cu13/lib folder");
        std::process::exit(1);
    }
    let opts = cudarc::nvrtc::CompileOptions { arch: Some("sm_80"), ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SRC, opts).expect("NVRTC").to_src();
    let mut mem = GlobalMemory::new();
    let m = Module::load(&ptx, &mut mem).expect("load");
    let (c, h, w, co) = (64usize, 32usize, 32usize, 64usize);
    let upload = |mem: &mut GlobalMemory, n: usize| {
        let v: Vec<u8> = (0..n).flat_map(|i| ((i % 17) as f32 * 0.01).to_le_bytes()).collect();
        let p = mem.alloc(v.len() as u64);
        mem.write(p, &v).unwrap();
        p
    };
    let pin = upload(&mut mem, c * h * w);
    let pw = upload(&mut mem, co * c * 9);
    let pout = upload(&mut mem, co * h * w);
    let args = |v: &[u64], ints: &[i32]| -> Vec<Vec<u8>> {
        v.iter().map(|x| x.to_le_bytes().to_vec()).chain(ints.iter().map(|x| x.to_le_bytes().to_vec())).collect()
    };
    let runs: Vec<(&str, Dims, Vec<Vec<u8>>)> = vec![
        (
            "conv3x3 64->64 32x32 (f32 implicit GEMM)",
            Dims {
                grid: [(h * w).div_ceil(64) as u32, co.div_ceil(64) as u32, 1],
                block: [256, 1, 1],
                dynamic_shared: 0,
            },
            args(&[pin, pw, pout], &[c as i32, h as i32, w as i32, co as i32]),
        ),
        (
            "silu 64x32x32",
            Dims { grid: [(c * h * w / 256) as u32, 1, 1], block: [256, 1, 1], dynamic_shared: 0 },
            args(&[pout, pin], &[(c * h * w) as i32]),
        ),
    ];
    println!("threads: {}", rayon::current_num_threads());
    for (name, dims, a) in runs {
        let f = m.kernel(name.split(' ').next().unwrap()).unwrap();
        let (t, c0) = (Instant::now(), cpu_seconds());
        let s = launch(&m, f, &dims, &a, &mem).expect("launch");
        let (dt, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "{name}: {} thread-instructions in {:.3} s wall = {:.1} M thread-instructions/s; {:.2} s CPU = {:.1} M per CPU-second",
            s.thread_instructions,
            dt,
            s.thread_instructions as f64 / dt / 1e6,
            cpu,
            s.thread_instructions as f64 / cpu.max(0.01) / 1e6
        );
    }
}

/// CPU time of this process (user + system) from /proc: on a shared machine wall time also counts
/// the other jobs' turns.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime: fields 14 and 15 of the stat line, 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}
