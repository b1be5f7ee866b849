"""PyTorch baseline of `purifier bench --baseline PYTHON`: the same DDPM UNet (weights/torch_models.py,
written from METHOD.md) with the same deterministic weights and inputs (the generator shared with
the Rust engine, tests/golden/README.md), timed the same way: per batch size, the forward (no
grad) and the forward plus the input VJP d sum(eps * v) / dx, one warm-up then `--repeats` timed
runs, median and p99 in milliseconds; and whole purifications (`--purify-modes`), the guidance by
autograd. PyTorch runs with channels_last and cudnn.benchmark, in f32 or under autocast to the
engine's `--precision`, in each of `--variants`: `eager`, `compile` (torch.compile, static shapes,
the forward only: compiling the backward too doubles a compile that takes minutes a batch size, and
the target compares the forward) and `graphs` (the forward captured once as a CUDA graph and
replayed). f32 runs with PyTorch's own defaults, cuDNN's TF32 convolutions included (the JSON says
so). Writes, for the agreement check, eps and grad_x at batch 1 (f32, eager, no TF32) as
safetensors first, then the timings as JSON, rewritten after every row (`"complete": false` until
the last): a run stopped part-way (the engine's `--baseline-timeout`) leaves what it measured.

Run by the engine's bench command; by hand:
    python bench/torch_baseline.py --config cifar10-small --batches 1,16 --json out.json --tensors out.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights"))

import torch_models as tm  # noqa: E402


def deterministic_input(name: str, batch: int, seed: int, device) -> torch.Tensor:
    """The generator's raw stream in [-1, 1) (the engine's `deterministic_uniform`)."""
    values = tm.uniform_stream(tm.tensor_key(name, seed), batch * 3 * 32 * 32)
    return torch.from_numpy(values.reshape(batch, 3, 32, 32)).to(device)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as the engine computes it."""
    ordered = sorted(values)
    rank = min(max(math.ceil(q * len(ordered)), 1), len(ordered))
    return ordered[rank - 1]


def time_runs(repeats: int, run, device) -> dict:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    seconds = [timed() for _ in range(repeats)]
    return dict(median_ms=1e3 * percentile(seconds, 0.5), p99_ms=1e3 * percentile(seconds, 0.99))


AUTOCAST = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}


