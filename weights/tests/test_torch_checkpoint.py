"""The torch-free checkpoint reader (weights/torch_checkpoint.py). Runs without PyTorch."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import assert_matches_expected, fixture_path, load_expected
from torch_checkpoint import (
    CheckpointError,
    check_against_layout,
    find_state_dict,
    load_checkpoint,
    strip_prefixes,
)


@pytest.mark.parametrize("name", ["reader_zip.pt", "reader_legacy.pt"])
def test_reads_every_tensor_exactly(name):
    obj = load_checkpoint(fixture_path(name))
    assert_matches_expected(obj, load_expected()[name])


@pytest.mark.parametrize("name", ["reader_zip.pt", "reader_legacy.pt"])
def test_views_strides_and_dtypes(name):
    model = load_checkpoint(fixture_path(name))["model"]
    assert model["module.c.transposed"].shape == (2, 3)
    assert model["module.c.transposed"].flags["C_CONTIGUOUS"]
    assert model["module.d.slice"].tolist() == [2, 3, 4, 5, 6]
    assert model["module.f.scalar"].shape == () and float(model["module.f.scalar"]) == 2.5
    assert model["module.b.bias"].dtype == np.float16
    assert model["module.e.bf16"].dtype == np.float32  # bf16 widened exactly
    assert model["module.i.mask"].tolist() == [True, False, True]
    # Two tensors of one storage are independent arrays afterwards.
    model["module.g.shared_rows"][0, 0] = 1e9
    assert model["module.h.shared_column"].max() < 1e9


def _zip_checkpoint(path: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def _global_call_pickle(module: str, name: str, arg: str) -> bytes:
    # protocol 2: GLOBAL module name, MARK, a string, TUPLE, REDUCE, STOP
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n(X"
            + len(arg).to_bytes(4, "little") + arg.encode() + b"tR.")


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("subprocess", "call"), ("torch.nn.modules.conv", "Conv2d")])
def test_refuses_foreign_globals_in_zip(tmp_path, module, name):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    _zip_checkpoint(path, _global_call_pickle(module, name, f"touch {marker}"))
    with pytest.raises(CheckpointError, match=f"global `{module}.{name}`"):
        load_checkpoint(path)
    assert not marker.exists()


def test_refuses_foreign_globals_in_legacy_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil_legacy.pt")
    with open(path, "wb") as f:
        f.write(_global_call_pickle("os", "system", f"touch {marker}"))
    with pytest.raises(CheckpointError, match="global `os.system`"):
        load_checkpoint(path)
    assert not marker.exists()


def test_refuses_a_reduce_on_an_allowed_non_callable(tmp_path):
    # torch.FloatStorage is allowed as a *type tag*; calling it must not be possible.
    path = str(tmp_path / "odd.pt")
    _zip_checkpoint(path, _global_call_pickle("torch", "FloatStorage", "x"))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_truncated_and_foreign_files(tmp_path):
    good = open(fixture_path("reader_zip.pt"), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt|zip"):
        load_checkpoint(str(truncated))
    legacy = open(fixture_path("reader_legacy.pt"), "rb").read()
    truncated_legacy = tmp_path / "truncated_legacy.pt"
    truncated_legacy.write_bytes(legacy[:-20])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(str(truncated_legacy))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint"):
        load_checkpoint(str(text))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(str(empty))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_plain_pickle_without_magic_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="magic"):
        load_checkpoint(str(path))


def test_find_state_dict_and_prefixes():
    a = np.zeros(2, np.float32)
    top = {"x.weight": a}
    assert find_state_dict(top)[1] == "(top level)"
    nested = {"model": {"module.x.weight": a}, "ema": {"module.x.weight": a + 1}, "step": 3}
    state, where = find_state_dict(nested)
    assert where == "ema" and state["module.x.weight"][0] == 1
    state, where = find_state_dict(nested, key="model")
    assert where == "model"
    assert list(strip_prefixes(state)) == ["x.weight"]
    assert list(strip_prefixes({"module.module.y": a})) == ["y"]
    assert list(strip_prefixes({"module.y": a, "z": a})) == ["module.y", "z"]  # not shared: kept
    with pytest.raises(CheckpointError, match="no state dict found"):
        find_state_dict({"optimizer": {"lr": 1}, "step": 3})
    with pytest.raises(CheckpointError, match="no entry 'nope'"):
        find_state_dict(nested, key="nope")


def test_check_against_layout_messages():
    layout = {"a.weight": (2, 3), "a.bias": (2,)}
    good = {"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}
    check_against_layout(good, layout, "toy", "src")
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): a.bias"):
        check_against_layout({"a.weight": good["a.weight"]}, layout, "toy", "src")
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): b.weight"):
        check_against_layout({**good, "b.weight": good["a.bias"]}, layout, "toy", "src")
    with pytest.raises(CheckpointError, match=r"`a.weight` has shape \(3, 2\), expected \(2, 3\)"):
        check_against_layout({**good, "a.weight": np.zeros((3, 2), np.float32)}, layout, "toy", "src")
    bad = dict(good, **{"a.bias": np.array([0.0, np.nan], np.float32)})
    with pytest.raises(CheckpointError, match="`a.bias` has 1 non-finite"):
        check_against_layout(bad, layout, "toy", "src")
    with pytest.raises(CheckpointError, match="dtype int64"):
        check_against_layout(dict(good, **{"a.bias": np.zeros(2, np.int64)}), layout, "toy", "src")


def test_reader_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; "  # any `import torch` would now fail
            f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
            "import torch_checkpoint, convert_ddpm, convert_wrn; "
            f"torch_checkpoint.load_checkpoint({fixture_path('reader_zip.pt')!r}); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
