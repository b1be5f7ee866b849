//! Global-memory traffic counted per warp-level access in 32-byte sectors (`GlobalTraffic`), on
//! kernels whose sector counts are known by hand.

mod common;
use common::*;

const SRC: &str = r#"
extern "C" __global__ void gather(float* out, const float* in, int stride) {
  __shared__ float staged[64];
  const int i = threadIdx.x;
  staged[i] = in[i * stride];
  __syncthreads();
  out[i] = staged[63 - i];
}
extern "C" __global__ void half_warp(float* out, const float* in) {
  const int i = threadIdx.x;
  if (i < 16) out[i] = in[i];
}
extern "C" __global__ void vectors(float4* out, const float4* in) {
  const int i = threadIdx.x;
  out[i] = in[i];
}
"#;

#[test]
fn sectors_per_request_follow_the_addresses() {
    let mut dev = Dev::new();
    let Some(m) = dev.load(SRC) else { return };
    let input = dev.upload(&vec![1.0f32; 64 * 8]);
    let out = dev.zeros::<f32>(128);

    // Two warps of consecutive f32: 4 sectors a request, every byte used; the shared-memory
    // accesses between are not global traffic.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(1)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.load_bytes), (2, 8, 256));
    assert_eq!((t.store_requests, t.store_sectors, t.store_bytes), (2, 8, 256));
    assert_eq!(t.load_efficiency(), 1.0);

    // Lanes 32 bytes apart: a sector each, 4 of its 32 bytes used.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(8)]).global;
    assert_eq!((t.load_requests, t.load_sectors), (2, 64));
    assert_eq!(t.load_efficiency(), 0.125);

    // Two lanes a sector.
    let t = dev.run(&m, "gather", 1, 64, &[p(out), p(input), i(2)]).global;
    assert_eq!(t.load_sectors, 16);

    // A diverged warp issues for its active lanes only.
    let t = dev.run(&m, "half_warp", 1, 32, &[p(out), p(input)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.store_requests, t.store_sectors), (1, 2, 1, 2));

    // 16-byte vectors: 512 bytes a warp, 16 sectors.
    let t = dev.run(&m, "vectors", 1, 32, &[p(out), p(input)]).global;
    assert_eq!((t.load_requests, t.load_sectors, t.load_bytes), (1, 16, 512));
}
