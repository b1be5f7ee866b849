//! Register files reused from block to block (`liveness`): every block must see what a fresh,
//! zeroed file would give it, even where a kernel reads a register no instruction has written.

mod common;
use common::*;

use ptx_emulator::Module;

// Block 0 alone writes %r2 (on a path of its own), %r3 (a guarded write every thread passes) and
// %r4 (guarded, reached through a jump forward, then read after a jump back: only the analysis's
// second pass sees %r4 read before written); every block then stores all three.
const STALE: &str = r#"
.version 7.0
.target sm_80
.address_size 64
.visible .entry stale(.param .u64 out)
{
  .reg .pred %p<3>;
  .reg .b32 %r<8>;
  .reg .b64 %rd<8>;
  ld.param.u64 %rd1, [out];
  cvta.to.global.u64 %rd1, %rd1;
  mov.u32 %r1, %ctaid.x;
  setp.eq.u32 %p1, %r1, 0;
  @%p1 mov.u32 %r3, 5;
  @!%p1 bra SKIP;
  mov.u32 %r2, 7;
SKIP:
  bra.uni FORWARD;
BACK:
  add.u32 %r6, %r4, 1;
  bra.uni DONE;
FORWARD:
  @%p1 mov.u32 %r4, 9;
  bra.uni BACK;
DONE:
  mov.u32 %r7, %tid.x;
  mad.lo.u32 %r7, %r1, 32, %r7;
  mul.wide.u32 %rd2, %r7, 12;
  add.u64 %rd3, %rd1, %rd2;
  st.global.u32 [%rd3], %r2;
  st.global.u32 [%rd3+4], %r3;
  st.global.u32 [%rd3+8], %r6;
  ret;
}
"#;

#[test]
fn reused_register_files_read_as_fresh_ones() {
    let mut dev = Dev::new();
    let m = Module::load(STALE, &mut dev.mem).unwrap_or_else(|e| panic!("{e}"));
    let f = m.kernel("stale").unwrap();
    let reads = f.read_before_written.as_ref().expect("the kernel writes no constant or special slot");
    // %r2, %r3 and %r4 (each read where no write certainly came first), nothing else.
    assert_eq!(reads.len(), 3, "{reads:?}");
    // Many blocks on few workers: most run after block 0 on its worker, in its register files.
    let (blocks, threads) = (256, 32);
    for _ in 0..3 {
        let out = dev.zeros::<u32>(3 * blocks * threads);
        dev.run(&m, "stale", blocks as u32, threads as u32, &[p(out)]);
        let got: Vec<u32> = dev.download(out, 3 * blocks * threads);
        for (t, got) in got.chunks(3).enumerate() {
            let want = if t < threads { [7, 5, 10] } else { [0, 0, 1] };
            assert_eq!(got, want, "block {}, thread {}", t / threads, t % threads);
        }
    }
}
