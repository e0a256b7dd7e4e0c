"""The named device mesh: resolve parallel degrees against the world size, then build it.

Dims, outermost first: ``pp, dp_replicate, dp_shard, cp, tp``. ``dp_shard = -1`` takes
whatever the other degrees leave. Every check runs before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, JobConfig, ModelConfig, ParallelConfig, micro_batch_size

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
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if d.cp > 1:
        check_context_parallel(cfg, d)
    if d.ep > 1:  # expert parallel borrows its ranks from dp_shard x cp
        if not m.moe_experts:
            raise ConfigError(f"parallel.ep = {d.ep}: expert parallelism needs an MoE model "
                              "(model.moe_experts > 0); use parallel.ep = 1 for a dense model")
        if (d.dp_shard * d.cp) % d.ep:
            raise ConfigError(f"parallel.ep = {d.ep} must divide dp_shard*cp = {d.dp_shard}*{d.cp} = "
                              f"{d.dp_shard * d.cp} (expert parallel borrows its ranks from them)")
        if m.moe_experts % d.ep:
            raise ConfigError(f"model.moe_experts = {m.moe_experts} does not divide by parallel.ep = {d.ep}")
        if p.dp_backend != "fsdp2":
            raise ConfigError(f"parallel.ep = {d.ep} needs parallel.dp_backend = 'fsdp2' (got {p.dp_backend!r})")
    if d.tp > 1:
        if m.moe_experts and m.family != "decoder":
            raise ConfigError(f"parallel.tp = {d.tp}: the tensor-parallel plans cover MoE feed-forwards in the decoder "
                              f"family only, not in an {m.family} (model.moe_experts = {m.moe_experts}); "
                              "use parallel.tp = 1")
        for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads),
                            ("FFN width (model.ffn_dim)", m.hidden_dim), ("model.vocab_size", m.vocab_size)):
            if value % d.tp:
                raise ConfigError(f"{name} = {value} does not divide by parallel.tp = {d.tp}")
    if d.pp > 1:
        stages = d.pp * pipeline_stages_per_rank(p)
        n_layers, what = pipeline_layers(m)
        if n_layers < stages:
            raise ConfigError(
                f"{what} = {n_layers} cannot cover {stages} pipeline stages "
                f"(parallel.pp = {d.pp} x {pipeline_stages_per_rank(p)} stages per rank)"
            )
    if cfg.data.document_mask and (d.tp > 1 or d.pp > 1):
        raise ConfigError(f"data.document_mask works with data and expert parallelism only so far (parallel.tp = "
                          f"{d.tp}, parallel.pp = {d.pp}); use tp = pp = 1 or turn the mask off")
    if p.dp_backend == "deepspeed" and (d.tp > 1 or d.pp > 1 or d.dp_replicate > 1):
        raise ConfigError("parallel.dp_backend = 'deepspeed' supports data parallelism only (tp = pp = dp_replicate = 1)")
    micro_batch_size(t, d.dp)  # the global batch splits into micro batches on d.dp ranks


def check_context_parallel(cfg: JobConfig, d: Degrees) -> None:
    """What ``parallel.cp > 1`` needs: a decoder, a sequence in 2*cp chunks, heads for all-to-all."""
    m, p = cfg.model, cfg.parallel
    if m.family != "decoder":
        raise ConfigError(f"parallel.cp = {d.cp}: context parallelism covers the decoder family only, not "
                          f"model.family = {m.family!r}; use parallel.cp = 1")
    if m.moe_experts:
        raise ConfigError(f"parallel.cp = {d.cp} with an MoE model (model.moe_experts = {m.moe_experts}) is not "
                          "supported yet: its load-balancing loss and router statistics would be taken over each "
                          "rank's share of the sequence instead of the whole; use parallel.cp = 1")
    for name, degree in (("pp", d.pp), ("ep", d.ep)):
        if degree > 1:
            raise ConfigError(f"parallel.cp = {d.cp} does not compose with parallel.{name} = {degree} yet; "
                              f"use one of them")
    if p.dp_backend != "fsdp2":
        raise ConfigError(f"parallel.cp = {d.cp} needs parallel.dp_backend = 'fsdp2' (got {p.dp_backend!r})")
    seq = cfg.data.seq_len
    if seq % (2 * d.cp):
        raise ConfigError(f"data.seq_len = {seq} does not divide into 2*cp = {2 * d.cp} zigzag chunks "
                          f"(parallel.cp = {d.cp}); use a multiple of {2 * d.cp}")
    if p.cp_method == "alltoall":
        for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
            if value % (d.tp * d.cp):
                raise ConfigError(f"parallel.cp_method = 'alltoall' needs {name} = {value} divisible by tp*cp = "
                                  f"{d.tp}*{d.cp} = {d.tp * d.cp} (each cp rank takes a share of each tp rank's "
                                  "heads); use cp_method = 'ring'")


def pipeline_layers(m: ModelConfig) -> tuple[int, str]:
    """The blocks a pipeline splits and how to name their count: a decoder's layers, or an
    encoder-decoder's encoder then decoder layers (one sequence, split as one)."""
    if m.family == "encoder_decoder":
        n_dec = m.n_decoder_layers or m.n_layers
        return m.n_layers + n_dec, f"model.n_layers + decoder layers ({m.n_layers} + {n_dec})"
    return m.n_layers, "model.n_layers"


def pipeline_stages_per_rank(p: ParallelConfig) -> int:
    """Virtual stages per pipeline rank (``pp_stages_per_rank``, else by schedule)."""
    if p.pp_stages_per_rank:
        return p.pp_stages_per_rank
    return 2 if p.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
