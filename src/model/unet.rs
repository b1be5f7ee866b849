//! The DDPM noise predictor `eps_theta(x, t)` (METHOD.md section 1), forward and the
//! vector-Jacobian product with respect to the input image, over any backend.
//!
//! The network is a flat list of nodes in execution order, each reading earlier activations and
//! writing one new one, so the forward is a loop over the list and the backward the same loop
//! reversed. All buffers live in a `UnetPlan` made once per batch size.
use crate::backend::{
    range, AttentionScratch, Backend, Conv2dGeometry, ConvEpilogue, GradientStore, LayerGradient, LayerInput,
    Precision, TensorShape,
};
use crate::data::tensor_file::TensorFile;
use crate::error::{Error, Result};
use crate::model::config::UnetConfig;
use crate::model::params::{Conv, FileParams, GroupNorm, Linear, ParamSource, UpsampleConv};

const NORM_GROUPS: usize = 32;
const NORM_EPS: f32 = 1e-6;

/// ResnetBlock(in, out): `out = shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + temb_proj(SiLU(temb)))))`.
pub struct ResnetBlock<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv<B>,
    /// The first of this block's C_out columns in `Unet::temb_proj` (its `temb_proj` there).
    temb_column: usize,
    norm2: GroupNorm<B>,
    conv2: Conv<B>,
    nin_shortcut: Option<Conv<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    fn load(
        src: &mut impl ParamSource<B>,
        name: &str,
        cin: usize,
        cout: usize,
        projections: &mut TembProjections,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(src, &format!("{name}.norm1"), cin, NORM_GROUPS, NORM_EPS)?,
            conv1: Conv::load(src, &format!("{name}.conv1"), cin, cout, 3, Conv2dGeometry::same(1))?,
            temb_column: projections.load(src, &format!("{name}.temb_proj"), cout)?,
            norm2: GroupNorm::load(src, &format!("{name}.norm2"), cout, NORM_GROUPS, NORM_EPS)?,
            conv2: Conv::load(src, &format!("{name}.conv2"), cout, cout, 3, Conv2dGeometry::same(1))?,
            nin_shortcut: if cin != cout {
                Some(Conv::load(src, &format!("{name}.nin_shortcut"), cin, cout, 1, Conv2dGeometry::same(0))?)
            } else {
                None
            },
        })
    }
}

/// Every ResnetBlock's `temb_proj` (a Linear from the time embedding to its C_out channels), its
/// rows appended as the blocks load: one Linear of all of them, so that a forward computes every
/// block's time-embedding bias in one launch instead of one a block (24 in cifar10's UNet, each
/// a graph node of a few microseconds at batch 1); block b reads its columns of the output.
struct TembProjections {
    inputs: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl TembProjections {
    /// Appends `name`'s weight (outputs x inputs) and bias; returns its first output column.
    fn load<B: Backend>(&mut self, src: &mut impl ParamSource<B>, name: &str, outputs: usize) -> Result<usize> {
        let column = self.bias.len();
        self.weight.extend(src.host(&format!("{name}.weight"), &[outputs, self.inputs])?);
        self.bias.extend(src.host(&format!("{name}.bias"), &[outputs])?);
        Ok(column)
    }

    fn upload<B: Backend>(self, backend: &B) -> Result<Linear<B>> {
        let outputs = self.bias.len();
        Ok(Linear {
            weight: backend.upload(&self.weight, &[outputs, self.inputs])?,
            bias: backend.upload(&self.bias, &[outputs])?,
            out_features: outputs,
        })
    }
}

/// AttnBlock(C): `out = x + proj_out(attention(q(h), k(h), v(h)))`, `h = norm(x)`. The q, k and v
/// projections (1x1, C -> C each) are one convolution C -> 3C, its output channels q's, k's, v's.
pub struct AttnBlock<B: Backend> {
    norm: GroupNorm<B>,
    qkv: Conv<B>,
    proj_out: Conv<B>,
}

impl<B: Backend> AttnBlock<B> {
    fn load(src: &mut impl ParamSource<B>, name: &str, c: usize) -> Result<Self> {
        let one = Conv2dGeometry::same(0);
        Ok(Self {
            norm: GroupNorm::load(src, &format!("{name}.norm"), c, NORM_GROUPS, NORM_EPS)?,
            qkv: Conv::load_stacked(src, &["q", "k", "v"].map(|p| format!("{name}.{p}")), c, c, 1, one)?,
            proj_out: Conv::load(src, &format!("{name}.proj_out"), c, c, 1, one)?,
        })
    }
}

/// One step of the network, with the indices of the activations it reads and writes.
enum Layer<B: Backend> {
    ConvIn(Conv<B>),
    /// A ResnetBlock; on the up path it reads `concat(h, skip)`.
    Resnet(ResnetBlock<B>),
    Attn(AttnBlock<B>),
    Downsample(Conv<B>),
    Upsample(UpsampleConv<B>),
    /// `conv_out(SiLU(norm_out(h)))`.
    Out {
        norm: GroupNorm<B>,
        conv: Conv<B>,
    },
}

impl<B: Backend> Layer<B> {
    /// The layer's name in profiler ranges.
    fn name(&self) -> &'static str {
        match self {
            Layer::ConvIn(_) => "conv_in",
            Layer::Resnet(_) => "resnet_block",
            Layer::Attn(_) => "attn_block",
            Layer::Downsample(_) => "downsample",
            Layer::Upsample(_) => "upsample",
            Layer::Out { .. } => "out",
        }
    }
}

