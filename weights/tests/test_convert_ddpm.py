"""convert_ddpm.py: torch-free tests on the committed fixtures, then (with PyTorch) real
random-weight checkpoints of the published layout in every nesting, and bad checkpoints."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import array_sha256, fixture_path, load_expected
from convert_ddpm import KNOWN_CONFIGS, convert, ddpm_layout, infer_config, main
from torch_checkpoint import CheckpointError, check_against_layout, find_state_dict, load_checkpoint, strip_prefixes


def param_count(layout):
    return sum(int(np.prod(s)) for s in layout.values())


def test_layout_parameter_counts_match_method_md():
    assert param_count(ddpm_layout(128)) == 35_746_307
    assert param_count(ddpm_layout(64)) == 8_952_067
    assert len(ddpm_layout(64)) == len(ddpm_layout(128))


@pytest.mark.parametrize("name,entry,prefix,config,ch", [
    ("ddpm_small_strided.pt", "/ema", "module.", "cifar10-small", 64),
    ("ddpm_cifar10_strided_legacy.pt", "", "", "cifar10", 128),
])
def test_converts_fixture_exactly(tmp_path, name, entry, prefix, config, ch):
    out = str(tmp_path / "out.safetensors")
    summary = convert(fixture_path(name), out, quiet=True)
    assert summary["config"] == config and summary["unet"]["ch"] == ch
    tensors = load_file(out)
    expected = load_expected()[name]
    layout = ddpm_layout(ch)
    assert sorted(tensors) == sorted(layout)
    for key, shape in layout.items():
        record = expected[f"{entry}/{prefix}{key}"]
        assert tensors[key].dtype == np.float32 and tensors[key].shape == tuple(shape)
        assert array_sha256(tensors[key]) == record["sha256"], key
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["config"] == config and meta["dtype"] == "F32"


def test_fp16_output(tmp_path):
    out = str(tmp_path / "half.safetensors")
    convert(fixture_path("ddpm_small_strided.pt"), out, fp16=True, quiet=True)
    half = load_file(out)
    full = strip_prefixes(find_state_dict(load_checkpoint(fixture_path("ddpm_small_strided.pt")))[0])
    for k, v in half.items():
        assert v.dtype == np.float16
        np.testing.assert_array_equal(v, full[k].astype(np.float16))
    assert os.path.getsize(out) < 0.51 * 8_952_067 * 4 + 100_000


def test_key_option_picks_the_raw_model(tmp_path):
    out_ema, out_model = str(tmp_path / "ema.safetensors"), str(tmp_path / "model.safetensors")
    convert(fixture_path("ddpm_small_strided.pt"), out_ema, quiet=True)
    convert(fixture_path("ddpm_small_strided.pt"), out_model, key="model", quiet=True)
    assert not np.array_equal(load_file(out_ema)["conv_in.weight"], load_file(out_model)["conv_in.weight"])


def _fixture_state():
    return strip_prefixes(find_state_dict(load_checkpoint(fixture_path("ddpm_small_strided.pt")))[0])


@pytest.mark.parametrize("mutation,message", [
    (lambda s: s.pop("mid.attn_1.q.weight"), r"missing tensor\(s\): mid.attn_1.q.weight"),
    (lambda s: s.__setitem__("mid.attn_1.extra.weight", np.zeros(3, np.float32)), r"unexpected tensor\(s\): mid.attn_1.extra.weight"),
    (lambda s: s.__setitem__("conv_out.bias", np.zeros(4, np.float32)), r"`conv_out.bias` has shape \(4,\), expected \(3,\)"),
    (lambda s: s["up.1.block.0.conv1.weight"].__setitem__((0, 0, 0, 0), np.nan), "non-finite"),
    (lambda s: s.__setitem__("norm_out.weight", np.full(64, np.inf, np.float32)), "non-finite"),
])
def test_validation_errors(mutation, message):
    state = _fixture_state()
    mutation(state)
    config = infer_config(state, "x.pt")
    with pytest.raises(CheckpointError, match=message):
        check_against_layout(state, ddpm_layout(**config), "DDPM UNet", "x.pt")


def test_not_a_unet(tmp_path, capsys):
    rc = main([fixture_path("wrn28_1.pt"), str(tmp_path / "x.safetensors")])
    assert rc == 1
    assert "no tensor `conv_in.weight`" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main([fixture_path("ddpm_small_strided.pt"), str(out), "--fp16"]) == 0
    assert "cifar10-small" in capsys.readouterr().out and out.exists()


# ---------------------------------------------------------------------------------------------
# With PyTorch: genuine checkpoints of the published layout
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_models():
    pytest.importorskip("torch")
    import torch_models as tm

    return tm


@pytest.mark.parametrize("config", ["cifar10-small", "cifar10"])
def test_layout_matches_the_pytorch_reference(torch_models, config):
    model = torch_models.make_unet(config)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ch = torch_models.UNET_CONFIGS[config]["ch"]
    assert ddpm_layout(ch) == reference
    assert list(ddpm_layout(ch)) == list(reference)  # same order too


NESTINGS = {
    "top": lambda sd: sd,
    "state_dict+module": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    "model+ema+optimizer": lambda sd: {"model": {k: v * 0 for k, v in sd.items()}, "ema": sd,
                                       "optimizer": {"lr": 1e-4}, "step": 790000},
    "module.module": lambda sd: {"module.module." + k: v for k, v in sd.items()},
}


@pytest.mark.parametrize("config,nesting,legacy", [
    ("cifar10-small", "top", False),
    ("cifar10-small", "state_dict+module", True),
    ("cifar10-small", "model+ema+optimizer", False),
    ("cifar10", "module.module", False),
    ("cifar10", "top", True),
])
def test_random_weight_checkpoints_round_trip(torch_models, tmp_path, config, nesting, legacy):
    import torch

    torch.manual_seed(0)
    model = torch_models.make_unet(config)
    state = collections.OrderedDict((k, torch.randn_like(v)) for k, v in model.state_dict().items())
    src = str(tmp_path / "ckpt.pt")
    torch.save(NESTINGS[nesting](state), src, _use_new_zipfile_serialization=not legacy)
    out = str(tmp_path / "out.safetensors")
    summary = convert(src, out, quiet=True)
    assert summary["config"] == config
    converted = load_file(out)
    assert sorted(converted) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(converted[k], v.numpy(), err_msg=k)
    # The converted file drives the reference network to the same output.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in converted.items()})


def test_fp16_checkpoint_source(torch_models, tmp_path):
    import torch

    model = torch_models.make_unet("cifar10-small")
    state = {k: torch.randn_like(v).half() for k, v in model.state_dict().items()}
    src = str(tmp_path / "half.pt")
    torch.save(state, src)
    converted = load_file(convert(src, str(tmp_path / "o.safetensors"), quiet=True)["output"])
    for k, v in state.items():
        np.testing.assert_array_equal(converted[k], v.float().numpy())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_torch_checkpoints(torch_models, tmp_path):
    import torch

    model = torch_models.make_unet("cifar10-small")
    good = dict(model.state_dict())
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "down.1.attn.0.k.bias"}, "missing tensor"),
        "extra": ({**good, "down.9.block.0.conv1.weight": torch.zeros(1)}, "unexpected tensor"),
        "shape": ({**good, "temb.dense.0.weight": torch.zeros(256, 32)}, "has shape"),
        "nan": ({**good, "conv_in.bias": torch.full((64,), float("nan"))}, "non-finite"),
        "whole model": (model, "global `"),
    }
    for name, (obj, message) in cases.items():
        src = str(tmp_path / f"{name.replace(' ', '_')}.pt")
        torch.save(obj, src)
        with pytest.raises(CheckpointError, match=message):
            convert(src, str(tmp_path / "never.safetensors"), quiet=True)
        assert not (tmp_path / "never.safetensors").exists()
    marker = tmp_path / "pwned"
    src = str(tmp_path / "evil.pt")
    torch.save({"state_dict": good, "payload": _Evil(marker)}, src)
    with pytest.raises(CheckpointError, match="global `(os|posix).system`"):
        convert(src, str(tmp_path / "never.safetensors"), quiet=True)
    assert not marker.exists()


def test_known_configs_are_the_reference_configs(torch_models):
    for (ch, mult, blocks, attn), name in KNOWN_CONFIGS.items():
        c = torch_models.UNET_CONFIGS[name]
        assert (c["ch"], tuple(c["ch_mult"]), c["num_res_blocks"], tuple(c["attn_resolutions"])) == (ch, mult, blocks, attn)
