//! Kernel modules loaded on a driver: each kernel file compiled once (through the disk cache),
//! loaded once, and each function looked up once by name.
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use super::compile::{kernel_files, HalfTypes, ImageKind, KernelCompiler};
use crate::driver::{Driver, Function, Module, ModuleImage};
use crate::error::{Error, Result};

pub struct KernelModules {
    driver: Arc<dyn Driver>,
    compiler: KernelCompiler,
    kind: ImageKind,
    modules: Mutex<HashMap<String, Module>>,
    functions: Mutex<HashMap<(String, String), Function>>,
    /// Images being compiled on background threads (`compile_in_background`), taken by `module`.
    background: Arc<Background>,
}

/// Kernel files handed to background threads: those not yet done, and the images (or errors)
/// of those done and not yet taken.
#[derive(Default)]
struct Background {
    state: Mutex<BackgroundState>,
    done: Condvar,
}

#[derive(Default)]
struct BackgroundState {
    queued: Vec<&'static str>,
    in_flight: Vec<&'static str>,
    finished: HashMap<&'static str, Result<Vec<u8>>>,
}

impl Background {
    /// The image of `file` if a background thread has it or will: waits for it; `None` if the
    /// file was never handed to one (or was taken already).
    fn take(&self, file: &str) -> Option<Result<Vec<u8>>> {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(image) = state.finished.remove(file) {
                return Some(image);
            }
            if let Some(at) = state.queued.iter().position(|f| *f == file) {
                // Not started: compiling it here is as quick as waiting for a worker.
                state.queued.remove(at);
                return None;
            }
            if !state.in_flight.contains(&file) {
                return None;
            }
            state = self.done.wait(state).unwrap();
        }
    }

    /// One worker: compiles queued files until none is left.
    fn work(&self, compiler: &KernelCompiler, kind: ImageKind) {
        loop {
            let file = {
                let mut state = self.state.lock().unwrap();
                let Some(file) = state.queued.pop() else { return };
                state.in_flight.push(file);
                file
            };
            let image = compiler.compile_file(file, kind);
            let mut state = self.state.lock().unwrap();
            state.in_flight.retain(|f| *f != file);
            state.finished.insert(file, image);
            self.done.notify_all();
        }
    }
}

/// How many files a first run compiles at once: as many as the host has cores.
fn compile_workers(files: usize) -> usize {
    files.min(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Orders a queue that workers pop from the end: the tensor-core modules, the slowest to compile,
/// sorted last, go first.
fn sort_for_popping(queue: &mut [&'static str]) {
    queue.sort_by_key(|f| f.contains("_mma"));
}

/// What `compile_side_by_side` measured: each file's image and compile seconds (in `files`' order),
/// the wall-clock seconds of the whole, and how many files were compiled at once.
pub struct SideBySide {
    pub files: Vec<(Result<Vec<u8>>, f64)>,
    pub wall_s: f64,
    pub workers: usize,
}

/// Compiles `files` as a first run does (`KernelModules::compile_in_background`: the same order,
/// as many at once as the host has cores), timed: a user's cold start.
pub fn compile_side_by_side(compiler: &KernelCompiler, kind: ImageKind, files: &[&'static str]) -> SideBySide {
    let mut queue = files.to_vec();
    sort_for_popping(&mut queue);
    let queue = Mutex::new(queue);
    let results = Mutex::new(HashMap::new());
    let workers = compile_workers(files.len());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Some(file) = queue.lock().unwrap().pop() else { return };
                let compiling = std::time::Instant::now();
                let image = compiler.compile_file(file, kind);
                results.lock().unwrap().insert(file, (image, compiling.elapsed().as_secs_f64()));
            });
        }
    });
    let wall_s = started.elapsed().as_secs_f64();
    let mut results = results.into_inner().unwrap();
    let files = files.iter().map(|f| results.remove(f).expect("every queued file was compiled")).collect();
    SideBySide { files, wall_s, workers }
}

impl KernelModules {
    /// Modules for `driver`, compiled for its architecture. `kind`: PTX for the emulator, a cubin
    /// on a GPU.
    pub fn new(driver: Arc<dyn Driver>, compiler: KernelCompiler, kind: ImageKind) -> Self {
        Self {
            driver,
            compiler,
            kind,
            modules: Mutex::default(),
            functions: Mutex::default(),
            background: Arc::default(),
        }
    }

