//! The purification pipeline: diffuse the input to t*, then run guided reverse steps with the
//! gradient constraint (METHOD.md sections 2 and 3). Everything stays in the backend's memory
//! between the upload of the input and the download of the purified batch.
//!
//! It is also differentiable (METHOD.md section 5): a plan made by `plan_differentiable` records
//! each reverse step's input on a tape, and `input_vjp` back-propagates a gradient on the purified
//! images through every reverse step to the input images, recomputing one step's UNet
//! activations at a time from the tape. The guidance shift is a constant there (BPDA on the
//! guidance only), and so is the noise of the draw.
//!
//! Noise is keyed per image (src/backend/cpu/rng.rs): every draw names the image's index in the
//! whole input, so a purified image depends on the seed, the image and the settings only, not on
//! the batch it was purified in.
use crate::backend::{Backend, TensorShape, IMAGE_INDEX_LIMIT};
use crate::diffusion::{GradientPath, Guidance, ReverseStep, Sampler, Schedule};
use crate::error::{Error, Result};
use crate::model::classifier::{argmax, log_softmax_at};
use crate::model::{Classifier, ClassifierPlan, Unet, UnetPlan};

/// Everything that decides a purification except the images.
#[derive(Clone, Debug)]
pub struct PurifySettings {
    /// Diffusion level t* (1..T) the input is brought to.
    pub t_star: usize,
    pub sampler: Sampler,
    pub guidance: Guidance,
    /// Gradient constraint: `||delta|| <= kappa ||x_t - mu||` per sample (infinity: off).
    pub kappa: f32,
    /// Seed of all noise; an image's noise depends only on (seed, its index in the input, step,
    /// element), not on the batch or the backend.
    pub seed: u64,
}

impl Default for PurifySettings {
    fn default() -> Self {
        Self { t_star: 100, sampler: Sampler::Ddpm, guidance: Guidance::None, kappa: 0.5, seed: 0 }
    }
}

/// Per-step statistics, for people who watch what the guidance does.
#[derive(Clone, Debug, Default)]
pub struct PurifyReport {
    pub network_calls: usize,
    pub unet_vjps: usize,
    /// Wall time of each reverse step, in seconds. The CPU backend is synchronous, so these are
    /// compute times; an asynchronous backend must synchronise before they mean the same.
    pub step_seconds: Vec<f64>,
}

/// Buffers of one batch size: the UNet's plan and the sampler's own tensors.
pub struct PurifyPlan<B: Backend> {
    batch: usize,
    unet: UnetPlan<B>,
    auxiliary: Option<ClassifierPlan<B>>,
    x_in: B::Tensor,
    x_t: B::Tensor,
    x0_hat: B::Tensor,
    mu: B::Tensor,
    delta: B::Tensor,
    noise: B::Tensor,
    /// Each sample's index in the whole input (N), written with the input: it keys the noise.
    image_indices: B::Tensor,
    /// Scratch: the guidance objective's gradient with respect to the classifier input.
    u: B::Tensor,
    /// The x_t path's classifier input, x_t / sqrt(abar).
    aux_input: B::Tensor,
    reference_features: B::Tensor,
    labels: B::Tensor,
    dfeatures: B::Tensor,
    dlogits: B::Tensor,
    /// Per reverse step, the UNet's 0-based step index for every sample, uploaded once here so
    /// that no step sends anything from the host.
    step_indices: Vec<B::Tensor>,
    /// Differentiable plans only: what the last purification recorded, and the gradients.
    tape: Option<Tape<B>>,
}

/// What back-propagation through a purification needs: the input of every reverse step (the
/// UNet's activations are recomputed from it, one step at a time) and the output before the
/// final clamp; plus the running gradient and the gradient with respect to the input.
struct Tape<B: Backend> {
    states: Vec<B::Tensor>,
    unclamped_output: B::Tensor,
    recorded: bool,
    grad: B::Tensor,
    grad_scratch: B::Tensor,
    grad_input: B::Tensor,
}

/// Which noise a purification draws, besides the images' own indices: `seed`, and `draw`, which
/// separates the purifications of one image with one seed (an attack's EOT draws, the votes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseDraw {
    pub seed: u64,
    pub draw: u64,
}

impl NoiseDraw {
    /// The generator's stream of the noise added at `step` of this draw: 0 for the q-sample to
    /// t*, t for the reverse step t -> t-1; `stream = draw * (T + 1) + step`. Streams counted down
    /// from u64::MAX are left to the attacks' host-side draws (src/attack.rs).
    pub fn stream(&self, schedule: &Schedule, step: usize) -> u64 {
        self.draw * (schedule.num_steps() as u64 + 1) + step as u64
    }
}

