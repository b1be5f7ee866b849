//! Adaptive white-box attacks on the defended model `x -> C(purify(x))` (METHOD.md section 5):
//! PGD with expectation over transformation (EOT) under l_inf or l_2, on pixels in [0, 1]. The
//! gradient is exact through every reverse step (`Purifier::input_vjp`); the guidance shift is a
//! constant in it (BPDA on the guidance only), which reports must say. Robust accuracy is judged
//! by a vote over several purifications of the final adversarial images.
use crate::backend::cpu::rng;
use crate::backend::Backend;
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

/// PGD-EOT settings; eps and step size are in pixel units ([0, 1]).
#[derive(Clone, Debug)]
pub struct PgdSettings {
    pub norm: Norm,
    pub eps: f32,
    pub step_size: f32,
    pub iterations: usize,
    /// Purifications whose gradients each iteration averages.
    pub eot: usize,
    /// Start from a uniform point of the ball (l_inf) or a random direction and radius (l_2).
    pub random_start: bool,
    pub seed: u64,
}

impl PgdSettings {
    /// METHOD.md's threat models: l_inf 8/255 with step 2/255, l_2 0.5 with step eps/4.
    pub fn standard(norm: Norm, iterations: usize, eot: usize, seed: u64) -> Self {
        let (eps, step_size) = match norm {
            Norm::Linf => (8.0 / 255.0, 2.0 / 255.0),
            Norm::L2 => (0.5, 0.125),
        };
        Self { norm, eps, step_size, iterations, eot, random_start: true, seed }
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

/// One PGD iteration as the attacker saw it: mean cross-entropy and accuracy over the EOT draws.
#[derive(Clone, Debug)]
pub struct PgdTrace {
    pub iteration: usize,
    pub loss: f64,
    pub eot_accuracy: f64,
    /// Wall time of the iteration (its EOT purifications, their gradients and the step).
    pub seconds: f64,
}

/// The defended model: a purifier followed by a classifier.
pub struct Defence<'a, B: Backend> {
    pub purifier: &'a Purifier<'a, B>,
    pub classifier: &'a Classifier<B>,
}

/// Buffers of one batch size: a differentiable purify plan and the classifier's plan.
pub struct DefencePlan<B: Backend> {
    batch: usize,
    purify: PurifyPlan<B>,
    classifier: ClassifierPlan<B>,
    labels: B::Tensor,
    dlogits: B::Tensor,
}

impl<B: Backend> DefencePlan<B> {
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Salt of the voting draws' seed, so that the judge never reuses the attacker's noise.
const VOTE_SEED_SALT: u64 = 0x05EE_D0F7_07E5;

impl<'a, B: Backend> Defence<'a, B> {
    pub fn plan(&self, batch: usize) -> Result<DefencePlan<B>> {
        let b = self.purifier.backend;
        Ok(DefencePlan {
            batch,
            purify: self.purifier.plan_differentiable(batch)?,
            classifier: self.classifier.plan(b, batch, true)?,
            labels: b.zeros(&[batch])?,
            dlogits: b.zeros(&[batch, self.classifier.num_classes])?,
        })
    }

    /// Logits (host, batch x classes) of C(purify(x)) for one noise draw; pixels in [0, 1].
    pub fn logits(&self, plan: &mut DefencePlan<B>, pixels: &[f32], noise: NoiseDraw) -> Result<Vec<f32>> {
        let b = self.purifier.backend;
        self.purifier.purify_on_backend(&mut plan.purify, &to_model_range(pixels), noise)?;
        self.classifier.forward(b, &mut plan.classifier, plan.purify.output())?;
        b.download(&plan.classifier.logits)
    }

    /// For one noise draw: the per-image cross-entropy of C(purify(x)), whether each image is
    /// classified correctly, and the gradient of the summed cross-entropy with respect to the
    /// pixels (exact through the purification, BPDA on its guidance).
    pub fn loss_gradient(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        noise: NoiseDraw,
    ) -> Result<(Vec<f64>, Vec<bool>, Vec<f32>)> {
        let b = self.purifier.backend;
        let logits = self.logits(plan, pixels, noise)?;
        let label_values: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
        b.write(&mut plan.labels, &label_values)?;
        b.cross_entropy_grad(&plan.classifier.logits, &plan.labels, &mut plan.dlogits);
        let grad_x0 = self.classifier.input_vjp(b, &mut plan.classifier, Some(&plan.dlogits), None)?;
        let grad_x = self.purifier.input_vjp(&mut plan.purify, grad_x0)?;
        // x = 2 p - 1
        let grad_pixels: Vec<f32> = b.download(grad_x)?.iter().map(|g| 2.0 * g).collect();
        let k = self.classifier.num_classes;
        let (losses, correct) = logits
            .chunks(k)
            .zip(labels)
            .map(|(row, &label)| (-log_softmax_at(row, label as usize), argmax(row) == label as usize))
            .unzip();
        Ok((losses, correct, grad_pixels))
    }

    /// How many of `votes` purifications (each its own noise) the classifier gets right, per
    /// image. `batch_index` separates the batches of a run; the draws never overlap an attack's.
    pub fn correct_votes(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        votes: usize,
        seed: u64,
        batch_index: u64,
    ) -> Result<Vec<usize>> {
        let mut counts = vec![0; labels.len()];
        let k = self.classifier.num_classes;
        for v in 0..votes as u64 {
            let noise = NoiseDraw { seed: seed ^ VOTE_SEED_SALT, draw: batch_index * votes as u64 + v };
            let logits = self.logits(plan, pixels, noise)?;
            for ((count, row), &label) in counts.iter_mut().zip(logits.chunks(k)).zip(labels) {
                *count += usize::from(argmax(row) == label as usize);
            }
        }
        Ok(counts)
    }

