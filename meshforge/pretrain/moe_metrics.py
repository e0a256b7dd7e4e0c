"""Per-step MoE bookkeeping, in two steps: reduce the router statistics a step collected over
ranks into metrics and expert loads (:func:`reduce_router_stats`), then move the routing
biases by those loads (:func:`update_routing_bias`, which changes the model).

All reported numbers are ratios (relative load, dropped fraction, mean losses), so summing
the raw counts over every rank that holds the same layers gives the global picture
whatever the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.moe import STAT_KEYS, RouterStats, moe_layers


def reduce_router_stats(
    model: nn.Module, stats: RouterStats, group: dist.ProcessGroup | None = None, all_layers: list[str] | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The metrics of the step ``stats`` collected, and the global expert load of each of this
    rank's MoE layers (by name), summed over the ranks of ``group`` (the world by default).

    Metrics: ``moe_aux_loss``, ``moe_z_loss`` (means over layers and passes),
    ``moe_dropped_frac``, and per layer ``moe_load_{min,max,cv}/<layer>`` (tokens per expert
    relative to the mean).

    ``all_layers`` (pipeline parallel): the names of every MoE layer of the whole model, of
    which this rank holds some or none. Each rank packs all of them (zeros for the ones it
    lacks), so one all-reduce gives every rank every layer's sums over the ranks that ran it,
    and the same metrics.
    """
    local = dict(moe_layers(model))
    names = sorted(local) if all_layers is None else list(all_layers)
    if not names:
        return {}, {}
    n_experts = model.cfg.moe_experts
    device = next(model.parameters()).device
    flat = torch.zeros(len(names), len(STAT_KEYS) + n_experts, device=device)
    for i, name in enumerate(names):  # a row per layer: the scalar sums, then the load per expert
        sums = stats.sums(local[name]) if name in local else None
        if sums is not None:
            flat[i] = sums.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)
    out, loads = {}, {}
    aux = z = dropped = assigned = 0.0
    for name, row in zip(names, flat):
        got = dict(zip(STAT_KEYS, row[: len(STAT_KEYS)].tolist()))
        passes = max(got["passes"], 1.0)
        aux += got["aux_loss"] / passes
        z += got["z_loss"] / passes
        dropped += got["dropped"]
        assigned += got["assigned"]
        load = row[len(STAT_KEYS) :]
        mean = load.mean().clamp(min=1e-9)
        short = name.replace(".feed_forward", "")
        out[f"moe_load_min/{short}"] = float(load.min() / mean)
        out[f"moe_load_max/{short}"] = float(load.max() / mean)
        out[f"moe_load_cv/{short}"] = float(load.std(unbiased=False) / mean)
        if name in local:
            loads[name] = load
    out["moe_aux_loss"] = aux / len(names)
    out["moe_z_loss"] = z / len(names)
    out["moe_dropped_frac"] = dropped / max(assigned, 1.0)
    return out, loads


def update_routing_bias(model: nn.Module, loads: dict[str, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: move each of this rank's MoE layers' routing bias by its global load."""
    if not rate:
        return
    local = dict(moe_layers(model))
    for name, load in loads.items():
        local[name].update_bias(load, rate)
