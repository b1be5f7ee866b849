"""Checks of the PyTorch reference itself (run: .venv/bin/python -m pytest tests/golden).

The Rust tests trust weights/torch_models.py and the golden files; these tests are what that
trust rests on: the published layout and parameter counts, the generator against a literal
transcription of its spec, the classifier against its known accuracy, and the goldens against a
fresh computation.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

# The reference needs PyTorch; where it is not installed (CI) these checks report as skipped.
torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO_ROOT, "weights"))

import torch_models as tm  # noqa: E402

GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden")
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10", "test_lossless.bin")


def resnet_weights(depth: int) -> str:
    return os.path.join(SHARED, "weights", f"resnet{depth}_cifar10.safetensors")


@pytest.mark.parametrize("config", ["cifar10", "cifar10-small"])
def test_unet_parameter_count_and_names(config):
    model = tm.make_unet(config)
    tm.count_params(model, config)  # asserts METHOD.md's count
    names = set(model.state_dict())
    ch = tm.UNET_CONFIGS[config]["ch"]
    # Spot checks of the published layout: the up path is indexed by level, has 3 blocks per
    # level, the first up block of every level changes width (so has a nin_shortcut), level 0
    # has no upsample and the last down level no downsample.
    for present in [
        "temb.dense.0.weight",
        "temb.dense.1.bias",
        "down.1.attn.1.proj_out.weight",
        "down.2.downsample.conv.weight",
        "mid.attn_1.q.weight",
        "up.3.block.2.nin_shortcut.weight",
        "up.3.upsample.conv.weight",
        "up.1.attn.2.norm.weight",
        "norm_out.weight",
        "conv_out.bias",
    ]:
        assert present in names, present
    for absent in [
        "down.3.downsample.conv.weight",
        "up.0.upsample.conv.weight",
        "down.0.attn.0.q.weight",
    ]:
        assert absent not in names, absent
    assert all(n.endswith(".weight") or n.endswith(".bias") for n in names)
    assert tuple(model.state_dict()["temb.dense.0.weight"].shape) == (4 * ch, ch)


def reference_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A line-by-line transcription of the generator spec in README.md, one element at a time."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & mask
    key = h ^ ((seed * 0x9E3779B97F4A7C15) & mask)
    out = []
    for i in range(int(np.prod(shape))):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
        u = np.float32((z >> 40) / 2.0**23 - 1.0)
        if name.endswith(".weight") and len(shape) >= 2:
            out.append(u * np.float32(math.sqrt(3.0 / int(np.prod(shape[1:])))))
        elif name.endswith(".weight"):
            out.append(np.float32(1.0) + u * np.float32(0.2))
        else:
            out.append(u * np.float32(0.1))
    return np.array(out, dtype=np.float32).reshape(shape)


@pytest.mark.parametrize(
    "name,shape,seed",
    [
        ("conv_in.weight", (64, 3, 3, 3), 1),
        ("temb.dense.0.weight", (256, 64), 1),
        ("down.0.block.0.norm1.weight", (64,), 1),
        ("mid.attn_1.q.bias", (128,), 7),
        ("up.1.block.2.nin_shortcut.weight", (128, 192, 1, 1), 1),
    ],
)
def test_generator_matches_spec_bit_for_bit(name, shape, seed):
    fast = tm.deterministic_tensor(name, shape, seed)
    slow = reference_tensor(name, shape, seed)
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))


def test_generator_pinned_values():
    # The values quoted in README.md, so the README and the code cannot drift apart.
    assert tm.fnv1a64(b"conv_in.weight") == 0x1CE69906BDC574A7
    assert tm.tensor_key("conv_in.weight", 1) == 0x82D1E0BFC28F08B2
    bits = tm.deterministic_tensor("conv_in.weight", (64, 3, 3, 3), 1).ravel()[:3].view(np.uint32)
    assert [hex(b) for b in bits] == ["0xbc26ead6", "0x3dac5440", "0x3c033456"]
    bits = tm.deterministic_tensor("down.0.block.0.norm1.weight", (64,), 1)[:3].view(np.uint32)
    assert [hex(b) for b in bits] == ["0x3f8b962f", "0x3f884d27", "0x3f6a9c94"]
    bits = tm.deterministic_tensor("temb.dense.0.bias", (256,), 1)[:3].view(np.uint32)
    assert [hex(b) for b in bits] == ["0xbd0329d3", "0xbdca9fdf", "0xbd7e1eb7"]


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_resnet_checkpoints_load_exactly(depth):
    # load_cifar_resnet asserts that keys and shapes match the checkpoint one to one.
    model = tm.load_cifar_resnet(resnet_weights(depth), depth)
    n = sum(p.numel() for p in model.parameters())
    assert n == {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}[depth]


@pytest.mark.parametrize("depth,correct", [(20, 854), (56, 863)])
def test_resnet_accuracy_on_test_lossless(depth, correct):
    # 854/932 = 91.6% and 863/932 = 92.6%, as ../shared/data/README.md states.
    model = tm.load_cifar_resnet(resnet_weights(depth), depth)
    images, labels = tm.read_cifar_binary(CIFAR_TEST)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images).float() / 255.0).argmax(dim=1).numpy()
    assert int((predicted == labels).sum()) == correct


def test_unet_small_golden_reproduces():
    golden = load_file(os.path.join(GOLDEN_DIR, "unet_cifar10_small.safetensors"))
    model = tm.make_unet("cifar10-small")
    weights = tm.deterministic_state_dict(model, int(golden["seed"][0]))
    for name in ["conv_in.weight", "down.0.block.0.norm1.weight", "temb.dense.0.bias"]:
        assert torch.equal(weights[name], golden[f"generated.{name}"])
    model.load_state_dict(weights)
    model = model.double()
    x = golden["x"].double().requires_grad_(True)
    eps = model(x, golden["t"].double())
    (grad_x,) = torch.autograd.grad((eps * golden["v"].double()).sum(), x)
    torch.testing.assert_close(eps.float(), golden["eps"], rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_x.float(), golden["grad_x"], rtol=0, atol=1e-5)
    temb = model.embed_time(golden["t"].double())
    torch.testing.assert_close(temb.float(), golden["temb"], rtol=0, atol=1e-6)


def test_resnet20_golden_reproduces():
    golden = load_file(os.path.join(GOLDEN_DIR, "resnet20.safetensors"))
    model = tm.load_cifar_resnet(resnet_weights(20), 20).double()
    x = golden["x"].double().requires_grad_(True)
    logits = model(x)
    (grad_x,) = torch.autograd.grad((logits * golden["v"].double()).sum(), x)
    torch.testing.assert_close(logits.float(), golden["logits"], rtol=0, atol=1e-5)
    features = model.features(golden["x"].double())
    torch.testing.assert_close(features.float(), golden["features"], rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_x.float(), golden["grad_x"], rtol=0, atol=1e-5)
    assert golden["labels"].tolist() == [3, 8, 8, 0]
