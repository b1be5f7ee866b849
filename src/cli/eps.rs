//! `purifier eps`.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use purifier::backend::{Backend, TensorShape};
use purifier::data::tensor_file::{write_safetensors, TensorFile};
use purifier::error::{check_finite, Error, Result};
use purifier::model::Unet;

use super::args::DeviceArgs;
use super::backend::unet_backend;
use super::outputs::Outputs;
use super::pipeline::open_weights;

#[derive(Args)]
pub struct EpsArgs {
    /// DDPM UNet weights.
    #[arg(long)]
    pub weights: PathBuf,
    /// Holds `x` (N x 3 x 32 x 32, f32, in [-1, 1]), `t` (N step indices 0..999) and, with --vjp, `v`.
    #[arg(long)]
    pub input: PathBuf,
    /// Gets `eps` and, with --vjp, `grad_x` = d sum(eps * v) / dx.
    #[arg(long)]
    pub output: PathBuf,
    /// Also compute the input VJP of the noise predictor (`grad_x`), with `v` from --input.
    #[arg(long)]
    pub vjp: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: &EpsArgs) -> Result<()> {
    purifier::with_backend!(unet_backend(&args.device)?, b => run_on(b, args))
}

fn run_on<B: Backend>(b: B, args: &EpsArgs) -> Result<()> {
    let unet = Unet::from_file(&b, &open_weights(&args.weights, "DDPM UNet weights")?)?;
    let input = TensorFile::open(&args.input)?;
    let (shape, x) = input.get_f32("x")?;
    let r = unet.config.resolution;
    if shape.len() != 4 || shape[1..] != [3, r, r] || shape[0] == 0 {
        return Err(Error::invalid(format!(
            "{}: tensor `x` has shape {shape:?}, expected N x 3 x {r} x {r} (N >= 1)",
            input.file()
        )));
    }
    check_finite(&x, || format!("{}: tensor `x`", input.file()))?;
    let n = shape[0];
    let (t_shape, t) = input.get_indices("t")?;
    if t_shape != [n] {
        return Err(Error::ShapeMismatch { file: input.file(), name: "t".into(), found: t_shape, expected: vec![n] });
    }
    if let Some(bad) = t.iter().find(|&&s| !(0..1000).contains(&s)) {
        return Err(Error::invalid(format!("{}: step index {bad} in `t` is out of range 0..999", input.file())));
    }
    let v = if args.vjp {
        let v = input.require_f32("v", &shape)?;
        check_finite(&v, || format!("{}: tensor `v`", input.file()))?;
        Some(v)
    } else {
        None
    };
    let mut files = Outputs::new([args.weights.as_path(), args.input.as_path()]);
    let output_file = files.file(&args.output, "--output")?;
    let mut plan = unet.plan(&b, n, args.vjp)?;
    let x_dev = b.upload(&x, &shape)?;
    let t: Vec<f32> = t.iter().map(|&s| s as f32).collect();
    let started = Instant::now();
    let eps = b.download(unet.forward(&b, &mut plan, &x_dev, &t)?)?;
    let mut outputs: Vec<(&str, Vec<f32>)> = vec![("eps", eps)];
    if let Some(v) = v {
        let v_dev = b.upload(&v, &shape)?;
        let grad = unet.input_vjp(&b, &mut plan, &v_dev)?;
        debug_assert_eq!(grad.shape(), &shape[..]);
        outputs.push(("grad_x", b.download(grad)?));
    }
    let seconds = started.elapsed().as_secs_f64();
    let tensors: Vec<(&str, &[usize], &[f32])> =
        outputs.iter().map(|(name, data)| (*name, &shape[..], &data[..])).collect();
    write_safetensors(files.staged_file(output_file), &tensors)?;
    files.commit()?;
    println!(
        "wrote {} ({}) for {n} images, config {}, on {} in {seconds:.2} s",
        args.output.display(),
        outputs.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        unet.config.name,
        b.name()
    );
    Ok(())
}