struct Node<B: Backend> {
    name: String,
    layer: Layer<B>,
    /// Activation indices read: one, or (h, skip) for up-path ResnetBlocks.
    inputs: Vec<usize>,
    /// Shape (C, H, W) of the output activation, whose index is the node's index + 1.
    output: [usize; 3],
}

/// The node list while it is built. Activation 0 is the input image; node i writes activation
/// i + 1, so `push` returns the index of the activation the new node writes.
struct NodeList<B: Backend> {
    nodes: Vec<Node<B>>,
    projections: TembProjections,
}

impl<B: Backend> NodeList<B> {
    fn push(&mut self, name: String, layer: Layer<B>, inputs: Vec<usize>, output: [usize; 3]) -> usize {
        self.nodes.push(Node { name, layer, inputs, output });
        self.nodes.len()
    }

    /// A ResnetBlock reading one activation, or the channel concat of (h, skip) on the up path.
    fn resnet(
        &mut self,
        src: &mut impl ParamSource<B>,
        name: String,
        inputs: &[(usize, usize)],
        cout: usize,
        res: usize,
    ) -> Result<usize> {
        let cin = inputs.iter().map(|(_, c)| c).sum();
        let block = ResnetBlock::load(src, &name, cin, cout, &mut self.projections)?;
        Ok(self.push(name, Layer::Resnet(block), inputs.iter().map(|(i, _)| *i).collect(), [cout, res, res]))
    }

    fn attn(&mut self, src: &mut impl ParamSource<B>, name: String, h: usize, c: usize, res: usize) -> Result<usize> {
        let block = AttnBlock::load(src, &name, c)?;
        Ok(self.push(name, Layer::Attn(block), vec![h], [c, res, res]))
    }
}

pub struct Unet<B: Backend> {
    pub config: UnetConfig,
    temb_dense0: Linear<B>,
    temb_dense1: Linear<B>,
    /// Every ResnetBlock's temb_proj (`TembProjections`).
    temb_proj: Linear<B>,
    nodes: Vec<Node<B>>,
}

impl<B: Backend> Unet<B> {
    /// Builds the network by walking METHOD.md's layout once, asking `src` for each parameter.
    pub fn load(config: &UnetConfig, src: &mut impl ParamSource<B>) -> Result<Self> {
        let ch = config.channels;
        let temb = config.temb_channels();
        if !ch.is_multiple_of(NORM_GROUPS) {
            return Err(Error::invalid(format!(
                "UNet width {ch} is not a multiple of the {NORM_GROUPS} GroupNorm groups"
            )));
        }
        let temb_dense0 = Linear::load(src, "temb.dense.0", ch, temb)?;
        let temb_dense1 = Linear::load(src, "temb.dense.1", temb, temb)?;

        let projections = TembProjections { inputs: temb, weight: Vec::new(), bias: Vec::new() };
        let mut net = NodeList { nodes: Vec::new(), projections };
        let mut res = config.resolution;
        let conv_in = Conv::load(src, "conv_in", 3, ch, 3, Conv2dGeometry::same(1))?;
        let mut h = net.push("conv_in".into(), Layer::ConvIn(conv_in), vec![0], [ch, res, res]);
        let mut c = ch;
        let mut skips = vec![(h, c)];
        let levels = config.channel_mult.len();
        for (level, mult) in config.channel_mult.iter().enumerate() {
            for j in 0..config.res_blocks {
                h = net.resnet(src, format!("down.{level}.block.{j}"), &[(h, c)], ch * mult, res)?;
                c = ch * mult;
                if config.attention_resolutions.contains(&res) {
                    h = net.attn(src, format!("down.{level}.attn.{j}"), h, c, res)?;
                }
                skips.push((h, c));
            }
            if level + 1 != levels {
                // Zero-pad right and bottom by one, then a 3x3 stride-2 convolution.
                let geometry = Conv2dGeometry { stride: 2, pad_top: 0, pad_left: 0, pad_bottom: 1, pad_right: 1 };
                let name = format!("down.{level}.downsample.conv");
                let conv = Conv::load(src, &name, c, c, 3, geometry)?;
                res /= 2;
                h = net.push(name, Layer::Downsample(conv), vec![h], [c, res, res]);
                skips.push((h, c));
            }
        }
        h = net.resnet(src, "mid.block_1".into(), &[(h, c)], c, res)?;
        h = net.attn(src, "mid.attn_1".into(), h, c, res)?;
        h = net.resnet(src, "mid.block_2".into(), &[(h, c)], c, res)?;
        for (level, mult) in config.channel_mult.iter().enumerate().rev() {
            for j in 0..=config.res_blocks {
                let skip = skips.pop().expect("the down path pushes one skip per up block");
                h = net.resnet(src, format!("up.{level}.block.{j}"), &[(h, c), skip], ch * mult, res)?;
                c = ch * mult;
                if config.attention_resolutions.contains(&res) {
                    h = net.attn(src, format!("up.{level}.attn.{j}"), h, c, res)?;
                }
            }
            if level != 0 {
                let name = format!("up.{level}.upsample.conv");
                let conv = UpsampleConv::load(src, &name, c, c)?;
                res *= 2;
                h = net.push(name, Layer::Upsample(conv), vec![h], [c, res, res]);
            }
        }
        let norm = GroupNorm::load(src, "norm_out", c, NORM_GROUPS, NORM_EPS)?;
        let conv = Conv::load(src, "conv_out", c, 3, 3, Conv2dGeometry::same(1))?;
        net.push("out".into(), Layer::Out { norm, conv }, vec![h], [3, res, res]);
        let temb_proj = net.projections.upload(src.backend())?;
        let nodes = net.nodes;
        Ok(Self { config: config.clone(), temb_dense0, temb_dense1, temb_proj, nodes })
    }

