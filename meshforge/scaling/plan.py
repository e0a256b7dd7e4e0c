"""Sweep files: one row per run, each holding that run's full resolved config.

A sweep is a directory: ``sweep.jsonl`` (the rows), ``plan.json`` (how it was planned, and the
sizes that were skipped and why), later ``runs/<id>/`` (one output dir per row) and
``results.csv``. Kinds:

- ``isoflop``: for each budget C, a grid of sizes N; D = C / FLOPs-per-token(N) (exact, attention
  included: :mod:`.flops`), rounded to whole optimizer steps.
- ``tokens``: fixed sizes, each trained for each of a list of token counts.
- ``lr``: an LR x size grid at fixed tokens, once per variant (``plain``, ``qk_norm``, ``z_loss``,
  ``qk_norm+z_loss``: QK-layernorm and the output z-loss of Wortsman et al. on or off).

Every row shares what makes the validation set the same (data, seq_len, valid_fraction,
seed, batch size, eval batches): the final validation losses are comparable across rows.
Sizes that a budget cannot afford (fewer than ``min_steps`` steps) or that are smaller than
the rule can build are reported and skipped, never clamped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import JobConfig, config_from_dict, config_to_dict, load_config
from ..models import check_config
from . import ScalingError
from .flops import flops_per_token, tokens_per_step
from .shapes import count_params, shape_for, smallest_n

KINDS = ("isoflop", "tokens", "lr")
VARIANTS = {
    "plain": {"model.qk_norm": False, "train.z_loss_coef": 0.0},
    "qk_norm": {"model.qk_norm": True, "train.z_loss_coef": 0.0},
    "z_loss": {"model.qk_norm": False, "train.z_loss_coef": 1e-4},
    "qk_norm+z_loss": {"model.qk_norm": True, "train.z_loss_coef": 1e-4},
}
"""LR-sensitivity variants (Wortsman et al.: QK-layernorm, z-loss coefficient 1e-4)."""
SIZE_TOLERANCE = 0.25
"""A target N whose nearest buildable shape is off by more than this fraction is skipped."""


@dataclass
class PlanSpec:
    kind: str
    output: Path
    base_config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    budgets: list[float] = field(default_factory=list)
    """isoflop: FLOP budgets."""
    sizes: list[float] = field(default_factory=list)
    """tokens/lr: target non-embedding N values."""
    n_sizes: int = 7
    """isoflop: sizes per budget."""
    n_min: float = 0.0
    n_max: float = 0.0
    """isoflop: a fixed N grid for every budget (both set), else one centred on each budget's guess."""
    span: float = 4.0
    """isoflop without n_min/n_max: sizes from N*/span to N*·span around N* = sqrt(C / 120) (D = 20 N),
    or around that budget's entry of ``centers``."""
    centers: list[float] = field(default_factory=list)
    """isoflop: the expected optimum N* of each budget (same order as ``budgets``), instead of sqrt(C / 120)."""
    tokens: list[float] = field(default_factory=list)
    """tokens/lr: training tokens per run."""
    lrs: list[float] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: ["plain", "qk_norm+z_loss"])
    aspect: float = 32.0
    layers: int = 0
    """Fix the depth of every size (0: the aspect-ratio rule): width alone varies (muP LR transfer)."""
    min_steps: int = 20
    max_steps: int = 0
    warmup_fraction: float = 0.05


def _base(spec: PlanSpec) -> JobConfig:
    cfg = check_config(load_config(spec.base_config, dict(spec.overrides)))
    count_params(cfg.model)  # dense decoder, or a clear error
    return cfg


