"""weights/device_train.sh end to end on the CPU (ALLOW_CPU=1), in a copy of the project laid
out as the device sees it (no ../shared: the data comes from data-cache/): a `both` call trains,
exports, evaluates and bundles the two recipes; `unpack` on a fresh copy restores weights, cards
and run state; a second call there resumes from what came back; a failing trainer fails the
call but still bundles what it saved. This is the procedure a GPU session runs first time."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from conftest import SHARED, TEST_FILE, TRAIN_TAR, WEIGHTS_DIR  # noqa: E402

RESNET20 = os.path.join(SHARED, "weights", "resnet20_cifar10.safetensors")
DDPM_TINY = ("--device cpu --channels 32 --ch-mult 1,2 --num-res-blocks 1 --max-images 32 --batch-size 8 "
             "--eval-images 8 --eval-batch 8 --sample-count 4 --sample-steps 3 --log-every 1")
AUX_TINY = ("--device cpu --epochs 1 --max-images 64 --batch-size 16 --attack-steps 1 --eval-images 16 "
            "--pgd-steps 2")


def device_copy(root) -> str:
    """A project folder with weights/ (scripts only) and data-cache/ (the carried data)."""
    os.makedirs(os.path.join(root, "weights"))
    for name in os.listdir(WEIGHTS_DIR):
        if name.endswith(".py") or name == "device_train.sh":
            shutil.copy(os.path.join(WEIGHTS_DIR, name), os.path.join(root, "weights", name))
    os.makedirs(os.path.join(root, "data-cache"))
    for path in (TRAIN_TAR, TEST_FILE, RESNET20):
        os.symlink(path, os.path.join(root, "data-cache", os.path.basename(path)))
    return str(root)


def device_call(root, out, *args, ddpm_args=DDPM_TINY, aux_args=AUX_TINY):
    env = dict(os.environ, ALLOW_CPU="1", COMPILE="0", PY=sys.executable, OUT=str(out), GIT_REV="test",
               EXTRA_ARGS=ddpm_args, EXTRA_ARGS_AUX=aux_args)
    return subprocess.run(["bash", os.path.join(root, "weights", "device_train.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def needs_data():
    for path in (TRAIN_TAR, TEST_FILE, RESNET20):
        if not os.path.isfile(path):
            pytest.skip(f"{path} is missing")


def test_both_unpack_resume(needs_data, tmp_path):
    device = device_copy(tmp_path / "device")
    out = tmp_path / "out"
    call = device_call(device, out, "both", "240", ddpm_args=DDPM_TINY + " --steps 4",
                       aux_args=AUX_TINY + " --steps 3")
    assert call.returncode == 0, call.stdout[-3000:] + call.stderr[-3000:]
    assert "[ddpm]" in call.stdout and "[aux]" in call.stdout
    parts = sorted(os.path.basename(p) for p in glob.glob(str(out / "*")))
    assert parts == ["auxiliary_bundle.tar.part-00", "ddpm_bundle.tar.part-00"], parts

    # Back here: a fresh checkout unpacks the bundles and has weights, cards and run state.
    home = device_copy(tmp_path / "home")
    unpack = subprocess.run(["bash", os.path.join(home, "weights", "device_train.sh"), "unpack", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert unpack.returncode == 0, unpack.stderr
    for name in ("ddpm_cifar10_small.safetensors", "ddpm_cifar10_small.md", "ddpm_cifar10_small_purified.png",
                 "auxiliary_resnet20_linf.safetensors", "auxiliary_resnet20_linf.md"):
        assert os.path.isfile(os.path.join(home, "weights", name)), name
    for name in ("ddpm_cifar10_small.md", "auxiliary_resnet20_linf.md"):
        with open(os.path.join(home, "weights", name)) as f:
            assert "Quality bar (issue 3)" in f.read(), name
    assert os.path.isfile(os.path.join(home, "data-cache", "runs", "ddpm", "portable", "model_f16.safetensors"))
    assert os.path.isfile(os.path.join(home, "data-cache", "runs", "auxiliary", "checkpoint.pt"))

    # The next call (a fresh device: only what came back travels) resumes both runs.
    out2 = tmp_path / "out2"
    call = device_call(home, out2, "ddpm", "150", ddpm_args=DDPM_TINY + " --steps 6")
    assert call.returncode == 0, call.stdout[-3000:] + call.stderr[-3000:]
    assert "resumed at step 4 from the portable" in call.stdout
    call = device_call(home, out2, "aux", "150", aux_args=AUX_TINY + " --steps 4")
    assert call.returncode == 0, call.stdout[-3000:] + call.stderr[-3000:]
    assert "step 3" in call.stdout and "resum" in call.stdout


def test_failing_trainer_fails_the_call(needs_data, tmp_path):
    device = device_copy(tmp_path / "device")
    call = device_call(device, tmp_path / "out", "aux", "150", aux_args="--no-such-flag")
    assert call.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in call.stdout + call.stderr


def test_missing_data_is_named(tmp_path):
    root = tmp_path / "bare"
    os.makedirs(root / "weights")
    shutil.copy(os.path.join(WEIGHTS_DIR, "device_train.sh"), root / "weights" / "device_train.sh")
    call = device_call(str(root), tmp_path / "out", "ddpm", "150")
    assert call.returncode != 0
    assert "data-cache/train_jpeg.tar.gz is missing" in call.stderr
