//! The classifiers: the CIFAR ResNets (He et al. 2016, depths 6n+2 with the "option A"
//! shortcut; ../shared/data/README.md) and RobustBench's WideResNets (Zagoruyko & Komodakis
//! 2016, depths 6n+4, pre-activation blocks; METHOD.md section 4): forward (logits and the pooled
//! penultimate features) and the vector-Jacobian product with respect to the input image.
//!
//! Batch-norm (eval mode) is an affine map per channel. Where it follows a convolution it is
//! folded into that convolution's weight and bias at load time (conv-bn-ReLU becomes one fused
//! conv); where it comes first (the WideResNet's pre-activation) it stays a channel affine.
//! The classifier takes images in the engine's range [-1, 1] and applies the input
//! normalisation of the published weights itself.
use crate::backend::GradientStore::{Add, Write};
use crate::backend::{range, Backend, Conv2dGeometry, ConvEpilogue, GradientStore, LayerInput, TensorShape};
use crate::data::tensor_file::TensorFile;
use crate::error::{Error, Result};
use crate::model::params::{FileParams, Linear, ParamSource};

const BN_EPS: f64 = 1e-5;
/// Normalisation of the published CIFAR ResNet weights, for pixels in [0, 1].
const PIXEL_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const PIXEL_STD: [f32; 3] = [0.229, 0.224, 0.225];
const RESNET_WIDTHS: [usize; 3] = [16, 32, 64];

/// Eval-mode batch-norm `{bn}.*` as `x * scale + shift` per channel, on the host (for folding).
struct HostAffine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// A channel affine map in the backend (scale and shift as f32 tensors of C values).
struct ChannelAffine<B: Backend> {
    scale: B::Tensor,
    shift: B::Tensor,
}

impl<B: Backend> ChannelAffine<B> {
    fn upload(b: &B, host: &HostAffine) -> Result<Self> {
        let c = host.scale.len();
        Ok(Self { scale: b.upload(&host.scale, &[c])?, shift: b.upload(&host.shift, &[c])? })
    }
    fn load(src: &mut impl ParamSource<B>, bn: &str, channels: usize) -> Result<Self> {
        let host = HostAffine::load(src, bn, channels)?;
        Self::upload(src.backend(), &host)
    }
}

impl HostAffine {
    fn load<B: Backend>(src: &mut impl ParamSource<B>, bn: &str, channels: usize) -> Result<Self> {
        let gamma = src.host(&format!("{bn}.weight"), &[channels])?;
        let beta = src.host(&format!("{bn}.bias"), &[channels])?;
        let mean = src.host(&format!("{bn}.running_mean"), &[channels])?;
        let var = src.host(&format!("{bn}.running_var"), &[channels])?;
        if let Some(o) = var.iter().position(|&v| v < 0.0) {
            return Err(Error::invalid(format!("`{bn}.running_var` is negative at channel {o}")));
        }
        let scale: Vec<f64> = (0..channels).map(|o| gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt()).collect();
        Ok(Self {
            shift: (0..channels).map(|o| (beta[o] as f64 - mean[o] as f64 * scale[o]) as f32).collect(),
            scale: scale.into_iter().map(|s| s as f32).collect(),
        })
    }
}

/// A convolution without bias, or with a following batch-norm folded in (and then a ReLU).
struct Conv<B: Backend> {
    weight: B::Tensor,
    bias: Option<B::Tensor>,
    geometry: Conv2dGeometry,
    relu: bool,
}

impl<B: Backend> Conv<B> {
    /// `{conv}.weight` (k x k, no bias) as it is.
    fn plain(
        src: &mut impl ParamSource<B>,
        conv: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = src.activation_tensor(&format!("{conv}.weight"), &[cout, cin, k, k])?;
        Ok(Self { weight, bias: None, geometry: Conv2dGeometry::strided(stride, k / 2), relu: false })
    }