    /// Loads a UNet from a safetensors file of the published naming, its config inferred from the
    /// tensors. Every parameter is checked (present, shape, finite) and extra tensors are refused.
    pub fn from_file(backend: &B, file: &TensorFile) -> Result<Self> {
        let config = UnetConfig::infer(file)?;
        let mut src = FileParams::new(backend, file);
        let unet = Self::load(&config, &mut src)?;
        src.finish(&format!("DDPM UNet, config {}", config.name))?;
        Ok(unet)
    }

    /// (name, output C x H x W) of each node in execution order: what `inspect --layers` prints.
    pub fn layers(&self) -> impl Iterator<Item = (&str, [usize; 3])> {
        self.nodes.iter().map(|n| (n.name.as_str(), n.output))
    }

    /// Allocates every buffer a forward (and, with `with_backward`, a VJP) at this batch size needs.
    /// Fails with `OutOfMemory`, before allocating, when the backend says the plan will not fit.
    pub fn plan(&self, backend: &B, batch: usize, with_backward: bool) -> Result<UnetPlan<B>> {
        if batch == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        if let (Some(available), true) = (backend.available_memory(), batch > 1) {
            // Every buffer scales with the batch: measure a batch of one.
            let needed = self.allocate_plan(backend, 1, with_backward)?.bytes(backend) * batch;
            if needed > available {
                let what = format!("the {} UNet plan for a batch of {batch}", self.config.name);
                return Err(Error::OutOfMemory { what, needed, available });
            }
        }
        self.allocate_plan(backend, batch, with_backward)
    }

