//! Adaptive white-box attacks on the defended model `x -> C(purify(x))` (METHOD.md section 5),
//! on pixels in [0, 1] under l_inf or l_2: PGD with expectation over transformation (EOT), and
//! APGD (Croce & Hein 2020: step-size halving at checkpoints, momentum 0.75) with the
//! cross-entropy or the DLR loss, the two attacks of AutoAttack's "rand" version. The gradient is
//! exact through every reverse step (`Purifier::input_vjp`); the guidance shift is a constant in
//! it (BPDA on the guidance only), which reports must say. Robust accuracy is judged by a vote
//! over several purifications of the final adversarial images.
//!
//! Every random draw is keyed per image, by the image's index in the whole input (never its place
//! in a batch, nor among the images still being attacked): the random start, each EOT draw's
//! purification noise and each vote's. So is every step of PGD and APGD (step sizes, checkpoints,
//! best iterates are per image), so an image's adversarial example depends on the seed, the image
//! and the settings only, not on `--batch` or on the other images.
use crate::backend::cpu::rng;
use crate::backend::{Backend, IMAGE_INDEX_LIMIT};
use crate::error::{Error, Result};
use crate::model::classifier::{argmax, log_softmax_at};
use crate::model::{Classifier, ClassifierPlan};
use crate::purify::{NoiseDraw, Purifier, PurifyPlan};

/// The threat model's norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Linf,
    L2,
}

impl Norm {
    pub fn name(self) -> &'static str {
        match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        }
    }
}

/// The loss the attacker ascends, per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    CrossEntropy,
    /// Difference of logits ratio: `-(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12)`, with
    /// z_(k) the k-th largest logit (Croce & Hein 2020); invariant to the logits' scale.
    Dlr,
}

/// The optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Fixed step, sign (l_inf) or unit (l_2) gradient steps.
    Pgd,
    /// Step 2 eps halved per image at checkpoints when progress stalls, momentum 0.75, and the
    /// best iterate (highest EOT loss) kept.
    Apgd,
}

/// An attack's settings; eps and step size are in pixel units ([0, 1]).
#[derive(Clone, Debug)]
pub struct AttackSettings {
    pub method: Method,
    pub loss: Loss,
    pub norm: Norm,
    pub eps: f32,
    /// PGD's step (APGD starts at 2 eps and adapts).
    pub step_size: f32,
    pub iterations: usize,
    /// Purifications whose gradients (and losses) each iteration averages.
    pub eot: usize,
    /// Start from a uniform point of the ball (l_inf) or a random direction and radius (l_2).
    pub random_start: bool,
    pub seed: u64,
}

impl AttackSettings {
    /// METHOD.md's threat models: l_inf 8/255 with step 2/255, l_2 0.5 with step eps/4.
    fn threat_model(norm: Norm) -> (f32, f32) {
        match norm {
            Norm::Linf => (8.0 / 255.0, 2.0 / 255.0),
            Norm::L2 => (0.5, 0.125),
        }
    }

    /// PGD-EOT on the cross-entropy, METHOD.md's eps and step.
    pub fn pgd(norm: Norm, iterations: usize, eot: usize, seed: u64) -> Self {
        let (eps, step_size) = Self::threat_model(norm);
        let (method, loss, random_start) = (Method::Pgd, Loss::CrossEntropy, true);
        Self { method, loss, norm, eps, step_size, iterations, eot, random_start, seed }
    }

    /// APGD-EOT with `loss` (AutoAttack's rand version uses 100 iterations and EOT 20).
    pub fn apgd(loss: Loss, norm: Norm, iterations: usize, eot: usize, seed: u64) -> Self {
        Self { method: Method::Apgd, loss, ..Self::pgd(norm, iterations, eot, seed) }
    }