    /// PGD-EOT on one batch (pixels in [0, 1], N x 3 x 32 x 32): returns the final adversarial
    /// images and the attacker's view of each iteration (also given to `progress`).
    pub fn pgd(
        &self,
        plan: &mut DefencePlan<B>,
        pixels: &[f32],
        labels: &[u8],
        settings: &PgdSettings,
        batch_index: u64,
        mut progress: impl FnMut(&PgdTrace),
    ) -> Result<(Vec<f32>, Vec<PgdTrace>)> {
        settings.validate()?;
        if pixels.len() != plan.batch * IMAGE_LEN || labels.len() != plan.batch {
            return Err(Error::invalid(format!(
                "the attack got {} pixel values and {} labels for a batch of {}",
                pixels.len(),
                labels.len(),
                plan.batch
            )));
        }
        if let Some(bad) = pixels.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(Error::invalid(format!("attack input pixels must lie in [0, 1], found {bad}")));
        }
        let mut adversarial = pixels.to_vec();
        if settings.random_start {
            let start = random_start(settings, plan.batch, batch_index);
            adversarial.iter_mut().zip(&start).for_each(|(p, d)| *p += d);
            project(&mut adversarial, pixels, settings);
        }
        let mut traces = Vec::with_capacity(settings.iterations);
        let mut gradient = vec![0.0f32; pixels.len()];
        for iteration in 0..settings.iterations {
            let started = std::time::Instant::now();
            gradient.fill(0.0);
            let (mut loss, mut correct) = (0.0, 0usize);
            for e in 0..settings.eot {
                let draw =
                    (batch_index * settings.iterations as u64 + iteration as u64) * settings.eot as u64 + e as u64;
                let noise = NoiseDraw { seed: settings.seed, draw };
                let (losses, right, g) = self.loss_gradient(plan, &adversarial, labels, noise)?;
                gradient.iter_mut().zip(&g).for_each(|(a, g)| *a += g);
                loss += losses.iter().sum::<f64>();
                correct += right.iter().filter(|&&c| c).count();
            }
            ascend(&mut adversarial, &gradient, settings);
            project(&mut adversarial, pixels, settings);
            let draws = (settings.eot * plan.batch) as f64;
            let seconds = started.elapsed().as_secs_f64();
            let trace = PgdTrace { iteration, loss: loss / draws, eot_accuracy: correct as f64 / draws, seconds };
            progress(&trace);
            traces.push(trace);
        }
        Ok((adversarial, traces))
    }
}

const IMAGE_LEN: usize = 3 * 32 * 32;

/// One ascent step: the sign of the gradient (l_inf) or its per-image unit direction (l_2).
fn ascend(x: &mut [f32], gradient: &[f32], settings: &PgdSettings) {
    match settings.norm {
        Norm::Linf => x
            .iter_mut()
            .zip(gradient)
            .filter(|(_, g)| **g != 0.0)
            .for_each(|(x, g)| *x += settings.step_size * g.signum()),
        Norm::L2 => {
            for (x, g) in x.chunks_mut(IMAGE_LEN).zip(gradient.chunks(IMAGE_LEN)) {
                let norm = l2_norm(g);
                if norm > 0.0 {
                    let k = (settings.step_size as f64 / norm) as f32;
                    x.iter_mut().zip(g).for_each(|(x, g)| *x += k * g);
                }
            }
        }
    }
}

/// Projects `x` onto the eps-ball around `origin` and then onto [0, 1]. Clipping to [0, 1] after
/// the ball only shrinks each coordinate's distance to the origin (which lies in [0, 1]), so the
/// result is in both sets.
fn project(x: &mut [f32], origin: &[f32], settings: &PgdSettings) {
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

/// The random start's offsets, from the noise generator (stream counted down from the top, so
/// it never meets a purification's streams).
fn random_start(settings: &PgdSettings, batch: usize, batch_index: u64) -> Vec<f32> {
    let stream = u64::MAX - batch_index;
    let blocks = (batch * IMAGE_LEN).div_ceil(4) as u64;
    match settings.norm {
        Norm::Linf => (0..blocks)
            .flat_map(|i| rng::uniform_block(settings.seed, stream, i))
            .take(batch * IMAGE_LEN)
            .map(|u| settings.eps * (2.0 * u - 1.0))
            .collect(),
        Norm::L2 => {
            let mut offsets: Vec<f32> = (0..blocks)
                .flat_map(|i| rng::gaussian_block(settings.seed, stream, i))
                .take(batch * IMAGE_LEN)
                .collect();
            for (n, d) in offsets.chunks_mut(IMAGE_LEN).enumerate() {
                let u = rng::uniform_block(settings.seed, stream - (1 << 32), (n / 4) as u64)[n % 4];
                let radius = u as f64 * settings.eps as f64;
                let k = (radius / l2_norm(d).max(1e-12)) as f32;
                d.iter_mut().for_each(|v| *v *= k);
            }
            offsets
        }
    }
}

fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt()
}

fn to_model_range(pixels: &[f32]) -> Vec<f32> {
    pixels.iter().map(|p| 2.0 * p - 1.0).collect()
}
