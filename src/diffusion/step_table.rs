//! A purification's per-step scalars as one table the backend reads (`backend::StepColumn`): row 0
//! is the diffusion to t*, rows 1.. the reverse steps in the order they run. Written once per
//! purification (its seed and noise streams change with the draw), read through a cursor the steps
//! advance themselves, so no step sends anything from the host and every step issues the same
//! launches with the same arguments (what a recorded graph replays).
//!
//! Besides the schedule's numbers, the sampler keeps its own per-step weights in the free columns,
//! each computed exactly as the host computed it when it passed it as a scalar (same f32
//! operations), so that the table-driven sampler gives the same bits.
use crate::backend::{step_table_u64, StepColumn, STEP_COLUMNS};
use crate::diffusion::{GradientPath, Guidance, ReverseStep, Schedule};

/// The guidance shift is `delta = row[GUIDANCE_A] p + row[GUIDANCE_B] q`: pixel mode p = x_t,
/// q = x_in; adversarial x0 path p = u, q = J_eps^T u; xt path p = q = u (GUIDANCE_B = 0).
pub const GUIDANCE_A: StepColumn = StepColumn::User0;
pub const GUIDANCE_B: StepColumn = StepColumn::User1;
/// 1 / sqrt(abar_t): the xt path's classifier input x_t / sqrt(abar), and the VJP's x0 term.
pub const INV_SQRT_ABAR: StepColumn = StepColumn::User2;
/// -sqrt(1 - abar_t) / sqrt(abar_t): the VJP's eps term.
pub const NEG_EPS_WEIGHT: StepColumn = StepColumn::User3;

/// Whether a reverse step gets a guidance shift: a guided mode and sigma_t^2 > 0 (the last DDPM
/// step has none).
pub fn is_guided(guidance: &Guidance, step: &ReverseStep) -> bool {
    !matches!(guidance, Guidance::None) && step.guidance_variance != 0.0
}

/// The guidance shift's two weights at `step` (zero where it has none).
fn guidance_weights(guidance: &Guidance, step: &ReverseStep) -> (f32, f32) {
    if !is_guided(guidance, step) {
        return (0.0, 0.0);
    }
    let sigma2 = step.guidance_variance;
    let c = step.coefficients;
    match *guidance {
        Guidance::None => (0.0, 0.0),
        Guidance::Pixel { scale } => {
            // grad ||x_t - sqrt(abar) x_in||^2 = 2 (x_t - sqrt(abar) x_in)
            let k = -2.0 * scale * sigma2;
            (k, -k * c.sqrt_abar)
        }
        Guidance::Adversarial { scale, path, .. } => {
            let k = scale * sigma2 / c.sqrt_abar;
            match path {
                // grad_{x_t} L = (u - sqrt(1 - abar) J_eps^T u) / sqrt(abar), u masked by the clip.
                GradientPath::X0 => (k, -k * c.sqrt_one_minus_abar),
                GradientPath::Xt => (k, 0.0),
            }
        }
    }
}

/// The table (row-major, `(steps.len() + 1) x STEP_COLUMNS`) of a purification from `t_star`
/// through `steps`, whose noise has seed `seed` and, at step t (0: the q-sample), stream `stream(t)`.
pub fn step_table(
    schedule: &Schedule,
    t_star: usize,
    steps: &[ReverseStep],
    guidance: &Guidance,
    seed: u64,
    stream: impl Fn(usize) -> u64,
) -> Vec<f32> {
    let mut table = Vec::with_capacity((steps.len() + 1) * STEP_COLUMNS);
    let mut row = |set: &dyn Fn(&mut [f32; STEP_COLUMNS]), t: usize| {
        let mut r = [0.0f32; STEP_COLUMNS];
        r[StepColumn::One as usize] = 1.0;
        r[StepColumn::Seed as usize..][..4].copy_from_slice(&step_table_u64(seed));
        r[StepColumn::Stream as usize..][..4].copy_from_slice(&step_table_u64(stream(t)));
        set(&mut r);
        table.extend_from_slice(&r);
    };
    let (a, s) = schedule.diffuse_weights(t_star);
    row(
        &|r| {
            r[StepColumn::SqrtAbar as usize] = a;
            r[StepColumn::SqrtOneMinusAbar as usize] = s;
        },
        0,
    );
    for step in steps {
        let c = step.coefficients;
        let (guidance_a, guidance_b) = guidance_weights(guidance, step);
        row(
            &|r| {
                r[StepColumn::SqrtAbar as usize] = c.sqrt_abar;
                r[StepColumn::SqrtOneMinusAbar as usize] = c.sqrt_one_minus_abar;
                r[StepColumn::C0 as usize] = c.c0;
                r[StepColumn::Ct as usize] = c.ct;
                r[StepColumn::NoiseStd as usize] = step.noise_std;
                r[StepColumn::UnetStep as usize] = (step.t - 1) as f32;
                r[GUIDANCE_A as usize] = guidance_a;
                r[GUIDANCE_B as usize] = guidance_b;
                r[INV_SQRT_ABAR as usize] = 1.0 / c.sqrt_abar;
                r[NEG_EPS_WEIGHT as usize] = -c.sqrt_one_minus_abar / c.sqrt_abar;
            },
            step.t,
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::Sampler;

    #[test]
    fn rows_hold_the_schedule_and_the_noise_streams() {
        let schedule = Schedule::ddpm();
        let steps = schedule.reverse_steps(3, Sampler::Ddpm).unwrap();
        let seed = 0x0123_4567_89AB_CDEF;
        let table = step_table(&schedule, 3, &steps, &Guidance::Pixel { scale: 2.0 }, seed, |t| 1001 * 5 + t as u64);
        assert_eq!(table.len(), 4 * STEP_COLUMNS);
        let row = |i: usize| &table[i * STEP_COLUMNS..(i + 1) * STEP_COLUMNS];
        let (a, s) = schedule.diffuse_weights(3);
        assert_eq!((row(0)[0], row(0)[1]), (a, s));
        for (i, step) in steps.iter().enumerate() {
            let r = row(i + 1);
            assert_eq!(r[StepColumn::C0 as usize], step.coefficients.c0);
            assert_eq!(r[StepColumn::UnetStep as usize], (step.t - 1) as f32);
            assert_eq!(r[StepColumn::NoiseStd as usize], step.noise_std);
            let piece = |first: StepColumn| (0..4).map(|k| (r[first as usize + k] as u64) << (16 * k)).sum::<u64>();
            assert_eq!(piece(StepColumn::Seed), seed);
            assert_eq!(piece(StepColumn::Stream), 5005 + step.t as u64);
            assert_eq!((r[StepColumn::Zero as usize], r[StepColumn::One as usize]), (0.0, 1.0));
        }
        // The last DDPM step has no guidance (sigma^2 = 0) and no noise.
        let last = row(3);
        assert_eq!(
            (last[GUIDANCE_A as usize], last[GUIDANCE_B as usize], last[StepColumn::NoiseStd as usize]),
            (0.0, 0.0, 0.0)
        );
        assert!(row(1)[GUIDANCE_A as usize] < 0.0);
    }
}