    /// "PGD-CE", "APGD-DLR", ...
    pub fn name(&self) -> String {
        let method = match self.method {
            Method::Pgd => "PGD",
            Method::Apgd => "APGD",
        };
        let loss = match self.loss {
            Loss::CrossEntropy => "CE",
            Loss::Dlr => "DLR",
        };
        format!("{method}-{loss}")
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid(format!("the attack's eps must be a positive number, got {}", self.eps)));
        }
        if !(self.step_size.is_finite() && self.step_size > 0.0) {
            return Err(Error::invalid(format!(
                "the attack's step size must be a positive number, got {}",
                self.step_size
            )));
        }
        if self.eot == 0 {
            return Err(Error::invalid("--eot must be at least 1 (purifications per gradient)"));
        }
        Ok(())
    }
}

/// One EOT estimate as the attacker saw it, after `iteration` steps: mean loss and accuracy over
/// the draws at the point where the gradient was taken, and the iteration's wall time.
#[derive(Clone, Debug)]
pub struct AttackTrace {
    pub iteration: usize,
    pub loss: f64,
    pub eot_accuracy: f64,
    pub seconds: f64,
}

/// An EOT estimate at one point: per-image mean loss, per-image count of the draws that
/// classified it correctly, and the summed gradient of the loss with respect to the pixels.
struct EotEstimate {
    losses: Vec<f64>,
    correct: Vec<usize>,
    gradient: Vec<f32>,
}

impl EotEstimate {
    /// Whether image `i` is misclassified at this point, judged as the defence judges: by a
    /// strict majority of the draws (one draw, exact, for a deterministic model).
    fn broken(&self, i: usize, draws: usize) -> bool {
        2 * (draws - self.correct[i]) > draws
    }
}

/// The model under attack: a purifier followed by a classifier, or the classifier alone (the
/// undefended baseline, deterministic).
pub struct Defence<'a, B: Backend> {
    pub backend: &'a B,
    /// `None`: the classifier alone.
    pub purifier: Option<&'a Purifier<'a, B>>,
    pub classifier: &'a Classifier<B>,
}

/// Buffers of one batch size: a differentiable purify plan (or the classifier's input) and the
/// classifier's plan.
pub struct DefencePlan<B: Backend> {
    batch: usize,
    purify: Option<PurifyPlan<B>>,
    input: Option<B::Tensor>,
    classifier: ClassifierPlan<B>,
    labels: B::Tensor,
    dlogits: B::Tensor,
    /// The sum of the EOT draws' gradients with respect to the model-range input, accumulated in
    /// the backend so that an iteration downloads one gradient, not one per draw.
    gradient_sum: B::Tensor,
}

impl<B: Backend> DefencePlan<B> {
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Salt of the voting draws' seed, so that the judge never reuses the attacker's noise.
const VOTE_SEED_SALT: u64 = 0x05EE_D0F7_07E5;

impl<'a, B: Backend> Defence<'a, B> {
    /// The defended model C(purify(x)).
    pub fn purified(purifier: &'a Purifier<'a, B>, classifier: &'a Classifier<B>) -> Self {
        Defence { backend: purifier.backend, purifier: Some(purifier), classifier }
    }

    /// The classifier alone: the undefended baseline.
    pub fn undefended(backend: &'a B, classifier: &'a Classifier<B>) -> Self {
        Defence { backend, purifier: None, classifier }
    }

    /// Whether the model draws noise (then EOT and votes matter; else one draw says it all).
    pub fn is_stochastic(&self) -> bool {
        self.purifier.is_some()
    }

    pub fn plan(&self, batch: usize) -> Result<DefencePlan<B>> {
        let b = self.backend;
        Ok(DefencePlan {
            batch,
            purify: self.purifier.map(|p| p.plan_differentiable(batch)).transpose()?,
            input: if self.purifier.is_none() { Some(b.zeros(&[batch, 3, 32, 32])?) } else { None },
            classifier: self.classifier.plan(b, batch, true)?,
            labels: b.zeros(&[batch])?,
            dlogits: b.zeros(&[batch, self.classifier.num_classes])?,
            gradient_sum: b.zeros(&[batch, 3, 32, 32])?,
        })
    }