/// A noise predictor plus, for the adversarial mode, the auxiliary robust classifier.
pub struct Purifier<'a, B: Backend> {
    pub backend: &'a B,
    pub unet: &'a Unet<B>,
    pub auxiliary: Option<&'a Classifier<B>>,
    pub schedule: Schedule,
    pub settings: PurifySettings,
    steps: Vec<ReverseStep>,
    /// Called after each reverse step (a progress display); none by default.
    step_observer: Option<Box<dyn Fn() + Send + Sync + 'a>>,
}

impl<'a, B: Backend> Purifier<'a, B> {
    pub fn new(
        backend: &'a B,
        unet: &'a Unet<B>,
        auxiliary: Option<&'a Classifier<B>>,
        settings: PurifySettings,
    ) -> Result<Self> {
        let schedule = Schedule::ddpm();
        settings.guidance.validate()?;
        if settings.kappa.is_nan() || settings.kappa < 0.0 {
            return Err(Error::invalid(format!(
                "kappa must be >= 0 (or inf to turn the constraint off), got {}",
                settings.kappa
            )));
        }
        if matches!(settings.guidance, Guidance::Adversarial { .. }) && auxiliary.is_none() {
            return Err(Error::invalid("the adversarial mode needs an auxiliary classifier (--auxiliary)"));
        }
        if unet.config.resolution != 32 {
            return Err(Error::invalid("only 32x32 UNets are supported"));
        }
        let steps = schedule.reverse_steps(settings.t_star, settings.sampler)?;
        Ok(Self { backend, unet, auxiliary, schedule, settings, steps, step_observer: None })
    }

    /// Calls `observer` after every reverse step of every purification from now on.
    pub fn observe_steps(&mut self, observer: impl Fn() + Send + Sync + 'a) {
        self.step_observer = Some(Box::new(observer));
    }

    /// The reverse steps this purifier runs.
    pub fn steps(&self) -> &[ReverseStep] {
        &self.steps
    }

    pub fn plan(&self, batch: usize) -> Result<PurifyPlan<B>> {
        self.make_plan(batch, false)
    }

    /// A plan that also records a tape, for `input_vjp`: the UNet's backward buffers, and one
    /// image batch per reverse step.
    pub fn plan_differentiable(&self, batch: usize) -> Result<PurifyPlan<B>> {
        self.make_plan(batch, true)
    }

    fn make_plan(&self, batch: usize, differentiable: bool) -> Result<PurifyPlan<B>> {
        let b = self.backend;
        let needs_unet_vjp =
            differentiable || matches!(self.settings.guidance, Guidance::Adversarial { path: GradientPath::X0, .. });
        let image = [batch, 3, 32, 32];
        let z = |s: &[usize]| b.zeros(s);
        let (fdim, classes) = self.auxiliary.map(|a| (a.feature_dim(), a.num_classes)).unwrap_or((1, 1));
        Ok(PurifyPlan {
            batch,
            unet: self.unet.plan(b, batch, needs_unet_vjp)?,
            auxiliary: match (&self.settings.guidance, self.auxiliary) {
                (Guidance::Adversarial { .. }, Some(a)) => Some(a.plan(b, batch, true)?),
                _ => None,
            },
            x_in: z(&image)?,
            x_t: z(&image)?,
            x0_hat: z(&image)?,
            mu: z(&image)?,
            delta: z(&image)?,
            noise: z(&image)?,
            image_indices: z(&[batch])?,
            u: z(&image)?,
            aux_input: z(&image)?,
            reference_features: z(&[batch, fdim])?,
            labels: z(&[batch])?,
            dfeatures: z(&[batch, fdim])?,
            dlogits: z(&[batch, classes])?,
            step_indices: self
                .steps
                .iter()
                .map(|step| b.upload(&vec![(step.t - 1) as f32; batch], &[batch]))
                .collect::<Result<_>>()?,
            tape: if differentiable {
                Some(Tape {
                    states: self.steps.iter().map(|_| z(&image)).collect::<Result<_>>()?,
                    unclamped_output: z(&image)?,
                    recorded: false,
                    grad: z(&image)?,
                    grad_scratch: z(&image)?,
                    grad_input: z(&image)?,
                })
            } else {
                None
            },
        })
    }

