//! Where a network's parameters come from. A network is built by one walk over its architecture that
//! asks a `ParamSource` for each named tensor; the same walk therefore lists the parameters (for
//! `inspect` and parameter counts), loads and validates them from a safetensors file, or makes
//! deterministic ones for tests. The architecture is written once.
use std::collections::BTreeSet;

use crate::backend::{subpixel_weights, Backend, Conv2dGeometry};
use crate::data::tensor_file::TensorFile;
use crate::error::{check_finite, Error, Result};

/// Hands out named parameter tensors of an expected shape.
pub trait ParamSource<B: Backend> {
    fn backend(&self) -> &B;
    /// The named tensor's values on the host, checked against `shape`.
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The named tensor in the backend's memory.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let data = self.host(name, shape)?;
        self.backend().upload(&data, shape)
    }
    /// The named tensor stored as the backend's activation precision (convolution weights, which
    /// the tensor cores read in that type).
    fn activation_tensor(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let data = self.host(name, shape)?;
        let backend = self.backend();
        backend.upload_as(&data, shape, backend.precision())
    }
}

/// A convolution's weight (O x I x k x k), bias and geometry.
pub struct Conv<B: Backend> {
    pub weight: B::Tensor,
    pub bias: B::Tensor,
    pub geometry: Conv2dGeometry,
}

impl<B: Backend> Conv<B> {
    pub fn load(
        src: &mut impl ParamSource<B>,
        name: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        geometry: Conv2dGeometry,
    ) -> Result<Self> {
        Ok(Self {
            weight: src.activation_tensor(&format!("{name}.weight"), &[cout, cin, kernel, kernel])?,
            bias: src.tensor(&format!("{name}.bias"), &[cout])?,
            geometry,
        })
    }

    /// One convolution with the output channels of the named ones stacked in order (each `cout`
    /// channels, the same input and geometry): the attention's q, k and v projections, one launch
    /// that reads its input once and gives the GEMM three times the columns.
    pub fn load_stacked(
        src: &mut impl ParamSource<B>,
        names: &[String],
        cin: usize,
        cout: usize,
        kernel: usize,
        geometry: Conv2dGeometry,
    ) -> Result<Self> {
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        for name in names {
            weight.extend(src.host(&format!("{name}.weight"), &[cout, cin, kernel, kernel])?);
            bias.extend(src.host(&format!("{name}.bias"), &[cout])?);
        }
        let stacked = names.len() * cout;
        let backend = src.backend();
        Ok(Self {
            weight: backend.upload_as(&weight, &[stacked, cin, kernel, kernel], backend.precision())?,
            bias: backend.upload(&bias, &[stacked])?,
            geometry,
        })
    }
}

/// The UNet Upsample's convolution (3x3, padding 1, of the nearest-x2 upsampled input), its
/// weights folded at load time into the sub-pixel form `Backend::upsample_conv2d` reads
/// (`subpixel_weights`: Co x Ci x 4 x 4, summed in f32 and rounded once to the activations' type).
pub struct UpsampleConv<B: Backend> {
    pub weight: B::Tensor,
    pub bias: B::Tensor,
}

impl<B: Backend> UpsampleConv<B> {
    pub fn load(src: &mut impl ParamSource<B>, name: &str, cin: usize, cout: usize) -> Result<Self> {
        let weight = src.host(&format!("{name}.weight"), &[cout, cin, 3, 3])?;
        let backend = src.backend();
        let weight =
            backend.upload_as(&subpixel_weights(&weight, cout, cin), &[cout, cin, 4, 4], backend.precision())?;
        Ok(Self { weight, bias: src.tensor(&format!("{name}.bias"), &[cout])? })
    }
}

/// A dense layer (weight out x in, bias out).
pub struct Linear<B: Backend> {
    pub weight: B::Tensor,
    pub bias: B::Tensor,
    pub out_features: usize,
}

impl<B: Backend> Linear<B> {
    pub fn load(src: &mut impl ParamSource<B>, name: &str, fin: usize, fout: usize) -> Result<Self> {
        Ok(Self {
            weight: src.tensor(&format!("{name}.weight"), &[fout, fin])?,
            bias: src.tensor(&format!("{name}.bias"), &[fout])?,
            out_features: fout,
        })
    }
}

/// GroupNorm's affine parameters.
pub struct GroupNorm<B: Backend> {
    pub gamma: B::Tensor,
    pub beta: B::Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(src: &mut impl ParamSource<B>, name: &str, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            gamma: src.tensor(&format!("{name}.weight"), &[channels])?,
            beta: src.tensor(&format!("{name}.bias"), &[channels])?,
            groups,
            eps,
        })
    }
}