    /// `relu(bn(conv(x)))` as one conv: `{conv}.weight` (3x3, no bias) with `{bn}.*` folded in,
    /// `bn(conv(x)) = conv(x) * g / sqrt(var + eps) + (beta - mean * g / sqrt(var + eps))`.
    fn folded(
        src: &mut impl ParamSource<B>,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> Result<Self> {
        let mut w = src.host(&format!("{conv}.weight"), &[cout, cin, 3, 3])?;
        let bn = HostAffine::load(src, bn, cout)?;
        for o in 0..cout {
            for v in &mut w[o * cin * 9..(o + 1) * cin * 9] {
                *v *= bn.scale[o];
            }
        }
        let b = src.backend();
        Ok(Self {
            weight: b.upload_as(&w, &[cout, cin, 3, 3], b.precision())?,
            bias: Some(b.upload(&bn.shift, &[cout])?),
            geometry: Conv2dGeometry::strided(stride, 1),
            relu: true,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor, residual: Option<&B::Tensor>, out: &mut B::Tensor) {
        let epilogue = ConvEpilogue { residual, relu: self.relu, ..Default::default() };
        b.conv2d(LayerInput::one(x), &self.weight, self.bias.as_ref(), self.geometry, epilogue, out);
    }

    fn backward_input(&self, b: &B, dout: &B::Tensor, dx: &mut B::Tensor, store: GradientStore) {
        b.conv2d_backward_input(dout, &self.weight, self.geometry, dx, store);
    }
}

enum Block<B: Backend> {
    /// CIFAR ResNet: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), the shortcut subsampled
    /// and zero-padded ("option A") when the shape changes.
    Basic { conv1: Conv<B>, conv2: Conv<B>, shortcut_pad: usize },
    /// WideResNet (pre-activation): a = relu(bn1(x)); conv2(relu(bn2(conv1(a)))) + shortcut,
    /// the shortcut x itself, or a 1x1 conv of a when the shape changes.
    PreAct { bn1: ChannelAffine<B>, conv1: Conv<B>, conv2: Conv<B>, shortcut: Option<Conv<B>> },
}

/// A residual block and its shape: channels in and out, stride.
struct Residual<B: Backend> {
    kind: Block<B>,
    in_channels: usize,
    out_channels: usize,
    stride: usize,
}

pub struct Classifier<B: Backend> {
    /// "ResNet-20", "WRN-28-10".
    pub name: String,
    pub depth: usize,
    /// x in [-1, 1] -> the network's input, per channel.
    input: ChannelAffine<B>,
    stem: Conv<B>,
    blocks: Vec<Residual<B>>,
    /// The WideResNet's final bn-ReLU before pooling.
    head: Option<ChannelAffine<B>>,
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
        let stem = Conv::folded(src, "conv1", "bn1", 3, RESNET_WIDTHS[0], 1)?;
        let mut blocks = Vec::new();
        let mut cin = RESNET_WIDTHS[0];
        for (stage, &cout) in RESNET_WIDTHS.iter().enumerate() {
            for k in 0..n {
                let stride = if stage > 0 && k == 0 { 2 } else { 1 };
                let name = format!("layer{}.{k}", stage + 1);
                let kind = Block::Basic {
                    conv1: Conv::folded(src, &format!("{name}.conv1"), &format!("{name}.bn1"), cin, cout, stride)?,
                    conv2: Conv::folded(src, &format!("{name}.conv2"), &format!("{name}.bn2"), cout, cout, 1)?,
                    shortcut_pad: if stride != 1 || cin != cout { cout / 4 } else { 0 },
                };
                blocks.push(Residual { kind, in_channels: cin, out_channels: cout, stride });
                cin = cout;
            }
        }
        let linear = Linear::load(src, "linear", cin, 10)?;
        // p = (x + 1) / 2, then (p - mean) / std.
        let input = HostAffine {
            scale: (0..3).map(|c| 0.5 / PIXEL_STD[c]).collect(),
            shift: (0..3).map(|c| (0.5 - PIXEL_MEAN[c]) / PIXEL_STD[c]).collect(),
        };
        let input = ChannelAffine::upload(src.backend(), &input)?;
        let name = format!("ResNet-{depth}");
        Ok(Self { name, depth, input, stem, blocks, head: None, num_classes: linear.out_features, linear })
    }

    /// Builds WideResNet-`depth`-`widen` (depth 6n + 4) in RobustBench's layout and naming
    /// (`conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`);
    /// pixels in [0, 1] without normalisation, as RobustBench's `Standard` model.
    pub fn load_wide(src: &mut impl ParamSource<B>, depth: usize, widen: usize) -> Result<Self> {
        if depth < 10 || !(depth - 4).is_multiple_of(6) || widen == 0 {
            return Err(Error::invalid(format!(
                "WideResNet depth must be 6n + 4 (16, 28, 40) and width at least 1, got {depth}-{widen}"
            )));
        }
        let n = (depth - 4) / 6;
        let stem = Conv::plain(src, "conv1", 3, 16, 3, 1)?;
        let mut blocks = Vec::new();
        let mut cin = 16;
        for (stage, cout) in [16 * widen, 32 * widen, 64 * widen].into_iter().enumerate() {
            for k in 0..n {
                let stride = if stage > 0 && k == 0 { 2 } else { 1 };
                let name = format!("block{}.layer.{k}", stage + 1);
                let kind = Block::PreAct {
                    bn1: ChannelAffine::load(src, &format!("{name}.bn1"), cin)?,
                    conv1: Conv::folded(src, &format!("{name}.conv1"), &format!("{name}.bn2"), cin, cout, stride)?,
                    conv2: Conv::plain(src, &format!("{name}.conv2"), cout, cout, 3, 1)?,
                    shortcut: if cin != cout {
                        Some(Conv::plain(src, &format!("{name}.convShortcut"), cin, cout, 1, stride)?)
                    } else {
                        None
                    },
                };
                blocks.push(Residual { kind, in_channels: cin, out_channels: cout, stride });
                cin = cout;
            }
        }
        let head = Some(ChannelAffine::load(src, "bn1", cin)?);
        let linear = Linear::load(src, "fc", cin, 10)?;
        let input = HostAffine { scale: vec![0.5; 3], shift: vec![0.5; 3] }; // p = (x + 1) / 2
        let input = ChannelAffine::upload(src.backend(), &input)?;
        let name = format!("WRN-{depth}-{widen}");
        Ok(Self { name, depth, input, stem, blocks, head, num_classes: linear.out_features, linear })
    }

    /// Loads a classifier from a safetensors file of either published naming (CIFAR ResNet:
    /// `layer1.0.conv1.weight`, ...; WideResNet: `block1.layer.0.conv1.weight`, ...), inferring
    /// depth and width from the tensors. Unused tensors (other than batch-norm counters) are an
    /// error: they mean the file is not this network.
    pub fn load(backend: &B, file: &TensorFile) -> Result<Self> {
        let count = |pattern: &dyn Fn(usize) -> String| (0..).take_while(|&k| file.contains(&pattern(k))).count();
        let resnet_blocks = count(&|k| format!("layer1.{k}.conv1.weight"));
        let wide_blocks = count(&|k| format!("block1.layer.{k}.conv1.weight"));
        let mut src = FileParams::new(backend, file).ignoring(&["num_batches_tracked"]);
        let net = if resnet_blocks > 0 {
            Self::load_with(&mut src, 6 * resnet_blocks + 2)?
        } else if wide_blocks > 0 {
            let widen = file.shape("block1.layer.0.conv1.weight")?[0] / 16;
            Self::load_wide(&mut src, 6 * wide_blocks + 4, widen)?
        } else {
            return Err(Error::UnknownConfig {
                file: file.file(),
                reason: "neither `layer1.0.conv1.weight` (CIFAR ResNet) nor `block1.layer.0.conv1.weight` \
                         (WideResNet): not a classifier this engine runs"
                    .into(),
            });
        };
        src.finish(&net.name)?;
        Ok(net)
    }

    /// (name, output C x H x W) of each layer in execution order, named as in the weights file:
    /// what `inspect --layers` prints.
    pub fn layers(&self) -> Vec<(String, [usize; 3])> {
        let wide = self.head.is_some();
        let stem_channels = self.blocks.first().map_or(16, |unit| unit.in_channels);
        let stem = if wide { "conv1 (3x3 stem)" } else { "conv1 + bn1 + relu (3x3 stem)" };
        let mut layers = vec![
            ("input (pixels normalised per channel)".to_string(), [3, 32, 32]),
            (stem.to_string(), [stem_channels, 32, 32]),
        ];
        let per_stage = (self.blocks.len() / 3).max(1);
        let mut side = 32;
        for (i, unit) in self.blocks.iter().enumerate() {
            side /= unit.stride;
            let (stage, k) = (i / per_stage + 1, i % per_stage);
            let (name, shortcut) = match &unit.kind {
                Block::Basic { shortcut_pad, .. } => (
                    format!("layer{stage}.{k}"),
                    if *shortcut_pad > 0 { "zero-padded shortcut" } else { "identity shortcut" },
                ),
                Block::PreAct { shortcut, .. } => (
                    format!("block{stage}.layer.{k}"),
                    if shortcut.is_some() { "1x1 conv shortcut" } else { "identity shortcut" },
                ),
            };
            let detail = format!("residual, stride {}, {shortcut}", unit.stride);
            layers.push((format!("{name} ({detail})"), [unit.out_channels, side, side]));
        }
        let features = self.feature_dim();
        if wide {
            layers.push(("bn1 + relu (head)".to_string(), [features, side, side]));
        }
        layers.push(("global average pool (features)".to_string(), [features, 1, 1]));
        let linear = if wide { "fc" } else { "linear" };
        layers.push((format!("{linear} (logits)"), [self.num_classes, 1, 1]));
        layers
    }

    /// Width of the pooled feature vector (the penultimate layer).
    pub fn feature_dim(&self) -> usize {
        self.blocks.last().map_or(16, |unit| unit.out_channels)
    }

    pub fn plan(&self, backend: &B, batch: usize, with_backward: bool) -> Result<ClassifierPlan<B>> {
        if batch == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        // Activations in the backend's precision; gradients, features and logits in f32.
        let act = |shape: &[usize]| backend.zeros_as(shape, backend.precision());
        let zeros = |shape: &[usize]| backend.zeros(shape);
        let grad = |shape: &[usize]| {
            if with_backward {
                backend.zeros(shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let input_shape = [batch, 3, 32, 32];
        let stem_shape = [batch, 16, 32, 32];
        let mut outputs = vec![act(&stem_shape)?];
        let mut blocks = Vec::new();
        let mut res = 32;
        for unit in &self.blocks {
            let in_shape = [batch, unit.in_channels, res, res];
            res /= unit.stride;
            let shape = [batch, unit.out_channels, res, res];
            outputs.push(act(&shape)?);
            let (pre_act, conv_shortcut) = match &unit.kind {
                Block::Basic { shortcut_pad, .. } => (false, *shortcut_pad > 0),
                Block::PreAct { shortcut, .. } => (true, shortcut.is_some()),
            };
            blocks.push(BlockBuffers {
                hidden: act(&shape)?,
                shortcut: if conv_shortcut { Some(act(&shape)?) } else { None },
                activated: if pre_act { Some(act(&in_shape)?) } else { None },
                dsum: grad(&shape)?,
                dhidden: grad(&shape)?,
                dhidden_pre: grad(&shape)?,
                dactivated: if pre_act { grad(&in_shape)? } else { None },
                dactivated_pre: if pre_act { grad(&in_shape)? } else { None },
            });
        }
        let last_shape = outputs.last().unwrap().shape().to_vec();
        let head = if self.head.is_some() { Some(act(&last_shape)?) } else { None };
        let dhead = if self.head.is_some() { grad(&last_shape)? } else { None };
        let dhead_pre = if self.head.is_some() { grad(&last_shape)? } else { None };
        let doutputs = if with_backward {
            outputs.iter().map(|t| zeros(t.shape())).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let f = self.feature_dim();
        Ok(ClassifierPlan {
            batch,
            normalised: act(&input_shape)?,
            outputs,
            blocks,
            head,
            dhead,
            dhead_pre,
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
        self.enqueue_forward(b, plan, x)?;
        b.synchronize()
    }

    /// `forward` without the closing `synchronize`: for the guidance inside the sampler loop,
    /// which synchronizes once when the purification ends.
    pub(crate) fn enqueue_forward(&self, b: &B, plan: &mut ClassifierPlan<B>, x: &B::Tensor) -> Result<()> {
        if x.shape() != plan.normalised.shape() {
            return Err(Error::invalid(format!(
                "classifier input has shape {:?}, the plan expects {:?}",
                x.shape(),
                plan.normalised.shape()
            )));
        }
        let _range = range(b, "classifier forward");
        b.channel_affine(x, &self.input.scale, &self.input.shift, &mut plan.normalised);
        self.stem.forward(b, &plan.normalised, None, &mut plan.outputs[0]);
        for (k, (unit, bufs)) in self.blocks.iter().zip(plan.blocks.iter_mut()).enumerate() {
            let (head, tail) = plan.outputs.split_at_mut(k + 1);
            let (x, out) = (&head[k], &mut tail[0]);
            match &unit.kind {
                Block::Basic { conv1, conv2, shortcut_pad } => {
                    conv1.forward(b, x, None, &mut bufs.hidden);
                    let residual = match &mut bufs.shortcut {
                        Some(s) => {
                            b.shortcut_subsample_pad(x, *shortcut_pad, s);
                            &*s
                        }
                        None => x,
                    };
                    conv2.forward(b, &bufs.hidden, Some(residual), out);
                }
                Block::PreAct { bn1, conv1, conv2, shortcut } => {
                    let activated = bufs.activated.as_mut().expect("made by plan");
                    b.channel_affine(x, &bn1.scale, &bn1.shift, activated);
                    b.relu(activated);
                    conv1.forward(b, activated, None, &mut bufs.hidden);
                    let residual = match (shortcut, &mut bufs.shortcut) {
                        (Some(conv), Some(s)) => {
                            conv.forward(b, activated, None, s);
                            &*s
                        }
                        _ => x,
                    };
                    conv2.forward(b, &bufs.hidden, Some(residual), out);
                }
            }
        }
        let last = plan.outputs.last().unwrap();
        match (&self.head, &mut plan.head) {
            (Some(bn), Some(h)) => {
                b.channel_affine(last, &bn.scale, &bn.shift, h);
                b.relu(h);
                b.global_avg_pool(h, &mut plan.features);
            }
            _ => b.global_avg_pool(last, &mut plan.features),
        }
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
        self.enqueue_input_vjp(b, plan, dlogits, dfeatures)?;
        b.synchronize()?;
        Ok(plan.dinput.as_ref().expect("checked by enqueue_input_vjp"))
    }

    /// The ReLU outputs of the plan's last forward: the tensors whose zeros mask the backward
    /// (`input_vjp`'s `relu_backward` inputs). A cross-backend check reads them to tell a ReLU
    /// kink (an input within rounding of 0, where the gradient is discontinuous and backends may
    /// rightly differ) from an error.
    pub fn relu_outputs<'p>(&self, plan: &'p ClassifierPlan<B>) -> Vec<&'p B::Tensor> {
        let mut outputs: Vec<&B::Tensor> = plan.head.iter().collect();
        for (k, (unit, bufs)) in self.blocks.iter().zip(&plan.blocks).enumerate() {
            match &unit.kind {
                Block::Basic { .. } => outputs.extend([&plan.outputs[k + 1], &bufs.hidden]),
                Block::PreAct { .. } => outputs.extend([&bufs.hidden].into_iter().chain(&bufs.activated)),
            }
        }
        if self.stem.relu {
            outputs.push(&plan.outputs[0]);
        }
        outputs
    }

    /// `input_vjp` without the closing `synchronize` (see `enqueue_forward`).
    pub(crate) fn enqueue_input_vjp<'p>(
        &self,
        b: &B,
        plan: &'p mut ClassifierPlan<B>,
        dlogits: Option<&B::Tensor>,
        dfeatures: Option<&B::Tensor>,
    ) -> Result<&'p B::Tensor> {
        let _range = range(b, "classifier input_vjp");
        let (Some(dinput), Some(dnormalised), Some(dstem_pre)) =
            (&mut plan.dinput, &mut plan.dnormalised, &mut plan.dstem_pre)
        else {
            return Err(Error::invalid("this classifier plan was made without backward buffers"));
        };
        if !plan.forward_done {
            return Err(Error::invalid("classifier input_vjp needs a forward on the same plan first"));
        }
        // Each gradient is written by the first op to reach it (no zeroing pass); `Add` only where
        // two meet: the features' two terms, a residual's shortcut and its branch.
        match (dfeatures, dlogits) {
            (Some(d), _) => b.copy(d, &mut plan.dfeatures),
            (None, None) => b.fill(&mut plan.dfeatures, 0.0),
            (None, Some(_)) => {}
        }
        if let Some(d) = dlogits {
            let store = if dfeatures.is_some() { Add } else { Write };
            b.linear_backward(&plan.features, &self.linear.weight, false, d, &mut plan.dfeatures, store);
        }
        let dlast = plan.doutputs.last_mut().unwrap();
        match (&self.head, &plan.head, &mut plan.dhead, &mut plan.dhead_pre) {
            (Some(bn), Some(h), Some(dh), Some(dh_pre)) => {
                b.global_avg_pool_backward(&plan.dfeatures, dh, Write);
                b.relu_backward(h, dh, dh_pre, Write);
                b.channel_affine_backward(dh_pre, &bn.scale, dlast, Write);
            }
            _ => b.global_avg_pool_backward(&plan.dfeatures, dlast, Write),
        }
        for (k, (unit, bufs)) in self.blocks.iter().zip(plan.blocks.iter_mut()).enumerate().rev() {
            let (head, tail) = plan.doutputs.split_at_mut(k + 1);
            let (dx, dout) = (&mut head[k], &tail[0]);
            let (Some(dsum), Some(dhidden), Some(dhidden_pre)) =
                (&mut bufs.dsum, &mut bufs.dhidden, &mut bufs.dhidden_pre)
            else {
                unreachable!("checked above")
            };
            match &unit.kind {
                Block::Basic { conv1, conv2, shortcut_pad } => {
                    // out = relu(conv2(hidden) + shortcut(x)): through the ReLU, then to both branches.
                    b.relu_backward(&plan.outputs[k + 1], dout, dsum, Write);
                    conv2.backward_input(b, dsum, dhidden, Write);
                    b.relu_backward(&bufs.hidden, dhidden, dhidden_pre, Write);
                    conv1.backward_input(b, dhidden_pre, dx, Write);
                    if *shortcut_pad > 0 {
                        b.shortcut_subsample_pad_backward(dsum, *shortcut_pad, dx, Add);
                    } else {
                        b.add_assign(dx, dsum);
                    }
                }
                Block::PreAct { bn1, conv1, conv2, shortcut } => {
                    // out = conv2(hidden) + shortcut, hidden = relu(conv1'(a)), a = relu(bn1(x)).
                    let (Some(activated), Some(dact), Some(dact_pre)) =
                        (&bufs.activated, &mut bufs.dactivated, &mut bufs.dactivated_pre)
                    else {
                        unreachable!("made by plan")
                    };
                    conv2.backward_input(b, dout, dhidden, Write);
                    b.relu_backward(&bufs.hidden, dhidden, dhidden_pre, Write);
                    conv1.backward_input(b, dhidden_pre, dact, Write);
                    if let Some(conv) = shortcut {
                        conv.backward_input(b, dout, dact, Add);
                    }
                    b.relu_backward(activated, dact, dact_pre, Write);
                    b.channel_affine_backward(dact_pre, &bn1.scale, dx, Write);
                    if shortcut.is_none() {
                        b.add_assign(dx, dout);
                    }
                }
            }
        }
        if self.stem.relu {
            b.relu_backward(&plan.outputs[0], &plan.doutputs[0], dstem_pre, Write);
            self.stem.backward_input(b, dstem_pre, dnormalised, Write);
        } else {
            self.stem.backward_input(b, &plan.doutputs[0], dnormalised, Write);
        }
        b.channel_affine_backward(dnormalised, &self.input.scale, dinput, Write);
        Ok(dinput)
    }
}

/// Per-block buffers: the hidden activation, the shortcut's own output, the pre-activation
/// (WideResNet), and backward scratch.
struct BlockBuffers<B: Backend> {
    hidden: B::Tensor,
    shortcut: Option<B::Tensor>,
    activated: Option<B::Tensor>,
    dsum: Option<B::Tensor>,
    dhidden: Option<B::Tensor>,
    dhidden_pre: Option<B::Tensor>,
    dactivated: Option<B::Tensor>,
    dactivated_pre: Option<B::Tensor>,
}

/// Every buffer of one batch size.
pub struct ClassifierPlan<B: Backend> {
    pub batch: usize,
    /// The input after the network's per-channel normalisation (the backward needs no copy of the
    /// input itself).
    normalised: B::Tensor,
    /// outputs[0] is the stem's, outputs[k + 1] block k's.
    outputs: Vec<B::Tensor>,
    blocks: Vec<BlockBuffers<B>>,
    /// The WideResNet's final bn-ReLU output, and its gradients.
    head: Option<B::Tensor>,
    dhead: Option<B::Tensor>,
    dhead_pre: Option<B::Tensor>,
    /// The pooled penultimate features (N x F) of the last forward.
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
