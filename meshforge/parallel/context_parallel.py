"""Context parallelism: the sequence of every sample split over the ``cp`` ranks of the mesh.

Two parts, one job each:

- ``apply_context_parallel(model, cp_mesh, method)`` puts a context-parallel attention core
  (``ring``: :mod:`.ring_attention`; ``alltoall``: :mod:`.ulysses`) in place of every
  decoder block's ``attention.core`` and makes the decoder hand the cores this rank's
  document ids instead of a mask. Every other layer is per token; an MoE layer's routing
  too, but its load-balancing loss counts the assignments of the whole sequence
  (``E * sum_e f_e P_e``): each MoE layer's ``count_tokens`` sums its expert counts over
  the cp ranks (one all-reduce of E numbers per layer and forward), and its router
  statistics are summed over every rank anyway (``pretrain/moe_metrics.py``), so the aux
  and z losses, the expert loads and the routing-bias update are the single process's.
  Expert parallel composes: it borrows its ranks from ``dp_shard x cp``
  (``expert_parallel.build_ep_mesh``).
- ``split_for_context_parallel(args, targets, cp_rank, cp)`` takes one micro-batch as the
  objective made it (every cp rank reads the same samples) and keeps this rank's zigzag
  chunks (r and 2*cp-1-r of 2*cp) of the tokens, the targets and the document ids, plus
  the global RoPE positions of those tokens. The trainer calls it per micro-batch; under
  pipeline parallel :func:`context_parallel_inputs` puts it behind the objective's
  ``model_inputs``, so the pipeline runner splits each batch before its schedule cuts it into
  microbatches (every stage gets the positions and document ids as keyword inputs).

The loss: each cp rank averages its own tokens; all ranks hold equally many (the LM
objective ignores no target), so the mean over ranks that the trainer already takes is the
mean over the global sequence. Gradients: FSDP2 runs over ``dp_shard x cp`` (flattened as
``dp_shard_cp``), so every parameter's gradient is averaged over the cp ranks as well.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..models.moe import moe_layers
from .ring_attention import ring_attention, zigzag_positions, zigzag_split
from .ulysses import ulysses_attention

CP_METHODS = {"ring": ring_attention, "alltoall": ulysses_attention}


class ContextParallelCore(nn.Module):
    """Attention core over a cp group: q/k/v hold this rank's zigzag chunks; ``mask`` is their
    document ids [B, 2c] (or None: causal)."""

    def __init__(self, group, method: str):
        super().__init__()
        self.group = group
        self.method = method
        self.attend = CP_METHODS[method]

    @torch.compiler.disable  # point-to-point sends inside: runs eagerly between compiled regions
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return self.attend(q, k, v, self.group, segments=mask)

    def extra_repr(self) -> str:
        return f"method={self.method}"


@torch.compiler.disable  # a collective between compiled regions
def sum_over_group(counts: torch.Tensor, group) -> torch.Tensor:
    """An MoE layer's ``count_tokens`` under context parallel: its expert counts summed over the cp
    ranks, which hold the other chunks of the same sequences (the balance loss is over all of them)."""
    counts = counts.clone()
    dist.all_reduce(counts, group=group)
    return counts


def local_segments(segments: torch.Tensor, use_flex: bool = False) -> torch.Tensor:
    """The decoder's ``attention_mask`` under context parallel: the cores take the ids themselves."""
    return segments


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, method: str) -> nn.Module:
    """Swap every block's attention core for the ``method`` one over ``cp_mesh`` (1-D)."""
    group = cp_mesh.get_group()
    swapped = 0
    for module in model.modules():
        core = getattr(module, "core", None)
        if core is not None and hasattr(module, "wq"):
            module.core = ContextParallelCore(group, method)
            swapped += 1
    if not swapped or not hasattr(model, "attention_mask"):
        raise ValueError(f"apply_context_parallel: {type(model).__name__} has no decoder attention to split")
    model.attention_mask = local_segments
    for _, moe in moe_layers(model):
        moe.count_tokens = partial(sum_over_group, group=group)
    return model


def context_parallel_inputs(model_inputs: Callable, mesh: DeviceMesh | None) -> Callable:
    """``model_inputs`` (a batch -> (model args, targets)) followed by this rank's zigzag split when
    ``mesh`` has a ``cp`` dim of size > 1; else ``model_inputs`` itself."""
    cp_mesh = cp_submesh(mesh)
    if cp_mesh is None:
        return model_inputs
    cp_rank, cp = cp_mesh.get_local_rank(), cp_mesh.size()

    def split(batch):
        args, targets = model_inputs(batch)
        return split_for_context_parallel(args, targets, cp_rank, cp)

    return split


def cp_submesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The 1-D ``cp`` sub-mesh of ``mesh`` (a plain or a flattened dim), or None without context parallel."""
    if mesh is None:
        return None
    try:
        cp_mesh = mesh["cp"]
    except KeyError:
        return None
    return cp_mesh if cp_mesh.size() > 1 else None


def split_for_context_parallel(args: tuple, targets: torch.Tensor, cp_rank: int, cp: int) -> tuple[tuple, torch.Tensor]:
    """Decoder inputs ``(tokens[, segments])`` and targets [B, T] -> this rank's
    ``(tokens, segments or None, positions)`` and targets, each of 2*T/(2*cp) tokens."""
    tokens, segments = args[0], (args[1] if len(args) > 1 else None)
    seqlen = tokens.shape[1]
    if seqlen % (2 * cp):
        raise ValueError(f"sequence of {seqlen} tokens does not split into 2*cp = {2 * cp} chunks")
    local = (
        zigzag_split(tokens, cp_rank, cp),
        None if segments is None else zigzag_split(segments, cp_rank, cp),
        zigzag_positions(seqlen, cp_rank, cp, device=tokens.device),
    )
    return local, zigzag_split(targets, cp_rank, cp)


__all__ = [
    "CP_METHODS",
    "ContextParallelCore",
    "apply_context_parallel",
    "context_parallel_inputs",
    "cp_submesh",
    "split_for_context_parallel",
]
