//! An endless loop (here a spin wait on a flag no one sets) is reported after a bounded run, not a
//! hung test. Its own test binary: it lowers the process-wide step limit.

mod common;
use common::*;
use ptx_emulator::ReportKind;

#[test]
fn endless_loop_is_reported_not_hung() {
    ptx_emulator::block::WARP_STEP_LIMIT.store(1 << 20, std::sync::atomic::Ordering::Relaxed);
    let src = r#"
extern "C" __global__ void spin(volatile int* flag) { while (*flag == 0) { } }"#;
    let mut dev = Dev::new();
    let Some(m) = dev.load(src) else { return };
    let flag = dev.zeros::<i32>(1);
    let r = dev.report(&m, "spin", 1, 32, &[p(flag)]);
    assert_eq!(r.kind, ReportKind::Fault, "{r}");
    assert!(r.detail.contains("1048576 instructions without blocking"), "{r}");
}
