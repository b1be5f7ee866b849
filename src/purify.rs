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
//!
//! Shaped for a GPU: every per-step scalar (the schedule's coefficients, the UNet's step index,
//! the noise's stream, the guidance's weights) is in a step table written once per purification
//! (src/diffusion/step_table.rs) and read through a device cursor that each step advances itself;
//! a step updates x_t in place (no buffer handles are swapped). Every step thus issues the same
//! launches with the same arguments, and where the backend can record them (a CUDA graph) a step
//! of each kind (guided or not) is recorded once per plan and replayed for every other step. The
//! first step of a kind on a plan runs eagerly: it loads every kernel the step needs, so nothing
//! is compiled or loaded while recording.
use crate::backend::{range, Backend, StepColumn, StepSource, TensorShape, Timestamp, IMAGE_INDEX_LIMIT};
use crate::diffusion::step_table::{self, GUIDANCE_A, GUIDANCE_B, INV_SQRT_ABAR, NEG_EPS_WEIGHT};
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
    /// Time of each reverse step, in seconds, between the backend's timestamps around it (host
    /// clock readings on the CPU, device events on a GPU, resolved after the closing synchronize).
    pub step_seconds: Vec<f64>,
    /// Reverse steps issued as replays of a recorded graph.
    pub replayed_steps: usize,
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
    /// Each sample's index in the whole input (N), written with the input: it keys the noise.
    image_indices: B::Tensor,
    /// The purification's step table (steps + 1 rows) and its cursor (one element).
    step_table: B::Tensor,
    step_cursor: B::Tensor,
    /// The UNet's per-sample step indices, written from the table by each step.
    unet_steps: B::Tensor,
    /// Recorded steps of this plan (taken out of it while a purification runs).
    graphs: StepGraphs<B>,
    /// Scratch: the guidance objective's gradient with respect to the classifier input.
    u: B::Tensor,
    /// The x_t path's classifier input, x_t / sqrt(abar).
    aux_input: B::Tensor,
    reference_features: B::Tensor,
    labels: B::Tensor,
    dfeatures: B::Tensor,
    dlogits: B::Tensor,
    /// Differentiable plans only: what the last purification recorded, and the gradients.
    tape: Option<Tape<B>>,
}

/// How far a kind of step (a reverse step with or without guidance, a VJP step) has come on a plan.
enum StepRecording<G> {
    /// Not met yet: the first one runs eagerly (and loads its kernels).
    Unseen,
    /// Met once: the next one is recorded.
    Seen,
    /// Recorded: every later one is a replay.
    Recorded(G),
    /// The backend records nothing (the CPU): always eager.
    Eager,
}

/// The recorded steps of a plan, valid for the purifier that recorded them (`owner`).
struct StepGraphs<B: Backend> {
    owner: Option<GraphOwner>,
    unguided: StepRecording<B::Graph>,
    guided: StepRecording<B::Graph>,
    vjp: StepRecording<B::Graph>,
}

impl<B: Backend> Default for StepGraphs<B> {
    fn default() -> Self {
        Self { owner: None, unguided: StepRecording::Unseen, guided: StepRecording::Unseen, vjp: StepRecording::Unseen }
    }
}

