"""Activation checkpointing per transformer block.

- ``full``: keep only each block's input; recompute the whole block in backward.
- ``selective``: keep the outputs of the expensive ops (matmuls, attention) and recompute
  the cheap ones (norms, activations, RoPE, elementwise) -- most of the memory saving for
  a small fraction of the recompute.

Applied with the composable ``checkpoint`` API, which hooks the block in place: module
names (and so checkpoint keys) do not change.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..models import transformer_blocks

_aten = torch.ops.aten

SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
"""Ops whose outputs selective checkpointing keeps."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every transformer block of ``model`` in ``mode`` (``none``, ``full``, ``selective``)."""
    if mode == "none":
        return model
    for block in transformer_blocks(model):
        if mode == "full":
            checkpoint(block)
        elif mode == "selective":
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
        else:
            raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    return model