    /// Purifies `x` (host, batch x 3 x 32 x 32 in [-1, 1]), images `first_image`,
    /// `first_image + 1`, ... of the whole input, and returns x_0 in [-1, 1].
    pub fn purify(&self, plan: &mut PurifyPlan<B>, x: &[f32], first_image: u64) -> Result<(Vec<f32>, PurifyReport)> {
        let noise = NoiseDraw { seed: self.settings.seed, draw: 0 };
        let images: Vec<u64> = (first_image..first_image + plan.batch as u64).collect();
        let report = self.purify_on_backend(plan, x, &images, noise)?;
        Ok((self.backend.download(plan.output())?, report))
    }

    /// Purifies `x` (host, [-1, 1]), whose samples are the images numbered `image_indices` in the
    /// whole input, with the noise of `noise`, and leaves x_0 in the backend
    /// (`PurifyPlan::output`). A differentiable plan also records its tape.
    pub fn purify_on_backend(
        &self,
        plan: &mut PurifyPlan<B>,
        x: &[f32],
        image_indices: &[u64],
        noise: NoiseDraw,
    ) -> Result<PurifyReport> {
        let b = self.backend;
        if x.len() != plan.batch * 3 * 32 * 32 {
            return Err(Error::invalid(format!(
                "purify got {} values for a batch of {} 3x32x32 images",
                x.len(),
                plan.batch
            )));
        }
        if image_indices.len() != plan.batch {
            return Err(Error::invalid(format!(
                "purify got {} image indices for a batch of {}",
                image_indices.len(),
                plan.batch
            )));
        }
        if let Some(&index) = image_indices.iter().find(|&&g| g >= IMAGE_INDEX_LIMIT) {
            return Err(Error::invalid(format!(
                "image index {index} is too large: a run holds at most {IMAGE_INDEX_LIMIT} images"
            )));
        }
        crate::error::check_finite(x, || "input image batch".to_string())?;
        if let Some(tape) = plan.tape.as_mut() {
            tape.recorded = false; // until this purification has run to the end
        }
        self.set_input(plan, x)?;
        let indices: Vec<f32> = image_indices.iter().map(|&g| g as f32).collect(); // exact below 2^24
        b.write(&mut plan.image_indices, &indices)?;
        let mut report = PurifyReport::default();
        let stream = |step: usize| noise.stream(&self.schedule, step);

        // x_{t*} = sqrt(abar) x_in + sqrt(1 - abar) z
        let (a, s) = self.schedule.diffuse_weights(self.settings.t_star);
        b.fill_gaussian(&mut plan.noise, &plan.image_indices, noise.seed, stream(0));
        b.axpby(a, &plan.x_in, s, &plan.noise, &mut plan.x_t);

        for (index, step) in self.steps.iter().enumerate() {
            let step_started = std::time::Instant::now();
            if let Some(tape) = plan.tape.as_mut() {
                b.copy(&plan.x_t, &mut tape.states[index]);
            }
            self.unet.enqueue_forward_indexed(b, &mut plan.unet, &plan.x_t, &plan.step_indices[index])?;
            report.network_calls += 1;
            b.predict_x0_and_mean(&plan.x_t, plan.unet.eps(), step.coefficients, &mut plan.x0_hat, &mut plan.mu);
            let guided = self.guidance_shift(plan, step, &mut report)?;
            // x_prev = mu (+ delta) (+ sigma z); buffers are swapped, not copied.
            if guided {
                b.constrain_guidance(&mut plan.delta, &plan.x_t, &plan.mu, self.settings.kappa);
                b.add_assign(&mut plan.mu, &plan.delta);
            }
            std::mem::swap(&mut plan.x_t, &mut plan.mu);
            if step.noise_std > 0.0 {
                b.fill_gaussian(&mut plan.noise, &plan.image_indices, noise.seed, stream(step.t));
                b.axpby(1.0, &plan.x_t, step.noise_std, &plan.noise, &mut plan.mu);
                std::mem::swap(&mut plan.x_t, &mut plan.mu);
            }
            report.step_seconds.push(step_started.elapsed().as_secs_f64());
            if let Some(observer) = &self.step_observer {
                observer();
            }
        }
        if let Some(tape) = plan.tape.as_mut() {
            b.copy(&plan.x_t, &mut tape.unclamped_output);
            tape.recorded = true;
        }
        b.clamp(&mut plan.x_t, -1.0, 1.0);
        // The loop issued its work without waiting; its errors surface here, once.
        b.synchronize()?;
        Ok(report)
    }

