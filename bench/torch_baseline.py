"""PyTorch baseline of `purifier bench --baseline PYTHON`: the same DDPM UNet (weights/torch_models.py,
written from METHOD.md) with the same deterministic weights and inputs (the generator shared with
the Rust engine, tests/golden/README.md), timed the same way: per batch size, the forward (no
grad) and the forward plus the input VJP d sum(eps * v) / dx, one warm-up then `--repeats` timed
runs, median and p99 in milliseconds. PyTorch runs eager with channels_last (and
cudnn.benchmark on CUDA); `--compile` adds torch.compile. Writes the timings as JSON and, for
the agreement check, eps and grad_x at batch 1 as safetensors.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10-small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--step", type=float, default=99.0, help="0-based step index of every call")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", required=True)
    p.add_argument("--tensors", required=True)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = tm.make_unet(args.config)
    model.load_state_dict(tm.deterministic_state_dict(model, args.seed))
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    forward_model = torch.compile(model) if args.compile else model

    timings = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = deterministic_input("bench.x", batch, args.seed, device).contiguous(memory_format=torch.channels_last)
        v = deterministic_input("bench.v", batch, args.seed, device)
        t = torch.full((batch,), args.step, device=device)

        def forward():
            with torch.no_grad():
                forward_model(x, t)

        def forward_vjp():
            xg = x.detach().requires_grad_(True)
            (forward_model(xg, t) * v).sum().backward()
            return xg.grad

        timings.append(dict(batch=batch, forward=time_runs(args.repeats, forward, device),
                            forward_vjp=time_runs(args.repeats, forward_vjp, device)))
        print(f"  PyTorch batch {batch}: forward {timings[-1]['forward']['median_ms']:.1f} ms, "
              f"forward + VJP {timings[-1]['forward_vjp']['median_ms']:.1f} ms", file=sys.stderr)

    # Agreement at batch 1, in float32 without TF32, eager.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = deterministic_input("bench.x", 1, args.seed, device).requires_grad_(True)
    v = deterministic_input("bench.v", 1, args.seed, device)
    eps = model(x, torch.full((1,), args.step, device=device))
    (eps * v).sum().backward()
    from safetensors.torch import save_file

    save_file({"eps": eps.detach().float().cpu().contiguous(), "grad_x": x.grad.float().cpu().contiguous()},
              args.tensors)
    report = dict(torch=torch.__version__, device=str(device), variant="compile" if args.compile else "eager",
                  channels_last=True, unet_timings=timings)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
