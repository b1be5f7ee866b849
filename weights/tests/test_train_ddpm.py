"""train_ddpm.py on the CPU, on a tiny network and a handful of images: the loss goes down,
resuming is exact, the time budget stops cleanly, the portable checkpoint resumes, and
export / evaluate write what the card needs. (The real run is on a GPU: weights/README.md.)"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from png_plot import read_png_size  # noqa: E402

import torch_models as tm  # noqa: E402
import train_ddpm  # noqa: E402
import training_common as tc  # noqa: E402
from conftest import log_rows  # noqa: E402

TINY = ["--channels", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--device", "cpu",
        "--log-every", "1", "--print-every", "1000", "--checkpoint-every", "0"]


def run(data, run_dir, *extra):
    assert train_ddpm.main([*TINY, *data, "--run-dir", str(run_dir), *map(str, extra)]) == 0


def losses(run_dir):
    return [float(r["loss"]) for r in log_rows(run_dir)]


def test_loss_goes_down(data, tmp_path):
    # Overfit 8 images: 30 steps at lr 1e-3, no warm-up, no dropout.
    run(data, tmp_path, "--steps", 30, "--max-images", 8, "--batch-size", 8, "--lr", 1e-3,
        "--warmup-steps", 0, "--dropout", 0)
    loss = losses(tmp_path)
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5]), loss


def test_resume_is_exact(data, tmp_path):
    common = ["--max-images", 16, "--batch-size", 4, "--warmup-steps", 5]  # dropout 0.1: RNG matters
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(data, straight, "--steps", 12, *common)
    run(data, split, "--steps", 6, *common)
    run(data, split, "--steps", 12, "--resume")
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-6, atol=1e-7, msg=f"{part} {k}")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(losses(straight), losses(split), rtol=1e-5)
    assert b["resumes"] == [{"step": 6, "from": "checkpoint.pt"}]


def test_resume_refuses_a_changed_recipe(data, tmp_path):
    run(data, tmp_path, "--steps", 1, "--max-images", 8, "--batch-size", 4)
    with pytest.raises(SystemExit, match="was started with lr"):
        run(data, tmp_path, "--steps", 2, "--resume", "--lr", 1e-3)
    with pytest.raises(SystemExit, match="pass --resume"):
        run(data, tmp_path, "--steps", 2)


def test_time_budget_stops_cleanly_and_resumes(data, tmp_path):
    start = time.time()
    run(data, tmp_path, "--steps", 100000, "--time-budget", 6, "--max-images", 8, "--batch-size", 4)
    took = time.time() - start
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 0 < ck["step"] < 100000
    assert took < 6 + 2, took
    assert len(losses(tmp_path)) == ck["step"]
    run(data, tmp_path, "--steps", ck["step"] + 2, "--resume")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == ck["step"] + 2


def test_export_evaluate_and_portable_resume(data, tmp_path):
    weights_dir = tmp_path / "weights"
    run_dir = tmp_path / "run"
    evaluation = ["--eval-images", 4, "--eval-batch", 4, "--sample-count", 4, "--sample-steps", 3]
    run(data, run_dir, "--steps", 6, "--max-images", 8, "--batch-size", 4, "--export", "--evaluate",
        "--weights-dir", weights_dir, *evaluation)
    exported = weights_dir / "ddpm_cifar10_small.safetensors"
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        dtype = f.get_tensor("conv_in.weight").dtype
    cfg = json.loads(meta["recipe"])
    assert keys == set(train_ddpm.build_model(cfg).state_dict())
    assert meta["steps"] == "6" and meta["seed"] == "0"
    assert meta["dtype"] in ("F16", "F32") and "threshold" in meta["dtype_decision"]
    assert dtype == (torch.float16 if meta["dtype"] == "F16" else torch.float32)
    for name in ("loss", "samples", "purified"):
        width, height = read_png_size(str(weights_dir / f"ddpm_cifar10_small_{name}.png"))
        assert width > 0 and height > 0
    card = (weights_dir / "ddpm_cifar10_small.md").read_text()
    for needle in ("| 10 |", "| 50 |", "| 100 |", "Purification", "6 steps"):
        assert needle in card, needle
    results = json.loads((run_dir / "evaluation.json").read_text())
    assert [m["t"] for m in results["mse"]] == [10, 50, 100]
    assert all(np.isfinite(m["eps_mse"]) for m in results["mse"])
    # The quality bar: ResNet-20 accuracy on the clean images, checked here independently.
    judged = results["classifier"]
    images, labels = tc.read_test_images(None, 4)
    judge = tm.load_cifar_resnet(tc.standard_resnet20(), 20)
    with torch.no_grad():
        clean = (judge(torch.from_numpy(images).float() / 255).argmax(1) == torch.from_numpy(labels)).float().mean()
    assert judged["clean_accuracy"] == pytest.approx(float(clean))
    assert judged["drop_points"] == pytest.approx(100 * (judged["clean_accuracy"] - judged["purified_accuracy"]))
    assert "Quality bar (issue 3)" in card and ("**met**" in card or "**NOT met**" in card)

    # A fresh machine: only the portable checkpoint and the exported EMA are there.
    os.remove(run_dir / "checkpoint.pt")
    os.remove(run_dir / "loss_log.csv")
    run(data, run_dir, "--steps", 8, "--resume", "--weights-dir", weights_dir, "--export")
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 8 and ck["lr_warmup_start"] == 6
    assert "portable" in ck["resumes"][-1]["from"]
    assert len(losses(run_dir)) == 8  # the log came back from the portable copy
    with safe_open(str(exported), "pt") as f:
        assert f.metadata()["steps"] == "8"

    # Without the fp16 model weights (left behind to fit the carry limit): restart from the EMA.
    os.remove(run_dir / "checkpoint.pt")
    os.remove(run_dir / "portable" / "model_f16.safetensors")
    run(data, run_dir, "--steps", 9, "--resume", "--weights-dir", weights_dir)
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 9 and "restarted from the EMA" in ck["resumes"][-1]["from"]


def test_portable_resume_needs_the_matching_ema(data, tmp_path):
    weights_dir, run_dir = tmp_path / "weights", tmp_path / "run"
    run(data, run_dir, "--steps", 3, "--max-images", 8, "--batch-size", 4, "--export", "--weights-dir", weights_dir,
        "--export-dtype", "f32")
    run(data, run_dir, "--steps", 4, "--resume", "--weights-dir", weights_dir)  # portable now at 4, EMA at 3
    os.remove(run_dir / "checkpoint.pt")
    assert json.loads((run_dir / "portable" / "state.json").read_text())["step"] == 4
    with pytest.raises(SystemExit, match="EMA of step 3"):
        run(data, run_dir, "--steps", 5, "--resume", "--weights-dir", weights_dir)


def test_timestep_distribution():
    gen = torch.Generator().manual_seed(0)
    t = train_ddpm.sample_timesteps(400_000, 0.5, 200, gen, "cpu")
    assert int(t.min()) == 1 and int(t.max()) == 1000
    assert abs(float((t <= 200).float().mean()) - 0.6) < 0.005
    assert abs(float((t > 900).float().mean()) - 0.05) < 0.003  # large t still trained
    density = train_ddpm.timestep_density(torch.arange(1, 1001), 0.5, 200)
    assert abs(float(density.sum()) - 1.0) < 1e-6
    assert float(density[0]) == pytest.approx(3 / 1000) and float(density[-1]) == pytest.approx(0.5 / 1000)


def test_schedule_and_reverse_step_match_method_md():
    schedule = train_ddpm.Schedule("cpu")
    betas = np.linspace(1e-4, 0.02, 1000)
    assert schedule.abar[0] == 1.0
    assert schedule.abar[100] == pytest.approx(np.prod(1 - betas[:100]), rel=1e-12)

    class Oracle(torch.nn.Module):  # predicts the true noise of a fixed x0
        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x, t_index):
            t = int(t_index[0]) + 1
            a = schedule.abar[t]
            return (x - a ** 0.5 * self.x0) / (1 - a) ** 0.5

    x0 = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    gen = torch.Generator().manual_seed(0)
    xt = schedule.diffuse(x0, torch.tensor([100, 100]), torch.randn(x0.shape, generator=gen))
    out = train_ddpm.ddpm_reverse(Oracle(x0), xt, 100, schedule, gen)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)  # an exact denoiser gives x0 back
