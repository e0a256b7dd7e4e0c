"""Resuming with changed settings: refuse what would change the run, apply the rest and say so.

The policy per key is :mod:`meshforge.config.resume`'s table (``--help-config`` prints it).
:func:`resume_changes` compares the config of the checkpoint to resume with this run's, before
anything is written: a refused change raises :class:`CheckpointError` naming it; every other
change becomes a line the trainer prints. The config the run records (``config.json``,
``meta.json``) is then what it actually uses.

The optimizer's settings are the config's, not the checkpoint's: loading a checkpoint
replaces the optimizer's param-group settings (LR, betas, eps, weight decay) and the
schedule's base LRs with the saved ones, so :func:`optimizer_settings` keeps the fresh ones
from before the load and :func:`restore_optimizer_settings` puts them back, with the LR of the
next step recomputed from the schedule. With an unchanged config both give back exactly what
was loaded, so a resume stays bit-identical.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..config import JobConfig, config_to_dict
from ..config.resume import IGNORED, REFUSED, resume_policy
from .checkpoint import CheckpointError, read_meta


def resume_changes(path: Path | None, cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """-> (the config the resumed run uses, the lines that say what changed); raises on a refused change."""
    if path is None:
        return cfg, []
    meta = read_meta(path)
    saved, now, defaults = meta.get("config", {}), config_to_dict(cfg), config_to_dict(JobConfig())
    nxt = int(meta.get("step", 0)) + 1
    lines, ignored = [], []
    for sec, table in now.items():
        for name, value in table.items():
            key = f"{sec}.{name}"
            old = saved.get(sec, {}).get(name, defaults[sec][name]) if isinstance(saved.get(sec, {}), dict) else None
            if old == value:
                continue
            policy = resume_policy(key)
            if policy == "refused":
                raise CheckpointError(
                    f"checkpoint {path} was written with {key} = {old!r} and this run sets {value!r}, which would "
                    f"change {REFUSED.get(key, 'the model')}; resume with {key} = {old!r}, or start a new run in "
                    "another train.output_dir (checkpoint.init_from takes just the weights)"
                )
            if policy == "ignored" and value:
                ignored.append(key)
                lines.append(f"resume: {key} = {value!r} is ignored ({IGNORED[key]} {path.name})")
            elif policy == "applies":
                lines.append(
                    f"resume: {key} = {value!r} takes effect from step {nxt} (the checkpoint's run had {old!r})"
                )
    if ignored:
        cfg = copy.deepcopy(cfg)
        for key in ignored:
            sec, name = key.split(".")
            setattr(getattr(cfg, sec), name, type(getattr(getattr(cfg, sec), name))())  # empty: not used
    return cfg, lines


def optimizer_settings(optimizer, scheduler) -> tuple[list[dict[str, Any]], list[float]]:
    """The freshly built optimizer's param-group settings and the schedule's base LRs (before a load)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups], list(scheduler.base_lrs)


def restore_optimizer_settings(optimizer, scheduler, settings: tuple[list[dict[str, Any]], list[float]]) -> None:
    """Put the config's settings back after a load; the next step's LR from the schedule at its step."""
    groups, base_lrs = settings
    scheduler.base_lrs = list(base_lrs)
    for group, fresh, base, factor in zip(optimizer.param_groups, groups, base_lrs, scheduler.lr_lambdas):
        group.update({k: v for k, v in fresh.items() if k != "lr"})
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