    fn allocate_plan(&self, backend: &B, batch: usize, with_backward: bool) -> Result<UnetPlan<B>> {
        let r = self.config.resolution;
        let ch = self.config.channels;
        let temb = self.config.temb_channels();
        let mut activation_shapes = vec![[3, r, r]];
        activation_shapes.extend(self.nodes.iter().map(|n| n.output));
        let shape = |[c, h, w]: [usize; 3]| [batch, c, h, w];
        // Activations and saved intermediates in the backend's precision; the input x_t, the output
        // eps, gradients, statistics, log-sum-exp and the time embedding's small tensors in f32.
        let precision = backend.precision();
        let last = activation_shapes.len() - 1;
        let activations = activation_shapes
            .iter()
            .enumerate()
            .map(|(i, s)| backend.zeros_as(&shape(*s), if i == 0 || i == last { Precision::F32 } else { precision }))
            .collect::<Result<Vec<_>>>()?;
        let gradients = if with_backward {
            activation_shapes.iter().map(|s| backend.zeros(&shape(*s))).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        // In 16-bit plans, a copy in the activations' type of each gradient a GroupNorm's backward
        // finishes: node j's, where it reads activation j first (node j runs last in the backward
        // of all the nodes that read activation j, and its norm's backward is its one store into
        // that gradient). Node j - 1's convolutions read the copy as their dout: their 16-bit
        // operand path (cp.async) instead of staging f32 through registers, for a 2-byte store an
        // element in the norm's backward and no pass of its own. The bits are the same: the f32
        // path rounds dout once to the weights' type too.
        let finished_by_norm = |j: usize| {
            self.nodes.get(j).is_some_and(|node| {
                j > 0
                    && node.inputs[0] == j
                    && matches!(node.layer, Layer::Resnet(_) | Layer::Attn(_) | Layer::Out { .. })
            })
        };
        let gradient_copies = (0..activation_shapes.len())
            .map(|j| {
                let wanted = with_backward
                    && precision != Precision::F32
                    && finished_by_norm(j)
                    && crate::switches::gradient_copies();
                wanted.then(|| backend.zeros_as(&shape(activation_shapes[j]), precision)).transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut saved = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let input = activation_shapes[node.inputs[0]];
            let [_, h, w] = input;
            let input_channels: usize = node.inputs.iter().map(|&i| activation_shapes[i][0]).sum();
            let [cout, ..] = node.output;
            let t = |dims: &[usize]| backend.zeros_as(dims, precision);
            let stats = |_channels: usize| backend.zeros(&[batch, NORM_GROUPS, 2]);
            let mut bufs: NodeBuffers<B> = NodeBuffers::default();
            // The saved tensors whose gradients are stored in the activations' type (below).
            let mut narrow = Vec::new();
            match &node.layer {
                Layer::ConvIn(_) | Layer::Downsample(_) | Layer::Upsample(_) => {}
                Layer::Resnet(block) => {
                    bufs.push(t(&[batch, input_channels, h, w])?); // SiLU(norm1(x))
                    bufs.push(stats(input_channels)?);
                    narrow.push(bufs.0.len()); // written by norm2's backward, read by conv1's
                    bufs.push(t(&[batch, cout, h, w])?); // conv1 + temb
                    bufs.push(t(&[batch, cout, h, w])?); // SiLU(norm2(.))
                    bufs.push(stats(cout)?);
                    if block.nin_shortcut.is_some() {
                        bufs.push(t(&[batch, cout, h, w])?);
                    }
                }
                Layer::Attn(_) => {
                    bufs.push(t(&[batch, cout, h, w])?); // norm
                    bufs.push(t(&[batch, 3 * cout, h, w])?); // q, k, v
                    narrow.push(1); // dq, dk, dv: written by the attention's backward
                    bufs.push(t(&[batch, cout, h, w])?); // attention output
                    bufs.push(stats(cout)?);
                    bufs.push(backend.zeros(&[batch, h * w])?); // log-sum-exp
                }
                Layer::Out { .. } => {
                    bufs.push(t(&[batch, input[0], h, w])?);
                    bufs.push(stats(input[0])?);
                }
            }
            // One gradient per saved tensor, same index and shape (those of the stats go unused).
            // f32, except the `narrow` ones: in the activations' type. Each of those is written once,
            // by one op, and read only as the dout of a convolution's input gradient, which rounds
            // dout to the weights' type as it stages it: stored rounded, it gives the convolution the
            // same bits at half the dout traffic (and the vector cp.async path).
            let mut grads: NodeBuffers<B> = NodeBuffers::default();
            if with_backward {
                for (j, buffer) in bufs.0.iter().enumerate() {
                    let dtype = if narrow.contains(&j) { precision } else { Precision::F32 };
                    grads.push(backend.zeros_as(buffer.shape(), dtype)?);
                }
                match &node.layer {
                    Layer::Attn(_) if precision != Precision::F32 => {
                        // The attention backward's dout rounded to the activations' type (its scratch;
                        // f32 plans lend it the norm's gradient, free at that point: attn_backward).
                        grads.push(t(&[batch, cout, h, w])?);
                    }
                    Layer::Resnet(ResnetBlock { nin_shortcut: Some(_), .. }) => {
                        // The shortcut conv's input gradient, which norm1's backward adds as it
                        // stores the block's (resnet_backward).
                        grads.push(backend.zeros(&[batch, input_channels, h, w])?);
                    }
                    _ => {}
                }
            }
            saved.push((bufs, grads));
        }
        let t_steps = backend.zeros(&[batch])?;
        Ok(UnetPlan {
            batch,
            t_steps,
            temb_sinusoid: backend.zeros(&[batch, ch])?,
            temb_hidden: backend.zeros(&[batch, temb])?,
            temb: backend.zeros(&[batch, temb])?,
            temb_proj: backend.zeros(&[batch, self.temb_proj.out_features])?,
            activations,
            gradients,
            gradient_copies,
            saved,
            forward_done: false,
        })
    }

    /// `eps_theta(x, t)` for x (batch x 3 x H x W, in the plan's backend) and per-sample step
    /// indices `t` (0-based, as floats, from the host). The result stays in the plan
    /// (`UnetPlan::eps`).
    pub fn forward<'p>(&self, b: &B, plan: &'p mut UnetPlan<B>, x: &B::Tensor, t: &[f32]) -> Result<&'p B::Tensor> {
        if t.len() != plan.batch {
            return Err(Error::invalid(format!("{} step indices for a batch of {}", t.len(), plan.batch)));
        }
        b.write(&mut plan.t_steps, t)?;
        self.forward_steps(b, plan, x, None)?;
        b.synchronize()?;
        Ok(plan.eps())
    }

