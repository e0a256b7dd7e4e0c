"""Parallelism: build the named device mesh and apply each parallelism to a built model.

Order of application (docs/architecture.md): pipeline split -> float8 -> TP/SP -> fused kernels -> expert sharding ->
context-parallel attention -> activation checkpointing -> compile -> FSDP2. Each step is one function in its own file;
``parallelize`` only decides which steps run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import JobConfig
from ..kernels.apply import apply_fused_kernels, fused_kernels_backend
from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile, compile_enabled
from .context_parallel import apply_context_parallel
from .data_parallel import apply_fsdp
from .expert_parallel import apply_ep, apply_expert_fsdp, build_ep_mesh, expert_dp_mesh
from .float8 import apply_float8, float8_fsdp_all_gather, float8_tp
from .group_timeout import group_timeout, mesh_group_options, mesh_overrides
from .mesh import MESH_DIMS, Degrees, resolve_degrees
from .tensor_parallel import apply_tp

if TYPE_CHECKING:
    from .pipeline import PipelinePlan


def build_mesh(d: Degrees, device: torch.device) -> DeviceMesh | None:
    """The job's mesh with dims ``pp, dp_replicate, dp_shard, cp, tp``; None for one process."""
    if d.world_size == 1:
        return None
    if d.ep > 1:  # dp_shard x cp split into an outer part and ep, re-flattened under the usual names
        return build_ep_mesh(d, device.type)
    shape = tuple(getattr(d, name) for name in MESH_DIMS)
    # each dim's groups time out as the default group does (train.collective_timeout_s), not in torch's 30 min
    mesh = init_device_mesh(
        device.type, shape, mesh_dim_names=MESH_DIMS, backend_override=mesh_overrides(shape, MESH_DIMS)
    )
    if d.cp > 1:  # FSDP shards parameters over dp_shard x cp
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp", backend_override=mesh_group_options(group_timeout()))
    return mesh


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None, d: Degrees, cfg: JobConfig, pipeline_plan: PipelinePlan | None = None
) -> nn.Module:
    """Apply the job's parallelisms to ``model``; with ``parallel.pp > 1`` split it by ``pipeline_plan``
    (what :func:`~meshforge.parallel.job_checks.check_job` returned)."""
    if mesh is not None and d.pp > 1:
        if pipeline_plan is None:
            raise ValueError("parallelize with parallel.pp > 1 needs the pipeline plan that check_job returns")
        # Pipeline split first; every later step then runs on each stage module of this rank
        # (returns a PipelineModel: this rank's stages under the original parameter names).
        from dataclasses import replace

        from .pipeline import apply_pipeline

        stage_degrees = replace(d, pp=1)
        return apply_pipeline(model, mesh, pipeline_plan, lambda stage: parallelize(stage, mesh, stage_degrees, cfg))
    p = cfg.parallel
    device_type = next(model.parameters()).device.type
    fsdp = mesh is not None and d.dp * d.cp > 1 and p.dp_backend == "fsdp2"
    if cfg.train.float8 != "off":  # before TP, compile and FSDP2 (torchao's order)
        model = apply_float8(model, cfg.train.float8, fsdp_float8_all_gather=float8_fsdp_all_gather(cfg, fsdp))
    if mesh is not None and d.tp > 1:
        model = apply_tp(model, mesh["tp"], p, float8=float8_tp(cfg))  # params become DTensors on the tp sub-mesh
    backend = fused_kernels_backend(cfg, device_type)
    if backend is not None:  # RMSNorm / RoPE / SwiGLU by Triton kernels: a module swap (not the TP norms)
        model = apply_fused_kernels(model, backend)
    if mesh is not None and d.ep > 1:
        model = apply_ep(model, mesh["ep"])  # expert weights become Shard(0) DTensors on the ep sub-mesh
    if mesh is not None and d.cp > 1:
        model = apply_context_parallel(model, mesh["cp"], p.cp_method)  # attention cores over the cp ranks
    model = apply_activation_checkpointing(model, p.activation_checkpointing)
    if compile_enabled(p.compile, device_type) and p.compile_scope == "blocks":  # "model": the step compiles its loss
        model = apply_compile(model, fullgraph=d.cp == 1)
    if fsdp:  # "deepspeed": the trainer wraps it in an engine
        shard = "dp_shard_cp" if d.cp > 1 else "dp_shard"
        dp_mesh = mesh["dp_replicate", shard] if d.dp_replicate > 1 else mesh[shard]
        if d.ep > 1:  # experts first: FSDP over the dp ranks outside their ep group; the blocks take the rest
            apply_expert_fsdp(
                model,
                expert_dp_mesh(mesh, d),
                p.fsdp_reshard_after_forward,
                param_dtype(p.param_dtype, mesh),
                p.fsdp_cpu_offload,
            )
        model = apply_fsdp(
            model, dp_mesh, p.fsdp_reshard_after_forward, param_dtype(p.param_dtype, mesh), p.fsdp_cpu_offload
        )
    return model


def param_dtype(name: str, mesh: DeviceMesh) -> torch.dtype | None:
    """FSDP2 compute dtype: bf16 on GPU for ``auto``; None keeps the params' own fp32."""
    if name == "auto":
        name = "bf16" if mesh.device_type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else None


__all__ = ["build_mesh", "parallelize", "resolve_degrees", "Degrees"]
