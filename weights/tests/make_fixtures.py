"""Writes the small checkpoint fixtures of weights/tests/fixtures (needs PyTorch; run once).

    .venv/bin/python weights/tests/make_fixtures.py

The converters' torch-free tests read these real `torch.save` files without PyTorch and compare
every tensor with `expected.json`, written here from PyTorch's own view of the same tensors
(shape, dtype, SHA-256 of the contiguous little-endian bytes; bfloat16 hashed as the float32 it
converts to exactly). Files:

- reader_zip.pt / reader_legacy.pt: the same nested object in both torch.save formats: f32, f16,
  bf16, int64 and bool tensors, a transposed (non-contiguous) tensor, a slice with a storage
  offset, two tensors sharing one storage, a 0-d tensor, a Parameter, nested dicts and lists,
  an OrderedDict with `_metadata`, and plain Python values.
- ddpm_small_strided.pt: every tensor of the `cifar10-small` UNet (ch 64), under `ema` with a
  `module.` prefix, next to `model`, `step`; each tensor is an overlapping strided view
  (stride 1 on every axis) of one shared 4096-float storage, so the 8.9M-parameter layout costs
  16 KB on disk. The values are not a trained network, but they are real, distinct per tensor,
  and exercise the reader's offset and stride handling.
- ddpm_cifar10_strided_legacy.pt: the same for the `cifar10` UNet (ch 128), legacy format, a
  bare state dict at the top level.
- wrn28_1.pt: a genuine random WideResNet-28-1 (RobustBench layout, random BatchNorm statistics)
  under `state_dict` with the `module.` prefix, as RobustBench's Standard.pt (1.5 MB).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, os.path.dirname(HERE))

import torch_models as tm  # noqa: E402
from conftest import array_sha256, flatten, randomize_batchnorm  # noqa: E402
from convert_ddpm import ddpm_layout  # noqa: E402


def tensor_record(t: torch.Tensor) -> dict:
    t = t.detach()
    dtype = str(t.dtype).replace("torch.", "")
    as_numpy = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
    return {"shape": list(t.shape), "dtype": dtype, "sha256": array_sha256(as_numpy)}


def describe(obj):
    """Flat {path: record} of every tensor, and the plain values (the paths of conftest.flatten,
    with which the tests walk what the reader returns)."""
    return {path: tensor_record(v) if isinstance(v, torch.Tensor) else {"value": v}
            for path, v in flatten(obj).items()}


def reader_object() -> dict:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 4, generator=g)
    model = collections.OrderedDict()
    model["module.a.weight"] = torch.randn(3, 4, generator=g)
    model["module.b.bias"] = torch.randn(5, generator=g).half()
    model["module.c.transposed"] = torch.randn(3, 2, generator=g).t()
    model["module.d.slice"] = torch.arange(10, dtype=torch.int64)[2:7]
    model["module.e.bf16"] = torch.randn(4, generator=g).to(torch.bfloat16)
    model["module.f.scalar"] = torch.tensor(2.5)
    model["module.g.shared_rows"] = base[1:3]
    model["module.h.shared_column"] = base[:, 2]
    model["module.i.mask"] = torch.tensor([True, False, True])
    model["module.j.f64"] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    model._metadata = collections.OrderedDict({"": {"version": 1}, "a": {"version": 2}})
    return {
        "model": model,
        "ema": {"module.a.weight": torch.randn(3, 4, generator=g)},
        "step": 5,
        "name": "fixture",
        "lr": 1e-4,
        "nested": [torch.nn.Parameter(torch.randn(2, 2, generator=g)), 3, ("x", 1.5)],
    }


def strided_state_dict(layout: dict, seed: int, prefix: str = "") -> collections.OrderedDict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4096, generator=g)
    state = collections.OrderedDict()
    for i, (name, shape) in enumerate(layout.items()):
        reach = sum(d - 1 for d in shape)
        offset = (i * 37) % (4096 - reach)
        state[prefix + name] = torch.as_strided(base, shape, (1,) * len(shape), offset)
    return state


def main() -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    expected = {}

    obj = reader_object()
    torch.save(obj, os.path.join(FIXTURES, "reader_zip.pt"))
    torch.save(obj, os.path.join(FIXTURES, "reader_legacy.pt"), _use_new_zipfile_serialization=False)
    expected["reader_zip.pt"] = expected["reader_legacy.pt"] = describe(obj)

    small = strided_state_dict(ddpm_layout(64), seed=64, prefix="module.")
    obj = {"ema": small, "model": strided_state_dict(ddpm_layout(64), seed=65, prefix="module."), "step": 790000}
    torch.save(obj, os.path.join(FIXTURES, "ddpm_small_strided.pt"))
    expected["ddpm_small_strided.pt"] = describe(obj)

    big = strided_state_dict(ddpm_layout(128), seed=128)
    torch.save(big, os.path.join(FIXTURES, "ddpm_cifar10_strided_legacy.pt"), _use_new_zipfile_serialization=False)
    expected["ddpm_cifar10_strided_legacy.pt"] = describe(big)

    torch.manual_seed(28)
    wrn = tm.WideResNet(depth=28, widen_factor=1)
    randomize_batchnorm(wrn, num_batches_tracked=1234)
    state = collections.OrderedDict(("module." + k, v) for k, v in wrn.state_dict().items())
    torch.save({"state_dict": state}, os.path.join(FIXTURES, "wrn28_1.pt"))
    expected["wrn28_1.pt"] = describe({"state_dict": state})

    with open(os.path.join(FIXTURES, "expected.json"), "w") as f:
        json.dump({"torch": torch.__version__, "files": expected}, f, indent=1, sort_keys=True)
        f.write("\n")
    for name in sorted(os.listdir(FIXTURES)):
        print(f"{name}: {os.path.getsize(os.path.join(FIXTURES, name)):,} bytes")


if __name__ == "__main__":
    main()
