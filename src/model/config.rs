//! UNet configurations (METHOD.md section 1) and inferring one from a weights file.
use crate::data::tensor_file::TensorFile;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnetConfig {
    pub name: String,
    /// Base channel count `ch`.
    pub channels: usize,
    /// Channel multiplier per resolution level.
    pub channel_mult: Vec<usize>,
    pub res_blocks: usize,
    /// Resolutions (in pixels) that get AttnBlocks.
    pub attention_resolutions: Vec<usize>,
    /// Input height and width.
    pub resolution: usize,
}

/// The configs the project knows by name.
pub const CONFIG_NAMES: &[&str] = &["cifar10", "cifar10-small"];

impl UnetConfig {
    /// The published DDPM CIFAR-10 model (Ho et al. 2020): 35,746,307 parameters.
    pub fn cifar10() -> Self {
        Self::cifar_with_channels("cifar10", 128)
    }
    /// The project's own default: same layout at half the width, 8,952,067 parameters.
    pub fn cifar10_small() -> Self {
        Self::cifar_with_channels("cifar10-small", 64)
    }
    fn cifar_with_channels(name: &str, channels: usize) -> Self {
        Self {
            name: name.into(),
            channels,
            channel_mult: vec![1, 2, 2, 2],
            res_blocks: 2,
            attention_resolutions: vec![16],
            resolution: 32,
        }
    }

    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "cifar10" => Ok(Self::cifar10()),
            "cifar10-small" => Ok(Self::cifar10_small()),
            other => Err(Error::invalid(format!("unknown UNet config `{other}` (known: {})", CONFIG_NAMES.join(", ")))),
        }
    }

    /// Width of the time embedding (4 ch).
    pub fn temb_channels(&self) -> usize {
        4 * self.channels
    }

    /// Reads the config off the tensors of a weights file: `ch` from conv_in, the multipliers from
    /// each level's first block, the block count and attention levels from which names exist.
    /// The resolution cannot be seen in the weights; these UNets are for 32x32 CIFAR images.
    pub fn infer(file: &TensorFile) -> Result<Self> {
        let fail = |reason: String| Error::UnknownConfig { file: file.file(), reason };
        let conv_in = file
            .shape("conv_in.weight")
            .ok()
            .ok_or_else(|| fail("no tensor `conv_in.weight`: not a DDPM UNet checkpoint".into()))?;
        let channels = match conv_in {
            [c, 3, 3, 3] => *c,
            other => return Err(fail(format!("`conv_in.weight` has shape {other:?}, expected [ch, 3, 3, 3]"))),
        };
        if channels % 32 != 0 || channels < 64 {
            return Err(fail(format!(
                "conv_in has {channels} output channels; GroupNorm(32) needs a multiple of 32, at least 64"
            )));
        }
        let mut channel_mult = Vec::new();
        while let Ok(shape) = file.shape(&format!("down.{}.block.0.conv2.weight", channel_mult.len())) {
            if shape[0] % channels != 0 {
                return Err(fail(format!(
                    "level {} has {} channels, not a multiple of ch = {channels}",
                    channel_mult.len(),
                    shape[0]
                )));
            }
            channel_mult.push(shape[0] / channels);
        }
        if channel_mult.is_empty() {
            return Err(fail("no `down.0.block.0` tensors".into()));
        }
        let mut res_blocks = 0;
        while file.contains(&format!("down.0.block.{res_blocks}.conv1.weight")) {
            res_blocks += 1;
        }
        let resolution = 32;
        let attention_resolutions = (0..channel_mult.len())
            .filter(|level| file.contains(&format!("down.{level}.attn.0.q.weight")))
            .map(|level| resolution >> level)
            .collect();
        let mut config =
            Self { name: String::new(), channels, channel_mult, res_blocks, attention_resolutions, resolution };
        config.name = CONFIG_NAMES
            .iter()
            .find(|n| Self::by_name(n).map(|c| Self { name: String::new(), ..c } == config).unwrap_or(false))
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("custom (ch {}, mult {:?})", config.channels, config.channel_mult));
        Ok(config)
    }
}
