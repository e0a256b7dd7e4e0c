"""Constraints on the layout search: the layout keys a user gives fix those dimensions, the rest is searched.

``meshforge plan --parallel.tp 8 --parallel.activation_checkpointing full`` lists the layouts with tp 8 and
full recomputation only. A constraint maps a :class:`~.layouts.Layout` dimension to the values it may take
(one from the command line; a set through :func:`~.planner.plan_job`'s ``fixed``, e.g. "1F1B or interleaved").
Dimensions (their config keys in :data:`KEY_DIMS`): the degrees ``tp pp cp ep dp_replicate dp_shard``, the
data-parallel mode ``zero`` (``parallel.dp_backend``, ``fsdp_reshard_after_forward`` and ``zero_stage`` each
narrow it), ``schedule``, ``spr`` (stages per rank, 0 read as the schedule's default), ``microbatches``
(``parallel.pp_microbatches``), ``micro_batch_size``, ``ac``, ``cp_method``, ``pp_split`` and ``grad_sync``. The pipeline
ones (schedule, spr, microbatches, pp_split) bind only layouts with a pipeline and ``cp_method`` only those
with cp > 1: a layout without a pipeline runs no schedule. A given tp may span nodes (priced over the
inter-node link); the unconstrained search keeps tp within a node.
"""

from __future__ import annotations

from ..config import ConfigError, JobConfig
from ..parallel.pipeline import SINGLE_STAGE_SCHEDULES
from .layouts import ZERO_MODES, Layout

Constraints = dict[str, frozenset]
"""Layout dimension -> the values it may take."""

KEY_DIMS = {
    "parallel.tp": "tp",
    "parallel.pp": "pp",
    "parallel.cp": "cp",
    "parallel.ep": "ep",
    "parallel.dp_replicate": "dp_replicate",
    "parallel.dp_shard": "dp_shard",
    "parallel.dp_backend": "zero",
    "parallel.fsdp_reshard_after_forward": "zero",
    "parallel.zero_stage": "zero",
    "parallel.pp_schedule": "schedule",
    "parallel.pp_stages_per_rank": "spr",
    "parallel.pp_microbatches": "microbatches",
    "parallel.pp_split": "pp_split",
    "parallel.activation_checkpointing": "ac",
    "parallel.cp_method": "cp_method",
    "train.micro_batch_size": "micro_batch_size",
    "parallel.grad_sync": "grad_sync",
}
"""Config key -> the layout dimension it constrains."""
PIPELINE_DIMS = ("schedule", "spr", "microbatches", "pp_split")
"""Dimensions that bind only layouts with a pipeline (``cp_method`` binds only cp > 1, ``grad_sync`` only FSDP2
sharding without a pipeline: :attr:`~.layouts.Layout.sync_choice`)."""


def _zero_modes(key: str, value) -> frozenset:
    """The data-parallel modes (:data:`~.layouts.ZERO_MODES`) a value of one of the three mode keys allows."""
    if key == "parallel.dp_backend":
        return frozenset(z for z, (backend, _, _) in ZERO_MODES.items() if backend == value)
    if key == "parallel.fsdp_reshard_after_forward":
        return frozenset({"fsdp-zero3" if value else "fsdp-zero2"})
    return frozenset({f"ds-zero{value}"})


def constraints_of(cfg: JobConfig, keys: list[str]) -> Constraints:
    """The constraints the command line's layout ``keys`` set (their values read from ``cfg``)."""
    out: Constraints = {}
    for key in dict.fromkeys(keys):
        if key not in KEY_DIMS:
            continue
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        dim = KEY_DIMS[key]
        if dim == "zero":  # the config's checks refuse a mode key of the other backend before this
            out["zero"] = out.get("zero", frozenset(ZERO_MODES)) & _zero_modes(key, value)
        elif dim == "dp_shard" and value == -1:
            continue  # -1: the rest of the ranks, which is what the search fills in anyway
        elif dim == "microbatches" and value == 0:
            continue  # 0: the count follows the micro-batch size
        elif dim == "micro_batch_size" and value == 0:
            out[dim] = frozenset({0})  # the whole local batch, resolved per data-parallel degree
        else:
            out[dim] = frozenset({value})
    return out


def describe(fixed: Constraints) -> str:
    """``tp 8, ac full`` (each dimension with its values, ``|`` between alternatives)."""
    return ", ".join(f"{dim} {'|'.join(sorted(str(v) for v in vals))}" for dim, vals in fixed.items())


