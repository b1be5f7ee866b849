"""Training recipe of the auxiliary network of the `adversarial` guidance mode (METHOD.md 3).

What it trains: a CIFAR ResNet-20 with exactly the layout and parameter names of
../shared/weights/resnet20_cifar10.safetensors (torch_models.CifarResNet: option-A shortcuts,
input normalisation built in, pixels in [0, 1]), adversarially, at l_inf eps = 8/255.

Choice of adversarial training, for a budget of ~30 device-minutes a session:
PGD adversarial training (Madry et al. 2018) with a short attack, PGD-5, step 2/255, a random
start in the eps-ball: each training step costs 5 + 1 forward/backward passes. The cheaper
"fast" FGSM with a random start (Wong et al. 2020, 1 + 1 passes) is known to suffer
catastrophic overfitting at eps = 8/255 (robustness collapsing to ~0 within an epoch) unless
it is watched and stopped early; with a network this small, a PGD-5 epoch is a few seconds on an
H100, so the safer recipe fits the budget: 40 epochs of PGD-5 are ~6 x 40 clean epochs.
The auxiliary network only has to give robust features and class log-probabilities for the
guidance; it does not have to be state of the art (ResNet-20 AT reaches roughly 70% clean and
40% PGD-20 accuracy in the literature).

- SGD, momentum 0.9 (Nesterov), weight decay 5e-4, batch 256, lr 0.2 (0.1 per 128 images) with
  a one-epoch linear warm-up, then cosine to 0 at the last epoch; random crop (4-pixel zero
  padding) and horizontal flip; bf16 autocast on CUDA (the attack's gradient too); BatchNorm in
  training mode during the attack but with its running statistics frozen (momentum 0), so they
  are updated only by the batches the network is trained on.
- Resume, time budget and determinism as train_ddpm.py: every random draw of step s comes from
  generators seeded with (seed, s); `<run-dir>/checkpoint.pt` (3 MB: it fits in what comes back
  from the device) holds the model, the optimizer and the step; `--time-budget` stops in time.
- `--export` writes weights/auxiliary_resnet20_linf.safetensors, F32 (1 MB: fp16 would save
  0.5 MB and round the BatchNorm statistics), the names of ../shared/weights, BatchNorm
  running_mean / running_var included and no num_batches_tracked.
- `--evaluate` loads that file through torch_models.load_cifar_resnet (exactly what the engine
  sees), measures clean and PGD-20 accuracy (l_inf 8/255, step 2/255, random start, fp32) on
  test_lossless.bin, draws the loss curve and adversarial examples, and writes the card
  weights/auxiliary_resnet20_linf.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import png_plot  # noqa: E402
import torch_models as tm  # noqa: E402
import training_common as tc  # noqa: E402

EXPORT_NAME = "auxiliary_resnet20_linf"
CHECKPOINT_FORMAT = "train_auxiliary/1"
PGD_ACCURACY_BAR = 40.0  # issue 3: at least this PGD-20 accuracy (%) at l_inf 8/255 on test_lossless.bin

RECIPE_DEFAULTS = dict(
    depth=20,
    epochs=40,
    batch_size=256,
    lr=0.2,
    momentum=0.9,
    weight_decay=5e-4,
    warmup_epochs=1.0,
    eps=8 / 255,
    attack_steps=5,
    attack_step_size=2 / 255,
    crop_padding=4,
    flip=True,
    seed=0,
    max_images=None,
)
RECIPE_TYPES = dict(
    depth=int, epochs=int, batch_size=int, lr=float, weight_decay=float, warmup_epochs=float,
    eps=lambda s: eval_fraction(s), attack_steps=int, attack_step_size=lambda s: eval_fraction(s),
    crop_padding=int, seed=int, max_images=int,
)
LOG_COLUMNS = ["step", "epoch", "loss", "adv_accuracy", "lr", "images_per_s", "elapsed_s"]


def eval_fraction(text: str) -> float:
    """'8/255' or '0.031' -> float."""
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def trainable_resnet(depth: int) -> tm.CifarResNet:
    """torch_models.CifarResNet with its inference-only BatchNorms swapped for nn.BatchNorm2d
    (same parameter and buffer names, plus num_batches_tracked, dropped at export), He init."""
    model = tm.CifarResNet(depth)

    def swap(module: nn.Module):
        for name, child in module.named_children():
            if isinstance(child, tm.InferenceBatchNorm2d):
                setattr(module, name, nn.BatchNorm2d(child.weight.numel(), eps=tm.BATCHNORM_EPS))
            else:
                swap(child)

    swap(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model


def exportable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in the layout of ../shared/weights: no num_batches_tracked."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


# ---------------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------------

def pgd_linf(model, x, y, eps: float, step_size: float, steps: int, generator, autocast: bool = False):
    """PGD on the cross-entropy, l_inf ball of radius eps around x, pixels kept in [0, 1],
    random start uniform in the ball. Returns x + delta (detached)."""
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator) -> torch.Tensor:
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def resolve_config(args, run_dir: str) -> dict:
    given = {k: getattr(args, k) for k in RECIPE_DEFAULTS if getattr(args, k, None) is not None}
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path) and args.resume:
        stored = tc.read_json(path)["recipe"]
        tc.check_same_recipe(run_dir, stored, given)
        return stored
    if os.path.isfile(path) and not args.resume:
        raise SystemExit(f"error: {run_dir} already holds a run; pass --resume to continue it, "
                         "or choose a new --run-dir")
    cfg = dict(RECIPE_DEFAULTS)
    cfg.update(given)
    return cfg


def lr_at(step: int, total: int, steps_per_epoch: int, cfg: dict) -> float:
    warm = int(cfg["warmup_epochs"] * steps_per_epoch)
    if warm > 0 and step < warm:
        return cfg["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(args, cfg: dict, run_dir: str, budget: tc.TimeBudget) -> int:
    device = tc.pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    images, labels, data_info = tc.load_train_images(args.train_tar, cache_dir=args.data_cache, limit=cfg["max_images"])
    n_images = len(images)
    batch = cfg["batch_size"]
    if n_images < batch:
        raise SystemExit(f"error: {n_images} training images, fewer than one batch of {batch}")
    steps_per_epoch = n_images // batch
    schedule_steps = cfg["epochs"] * steps_per_epoch  # the lr schedule always spans the epochs
    total = schedule_steps if args.steps is None else min(args.steps, schedule_steps)
    tc.log(f"{n_images} training images ({data_info['decoder']}), {steps_per_epoch} steps/epoch, "
           f"{total} steps, device {device}")

    torch.manual_seed(cfg["seed"])
    model = trainable_resnet(cfg["depth"]).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    step, train_seconds, resumes = 0, 0.0, []
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    log_file = tc.CsvLog(os.path.join(run_dir, "loss_log.csv"), LOG_COLUMNS)
    if args.resume and os.path.isfile(checkpoint_path):
        ck = tc.load_torch_checkpoint(checkpoint_path, CHECKPOINT_FORMAT)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step, train_seconds, resumes = ck["step"], ck["train_seconds"], list(ck["resumes"])
        resumes.append({"step": step, "from": "checkpoint.pt"})
        tc.log(f"resumed from {checkpoint_path} at step {step}")
    log_file.truncate_after(step)
    if step == 0:
        tc.write_json(os.path.join(run_dir, "config.json"), {
            "recipe": cfg, "data": data_info, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git": tc.git_revision(), "environment": tc.environment(), "total_steps": schedule_steps,
            "attack": f"PGD-{cfg['attack_steps']} l_inf eps {cfg['eps']:.5f}, step {cfg['attack_step_size']:.5f}, random start",
        })

    def save():
        return tc.atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": cfg, "step": step, "total_steps": schedule_steps,
            "train_seconds": train_seconds, "resumes": resumes,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
        }, checkpoint_path)

    if step >= total:
        tc.log(f"already at step {step} >= {total}: nothing to train")
        return step
    images_dev = torch.from_numpy(images).to(device)
    labels_dev = torch.from_numpy(labels).to(device)
    gen = torch.Generator(device=device)
    order = tc.BatchOrder(n_images, batch, cfg["seed"], device)
    reserve = args.reserve if args.reserve is not None else (
        (90.0 if cuda else 10.0) if (args.export or args.evaluate) else 0.0)
    step_time, save_seconds = None, 2.0
    sums = torch.zeros(3, device=device)
    batch_count = torch.tensor(float(batch), device=device)
    interval_start, interval_steps = time.time(), 0
    session_start = time.time()
    pending = []
    stop_reason = f"reached step {total}"
    model.train()
    while step < total:
        left = budget.left()
        need = reserve + 2 * save_seconds + 3 * (step_time or 0.0)
        if left < need:
            stop_reason = f"time budget: {left:.0f} s left, keeping {need:.0f} s"
            break
        idx = order.indices(step)
        gen.manual_seed(tc.step_seed(cfg["seed"], step))
        x = images_dev[idx].float() / 255.0
        y = labels_dev[idx]
        x = random_crop_flip(x, cfg["crop_padding"], cfg["flip"], gen)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        set_bn_momentum(model, 0.0)  # the attack's passes do not move the running statistics
        x_adv = pgd_linf(model, x, y, cfg["eps"], cfg["attack_step_size"], cfg["attack_steps"], gen, autocast=cuda)
        set_bn_momentum(model, 0.1)
        lr = lr_at(step, schedule_steps, steps_per_epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x_adv).float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).float().sum(), batch_count])
        step += 1
        interval_steps += 1
        if step % args.log_every == 0 or step == total:
            s = sums.tolist()
            if not all(math.isfinite(v) for v in s):
                raise SystemExit(f"error: the loss became NaN/Inf before step {step}; {checkpoint_path} "
                                 "keeps the last good state (not overwritten)")
            now = time.time()
            elapsed = now - interval_start
            step_time = elapsed / interval_steps if step_time is None else 0.5 * step_time + 0.5 * elapsed / interval_steps
            row = dict(step=step, epoch=f"{step / steps_per_epoch:.3f}", loss=f"{s[0] / s[2]:.6g}",
                       adv_accuracy=f"{s[1] / s[2]:.4f}", lr=f"{lr:.4g}",
                       images_per_s=f"{interval_steps * batch / elapsed:.1f}",
                       elapsed_s=f"{train_seconds + now - session_start:.1f}")
            pending.append(row)
            if step % (args.log_every * args.print_every) == 0 or step == total:
                tc.log(f"step {step} (epoch {row['epoch']}): adversarial loss {row['loss']}, "
                       f"accuracy {row['adv_accuracy']}, lr {row['lr']}, {row['images_per_s']} img/s")
            sums.zero_()
            interval_start, interval_steps = time.time(), 0
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total:
            log_file.append(pending)
            pending = []
            train_seconds += time.time() - session_start
            session_start = time.time()
            save_seconds = max(save_seconds, save())
    log_file.append(pending)
    train_seconds += time.time() - session_start
    took = save()
    tc.log(f"stopped at step {step} ({stop_reason}); checkpoint saved in {took:.1f} s")
    return step


# ---------------------------------------------------------------------------------------------
# Export and evaluation
# ---------------------------------------------------------------------------------------------

def export(run_dir: str, out_path: str) -> dict:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist: train first")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    model = trainable_resnet(cfg["depth"])
    model.load_state_dict(ck["model"])
    tensors = exportable_state(model)
    reference = tm.CifarResNet(cfg["depth"]).state_dict()
    assert set(tensors) == set(reference), "exported names differ from torch_models.CifarResNet"
    for k, v in reference.items():
        assert tensors[k].shape == v.shape, k
    meta = {
        "architecture": f"cifar-resnet{cfg['depth']}-option-a",
        "depth": str(cfg["depth"]),
        "input": "RGB pixels in [0, 1]; the network normalises with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)",
        "training": f"PGD-{cfg['attack_steps']} adversarial training, l_inf eps {cfg['eps']:.6f}",
        "steps": str(ck["step"]),
        "total_steps": str(ck["total_steps"]),
        "seed": str(cfg["seed"]),
        "recipe": json.dumps(cfg, sort_keys=True),
        "train_seconds": f"{ck['train_seconds']:.1f}",
        "resumes": json.dumps(ck["resumes"]),
        "dtype": "F32",
        "git": tc.git_revision(),
        "trainer": "weights/train_auxiliary.py",
    }
    tc.atomic_save_safetensors(tensors, out_path, meta)
    tc.log(f"exported step {ck['step']} to {out_path} (F32, {len(tensors)} tensors)")
    return meta


def robust_accuracy(model, x, y, eps, step_size, steps, batch, seed) -> tuple[float, float, torch.Tensor]:
    """(clean accuracy, PGD accuracy, adversarial images) in fp32."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    clean = adv_correct = 0
    adv_all = []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        adv = pgd_linf(model, xb, yb, eps, step_size, steps, gen)
        with torch.no_grad():
            adv_correct += int((model(adv).argmax(1) == yb).sum())
        adv_all.append(adv)
    return clean / len(x), adv_correct / len(x), torch.cat(adv_all)


