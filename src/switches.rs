//! The benchmark's A/B switches: environment variables that turn one optimisation off (or, for
//! the wide convolution tile, choose where it runs), so that one GPU run measures what each is
//! worth (scripts/gpu_suite.sh benches the UNet rows each way). Each is read once. A value that is
//! not one of the switch's is an error naming the variable and its values (`check`, when the
//! command line picks a backend and when a CUDA backend is made): a mistyped switch would
//! otherwise benchmark the default under the wrong name.

use std::sync::OnceLock;

use crate::{Error, Result};

/// An environment variable with a fixed set of values, the first being the default (unset).
struct Switch {
    name: &'static str,
    values: &'static [&'static str],
    read: OnceLock<std::result::Result<&'static str, String>>,
}

impl Switch {
    const fn new(name: &'static str, values: &'static [&'static str]) -> Self {
        Switch { name, values, read: OnceLock::new() }
    }

    fn read(&self) -> &std::result::Result<&'static str, String> {
        self.read.get_or_init(|| {
            let Some(value) = std::env::var_os(self.name) else { return Ok(self.values[0]) };
            self.values.iter().find(|&&v| value == v).copied().ok_or_else(|| {
                format!("{}={}: expected one of {}", self.name, value.to_string_lossy(), self.values.join(", "))
            })
        })
    }

    /// The value set, or the default where the value is not one of the switch's (which `check`
    /// reports before any backend runs).
    fn value(&self) -> &'static str {
        self.read().as_ref().copied().unwrap_or(self.values[0])
    }
}

static CONV_WIDE: Switch = Switch::new("PURIFIER_CONV_WIDE", &["backward", "off", "on"]);
static CONV_SPLIT_K: Switch = Switch::new("PURIFIER_CONV_SPLIT_K", &["on", "off"]);
static GRADIENT_COPIES: Switch = Switch::new("PURIFIER_GRADIENT_COPIES", &["on", "off"]);

/// Every switch's value is one of its own, or an error naming the first that is not.
pub fn check() -> Result<()> {
    for switch in [&CONV_WIDE, &CONV_SPLIT_K, &GRADIENT_COPIES] {
        switch.read().as_ref().map_err(|e| Error::invalid(e.clone()))?;
    }
    Ok(())
}

/// Where the convolution launcher may pick the wide tensor-core tile (128 x 128 a block):
/// `PURIFIER_CONV_WIDE` = `backward` (the default: the input gradient only), `off`, or `on` (the
/// forward too, as at dddc2c9). On an H200 at dddc2c9, cifar10 bf16 at batch 64 (the
/// `cifar10-bf16` and `cifar10-bf16-no-wide` profiles of
/// bench/results/gpu-suite-2026-11-30-dddc2c9fa6.log), the narrow tile alone took the forward's
/// convolutions 4.31 ms where with the wide tile they took 4.85 (3x3 128 -> 128 at 32x32: 0.68
/// against 0.82), and the input gradient's 7.20 where they took 6.87 (3x3 256 -> 256 at 16x16:
/// 1.14 against 0.70). Most input gradients then read an f32 dout, which the wide tile's halved
/// loader work per mma helped most; what it is worth on the 16-bit dout they read now is for
/// the next GPU run (the suite benches all three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WideTiles {
    pub forward: bool,
    pub backward: bool,
}

pub fn wide_conv_tiles() -> WideTiles {
    match CONV_WIDE.value() {
        "off" => WideTiles { forward: false, backward: false },
        "on" => WideTiles { forward: true, backward: true },
        _ => WideTiles { forward: false, backward: true },
    }
}

/// Whether the CUDA backend splits small convolution grids' K loops (`PURIFIER_CONV_SPLIT_K`,
/// `on` by default; `off`: no workspace, every convolution unsplit).
pub fn conv_split_k() -> bool {
    CONV_SPLIT_K.value() == "on"
}

/// Whether 16-bit UNet plans keep their 16-bit copies of finished gradients
/// (`PURIFIER_GRADIENT_COPIES`, `on` by default).
pub fn gradient_copies() -> bool {
    GRADIENT_COPIES.value() == "on"
}
