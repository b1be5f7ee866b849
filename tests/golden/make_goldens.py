"""Writes the golden files that the Rust CPU backend is tested against.

Run from the repository root with the project's venv:

    .venv/bin/python tests/golden/make_goldens.py

Everything is computed in float64 (float32 weights and inputs, upcast) and stored rounded to
float32, so the goldens carry the exact answer for the stored inputs rather than one particular
float32 summation order; the Rust side compares with a tolerance suited to its own precision.
See tests/golden/README.md for what each file holds.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO_ROOT, "weights"))

import torch_models as tm  # noqa: E402  (needs the path above)

GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden")
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
RESNET20_WEIGHTS = os.path.join(SHARED, "weights", "resnet20_cifar10.safetensors")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10", "test_lossless.bin")

UNET_WEIGHT_SEED = 1
UNET_INPUT_SEED = 2
RESNET_V_SEED = 3
UNET_TIMESTEPS = [5.0, 731.0]

# A few generated parameters stored verbatim in the small UNet's golden, one per rule of the
# generator (conv weight, norm gamma, bias), so a Rust test can check the generator bit for bit
# before it checks a whole forward pass. Small ones only, to keep the file small.
GENERATOR_SAMPLES = [
    "conv_in.weight",
    "down.0.block.0.norm1.weight",
    "temb.dense.0.bias",
]


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def describe_file(what: str) -> dict[str, str]:
    # One metadata key only: safetensors writes the metadata map in hash order, so with several
    # keys the header (and the file's bytes) would change from run to run.
    computed = f"computed in float64 with torch {torch.__version__}, stored as float32"
    return {"description": f"{what}; {computed}"}


def describe(name: str, t: torch.Tensor) -> str:
    t = t.detach().double()
    return (
        f"  {name:<8} shape {str(tuple(t.shape)):<16} l2 {t.norm().item():12.5f}  "
        f"rms {t.pow(2).mean().sqrt().item():10.5f}  max|.| {t.abs().max().item():10.5f}"
    )


def unet_golden(config: str) -> None:
    model = tm.make_unet(config)
    tm.count_params(model, config)
    weights = tm.deterministic_state_dict(model, UNET_WEIGHT_SEED)
    model.load_state_dict(weights, strict=True)
    model = model.double().eval()

    # Inputs are drawn in float32 (that is what gets stored) and then upcast, so the float64
    # computation runs on exactly the stored values.
    gen = torch.Generator().manual_seed(UNET_INPUT_SEED)
    x = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float32) * 2 - 1
    v = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float32)
    t = torch.tensor(UNET_TIMESTEPS, dtype=torch.float32)

    x64 = x.double().requires_grad_(True)
    eps = model(x64, t.double())
    # grad_x = J_eps(x)^T v: the input vector-Jacobian product the adversarial guidance and the
    # attacks need.
    (grad_x,) = torch.autograd.grad((eps * v.double()).sum(), x64)
    with torch.no_grad():
        temb = model.embed_time(t.double())

    tensors = {
        "x": f32(x),
        "t": f32(t),
        "v": f32(v),
        "eps": f32(eps),
        "grad_x": f32(grad_x),
        "temb": f32(temb),
        "seed": torch.tensor([UNET_WEIGHT_SEED], dtype=torch.int64),
    }
    if config == "cifar10-small":
        for name in GENERATOR_SAMPLES:
            tensors[f"generated.{name}"] = weights[name].contiguous()
    path = os.path.join(GOLDEN_DIR, f"unet_{config.replace('-', '_')}.safetensors")
    save_file(
        tensors,
        path,
        metadata=describe_file(
            f"DDPM UNet config {config}; weights deterministic_state_dict(seed={UNET_WEIGHT_SEED}) "
            "(tests/golden/README.md); t is the value fed to the sinusoidal embedding"
        ),
    )
    os.chmod(path, 0o644)
    print(f"{os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")
    for name in ["x", "v", "eps", "grad_x", "temb"]:
        print(describe(name, tensors[name]))
    per_sample_std = tensors["eps"].double().flatten(1).std(dim=1)
    print(f"  eps std per sample: {per_sample_std.tolist()}")


def resnet20_golden() -> None:
    model = tm.load_cifar_resnet(RESNET20_WEIGHTS, 20).double()
    images, labels = tm.read_cifar_binary(CIFAR_TEST, count=4)
    x = torch.from_numpy(images).to(torch.float32) / 255.0
    v = torch.randn(4, 10, generator=torch.Generator().manual_seed(RESNET_V_SEED))

    x64 = x.double().requires_grad_(True)
    features = model.features(x64)
    logits = model.linear(features)
    (grad_x,) = torch.autograd.grad((logits * v.double()).sum(), x64)

    tensors = {
        "x": f32(x),
        "labels": torch.from_numpy(labels),
        "logits": f32(logits),
        "features": f32(features),
        "v": f32(v),
        "grad_x": f32(grad_x),
    }
    path = os.path.join(GOLDEN_DIR, "resnet20.safetensors")
    save_file(
        tensors,
        path,
        metadata=describe_file(
            "CIFAR ResNet-20, weights ../shared/weights/resnet20_cifar10.safetensors; x is the "
            "first 4 images of ../shared/data/cifar10/test_lossless.bin, pixels in [0,1]"
        ),
    )
    os.chmod(path, 0o644)
    print(f"{os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")
    for name in ["x", "logits", "features", "v", "grad_x"]:
        print(describe(name, tensors[name]))
    print(f"  labels {labels.tolist()}  predicted {logits.argmax(dim=1).tolist()}")


WRN_DEPTH, WRN_WIDEN, WRN_WEIGHT_SEED = 16, 2, 5


def wide_resnet_golden() -> None:
    """WideResNet-16-2 (two blocks per stage: both the 1x1-conv and the identity shortcut) in
    RobustBench's layout, weights from the shared generator (regenerated by the engine)."""
    model = tm.WideResNet(WRN_DEPTH, WRN_WIDEN)
    model.load_state_dict(tm.deterministic_state_dict(model, WRN_WEIGHT_SEED))
    model = model.double().eval()
    images, labels = tm.read_cifar_binary(CIFAR_TEST, count=4)
    x = torch.from_numpy(images).to(torch.float32) / 255.0
    v = torch.randn(4, 10, generator=torch.Generator().manual_seed(RESNET_V_SEED))
    x64 = x.double().requires_grad_(True)
    logits = model(x64)
    (grad_x,) = torch.autograd.grad((logits * v.double()).sum(), x64)
    tensors = {"x": f32(x), "logits": f32(logits), "v": f32(v), "grad_x": f32(grad_x)}
    path = os.path.join(GOLDEN_DIR, "wide_resnet.safetensors")
    save_file(
        tensors,
        path,
        metadata=describe_file(
            f"WideResNet-{WRN_DEPTH}-{WRN_WIDEN} (RobustBench layout), weights "
            f"deterministic_state_dict(seed={WRN_WEIGHT_SEED}); x is the first 4 images of "
            "../shared/data/cifar10/test_lossless.bin, pixels in [0,1]"
        ),
    )
    os.chmod(path, 0o644)
    print(f"{os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")
    for name in ["x", "logits", "v", "grad_x"]:
        print(describe(name, tensors[name]))


def main() -> None:
    torch.set_grad_enabled(True)
    for config in ["cifar10-small", "cifar10"]:
        unet_golden(config)
    resnet20_golden()
    wide_resnet_golden()


if __name__ == "__main__":
    main()