    /// Logits (host, batch x classes) of C(purify(x)) for one noise draw, or of C(x) for the
    /// classifier alone (the draw is then unused); pixels in [0, 1], the images numbered
    /// `image_indices` in the whole input.
    pub fn logits(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        image_indices: &[u64],
        noise: NoiseDraw,
    ) -> Result<Vec<f32>> {
        let b = self.backend;
        let x = to_model_range(pixels);
        let input = match (self.purifier, plan.purify.as_mut(), plan.input.as_mut()) {
            (Some(purifier), Some(purify), _) => {
                purifier.purify_on_backend(purify, &x, image_indices, noise)?;
                purify.output()
            }
            (None, _, Some(input)) => {
                b.write(input, &x)?;
                input
            }
            _ => return Err(Error::invalid("this plan was made for another defence")),
        };
        self.classifier.forward(b, &mut plan.classifier, input)?;
        b.download(&plan.classifier.logits)
    }

    /// For one noise draw: the per-image loss of C(purify(x)), whether each image is classified
    /// correctly, and the gradient of the summed loss with respect to the pixels (exact through
    /// the purification, BPDA on its guidance).
    pub fn loss_gradient(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        image_indices: &[u64],
        loss: Loss,
        noise: NoiseDraw,
    ) -> Result<(Vec<f64>, Vec<bool>, Vec<f32>)> {
        let b = self.backend;
        b.fill(&mut plan.gradient_sum, 0.0);
        let (losses, correct) = self.add_draw_gradient(plan, pixels, labels, image_indices, loss, noise)?;
        Ok((losses, correct, self.gradient_sum_in_pixels(plan)?))
    }

    /// `loss_gradient` for one draw, leaving the gradient in the backend: it is added to
    /// `plan.gradient_sum` (with respect to the model-range input). Only the N x K logits cross
    /// to the host (the losses and the correct count are computed there).
    fn add_draw_gradient(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        image_indices: &[u64],
        loss: Loss,
        noise: NoiseDraw,
    ) -> Result<(Vec<f64>, Vec<bool>)> {
        let b = self.backend;
        let logits = self.logits(plan, pixels, image_indices, noise)?;
        let k = self.classifier.num_classes;
        let losses = match loss {
            Loss::CrossEntropy => {
                let label_values: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
                b.write(&mut plan.labels, &label_values)?;
                b.cross_entropy_grad(&plan.classifier.logits, &plan.labels, &mut plan.dlogits);
                logits.chunks(k).zip(labels).map(|(row, &y)| -log_softmax_at(row, y as usize)).collect()
            }
            Loss::Dlr => {
                // N x K numbers: computed where they already are, on the host.
                let mut dlogits = vec![0.0f32; logits.len()];
                let losses = logits
                    .chunks(k)
                    .zip(dlogits.chunks_mut(k))
                    .zip(labels)
                    .map(|((row, grad), &y)| dlr(row, y as usize, grad))
                    .collect();
                b.write(&mut plan.dlogits, &dlogits)?;
                losses
            }
        };
        let grad_x0 = self.classifier.input_vjp(b, &mut plan.classifier, Some(&plan.dlogits), None)?;
        let grad_x = match (self.purifier, plan.purify.as_mut()) {
            (Some(purifier), Some(purify)) => purifier.input_vjp(purify, grad_x0)?,
            _ => grad_x0,
        };
        b.add_assign(&mut plan.gradient_sum, grad_x);
        let correct = logits.chunks(k).zip(labels).map(|(row, &y)| argmax(row) == y as usize).collect();
        Ok((losses, correct))
    }

    /// The accumulated gradient, downloaded, with respect to the pixels (x = 2 p - 1). Scaling by
    /// 2 is exact in binary floating point, so this equals summing the draws' pixel gradients on
    /// the host, bit for bit.
    fn gradient_sum_in_pixels(&self, plan: &DefencePlan<B>) -> Result<Vec<f32>> {
        Ok(self.backend.download(&plan.gradient_sum)?.iter().map(|g| 2.0 * g).collect())
    }