    /// The vector-Jacobian product of the last purification on this (differentiable) plan:
    /// given `grad_output` = dL/dx_0 (the purified batch, in the backend), returns dL/dx for its
    /// input x (model range [-1, 1]). Exact through every reverse step: the clip of x0_hat, the
    /// UNet (its input VJP, activations recomputed from the tape) and the final clamp; the
    /// guidance shift delta_t and the noise are held constant (BPDA on the guidance only,
    /// METHOD.md section 5). Costs one UNet forward and one UNet VJP per reverse step.
    pub fn input_vjp<'p>(&self, plan: &'p mut PurifyPlan<B>, grad_output: &B::Tensor) -> Result<&'p B::Tensor> {
        let b = self.backend;
        let PurifyPlan { unet: unet_plan, u, step_indices, tape, .. } = plan;
        let tape = match tape.as_mut() {
            Some(tape) if tape.recorded => tape,
            Some(_) => return Err(Error::invalid("input_vjp needs a purification on the same plan first")),
            None => return Err(Error::invalid("this purify plan was made without a tape (plan_differentiable)")),
        };
        if grad_output.shape() != tape.grad.shape() {
            return Err(Error::invalid(format!(
                "gradient has shape {:?}, the purified batch is {:?}",
                grad_output.shape(),
                tape.grad.shape()
            )));
        }
        b.copy(grad_output, &mut tape.grad);
        b.clamp_backward(&tape.unclamped_output, -1.0, 1.0, &mut tape.grad);
        for ((step, x_t), t) in self.steps.iter().zip(&tape.states).zip(step_indices.iter()).rev() {
            // x_prev = c0 clip(x0_hat(x_t)) + ct x_t + const, x0_hat = (x_t - s eps(x_t)) / a:
            // dL/dx_t = ct g + (u - s J_eps^T u) / a, with u = c0 g masked by the clip.
            let c = step.coefficients;
            self.unet.enqueue_forward_indexed(b, unet_plan, x_t, t)?;
            b.axpby(c.c0, &tape.grad, 0.0, &tape.grad, u);
            b.mask_clipped(x_t, unet_plan.eps(), c, u);
            let jtu = self.unet.enqueue_input_vjp(b, unet_plan, u)?;
            let (a, s) = (c.sqrt_abar, c.sqrt_one_minus_abar);
            b.axpby(1.0 / a, u, -s / a, jtu, &mut tape.grad_scratch);
            b.axpby(c.ct, &tape.grad, 1.0, &tape.grad_scratch, u);
            std::mem::swap(&mut tape.grad, u);
        }
        // x_{t*} = sqrt(abar_{t*}) x + sqrt(1 - abar_{t*}) z
        let (a, _) = self.schedule.diffuse_weights(self.settings.t_star);
        b.axpby(a, &tape.grad, 0.0, &tape.grad, &mut tape.grad_input);
        b.synchronize()?;
        Ok(&tape.grad_input)
    }

    /// Uploads the input and gives the auxiliary network its view of it: reference features and
    /// predicted labels (one download of N x 10 logits per batch, at the edge).
    fn set_input(&self, plan: &mut PurifyPlan<B>, x: &[f32]) -> Result<()> {
        let b = self.backend;
        b.write(&mut plan.x_in, x)?;
        if let (Some(aux), Some(aux_plan)) = (self.auxiliary, plan.auxiliary.as_mut()) {
            aux.forward(b, aux_plan, &plan.x_in)?;
            b.copy(&aux_plan.features, &mut plan.reference_features);
            let logits = b.download(&aux_plan.logits)?;
            let labels: Vec<f32> = logits.chunks(aux.num_classes).map(|row| argmax(row) as f32).collect();
            b.write(&mut plan.labels, &labels)?;
        }
        Ok(())
    }

    /// Diagnostic for tests and people checking the guidance: at reverse step `step`, for input
    /// `x_in` and state `x_t` (host, [-1, 1]), the guidance objective summed over the batch
    /// (pixel mode: -||x_t - sqrt(abar) x_in||^2; adversarial: L of METHOD.md) and its gradient
    /// with respect to x_t as the sampler computes it (before the scale, sigma^2 and the constraint).
    pub fn guidance_objective(
        &self,
        plan: &mut PurifyPlan<B>,
        x_in: &[f32],
        x_t: &[f32],
        step: &ReverseStep,
    ) -> Result<(f64, Vec<f32>)> {
        let b = self.backend;
        self.set_input(plan, x_in)?;
        b.write(&mut plan.x_t, x_t)?;
        // A diagnostic for any step, not only this purifier's: its indices come from the host.
        self.unet.forward(b, &mut plan.unet, &plan.x_t, &vec![(step.t - 1) as f32; plan.batch])?;
        b.predict_x0_and_mean(&plan.x_t, plan.unet.eps(), step.coefficients, &mut plan.x0_hat, &mut plan.mu);
        let (scale, objective) = match self.settings.guidance {
            Guidance::None => return Err(Error::invalid("mode none has no guidance objective")),
            Guidance::Pixel { scale } => {
                let a = step.coefficients.sqrt_abar;
                let value = -x_t.iter().zip(x_in).map(|(xt, xi)| ((xt - a * xi) as f64).powi(2)).sum::<f64>();
                (scale, value)
            }
            Guidance::Adversarial { scale, .. } => (scale, 0.0),
        };
        let mut report = PurifyReport::default();
        if !self.guidance_shift(plan, step, &mut report)? {
            return Err(Error::invalid(format!("step {} has no guidance (sigma_t = 0)", step.t)));
        }
        b.synchronize()?;
        let k = scale * step.guidance_variance;
        let gradient: Vec<f32> = b.download(&plan.delta)?.iter().map(|d| d / k).collect();
        let objective = match self.settings.guidance {
            Guidance::Adversarial { lambda_features, lambda_class, .. } => {
                let aux_plan = plan.auxiliary.as_ref().expect("made by plan");
                let features = b.download(&aux_plan.features)?;
                let reference = b.download(&plan.reference_features)?;
                let logits = b.download(&aux_plan.logits)?;
                let labels = b.download(&plan.labels)?;
                let f = features.len() / plan.batch;
                let k = logits.len() / plan.batch;
                let mut total = 0.0;
                for n in 0..plan.batch {
                    let distance: f64 =
                        (0..f).map(|i| (features[n * f + i] as f64 - reference[n * f + i] as f64).powi(2)).sum();
                    let row = &logits[n * k..(n + 1) * k];
                    total += -lambda_features as f64 * distance / f as f64
                        + lambda_class as f64 * log_softmax_at(row, labels[n] as usize);
                }
                total
            }
            _ => objective,
        };
        Ok((objective, gradient))
    }

    /// Writes `delta_t` into `plan.delta` (before the constraint); false when there is none.
    fn guidance_shift(&self, plan: &mut PurifyPlan<B>, step: &ReverseStep, report: &mut PurifyReport) -> Result<bool> {
        let b = self.backend;
        let sigma2 = step.guidance_variance;
        let c = step.coefficients;
        match self.settings.guidance {
            Guidance::None => Ok(false),
            _ if sigma2 == 0.0 => Ok(false),
            Guidance::Pixel { scale } => {
                // grad ||x_t - sqrt(abar) x_in||^2 = 2 (x_t - sqrt(abar) x_in)
                let k = -2.0 * scale * sigma2;
                b.axpby(k, &plan.x_t, -k * c.sqrt_abar, &plan.x_in, &mut plan.delta);
                Ok(true)
            }
            Guidance::Adversarial { scale, lambda_features, lambda_class, path } => {
                let (aux, aux_plan) =
                    (self.auxiliary.expect("checked in new"), plan.auxiliary.as_mut().expect("made by plan"));
                match path {
                    GradientPath::X0 => aux.enqueue_forward(b, aux_plan, &plan.x0_hat)?,
                    GradientPath::Xt => {
                        b.axpby(1.0 / c.sqrt_abar, &plan.x_t, 0.0, &plan.x_t, &mut plan.aux_input);
                        aux.enqueue_forward(b, aux_plan, &plan.aux_input)?
                    }
                }
                b.guidance_objective_grad(
                    &aux_plan.features,
                    &plan.reference_features,
                    &aux_plan.logits,
                    &plan.labels,
                    lambda_features,
                    lambda_class,
                    &mut plan.dfeatures,
                    &mut plan.dlogits,
                );
                let u = aux.enqueue_input_vjp(b, aux_plan, Some(&plan.dlogits), Some(&plan.dfeatures))?;
                b.copy(u, &mut plan.u);
                let k = scale * sigma2 / c.sqrt_abar;
                match path {
                    GradientPath::X0 => {
                        // grad_{x_t} L = (u - sqrt(1 - abar) J_eps^T u) / sqrt(abar), u masked by the clip.
                        b.mask_clipped(&plan.x_t, plan.unet.eps(), c, &mut plan.u);
                        let jtu = self.unet.enqueue_input_vjp(b, &mut plan.unet, &plan.u)?;
                        report.unet_vjps += 1;
                        b.axpby(k, &plan.u, -k * c.sqrt_one_minus_abar, jtu, &mut plan.delta);
                    }
                    GradientPath::Xt => b.axpby(k, &plan.u, 0.0, &plan.u, &mut plan.delta),
                }
                Ok(true)
            }
        }
    }
}

impl<B: Backend> PurifyPlan<B> {
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// The purified batch of the last `purify_on_backend` (in [-1, 1]).
    pub fn output(&self) -> &B::Tensor {
        &self.x_t
    }
}