def evaluate(args, run_dir: str, weights_path: str, out_dir: str, device) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from safetensors import safe_open

    with safe_open(weights_path, "pt") as f:
        meta = f.metadata() or {}
    recipe = json.loads(meta["recipe"])
    model = tm.load_cifar_resnet(weights_path, recipe["depth"]).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    images, labels = tc.read_test_images(args.test_file, args.eval_images)
    x = torch.from_numpy(images).to(device).float() / 255.0
    y = torch.from_numpy(labels).to(device)
    eps, step_size = 8 / 255, 2 / 255
    start = time.time()
    clean, robust, adv = robust_accuracy(model, x, y, eps, step_size, args.pgd_steps, args.eval_batch, seed=7)
    tc.log(f"clean accuracy {clean:.4f}, PGD-{args.pgd_steps} accuracy {robust:.4f} on {len(x)} images")
    results = dict(images=len(x), clean_accuracy=clean, pgd_accuracy=robust, pgd_steps=args.pgd_steps,
                   eps=eps, step_size=step_size, seconds=0.0)
    if os.path.isfile(tc.standard_resnet20()) and recipe["depth"] == 20:
        standard = tm.load_cifar_resnet(tc.standard_resnet20(), 20).to(device)
        for p in standard.parameters():
            p.requires_grad_(False)
        s_clean, s_robust, _ = robust_accuracy(standard, x, y, eps, step_size, args.pgd_steps, args.eval_batch, seed=7)
        results["standard_resnet20"] = dict(clean_accuracy=s_clean, pgd_accuracy=s_robust)
        tc.log(f"for reference, ../shared resnet20: clean {s_clean:.4f}, PGD-{args.pgd_steps} {s_robust:.4f}")
    results["seconds"] = time.time() - start

    k = min(12, len(x))
    perturbation = (adv[:k] - x[:k]) / (2 * eps) + 0.5  # -eps..eps -> 0..1
    grid = torch.cat([x[:k], adv[:k], perturbation]).cpu().numpy()
    examples_png = os.path.join(out_dir, f"{EXPORT_NAME}_examples.png")
    png_plot.write_png(examples_png, png_plot.image_grid(png_plot.to_uint8(grid, 0.0, 1.0), columns=k, scale=2))
    rows = tc.CsvLog(os.path.join(run_dir, "loss_log.csv"), LOG_COLUMNS).read()
    if rows:
        png_plot.plot_curves(
            os.path.join(out_dir, f"{EXPORT_NAME}_loss.png"), [float(r["step"]) for r in rows],
            {"adversarial CE (train batches)": [float(r["loss"]) for r in rows],
             "1 - adversarial accuracy (train batches)": [1 - float(r["adv_accuracy"]) for r in rows]},
            title="ResNet-20 PGD adversarial training", xlabel="step", ylabel="loss / error")
    tc.write_json(os.path.join(run_dir, "evaluation.json"), results)
    card = write_card(os.path.join(out_dir, f"{EXPORT_NAME}.md"), meta, recipe, results, rows, run_dir, weights_path)
    tc.log(f"card {card}")
    return results