    /// `forward` with the step indices already in the backend (a tensor of `batch` floats): a
    /// sampler uploads them once per plan instead of once per step.
    pub fn forward_indexed<'p>(
        &self,
        b: &B,
        plan: &'p mut UnetPlan<B>,
        x: &B::Tensor,
        t: &B::Tensor,
    ) -> Result<&'p B::Tensor> {
        self.enqueue_forward_indexed(b, plan, x, t)?;
        b.synchronize()?;
        Ok(plan.eps())
    }

    /// `forward_indexed` without the closing `synchronize`: the sampler issues whole reverse
    /// steps this way and synchronizes once, when the purification ends (a wait per step would
    /// stall a GPU). Errors of the ops are reported by that synchronize.
    pub fn enqueue_forward_indexed<'p>(
        &self,
        b: &B,
        plan: &'p mut UnetPlan<B>,
        x: &B::Tensor,
        t: &B::Tensor,
    ) -> Result<&'p B::Tensor> {
        if t.shape() != plan.t_steps.shape() {
            return Err(Error::invalid(format!("step indices of shape {:?} for a batch of {}", t.shape(), plan.batch)));
        }
        self.forward_steps(b, plan, x, Some(t))
    }

    /// The forward from the step indices `t`, or the plan's own when `None`.
    fn forward_steps<'p>(
        &self,
        b: &B,
        plan: &'p mut UnetPlan<B>,
        x: &B::Tensor,
        t: Option<&B::Tensor>,
    ) -> Result<&'p B::Tensor> {
        if x.shape() != plan.activations[0].shape() {
            return Err(Error::invalid(format!(
                "UNet input has shape {:?}, the plan expects {:?}",
                x.shape(),
                plan.activations[0].shape()
            )));
        }
        let _range = range(b, "unet forward");
        b.timestep_embedding(t.unwrap_or(&plan.t_steps), &mut plan.temb_sinusoid);
        b.linear(
            &plan.temb_sinusoid,
            &self.temb_dense0.weight,
            Some(&self.temb_dense0.bias),
            false,
            &mut plan.temb_hidden,
        );
        b.linear(&plan.temb_hidden, &self.temb_dense1.weight, Some(&self.temb_dense1.bias), true, &mut plan.temb);
        // Every ResnetBlock's temb_proj(SiLU(temb)) at once.
        b.linear(&plan.temb, &self.temb_proj.weight, Some(&self.temb_proj.bias), true, &mut plan.temb_proj);
        b.copy(x, &mut plan.activations[0]);
        for (i, node) in self.nodes.iter().enumerate() {
            let _layer = range(b, node.layer.name());
            let (inputs, rest) = plan.activations.split_at_mut(i + 1);
            let out = &mut rest[0];
            let x = &inputs[node.inputs[0]];
            let saved = &mut plan.saved[i].0 .0;
            // The skip concat and the upsample are read in place (LayerInput, upsample_conv2d), never
            // written.
            match &node.layer {
                Layer::ConvIn(conv) | Layer::Downsample(conv) => {
                    conv_forward(b, conv, LayerInput::one(x), ConvEpilogue::default(), out)
                }
                Layer::Upsample(conv) => {
                    b.upsample_conv2d(x, &conv.weight, Some(&conv.bias), ConvEpilogue::default(), out)
                }
                Layer::Resnet(block) => match node.inputs.get(1) {
                    Some(&skip) => {
                        let input = LayerInput::concat(x, &inputs[skip]);
                        resnet_forward(b, block, input, &plan.temb_proj, saved, out)
                    }
                    None => resnet_forward(b, block, LayerInput::one(x), &plan.temb_proj, saved, out),
                },
                Layer::Attn(block) => attn_forward(b, block, x, saved, out),
                Layer::Out { norm, conv } => {
                    let (n, stats) = saved.split_at_mut(1);
                    let x = LayerInput::one(x);
                    b.group_norm(x, &norm.gamma, &norm.beta, norm.groups, norm.eps, true, &mut n[0], &mut stats[0]);
                    conv_forward(b, conv, LayerInput::one(&n[0]), ConvEpilogue::default(), out);
                }
            }
        }
        plan.forward_done = true;
        Ok(plan.eps())
    }

    /// The vector-Jacobian product `d(sum(eps * v)) / dx` for the input of the last `forward` on
    /// this plan: the UNet's backward pass with respect to its input image.
    pub fn input_vjp<'p>(&self, b: &B, plan: &'p mut UnetPlan<B>, v: &B::Tensor) -> Result<&'p B::Tensor> {
        self.enqueue_input_vjp(b, plan, v)?;
        b.synchronize()?;
        Ok(&plan.gradients[0])
    }

    /// `input_vjp` without the closing `synchronize` (see `enqueue_forward_indexed`).
    pub fn enqueue_input_vjp<'p>(&self, b: &B, plan: &'p mut UnetPlan<B>, v: &B::Tensor) -> Result<&'p B::Tensor> {
        if plan.gradients.is_empty() {
            return Err(Error::invalid("this UNet plan was made without backward buffers"));
        }
        if !plan.forward_done {
            return Err(Error::invalid("input_vjp needs a forward on the same plan first"));
        }
        if v.shape() != plan.eps().shape() {
            return Err(Error::invalid(format!(
                "VJP direction has shape {:?}, eps has {:?}",
                v.shape(),
                plan.eps().shape()
            )));
        }
        // No zeroing pass: the first backward op to reach a gradient writes it, the others add to it
        // (`GradientStore`). Every intermediate buffer of a node is written before it is read.
        let mut reached = Reached(vec![false; plan.gradients.len()]);
        b.copy(v, plan.gradients.last_mut().unwrap());
        reached.store_into(plan.gradients.len() - 1);
        let _range = range(b, "unet input_vjp");
        for (i, node) in self.nodes.iter().enumerate().rev() {
            let _layer = range(b, node.layer.name());
            // Every activation is some node's input, and its consumers come later: all have run.
            if !reached.0[i + 1] {
                return Err(Error::invalid(format!("unet input_vjp: node {i}'s output gradient was never computed")));
            }
            let mut store_into = |i| reached.store_into(i);
            let (dinputs, rest) = plan.gradients.split_at_mut(i + 1);
            let dout = &rest[0];
            let (copies_in, copies_out) = plan.gradient_copies.split_at_mut(i + 1);
            // dout as the convolutions read it: the copy node i + 1's norm left, where it did.
            let conv_dout = copies_out[0].as_ref().unwrap_or(dout);
            let x = &plan.activations[node.inputs[0]];
            let out = &plan.activations[i + 1];
            let (saved, dsaved) = &mut plan.saved[i];
            let (saved, dsaved) = (&saved.0, &mut dsaved.0);
            let input = node.inputs[0];
            // Where this node finishes its input's gradient and the plan keeps a copy of it.
            let copy = if input == i { copies_in[input].as_mut() } else { None };
            match &node.layer {
                Layer::ConvIn(conv) | Layer::Downsample(conv) => b.conv2d_backward_input(
                    conv_dout,
                    &conv.weight,
                    conv.geometry,
                    &mut dinputs[input],
                    store_into(input),
                ),
                Layer::Upsample(conv) => {
                    b.upsample_conv2d_backward_input(conv_dout, &conv.weight, &mut dinputs[input], store_into(input))
                }
                Layer::Resnet(block) => match node.inputs.get(1) {
                    // The forward read concat(h, skip) in place; so does the backward, and it stores
                    // the concat's gradient straight into h's and skip's.
                    Some(&skip) => {
                        let stores = [store_into(input), store_into(skip)];
                        let (dh, dskip) = two_mut(dinputs, input, skip);
                        let x = LayerInput::concat(x, &plan.activations[skip]);
                        let dx = LayerGradient::concat(dh, stores[0], dskip, stores[1]).copy_a_into(copy);
                        resnet_backward(b, block, x, saved, [dout, conv_dout], dsaved, dx);
                    }
                    None => {
                        let dx = LayerGradient::one(&mut dinputs[input], store_into(input)).copy_a_into(copy);
                        resnet_backward(b, block, LayerInput::one(x), saved, [dout, conv_dout], dsaved, dx);
                    }
                },
                Layer::Attn(block) => {
                    let dx = LayerGradient::one(&mut dinputs[input], store_into(input)).copy_a_into(copy);
                    attn_backward(b, block, x, out, saved, [dout, conv_dout], dsaved, dx)
                }
                Layer::Out { norm, conv } => {
                    let (dn, _) = dsaved.split_first_mut().unwrap();
                    b.conv2d_backward_input(dout, &conv.weight, conv.geometry, dn, GradientStore::Write);
                    b.group_norm_backward(
                        LayerInput::one(x),
                        &norm.gamma,
                        &norm.beta,
                        &saved[1],
                        norm.groups,
                        true,
                        dn,
                        LayerGradient::one(&mut dinputs[input], store_into(input)).copy_a_into(copy),
                    );
                }
            }
        }
        Ok(&plan.gradients[0])
    }
}

