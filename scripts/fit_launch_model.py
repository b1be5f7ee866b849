#!/usr/bin/env python3
"""Fits the launch model's free constants (src/driver/launch_model.rs) to a GPU's whole-pass times.

Each point is a CSV written by `examples/emulator_launch_depth.rs ... launches=FILE` (one row a
launch, the counts the model reads), the passes it sums ("forward", "vjp" or "forward+vjp") and the
GPU's time for them in milliseconds (the suite's replayed medians: a graph, as the model assumes).
A grid search over the two fitted constants, the launch's fixed cost and the L2 bandwidth,
minimises the squared log ratios; the others (the scoreboard's latencies, the mma peak, issue, the
load/store pipe) stay as the model has them. Pure Python: CI and this machine have no numpy.

Usage: scripts/fit_launch_model.py CSV:PASSES:MS [CSV:PASSES:MS ...]
"""

import csv
import itertools
import math
import sys

SMS = 132
CLOCK_HZ = 1.98e9
SCHEDULERS = 4.0
MMA_FLOPS_PER_S = 642e12
LSU_BYTES_PER_SM_CYCLE = 128.0
SECTOR_BYTES = 32
DIVISION_INSTRUCTIONS = 20.0


def launch_terms(row):
    """The model's terms in cycles: the scoreboard's, the busiest SM's longest, and the L2's bytes."""
    n = {k: float(v) for k, v in row.items() if k not in ("pass", "kernel")}
    concurrent = SMS * max(n["blocks_per_sm"], 1.0)
    global_bytes = (n["load_sectors"] + n["store_sectors"]) * SECTOR_BYTES
    issued = n["warp_instructions"] + (DIVISION_INSTRUCTIONS - 1.0) * n["integer_divisions"]
    latency = max(n["block_cycles_max"], n["block_cycles_sum"] / concurrent)
    # The busiest SM's share of the work: ceil(blocks / SMs) blocks' worth.
    busiest = math.ceil(n["blocks"] / SMS) / n["blocks"]
    fixed_terms = busiest * max(
        issued / SCHEDULERS,
        2.0 * n["mma_macs"] / (MMA_FLOPS_PER_S / CLOCK_HZ / SMS),
        (n["shared_wavefronts"] * LSU_BYTES_PER_SM_CYCLE + global_bytes) / LSU_BYTES_PER_SM_CYCLE,
    )
    return latency, fixed_terms, global_bytes


def load(spec):
    path, passes, ms = spec.rsplit(":", 2)
    wanted = set(passes.split("+"))
    with open(path) as f:
        rows = [launch_terms(r) for r in csv.DictReader(f) if r["pass"] in wanted]
    return spec, rows, float(ms)


def predict_ms(rows, cost_us, l2_tb_s):
    l2_bytes_per_cycle = l2_tb_s * 1e12 / CLOCK_HZ
    cycles = sum(
        max(latency, fixed, global_bytes / l2_bytes_per_cycle) + cost_us * 1e-6 * CLOCK_HZ
        for latency, fixed, global_bytes in rows
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
