//! Kernel modules loaded on a driver: each kernel file compiled once (through the disk cache),
//! loaded once, and each function looked up once by name.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::compile::{ImageKind, KernelCompiler};
use crate::driver::{Driver, Function, Module, ModuleImage};
use crate::error::{Error, Result};

pub struct KernelModules {
    driver: Arc<dyn Driver>,
    compiler: KernelCompiler,
    kind: ImageKind,
    modules: Mutex<HashMap<String, Module>>,
    functions: Mutex<HashMap<(String, String), Function>>,
}

impl KernelModules {
    /// Modules for `driver`, compiled for its architecture. `kind`: PTX for the emulator, a cubin
    /// on a GPU.
    pub fn new(driver: Arc<dyn Driver>, compiler: KernelCompiler, kind: ImageKind) -> Self {
        Self { driver, compiler, kind, modules: Mutex::default(), functions: Mutex::default() }
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
        let image = self.compiler.compile_file(file, self.kind)?;
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
/// the SIMT module alone).
pub struct KernelTable {
    /// For messages: "conv2d", "attention".
    family: &'static str,
    functions: Vec<(String, Function)>,
    tensor_cores: bool,
}

impl KernelTable {
    pub fn load(
        driver: &dyn Driver,
        family: &'static str,
        simt: (Module, Vec<String>),
        mma: Option<(Module, Vec<String>)>,
    ) -> Result<Self> {
        let tensor_cores = mma.is_some();
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
        self.tensor_cores
    }

    pub fn get(&self, name: &str) -> Result<Function> {
        self.functions.iter().find(|(n, _)| n == name).map(|(_, f)| *f).ok_or_else(|| {
            Error::invalid(format!(
                "{}: kernel `{name}` is not loaded{}",
                self.family,
                if self.tensor_cores {
                    String::new()
                } else {
                    format!(" ({}_mma.cu, the tensor-core module, was not loaded)", self.family)
                }
            ))
        })
    }
}
