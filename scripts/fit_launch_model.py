#!/usr/bin/env python3
"""Fits the launch model's free constants (src/driver/launch_model.rs) to a GPU's whole-pass times.

Each point is a CSV written by `examples/emulator_launch_depth.rs ... launches=FILE` (one row a
launch: the model's terms as src/driver/launch_model.rs computes them, the L2's in bytes), the
passes it sums ("forward", "vjp" or "forward+vjp") and the GPU's time for them in milliseconds (the
suite's replayed medians: a graph, as the model assumes).
A grid search over the two fitted constants, the launch's fixed cost and the L2 bandwidth,
minimises the squared log ratios; a launch takes the longest of its terms plus the fixed cost, as
in the model. Pure Python: CI and this machine have no numpy.

Usage: scripts/fit_launch_model.py CSV:PASSES:MS [CSV:PASSES:MS ...]
"""

import csv
import itertools
import math
import sys

CLOCK_HZ = 1.98e9


def launch_terms(row):
    """The launch's terms the fit leaves alone (cycles: its longest) and its L2 bytes."""
    fixed_terms = max(float(row[k]) for k in ("latency", "issue", "tensor", "lsu"))
    return fixed_terms, float(row["l2_bytes"])


def load(spec):
    path, passes, ms = spec.rsplit(":", 2)
    wanted = set(passes.split("+"))
    with open(path) as f:
        rows = [launch_terms(r) for r in csv.DictReader(f) if r["pass"] in wanted]
    return spec, rows, float(ms)


def predict_ms(rows, cost_us, l2_tb_s):
    l2_bytes_per_cycle = l2_tb_s * 1e12 / CLOCK_HZ
    cycles = sum(
        max(fixed, l2_bytes / l2_bytes_per_cycle) + cost_us * 1e-6 * CLOCK_HZ for fixed, l2_bytes in rows
    )
    return cycles / CLOCK_HZ * 1e3


def main():
    points = [load(spec) for spec in sys.argv[1:]]
    if not points:
        sys.exit(__doc__)
    costs = [c / 10 for c in range(0, 61)]
    bandwidths = [b / 4 for b in range(4, 81)]
    best = None
    for cost, bw in itertools.product(costs, bandwidths):
        loss = sum(math.log(predict_ms(rows, cost, bw) / ms) ** 2 for _, rows, ms in points)
        if best is None or loss < best[0]:
            best = (loss, cost, bw)
    loss, cost, bw = best
    print(f"fit: launch cost {cost:.1f} us, L2 {bw:.2f} TB/s (rms log ratio {math.sqrt(loss / len(points)):.3f})")
    for spec, rows, ms in points:
        print(f"  {spec}: model {predict_ms(rows, cost, bw):.3f} ms, GPU {ms:.3f} ms, {len(rows)} launches")


if __name__ == "__main__":
    main()
