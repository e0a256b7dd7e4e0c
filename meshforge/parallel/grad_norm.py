"""Global gradient norm and clipping over any mix of plain tensors and DTensors.

Gradients of a parallelized model may live on different meshes (FSDP-only blocks, TP x
FSDP blocks) with different placements, and a pipeline rank holds only its stages'
gradients. The norm is summed as squares per (mesh, placements) group, made global with
``full_tensor()``, then summed over pipeline ranks.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def total_grad_norm(parameters, pp_group: dist.ProcessGroup | None = None, counted_elsewhere=()) -> torch.Tensor:
    """The L2 norm of all gradients of the whole model (every stage, every shard).

    ``counted_elsewhere``: parameters whose gradient another pipeline rank counts (the last
    stage's copy of a tied embedding), left out so that it counts once."""
    skip = {id(p) for p in counted_elsewhere}
    groups: dict = defaultdict(list)
    for p in parameters:
        g = p.grad
        if g is None or id(p) in skip:
            continue
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups[key].append(g)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm(
    parameters, max_norm: float, pp_group: dist.ProcessGroup | None = None, counted_elsewhere=()
) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (0: no clipping); return the norm.

    ``counted_elsewhere`` are left out of the norm (see :func:`total_grad_norm`) but clipped."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(parameters, pp_group, counted_elsewhere)
    if max_norm > 0:
        # one foreach call per mesh: DTensors on different meshes (expert weights on ep) cannot share one
        by_mesh: dict = defaultdict(list)
        for p in parameters:
            by_mesh[getattr(p.grad, "device_mesh", None)].append(p)
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