def _row_config(
    base: JobConfig, shape, steps: int, out_dir: Path, extra: dict[str, Any], warmup_fraction: float
) -> JobConfig:
    cfg = config_from_dict(config_to_dict(base))
    cfg.model = shape.apply(cfg.model)
    t = cfg.train
    cfg.train = replace(t, steps=steps, eval_interval=steps, sample_prompt="", progress=False, output_dir=str(out_dir))
    cfg.optim = replace(cfg.optim, warmup_steps=max(1, round(steps * warmup_fraction)))
    cfg.checkpoint = replace(cfg.checkpoint, interval=max(1, steps // 4), keep_last=1)
    cfg.logging = replace(cfg.logging, tensorboard=False)
    data = config_to_dict(cfg)
    for key, value in extra.items():
        sec, name = key.split(".")
        data[sec][name] = value
    return config_from_dict(data)


def _size_grid(spec: PlanSpec, budget: float, center: float = 0.0) -> list[float]:
    if spec.n_min and spec.n_max:
        lo, hi = spec.n_min, spec.n_max
    else:
        guess = center or math.sqrt(budget / 120)
        lo, hi = guess / spec.span, guess * spec.span
    if spec.n_sizes < 1 or lo <= 0 or hi < lo:
        raise ScalingError(f"bad size grid: {spec.n_sizes} sizes from {lo:g} to {hi:g}")
    return list(np.geomspace(lo, hi, spec.n_sizes)) if spec.n_sizes > 1 else [lo]


def plan_rows(spec: PlanSpec) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): the runs of the sweep, and the requested points left out with the reason."""
    if spec.kind not in KINDS:
        raise ScalingError(f"sweep kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    base = _base(spec)
    tps = tokens_per_step(base)
    floor = 0 if spec.layers else smallest_n(base.model, spec.aspect)
    runs_dir = spec.output.resolve() / "runs"
    points: list[dict] = []  # (target N, steps, budget, lr, variant)
    skipped: list[dict] = []
    if spec.kind == "isoflop":
        if not spec.budgets:
            raise ScalingError("an isoflop sweep needs --budgets (FLOPs, comma separated)")
        centers = spec.centers or [0.0] * len(spec.budgets)
        if spec.centers and (spec.n_min or spec.n_max):
            raise ScalingError("--centers and --n-min/--n-max both place the size grid; give one of them")
        if spec.centers and (
            len(centers) != len(spec.budgets) or any(not (c > 0 and math.isfinite(c)) for c in centers)
        ):
            raise ScalingError(
                f"--centers needs one positive N per budget: {len(spec.budgets)} budget(s), "
                f"got {', '.join(f'{c:g}' for c in spec.centers)}"
            )
        for budget, center in zip(spec.budgets, centers):
            for n in _size_grid(spec, budget, center):
                points.append({"target_N": n, "budget": budget})
    elif spec.kind == "tokens":
        if not spec.sizes or not spec.tokens:
            raise ScalingError("a tokens sweep needs --sizes (N values) and --tokens (token counts)")
        points = [{"target_N": n, "tokens": d} for n in spec.sizes for d in spec.tokens]
    else:
        if not spec.sizes or not spec.lrs or len(spec.tokens) != 1:
            raise ScalingError("an lr sweep needs --sizes (N values), --lrs and one --tokens value")
        for v in spec.variants:
            if v not in VARIANTS:
                raise ScalingError(f"variant {v!r} is not one of {', '.join(VARIANTS)}")
        points = [
            {"target_N": n, "tokens": spec.tokens[0], "lr": lr, "variant": v}
            for v in spec.variants
            for n in spec.sizes
            for lr in spec.lrs
        ]
    rows: list[dict] = []
    seen: set[tuple] = set()
    for p in points:
        target = p["target_N"]
        if target < floor * (1 - SIZE_TOLERANCE):
            skipped.append({**p, "reason": f"too small: the smallest model the shape rule builds has N = {floor}"})
            continue
        shape, n = shape_for(target, base.model, spec.aspect, spec.layers)
        if abs(n / target - 1) > SIZE_TOLERANCE:
            skipped.append({**p, "reason": f"no shape within {SIZE_TOLERANCE:.0%} (nearest N = {n})"})
            continue
        extra = VARIANTS[p["variant"]] if "variant" in p else {}
        model = shape.apply(base.model)
        if extra.get("model.qk_norm") is not None:
            model = replace(model, qk_norm=extra["model.qk_norm"])
        fpt = flops_per_token(model, base.data.seq_len)
        tokens = p["budget"] / fpt if "budget" in p else p["tokens"]
        steps = round(tokens / tps)
        if steps < spec.min_steps:
            skipped.append(
                {
                    **p,
                    "N": n,
                    "reason": f"too large for the budget: {steps} steps of {tps} tokens "
                    f"(< --min-steps {spec.min_steps})",
                }
            )
            continue
        if spec.max_steps and steps > spec.max_steps:
            skipped.append(
                {**p, "N": n, "reason": f"too small for the budget: {steps} steps (> --max-steps {spec.max_steps})"}
            )
            continue
        key = (shape, steps, p.get("lr"), p.get("variant"))
        if key in seen:
            skipped.append({**p, "N": n, "reason": "same shape and steps as another row"})
            continue
        seen.add(key)
        if "lr" in p:
            extra = {**extra, "optim.lr": p["lr"]}
        rid = f"{len(rows):03d}_n{n}_s{steps}" + (f"_lr{p['lr']:g}_{p['variant']}" if "lr" in p else "")
        cfg = _row_config(base, shape, steps, runs_dir / rid, extra, spec.warmup_fraction)
        counts = count_params(cfg.model)
        d = steps * tps
        rows.append(
            {
                "id": rid,
                "kind": spec.kind,
                "budget": p.get("budget"),
                "N": counts.non_embedding,
                "N_total": counts.total,
                "D": d,
                "flops": flops_per_token(cfg.model, cfg.data.seq_len) * d,
                "steps": steps,
                "lr": cfg.optim.lr,
                "variant": p.get("variant", ""),
                "width": cfg.model.dim,
                "layers": cfg.model.n_layers,
                "config": config_to_dict(cfg),
            }
        )
    return rows, skipped


def write_plan(spec: PlanSpec, overwrite: bool = False, check=None) -> tuple[list[dict], list[dict]]:
    """Plan and write ``sweep.jsonl`` and ``plan.json`` (refuses to replace an existing sweep);
    ``check(rows)``, if given, runs after planning and before anything is written (its errors too)."""
    out = spec.output
    if (out / "sweep.jsonl").exists() and not overwrite:
        raise ScalingError(f"{out}/sweep.jsonl exists; plan into a new --output dir or pass --overwrite")
    rows, skipped = plan_rows(spec)  # every error before anything is written
    if not rows:
        raise ScalingError("no run survives the plan: " + "; ".join(s["reason"] for s in skipped[:3]))
    if check is not None:
        check(rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sweep.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {
        "kind": spec.kind,
        "base_config": spec.base_config,
        "overrides": spec.overrides,
        "budgets": spec.budgets,
        "centers": spec.centers,
        "span": spec.span,
        "aspect": spec.aspect,
        "rows": len(rows),
        "skipped": skipped,
    }
    (out / "plan.json").write_text(json.dumps(meta, indent=1, default=float))
    tmp.replace(out / "sweep.jsonl")
    return rows, skipped


def read_sweep(path: str | Path) -> tuple[Path, list[dict]]:
    """(sweep dir, rows) of a sweep dir or its sweep.jsonl."""
    path = Path(path)
    sweep_dir = path.parent if path.is_file() else path
    f = sweep_dir / "sweep.jsonl"
    if not f.is_file():
        raise ScalingError(f"{path}: no sweep.jsonl (write one with `meshforge scaling plan`)")
    rows = []
    for i, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ScalingError(f"{f}:{i}: not valid JSON") from None
    ids = [r.get("id") for r in rows]
    if len(set(ids)) != len(ids) or not all(ids) or not all("config" in r for r in rows):
        raise ScalingError(f"{f}: every row needs a unique id and a config")
    return sweep_dir, rows
