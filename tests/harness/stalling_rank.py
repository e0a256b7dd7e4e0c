"""A rank of ``meshforge`` that stalls on purpose: the fault injection of test_crash.py.

    python tests/harness/stalling_rank.py STALL_RANK STEP SECONDS train --config ...

Every rank of the job runs this script; the one whose RANK is STALL_RANK sleeps SECONDS
right after computing its gradient norm at STEP (the last collective of the step's
forward/backward), so its peers wait for it in the all-reduce of the loss that follows.
The other ranks, and every other step, run ``meshforge`` unchanged.
"""

from __future__ import annotations

import os
import sys
import time


def stall_after_grad_norm(step: int, seconds: float) -> None:
    from meshforge.pretrain import step_local

    original = step_local.clip_grad_norm
    calls = 0

    def clip_grad_norm(*args, **kwargs):
        nonlocal calls
        norm = original(*args, **kwargs)
        calls += 1
        if calls == step:
            print(f"rank {os.environ['RANK']}: stalling {seconds:g} s at step {step}", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return norm

    step_local.clip_grad_norm = clip_grad_norm


def main(argv: list[str]) -> int:
    stall_rank, step, seconds, *command = argv
    if os.environ.get("RANK") == stall_rank:
        stall_after_grad_norm(int(step), float(seconds))
    from meshforge.cli import main as meshforge_main

    return meshforge_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