/// Every buffer of one batch size: activations (index 0 the input, i + 1 node i's output), their
/// gradients, and each node's saved intermediates with their gradients.
pub struct UnetPlan<B: Backend> {
    pub batch: usize,
    t_steps: B::Tensor,
    temb_sinusoid: B::Tensor,
    temb_hidden: B::Tensor,
    temb: B::Tensor,
    /// Every ResnetBlock's time-embedding bias (N x the blocks' channels, f32).
    temb_proj: B::Tensor,
    activations: Vec<B::Tensor>,
    gradients: Vec<B::Tensor>,
    /// Some gradients again, in the activations' type (16-bit plans: `allocate_plan` says which).
    gradient_copies: Vec<Option<B::Tensor>>,
    saved: Vec<(NodeBuffers<B>, NodeBuffers<B>)>,
    forward_done: bool,
}

impl<B: Backend> UnetPlan<B> {
    /// Memory held by the plan's tensors.
    pub fn bytes(&self, _backend: &B) -> usize {
        let saved = self.saved.iter().flat_map(|(s, g)| s.0.iter().chain(g.0.iter()));
        let all = [&self.t_steps, &self.temb_sinusoid, &self.temb_hidden, &self.temb, &self.temb_proj]
            .into_iter()
            .chain(&self.activations)
            .chain(&self.gradients)
            .chain(self.gradient_copies.iter().flatten())
            .chain(saved);
        all.map(|t| t.numel() * t.dtype().bytes()).sum::<usize>()
    }

