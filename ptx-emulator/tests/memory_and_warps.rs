//! Memory spaces (global vectors, shared static and dynamic, local, const), atomics, barriers
//! and warp collectives, each against host values.

mod common;
use common::*;

#[test]
fn groupnorm_silu_block_reduction() {
    // The shape of the project's GroupNorm+SiLU: one block per (sample, group), a block reduction
    // through shuffles and shared memory, then a normalised SiLU.
    let src = r#"
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ float block_sum(float v, float* red) {
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
  if (w == 0) t = warp_sum(t);
  if (threadIdx.x == 0) red[32] = t;
  __syncthreads();
  float r = red[32];
  __syncthreads();
  return r;
}
extern "C" __global__ void gn_silu(float* out, const float* in, const float* gamma, const float* beta, int n, float eps) {
  __shared__ float red[33];
  const float* x = in + (size_t)blockIdx.x * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  float mean = block_sum(s, red) / n;
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = x[i] - mean; v += d * d; }
  float rstd = rsqrtf(block_sum(v, red) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float y = (x[i] - mean) * rstd * gamma[blockIdx.x] + beta[blockIdx.x];
    out[(size_t)blockIdx.x * n + i] = y / (1.f + __expf(-y));
  }
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(11);
    let (groups, n) = (6usize, 300usize);
    let x = g.vec(groups * n);
    let gamma = g.vec(groups);
    let beta = g.vec(groups);
    let (px, pg, pb) = (dev.upload(&x), dev.upload(&gamma), dev.upload(&beta));
    let po = dev.mem.alloc((groups * n * 4) as u64);
    dev.run(&m, "gn_silu", groups as u32, 128, &[p(po), p(px), p(pg), p(pb), i(n as i32), f(1e-5)]);
    let out: Vec<f32> = dev.download(po, groups * n);
    for gi in 0..groups {
        let xs = &x[gi * n..(gi + 1) * n];
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        for k in 0..n {
            let y = (xs[k] as f64 - mean) / (var + 1e-5).sqrt() * gamma[gi] as f64 + beta[gi] as f64;
            let want = y / (1.0 + (-y).exp());
            assert!(
                (out[gi * n + k] as f64 - want).abs() < 1e-5,
                "group {gi} element {k}: {} vs {want}",
                out[gi * n + k]
            );
        }
    }
}

