"""convert_wrn.py: torch-free tests on the committed WRN-28-1 fixture, then (with PyTorch)
random-weight RobustBench-layout checkpoints and bad checkpoints."""

from __future__ import annotations

import collections
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import array_sha256, fixture_path, load_expected, randomize_batchnorm
from convert_wrn import convert, infer_config, main, wrn_layout
from torch_checkpoint import CheckpointError, check_against_layout, find_state_dict, load_checkpoint, strip_prefixes


def test_wrn_28_10_size():
    layout = wrn_layout(28, 10)
    params = sum(int(np.prod(s)) for k, s in layout.items() if not k.endswith(("running_mean", "running_var")))
    assert params == 36_479_194  # WideResNet-28-10's published parameter count
    assert "block1.layer.0.convShortcut.weight" in layout  # 16 -> 160 channels
    assert "block1.layer.1.convShortcut.weight" not in layout
    assert "block1.layer.0.convShortcut.weight" not in wrn_layout(28, 1)  # 16 -> 16: identity


ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "target", "release", "purifier")


def test_converted_wrn_loads_in_the_engine(tmp_path):
    """The converter's output is what the engine's classifier loader expects, name for name."""
    if not os.path.isfile(ENGINE):
        pytest.skip("target/release/purifier is not built (cargo build --release)")
    out = str(tmp_path / "wrn.safetensors")
    convert(fixture_path("wrn28_1.pt"), out, quiet=True)
    run = subprocess.run([ENGINE, "inspect", out], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "WRN-28-1 classifier" in run.stdout and "loads: yes" in run.stdout, run.stdout


def test_converts_fixture_exactly(tmp_path):
    out = str(tmp_path / "wrn.safetensors")
    summary = convert(fixture_path("wrn28_1.pt"), out, quiet=True)
    assert (summary["depth"], summary["widen_factor"], summary["num_classes"]) == (28, 1, 10)
    assert summary["entry"] == "state_dict"
    tensors = load_file(out)
    expected = load_expected()["wrn28_1.pt"]
    layout = wrn_layout(28, 1)
    assert sorted(tensors) == sorted(layout)
    assert not any(k.endswith("num_batches_tracked") for k in tensors)
    for key in layout:
        assert array_sha256(tensors[key]) == expected[f"/state_dict/module.{key}"]["sha256"], key
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["depth"] == "28" and meta["widen_factor"] == "1"


def _fixture_state():
    state = strip_prefixes(find_state_dict(load_checkpoint(fixture_path("wrn28_1.pt")), keys=("state_dict",))[0])
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("mutation,message", [
    (lambda s: s.pop("block2.layer.0.convShortcut.weight"), r"missing tensor\(s\): block2.layer.0.convShortcut.weight"),
    (lambda s: s.__setitem__("block4.layer.0.conv1.weight", np.zeros(1, np.float32)), "unexpected tensor"),
    (lambda s: s.__setitem__("fc.bias", np.zeros(11, np.float32)), r"`fc.bias` has shape \(11,\), expected \(10,\)"),
    (lambda s: s["block3.layer.3.bn2.running_var"].__setitem__(0, np.nan), "non-finite"),
])
def test_validation_errors(mutation, message):
    state = _fixture_state()
    mutation(state)
    with pytest.raises(CheckpointError, match=message):
        check_against_layout(state, wrn_layout(**infer_config(state, "x")), "WideResNet", "x")


def test_not_a_wrn(tmp_path, capsys):
    assert main([fixture_path("ddpm_small_strided.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert "not a RobustBench WideResNet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def torch_models():
    pytest.importorskip("torch")
    import torch_models as tm

    return tm


@pytest.mark.parametrize("depth,widen", [(28, 10), (28, 1), (16, 2), (10, 1)])
def test_layout_matches_the_pytorch_reference(torch_models, depth, widen):
    model = torch_models.WideResNet(depth, widen)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert wrn_layout(depth, widen) == reference
    assert list(wrn_layout(depth, widen)) == list(reference)


@pytest.mark.parametrize("depth,widen,nesting,legacy", [
    (28, 1, "state_dict+module", False),
    (28, 2, "top", True),
    (16, 4, "model", False),
])
def test_random_weight_checkpoints_round_trip(torch_models, tmp_path, depth, widen, nesting, legacy):
    import torch

    torch.manual_seed(depth * widen)
    model = torch_models.WideResNet(depth, widen)
    randomize_batchnorm(model)
    state = model.state_dict()
    obj = {"state_dict+module": {"state_dict": {"module." + k: v for k, v in state.items()}},
           "top": state, "model": {"model": state, "epoch": 200}}[nesting]
    src = str(tmp_path / "wrn.pt")
    torch.save(obj, src, _use_new_zipfile_serialization=not legacy)
    out = str(tmp_path / "wrn.safetensors")
    summary = convert(src, out, quiet=True)
    assert (summary["depth"], summary["widen_factor"]) == (depth, widen)
    converted = load_file(out)
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            assert k not in converted
        else:
            np.testing.assert_array_equal(converted[k], v.numpy(), err_msg=k)
    # Reloaded into the reference network, it computes the same logits.
    fresh = torch_models.WideResNet(depth, widen).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in converted.items()}, strict=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.eval()(x), rtol=0, atol=0)


def test_bad_torch_checkpoints(torch_models, tmp_path):
    import torch

    model = torch_models.WideResNet(16, 1)
    good = collections.OrderedDict(model.state_dict())
    src = str(tmp_path / "model.pt")
    torch.save(model, src)  # a whole pickled model, not a state dict
    with pytest.raises(CheckpointError, match="global `"):
        convert(src, str(tmp_path / "x.safetensors"), quiet=True)
    bad = dict(good)
    bad["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save({"state_dict": bad}, src)
    with pytest.raises(CheckpointError, match=r"`conv1.weight` has shape \(16, 3, 5, 5\)"):
        convert(src, str(tmp_path / "x.safetensors"), quiet=True)
    sub = dict(good, **{"sub_block1.layer.0.conv1.weight": torch.zeros(16, 16, 3, 3)})
    torch.save(sub, src)
    with pytest.raises(CheckpointError, match="sub_block1"):
        convert(src, str(tmp_path / "x.safetensors"), quiet=True)
