"""Data parallelism with FSDP2 (``fully_shard``): ZeRO-3 or ZeRO-2-like, HSDP on a 2-D mesh.

Each transformer block becomes one FSDP unit (its parameters are all-gathered together
and, for ZeRO-3, resharded after its forward -- except the last block's), then the root wraps
what is left (embeddings, final norm, output), kept unsharded from forward to backward. With a
2-D ``(dp_replicate, dp_shard)`` mesh FSDP2 shards within ``dp_shard`` and replicates across
``dp_replicate`` (HSDP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from ..models import transformer_blocks


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard ``model`` over ``dp_mesh``; ``param_dtype`` (e.g. bf16) is the compute dtype, reductions stay fp32."""
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        # pinned host memory needs an accelerator; on a CPU-only job offload is a plain copy
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's params are needed again right away by backward: never reshard it.
        fully_shard(block, **{**kwargs, "reshard_after_forward": reshard_after_forward and i < len(blocks) - 1})
    # The root (embedding, final norm, output) is likewise needed again right away by backward, and
    # gathering it twice would cost the step's largest all-gather: it never reshards either (what
    # FSDP2 itself does for a root left on ``reshard_after_forward=None``, stated explicitly here so
    # the dry run reads it from the module).
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces ``model``'s FSDP2 gradients (reduce-scatter, and the all-reduce over
    ``dp_replicate`` under HSDP) -- off, each unit accumulates its unsharded gradient until a backward with it
    on; every FSDP2 unit below ``model`` (the blocks, the experts' own units) alike. A model without FSDP2
    (one process, TP only) has nothing to reduce."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync, recurse=True)