    /// The loss and gradient at `x` averaged over `settings.eot` draws; `evaluation` numbers the
    /// estimates of one attack, so that every draw has its own noise (per image: the draws are
    /// keyed by `image_indices` too).
    fn eot_estimate(
        &self,
        plan: &mut DefencePlan<B>,
        x: &[f32],
        labels: &[u8],
        image_indices: &[u64],
        settings: &AttackSettings,
        evaluation: usize,
    ) -> Result<EotEstimate> {
        let n = labels.len();
        let mut estimate = EotEstimate { losses: vec![0.0; n], correct: vec![0; n], gradient: Vec::new() };
        self.backend.fill(&mut plan.gradient_sum, 0.0);
        for e in 0..settings.eot {
            let draw = evaluation as u64 * settings.eot as u64 + e as u64;
            let noise = NoiseDraw { seed: settings.seed, draw };
            let (losses, right) = self.add_draw_gradient(plan, x, labels, image_indices, settings.loss, noise)?;
            estimate.losses.iter_mut().zip(&losses).for_each(|(a, l)| *a += l / settings.eot as f64);
            estimate.correct.iter_mut().zip(&right).for_each(|(c, &r)| *c += usize::from(r));
        }
        // One download per estimate, whatever the number of draws.
        estimate.gradient = self.gradient_sum_in_pixels(plan)?;
        Ok(estimate)
    }

    /// How many of `votes` purifications (each its own noise) the classifier gets right, per
    /// image (the images numbered `image_indices` in the whole input). The draws never overlap an
    /// attack's (the seed is salted).
    pub fn correct_votes(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        image_indices: &[u64],
        votes: usize,
        seed: u64,
    ) -> Result<Vec<usize>> {
        let mut counts = vec![0; labels.len()];
        let k = self.classifier.num_classes;
        for v in 0..votes as u64 {
            let noise = NoiseDraw { seed: seed ^ VOTE_SEED_SALT, draw: v };
            let logits = self.logits(plan, pixels, image_indices, noise)?;
            for ((count, row), &label) in counts.iter_mut().zip(logits.chunks(k)).zip(labels) {
                *count += usize::from(argmax(row) == label as usize);
            }
        }
        Ok(counts)
    }

    /// Attacks one batch (pixels in [0, 1], N x 3 x 32 x 32; the images numbered
    /// `image_indices` in the whole input): returns the adversarial images and the attacker's
    /// view of each iteration (also given to `progress`).
    pub fn attack(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        image_indices: &[u64],
        settings: &AttackSettings,
        mut progress: impl FnMut(&AttackTrace),
    ) -> Result<(Vec<f32>, Vec<AttackTrace>)> {
        settings.validate()?;
        if pixels.len() != plan.batch * IMAGE_LEN || labels.len() != plan.batch || image_indices.len() != plan.batch {
            return Err(Error::invalid(format!(
                "the attack got {} pixel values, {} labels and {} image indices for a batch of {}",
                pixels.len(),
                labels.len(),
                image_indices.len(),
                plan.batch
            )));
        }
        if let Some(&bad) = image_indices.iter().find(|&&g| g >= IMAGE_INDEX_LIMIT) {
            return Err(Error::invalid(format!(
                "image index {bad} is too large: a run holds at most {IMAGE_INDEX_LIMIT} images"
            )));
        }
        if let Some(bad) = pixels.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(Error::invalid(format!("attack input pixels must lie in [0, 1], found {bad}")));
        }
        if let Some(&bad) = labels.iter().find(|&&y| y as usize >= self.classifier.num_classes) {
            return Err(Error::invalid(format!(
                "label {bad} is not a class of the {}-class classifier",
                self.classifier.num_classes
            )));
        }
        let mut start = pixels.to_vec();
        if settings.random_start {
            let offsets = random_start(settings, image_indices);
            start.iter_mut().zip(&offsets).for_each(|(p, d)| *p += d);
            project(&mut start, pixels, settings);
        }
        let mut traces = Vec::with_capacity(settings.iterations);
        let batch = plan.batch;
        let mut record = |iteration: usize, estimate: &EotEstimate, started: std::time::Instant| {
            let draws = (settings.eot * batch) as f64;
            let trace = AttackTrace {
                iteration,
                loss: estimate.losses.iter().sum::<f64>() / batch as f64,
                eot_accuracy: estimate.correct.iter().sum::<usize>() as f64 / draws,
                seconds: started.elapsed().as_secs_f64(),
            };
            progress(&trace);
            traces.push(trace);
        };
        let adversarial = match settings.method {
            Method::Pgd => {
                let mut x = start;
                let steps = vec![settings.step_size; plan.batch];
                for iteration in 0..settings.iterations {
                    let started = std::time::Instant::now();
                    let estimate = self.eot_estimate(plan, &x, labels, image_indices, settings, iteration)?;
                    ascend(&mut x, &estimate.gradient, &steps, settings.norm);
                    project(&mut x, pixels, settings);
                    record(iteration, &estimate, started);
                }
                x
            }
            Method::Apgd => self.apgd(plan, pixels, start, labels, image_indices, settings, &mut record)?,
        };
        Ok((adversarial, traces))
    }