/// What a recorded step bakes in besides the plan's own tensors: the networks' weights (by
/// address) and the settings that are launch arguments (the guidance's lambdas, kappa).
#[derive(Clone, Debug, PartialEq)]
struct GraphOwner {
    unet: usize,
    auxiliary: usize,
    guidance: Guidance,
    kappa_bits: u32,
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
    /// The input of the step being back-propagated (a copy of its `states` entry, so that the
    /// step's recorded launches read one fixed tensor).
    step_input: B::Tensor,
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
    /// Record and replay steps where the backend can (on by default).
    use_graphs: bool,
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
        Ok(Self { backend, unet, auxiliary, schedule, settings, steps, step_observer: None, use_graphs: true })
    }

    /// Calls `observer` after every reverse step of every purification from now on (after the
    /// step is issued: on an asynchronous backend it may still be running).
    pub fn observe_steps(&mut self, observer: impl Fn() + Send + Sync + 'a) {
        self.step_observer = Some(Box::new(observer));
    }

    /// Whether steps are recorded once and replayed where the backend can (default: yes). Off,
    /// every step is issued op by op; the results are the same bits either way.
    pub fn use_graphs(&mut self, on: bool) {
        self.use_graphs = on;
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
            image_indices: z(&[batch])?,
            step_table: z(&[self.steps.len() + 1, crate::backend::STEP_COLUMNS])?,
            step_cursor: z(&[1])?,
            unet_steps: z(&[batch])?,
            graphs: StepGraphs::default(),
            u: z(&image)?,
            aux_input: z(&image)?,
            reference_features: z(&[batch, fdim])?,
            labels: z(&[batch])?,
            dfeatures: z(&[batch, fdim])?,
            dlogits: z(&[batch, classes])?,
            tape: if differentiable {
                Some(Tape {
                    states: self.steps.iter().map(|_| z(&image)).collect::<Result<_>>()?,
                    unclamped_output: z(&image)?,
                    recorded: false,
                    grad: z(&image)?,
                    grad_scratch: z(&image)?,
                    grad_input: z(&image)?,
                    step_input: z(&image)?,
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
        let table = step_table::step_table(
            &self.schedule,
            self.settings.t_star,
            &self.steps,
            &self.settings.guidance,
            noise.seed,
            |step| noise.stream(&self.schedule, step),
        );
        b.write(&mut plan.step_table, &table)?;
        b.write(&mut plan.step_cursor, &[0.0])?;
        let mut report = PurifyReport::default();

        // x_{t*} = sqrt(abar) x_in + sqrt(1 - abar) z (row 0), then the cursor moves to the first step.
        let step = StepSource { table: &plan.step_table, cursor: &plan.step_cursor };
        b.q_sample(&plan.x_in, &plan.image_indices, step, &mut plan.x_t);
        b.advance_step_cursor(&mut plan.step_cursor, 1);

        let mut graphs = self.graphs_for(plan);
        let mut marks: Vec<Timestamp> = Vec::with_capacity(self.steps.len() + 1);
        marks.push(b.timestamp()?);
        for (index, step) in self.steps.iter().enumerate() {
            if let Some(tape) = plan.tape.as_mut() {
                // Outside the recorded step: its destination changes with the step.
                b.copy(&plan.x_t, &mut tape.states[index]);
            }
            let guided = step_table::is_guided(&self.settings.guidance, step);
            let recording = if guided { &mut graphs.guided } else { &mut graphs.unguided };
            // A range per step, around its issue or its replay (NVTX on a GPU).
            let step_range = range(b, "reverse step");
            report.replayed_steps += self.run_step(recording, || self.issue_reverse_step(plan, guided))? as usize;
            drop(step_range);
            report.network_calls += 1;
            if guided && matches!(self.settings.guidance, Guidance::Adversarial { path: GradientPath::X0, .. }) {
                report.unet_vjps += 1;
            }
            marks.push(b.timestamp()?);
            if let Some(observer) = &self.step_observer {
                observer();
            }
        }
        plan.graphs = graphs;
        if let Some(tape) = plan.tape.as_mut() {
            b.copy(&plan.x_t, &mut tape.unclamped_output);
            tape.recorded = true;
        }
        b.clamp(&mut plan.x_t, -1.0, 1.0);
        // The loop issued its work without waiting; its errors surface here, once.
        b.synchronize()?;
        report.step_seconds =
            marks.windows(2).map(|w| Ok(b.elapsed_ms(&w[0], &w[1])? / 1e3)).collect::<Result<Vec<f64>>>()?;
        for mark in marks {
            b.release_timestamp(mark);
        }
        Ok(report)
    }

    /// The plan's recorded steps if this purifier recorded them, else none (the old ones dropped).
    fn graphs_for(&self, plan: &mut PurifyPlan<B>) -> StepGraphs<B> {
        let owner = GraphOwner {
            unet: self.unet as *const Unet<B> as usize,
            auxiliary: self.auxiliary.map_or(0, |a| a as *const Classifier<B> as usize),
            guidance: self.settings.guidance.clone(),
            kappa_bits: self.settings.kappa.to_bits(),
        };
        let graphs = std::mem::take(&mut plan.graphs);
        if graphs.owner.as_ref() == Some(&owner) {
            graphs
        } else {
            StepGraphs { owner: Some(owner), ..StepGraphs::default() }
        }
    }

    /// Issues one step through `recording`: a replay when it holds a graph, else the step itself
    /// (`issue`), eagerly the first time, recorded (then replayed) the second. Returns whether
    /// the step was a replay.
    fn run_step(&self, recording: &mut StepRecording<B::Graph>, issue: impl FnOnce() -> Result<()>) -> Result<bool> {
        let b = self.backend;
        if !self.use_graphs {
            issue()?;
            return Ok(false);
        }
        match recording {
            StepRecording::Recorded(graph) => {
                b.replay(graph)?;
                Ok(true)
            }
            StepRecording::Unseen => {
                issue()?;
                *recording = StepRecording::Seen;
                Ok(false)
            }
            StepRecording::Eager => {
                issue()?;
                Ok(false)
            }
            StepRecording::Seen => {
                if !b.begin_capture()? {
                    *recording = StepRecording::Eager;
                    issue()?;
                    return Ok(false);
                }
                // The capture ends whatever the step did, so the stream is usable again.
                let issued = issue();
                let graph = b.end_capture();
                issued?;
                let graph = graph?;
                b.replay(&graph)?;
                *recording = StepRecording::Recorded(graph);
                Ok(true)
            }
        }
    }

    /// One reverse step t -> t-1 on the plan's fixed tensors, every scalar from the table row the
    /// cursor names; it ends by moving the cursor on.
    fn issue_reverse_step(&self, plan: &mut PurifyPlan<B>, guided: bool) -> Result<()> {
        let b = self.backend;
        let step = StepSource { table: &plan.step_table, cursor: &plan.step_cursor };
        b.step_unet_indices(step, &mut plan.unet_steps);
        self.unet.enqueue_forward_indexed(b, &mut plan.unet, &plan.x_t, &plan.unet_steps)?;
        if guided {
            b.predict_x0_and_mean(&plan.x_t, plan.unet.eps(), step, &mut plan.x0_hat, &mut plan.mu);
            self.guidance_shift(plan)?;
            b.constrain_guidance(&mut plan.delta, &plan.x_t, &plan.mu, self.settings.kappa);
        }
        // x_{t-1} = mu (+ delta) (+ sigma z), written over x_t.
        let step = StepSource { table: &plan.step_table, cursor: &plan.step_cursor };
        let delta = guided.then_some(&plan.delta);
        b.reverse_step(&mut plan.x_t, plan.unet.eps(), delta, &plan.image_indices, step);
        b.advance_step_cursor(&mut plan.step_cursor, 1);
        Ok(())
    }

    /// The vector-Jacobian product of the last purification on this (differentiable) plan:
    /// given `grad_output` = dL/dx_0 (the purified batch, in the backend), returns dL/dx for its
    /// input x (model range [-1, 1]). Exact through every reverse step: the clip of x0_hat, the
    /// UNet (its input VJP, activations recomputed from the tape) and the final clamp; the
    /// guidance shift delta_t and the noise are held constant (BPDA on the guidance only,
    /// METHOD.md section 5). Costs one UNet forward and one UNet VJP per reverse step.
    pub fn input_vjp<'p>(&self, plan: &'p mut PurifyPlan<B>, grad_output: &B::Tensor) -> Result<&'p B::Tensor> {
        let b = self.backend;
        let tape = match plan.tape.as_mut() {
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
        // The table of the last purification is still in the plan; the cursor walks it backwards,
        // from one past the last step.
        b.write(&mut plan.step_cursor, &[self.steps.len() as f32 + 1.0])?;
        let mut graphs = self.graphs_for(plan);
        for index in (0..self.steps.len()).rev() {
            let tape = plan.tape.as_mut().expect("checked above");
            b.copy(&tape.states[index], &mut tape.step_input);
            let _step_range = range(b, "reverse step input_vjp");
            self.run_step(&mut graphs.vjp, || self.issue_vjp_step(plan))?;
        }
        plan.graphs = graphs;
        let tape = plan.tape.as_mut().expect("checked above");
        // x_{t*} = sqrt(abar_{t*}) x + sqrt(1 - abar_{t*}) z
        let (a, _) = self.schedule.diffuse_weights(self.settings.t_star);
        b.axpby(a, &tape.grad, 0.0, &tape.grad, &mut tape.grad_input);
        b.synchronize()?;
        Ok(&tape.grad_input)
    }

    /// One reverse step of `input_vjp`, on the plan's fixed tensors: the cursor moves back one
    /// row first, then x_prev = c0 clip(x0_hat(x_t)) + ct x_t + const, x0_hat = (x_t - s eps(x_t)) / a,
    /// gives dL/dx_t = ct g + (u - s J_eps^T u) / a, with u = c0 g masked by the clip.
    fn issue_vjp_step(&self, plan: &mut PurifyPlan<B>) -> Result<()> {
        let b = self.backend;
        let PurifyPlan { unet: unet_plan, u, tape, step_table, step_cursor, unet_steps, .. } = plan;
        let tape = tape.as_mut().expect("a differentiable plan");
        b.advance_step_cursor(step_cursor, -1);
        let step = StepSource { table: &*step_table, cursor: &*step_cursor };
        b.step_unet_indices(step, unet_steps);
        self.unet.enqueue_forward_indexed(b, unet_plan, &tape.step_input, unet_steps)?;
        b.axpby_step(step, StepColumn::C0, &tape.grad, StepColumn::Zero, &tape.grad, u);
        b.mask_clipped(&tape.step_input, unet_plan.eps(), step, u);
        let jtu = self.unet.enqueue_input_vjp(b, unet_plan, u)?;
        b.axpby_step(step, INV_SQRT_ABAR, u, NEG_EPS_WEIGHT, jtu, &mut tape.grad_scratch);
        b.axpby_step(step, StepColumn::Ct, &tape.grad, StepColumn::One, &tape.grad_scratch, u);
        b.copy(u, &mut tape.grad);
        Ok(())
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
        let scale = match self.settings.guidance {
            Guidance::None => return Err(Error::invalid("mode none has no guidance objective")),
            Guidance::Pixel { scale } | Guidance::Adversarial { scale, .. } => scale,
        };
        if !step_table::is_guided(&self.settings.guidance, step) {
            return Err(Error::invalid(format!("step {} has no guidance (sigma_t = 0)", step.t)));
        }
        self.set_input(plan, x_in)?;
        b.write(&mut plan.x_t, x_t)?;
        // A diagnostic for any step, not only this purifier's: a table whose reverse rows all hold
        // `step` replaces the last purification's (so that one's tape is no longer usable).
        if let Some(tape) = plan.tape.as_mut() {
            tape.recorded = false;
        }
        let table = step_table::step_table(
            &self.schedule,
            self.settings.t_star,
            &vec![*step; self.steps.len()],
            &self.settings.guidance,
            self.settings.seed,
            |t| t as u64,
        );
        b.write(&mut plan.step_table, &table)?;
        b.write(&mut plan.step_cursor, &[1.0])?;
        self.unet.forward(b, &mut plan.unet, &plan.x_t, &vec![(step.t - 1) as f32; plan.batch])?;
        let source = StepSource { table: &plan.step_table, cursor: &plan.step_cursor };
        b.predict_x0_and_mean(&plan.x_t, plan.unet.eps(), source, &mut plan.x0_hat, &mut plan.mu);
        let objective = match self.settings.guidance {
            Guidance::Pixel { .. } => {
                let a = step.coefficients.sqrt_abar;
                -x_t.iter().zip(x_in).map(|(xt, xi)| ((xt - a * xi) as f64).powi(2)).sum::<f64>()
            }
            _ => 0.0,
        };
        self.guidance_shift(plan)?;
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

    /// Writes `delta_t` into `plan.delta` (before the constraint) for a guided step, every
    /// per-step weight from the table row the cursor names (`step_table`).
    fn guidance_shift(&self, plan: &mut PurifyPlan<B>) -> Result<()> {
        let b = self.backend;
        let step = StepSource { table: &plan.step_table, cursor: &plan.step_cursor };
        match self.settings.guidance {
            Guidance::None => Err(Error::invalid("mode none has no guidance shift")),
            Guidance::Pixel { .. } => {
                // delta = k x_t - k sqrt(abar) x_in, k = -2 s sigma^2
                b.axpby_step(step, GUIDANCE_A, &plan.x_t, GUIDANCE_B, &plan.x_in, &mut plan.delta);
                Ok(())
            }
            Guidance::Adversarial { lambda_features, lambda_class, path, .. } => {
                let (aux, aux_plan) =
                    (self.auxiliary.expect("checked in new"), plan.auxiliary.as_mut().expect("made by plan"));
                match path {
                    GradientPath::X0 => aux.enqueue_forward(b, aux_plan, &plan.x0_hat)?,
                    GradientPath::Xt => {
                        let (x_t, zero) = (&plan.x_t, StepColumn::Zero);
                        b.axpby_step(step, INV_SQRT_ABAR, x_t, zero, x_t, &mut plan.aux_input);
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
                // delta = k (u - sqrt(1 - abar) J_eps^T u) on the x0 path, k u on the xt path,
                // k = s sigma^2 / sqrt(abar) (GUIDANCE_B is 0 on the xt path).
                match path {
                    GradientPath::X0 => {
                        // grad_{x_t} L = (u - sqrt(1 - abar) J_eps^T u) / sqrt(abar), u masked by the clip.
                        b.mask_clipped(&plan.x_t, plan.unet.eps(), step, &mut plan.u);
                        let jtu = self.unet.enqueue_input_vjp(b, &mut plan.unet, &plan.u)?;
                        b.axpby_step(step, GUIDANCE_A, &plan.u, GUIDANCE_B, jtu, &mut plan.delta);
                    }
                    GradientPath::Xt => b.axpby_step(step, GUIDANCE_A, &plan.u, GUIDANCE_B, &plan.u, &mut plan.delta),
                }
                Ok(())
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
