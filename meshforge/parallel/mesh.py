"""The named device mesh: resolve parallel degrees against the world size, then build it.

Dims, outermost first: ``pp, dp_replicate, dp_shard, cp, tp``. ``dp_shard = -1`` takes
whatever the other degrees leave. Every check runs before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, JobConfig, ParallelConfig

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


def check_job(cfg: JobConfig, d: Degrees) -> None:
    """Relations between the degrees and the model/batch, named with their numbers."""
    m, t = cfg.model, cfg.train
    if d.cp != 1:
        raise ConfigError(f"parallel.cp = {d.cp}: context parallelism is not implemented yet; use 1")
    if d.ep != 1:
        raise ConfigError(f"parallel.ep = {d.ep}: expert parallelism needs an MoE model; use 1")
    if d.tp > 1 or d.pp > 1:
        raise ConfigError(f"tensor/pipeline parallel (tp={d.tp}, pp={d.pp}) are not implemented yet; use 1")
    if t.global_batch_size % (t.micro_batch_size * d.dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must divide by micro_batch_size * data-parallel "
            f"degree ({t.micro_batch_size} * {d.dp} = {t.micro_batch_size * d.dp})"
        )
    del m
