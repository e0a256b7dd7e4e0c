"""A rank of ``meshforge`` that counts the gradient reductions FSDP2 issues: test_grad_sync.py's probe.

    python tests/harness/grad_sync_rank.py train --config ...

Wraps ``torch.distributed.reduce_scatter_single`` (FSDP2's gradient reduce-scatter) and
``torch.distributed.all_reduce`` of tensors of more than 16 elements (HSDP's all-reduce of a unit's
gradient shard over ``dp_replicate``; the loss, stop flag and gradient norm are a few elements) and
prints ``grad_sync_rank: reduce_scatter=N all_reduce=M`` on stderr at exit; ``meshforge`` runs unchanged.
"""

from __future__ import annotations

import atexit
import sys


def count_reductions() -> dict[str, int]:
    import torch.distributed as dist

    counts = {"reduce_scatter": 0, "all_reduce": 0}
    reduce_scatter, all_reduce = dist.reduce_scatter_single, dist.all_reduce

    def counted_reduce_scatter(*args, **kwargs):
        counts["reduce_scatter"] += 1
        return reduce_scatter(*args, **kwargs)

    def counted_all_reduce(tensor, *args, **kwargs):
        if tensor.numel() > 16:
            counts["all_reduce"] += 1
        return all_reduce(tensor, *args, **kwargs)

    dist.reduce_scatter_single, dist.all_reduce = counted_reduce_scatter, counted_all_reduce
    return counts


def main(argv: list[str]) -> int:
    counts = count_reductions()
    atexit.register(
        lambda: print("grad_sync_rank: " + " ".join(f"{k}={v}" for k, v in counts.items()), file=sys.stderr, flush=True)
    )
    from meshforge.cli import main as meshforge_main

    return meshforge_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