    /// APGD (Croce & Hein 2020, Algorithm 1) with EOT estimates of loss and gradient, step sizes
    /// and checkpoint tests per image.
    ///
    /// The result follows the reference implementation's bookkeeping: an image that any iterate
    /// (the start included) misclassifies gets the last such iterate, whatever its loss; an image
    /// no iterate broke gets its best iterate (highest EOT loss). "Misclassifies" is judged as
    /// the defence judges, by a strict majority of the iterate's EOT draws (for a deterministic
    /// model one draw, exactly the reference's test). The reference tests a stochastic model on
    /// the last draw only; a majority of the draws is less noisy, and the caller's vote over
    /// fresh purifications has the final word.
    #[allow(clippy::too_many_arguments)]
    fn apgd(
        &self,
        plan: &mut DefencePlan<B>,
        origin: &[f32],
        start: Vec<f32>,
        labels: &[u8],
        image_indices: &[u64],
        settings: &AttackSettings,
        record: &mut impl FnMut(usize, &EotEstimate, std::time::Instant),
    ) -> Result<Vec<f32>> {
        const MOMENTUM: f32 = 0.75;
        const RHO: f64 = 0.75;
        let n = plan.batch;
        let checkpoints = apgd_checkpoints(settings.iterations);
        let mut step = vec![2.0 * settings.eps; n];
        let started = std::time::Instant::now();
        let first = self.eot_estimate(plan, &start, labels, image_indices, settings, 0)?;
        let mut x = start;
        let mut previous = x.clone();
        let (mut best, mut best_loss, mut best_gradient) = (x.clone(), first.losses.clone(), first.gradient.clone());
        let (mut gradient, mut last_loss) = (first.gradient.clone(), first.losses.clone());
        // The last iterate that broke each image (meaningful where `broken`).
        let (mut broken, mut breaking) = (vec![false; n], x.clone());
        let mut note_broken = |estimate: &EotEstimate, x: &[f32]| {
            for i in (0..n).filter(|&i| estimate.broken(i, settings.eot)) {
                broken[i] = true;
                let image = i * IMAGE_LEN..(i + 1) * IMAGE_LEN;
                breaking[image.clone()].copy_from_slice(&x[image]);
            }
        };
        note_broken(&first, &x);
        record(0, &first, started);
        let mut increases = vec![0usize; n];
        let (mut best_at_checkpoint, mut reduced_at_checkpoint) = (best_loss.clone(), vec![true; n]);
        let mut last_checkpoint = 0;
        for iteration in 0..settings.iterations {
            let started = std::time::Instant::now();
            // z = P(x + eta step(grad)); x_new = P(x + a (z - x) + (1 - a) (x - x_prev)), a = 1 at first.
            let momentum = if iteration == 0 { 1.0 } else { MOMENTUM };
            let mut z = x.clone();
            ascend(&mut z, &gradient, &step, settings.norm);
            project(&mut z, origin, settings);
            let mut next: Vec<f32> = x
                .iter()
                .zip(&z)
                .zip(&previous)
                .map(|((x, z), p)| x + momentum * (z - x) + (1.0 - momentum) * (x - p))
                .collect();
            project(&mut next, origin, settings);
            previous = std::mem::replace(&mut x, next);

            let estimate = self.eot_estimate(plan, &x, labels, image_indices, settings, iteration + 1)?;
            note_broken(&estimate, &x);
            for i in 0..n {
                let image = i * IMAGE_LEN..(i + 1) * IMAGE_LEN;
                increases[i] += usize::from(estimate.losses[i] > last_loss[i]);
                if estimate.losses[i] > best_loss[i] {
                    best_loss[i] = estimate.losses[i];
                    best[image.clone()].copy_from_slice(&x[image.clone()]);
                    best_gradient[image.clone()].copy_from_slice(&estimate.gradient[image]);
                }
            }
            last_loss.clone_from(&estimate.losses);
            gradient.clone_from(&estimate.gradient);
            if checkpoints.contains(&(iteration + 1)) {
                // Halve the step of an image whose loss rose in at most rho of the steps since the
                // last checkpoint, or whose step was kept and best loss did not improve; it restarts
                // from its best point.
                let span = iteration + 1 - last_checkpoint;
                for i in 0..n {
                    let oscillating = (increases[i] as f64) <= RHO * span as f64;
                    let stalled = !reduced_at_checkpoint[i] && best_at_checkpoint[i] >= best_loss[i];
                    reduced_at_checkpoint[i] = oscillating || stalled;
                    if reduced_at_checkpoint[i] {
                        step[i] /= 2.0;
                        let image = i * IMAGE_LEN..(i + 1) * IMAGE_LEN;
                        x[image.clone()].copy_from_slice(&best[image.clone()]);
                        gradient[image.clone()].copy_from_slice(&best_gradient[image]);
                    }
                }
                best_at_checkpoint.clone_from(&best_loss);
                increases.fill(0);
                last_checkpoint = iteration + 1;
            }
            record(iteration + 1, &estimate, started);
        }
        for i in (0..n).filter(|&i| broken[i]) {
            let image = i * IMAGE_LEN..(i + 1) * IMAGE_LEN;
            best[image.clone()].copy_from_slice(&breaking[image]);
        }
        Ok(best)
    }
}

