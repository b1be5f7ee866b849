//! The CIFAR ResNet classifiers (He et al. 2016, depths 6n+2 with the "option A" shortcut;
//! ../shared/data/README.md): forward (logits and the pooled penultimate features) and the
//! vector-Jacobian product with respect to the input image.
//!
//! Batch-norm (eval mode) is an affine map per channel, so it is folded into the preceding
//! convolution's weight and bias at load time; each conv-bn-ReLU is then one fused conv.
//! The classifier takes images in the engine's range [-1, 1] and applies the per-channel
//! normalisation of the published weights itself.
use crate::backend::{Backend, Conv2dGeometry, ConvEpilogue, TensorShape};
use crate::data::tensor_file::TensorFile;
use crate::error::{Error, Result};
use crate::model::params::{FileParams, Linear, ParamSource};

const BN_EPS: f64 = 1e-5;
/// Normalisation of the published CIFAR ResNet weights, for pixels in [0, 1].
const PIXEL_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const PIXEL_STD: [f32; 3] = [0.229, 0.224, 0.225];
const STAGE_WIDTHS: [usize; 3] = [16, 32, 64];

/// A convolution with its batch-norm folded in (no padding asymmetry in these networks).
struct FoldedConv<B: Backend> {
    weight: B::Tensor,
    bias: B::Tensor,
    geometry: Conv2dGeometry,
}

impl<B: Backend> FoldedConv<B> {
    /// Loads `{conv}.weight` (3x3, no bias) and `{bn}.*`, and folds
    /// `bn(conv(x)) = conv(x) * g / sqrt(var + eps) + (beta - mean * g / sqrt(var + eps))`.
    fn load(
        src: &mut impl ParamSource<B>,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> Result<Self> {
        let mut w = src.host(&format!("{conv}.weight"), &[cout, cin, 3, 3])?;
        let gamma = src.host(&format!("{bn}.weight"), &[cout])?;
        let beta = src.host(&format!("{bn}.bias"), &[cout])?;
        let mean = src.host(&format!("{bn}.running_mean"), &[cout])?;
        let var = src.host(&format!("{bn}.running_var"), &[cout])?;
        if let Some(o) = var.iter().position(|&v| v < 0.0) {
            return Err(Error::invalid(format!("`{bn}.running_var` is negative at channel {o}")));
        }
        let mut bias = vec![0.0f32; cout];
        for o in 0..cout {
            let scale = gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
            for v in &mut w[o * cin * 9..(o + 1) * cin * 9] {
                *v = (*v as f64 * scale) as f32;
            }
            bias[o] = (beta[o] as f64 - mean[o] as f64 * scale) as f32;
        }
        let b = src.backend();
        Ok(Self {
            weight: b.upload(&w, &[cout, cin, 3, 3])?,
            bias: b.upload(&bias, &[cout])?,
            geometry: Conv2dGeometry::strided(stride, 1),
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor, residual: Option<&B::Tensor>, out: &mut B::Tensor) {
        b.conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.geometry,
            ConvEpilogue { residual, relu: true, channel_bias: None },
            out,
        );
    }
}

/// conv-bn-ReLU-conv-bn, plus the shortcut, then ReLU.
struct BasicBlock<B: Backend> {
    conv1: FoldedConv<B>,
    conv2: FoldedConv<B>,
    /// Channels of zero padding on each side of the subsampled shortcut (0: identity shortcut).
    shortcut_pad: usize,
    out_channels: usize,
    stride: usize,
}

pub struct Classifier<B: Backend> {
    pub depth: usize,
    stem: FoldedConv<B>,
    blocks: Vec<BasicBlock<B>>,
    linear: Linear<B>,
    pub num_classes: usize,
}

impl<B: Backend> Classifier<B> {
    /// Builds a CIFAR ResNet of `depth` (20, 32, 44, 56, ...: 6n + 2) from `src`.
    pub fn load_with(src: &mut impl ParamSource<B>, depth: usize) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(Error::invalid(format!("CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56), got {depth}")));
        }
        let n = (depth - 2) / 6;
        let stem = FoldedConv::load(src, "conv1", "bn1", 3, STAGE_WIDTHS[0], 1)?;
        let mut blocks = Vec::new();
        let mut cin = STAGE_WIDTHS[0];
        for (stage, &cout) in STAGE_WIDTHS.iter().enumerate() {
            for k in 0..n {
                let stride = if stage > 0 && k == 0 { 2 } else { 1 };
                let name = format!("layer{}.{k}", stage + 1);
                blocks.push(BasicBlock {
                    conv1: FoldedConv::load(src, &format!("{name}.conv1"), &format!("{name}.bn1"), cin, cout, stride)?,
                    conv2: FoldedConv::load(src, &format!("{name}.conv2"), &format!("{name}.bn2"), cout, cout, 1)?,
                    shortcut_pad: if stride != 1 || cin != cout { cout / 4 } else { 0 },
                    out_channels: cout,
                    stride,
                });
                cin = cout;
            }
        }
        let linear = Linear::load(src, "linear", cin, 10)?;
        Ok(Self { depth, stem, blocks, num_classes: linear.out_features, linear })
    }

