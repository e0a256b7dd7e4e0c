"""Layouts: one way to lay a job over the GPUs, and the enumeration of every valid one.

A :class:`Layout` is the parallel part of a job config (degrees, data-parallel backend and
ZeRO mode, pipeline schedule and microbatching, activation checkpointing). It becomes a
:class:`~meshforge.config.JobConfig` with :func:`apply_layout`, and :func:`enumerate_layouts`
keeps only those that the project's own checks accept (``config.validate``,
``mesh.resolve_degrees``, ``job_checks.check_job``, the fused loss's ``use_fused_loss``),
so the planner never proposes what ``meshforge train`` would refuse.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..config import ConfigError, JobConfig, validate, validate_layout, validate_settings
from ..models import check_config
from ..parallel.deepspeed_engine import check_deepspeed
from ..parallel.job_checks import check_context_parallel, check_job, use_fused_loss
from ..parallel.mesh import Degrees, pipeline_layers, resolve_degrees
from ..parallel.pipeline import SINGLE_STAGE_SCHEDULES  # one stage per rank; the others loop several

ZERO_MODES = {
    "fsdp-zero3": ("fsdp2", True, 1),
    "fsdp-zero2": ("fsdp2", False, 1),
    "ds-zero1": ("deepspeed", True, 1),
    "ds-zero2": ("deepspeed", True, 2),
    "ds-zero3": ("deepspeed", True, 3),
}
"""Data-parallel modes: name -> (parallel.dp_backend, parallel.fsdp_reshard_after_forward, parallel.zero_stage)."""
AC_MODES = ("none", "selective", "full")
SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble", "gpipe")
CP_METHODS = ("ring", "alltoall")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    ep: int = 1
    cp: int = 1
    zero: str = "fsdp-zero3"
    """A key of :data:`ZERO_MODES`."""
    schedule: str = "1f1b"
    """Pipeline schedule (meaningless with pp = 1)."""
    micro_batch_size: int = 1
    """Samples per forward/backward (per pipeline microbatch)."""
    ac: str = "none"
    """Activation checkpointing mode."""
    cp_method: str = "ring"
    """Context-parallel attention, ``ring`` or ``alltoall`` (meaningless with cp = 1)."""
    stages_per_rank: int = 0
    """Virtual pipeline stages per rank (``parallel.pp_stages_per_rank``); 0: the schedule's default (2 for
    the interleaved schedules, else 1)."""
    pp_split: str = ""
    """First layer of each stage after the first (``parallel.pp_split``, e.g. ``"3,6"``); empty: balanced.
    The search prices balanced splits; a layout given on the command line keeps the user's."""
    grad_sync: str = ""
    """``parallel.grad_sync``: FSDP2 without a pipeline reduces gradients once per step (``step``) or after
    every microbatch (``microbatch``: less memory, more traffic); empty: as the config says; meaningless
    elsewhere (:attr:`sync_choice`)."""

    @property
    def spr(self) -> int:
        """Stage modules per rank: 1 without a pipeline or under a one-stage schedule."""
        if self.pp == 1 or self.schedule in SINGLE_STAGE_SCHEDULES:
            return 1
        return self.stages_per_rank or 2

    @property
    def sync_choice(self) -> bool:
        """Whether ``grad_sync`` changes anything: FSDP2 sharding without a pipeline (its microbatch count,
        which must be above 1 too, is the job's: :func:`.planner.grad_sync_variant`)."""
        return self.pp == 1 and self.sharded and ZERO_MODES[self.zero][0] == "fsdp2"

    @property
    def degrees(self) -> Degrees:
        return Degrees(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.degrees.world_size

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that take different samples (cp ranks share theirs)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shard(self) -> int:
        """Ranks FSDP2 shards the parameters over: ``dp_shard x cp`` (flattened, cp inner)."""
        return self.dp_shard * self.cp

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 wraps the model (any data or context parallelism)."""
        return self.dp * self.cp > 1

    @property
    def label(self) -> str:
        """What the data-parallel part is: ``no-dp`` (one data-parallel rank), ``replicated`` (FSDP2 with
        nothing to shard: whole copies, gradients all-reduced), ``fsdp-zero3`` / ``fsdp-zero2`` (sharded
        over ``dp_shard x cp``), ``hsdp-zero3`` / ``hsdp-zero2`` (sharded and replicated), or the DeepSpeed
        stage (``ds-zero1/2/3``, partitioned over ``dp x cp``)."""
        if self.zero.startswith("ds"):
            return self.zero
        if self.fsdp_shard == 1:
            return "replicated" if self.dp_replicate > 1 else "no-dp"
        return ("hsdp" if self.dp_replicate > 1 else "fsdp") + self.zero[len("fsdp") :]

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}" + ("" if self.cp_method == "ring" else "(a2a)"))
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"dp{self.dp_replicate}x{self.dp_shard}")
        text = " ".join(parts) + f" {self.label}"
        if self.pp > 1:
            text += f" {self.schedule}" + (f" v{self.spr}" if self.schedule not in SINGLE_STAGE_SCHEDULES else "")
            text += f" split {self.pp_split}" if self.pp_split else ""
        text += " sync:microbatch" if self.sync_choice and self.grad_sync == "microbatch" else ""
        return f"{text} mbs{self.micro_batch_size} ac:{self.ac}"

    def overrides(self) -> dict[str, object]:
        """The dotted config keys that select this layout (``--section.key value`` of ``meshforge train``)."""
        backend, reshard, stage = ZERO_MODES[self.zero]
        out: dict[str, object] = {
            "parallel.tp": self.tp,
            "parallel.pp": self.pp,
            "parallel.cp": self.cp,
            "parallel.ep": self.ep,
            "parallel.dp_replicate": self.dp_replicate,
            "parallel.dp_shard": self.dp_shard,
            "parallel.dp_backend": backend,
            "parallel.activation_checkpointing": self.ac,
            "train.micro_batch_size": self.micro_batch_size,
        }
        if self.cp > 1:
            out["parallel.cp_method"] = self.cp_method
        if backend == "fsdp2":
            out["parallel.fsdp_reshard_after_forward"] = reshard
            if self.sync_choice and self.grad_sync:
                out["parallel.grad_sync"] = self.grad_sync
        else:
            out["parallel.zero_stage"] = stage
        if self.pp > 1:
            out["parallel.pp_schedule"] = self.schedule
            out["parallel.pp_stages_per_rank"] = self.spr
            out["parallel.pp_split"] = self.pp_split
            if self.schedule == "zero_bubble":
                out["parallel.compile"] = "off"  # zero-bubble's split backward does not take compiled blocks
        return out


def apply_layout(cfg: JobConfig, layout: Layout) -> JobConfig:
    """A copy of ``cfg`` running ``layout`` (the model, data and batch stay)."""
    out = copy.copy(cfg)
    out.parallel = copy.copy(cfg.parallel)
    out.train = copy.copy(cfg.train)
    for key, value in layout.overrides().items():
        sec, name = key.split(".")
        setattr(getattr(out, sec), name, value)
    if layout.pp > 1:
        out.parallel.pp_microbatches = 0  # the layout's micro_batch_size sets the count
    else:
        out.parallel.pp_split = ""
    return out


def check_layout(cfg: JobConfig, layout: Layout, settings_checked: bool = False) -> JobConfig:
    """The job config of ``layout``, or ConfigError with the project's own reason for refusing it.

    ``settings_checked``: ``cfg`` passed :func:`settings_pass`, whose checks read nothing a layout sets, so
    only the layout's own checks run (the same verdict and reason as the full ones)."""
    job = apply_layout(cfg, layout)
    if settings_checked:
        validate_layout(job)
    else:
        validate(job)
        check_config(job)
    d = resolve_degrees(job.parallel, layout.world_size)
    check_job(job, d)
    use_fused_loss(job, d, job.train.device)  # train.fused_loss = on where the trainer refuses it
    return job


def settings_pass(cfg: JobConfig) -> bool:
    """Whether ``cfg`` passes the checks that read no layout field (``config.validate_settings``, the model
    family's ``check_config``): then every candidate of a search needs only ``config.validate_layout``;
    otherwise each runs the full checks, which give each its own first reason as before."""
    try:
        validate_settings(cfg)
        check_config(cfg)
    except ConfigError:
        return False
    return True


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def virtual_stages(n_layers: int, pp: int, schedule: str) -> list[int]:
    """Stages per rank the search tries: 0 (one) for a one-stage schedule or no pipeline; for the looping
    schedules every count from 2 that leaves each stage a layer and either splits the layers evenly or is
    a power of two (uneven splits are priced by their heaviest stage)."""
    if pp == 1 or schedule in SINGLE_STAGE_SCHEDULES:
        return [0]
    per_rank = n_layers // pp
    return [v for v in range(2, per_rank + 1) if n_layers % (pp * v) == 0 or v & (v - 1) == 0]


def micro_batch_sizes(global_batch: int, dp: int, largest: int) -> list[int]:
    """Micro-batch sizes the search tries: powers of two up to ``largest`` while they divide the local batch."""
    out, mbs = [], 1
    while mbs <= largest and global_batch % (mbs * dp) == 0:
        out.append(mbs)
        mbs *= 2
    return out


def enumerate_layouts(
    cfg: JobConfig, gpus: int, gpus_per_node: int, ac_modes=AC_MODES, max_micro_batch: int = 16
) -> tuple[list[tuple[Layout, JobConfig]], dict[str, int]]:
    """:func:`iter_layouts` as a list, and the refusals counted by reason."""
    refused: dict[str, int] = {}
    return list(iter_layouts(cfg, gpus, gpus_per_node, refused, ac_modes, max_micro_batch)), refused


def iter_layouts(
    cfg: JobConfig,
    gpus: int,
    gpus_per_node: int,
    refused: dict[str, int],
    ac_modes=AC_MODES,
    max_micro_batch: int = 16,
    fits=None,
    fixed: dict | None = None,
) -> Iterator[tuple[Layout, JobConfig]]:
    """Every layout of ``gpus`` GPUs the code accepts, with its job config; and why the others were refused.

    Degrees: tp within a node (a divisor of ``gpus_per_node``), any pp, cp a power of two (ring
    and all-to-all attention), ep, dp_replicate dividing what is left; micro-batch sizes are
    powers of two; stages per rank of the looping schedules (:func:`virtual_stages`); every data-parallel mode of :data:`ZERO_MODES` (the DeepSpeed stages where
    ``check_deepspeed`` accepts the degrees: today data x context parallel). On one rank only
    ``fsdp-zero3`` (nothing to shard: the other modes would be the same layout), and with only
    replicas (``dp_shard x cp = 1``) ``fsdp-zero2`` only where ``fsdp-zero3`` is refused.
    ``refused`` counts the refusals by their first words (for the "no layout" message).

    Dominated layouts are left out before they are priced: GPipe where 1F1B of the same layout is
    accepted (the same bubble and collectives, every microbatch's activations held), and, given ``fits``
    (``(layout, job) -> bool``: the planner's memory check), a heavier activation checkpointing mode
    where a lighter one of the same layout fits (more compute, more recompute gathers, a bubble as large
    a share of more compute; the exposed data-parallel traffic shrinks by at most the added compute:
    never faster, and fitting either way). ``fits`` is asked after the caller has taken the layout (the
    planner prices it in between), so a search holds one job config at a time.

    ``fixed`` (:mod:`.constraints`): the dimensions the user fixed; only layouts that meet them are
    enumerated (a fixed tp may span nodes, a fixed micro-batch size exceed ``max_micro_batch``).
    """
    m = cfg.model
    n_layers = pipeline_layers(m)[0]
    fixed = fixed or {}
    if fixed:
        from .constraints import satisfies, searched_values  # here, not at the top: constraints imports this module
    else:
        satisfies = searched_values = None

    def pick(dim: str, values):
        return values if dim not in fixed else searched_values(dim, values, fixed)

    replicas_zero3: set[Layout] = set()  # accepted fsdp-zero3 layouts with nothing to shard
    gbs = cfg.train.global_batch_size
    settings_checked = settings_pass(cfg)  # checked once here, not per candidate
    schedules = SCHEDULES
    ac_modes = sorted(ac_modes, key=AC_MODES.index)  # lightest first: a fitting one rules out the heavier
    for tp in pick("tp", divisors(min(gpus, gpus_per_node))):
        if gpus % tp:
            continue
        for pp, cp, cp_method in (
            (p, c, meth)
            for p in pick("pp", divisors(gpus // tp))
            for c in pick("cp", divisors(gpus // (tp * p)))
            if c & (c - 1) == 0
            for meth in (pick("cp_method", CP_METHODS) if c > 1 else ("ring",))
        ):
            if pp > 1 and pp > m.n_layers:
                continue
            dp = gpus // (tp * pp * cp)
            if gbs % dp:
                refused["global batch does not divide by the data-parallel degree"] = (
                    refused.get("global batch does not divide by the data-parallel degree", 0) + 1
                )
                continue
            if cp > 1:  # context parallel's own limits depend on the degrees only: check them once here
                try:
                    check_context_parallel(
                        apply_layout(cfg, Layout(tp, pp, 1, dp, cp=cp, cp_method=cp_method)),
                        Degrees(pp, 1, dp, cp, tp, 1),
                    )
                except ConfigError as e:
                    reason = str(e).split(":")[0][:80]
                    refused[reason] = refused.get(reason, 0) + 1
                    continue
            eps = [e for e in divisors(dp * cp) if m.moe_experts and m.moe_experts % e == 0] or [1]
            for dp_rep in pick("dp_replicate", divisors(dp)):
                dp_shard = dp // dp_rep
                if "dp_shard" in fixed and dp_shard not in fixed["dp_shard"]:
                    continue
                for ep in pick("ep", eps):
                    if (dp_shard * cp) % ep:
                        continue
                    for zero in pick("zero", tuple(ZERO_MODES)):
                        if zero != "fsdp-zero3" and dp * cp == 1:
                            continue  # one rank: nothing to shard, the same layout as fsdp-zero3 (unwrapped)
                        if zero.startswith("ds"):  # DeepSpeed's limits depend on the degrees only: check them once here
                            degrees = Degrees(pp, dp_rep, dp_shard, cp, tp, ep)
                            try:
                                check_deepspeed(
                                    apply_layout(cfg, Layout(tp, pp, dp_rep, dp_shard, ep, cp, zero)), degrees
                                )
                            except ConfigError as e:
                                reason = str(e).split(":")[0][:80]
                                refused[reason] = refused.get(reason, 0) + 1
                                continue
                        for mbs in pick("micro_batch_size", micro_batch_sizes(gbs, dp, max_micro_batch)):
                            mbs = mbs or gbs // dp  # a fixed 0: the whole local batch
                            if gbs % (mbs * dp):
                                continue
                            one_f_one_b = set()  # AC modes 1F1B accepted at this micro-batch size
                            for sched, spr in (
                                (s, v)
                                for s in (pick("schedule", schedules) if pp > 1 else ("1f1b",))
                                for v in (pick("spr", virtual_stages(n_layers, pp, s)) if pp > 1 else [0])
                            ):
                                for ac in pick("ac", ac_modes):
                                    if sched == "gpipe" and any(
                                        AC_MODES.index(a) <= AC_MODES.index(ac) for a in one_f_one_b
                                    ):
                                        continue  # dominated by 1F1B at this or a lighter AC mode
                                    layout = Layout(
                                        tp,
                                        pp,
                                        dp_rep,
                                        dp_shard,
                                        ep,
                                        cp,
                                        zero,
                                        sched,
                                        mbs,
                                        ac,
                                        cp_method,
                                        spr,
                                        next(iter(fixed["pp_split"])) if pp > 1 and "pp_split" in fixed else "",
                                        next(iter(fixed["grad_sync"])) if "grad_sync" in fixed else "",
                                    )
                                    if fixed and not satisfies(layout, fixed, gbs):
                                        continue
                                    try:
                                        job = check_layout(cfg, layout, settings_checked)
                                    except ConfigError as e:
                                        reason = str(e).split(":")[0][:80]
                                        refused[reason] = refused.get(reason, 0) + 1
                                        continue
                                    if sched == "1f1b":
                                        one_f_one_b.add(ac)
                                    if (
                                        zero == "fsdp-zero2"
                                        and layout.fsdp_shard == 1
                                        and any(
                                            replace(layout, zero="fsdp-zero3", ac=a) in replicas_zero3
                                            for a in AC_MODES[: AC_MODES.index(ac) + 1]
                                        )
                                    ):
                                        continue  # only replicas: ZeRO-2 is ZeRO-3 plus a gathered copy
                                    if zero == "fsdp-zero3" and layout.fsdp_shard == 1:
                                        replicas_zero3.add(layout)
                                    yield layout, job
                                    if fits is not None and fits(layout, job):
                                        break  # heavier recompute of a layout that fits is dominated
