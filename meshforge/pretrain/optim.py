"""AdamW with decoupled weight decay on matrices, and the LR schedules.

Schedules are plain functions of the step (``lr_factor``) wrapped in ``LambdaLR``, so
their state is just the step count and resumes exactly.

- ``cosine``: linear warmup, then cosine from 1 to ``min_lr_ratio``.
- ``wsd``: linear warmup, constant, then a final decay over ``decay_fraction`` of the
  steps to ``min_lr_ratio`` (linear, or ``1 - sqrt`` as in MiniCPM / Hägele et al.).
- ``constant``: linear warmup, then constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR used for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    shape = progress if cfg.wsd_decay == "linear" else math.sqrt(progress)
    return 1.0 - (1.0 - floor) * shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2); leave norms, biases and other vectors undecayed.

    Each of the two groups is split in two when it mixes DTensors and plain tensors."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        dtensors = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        # a multi-tensor (foreach) kernel takes DTensors or plain tensors, not both in one call
        # (TP without FSDP: the TP'd weights are DTensors, an MoE's replicated ones are not)
        for part in ((plain, dtensors) if plain and dtensors else (params,)):
            groups.append({"params": part, "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA, multi-tensor (foreach) elsewhere."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