/// The iterations after which APGD tests its progress: the first after 22% of the budget, then
/// intervals 3% shorter each time, never under 6% (the reference implementation's rounding).
pub fn apgd_checkpoints(iterations: usize) -> Vec<usize> {
    let first = ((0.22 * iterations as f64) as usize).max(1);
    let shortest = ((0.06 * iterations as f64) as usize).max(1);
    let decrease = ((0.03 * iterations as f64) as usize).max(1);
    let (mut checkpoints, mut at, mut interval) = (Vec::new(), first, first);
    while at <= iterations {
        checkpoints.push(at);
        interval = interval.saturating_sub(decrease).max(shortest);
        at += interval;
    }
    checkpoints
}

/// The DLR loss of one row of logits and its gradient (written into `grad`).
fn dlr(logits: &[f32], label: usize, grad: &mut [f32]) -> f64 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let other = order.iter().copied().find(|&i| i != label).expect("at least two classes");
    let margin = logits[label] as f64 - logits[other] as f64;
    let spread = logits[order[0]] as f64 - logits[order[2]] as f64 + 1e-12;
    grad.fill(0.0);
    grad[label] -= (1.0 / spread) as f32;
    grad[other] += (1.0 / spread) as f32;
    grad[order[0]] += (margin / (spread * spread)) as f32;
    grad[order[2]] -= (margin / (spread * spread)) as f32;
    -margin / spread
}

