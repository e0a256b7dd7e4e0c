"""The pipeline plan: how many stages, which layers each holds, how many microbatches, which schedule.

Checked against the model and the batch before any process group exists (``parallel/job_checks.py``
calls :func:`plan_pipeline`; the planner prices the same plan); :mod:`meshforge.parallel.pipeline`
splits the model and runs the schedule from it. See that module's docstring for the split rules and
the microbatch choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CHOICES, ConfigError, JobConfig, micro_batch_size
from .compile import compile_enabled
from .mesh import Degrees, pipeline_layers, pipeline_stages_per_rank

SCHEDULES = CHOICES["parallel.pp_schedule"]
"""Every pipeline schedule, as the type of ``parallel.pp_schedule`` lists them."""
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipelinePlan:
    pp: int
    stages_per_rank: int
    layer_ranges: tuple[tuple[int, int], ...]
    """``[start, end)`` of the layers of each stage, in stage order."""
    n_microbatches: int
    schedule: str

    @property
    def n_stages(self) -> int:
        return len(self.layer_ranges)

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """Loop-style placement: rank ``r`` holds stages ``r, r + pp, ...``."""
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]


def split_layers(
    n_layers: int, n_stages: int, pp_split: str = "", what: str = "model.n_layers", stages_from: str = ""
) -> tuple[tuple[int, int], ...]:
    """Layer ranges of ``n_stages`` stages: balanced, or from ``pp_split`` (first layer of each later stage).

    ``what`` names the layer count in errors (an encoder-decoder splits encoder + decoder layers),
    ``stages_from`` where the stage count comes from."""
    if n_layers < n_stages:
        raise ConfigError(f"{what} = {n_layers} cannot cover {n_stages} pipeline stages{stages_from}")
    if pp_split.strip():
        try:
            starts = [int(s) for s in pp_split.split(",")]
        except ValueError:
            raise ConfigError(
                f"parallel.pp_split = {pp_split!r} must be comma-separated layer numbers, e.g. '3,6'"
            ) from None
        if len(starts) != n_stages - 1:
            raise ConfigError(
                f"parallel.pp_split = {pp_split!r} gives {len(starts) + 1} stages but the pipeline has {n_stages} "
                f"(parallel.pp x stages per rank); give {n_stages - 1} split points"
            )
        bounds = [0, *starts, n_layers]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ConfigError(
                f"parallel.pp_split = {pp_split!r}: split points must increase strictly within 1..{n_layers - 1} "
                f"({what} = {n_layers}), so that every stage has at least one layer"
            )
        return tuple(zip(bounds, bounds[1:]))
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        ranges.append((start, end))
        start = end
    return tuple(ranges)


def plan_pipeline(cfg: JobConfig, d: Degrees, device_type: str | None = None) -> PipelinePlan:
    """Check the pipeline settings against the model and batch (ConfigError) and return the plan.

    ``device_type`` (when known) also checks the schedule against ``parallel.compile``.
    """
    p, m = cfg.parallel, cfg.model
    spr = pipeline_stages_per_rank(p)
    if p.pp_schedule in SINGLE_STAGE_SCHEDULES and spr != 1:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule!r} runs one stage per rank but parallel.pp_stages_per_rank = "
            f"{spr}; use interleaved_1f1b or zero_bubble for several stages per rank"
        )
    if p.pp_schedule == "zero_bubble" and device_type is not None and compile_enabled(p.compile, device_type):
        raise ConfigError(
            "parallel.pp_schedule = 'zero_bubble' splits each backward into input and weight parts, which "
            "torch.compile'd blocks do not support; set parallel.compile = off or use interleaved_1f1b"
        )
    n_layers, what = pipeline_layers(m)
    ranges = split_layers(n_layers, d.pp * spr, p.pp_split, what, f" (parallel.pp = {d.pp} x {spr} stages per rank)")
    n_mb = pipeline_microbatches(cfg, d, spr)
    return PipelinePlan(d.pp, spr, ranges, n_mb, p.pp_schedule)


def schedule_refuses(schedule: str, n_microbatches: int, pp: int) -> str:
    """Why ``schedule`` cannot run ``n_microbatches`` on ``pp`` ranks (empty when it can)."""
    if schedule != "gpipe" and n_microbatches < pp:
        return f"{n_microbatches} microbatches are fewer than parallel.pp = {pp}, which schedule {schedule!r} needs"
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            return (
                f"schedule {schedule!r} needs the microbatch count ({n_microbatches}) to be a multiple of {rounds} "
                f"(= microbatches // parallel.pp); a multiple of parallel.pp = {pp} always works"
            )
    return ""


def pipeline_microbatches(cfg: JobConfig, d: Degrees, stages_per_rank: int) -> int:
    """Microbatches per pipeline step, as ``parallel.pp_microbatches`` documents: that value; else
    local batch / ``train.micro_batch_size`` when that is set; else the divisor of the local batch
    nearest to ``2 * pp * stages_per_rank`` that the schedule accepts (the larger one on a tie)."""
    p, t = cfg.parallel, cfg.train
    micro = micro_batch_size(t, d.dp)  # checks that the global batch splits over the dp ranks
    local_batch = t.global_batch_size // d.dp
    if p.pp_microbatches:
        n_mb, source = p.pp_microbatches, f"parallel.pp_microbatches = {p.pp_microbatches}"
        if local_batch % n_mb:
            raise ConfigError(
                f"{source} must divide the local batch (train.global_batch_size / data-parallel degree = "
                f"{t.global_batch_size} / {d.dp} = {local_batch})"
            )
    elif t.micro_batch_size:
        n_mb = local_batch // micro
        source = f"local batch {local_batch} / train.micro_batch_size {micro} = {n_mb} microbatches"
    else:
        target = 2 * d.pp * stages_per_rank
        fits = [
            n
            for n in range(1, local_batch + 1)
            if local_batch % n == 0 and not schedule_refuses(p.pp_schedule, n, d.pp)
        ]
        if not fits:
            raise ConfigError(
                f"no microbatch count suits schedule {p.pp_schedule!r} with parallel.pp = {d.pp} on a local batch of "
                f"{local_batch} (train.global_batch_size / data-parallel degree = {t.global_batch_size} / {d.dp}); "
                f"raise train.global_batch_size to a multiple of {d.pp * d.dp}"
            )
        return min(fits, key=lambda n: (abs(n - target), -n))
    why = schedule_refuses(p.pp_schedule, n_mb, d.pp)
    if why:
        raise ConfigError(
            f"{source}: {why}; set a smaller train.micro_batch_size, parallel.pp_microbatches, or 0 "
            "for both to pick one that fits"
        )
    return n_mb
