"""PyTorch reference models for the purification engine.

This file is the independent reference that the Rust CPU backend is tested against. It is
written from ../shared/METHOD.md (section 1: the DDPM UNet; section 4: the classifiers) and
../shared/data/README.md (the CIFAR ResNets), in plain PyTorch with no tricks, so that a
disagreement with the Rust code points at one of the two implementations and not at this
file's cleverness.

Contents:
- `DDPMUNet`: the noise predictor eps_theta(x, t), with the parameter names of the public
  PyTorch ports of the original DDPM checkpoint.
- `CifarResNet`: the CIFAR ResNet-20/32/44/56 ("option A" shortcut), with the input
  normalisation built in, so it takes pixels in [0, 1].
- `deterministic_tensor` / `deterministic_state_dict`: a counter-based weight generator that the
  Rust tests reproduce bit-exactly, so that golden outputs of big random UNets can be checked
  without committing their weights. The spec is in tests/golden/README.md.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# DDPM UNet (METHOD.md section 1)
# ---------------------------------------------------------------------------------------------

# The UNet configs of METHOD.md section 1, with the parameter counts that the table states; the
# counts are asserted by `count_params` so a layout mistake cannot go unnoticed.
UNET_CONFIGS = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
    "cifar10-small": dict(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
}
UNET_PARAM_COUNTS = {"cifar10": 35_746_307, "cifar10-small": 8_952_067}

GROUPNORM_GROUPS = 32
GROUPNORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=GROUPNORM_EPS, affine=True)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding: concat(sin(t f), cos(t f)), f_i = exp(-ln(10000) i / (half - 1)).

    `t` is used as given (a float per sample). METHOD.md feeds it the 0-based step index, so the
    caller passes t - 1 for the 1-based diffusion step t; this function does not shift it.
    Sine half first, cosine half second (concatenated, not interleaved).
    """
    assert t.ndim == 1, "t must be a 1-d tensor with one value per sample"
    assert dim % 2 == 0, "the embedding dimension (ch) must be even"
    half = dim // 2
    # The frequencies are formed in the dtype of t, so a float64 reference stays float64.
    i = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * i / (half - 1))
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        # The 1x1 shortcut exists only when the channel count changes; otherwise it is the
        # identity and has no parameters (this matters for the published parameter names).
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(n, c, height * width)
        k = self.k(h).reshape(n, c, height * width)
        v = self.v(h).reshape(n, c, height * width)
        # scores[b, query, key] = q^T k / sqrt(C); softmax over the key axis.
        scores = torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(c)
        attn = torch.softmax(scores, dim=2)
        # out[b, c, query] = sum_key v[b, c, key] attn[b, query, key]   (= v A^T)
        out = torch.einsum("bck,bqk->bcq", v, attn).reshape(n, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only) as in the original TensorFlow model, whose
        # "SAME" padding of a stride-2 conv on an even size pads that way.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepMLP(nn.Module):
    """Holds `dense` as a ModuleList so the parameters are named temb.dense.{0,1}."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.dense[1](F.silu(self.dense[0](e)))


class DDPMUNet(nn.Module):
    """eps_theta(x, t) of Ho et al. 2020, laid out as METHOD.md section 1.

    forward(x, t): x is N x 3 x R x R in [-1, 1]; t is a float tensor [N] holding the value fed to
    the sinusoidal embedding (the 0-based step index). Returns the predicted noise, N x 3 x R x R.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Iterable[int] = (16,),
        resolution: int = 32,
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        self.ch = ch
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.resolution = resolution
        self.temb_ch = 4 * ch
        num_levels = len(self.ch_mult)

        self.temb = TimestepMLP(ch, self.temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        # Down path. `skip_channels` mirrors the skip stack of forward(), so the up path can be
        # built with the right input widths: conv_in's output, every block output, every
        # downsample output.
        skip_channels = [ch]
        block_in = ch
        res = resolution
        self.down = nn.ModuleList()
        for level in range(num_levels):
            block_out = ch * self.ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in self.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
                skip_channels.append(block_in)
            if level != num_levels - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
                skip_channels.append(block_in)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)

        # Up path: built from the deepest level to level 0 (the order it runs in), but stored so
        # that self.up[level] is that level, giving the published names up.{level}.*.
        up_stages = [None] * num_levels
        for level in reversed(range(num_levels)):
            block_out = ch * self.ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                skip_in = skip_channels.pop()
                stage.block.append(
                    ResnetBlock(block_in + skip_in, block_out, self.temb_ch, dropout)
                )
                block_in = block_out
                if res in self.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            up_stages[level] = stage
        assert not skip_channels, "every skip must be consumed by the up path"
        self.up = nn.ModuleList(up_stages)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, stride=1, padding=1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """temb = dense1(SiLU(dense0(sinusoid(t)))): N x 4ch, exposed for debugging."""
        return self.temb(timestep_embedding(t.to(self.conv_in.weight.dtype), self.ch))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == x.shape[3] == self.resolution, "input size must match the config"
        temb = self.embed_time(t)

        skips = [self.conv_in(x)]
        for level, stage in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = stage.block[j](skips[-1], temb)
                if len(stage.attn) > 0:
                    h = stage.attn[j](h)
                skips.append(h)
            if level != len(self.down) - 1:
                skips.append(stage.downsample(skips[-1]))

        h = skips[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for j in range(self.num_res_blocks + 1):
                h = stage.block[j](torch.cat([h, skips.pop()], dim=1), temb)
                if len(stage.attn) > 0:
                    h = stage.attn[j](h)
            if level != 0:
                h = stage.upsample(h)
        assert not skips

        return self.conv_out(F.silu(self.norm_out(h)))


def make_unet(config: str) -> DDPMUNet:
    return DDPMUNet(**UNET_CONFIGS[config])


def count_params(model: nn.Module, config: str | None = None) -> int:
    """Number of parameters; with `config`, also asserts the count that METHOD.md states."""
    n = sum(p.numel() for p in model.parameters())
    if config is not None:
        expected = UNET_PARAM_COUNTS[config]
        assert n == expected, f"{config}: {n} parameters, METHOD.md says {expected}"
    return n


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (METHOD.md section 4, ../shared/data/README.md)
# ---------------------------------------------------------------------------------------------

# The classifiers were trained on inputs normalised with these (ImageNet) statistics; the network
# applies them itself so that every caller, and every attack, works on pixels in [0, 1].
CIFAR_RESNET_MEAN = (0.485, 0.456, 0.406)
CIFAR_RESNET_STD = (0.229, 0.224, 0.225)
BATCHNORM_EPS = 1e-5


class InferenceBatchNorm2d(nn.Module):
    """BatchNorm with its running statistics, always (inference only).

    Hand-written rather than nn.BatchNorm2d for two reasons: the checkpoints hold no
    `num_batches_tracked`, so this keeps the state dict exactly the checkpoint's keys; and the
    classifier is only ever used frozen (attacks differentiate through it in inference mode), so a
    stray model.train() must not switch it to batch statistics.
    """

    def __init__(self, channels: int, eps: float = BATCHNORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def per_channel(v: torch.Tensor) -> torch.Tensor:
            return v[None, :, None, None]

        normalised = (x - per_channel(self.running_mean)) / torch.sqrt(
            per_channel(self.running_var) + self.eps
        )
        return normalised * per_channel(self.weight) + per_channel(self.bias)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = InferenceBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = InferenceBatchNorm2d(planes)
        # "Option A": a parameter-free shortcut. When the shape changes, subsample by 2 and pad
        # planes/4 zero channels on each side (in_planes = planes/2, so this doubles the channels).
        self.downsample_shortcut = stride != 1 or in_planes != planes
        self.pad_channels = planes // 4

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample_shortcut:
            return x
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-{20,32,44,56} with the option-A shortcut.

    Takes pixels in [0, 1] (N x 3 x 32 x 32, RGB); the first step of the network is the
    per-channel normalisation (x - mean) / std with CIFAR_RESNET_MEAN / CIFAR_RESNET_STD, kept as
    non-persistent buffers so the state dict holds exactly the checkpoint's keys.
    """

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        assert (depth - 2) % 6 == 0 and depth >= 8, "depth must be 6n + 2"
        n = (depth - 2) // 6
        self.register_buffer(
            "input_mean", torch.tensor(CIFAR_RESNET_MEAN).reshape(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(CIFAR_RESNET_STD).reshape(1, 3, 1, 1), persistent=False
        )
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = InferenceBatchNorm2d(16)
        in_planes = 16
        for index, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for k in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if k == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate features (global average pool), for pixels x in [0, 1]."""
        h = (x - self.input_mean) / self.input_std
        h = F.relu(self.bn1(self.conv1(h)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def load_cifar_resnet(path: str, depth: int) -> CifarResNet:
    """Loads a checkpoint from ../shared/weights, checking that keys and shapes match exactly."""
    from safetensors.torch import load_file

    model = CifarResNet(depth)
    tensors = load_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    for name, value in tensors.items():
        want = expected[name].shape
        assert value.shape == want, f"{name}: shape {tuple(value.shape)}, model has {tuple(want)}"
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def read_cifar_binary(path: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records: 1 label byte + 3072 planar RGB bytes. Returns (uint8 N x 3 x 32 x
    32 images, int64 labels)."""
    raw = np.fromfile(path, dtype=np.uint8)
    assert raw.size % 3073 == 0, f"{path}: size {raw.size} is not a whole number of records"
    records = raw.reshape(-1, 3073)
    if count is not None:
        records = records[:count]
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Deterministic weights (spec: tests/golden/README.md)
# ---------------------------------------------------------------------------------------------

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def tensor_key(name: str, seed: int) -> int:
    """The per-tensor stream key: FNV-1a of the name, XOR the seed spread by the golden gamma."""
    return fnv1a64(name.encode("utf-8")) ^ ((seed * GOLDEN_GAMMA) & MASK64)


def uniform_stream(key: int, count: int) -> np.ndarray:
    """u_i in [-1, 1), i = 0..count-1: splitmix64 of key + (i+1) * gamma, top 24 bits scaled.

    Counter-based (element i depends only on key and i), so any implementation can produce any
    element independently; numpy's uint64 arithmetic wraps mod 2^64, as the spec requires.
    """
    with np.errstate(over="ignore"):
        i = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(key) + i * np.uint64(GOLDEN_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    # A 24-bit integer over 2^23, minus 1: exact in float64 and in float32.
    top24 = (z >> np.uint64(40)).astype(np.float64)
    return (top24 / float(1 << 23) - 1.0).astype(np.float32)


def deterministic_tensor(name: str, shape: Sequence[int], seed: int) -> np.ndarray:
    """The generated float32 tensor for a parameter name and shape (spec: tests/golden/README.md).

    Every product below is one float32 multiply (and, for norm gammas, one float32 add after
    it), so an implementation in another language gets the same bits as long as it does not fuse
    the two into an FMA.
    """
    shape = tuple(int(d) for d in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    u = uniform_stream(tensor_key(name, seed), numel)
    if name.endswith(".weight") and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:], dtype=np.int64))
        scale = np.float32(math.sqrt(3.0 / fan_in))
        values = u * scale
    elif name.endswith(".weight") and len(shape) == 1:
        values = np.float32(1.0) + u * np.float32(0.2)
    elif name.endswith((".bias", ".running_mean")):
        values = u * np.float32(0.1)
    elif len(shape) == 1 and name.endswith(".running_var"):
        values = np.float32(1.0) + u * np.float32(0.2)  # positive, like the norm gammas
    else:
        raise ValueError(f"no deterministic rule for tensor {name!r} of shape {shape}")
    assert values.dtype == np.float32
    return values.reshape(shape)


def deterministic_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A full float32 state dict for `model` from the generator, ready for load_state_dict."""
    return {
        name: value if not value.is_floating_point()  # batch-norm counters keep their value
        else torch.from_numpy(deterministic_tensor(name, tuple(value.shape), seed))
        for name, value in model.state_dict().items()
    }


# ---------------------------------------------------------------------------------------------
# WideResNet (METHOD.md section 4: RobustBench's "Standard" WideResNet-28-10)
# ---------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block of RobustBench's WideResNet, with its parameter names."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # When the shape changes, the shortcut reads the activated input, as in the original.
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        return shortcut + out


class WideNetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k in RobustBench's layout (conv1, block1..3.layer.i, bn1, fc).

    Pixels in [0, 1], no input normalisation (as RobustBench's `Standard` model). BatchNorm is
    nn.BatchNorm2d, so the state dict has `num_batches_tracked` like the published checkpoint.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n + 4"
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideNetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = WideNetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = WideNetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        h = self.relu(self.bn1(h))
        return self.fc(h.mean(dim=(2, 3)))
