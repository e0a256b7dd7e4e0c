"""Per-step MoE bookkeeping: reduce router statistics over ranks, log them, update biases.

All reported numbers are ratios (relative load, dropped fraction, mean losses), so summing
the raw counts over every rank that holds the same layers gives the global picture
whatever the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.moe import moe_layers, pop_moe_stats


def moe_step(model: nn.Module, bias_rate: float, group: dist.ProcessGroup | None = None,
             reduce: bool = True) -> dict[str, float]:
    """Metrics of the MoE layers for the step just run; applies the aux-loss-free bias update.

    Returns ``moe_aux_loss``, ``moe_z_loss`` (means over layers and passes),
    ``moe_dropped_frac``, and per layer ``moe_load_{min,max,cv}/<layer>`` (tokens per
    expert relative to the mean).
    """
    stats = pop_moe_stats(model)
    if not stats:
        return {}
    keys = sorted(stats)
    flat = torch.cat([stats[k].float().reshape(-1) for k in keys])
    if reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)
    out, offset = {}, 0
    for k in keys:
        n = stats[k].numel()
        stats[k] = flat[offset:offset + n].view_as(stats[k])
        offset += n
    layers = moe_layers(model)
    aux = z = dropped = assigned = 0.0
    for name, layer in layers:
        passes = float(stats[f"{name}/passes"])
        aux += float(stats[f"{name}/aux_loss"]) / passes
        z += float(stats[f"{name}/z_loss"]) / passes
        dropped += float(stats[f"{name}/dropped"])
        assigned += float(stats[f"{name}/assigned"])
        load = stats[f"{name}/load"]
        mean = load.mean().clamp(min=1e-9)
        short = name.replace(".feed_forward", "")
        out[f"moe_load_min/{short}"] = float(load.min() / mean)
        out[f"moe_load_max/{short}"] = float(load.max() / mean)
        out[f"moe_load_cv/{short}"] = float(load.std(unbiased=False) / mean)
        if bias_rate:
            layer.update_bias(load, bias_rate)
    out["moe_aux_loss"] = aux / len(layers)
    out["moe_z_loss"] = z / len(layers)
    out["moe_dropped_frac"] = dropped / max(assigned, 1.0)
    return out
