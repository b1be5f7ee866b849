"""Converts RobustBench's CIFAR-10 WideResNet-28-10 "Standard" checkpoint to safetensors.

The Rust engine does not run WideResNets yet: this converter prepares the weights, so that the
engine's WideResNet (METHOD.md section 4) can load them the day it exists.

Source layout (RobustBench `model_zoo/architectures/wide_resnet.py`, the Zagoruyko & Komodakis
WideResNet as written by TRADES / Carmon et al.; the `Standard` entry is
`WideResNet(depth=28, widen_factor=10)`, with NO input normalisation: it takes pixels in [0, 1]):

    conv1                                   3x3, 3 -> 16, no bias
    block{1,2,3}.layer.{i}                  n = (depth - 4) / 6 pre-activation BasicBlocks each,
                                            16k, 32k, 64k channels (k = widen factor); the first
                                            block of block2 and block3 has stride 2
        .bn1     BatchNorm(in)      -> relu1
        .conv1   3x3, in -> out, stride s, no bias
        .bn2     BatchNorm(out)     -> relu2
        .conv2   3x3, out -> out, no bias
        .convShortcut  1x1, in -> out, stride s, no bias; only where in != out (then the
                       shortcut and conv1 both read relu1(bn1(x)); otherwise the shortcut is x)
    bn1                                     BatchNorm(64k), then ReLU, 8x8 average pool
    fc                                      Linear 64k -> 10 (with bias)

BatchNorm tensors are `weight`, `bias`, `running_mean`, `running_var` (eps 1e-5); the
`num_batches_tracked` counters of the checkpoint are dropped (they do not change the function,
and the engine's loader ignores them anyway). The relu modules have no tensors. The checkpoint
may hold the state dict at the top level or under `state_dict` / `model`, with a `module.`
prefix or not; the output keeps the RobustBench names without the prefix, F32 by default
(`--fp16` for half the size). Depth and widen factor are read off the tensors and every tensor
is then checked (present, shape, no extras, finite), as in convert_ddpm.py.

PyTorch is not needed (torch_checkpoint.py's restricted unpickler reads the file). Usage:

    python weights/convert_wrn.py Standard.pt weights/wrn28_10_standard.safetensors
"""

from __future__ import annotations

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

WRN_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "net")


def wrn_layout(depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
               with_bn_counters: bool = False) -> dict[str, tuple]:
    """Every tensor name of RobustBench's WideResNet with its shape, in state_dict order."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"WideResNet depth must be 6n + 4 (n >= 1), got {depth}")
    n = (depth - 4) // 6
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    shapes: dict[str, tuple] = {}

    def bn(name, c):
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{part}"] = (c,)
        if with_bn_counters:
            shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (channels[0], 3, 3, 3)
    for b in range(3):
        cin, cout = channels[b], channels[b + 1]
        for i in range(n):
            prefix = f"block{b + 1}.layer.{i}"
            block_in = cin if i == 0 else cout
            bn(f"{prefix}.bn1", block_in)
            shapes[f"{prefix}.conv1.weight"] = (cout, block_in, 3, 3)
            bn(f"{prefix}.bn2", cout)
            shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
            if block_in != cout:
                shapes[f"{prefix}.convShortcut.weight"] = (cout, block_in, 1, 1)
    bn("bn1", channels[3])
    shapes["fc.weight"] = (num_classes, channels[3])
    shapes["fc.bias"] = (num_classes,)
    return shapes


def infer_config(state: dict[str, np.ndarray], source: str) -> dict:
    """depth, widen factor and class count, read off the names and shapes."""
    for needed in ("block1.layer.0.conv1.weight", "fc.weight"):
        if needed not in state:
            sample = ", ".join(sorted(state)[:6])
            raise CheckpointError(
                f"{source}: no tensor `{needed}`: not a RobustBench WideResNet state dict "
                f"(first names: {sample} ...)"
            )
    width = int(state["block1.layer.0.conv1.weight"].shape[0])
    if width % 16 != 0:
        raise CheckpointError(f"{source}: block1 has {width} channels, not a multiple of 16")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"block1\.layer\.(\d+)\.", k))}
    n = max(layers) + 1
    if "sub_block1.layer.0.conv1.weight" in state:
        raise CheckpointError(
            f"{source}: has `sub_block1` (a WideResNet with sub_block1=True, e.g. Carmon2019); "
            "only the plain layout of the `Standard` model is supported"
        )
    return dict(depth=6 * n + 4, widen_factor=width // 16, num_classes=int(state["fc.weight"].shape[0]))


def convert(src: str, dst: str, fp16: bool = False, key: str | None = None,
            quiet: bool = False) -> dict:
    obj = load_checkpoint(src)
    state, where = find_state_dict(obj, keys=WRN_NESTING_KEYS, path=src, key=key)
    state = strip_prefixes(state, ("module.",))
    # BatchNorm's step counters carry no weights; drop them before checking the layout.
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    config = infer_config(state, src)
    expected = wrn_layout(**config)
    check_against_layout(
        state, expected,
        f"WideResNet-{config['depth']}-{config['widen_factor']} ({config['num_classes']} classes)", src)
    params = int(sum(np.prod(s) for s in expected.values() if not s == ()))
    metadata = {
        "source": os.path.basename(src),
        "source_entry": where,
        "architecture": "robustbench-wideresnet",
        "depth": str(config["depth"]),
        "widen_factor": str(config["widen_factor"]),
        "num_classes": str(config["num_classes"]),
        "input": "RGB pixels in [0, 1], no normalisation",
        "dtype": "F16" if fp16 else "F32",
        "converter": "weights/convert_wrn.py",
    }
    write_safetensors({k: state[k] for k in expected}, dst, fp16, metadata)
    summary = dict(tensors=len(expected), parameters=params, entry=where,
                   dtype=metadata["dtype"], output=dst, **config)
    if not quiet:
        print(f"{src} [{where}] -> {dst}: WideResNet-{config['depth']}-{config['widen_factor']}, "
              f"{len(expected)} tensors, {params:,} values, {metadata['dtype']}")
    return summary


def main(argv=None) -> int:
    return converter_main(
        convert, argv, description=__doc__.split("\n\n")[0],
        checkpoint_help="torch.save file (RobustBench's Standard.pt)",
        fp16_help="store F16 instead of F32",
        key_help="the entry holding the state dict (default: the top level, else state_dict, model)")


if __name__ == "__main__":
    sys.exit(main())