OPEN_DIMS = ("tp", "micro_batch_size", "spr")
"""Dimensions where a fixed value is tried even outside the search's own range (tp across nodes, a micro-batch
size above the search's largest, any stages per rank); the project's checks still refuse what the code would."""


def searched_values(dim: str, values, fixed: Constraints) -> list:
    """The values of ``dim`` a constrained search tries: the fixed ones among ``values`` (the search's own)."""
    if dim in OPEN_DIMS:
        return sorted(fixed[dim])
    return [v for v in values if v in fixed[dim]]


def effective_spr(schedule: str, given: int) -> int:
    """Stages per rank that ``parallel.pp_stages_per_rank = given`` means under ``schedule``."""
    return given or (1 if schedule in SINGLE_STAGE_SCHEDULES else 2)


def satisfies(layout: Layout, fixed: Constraints, global_batch: int) -> bool:
    """Whether ``layout`` meets every constraint (pipeline ones only under a pipeline, cp_method only with cp)."""
    for dim, allowed in fixed.items():
        if dim in PIPELINE_DIMS and layout.pp == 1:
            continue
        if (dim == "cp_method" and layout.cp == 1) or (dim == "grad_sync" and not layout.sync_choice):
            continue
        if dim == "spr":
            ok = any(layout.spr == effective_spr(layout.schedule, v) for v in allowed)
        elif dim == "microbatches":
            ok = global_batch // (layout.dp * layout.micro_batch_size) in allowed
        elif dim == "micro_batch_size":
            ok = layout.micro_batch_size in allowed or (
                0 in allowed and layout.micro_batch_size == global_batch // layout.dp
            )
        else:
            ok = getattr(layout, dim) in allowed
        if not ok:
            return False
    return True


def check_constraints(fixed: Constraints, gpus: int, n_layers: int) -> None:
    """One line for constraints no layout of ``gpus`` GPUs can meet, found before any search: a degree that
    does not divide the GPUs, given degrees whose product does not, a pipeline deeper than the layers."""
    degrees = ("tp", "pp", "cp", "dp_replicate", "dp_shard")
    for dim in degrees:
        for v in fixed.get(dim, ()):
            if v <= 0 or gpus % v:
                raise ConfigError(
                    f"no layout of {gpus} GPUs has {dim} {v}: {v} does not divide {gpus}; "
                    f"give a divisor of {gpus} (or plan for a different --gpus)"
                )
    given = [dim for dim in degrees if len(fixed.get(dim, ())) == 1]
    product = 1
    for dim in given:
        product *= next(iter(fixed[dim]))
    if gpus % product or (len(given) == len(degrees) and product != gpus):
        what = " x ".join(f"{dim} {next(iter(fixed[dim]))}" for dim in given)
        raise ConfigError(
            f"no layout of {gpus} GPUs has {what}: that is {product} ranks, and {gpus} GPUs "
            f"{'do not divide by it' if gpus % product else 'need the degrees to multiply to ' + str(gpus)}"
        )
    scheds = fixed.get("schedule", ())
    if scheds and all(s in SINGLE_STAGE_SCHEDULES for s in scheds) and any(v > 1 for v in fixed.get("spr", ())):
        raise ConfigError(
            f"no layout has schedule {'|'.join(sorted(scheds))} with spr {'|'.join(map(str, sorted(fixed['spr'])))}: "
            f"{' and '.join(sorted(scheds))} {'run' if len(scheds) > 1 else 'runs'} one stage per rank (parallel.pp_stages_per_rank 1); several "
            "stages per rank need interleaved_1f1b or zero_bubble"
        )
    for v in fixed.get("pp", ()):
        if v > 1 and v > n_layers:
            raise ConfigError(
                f"no layout has pp {v}: the model's {n_layers} layers cannot cover {v} pipeline stages "
                f"(model.n_layers); use pp <= {n_layers}"
            )


def nothing_satisfies(fixed: Constraints, gpus: int, refused: dict[str, int]) -> str:
    """The one line for a search that found no layout meeting ``fixed``: the code's commonest reasons."""
    reasons = "; ".join(f"{r} ({n}x)" for r, n in sorted(refused.items(), key=lambda kv: -kv[1])[:1])
    return (
        f"no layout of {gpus} GPUs with {describe(fixed)} is valid"
        + (f": {reasons}" if reasons else ": no combination of the other dimensions meets them all")
        + "; drop or change one of those overrides"
    )