    /// The last forward's output.
    pub fn eps(&self) -> &B::Tensor {
        self.activations.last().unwrap()
    }
    /// The time embedding of the last forward (N x 4ch).
    pub fn temb(&self) -> &B::Tensor {
        &self.temb
    }
}

struct NodeBuffers<B: Backend>(Vec<B::Tensor>);

impl<B: Backend> Default for NodeBuffers<B> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<B: Backend> NodeBuffers<B> {
    fn push(&mut self, t: B::Tensor) {
        self.0.push(t)
    }
}

/// Which activation gradients hold a value during a backward pass.
struct Reached(Vec<bool>);

impl Reached {
    /// How the next gradient to reach activation `i` is stored: written the first time, added after.
    fn store_into(&mut self, i: usize) -> GradientStore {
        let store = if self.0[i] { GradientStore::Add } else { GradientStore::Write };
        self.0[i] = true;
        store
    }
}

/// Two distinct mutable elements of a slice.
fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

fn conv_forward<B: Backend>(
    b: &B,
    conv: &Conv<B>,
    x: LayerInput<'_, B::Tensor>,
    epilogue: ConvEpilogue<'_, B::Tensor>,
    out: &mut B::Tensor,
) {
    b.conv2d(x, &conv.weight, Some(&conv.bias), conv.geometry, epilogue, out);
}

/// Saved layout: [n1, stats1, h1, n2, stats2, (shortcut)]. `temb_proj` holds every block's
/// time-embedding bias (`TembProjections`).
fn resnet_forward<B: Backend>(
    b: &B,
    block: &ResnetBlock<B>,
    x: LayerInput<'_, B::Tensor>,
    temb_proj: &B::Tensor,
    saved: &mut [B::Tensor],
    out: &mut B::Tensor,
) {
    let [n1, stats1, h1, n2, stats2, shortcut @ ..] = saved else {
        unreachable!("ResnetBlock buffers are laid out by Unet::plan")
    };
    b.group_norm(x, &block.norm1.gamma, &block.norm1.beta, block.norm1.groups, block.norm1.eps, true, n1, stats1);
    let epilogue =
        ConvEpilogue { channel_bias: Some(temb_proj), channel_bias_column: block.temb_column, ..Default::default() };
    conv_forward(b, &block.conv1, LayerInput::one(n1), epilogue, h1);
    b.group_norm(
        LayerInput::one(h1),
        &block.norm2.gamma,
        &block.norm2.beta,
        block.norm2.groups,
        block.norm2.eps,
        true,
        n2,
        stats2,
    );
    let residual = match (&block.nin_shortcut, shortcut.first_mut()) {
        (Some(nin), Some(s)) => {
            conv_forward(b, nin, x, ConvEpilogue::default(), s);
            &*s
        }
        _ => {
            assert!(x.b.is_none(), "a ResnetBlock reading a concat changes width, so it has a shortcut conv");
            x.a
        }
    };
    let epilogue = ConvEpilogue { residual: Some(residual), ..Default::default() };
    conv_forward(b, &block.conv2, LayerInput::one(n2), epilogue, out);
}

