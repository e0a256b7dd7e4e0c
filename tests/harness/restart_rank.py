"""A rank of a 2-rank torchrun job with ``--max-restarts 1``: meshforge's process group across a restart.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 tests/harness/restart_rank.py

Attempt 0: both ranks make the process group (``meshforge.launch.env.init_distributed``), then rank 1
dies, so torchrun restarts both. Attempt 1: rank 1 waits 3 s before making its group, so rank 0 reads
the store first: with the store torchrun keeps across restarts, it would find the dead rank 1's
address there. Both then all-reduce a one and print ``attempt 1 rank R: sum 2``.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from meshforge.launch.env import discover, init_distributed, shutdown_distributed


def main() -> int:
    env = discover()
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    if attempt != "0" and env.rank == 1:
        time.sleep(3)
    init_distributed(env, torch.device("cpu"), timeout_s=30, setup_timeout_s=30)
    if attempt == "0":
        dist.barrier()
        if env.rank == 1:
            os._exit(1)  # dies: torchrun restarts the job
        time.sleep(60)  # torchrun stops this one
        return 0
    x = torch.ones(1)
    dist.all_reduce(x)
    os.write(1, f"attempt {attempt} rank {env.rank}: sum {x.item():g}\n".encode())  # one write: the ranks share stdout
    shutdown_distributed(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