#[test]
fn vectors_dynamic_shared_const_and_2d_blocks() {
    let src = r#"
__constant__ float scale[4] = {1.0f, 2.0f, 3.0f, 4.0f};
extern "C" __global__ void vec(const float4* in, float4* out, int n) {
  extern __shared__ float4 tile[];
  int t = threadIdx.y * blockDim.x + threadIdx.x;
  int i = blockIdx.x * blockDim.x * blockDim.y + t;
  if (i < n) tile[t] = in[i];
  __syncthreads();
  int j = blockDim.x * blockDim.y - 1 - t;
  int src = blockIdx.x * blockDim.x * blockDim.y + j;
  if (i < n && src < n) {
    float4 v = tile[j];
    v.x *= scale[0]; v.y *= scale[1]; v.z *= scale[2]; v.w *= scale[3];
    out[i] = v;
  }
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let n = 64 * 3;
    let x: Vec<f32> = (0..n * 4).map(|k| k as f32).collect();
    let px = dev.upload(&x);
    let po = dev.zeros::<f32>(n * 4);
    dev.try_run(&m, "vec", [3, 1, 1], [16, 4, 1], 64 * 16, &[p(px), p(po), i(n as i32)]).unwrap();
    let out: Vec<f32> = dev.download(po, n * 4);
    for b in 0..3 {
        for t in 0..64 {
            let i = b * 64 + t;
            let s = b * 64 + 63 - t;
            for c in 0..4 {
                assert_eq!(out[i * 4 + c], x[s * 4 + c] * (c + 1) as f32, "float4 {i} component {c}");
            }
        }
    }
}

#[test]
fn atomics_global_and_shared() {
    let src = r#"
extern "C" __global__ void hist(const int* v, int n, int* bins, float* total, unsigned* maxv) {
  __shared__ int local_bins[8];
  if (threadIdx.x < 8) local_bins[threadIdx.x] = 0;
  __syncthreads();
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    atomicAdd(&local_bins[v[i] & 7], 1);
    atomicAdd(total, (float)(v[i] & 7));
    atomicMax(maxv, (unsigned)v[i]);
  }
  __syncthreads();
  if (threadIdx.x < 8) atomicAdd(&bins[threadIdx.x], local_bins[threadIdx.x]);
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(9);
    let n = 1000;
    let v: Vec<i32> = (0..n).map(|_| (g.next_u32() >> 8) as i32).collect();
    let pv = dev.upload(&v);
    let (pb, pt, pm) = (dev.zeros::<i32>(8), dev.zeros::<f32>(1), dev.zeros::<u32>(1));
    dev.run(&m, "hist", 8, 128, &[p(pv), i(n), p(pb), p(pt), p(pm)]);
    let bins: Vec<i32> = dev.download(pb, 8);
    let mut want = [0; 8];
    for &x in &v {
        want[(x & 7) as usize] += 1;
    }
    assert_eq!(bins, want);
    let total: Vec<f32> = dev.download(pt, 1);
    assert_eq!(total[0], v.iter().map(|x| (x & 7) as f32).sum::<f32>());
    let mx: Vec<u32> = dev.download(pm, 1);
    assert_eq!(mx[0], *v.iter().max().unwrap() as u32);
}

#[test]
fn shuffles_votes_and_divergence() {
    let src = r#"
extern "C" __global__ void warp_ops(const int* v, int* out) {
  int lane = threadIdx.x & 31;
  int x = v[threadIdx.x];
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(0xffffffff, x, (lane * 7) & 31);
  o[1] = __shfl_up_sync(0xffffffff, x, 3);
  o[2] = __shfl_down_sync(0xffffffff, x, 5);
  o[3] = __shfl_xor_sync(0xffffffff, x, 9);
  o[4] = __shfl_sync(0xffffffff, x, lane + 2, 8);
  o[5] = (int)__ballot_sync(0xffffffff, x & 1);
  o[6] = __all_sync(0xffffffff, x > -100) + 2 * __any_sync(0xffffffff, x == 5);
  // Divergent branches, then a vote of the lanes taking one side.
  int r;
  if (x & 2) { r = (int)__activemask(); } else { r = -(int)__popc(__activemask()); }
  o[7] = r;
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let mut g = Lcg(13);
    let n = 64;
    let v: Vec<i32> = (0..n).map(|_| (g.next_u32() % 50) as i32).collect();
    let pv = dev.upload(&v);
    let po = dev.zeros::<i32>(n * 8);
    dev.run(&m, "warp_ops", 1, n as u32, &[p(pv), p(po)]);
    let out: Vec<i32> = dev.download(po, n * 8);
    for w in 0..2 {
        let xs = &v[w * 32..w * 32 + 32];
        let ballot = (0..32).filter(|&l| xs[l] & 1 == 1).fold(0u32, |a, l| a | 1 << l) as i32;
        let odd2 = (0..32).filter(|&l| xs[l] & 2 != 0).fold(0u32, |a, l| a | 1 << l);
        for l in 0..32 {
            let o = &out[(w * 32 + l) * 8..];
            assert_eq!(o[0], xs[(l * 7) & 31]);
            assert_eq!(o[1], if l >= 3 { xs[l - 3] } else { xs[l] });
            assert_eq!(o[2], if l + 5 < 32 { xs[l + 5] } else { xs[l] });
            assert_eq!(o[3], xs[l ^ 9]);
            assert_eq!(o[4], xs[(l & !7) | ((l + 2) & 7)], "width-8 shuffle, lane {l}");
            assert_eq!(o[5], ballot);
            assert_eq!(o[6], 1 + 2 * xs.contains(&5) as i32);
            let want7 = if xs[l] & 2 != 0 { odd2 as i32 } else { -((!odd2).count_ones() as i32) };
            assert_eq!(o[7], want7, "activemask in divergent code, lane {l}");
        }
    }
}

#[test]
fn timestep_embedding_sin_cos_large_arguments() {
    // sinf/cosf of large arguments take NVRTC's Payne-Hanek path: local memory and a .global table.
    let src = r#"
extern "C" __global__ void temb(float* out, const float* t, int dim, float* args) {
  int i = threadIdx.x, half = dim / 2;
  float freq = expf(-logf(10000.f) * (float)(i % half) / (float)half);
  float a = t[blockIdx.x] * freq;
  out[blockIdx.x * dim + i] = i < half ? sinf(a) : cosf(a);
  args[blockIdx.x * dim + i] = a;
}"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let t = [0.0f32, 1.0, 999.0, 123456.0];
    let pt = dev.upload(&t);
    let dim = 64;
    let po = dev.zeros::<f32>(4 * dim);
    let pa = dev.zeros::<f32>(4 * dim);
    dev.run(&m, "temb", 4, dim as u32, &[p(po), p(pt), i(dim as i32), p(pa)]);
    let out: Vec<f32> = dev.download(po, 4 * dim);
    let args: Vec<f32> = dev.download(pa, 4 * dim);
    for b in 0..4 {
        for k in 0..dim {
            let half = dim / 2;
            let freq = (-(10000f64.ln()) * (k % half) as f64 / half as f64).exp() as f32;
            let a = (t[b] * freq) as f64;
            let got_a = args[b * dim + k] as f64;
            assert!(
                (got_a - a).abs() <= 6e-7 * a.abs(), /* expf: 2 ulp, plus its f32 argument */
                "argument t={} k={k}: {got_a} vs {a}",
                t[b]
            );
            // sin/cos themselves: full f32 accuracy on the argument the kernel computed.
            let a = got_a;
            let want = if k < half { a.sin() } else { a.cos() };
            assert!((out[b * dim + k] as f64 - want).abs() < 2e-7, "t={} k={k}: {} vs {want}", t[b], out[b * dim + k]);
        }
    }
}
