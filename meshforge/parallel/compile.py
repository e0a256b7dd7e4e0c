"""``torch.compile`` per transformer block (in place, so module names are unchanged).

Compiling block by block keeps compile time flat in depth (every block has the same
graph) and composes with FSDP2, which wraps the same blocks.
"""

from __future__ import annotations

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
