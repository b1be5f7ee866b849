"""Converts a DDPM CIFAR-10 UNet checkpoint (the common PyTorch port) to the engine's safetensors.

Source: the PyTorch port of Ho et al.'s DDPM CIFAR-10 model (e.g. pesser/pytorch_diffusion's
`ema_diffusion_cifar10_model/model-790000.ckpt`, the file DiffPure loads), a `torch.save`d state
dict whose names are exactly the ones of ../shared/METHOD.md section 1: `temb.dense.{0,1}`,
`conv_in`, `down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}`,
`down.{i}.attn.{j}.{norm,q,k,v,proj_out}`, `down.{i}.downsample.conv`, `mid.{block_1,attn_1,block_2}`,
`up.{i}.block.{j}`, `up.{i}.attn.{j}`, `up.{i}.upsample.conv`, `norm_out`, `conv_out`. The state
dict may sit at the top level or under `ema` / `state_dict` / `model` (an EMA copy is preferred
when there are both; `--key` picks one), with a `module.` prefix (DataParallel) or not.
Checkpoints of our own recipe (`train_ddpm.py`'s checkpoint.pt: `model` and `ema`) convert too.

Output: the same names, minus the prefix, in safetensors: F32 (the default: lossless) or F16
(`--fp16`). The config (ch, ch_mult, res blocks, attention levels) is read off the tensors, like
the engine does, then every expected tensor must be present with its shape, with no extra
tensor, every value finite; anything else is one clear error and nothing is written.

PyTorch is not needed: the checkpoint is read by torch_checkpoint.py's restricted unpickler
(which also refuses pickles that would run code). Usage:

    python weights/convert_ddpm.py model-790000.ckpt weights/ddpm_cifar10.safetensors [--fp16]
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_checkpoint import (  # noqa: E402
    CheckpointError,
    check_against_layout,
    converter_main,
    find_state_dict,
    load_checkpoint,
    strip_prefixes,
    write_safetensors,
)

RESOLUTION = 32  # CIFAR-10; the weights do not tell the resolution, so the attention levels are
                 # reported as resolutions for 32x32 inputs.
KNOWN_CONFIGS = {  # (ch, ch_mult, res blocks, attention resolutions) -> METHOD.md name
    (128, (1, 2, 2, 2), 2, (16,)): "cifar10",
    (64, (1, 2, 2, 2), 2, (16,)): "cifar10-small",
}


def ddpm_layout(ch: int, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
                attn_resolutions=(16,), resolution: int = RESOLUTION,
                in_channels: int = 3, out_channels: int = 3) -> dict[str, tuple]:
    """Every parameter name of the UNet with its shape, in the order of torch_models.DDPMUNet's
    state_dict (a test checks the two agree), without needing PyTorch."""
    shapes: dict[str, tuple] = {}
    temb_ch = 4 * ch

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def linear(name, cin, cout):
        shapes[f"{name}.weight"] = (cout, cin)
        shapes[f"{name}.bias"] = (cout,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        linear(f"{name}.temb_proj", temb_ch, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    linear("temb.dense.0", ch, temb_ch)
    linear("temb.dense.1", temb_ch, temb_ch)
    conv("conv_in", in_channels, ch, 3)
    skips = [ch]
    block_in, res = ch, resolution
    levels = len(ch_mult)
    for i in range(levels):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            resblock(f"down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            skips.append(block_in)
        if res in attn_resolutions:
            for j in range(num_res_blocks):
                attn(f"down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"down.{i}.downsample.conv", block_in, block_in, 3)
            skips.append(block_in)
            res //= 2
    resblock("mid.block_1", block_in, block_in)
    attn("mid.attn_1", block_in)
    resblock("mid.block_2", block_in, block_in)
    up: dict[int, dict[str, tuple]] = {}
    for i in reversed(range(levels)):
        saved, shapes = shapes, {}
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resblock(f"up.{i}.block.{j}", block_in + skips.pop(), block_out)
            block_in = block_out
        if res in attn_resolutions:
            for j in range(num_res_blocks + 1):
                attn(f"up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
        up[i], shapes = shapes, saved
    for i in range(levels):  # state_dict order: up.0 first
        shapes.update(up[i])
    norm("norm_out", block_in)
    conv("conv_out", block_in, out_channels, 3)
    return shapes


def infer_config(state: dict[str, np.ndarray], source: str) -> dict:
    """ch, ch_mult, res blocks and attention resolutions, read off the names and shapes."""
    if "conv_in.weight" not in state:
        sample = ", ".join(sorted(state)[:6])
        raise CheckpointError(
            f"{source}: no tensor `conv_in.weight`: not a DDPM UNet state dict in the published "
            f"naming (first names: {sample} ...)"
        )
    w = state["conv_in.weight"]
    if w.ndim != 4:
        raise CheckpointError(f"{source}: `conv_in.weight` has shape {w.shape}, expected 4-d")
    ch = int(w.shape[0])
    if ch % 32 != 0:
        raise CheckpointError(f"{source}: conv_in has {ch} channels; GroupNorm(32) needs a multiple of 32")
    ch_mult = []
    while f"down.{len(ch_mult)}.block.0.conv2.weight" in state:
        c = int(state[f"down.{len(ch_mult)}.block.0.conv2.weight"].shape[0])
        if c % ch != 0:
            raise CheckpointError(f"{source}: level {len(ch_mult)} has {c} channels, not a multiple of ch = {ch}")
        ch_mult.append(c // ch)
    if not ch_mult:
        raise CheckpointError(f"{source}: no `down.0.block.0.conv2.weight`: not a DDPM UNet")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"down\.0\.block\.(\d+)\.", k))}
    num_res_blocks = max(blocks) + 1
    attn_res = []
    res = RESOLUTION
    for i in range(len(ch_mult)):
        if f"down.{i}.attn.0.q.weight" in state:
            attn_res.append(res)
        res //= 2
    return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                attn_resolutions=tuple(attn_res))


def convert(src: str, dst: str, fp16: bool = False, key: str | None = None,
            quiet: bool = False) -> dict:
    """Reads `src`, validates, writes `dst`. Returns a summary (config, tensor count, ...)."""
    obj = load_checkpoint(src)
    state, where = find_state_dict(obj, path=src, key=key)
    state = strip_prefixes(state)
    config = infer_config(state, src)
    expected = ddpm_layout(**config)
    check_against_layout(state, expected, "DDPM UNet " + json.dumps(
        {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}), src)
    name = KNOWN_CONFIGS.get(
        (config["ch"], config["ch_mult"], config["num_res_blocks"], config["attn_resolutions"]),
        "custom")
    params = int(sum(np.prod(s) for s in expected.values()))
    metadata = {
        "source": os.path.basename(src),
        "source_entry": where,
        "config": name,
        "unet": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}),
        "parameters": str(params),
        "dtype": "F16" if fp16 else "F32",
        "converter": "weights/convert_ddpm.py",
    }
    write_safetensors({k: state[k] for k in expected}, dst, fp16, metadata)
    summary = dict(config=name, unet=config, tensors=len(expected), parameters=params,
                   entry=where, dtype=metadata["dtype"], output=dst)
    if not quiet:
        print(f"{src} [{where}] -> {dst}: DDPM UNet `{name}` (ch {config['ch']}, "
              f"ch_mult {list(config['ch_mult'])}), {len(expected)} tensors, "
              f"{params:,} parameters, {metadata['dtype']}")
    return summary


def main(argv=None) -> int:
    return converter_main(
        convert, argv, description=__doc__.split("\n\n")[0],
        checkpoint_help="torch.save file of the DDPM UNet (zip or legacy format)",
        fp16_help="store F16 (half the size) instead of F32",
        key_help="the entry holding the state dict, e.g. ema or model "
                 "(nested: a/b); default: the top level, else ema, state_dict, model")


if __name__ == "__main__":
    sys.exit(main())
