"""Context parallelism: the sequence of every sample split over the ``cp`` ranks of the mesh.

Two parts, one job each:

- ``apply_context_parallel(model, cp_mesh, method)`` puts a context-parallel attention core
  (``ring``: :mod:`.ring_attention`; ``alltoall``: :mod:`.ulysses`) in place of every
  decoder block's ``attention.core`` and makes the decoder hand the cores this rank's
  document ids instead of a mask. Nothing else in the model changes: every other layer is
  per token.
- ``split_for_context_parallel(args, targets, cp_rank, cp)`` takes one micro-batch as the
  objective made it (every cp rank reads the same samples) and keeps this rank's zigzag
  chunks (r and 2*cp-1-r of 2*cp) of the tokens, the targets and the document ids, plus
  the global RoPE positions of those tokens.

The loss: each cp rank averages its own tokens; all ranks hold equally many (the LM
objective ignores no target), so the mean over ranks that the trainer already takes is the
mean over the global sequence. Gradients: FSDP2 runs over ``dp_shard x cp`` (flattened as
``dp_shard_cp``), so every parameter's gradient is averaged over the cp ranks as well.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

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
    return model


def split_for_context_parallel(args: tuple, targets: torch.Tensor, cp_rank: int, cp: int) -> tuple[tuple, torch.Tensor]:
    """Decoder inputs ``(tokens[, segments])`` and targets [B, T] -> this rank's
    ``(tokens, segments or None, positions)`` and targets, each of 2*T/(2*cp) tokens."""
    tokens, segments = args[0], (args[1] if len(args) > 1 else None)
    seqlen = tokens.shape[1]
    if seqlen % (2 * cp):
        raise ValueError(f"sequence of {seqlen} tokens does not split into 2*cp = {2 * cp} chunks")
    local = (zigzag_split(tokens, cp_rank, cp),
             None if segments is None else zigzag_split(segments, cp_rank, cp),
             zigzag_positions(seqlen, cp_rank, cp, device=tokens.device))
    return local, zigzag_split(targets, cp_rank, cp)


__all__ = ["CP_METHODS", "ContextParallelCore", "apply_context_parallel", "split_for_context_parallel"]
