"""``torch.compile`` of the blocks (``parallel.compile_scope = blocks``) or of the whole
micro-batch loss (``model``).

Compiling block by block keeps compile time flat in depth (every block has the same
graph) and composes with FSDP2, which wraps the same blocks; it is done in place, so module
names are unchanged. Compiling the model scope takes the step's callable ``(model, inputs,
targets) -> loss`` whole: embedding, every block, the output projection and the
cross-entropy in one graph (``fullgraph=False``: a graph break, such as an FSDP2 hook, splits
it instead of failing), and AOT autograd derives one backward graph from it. The module is
not touched, so checkpoints and sampling see the eager model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models import transformer_blocks


def compile_enabled(setting: str, device_type: str) -> bool:
    """``auto`` compiles on GPU only; CPU runs stay eager (and fast to start)."""
    return setting == "on" or (setting == "auto" and device_type == "cuda")


def apply_compile(model: nn.Module, fullgraph: bool = True) -> nn.Module:
    """``fullgraph=False`` lets a block break its graph (context parallel: the attention core's
    sends run eagerly between two compiled regions)."""
    for block in transformer_blocks(model):
        block.compile(fullgraph=fullgraph)
    return model


def compile_loss(loss_fn: Callable) -> Callable:
    """``parallel.compile_scope = model``: ``loss_fn(model, args, targets) -> LossParts`` (the forward of
    a micro-batch and its loss) compiled as one graph."""
    return torch.compile(loss_fn, fullgraph=False)