def write_card(path, meta, recipe, results, rows, run_dir, weights_path) -> str:
    steps = int(meta["steps"])
    total = int(meta["total_steps"])
    env = tc.run_environment(run_dir)
    images = recipe.get("max_images") or 50000
    last = rows[-1] if rows else {}
    lines = [
        f"# `{os.path.basename(weights_path)}`: adversarially trained CIFAR ResNet-{recipe['depth']}",
        "",
        f"The auxiliary network `A` of the `adversarial` guidance mode (METHOD.md section 3). "
        f"{steps:,} of {total:,} steps of batch {recipe['batch_size']} "
        f"({steps * recipe['batch_size'] / images:.1f} epochs of {images:,} images), "
        f"{float(meta['train_seconds']) / 60:.1f} minutes" + (f" on {env['gpu']}" if env.get("gpu") else "")
        + f"; F32, {os.path.getsize(weights_path) / 1e6:.2f} MB, the layout and names of "
        "../shared/weights/resnet20_cifar10.safetensors (input: pixels in [0, 1], normalised inside).",
        "",
        "## Data and recipe",
        "",
        f"- CIFAR-10 training set, {images:,} images of ../shared/data/cifar10/train_jpeg.tar.gz (the "
        "lossy public JPEG copy), random crop (4-pixel zero padding) and horizontal flip.",
        f"- PGD adversarial training (Madry et al.): PGD-{recipe['attack_steps']}, l_inf eps "
        f"{recipe['eps'] * 255:.0f}/255, step {recipe['attack_step_size'] * 255:.1f}/255, random start; "
        "the loss is the cross-entropy on the adversarial batch only.",
        f"- SGD (Nesterov, momentum {recipe['momentum']}), lr {recipe['lr']}, weight decay "
        f"{recipe['weight_decay']} (not on BatchNorm and biases), warm-up {recipe['warmup_epochs']} epoch, "
        f"cosine to 0 over {recipe['epochs']} epochs; seed {recipe['seed']}.",
        f"- Resumes: {json.loads(meta.get('resumes', '[]')) or 'none'}.",
        "",
        "## Measured on ../shared/data/cifar10/test_lossless.bin",
        "",
        f"{results['images']} images; PGD-{results['pgd_steps']}: l_inf eps 8/255, step 2/255, random start, "
        "cross-entropy, fp32, attack seed 7, one restart.",
        "",
        f"| network | clean accuracy | PGD-{results['pgd_steps']} accuracy |",
        "| --- | --- | --- |",
        f"| this network | {100 * results['clean_accuracy']:.1f}% | {100 * results['pgd_accuracy']:.1f}% |",
    ]
    if "standard_resnet20" in results:
        s = results["standard_resnet20"]
        lines.append(f"| ../shared/weights/resnet20_cifar10 (standard training) | {100 * s['clean_accuracy']:.1f}% "
                     f"| {100 * s['pgd_accuracy']:.1f}% |")
    robust = 100 * results["pgd_accuracy"]
    lines += [
        "",
        f"Quality bar (issue 3): PGD-{results['pgd_steps']} accuracy >= {PGD_ACCURACY_BAR:g}% at l_inf 8/255: "
        f"{robust:.1f}%, **{'met' if robust >= PGD_ACCURACY_BAR else 'NOT met'}**.",
        "",
        f"- Loss curve: `{EXPORT_NAME}_loss.png` (adversarial cross-entropy and error on the training batches "
        "against the step).",
        f"- Examples: `{EXPORT_NAME}_examples.png` (rows: test images, PGD-{results['pgd_steps']} adversarial images, the "
        "perturbation scaled from [-8/255, 8/255] to [0, 1]).",
        "",
        f"Last logged interval: step {last.get('step', '-')}, adversarial loss {last.get('loss', '-')}, "
        f"adversarial accuracy {last.get('adv_accuracy', '-')}, {last.get('images_per_s', '-')} images/s.",
        "",
    ]
    return tc.save_card(path, lines, meta.get("git", "unknown"), env, "aux")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Adversarially train / export / evaluate the auxiliary ResNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default=os.path.join(tc.DATA_CACHE, "runs", "auxiliary"))
    p.add_argument("--train", action="store_true", help="train (to --epochs, or --steps)")
    p.add_argument("--steps", type=int, default=None, help="stop at this step instead of the end of --epochs "
                   "(the lr schedule still spans the epochs: for tests)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--reserve", type=float, default=None)
    p.add_argument("--export", action="store_true")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--weights-dir", default=tc.WEIGHTS_DIR)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-tar", default=None)
    p.add_argument("--data-cache", default=tc.DATA_CACHE, help="where the decoded images are cached")
    p.add_argument("--test-file", default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--print-every", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--pgd-steps", type=int, default=20)
    tc.add_recipe_flags(p, RECIPE_TYPES, RECIPE_DEFAULTS)
    p.add_argument("--no-flip", dest="flip", action="store_const", const=False, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = tc.TimeBudget(args.time_budget)
    run_dir = os.path.abspath(args.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    out_path = os.path.join(args.weights_dir, f"{EXPORT_NAME}.safetensors")
    if args.train or args.steps is not None:
        cfg = resolve_config(args, run_dir)
        train(args, cfg, run_dir, budget)
    args.test_file = args.test_file or tc.default_test_file()
    if args.export:
        export(run_dir, out_path)
    if args.evaluate:
        evaluate(args, run_dir, out_path, args.weights_dir, tc.pick_device(args.device))
    if not (args.train or args.steps is not None or args.export or args.evaluate):
        print("nothing to do: give --train (and/or --export, --evaluate)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