    /// Starts compiling (or reading from the disk cache) every kernel file not loaded yet, on as
    /// many threads as the host has cores (at most one per file), and returns at once: on a cold
    /// cache the first forward then waits for the slowest file, not for the sum of them. `module`
    /// takes a file's image from there (waiting if its compile is under way); an error stays with
    /// its file and surfaces when that file is first used.
    pub fn compile_in_background(&self) {
        let loaded = self.modules.lock().unwrap();
        let mut state = self.background.state.lock().unwrap();
        let pending: Vec<&'static str> = kernel_files()
            .filter(|f| {
                !loaded.contains_key(*f)
                    && !state.queued.contains(f)
                    && !state.in_flight.contains(f)
                    && !state.finished.contains_key(f)
            })
            .collect();
        let workers = compile_workers(pending.len());
        state.queued.extend(pending);
        sort_for_popping(&mut state.queued);
        drop(state);
        for _ in 0..workers {
            let (background, compiler, kind) = (self.background.clone(), self.compiler.clone(), self.kind);
            std::thread::spawn(move || background.work(&compiler, kind));
        }
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    pub fn compiler(&self) -> &KernelCompiler {
        &self.compiler
    }

    /// The module of kernel file `file` (e.g. "elementwise.cu"), compiled and loaded on first use.
    pub fn module(&self, file: &str) -> Result<Module> {
        let mut modules = self.modules.lock().unwrap();
        if let Some(&module) = modules.get(file) {
            return Ok(module);
        }
        let image = match self.background.take(file) {
            Some(image) => image?,
            None => self.compiler.compile_file(file, self.kind)?,
        };
        let module = self.load_image(file, &image)?;
        modules.insert(file.to_string(), module);
        Ok(module)
    }

    /// Loads `image`, compiled from kernel file `file` by `compiler()`, as that file's module (an
    /// error if the file is already loaded): for `CudaBackend::kernel_start_up`, which times the
    /// compile and the load apart.
    pub fn insert_image(&self, file: &str, image: &[u8]) -> Result<Module> {
        let mut modules = self.modules.lock().unwrap();
        if modules.contains_key(file) {
            return Err(Error::invalid(format!("kernel file {file} is already loaded")));
        }
        let module = self.load_image(file, image)?;
        modules.insert(file.to_string(), module);
        Ok(module)
    }

    /// What its images are: PTX (the emulator) or cubins (a GPU).
    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    fn load_image(&self, file: &str, image: &[u8]) -> Result<Module> {
        Ok(match self.kind {
            ImageKind::Ptx => {
                let text = std::str::from_utf8(image)
                    .map_err(|_| crate::Error::Device(format!("NVRTC's PTX for {file} is not UTF-8")))?;
                self.driver.load_module(ModuleImage::Ptx(text))?
            }
            ImageKind::Cubin => self.driver.load_module(ModuleImage::Cubin(image))?,
        })
    }

    /// The kernel `name` of file `file`.
    pub fn function(&self, file: &str, name: &str) -> Result<Function> {
        let key = (file.to_string(), name.to_string());
        if let Some(&f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f);
        }
        let module = self.module(file)?;
        let function = self.driver.function(module, name)?;
        self.functions.lock().unwrap().insert(key, function);
        Ok(function)
    }
}

/// The functions of one op family's kernel files, looked up once by name: the SIMT module's
/// always, the tensor-core module's when it is given (the backend always loads it; tests may load
/// the SIMT module alone), of the 16-bit types it was compiled for.
pub struct KernelTable {
    /// For messages: "conv2d", "attention".
    family: &'static str,
    functions: Vec<(String, Function)>,
    /// The tensor-core module's 16-bit types; `None`: not loaded.
    tensor_cores: Option<HalfTypes>,
}

impl KernelTable {
    pub fn load(
        driver: &dyn Driver,
        family: &'static str,
        simt: (Module, Vec<String>),
        mma: Option<(Module, HalfTypes, Vec<String>)>,
    ) -> Result<Self> {
        let tensor_cores = mma.as_ref().map(|(_, halves, _)| *halves);
        let mma = mma.map(|(module, halves, names)| {
            (module, names.into_iter().filter(|name| halves.instantiates(name)).collect())
        });
        let mut functions = Vec::new();
        for (module, names) in std::iter::once(simt).chain(mma) {
            for name in names {
                let function = driver.function(module, &name)?;
                functions.push((name, function));
            }
        }
        Ok(Self { family, functions, tensor_cores })
    }

    /// Whether the tensor-core kernels are loaded.
    pub fn has_tensor_cores(&self) -> bool {
        self.tensor_cores.is_some()
    }

    pub fn get(&self, name: &str) -> Result<Function> {
        self.functions.iter().find(|(n, _)| n == name).map(|(_, f)| *f).ok_or_else(|| {
            let why = match self.tensor_cores {
                None => format!(" ({}_mma.cu, the tensor-core module, was not loaded)", self.family),
                Some(halves) if !halves.instantiates(name) => format!(
                    " (the 16-bit types of this backend's tensor-core kernels: {halves}; a backend compiles \
                     its own precision's, so a 16-bit tensor needs a backend of its precision)"
                ),
                Some(_) => String::new(),
            };
            Error::invalid(format!("{}: kernel `{name}` is not loaded{why}", self.family))
        })
    }
}
