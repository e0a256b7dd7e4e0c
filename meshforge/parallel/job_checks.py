"""One validation of a job against its world size, before any process group exists: :func:`check_job`.

The trainer (and the planner, for each layout it proposes) calls it once, after
:func:`~meshforge.parallel.mesh.resolve_degrees`; it runs every check that needs the degrees:
context, expert, tensor and pipeline parallelism against the model and batch, the DeepSpeed
backend's limits, and the pipeline plan (:func:`~meshforge.parallel.pipeline.plan_pipeline`),
which it returns so that nothing plans the pipeline twice. The checks that need no world size
are :func:`meshforge.config.validate`.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, JobConfig, ModelConfig, micro_batch_size
from ..kernels.apply import check_fused_kernels
from ..models import families_with, family_spec
from .deepspeed_engine import check_deepspeed
from .fault_tolerance import check_fault_tolerance
from .mesh import Degrees
from .pipeline import PipelinePlan, plan_pipeline, stage_takes_mesh


def check_job(cfg: JobConfig, d: Degrees, device_type: str | None = None) -> PipelinePlan | None:
    """Every relation between the degrees and the model, batch and backend, named with its numbers
    (ConfigError); with ``parallel.pp > 1`` the pipeline plan, which checks the split and microbatches.

    ``device_type`` (when known: the job runs here, with this torch; the planner passes none) also
    checks the pipeline schedule against ``parallel.compile`` and pp x tp against this torch's pipelining.
    """
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if d.cp > 1:
        check_context_parallel(cfg, d)
    if d.ep > 1:  # expert parallel borrows its ranks from dp_shard x cp
        if not m.moe_experts:
            raise ConfigError(
                f"parallel.ep = {d.ep}: expert parallelism needs an MoE model "
                "(model.moe_experts > 0); use parallel.ep = 1 for a dense model"
            )
        if (d.dp_shard * d.cp) % d.ep:
            raise ConfigError(
                f"parallel.ep = {d.ep} must divide dp_shard*cp = {d.dp_shard}*{d.cp} = "
                f"{d.dp_shard * d.cp} (expert parallel borrows its ranks from them)"
            )
        if d.cp > 1 and d.cp % d.ep and (d.ep % d.cp or d.dp_shard % (d.ep // d.cp)):
            raise ConfigError(
                f"parallel.ep = {d.ep} with parallel.cp = {d.cp}: an ep group is the innermost ranks of "
                f"dp_shard x cp = {d.dp_shard} x {d.cp}, so ep must divide cp or be cp times a divisor "
                f"of dp_shard"
            )
        if m.moe_experts % d.ep:
            raise ConfigError(f"model.moe_experts = {m.moe_experts} does not divide by parallel.ep = {d.ep}")
        if p.dp_backend != "fsdp2":
            raise ConfigError(f"parallel.ep = {d.ep} needs parallel.dp_backend = 'fsdp2' (got {p.dp_backend!r})")
    if m.moe_experts and not family_spec(m.family).supports_moe_parallel:
        check_moe_family(m, d)
    if d.tp > 1:
        for name, value in (
            ("model.n_heads", m.n_heads),
            ("model.n_kv_heads", m.kv_heads),
            ("FFN width (model.ffn_dim)", m.hidden_dim),
            ("model.vocab_size", m.vocab_size),
        ):
            if value % d.tp:
                raise ConfigError(f"{name} = {value} does not divide by parallel.tp = {d.tp}")
    if d.pp > 1 and d.tp > 1 and device_type is not None and not stage_takes_mesh():
        raise ConfigError(
            f"parallel.pp = {d.pp} with parallel.tp = {d.tp}: the stages hand each other DTensor "
            f"activations (TP + SP's residual stream), which torch {torch.__version__.split('+')[0]}'s "
            "pipelining cannot send (its PipelineStage takes no get_mesh; torch 2.13's does); use "
            "parallel.pp or parallel.tp alone here, or a newer torch"
        )
    if (
        d.pp > 1
        and p.pp_schedule == "zero_bubble"
        and p.dp_backend == "fsdp2"
        and d.dp * d.cp > 1
        and p.fsdp_reshard_after_forward
    ):
        raise ConfigError(
            f"parallel.pp_schedule = 'zero_bubble' with FSDP2 data parallel (dp_replicate x dp_shard x "
            f"cp = {d.dp_replicate} x {d.dp_shard} x {d.cp}) needs parallel.fsdp_reshard_after_forward "
            "= false: torch's split backward takes a stage's weights from its parameter list before "
            "the input-gradient pass, where an FSDP unit resharded after forward lists its sharded "
            "parameters, so those weights would get no gradient (torch "
            f"{torch.__version__.split('+')[0]}); or use parallel.pp_schedule = 'interleaved_1f1b' "
            "(the same stages per rank)"
        )
    if d.pp > 1 and p.pp_schedule == "zero_bubble" and p.activation_checkpointing != "none":
        raise ConfigError(
            f"parallel.pp_schedule = 'zero_bubble' with parallel.activation_checkpointing = "
            f"{p.activation_checkpointing!r}: torch's split backward recomputes a checkpointed block "
            "twice (in the input-gradient pass, then in the weight-gradient pass, each its own autograd "
            "call), and the composable checkpoint's recompute context can be entered only once (torch "
            f"{torch.__version__.split('+')[0]} fails in the weight pass); use "
            "activation_checkpointing = 'none' or pp_schedule = 'interleaved_1f1b'"
        )
    if cfg.data.document_mask and d.tp > 1:
        raise ConfigError(
            f"data.document_mask does not work with tensor parallelism yet (parallel.tp = {d.tp}); "
            "use tp = 1 or turn the mask off"
        )
    if p.dp_backend == "deepspeed":
        check_deepspeed(cfg, d)
    check_fused_kernels(cfg, device_type)
    check_fault_tolerance(cfg, d, device_type)
    micro_batch_size(t, d.dp)  # the global batch splits into micro batches on d.dp ranks
    return plan_pipeline(cfg, d, device_type) if d.pp > 1 else None


def check_moe_family(m: ModelConfig, d: Degrees) -> None:
    """Tensor and pipeline parallelism split MoE layers only of the families whose spec says ``supports_moe_parallel``."""
    families = families_with("supports_moe_parallel")
    if d.tp > 1:
        raise ConfigError(
            f"parallel.tp = {d.tp}: the tensor-parallel plans cover MoE feed-forwards in the {families} "
            f"family only, not in an {m.family} (model.moe_experts = {m.moe_experts}); "
            "use parallel.tp = 1"
        )
    if d.pp > 1:
        raise ConfigError(
            f"parallel.pp = {d.pp}: the pipeline split covers MoE layers in the {families} family only, "
            f"not in an {m.family} (model.moe_experts = {m.moe_experts}); use parallel.pp = 1"
        )


def check_context_parallel(cfg: JobConfig, d: Degrees) -> None:
    """What ``parallel.cp > 1`` needs: a family that supports it (a decoder), a sequence in 2*cp chunks,
    heads for all-to-all, dropless routing in an MoE model."""
    m, p = cfg.model, cfg.parallel
    if not family_spec(m.family).supports_context_parallel:
        raise ConfigError(
            f"parallel.cp = {d.cp}: context parallelism covers the {families_with('supports_context_parallel')} "
            "family only, not "
            f"model.family = {m.family!r}; use parallel.cp = 1"
        )
    if m.moe_experts and m.moe_capacity_factor:
        raise ConfigError(
            f"parallel.cp = {d.cp} with capacity routing (model.moe_capacity_factor = "
            f"{m.moe_capacity_factor}): each expert's capacity is ranked over the whole micro-batch, "
            "which context parallel splits over ranks; use dropless routing (moe_capacity_factor = 0) "
            "or parallel.cp = 1"
        )
    if p.cp_method == "ring" and p.activation_checkpointing == "selective":  # measured: bench_plan_memory cp2
        raise ConfigError(
            f"parallel.cp = {d.cp} with cp_method = 'ring' and activation_checkpointing = 'selective' "
            "fails in backward (the ring mutates a tensor selective checkpointing cached); use "
            "cp_method = 'alltoall' or activation_checkpointing = 'full' or 'none'"
        )
    seq = cfg.data.seq_len
    if seq % (2 * d.cp):
        raise ConfigError(
            f"data.seq_len = {seq} does not divide into 2*cp = {2 * d.cp} zigzag chunks "
            f"(parallel.cp = {d.cp}); use a multiple of {2 * d.cp}"
        )
    if p.cp_method == "alltoall":
        for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
            if value % (d.tp * d.cp):
                raise ConfigError(
                    f"parallel.cp_method = 'alltoall' needs {name} = {value} divisible by tp*cp = "
                    f"{d.tp}*{d.cp} = {d.tp * d.cp} (each cp rank takes a share of each tp rank's "
                    "heads); use cp_method = 'ring'"
                )


def use_fused_loss(cfg: JobConfig, degrees: Degrees, device_type: str) -> bool:
    """Resolve ``train.fused_loss``; ``on`` in a layout it does not cover is a ConfigError naming why."""
    setting = cfg.train.fused_loss
    if setting == "off":
        return False
    unsupported = [
        why
        for bad, why in (
            (
                not family_spec(cfg.model.family).supports_fused_loss,
                f"model.family = {cfg.model.family!r} (decoders only)",
            ),
            (
                degrees.tp > 1 and not cfg.parallel.loss_parallel,
                f"parallel.tp = {degrees.tp} and parallel.loss_parallel = false (the fused loss is vocab-parallel)",
            ),
            (
                degrees.world_size > 1 and cfg.parallel.dp_backend == "deepspeed",
                "parallel.dp_backend = 'deepspeed' (its ZeRO sharding of the output weight is not covered)",
            ),
        )
        if bad
    ]
    if setting == "on" and unsupported:
        raise ConfigError(
            f"train.fused_loss = 'on' is not supported with {'; '.join(unsupported)}; "
            "use train.fused_loss = 'auto' or 'off'"
        )
    # auto stays off until bench/ measures this pure-PyTorch version faster than the plain loss on a GPU
    # (it saves memory for certain; its speed against one large cuBLAS matmul is not measured yet)
    return not unsupported and setting == "on"
