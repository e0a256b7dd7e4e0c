"""``meshforge plan``: the job config of a cluster, every valid layout of it, ranked by predicted step time.

:func:`plan_job` builds the config (preset, overrides, ``--seq-len``, ``--global-batch-tokens``),
checks the cluster (GPU counts, device), enumerates layouts (:mod:`.layouts`), prices each
(:mod:`.memory`, :mod:`.time_model`) and splits them into those that fit the device memory
(less :data:`HEADROOM`) and those that do not.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..config import LAYOUT_FIELDS, ConfigError, JobConfig, load_config
from ..models import check_config
from .constraints import Constraints, check_constraints, describe, nothing_satisfies
from .devices import Device, get_device
from .layouts import AC_MODES, ZERO_MODES, Layout, apply_layout, check_layout, enumerate_layouts, iter_layouts
from .memory import KINDS, backward_peak, estimate_memory, estimate_rank, n_microbatches
from .time_model import TimeEstimate, estimate_time

HEADROOM = 0.9
"""Fraction of device memory a plan may fill: the rest is the CUDA context, NCCL, and allocator fragmentation."""
TIE = 0.002
"""Predicted step times within this fraction of each other rank as a tie (memory, then collectives decide)."""
SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


@dataclass
class Priced:
    layout: Layout
    memory: dict[str, int]
    time: TimeEstimate
    fits: bool
    overflow: str = ""

    def record(self) -> dict:
        rec = {
            "layout": self.layout.describe(),
            "overrides": self.layout.overrides(),
            **{k: self.memory[k] for k in (*KINDS, "total")},
            "fits": self.fits,
            "step_s": self.time.step_s,
            "mfu": self.time.mfu,
            "bubble_fraction": self.time.bubble_fraction,
            "tokens_per_s": self.time.tokens_per_s,
            "collectives": [{k: v for k, v in c.items()} for c in self.time.comm],
        }
        if self.overflow:
            rec["overflow"] = self.overflow
        return rec


@dataclass
class Plan:
    cfg: JobConfig
    device: Device
    gpus: int
    gpus_per_node: int
    fitting: list[Priced] = field(default_factory=list)
    overflowing: list[Priced] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    """The dimensions the search was constrained to (:mod:`.constraints`); empty: every layout."""


def parse_tokens(text: str) -> int:
    """``4M`` -> 4 * 2**20 tokens (K, M, G are powers of 1024); plain integers as they are."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", text.upper())
    if not m:
        raise ConfigError(f"--global-batch-tokens {text!r} is not a token count like 4194304 or 4M")
    return int(float(m.group(1)) * SUFFIXES[m.group(2)])


def plan_config(preset: str, overrides: list[str], seq_len: int | None, batch_tokens: str | None) -> JobConfig:
    """The job config the plan is for: ``--seq-len`` raises model.max_seq_len when it needs to."""
    extra: list[str] = []
    if seq_len is not None:
        if seq_len <= 0:
            raise ConfigError(f"--seq-len must be positive, got {seq_len}")
        extra += ["--data.seq_len", str(seq_len)]
    cfg = load_config(preset, [*overrides, *extra]) if seq_len is None else None
    if cfg is None:
        base = load_config(preset, overrides)
        if seq_len > base.model.max_seq_len:
            extra += ["--model.max_seq_len", str(seq_len)]
        cfg = load_config(preset, [*overrides, *extra])
    check_config(cfg)
    if batch_tokens is not None:
        tokens, seq = parse_tokens(batch_tokens), cfg.data.seq_len
        given = batch_tokens.strip() + ("" if batch_tokens.strip() == str(tokens) else f" ({tokens} tokens)")
        if tokens < seq:
            raise ConfigError(
                f"--global-batch-tokens {given} is less than one {seq}-token sequence (data.seq_len or --seq-len)"
            )
        if tokens % seq:
            raise ConfigError(
                f"--global-batch-tokens {given} is not a whole number of "
                f"{seq}-token sequences (data.seq_len or --seq-len); use a multiple of {seq}, "
                f"e.g. {tokens // seq * seq} or {(tokens // seq + 1) * seq}"
            )
        cfg.train.global_batch_size = tokens // cfg.data.seq_len
        cfg.train.micro_batch_size = 1
    cfg.train.device = "cuda"
    return cfg