    /// Loads a classifier from a safetensors file of the published naming, inferring the depth
    /// from the number of blocks in `layer1`. Unused tensors (other than batch-norm counters)
    /// are an error: they mean the file is not this network.
    pub fn load(backend: &B, file: &TensorFile) -> Result<Self> {
        let blocks = (0..).take_while(|k| file.contains(&format!("layer1.{k}.conv1.weight"))).count();
        if blocks == 0 {
            return Err(Error::UnknownConfig {
                file: file.file(),
                reason: "no tensor `layer1.0.conv1.weight`: not a CIFAR ResNet".into(),
            });
        }
        let mut src = FileParams::new(backend, file).ignoring(&["num_batches_tracked"]);
        let net = Self::load_with(&mut src, 6 * blocks + 2)?;
        src.finish(&format!("CIFAR ResNet-{}", 6 * blocks + 2))?;
        Ok(net)
    }

    /// Width of the pooled feature vector (the penultimate layer).
    pub fn feature_dim(&self) -> usize {
        STAGE_WIDTHS[2]
    }

    pub fn plan(&self, backend: &B, batch: usize, with_backward: bool) -> Result<ClassifierPlan<B>> {
        if batch == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        let zeros = |shape: &[usize]| backend.zeros(shape);
        let grad = |shape: &[usize]| {
            if with_backward {
                backend.zeros(shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let input_shape = [batch, 3, 32, 32];
        let stem_shape = [batch, STAGE_WIDTHS[0], 32, 32];
        let mut outputs = vec![zeros(&stem_shape)?];
        let mut blocks = Vec::new();
        let mut res = 32;
        for block in &self.blocks {
            res /= block.stride;
            let shape = [batch, block.out_channels, res, res];
            outputs.push(zeros(&shape)?);
            blocks.push(BlockBuffers {
                hidden: zeros(&shape)?,
                shortcut: if block.shortcut_pad > 0 { Some(zeros(&shape)?) } else { None },
                dsum: grad(&shape)?,
                dhidden: grad(&shape)?,
                dhidden_pre: grad(&shape)?,
            });
        }
        let doutputs = if with_backward {
            outputs.iter().map(|t| zeros(t.shape())).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let f = self.feature_dim();
        Ok(ClassifierPlan {
            batch,
            input: zeros(&input_shape)?,
            normalised: zeros(&input_shape)?,
            outputs,
            blocks,
            features: zeros(&[batch, f])?,
            logits: zeros(&[batch, self.num_classes])?,
            doutputs,
            dstem_pre: grad(&stem_shape)?,
            dnormalised: grad(&input_shape)?,
            dinput: grad(&input_shape)?,
            dfeatures: zeros(&[batch, f])?,
            forward_done: false,
        })
    }

    /// Logits and features of images x (N x 3 x 32 x 32, in [-1, 1]); results stay in the plan
    /// (`ClassifierPlan::logits`, `ClassifierPlan::features`).
    pub fn forward(&self, b: &B, plan: &mut ClassifierPlan<B>, x: &B::Tensor) -> Result<()> {
        if x.shape() != plan.input.shape() {
            return Err(Error::invalid(format!(
                "classifier input has shape {:?}, the plan expects {:?}",
                x.shape(),
                plan.input.shape()
            )));
        }
        let (scale, shift) = input_affine();
        b.copy(x, &mut plan.input);
        b.channel_affine(&plan.input, &scale, &shift, &mut plan.normalised);
        self.stem.forward(b, &plan.normalised, None, &mut plan.outputs[0]);
        for (k, (block, bufs)) in self.blocks.iter().zip(plan.blocks.iter_mut()).enumerate() {
            let (head, tail) = plan.outputs.split_at_mut(k + 1);
            let (x, out) = (&head[k], &mut tail[0]);
            block.conv1.forward(b, x, None, &mut bufs.hidden);
            let residual = match &mut bufs.shortcut {
                Some(s) => {
                    b.shortcut_subsample_pad(x, block.shortcut_pad, s);
                    &*s
                }
                None => x,
            };
            block.conv2.forward(b, &bufs.hidden, Some(residual), out);
        }
        b.global_avg_pool(plan.outputs.last().unwrap(), &mut plan.features);
        b.linear(&plan.features, &self.linear.weight, Some(&self.linear.bias), false, &mut plan.logits);
        plan.forward_done = true;
        Ok(())
    }

    /// Gradient, with respect to the last forward's input, of
    /// `sum(dlogits * logits) + sum(dfeatures * features)`; either term may be absent.
    pub fn input_vjp<'p>(
        &self,
        b: &B,
        plan: &'p mut ClassifierPlan<B>,
        dlogits: Option<&B::Tensor>,
        dfeatures: Option<&B::Tensor>,
    ) -> Result<&'p B::Tensor> {
        let (Some(dinput), Some(dnormalised), Some(dstem_pre)) =
            (&mut plan.dinput, &mut plan.dnormalised, &mut plan.dstem_pre)
        else {
            return Err(Error::invalid("this classifier plan was made without backward buffers"));
        };
        if !plan.forward_done {
            return Err(Error::invalid("classifier input_vjp needs a forward on the same plan first"));
        }
        // Every backward op accumulates: start from zero.
        for t in plan.doutputs.iter_mut().chain([&mut *dinput, &mut *dnormalised, &mut *dstem_pre]) {
            b.fill(t, 0.0);
        }
        match dfeatures {
            Some(d) => b.copy(d, &mut plan.dfeatures),
            None => b.fill(&mut plan.dfeatures, 0.0),
        }
        if let Some(d) = dlogits {
            b.linear_backward(&plan.features, &self.linear.weight, false, d, &mut plan.dfeatures);
        }
        b.global_avg_pool_backward(&plan.dfeatures, plan.doutputs.last_mut().unwrap());
        for (k, (block, bufs)) in self.blocks.iter().zip(plan.blocks.iter_mut()).enumerate().rev() {
            let (head, tail) = plan.doutputs.split_at_mut(k + 1);
            let (dx, dout) = (&mut head[k], &tail[0]);
            let (Some(dsum), Some(dhidden), Some(dhidden_pre)) =
                (&mut bufs.dsum, &mut bufs.dhidden, &mut bufs.dhidden_pre)
            else {
                unreachable!("checked above")
            };
            for t in [&mut *dsum, &mut *dhidden, &mut *dhidden_pre] {
                b.fill(t, 0.0);
            }
            // out = relu(conv2(hidden) + shortcut(x)): through the ReLU, then to both branches.
            b.relu_backward(&plan.outputs[k + 1], dout, dsum);
            b.conv2d_backward_input(dsum, &block.conv2.weight, block.conv2.geometry, dhidden);
            b.relu_backward(&bufs.hidden, dhidden, dhidden_pre);
            b.conv2d_backward_input(dhidden_pre, &block.conv1.weight, block.conv1.geometry, dx);
            if block.shortcut_pad > 0 {
                b.shortcut_subsample_pad_backward(dsum, block.shortcut_pad, dx);
            } else {
                b.add_assign(dx, dsum);
            }
        }
        b.relu_backward(&plan.outputs[0], &plan.doutputs[0], dstem_pre);
        b.conv2d_backward_input(dstem_pre, &self.stem.weight, self.stem.geometry, dnormalised);
        b.channel_affine_backward(dnormalised, &input_affine().0, dinput);
        Ok(dinput)
    }
}

/// Per-block buffers: the hidden activation, the padded shortcut, and backward scratch.
struct BlockBuffers<B: Backend> {
    hidden: B::Tensor,
    shortcut: Option<B::Tensor>,
    dsum: Option<B::Tensor>,
    dhidden: Option<B::Tensor>,
    dhidden_pre: Option<B::Tensor>,
}

/// Every buffer of one batch size.
pub struct ClassifierPlan<B: Backend> {
    pub batch: usize,
    input: B::Tensor,
    normalised: B::Tensor,
    /// outputs[0] is the stem's, outputs[k + 1] block k's.
    outputs: Vec<B::Tensor>,
    blocks: Vec<BlockBuffers<B>>,
    /// The pooled penultimate features (N x 64) of the last forward.
    pub features: B::Tensor,
    /// The logits (N x 10) of the last forward.
    pub logits: B::Tensor,
    doutputs: Vec<B::Tensor>,
    dstem_pre: Option<B::Tensor>,
    dnormalised: Option<B::Tensor>,
    dinput: Option<B::Tensor>,
    dfeatures: B::Tensor,
    forward_done: bool,
}

/// Maps x in [-1, 1] to the published normalisation: p = (x + 1) / 2, then (p - mean) / std.
fn input_affine() -> ([f32; 3], [f32; 3]) {
    let scale = [0, 1, 2].map(|c| 0.5 / PIXEL_STD[c]);
    let shift = [0, 1, 2].map(|c| (0.5 - PIXEL_MEAN[c]) / PIXEL_STD[c]);
    (scale, shift)
}

/// Index of the largest value (the first one on ties): a row of logits' predicted class.
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// `log softmax(logits)[label]`, in f64.
pub fn log_softmax_at(logits: &[f32], label: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    logits[label] as f64 - log_sum
}
