"""Every process group of a job times out as the job's default group does (``train.collective_timeout_s``).

torch gives a group made without a timeout (``new_group``, and the device mesh's groups) its own
30-minute default, not the default group's: a peer whose link went down mid-run then held the other
ranks in a data-parallel all-reduce for half an hour instead of ``train.collective_timeout_s``. Each
group we make passes :func:`group_timeout` on; the mesh's dims get it through :func:`mesh_group_options`.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta | None:
    """The timeout ``group`` (default: the job's default group) was made with; None without a real backend
    (one process, or the planner's fake group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group or dist.group.WORLD
    for device in ("cuda", "cpu"):
        try:
            timeout = group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
        if isinstance(timeout, timedelta):
            return timeout
    return None


def mesh_group_options(timeout: timedelta | None):
    """``init_device_mesh``'s per-dim backend options carrying ``timeout`` for the default group's backend
    (gloo or NCCL); None for any other backend or no timeout (torch's defaults then apply)."""
    if timeout is None:
        return None
    backend = dist.get_backend()
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and dist.is_nccl_available():
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timeout
    return options


def mesh_overrides(shape: tuple[int, ...], names: tuple[str, ...]) -> dict:
    """``init_device_mesh(backend_override=...)`` giving every dim that makes groups of its own (size
    between 1 and the world) the default group's timeout."""
    options = mesh_group_options(group_timeout())
    world = 1
    for size in shape:
        world *= size
    return {} if options is None else {n: options for n, s in zip(names, shape) if 1 < s < world}