const IMAGE_LEN: usize = 3 * 32 * 32;

/// One ascent step per image of size `steps[i]`: along the sign of the gradient (l_inf) or its
/// unit direction (l_2).
fn ascend(x: &mut [f32], gradient: &[f32], steps: &[f32], norm: Norm) {
    for ((x, g), &step) in x.chunks_mut(IMAGE_LEN).zip(gradient.chunks(IMAGE_LEN)).zip(steps) {
        match norm {
            Norm::Linf => x.iter_mut().zip(g).filter(|(_, g)| **g != 0.0).for_each(|(x, g)| *x += step * g.signum()),
            Norm::L2 => {
                let length = l2_norm(g);
                if length > 0.0 {
                    let k = (step as f64 / length) as f32;
                    x.iter_mut().zip(g).for_each(|(x, g)| *x += k * g);
                }
            }
        }
    }
}

/// Projects `x` onto the eps-ball around `origin` and then onto [0, 1]. Clipping to [0, 1] after
/// the ball only shrinks each coordinate's distance to the origin (which lies in [0, 1]), so the
/// result is in both sets.
fn project(x: &mut [f32], origin: &[f32], settings: &AttackSettings) {
    match settings.norm {
        Norm::Linf => x.iter_mut().zip(origin).for_each(|(x, o)| *x = o + (*x - o).clamp(-settings.eps, settings.eps)),
        Norm::L2 => {
            for (x, o) in x.chunks_mut(IMAGE_LEN).zip(origin.chunks(IMAGE_LEN)) {
                let distance = x.iter().zip(o).map(|(x, o)| ((x - o) as f64).powi(2)).sum::<f64>().sqrt();
                if distance > settings.eps as f64 {
                    let k = (settings.eps as f64 / distance) as f32;
                    x.iter_mut().zip(o).for_each(|(x, o)| *x = o + k * (*x - o));
                }
            }
        }
    }
    x.iter_mut().for_each(|x| *x = x.clamp(0.0, 1.0));
}

/// The generator's streams of the random start, counted down from the top so that they never
/// meet a purification's (`NoiseDraw::stream` counts up from 0).
const RANDOM_START_STREAM: u64 = u64::MAX;
const RANDOM_START_RADIUS_STREAM: u64 = u64::MAX - 1;

/// The random start's offsets, per image from its own index: uniform in the l_inf ball, or a
/// Gaussian direction scaled to a uniform radius in the l_2 ball.
fn random_start(settings: &AttackSettings, image_indices: &[u64]) -> Vec<f32> {
    let blocks = IMAGE_LEN.div_ceil(4) as u32;
    let mut offsets = Vec::with_capacity(image_indices.len() * IMAGE_LEN);
    for &image in image_indices {
        let image = image as u32; // below IMAGE_INDEX_LIMIT: checked by `attack`
        let draw = |stream, block| match settings.norm {
            Norm::Linf => rng::uniform_block(settings.seed, stream, image, block),
            Norm::L2 => rng::gaussian_block(settings.seed, stream, image, block),
        };
        let mut d: Vec<f32> = (0..blocks).flat_map(|i| draw(RANDOM_START_STREAM, i)).take(IMAGE_LEN).collect();
        match settings.norm {
            Norm::Linf => d.iter_mut().for_each(|u| *u = settings.eps * (2.0 * *u - 1.0)),
            Norm::L2 => {
                let u = rng::uniform_block(settings.seed, RANDOM_START_RADIUS_STREAM, image, 0)[0];
                let radius = u as f64 * settings.eps as f64;
                let k = (radius / l2_norm(&d).max(1e-12)) as f32;
                d.iter_mut().for_each(|v| *v *= k);
            }
        }
        offsets.extend_from_slice(&d);
    }
    offsets
}

fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt()
}

fn to_model_range(pixels: &[f32]) -> Vec<f32> {
    pixels.iter().map(|p| 2.0 * p - 1.0).collect()
}
