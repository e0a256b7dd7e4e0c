"""A job restarted by torchrun (``--max-restarts``, as ``meshforge launch --ft-groups`` starts each replica
group) makes its process group again: the store torchrun keeps across restarts holds the dead attempt's
keys, which the next attempt must not read (``meshforge.launch.env.init_distributed``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from parallel_harness import REPO


def test_process_group_after_a_torchrun_restart():
    out = subprocess.run(
        [sys.executable, *"-m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1".split()]
        + [str(REPO / "tests" / "harness" / "restart_rank.py")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert sorted(re.findall(r"attempt \d+ rank \d+: sum \S+", out.stdout)) == [
        "attempt 1 rank 0: sum 2",
        "attempt 1 rank 1: sum 2",
    ], out.stdout