def autocast(device, precision: str):
    dtype = AUTOCAST[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def graphed_forward(model, x, t, device, precision):
    """The forward captured once as a CUDA graph (static input and output buffers), replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), autocast(device, precision):
        for _ in range(3):  # warm-up before capture (cudnn.benchmark picks its algorithms here)
            model(x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), autocast(device, precision):
        model(x, t)
    return graph.replay


def time_unet(model, variant, batches, args, device, timings: list, on_row) -> list:
    """Appends a row to `timings` per batch size, calling `on_row` after each."""
    for batch in batches:
        x = deterministic_input("bench.x", batch, args.seed, device).contiguous(memory_format=torch.channels_last)
        v = deterministic_input("bench.v", batch, args.seed, device)
        t = torch.full((batch,), args.step, device=device)

        def forward():
            with torch.no_grad(), autocast(device, args.precision):
                model(x, t)

        def forward_vjp():
            xg = x.detach().requires_grad_(True)
            with autocast(device, args.precision):
                eps = model(xg, t)
            (eps.float() * v).sum().backward()
            return xg.grad

        row = dict(batch=batch)
        if variant == "graphs":
            # Only the forward is graphed: the VJP's autograd graph is rebuilt per call.
            row["forward"] = time_runs(args.repeats, graphed_forward(model, x, t, device, args.precision), device)
        else:
            row["forward"] = time_runs(args.repeats, forward, device)
            if variant != "compile":
                row["forward_vjp"] = time_runs(args.repeats, forward_vjp, device)
        timings.append(row)
        on_row()
        vjp = f", forward + VJP {row['forward_vjp']['median_ms']:.1f} ms" if "forward_vjp" in row else ""
        print(f"  PyTorch {variant} {args.precision} batch {batch}: forward {row['forward']['median_ms']:.1f} ms{vjp}",
              file=sys.stderr)
    return timings


def reverse_steps(t_star: int):
    """(t, c0, ct, noise std, guidance variance, sqrt abar, sqrt(1 - abar)) per DDPM step t -> t-1,
    as src/diffusion/schedule.rs computes them (linear betas 1e-4 .. 0.02, T = 1000)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    steps = []
    for t in range(t_star, 0, -1):
        a, a_prev = abar[t], abar[t - 1]
        beta = 1.0 - a / a_prev
        variance = beta * (1.0 - a_prev) / (1.0 - a)
        c0 = beta * math.sqrt(a_prev) / (1.0 - a)
        ct = (1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a)
        steps.append((t, float(c0), float(ct), math.sqrt(variance) if t > 1 else 0.0, float(variance),
                      math.sqrt(a), math.sqrt(1.0 - a)))
    return steps, abar


def purify(model, auxiliary, x_in, mode: str, t_star: int, device, precision: str, kappa: float = 0.5):
    """One purification of METHOD.md (DDPM, guidance scale 1, lambda_f = lambda_c = 1, path x0):
    the work the engine's `bench` times, with the guidance gradient from autograd."""
    steps, abar = reverse_steps(t_star)
    x_t = math.sqrt(abar[t_star]) * x_in + math.sqrt(1.0 - abar[t_star]) * torch.randn_like(x_in)
    reference, labels = None, None
    if mode == "adversarial":
        with torch.no_grad(), autocast(device, precision):
            reference = auxiliary.features((x_in + 1) / 2).float()
            labels = auxiliary.linear(reference).argmax(dim=1)
    for t, c0, ct, noise_std, variance, a, s in steps:
        index = torch.full((x_t.shape[0],), float(t - 1), device=device)
        guided = mode != "none" and variance > 0
        with torch.set_grad_enabled(mode == "adversarial" and guided):
            x = x_t.detach().requires_grad_(mode == "adversarial" and guided)
            with autocast(device, precision):
                eps = model(x, index).float()
            x0 = ((x - s * eps) / a).clamp(-1, 1)
            mu = c0 * x0 + ct * x
            delta = None
            if guided and mode == "pixel":
                delta = -2.0 * variance * (x - a * x_in)
            elif guided and mode == "adversarial":
                with autocast(device, precision):
                    features = auxiliary.features((x0 + 1) / 2).float()
                    log_p = torch.log_softmax(auxiliary.linear(features).float(), dim=1)
                objective = (-((features - reference) ** 2).sum(dim=1) / features.shape[1]
                             + log_p.gather(1, labels[:, None])[:, 0])
                (grad,) = torch.autograd.grad(objective.sum(), x)
                delta = variance * grad
        mu = mu.detach()
        if delta is not None:
            limit = kappa * (x_t - mu).flatten(1).norm(dim=1)
            norm = delta.flatten(1).norm(dim=1)
            delta = delta * torch.clamp(limit / norm.clamp_min(1e-30), max=1.0)[:, None, None, None]
            mu = mu + delta
        x_t = mu + noise_std * torch.randn_like(mu) if noise_std > 0 else mu
    return x_t.clamp(-1, 1)


def time_purify(model, auxiliary, modes, args, device, rows: list, on_row) -> list:
    """Appends a row to `rows` per mode, calling `on_row` after each."""
    batch = args.purify_batch
    x_in = deterministic_input("bench.x", batch, args.seed, device).contiguous(memory_format=torch.channels_last)
    for mode in modes:
        def run():
            purify(model, auxiliary, x_in, mode, args.purify_t_star, device, args.precision)

        timing = time_runs(args.repeats, run, device)
        steps = args.purify_t_star
        rows.append(dict(mode=mode, batch=batch, t_star=steps,
                         step=dict(median_ms=timing["median_ms"] / steps, p99_ms=timing["p99_ms"] / steps),
                         images_per_s=batch / (timing["median_ms"] / 1e3)))
        print(f"  PyTorch purify {mode} {args.precision} batch {batch}, t* {steps}: "
              f"{rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr)
        on_row()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10-small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--step", type=float, default=99.0, help="0-based step index of every call")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="f32", choices=sorted(AUTOCAST))
    p.add_argument("--variants", default="eager", help="comma list of eager, compile, graphs (CUDA only)")
    p.add_argument("--compile", action="store_true", help="same as adding compile to --variants")
    p.add_argument("--purify-modes", default="", help="comma list of none, pixel, adversarial")
    p.add_argument("--purify-t-star", type=int, default=10)
    p.add_argument("--purify-batch", type=int, default=16)
    p.add_argument("--json", required=True)
    p.add_argument("--tensors", required=True)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v] + (["compile"] if args.compile else [])
    unknown = set(variants) - {"eager", "compile", "graphs"}
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    if "graphs" in variants and device.type != "cuda":
        p.error("the graphs variant needs --device cuda")
    torch.backends.cudnn.benchmark = True
    model = tm.make_unet(args.config)
    model.load_state_dict(tm.deterministic_state_dict(model, args.seed))
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # gradients with respect to the input only

    write_agreement_tensors(model, args, device)

    batches = [int(b) for b in args.batches.split(",")]
    results = {variant: [] for variant in dict.fromkeys(variants)}
    purify_rows = []
    report = dict(torch=torch.__version__, device=str(device), precision=args.precision,
                  autocast=str(AUTOCAST[args.precision]), variant=",".join(results), channels_last=True,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, complete=False,
                  unet_timings=results[next(iter(results))] if results else [], variants=results,
                  purify_timings=purify_rows)

    def on_row():
        write_json(report, args.json)

    on_row()
    for variant in results:
        runner = torch.compile(model, dynamic=False) if variant == "compile" else model
        time_unet(runner, variant, batches, args, device, results[variant], on_row)

    modes = [m for m in args.purify_modes.split(",") if m]
    if modes:
        auxiliary = tm.CifarResNet(20)
        auxiliary.load_state_dict(tm.deterministic_state_dict(auxiliary, args.seed))
        auxiliary = auxiliary.to(device).eval().to(memory_format=torch.channels_last)
        for parameter in auxiliary.parameters():
            parameter.requires_grad_(False)
        time_purify(model, auxiliary, modes, args, device, purify_rows, on_row)

    report["complete"] = True
    write_json(report, args.json)
    return 0


def write_agreement_tensors(model, args, device) -> None:
    """eps and grad_x at batch 1 in float32 without TF32, eager, for the engine's agreement check;
    PyTorch's TF32 defaults are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = deterministic_input("bench.x", 1, args.seed, device).requires_grad_(True)
    v = deterministic_input("bench.v", 1, args.seed, device)
    eps = model(x, torch.full((1,), args.step, device=device))
    (eps * v).sum().backward()
    from safetensors.torch import save_file

    save_file({"eps": eps.detach().float().cpu().contiguous(), "grad_x": x.grad.float().cpu().contiguous()},
              args.tensors)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def write_json(report: dict, path: str) -> None:
    """Whole or not at all: a reader never sees half a file, even if this process is killed."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
