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


_SCALARS = ("aux_loss", "z_loss", "dropped", "assigned", "passes")


def moe_step(model: nn.Module, bias_rate: float, group: dist.ProcessGroup | None = None,
             reduce: bool = True, all_layers: list[str] | None = None) -> dict[str, float]:
    """Metrics of the MoE layers for the step just run; applies the aux-loss-free bias update.

    Returns ``moe_aux_loss``, ``moe_z_loss`` (means over layers and passes),
    ``moe_dropped_frac``, and per layer ``moe_load_{min,max,cv}/<layer>`` (tokens per
    expert relative to the mean).

    ``all_layers`` (pipeline parallel): the names of every MoE layer of the whole model, of
    which this rank holds some or none. Each rank packs all of them (zeros for the ones it
    lacks), so one all-reduce over the world gives every rank every layer's sums over the
    ranks that ran it, and the same metrics; each rank updates the biases of its own layers.
    """
    local = dict(moe_layers(model))
    stats = pop_moe_stats(model)
    names = sorted(local) if all_layers is None else list(all_layers)
    if not names or (all_layers is None and not stats):
        return {}
    n_experts = model.cfg.moe_experts
    device = next(model.parameters()).device
    flat = torch.zeros(len(names), len(_SCALARS) + n_experts, device=device)
    for i, name in enumerate(names):  # a row per layer: the scalar sums, then the load per expert
        for j, key in enumerate(_SCALARS):
            if f"{name}/{key}" in stats:
                flat[i, j] = stats[f"{name}/{key}"].float()
        if f"{name}/load" in stats:
            flat[i, len(_SCALARS):] = stats[f"{name}/load"].float()
    if reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)
    out = {}
    aux = z = dropped = assigned = 0.0
    for name, row in zip(names, flat):
        got = dict(zip(_SCALARS, row[:len(_SCALARS)].tolist()))
        passes = max(got["passes"], 1.0)
        aux += got["aux_loss"] / passes
        z += got["z_loss"] / passes
        dropped += got["dropped"]
        assigned += got["assigned"]
        load = row[len(_SCALARS):]
        mean = load.mean().clamp(min=1e-9)
        short = name.replace(".feed_forward", "")
        out[f"moe_load_min/{short}"] = float(load.min() / mean)
        out[f"moe_load_max/{short}"] = float(load.max() / mean)
        out[f"moe_load_cv/{short}"] = float(load.std(unbiased=False) / mean)
        if bias_rate and name in local:
            local[name].update_bias(load, bias_rate)
    out["moe_aux_loss"] = aux / len(names)
    out["moe_z_loss"] = z / len(names)
    out["moe_dropped_frac"] = dropped / max(assigned, 1.0)
    return out