/// dx gets the block's input gradient as it says (split like x where x is a concat); the block's
/// own buffers are written. `[dout, conv_dout]`: the output's gradient, and the same as the
/// convolutions read it (`UnetPlan::gradient_copies`). Gradient layout: [dn1, -, dh1, dn2, -, (-,
/// the shortcut's input gradient)].
fn resnet_backward<B: Backend>(
    b: &B,
    block: &ResnetBlock<B>,
    x: LayerInput<'_, B::Tensor>,
    saved: &[B::Tensor],
    [dout, conv_dout]: [&B::Tensor; 2],
    dsaved: &mut [B::Tensor],
    dx: LayerGradient<'_, B::Tensor>,
) {
    use GradientStore::Write;
    let [_, stats1, h1, _, stats2, ..] = saved else { unreachable!() };
    let [dn1, _, dh1, dn2, _, shortcut @ ..] = dsaved else { unreachable!() };
    b.conv2d_backward_input(conv_dout, &block.conv2.weight, block.conv2.geometry, dn2, Write);
    let norm2 = &block.norm2;
    let dh1_store = LayerGradient::one(&mut *dh1, Write);
    b.group_norm_backward(LayerInput::one(h1), &norm2.gamma, &norm2.beta, stats2, norm2.groups, true, dn2, dh1_store);
    b.conv2d_backward_input(dh1, &block.conv1.weight, block.conv1.geometry, dn1, Write);
    // The shortcut's gradient meets the main path's as norm1's backward stores it.
    let dshortcut = match (&block.nin_shortcut, shortcut) {
        (Some(nin), [_, dshortcut]) => {
            b.conv2d_backward_input(conv_dout, &nin.weight, nin.geometry, dshortcut, Write);
            &*dshortcut
        }
        _ => dout,
    };
    let norm1 = &block.norm1;
    b.group_norm_backward(x, &norm1.gamma, &norm1.beta, stats1, norm1.groups, true, dn1, dx.plus(dshortcut));
}

/// Saved layout: [norm, qkv, attention, stats, logsumexp].
fn attn_forward<B: Backend>(b: &B, block: &AttnBlock<B>, x: &B::Tensor, saved: &mut [B::Tensor], out: &mut B::Tensor) {
    let [n, qkv, a, stats, lse] = saved else { unreachable!("AttnBlock buffers are laid out by Unet::plan") };
    let norm = &block.norm;
    b.group_norm(LayerInput::one(x), &norm.gamma, &norm.beta, norm.groups, norm.eps, false, n, stats);
    conv_forward(b, &block.qkv, LayerInput::one(n), ConvEpilogue::default(), qkv);
    b.attention(qkv, a, lse);
    let epilogue = ConvEpilogue { residual: Some(x), ..Default::default() };
    conv_forward(b, &block.proj_out, LayerInput::one(a), epilogue, out);
}

/// dx gets the block's input gradient as it says; the block's own buffers are written.
/// `[dout, conv_dout]` as resnet_backward's.
#[allow(clippy::too_many_arguments)]
fn attn_backward<B: Backend>(
    b: &B,
    block: &AttnBlock<B>,
    x: &B::Tensor,
    _out: &B::Tensor,
    saved: &[B::Tensor],
    [dout, conv_dout]: [&B::Tensor; 2],
    dsaved: &mut [B::Tensor],
    dx: LayerGradient<'_, B::Tensor>,
) {
    use GradientStore::Write;
    let [_, qkv, a, stats, lse] = saved else { unreachable!() };
    // The attention backward's scratch: the log-sum-exp's gradient slot (N x HW f32, otherwise
    // unused), and a buffer of the output's shape and type past the saved tensors' gradients in
    // 16-bit plans; in f32 plans the norm's gradient (that shape and type, written only after it).
    let [dn, dqkv, da, _, row_terms, rounded @ ..] = dsaved else { unreachable!() };
    b.conv2d_backward_input(conv_dout, &block.proj_out.weight, block.proj_out.geometry, da, Write);
    let dout_rounded = match rounded {
        [buffer] => buffer,
        _ => &mut *dn,
    };
    let scratch = AttentionScratch { row_terms, dout_rounded };
    b.attention_backward(qkv, a, lse, da, scratch, dqkv, Write);
    // One input gradient for q, k and v: K = 3C, dqkv against the stacked weights.
    b.conv2d_backward_input(dqkv, &block.qkv.weight, block.qkv.geometry, dn, Write);
    // The residual: dout reaches x unchanged, added as the norm's backward stores.
    let norm = &block.norm;
    b.group_norm_backward(LayerInput::one(x), &norm.gamma, &norm.beta, stats, norm.groups, false, dn, dx.plus(dout));
}