def check_cluster(gpus: int, gpus_per_node: int) -> None:
    """The cluster: a positive number of GPUs, whole nodes beyond one (a part of one node is a cluster too)."""
    for flag, value in (("--gpus", gpus), ("--gpus-per-node", gpus_per_node)):
        if value <= 0:
            raise ConfigError(f"{flag} must be a positive number of GPUs, got {value}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        below, above = gpus // gpus_per_node * gpus_per_node, -(-gpus // gpus_per_node) * gpus_per_node
        raise ConfigError(
            f"--gpus {gpus} is not a whole number of nodes of {gpus_per_node} GPUs (--gpus-per-node); "
            f"use {below} or {above} GPUs, or set --gpus-per-node to what your nodes have"
        )


def price_one(
    layout: Layout, job: JobConfig, device: Device, gpus_per_node: int, efficiency: float | None, cache: dict
) -> Priced:
    """Memory and step time of one layout (``cache``: the state arithmetic shared between layouts)."""
    usable = HEADROOM * device.hbm_bytes
    mem = estimate_memory(job, layout, "cuda", cache)
    t = estimate_time(job, layout, device, gpus_per_node, efficiency, cache)
    fits = mem["total"] <= usable
    overflow = ""
    if not fits:
        worst = max((*KINDS, "grad_accum"), key=lambda k: mem[k])  # grad_accum: gradients kept unreduced
        overflow = (
            f"needs {mem['total'] / 2**30:.1f} GiB of {usable / 2**30:.1f} GiB usable; largest: "
            f"{worst} {mem[worst] / 2**30:.1f} GiB"
        )
    return Priced(layout, mem, t, fits, overflow)


def price(cfg: JobConfig, layouts, device: Device, gpus_per_node: int, efficiency: float | None) -> list[Priced]:
    """Every ``(layout, job)`` of ``layouts`` (an iterable: each job config is dropped once priced), ranked."""
    cache: dict = {}
    return rank([price_one(layout, job, device, gpus_per_node, efficiency, cache) for layout, job in layouts])


def rank(priced: list[Priced]) -> list[Priced]:
    """The table's order: by predicted step time; a run of layouts within :data:`TIE` of the fastest of
    the run (far below the model's accuracy) is a tie, ordered by lower per-GPU memory, then by fewer
    collective calls."""
    priced = sorted(priced, key=lambda p: p.time.step_s)
    out: list[Priced] = []
    i = 0
    while i < len(priced):
        j = i
        while j < len(priced) and priced[j].time.step_s <= priced[i].time.step_s * (1 + TIE):
            j += 1
        out += sorted(priced[i:j], key=lambda p: (p.memory["total"], p.time.n_collectives, p.time.step_s))
        i = j
    return out


def grad_sync_variant(layout: Layout, job: JobConfig) -> tuple[Layout, JobConfig] | None:
    """``layout`` with its gradients reduced after every microbatch (``parallel.grad_sync = "microbatch"``)
    and its job config, where that differs from once per step: FSDP2 sharding, no pipeline, more than one
    microbatch (:func:`.memory.accumulation_bytes`: per step keeps the unsharded gradients between them).
    The search prices it only where per step does not fit: it is never faster (more traffic, the same
    compute) and smaller only by those gradients."""
    if not layout.sync_choice or job.parallel.grad_sync != "step" or n_microbatches(job, layout) == 1:
        return None
    variant = dataclasses.replace(layout, grad_sync="microbatch")
    return variant, apply_layout(job, variant)


def plan_job(
    cfg: JobConfig,
    gpus: int,
    gpus_per_node: int,
    device: Device,
    efficiency: float | None = None,
    ac_modes=AC_MODES,
    fixed: Constraints | None = None,
) -> Plan:
    """Every layout of ``gpus`` GPUs (those meeting ``fixed``, when given), priced and ranked."""
    check_cluster(gpus, gpus_per_node)
    fixed = fixed or {}
    if fixed:
        check_constraints(fixed, gpus, cfg.model.n_layers)
    refused: dict[str, int] = {}
    cache: dict = {}
    priced: list[Priced] = []
    # each layout priced as it is enumerated (one job config held at a time); whether it fits decides whether
    # its heavier activation-checkpointing modes, which it dominates, are enumerated at all
    # parallel.grad_sync: as the config says (per step by default); per microbatch too where per step does not fit
    lighter_fits = [True]  # whether the layout last enumerated fits: its heavier AC modes are then skipped
    for layout, job in iter_layouts(
        cfg, gpus, gpus_per_node, refused, ac_modes, fits=lambda *_: lighter_fits[0], fixed=fixed
    ):
        p = price_one(layout, job, device, gpus_per_node, efficiency, cache)
        lighter_fits[0] = p.fits  # not the variant's: where per step does not fit, heavier AC may beat it
        variant = None if p.fits or "grad_sync" in fixed else grad_sync_variant(layout, job)
        if variant is not None:
            q = price_one(*variant, device, gpus_per_node, efficiency, cache)
            p = q if q.fits else p
        priced.append(p)
    plan = Plan(cfg, device, gpus, gpus_per_node, refused=_group_reasons(refused), fixed=fixed)
    if not priced and fixed:
        raise ConfigError(nothing_satisfies(fixed, gpus, refused))
    if not priced:
        raise ConfigError(
            f"no layout of {gpus} GPUs is valid for this job: "
            + "; ".join(f"{reason} ({n}x)" for reason, n in sorted(plan.refused.items(), key=lambda kv: -kv[1])[:3])
        )
    priced = rank(priced)
    plan.fitting = [p for p in priced if p.fits]
    plan.overflowing = sorted((p for p in priced if not p.fits), key=lambda p: p.memory["total"])
    if not plan.fitting and fixed:
        leanest = plan.overflowing[0]
        raise ConfigError(
            f"no layout of {gpus} {device.name} with {describe(fixed)} fits (leanest: "
            f"{leanest.layout.describe()}, {leanest.overflow}); drop or change one of those overrides"
        )
    if not plan.fitting:
        raise ConfigError(too_large_message(cfg, gpus, gpus_per_node, device, plan.overflowing[0]))
    return plan


LAYOUT_KEYS = tuple(sorted((LAYOUT_FIELDS - {"parallel.compile"}) | {"parallel.grad_sync"}))
"""Config keys that choose a layout (the fields a layout sets, less ``parallel.compile``, which a zero-bubble
layout turns off; with ``parallel.grad_sync``, which a layout sets where it matters): given on the command line, they constrain ``meshforge plan``'s search
(:mod:`.constraints`); with ``--exact`` the layout they give (the rest at the config's values) is priced alone."""


def layout_keys_given(args: list[str]) -> list[str]:
    """The :data:`LAYOUT_KEYS` among command-line overrides (``--parallel.tp 8`` or ``--parallel.tp=8``)."""
    given = [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]
    return [k for k in given if k in LAYOUT_KEYS]


def plan_layout(cfg: JobConfig, gpus: int, gpus_per_node: int, device: Device, efficiency: float | None = None) -> Plan:
    """The plan of the one layout ``cfg``'s parallel and train sections give on ``gpus`` GPUs (the rest of
    its degrees resolved as ``meshforge train`` resolves them): priced, fitting or not; ConfigError with the
    project's own reason when the code would refuse it."""
    check_cluster(gpus, gpus_per_node)
    try:
        layout = layout_of_config(cfg, gpus)
        job = check_layout(cfg, layout)
    except ConfigError as e:
        raise ConfigError(
            f"the layout given by the --parallel.* / --train.* overrides is refused on {gpus} GPUs: {e}"
        ) from None
    plan = Plan(cfg, device, gpus, gpus_per_node)
    (priced,) = price(cfg, [(layout, job)], device, gpus_per_node, efficiency)
    (plan.fitting if priced.fits else plan.overflowing).append(priced)
    return plan


def too_large_message(cfg: JobConfig, gpus: int, gpus_per_node: int, device: Device, leanest: Priced) -> str:
    """'needs at least N <device> with <layout>': the smallest power-of-two multiple of the cluster that fits."""
    n = gpus
    while n < 2**20:
        n *= 2
        try:
            layouts, _ = enumerate_layouts(cfg, n, gpus_per_node, ac_modes=("full",), max_micro_batch=1)
        except ConfigError:
            continue
        layouts = [(lay, job) for lay, job in layouts if lay.zero == "fsdp-zero3"]
        cache: dict = {}
        fitting = [(lay, estimate_memory(job, lay, "cuda", cache)) for lay, job in layouts]
        fitting = [(lay, mem) for lay, mem in fitting if mem["total"] <= HEADROOM * device.hbm_bytes]
        if fitting:
            lay, mem = min(fitting, key=lambda lm: (lm[0].pp, lm[0].tp, lm[1]["total"]))
            how = " ".join(f"{k} {getattr(lay, k)}" for k in ("tp", "pp", "ep") if getattr(lay, k) > 1) or "fsdp"
            return (
                f"the model does not fit {gpus} {device.name} in any layout (leanest: {leanest.layout.describe()}, "
                f"{leanest.overflow}); needs at least {n} {device.name} with {how}"
            )
    return (
        f"the model does not fit {gpus} {device.name} in any layout (leanest: {leanest.layout.describe()}, "
        f"{leanest.overflow})"
    )


def _group_reasons(refused: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason, n in refused.items():
        key = re.sub(r"\d+", "N", reason)
        out[key] = out.get(key, 0) + n
    return out


def layout_of_config(cfg: JobConfig, gpus: int) -> Layout:
    """The layout ``cfg``'s parallel section describes on ``gpus`` ranks (dp_shard = -1 resolved)."""
    from ..config import micro_batch_size
    from ..parallel.mesh import pipeline_stages_per_rank, resolve_degrees
    from ..parallel.pipeline import plan_pipeline

    p = cfg.parallel
    d = resolve_degrees(p, gpus)
    if p.dp_backend == "deepspeed":
        zero = f"ds-zero{p.zero_stage}"
    else:
        zero = "fsdp-zero3" if p.fsdp_reshard_after_forward else "fsdp-zero2"
    mbs = micro_batch_size(cfg.train, d.dp)  # 0 resolves to the whole local batch
    if d.pp > 1:  # a pipeline's microbatch is the local batch over the job's microbatch count
        mbs = cfg.train.global_batch_size // d.dp // plan_pipeline(cfg, d).n_microbatches
    spr = pipeline_stages_per_rank(p) if d.pp > 1 else 0
    return Layout(
        d.tp,
        d.pp,
        d.dp_replicate,
        d.dp_shard,
        d.ep,
        d.cp,
        zero,
        p.pp_schedule,
        mbs,
        p.activation_checkpointing,
        p.cp_method,
        spr,
        p.pp_split if d.pp > 1 else "",
        p.grad_sync,
    )


def predict_run_memory(cfg: JobConfig, world_size: int, rank: int, device_type: str) -> dict[str, int]:
    """The memory ``meshforge train`` predicts for ``rank`` of its own layout (bytes by part, and the
    ``backward`` and ``step`` peaks it compares with its measurement; see pretrain/memory_probe.py)."""
    est = estimate_rank(cfg, layout_of_config(cfg, world_size), rank, device_type)
    return {
        **est,
        "backward": backward_peak(est),
        "step": max(backward_peak(est), est["grads"] + est["optimizer_step"]),
    }


__all__ = [
    "HEADROOM",
    "LAYOUT_KEYS",
    "Plan",
    "Priced",
    "check_cluster",
    "get_device",
    "layout_keys_given",
    "layout_of_config",
    "parse_tokens",
    "predict_run_memory",
    "plan_config",
    "plan_job",
    "plan_layout",
    "ZERO_MODES",
]
