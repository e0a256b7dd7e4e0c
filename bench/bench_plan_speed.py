"""How long `meshforge plan` searches, and how much memory it takes, at 16,384 GPUs for a
405B-class decoder (Llama-3.1-405B's shape: 126 layers, width 16384, 128 query / 8 kv heads,
SwiGLU 53248, vocabulary 128256, sequence 8192, a 16M-token global batch of 2048 sequences) on
H100s, 8 per node; one process, one core.

Reports CPU seconds (``time.process_time``: the machine is shared, so wall time says more about the
load than about the planner), the peak resident memory (``ru_maxrss``), the layouts enumerated and
priced. Target (issue #27): under 60 s of one core and under 1 GB.

Run: ``python bench/bench_plan_speed.py [--gpus 16384] [--before DIR] [--record]``; ``--before DIR`` first runs
the same search in a subprocess with the ``meshforge`` package of the tree at ``DIR`` (e.g. ``git archive main meshforge
configs | tar -x -C DIR``), so that a before / after pair is measured under the same load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import loadavg, record  # noqa: E402

SECTION = "## Planner search speed"
MODEL = [
    "--model.dim",
    "16384",
    "--model.n_layers",
    "126",
    "--model.n_heads",
    "128",
    "--model.n_kv_heads",
    "8",
    "--model.ffn_dim",
    "53248",
    "--model.vocab_size",
    "128256",
    "--model.max_seq_len",
    "8192",
    "--data.seq_len",
    "8192",
    "--train.global_batch_size",
    "2048",
    "--train.micro_batch_size",
    "1",
    "--model.tie_embeddings",
    "false",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=16384)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--before", help="a tree whose meshforge package to time first, in a subprocess")
    args = ap.parse_args()
    before = None
    if args.before:
        env = {**os.environ, "PYTHONPATH": str(Path(args.before).resolve())}
        out = subprocess.run(
            [sys.executable, __file__, "--gpus", str(args.gpus)], env=env, check=True, stdout=subprocess.PIPE, text=True
        ).stdout.strip()
        before = out.splitlines()[-1]
        print(f"before ({args.before}): {before}")
    from meshforge.config import load_config
    from meshforge.plan.devices import get_device
    from meshforge.plan.planner import plan_job

    cfg = load_config("llama-70b", MODEL)
    cfg.train.device = "cuda"
    t0, w0 = time.process_time(), time.perf_counter()
    plan = plan_job(cfg, args.gpus, 8, get_device("h100-80gb"))
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    best = plan.fitting[0]
    # the whole ranked list (layout, step time to the last bit, memory, fits) and the refusals: equal digests
    # before / after say a speed change priced, ranked and refused exactly the same
    rows = [
        (p.layout.describe(), repr(p.time.step_s), p.memory["total"], p.fits) for p in plan.fitting + plan.overflowing
    ]
    digest = hashlib.sha256(json.dumps([rows, sorted(plan.refused.items())]).encode()).hexdigest()[:16]
    lines = [
        f"405B-class decoder on {args.gpus} x H100 (8 per node): {cpu:.1f} s CPU ({wall:.0f} s wall), peak RSS "
        f"{rss:.2f} GiB; {len(plan.fitting) + len(plan.overflowing):,} layouts priced "
        f"({len(plan.fitting):,} fit); first: {best.layout.describe()} at {best.time.step_s:.2f} s/step, "
        f"MFU {100 * best.time.mfu:.1f}%; ranked list and refusals digest {digest}; load average {loadavg()}"
    ]
    print(lines[0])
    if before is not None:
        cpu_before = float(re.search(r"([0-9.]+) s CPU", before).group(1))
        same = re.search(r"digest (\w+)", before).group(1) == digest
        lines = [
            f"before (the tree at {args.before}): {before}",
            "",
            f"after: {lines[0]}",
            "",
            f"CPU after / before: {cpu / cpu_before:.2f}; the same ranked list and refusals: {same}",
        ]
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
