//! NVTX ranges, so Nsight Systems and Nsight Compute show the sampler's steps and the networks'
//! layers by name. The NVTX shared library (`libnvToolsExt.so.1`: CUDA toolkits ship it, and so
//! does PyPI's `nvidia-nvtx-cu12`; it hands the ranges to whichever profiler is attached) is
//! loaded on first use when the dynamic loader finds it; without it every call is a no-op, so a
//! deployment needs nothing extra.
use std::ffi::{c_char, CString};
use std::sync::OnceLock;

struct Nvtx {
    push: unsafe extern "C" fn(*const c_char) -> i32,
    pop: unsafe extern "C" fn() -> i32,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();

fn load() -> Option<Nvtx> {
    for name in ["libnvToolsExt.so.1", "libnvToolsExt.so"] {
        // SAFETY: loading NVTX runs no initialisers with preconditions; the two symbols have the
        // C signatures of nvToolsExt.h (`int nvtxRangePushA(const char*)`, `int nvtxRangePop()`).
        unsafe {
            let Ok(library) = libloading::Library::new(name) else { continue };
            let push = library.get::<unsafe extern "C" fn(*const c_char) -> i32>(b"nvtxRangePushA\0").map(|f| *f);
            let pop = library.get::<unsafe extern "C" fn() -> i32>(b"nvtxRangePop\0").map(|f| *f);
            if let (Ok(push), Ok(pop)) = (push, pop) {
                return Some(Nvtx { push, pop, _library: library });
            }
        }
    }
    None
}

fn nvtx() -> Option<&'static Nvtx> {
    NVTX.get_or_init(load).as_ref()
}

/// Whether ranges reach a profiler (the NVTX library was found).
pub fn available() -> bool {
    nvtx().is_some()
}

/// Opens a range named `name` on the calling thread.
pub fn push(name: &str) {
    if let Some(nvtx) = nvtx() {
        let name = CString::new(name.replace('\0', " ")).expect("no NUL left");
        // SAFETY: a valid NUL-terminated string, which NVTX copies before returning.
        unsafe { (nvtx.push)(name.as_ptr()) };
    }
}

/// Closes the innermost open range of the calling thread.
pub fn pop() {
    if let Some(nvtx) = nvtx() {
        // SAFETY: no arguments; NVTX ignores a pop without a push.
        unsafe { (nvtx.pop)() };
    }
}

#[cfg(test)]
mod tests {
    /// Without the library (this machine, CI) ranges cost nothing and fail nothing; with it (a GPU
    /// machine) they reach the profiler. Either way a push and a pop are safe on any thread.
    #[test]
    fn ranges_are_safe_with_or_without_the_library() {
        println!("NVTX library {}", if super::available() { "found" } else { "absent: ranges are no-ops" });
        std::thread::scope(|s| {
            s.spawn(|| {
                super::push("outer");
                super::push("name with \0 inside");
                super::pop();
                super::pop();
            });
        });
    }
}
