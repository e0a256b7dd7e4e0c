"""The named device mesh: resolve parallel degrees against the world size, then build it.

Dims, outermost first: ``pp, dp_replicate, dp_shard, cp, tp``. ``dp_shard = -1`` takes
whatever the other degrees leave. The checks of a job against its degrees are
:func:`meshforge.parallel.job_checks.check_job`; they run before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..models import family_spec

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Degrees:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp


def resolve_degrees(p: ParallelConfig, world_size: int) -> Degrees:
    """Fill in ``dp_shard = -1`` and check the product equals the world size."""
    fixed = p.pp * p.dp_replicate * p.cp * p.tp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} does not divide by pp*dp_replicate*cp*tp = "
                f"{p.pp}*{p.dp_replicate}*{p.cp}*{p.tp} = {fixed}, so parallel.dp_shard = -1 has no value"
            )
        dp_shard = world_size // fixed
    d = Degrees(p.pp, p.dp_replicate, dp_shard, p.cp, p.tp, p.ep)
    if d.world_size != world_size:
        raise ConfigError(
            f"parallel degrees pp*dp_replicate*dp_shard*cp*tp = {p.pp}*{p.dp_replicate}*{dp_shard}*{p.cp}*{p.tp} "
            f"= {d.world_size} but the world size is {world_size}"
        )
    return d


def pipeline_layers(m: ModelConfig) -> tuple[int, str]:
    """The blocks a pipeline splits and how to name their count (the family's ``pipeline_blocks``: a
    decoder's layers, or an encoder-decoder's encoder then decoder layers, split as one sequence)."""
    return family_spec(m.family).pipeline_blocks(m)


def pipeline_stages_per_rank(p: ParallelConfig) -> int:
    """Virtual stages per pipeline rank (``pp_stages_per_rank``, else by schedule)."""
    if p.pp_stages_per_rank:
        return p.pp_stages_per_rank
    return 2 if p.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
