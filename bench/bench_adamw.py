"""AdamW's step on a CPU: torch's multi-tensor (foreach) kernel against its fused one, on the parameters
of ``bench_peers.py``'s shapes (meshforge's own groups: matrices decayed, vectors not), one torch thread.

Each kernel takes ``--reps`` steps after one untimed step (which makes the state); reported: the median
CPU seconds per step, the ratio, and the step's share of a training step where ``--step-s`` gives one.
Run: ``python bench/bench_adamw.py --record``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import SHAPES, job_config  # noqa: E402
from benchlib import loadavg, record  # noqa: E402

SECTION = "## AdamW on a CPU: multi-tensor vs fused"


def step_seconds(model: torch.nn.Module, kernel: str, reps: int) -> float:
    from meshforge.pretrain.optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), **{kernel: True})
    opt.step()
    times = []
    for _ in range(reps):
        start = time.process_time()
        opt.step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="foreach, fused alternating, this many times each")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from meshforge.models import build_model

    before = loadavg()
    lines = ["| shape | params | foreach s/step | fused s/step | foreach / fused |", "|---|---:|---:|---:|---:|"]
    for shape in args.shapes:
        model = build_model(job_config(shape, "eager", "/nonexistent", 1).model)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        got = {"foreach": [], "fused": []}
        for _ in range(args.rounds):
            for kernel in got:
                got[kernel].append(step_seconds(model, kernel, args.reps))
        each, fused = statistics.median(got["foreach"]), statistics.median(got["fused"])
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"| {shape} | {n / 1e6:.2f}M | {each:.4f} | {fused:.4f} | {each / fused:.2f} |")
        print(lines[-1], flush=True)
    lines = [
        f"One torch thread, CPU seconds, median over {args.rounds} alternating rounds of {args.reps} steps. "
        f"Load average before: {before}; after: {loadavg()}.",
        "",
        *lines,
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
