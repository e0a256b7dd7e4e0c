"""Data parallelism with FSDP2 (``fully_shard``): ZeRO-3 by default, HSDP on a 2-D dp mesh.

Each transformer block becomes one FSDP unit (its parameters are all-gathered together
and resharded after its forward), then the root wraps what is left (embeddings, final
norm, output).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return model
