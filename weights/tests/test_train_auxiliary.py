"""train_auxiliary.py on the CPU with a few images: the adversarial loss goes down, resuming is
exact, the export has exactly the layout of ../shared/weights, evaluate writes the card."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import torch_models as tm  # noqa: E402
import train_auxiliary  # noqa: E402
import training_common as tc  # noqa: E402
from conftest import SHARED, log_rows  # noqa: E402

SHARED_RESNET20 = os.path.join(SHARED, "weights", "resnet20_cifar10.safetensors")
COMMON = ["--device", "cpu", "--log-every", "1", "--print-every", "1000", "--checkpoint-every", "0"]


def run(data, run_dir, *extra):
    assert train_auxiliary.main([*COMMON, *data, "--run-dir", str(run_dir), *map(str, extra)]) == 0


def test_adversarial_loss_goes_down(data, tmp_path):
    # Overfit 8 images against a small-eps PGD-2 adversary: 30 steps of SGD at lr 0.05.
    run(data, tmp_path, "--steps", 30, "--max-images", 8, "--batch-size", 8, "--epochs", 100, "--lr", 0.05,
        "--weight-decay", 0, "--warmup-epochs", 0, "--eps", "2/255", "--attack-steps", 2, "--attack-step-size", "1/255")
    loss = [float(r["loss"]) for r in log_rows(tmp_path)]
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5]), loss


def test_resume_is_exact(data, tmp_path):
    common = ["--max-images", 16, "--batch-size", 8, "--epochs", 10, "--attack-steps", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(data, straight, "--steps", 8, *common)
    run(data, split, "--steps", 4, *common)
    run(data, split, "--steps", 8, "--resume")
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=1e-6, atol=1e-7)
    assert [r["loss"] for r in log_rows(straight)] == [r["loss"] for r in log_rows(split)]


def test_export_layout_and_evaluate(data, tmp_path):
    weights_dir, run_dir = tmp_path / "weights", tmp_path / "run"
    run(data, run_dir, "--steps", 3, "--max-images", 16, "--batch-size", 8, "--epochs", 2, "--attack-steps", 1,
        "--export", "--evaluate", "--weights-dir", weights_dir, "--eval-images", 16, "--pgd-steps", 2)
    path = weights_dir / "auxiliary_resnet20_linf.safetensors"
    ours = load_file(str(path))
    assert not any(k.endswith("num_batches_tracked") for k in ours)
    assert all(v.dtype == torch.float32 for v in ours.values())
    reference = tm.CifarResNet(20).state_dict()
    assert sorted(ours) == sorted(reference)
    for k, v in reference.items():
        assert ours[k].shape == v.shape, k
    if os.path.isfile(SHARED_RESNET20):
        shared = load_file(SHARED_RESNET20)
        assert sorted(shared) == sorted(ours)
        assert all(shared[k].shape == ours[k].shape for k in shared)
    tm.load_cifar_resnet(str(path), 20)  # the strict loader the goldens use
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "3" and "PGD-1" in meta["training"]
    results = json.loads((run_dir / "evaluation.json").read_text())
    assert results["images"] == 16 and 0 <= results["pgd_accuracy"] <= results["clean_accuracy"] + 1e-9
    card = (weights_dir / "auxiliary_resnet20_linf.md").read_text()
    assert "PGD-2 accuracy" in card or "PGD-20 accuracy" in card
    assert "Quality bar (issue 3)" in card and ("**met**" in card or "**NOT met**" in card)
    assert (weights_dir / "auxiliary_resnet20_linf_examples.png").exists()
    assert (weights_dir / "auxiliary_resnet20_linf_loss.png").exists()


def test_trainable_model_has_the_reference_names():
    trainable = set(train_auxiliary.exportable_state(train_auxiliary.trainable_resnet(20)))
    assert trainable == set(tm.CifarResNet(20).state_dict())


def test_pgd_stays_in_the_ball_and_hurts(shared_data):
    if not os.path.isfile(SHARED_RESNET20):
        pytest.skip("no ../shared/weights")
    model = tm.load_cifar_resnet(SHARED_RESNET20, 20)
    images, labels = tc.read_test_images(shared_data["test_file"], 32)
    x = torch.from_numpy(images).float() / 255
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(0)
    adv = train_auxiliary.pgd_linf(model, x, y, 8 / 255, 2 / 255, 5, gen)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        robust = (model(adv).argmax(1) == y).float().mean()
    assert clean > 0.8 and robust < 0.2  # a standard network has no robustness


def test_random_crop_flip_shapes():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = train_auxiliary.random_crop_flip(x, 4, True, gen)
    assert out.shape == x.shape
    same = train_auxiliary.random_crop_flip(x, 0, False, gen)
    assert torch.equal(same, x)