/// Records the names and shapes asked for, uploading zeros: lists a network's parameters.
pub struct ParamLister<'a, B: Backend> {
    pub backend: &'a B,
    pub params: Vec<(String, Vec<usize>)>,
}

impl<'a, B: Backend> ParamLister<'a, B> {
    pub fn new(backend: &'a B) -> Self {
        Self { backend, params: Vec::new() }
    }
}

impl<B: Backend> ParamSource<B> for ParamLister<'_, B> {
    fn backend(&self) -> &B {
        self.backend
    }
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.params.push((name.to_string(), shape.to_vec()));
        Ok(vec![0.0; shape.iter().product()])
    }
}

impl<B: Backend> ParamLister<'_, B> {
    pub fn count(&self) -> usize {
        self.params.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Loads parameters from a safetensors file, checking each for presence, shape and finiteness, and
/// (with `finish`) that the file holds nothing the network does not use.
pub struct FileParams<'a, B: Backend> {
    pub backend: &'a B,
    pub file: &'a TensorFile,
    used: BTreeSet<String>,
    /// Names the network reads from the file but are not parameters (e.g. batch-norm bookkeeping).
    ignored_suffixes: &'a [&'a str],
}

impl<'a, B: Backend> FileParams<'a, B> {
    pub fn new(backend: &'a B, file: &'a TensorFile) -> Self {
        Self { backend, file, used: BTreeSet::new(), ignored_suffixes: &[] }
    }
    pub fn ignoring(mut self, suffixes: &'a [&'a str]) -> Self {
        self.ignored_suffixes = suffixes;
        self
    }
    /// Fails if the file holds a tensor that no layer asked for: a sign of the wrong config.
    pub fn finish(self, what: &str) -> Result<()> {
        for name in self.file.names() {
            let ignored = self.ignored_suffixes.iter().any(|s| name.ends_with(s));
            if !self.used.contains(name) && !ignored {
                return Err(Error::UnexpectedTensor {
                    file: self.file.file(),
                    name: name.to_string(),
                    what: what.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl<B: Backend> ParamSource<B> for FileParams<'_, B> {
    fn backend(&self) -> &B {
        self.backend
    }
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let data = self.file.require_f32(name, shape)?;
        check_finite(&data, || format!("{}: tensor `{name}`", self.file.file()))?;
        self.used.insert(name.to_string());
        Ok(data)
    }
}

/// Deterministic pseudo-random parameters, bit-identical to `deterministic_tensor` of
/// weights/torch_models.py (spec in tests/golden/README.md), so goldens need not carry weights:
/// matrices uniform with variance 1/fan_in, norm gains 1 +- 0.2, biases +- 0.1.
pub struct DeterministicParams<'a, B: Backend> {
    pub backend: &'a B,
    pub seed: u64,
    /// Every generated (name, shape), so the set can be written to a file.
    pub generated: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub keep_host_copies: bool,
}

impl<'a, B: Backend> DeterministicParams<'a, B> {
    pub fn new(backend: &'a B, seed: u64) -> Self {
        Self { backend, seed, generated: Vec::new(), keep_host_copies: false }
    }
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// See `DeterministicParams`.
pub fn deterministic_tensor(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let fan_in: usize = shape.iter().skip(1).product();
    let weight_scale = (3.0f64 / fan_in as f64).sqrt() as f32;
    let mut values = deterministic_uniform(name, shape.iter().product(), seed);
    for u in values.iter_mut() {
        *u = if name.ends_with(".bias") || name.ends_with(".running_mean") {
            *u * 0.1
        } else if shape.len() >= 2 {
            *u * weight_scale
        } else {
            1.0 + *u * 0.2
        };
    }
    values
}

/// The generator's raw stream for `name`: `count` values in [-1, 1) (weights are scaled from it;
/// benchmark inputs use it as it is). Python: `uniform_stream(tensor_key(name, seed), count)`.
pub fn deterministic_uniform(name: &str, count: usize, seed: u64) -> Vec<f32> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    let key = hash ^ seed.wrapping_mul(GOLDEN_GAMMA);
    (0..count)
        .map(|i| {
            let mut z = key.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN_GAMMA));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32
        })
        .collect()
}

impl<B: Backend> ParamSource<B> for DeterministicParams<'_, B> {
    fn backend(&self) -> &B {
        self.backend
    }
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let data = deterministic_tensor(name, shape, self.seed);
        if self.keep_host_copies {
            self.generated.push((name.to_string(), shape.to_vec(), data.clone()));
        }
        Ok(data)
    }
}
