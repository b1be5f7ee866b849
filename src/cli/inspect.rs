//! `purifier inspect`.
use std::path::PathBuf;

use clap::Args;
use purifier::data::tensor_file::TensorFile;
use purifier::error::{Error, Result};
use purifier::model::params::ParamLister;
use purifier::model::{Classifier, Unet, UnetConfig};

#[derive(Args)]
pub struct InspectArgs {
    /// A safetensors weights file.
    pub weights: PathBuf,
    /// Also list the network's layers (UNet or classifier) in execution order with their output shapes.
    #[arg(long)]
    pub layers: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let file = TensorFile::open(&args.weights)?;
    let b = purifier::backend::cpu::CpuBackend;
    let stored: usize =
        file.names().iter().map(|n| file.shape(n).map(|s| s.iter().product::<usize>()).unwrap_or(0)).sum();
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for name in file.names() {
        *dtypes.entry(file.dtype(name)?.to_string()).or_default() += 1;
    }
    println!("file: {}", args.weights.display());
    println!("tensors: {} ({} values; dtypes {:?})", file.names().len(), stored, dtypes);
    if file.contains("conv_in.weight") {
        let config = UnetConfig::infer(&file)?;
        let mut lister = ParamLister::new(&b);
        let structure = Unet::load(&config, &mut lister)?;
        if args.layers {
            for (name, [c, h, w]) in structure.layers() {
                println!("  {name:<24} -> {c} x {h} x {w}");
            }
        }
        println!(
            "network: DDPM UNet, config {} (ch {}, mult {:?}, {} res blocks, attention at {:?})",
            config.name, config.channels, config.channel_mult, config.res_blocks, config.attention_resolutions
        );
        println!("parameters: {}", lister.count());
        Unet::from_file(&b, &file)?;
        println!("loads: yes (every tensor present, shaped as expected, finite; nothing extra)");
    } else if file.contains("layer1.0.conv1.weight") || file.contains("block1.layer.0.conv1.weight") {
        let classifier = Classifier::load(&b, &file)?;
        let params: usize = file
            .names()
            .iter()
            .filter(|n| {
                !n.ends_with("running_mean") && !n.ends_with("running_var") && !n.ends_with("num_batches_tracked")
            })
            .map(|n| file.shape(n).map(|s| s.iter().product::<usize>()).unwrap_or(0))
            .sum();
        if args.layers {
            for (name, [c, h, w]) in classifier.layers() {
                println!("  {name:<52} -> {c} x {h} x {w}");
            }
        }
        println!(
            "network: {} classifier ({} classes, {}-d features)",
            classifier.name,
            classifier.num_classes,
            classifier.feature_dim()
        );
        println!("parameters: {params}");
        println!("loads: yes");
    } else {
        return Err(Error::UnknownConfig {
            file: file.file(),
            reason: "neither a DDPM UNet (conv_in.weight), a CIFAR ResNet (layer1.0.conv1.weight) nor a \
                     WideResNet (block1.layer.0.conv1.weight)"
                .into(),
        });
    }
    Ok(())
}
