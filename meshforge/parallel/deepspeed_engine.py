"""Data parallelism with the DeepSpeed engine: ZeRO-1/2/3 with optional CPU/NVMe offload.

The alternative to FSDP2 (``parallel.dp_backend = "deepspeed"``), for users who want
DeepSpeed's ZeRO stages and ZeRO-Offload / ZeRO-Infinity. Only data parallelism
(tp = pp = dp_replicate = 1), with or without context parallel (``parallel.cp``: the cp
ranks are data-parallel ranks to DeepSpeed, see :func:`deepspeed_config`). Our own pieces
stay ours: the AdamW param groups, the ``LambdaLR`` schedule (stepped by the trainer, never a DeepSpeed scheduler), the
micro-batching (DeepSpeed's gradient accumulation divides each micro-batch loss by the
number of micro-batches, so the gradient is that of the mean loss over the global batch)
and the checkpoint directory flow (the engine writes its files into our ``step_N.tmp``).

- :func:`check_deepspeed` validates the config before any process group exists.
- :func:`deepspeed_config` turns the job config into DeepSpeed's config dict.
- :func:`build_deepspeed_engine` wraps a built model and our optimizer in an engine.
- :func:`full_model_state_dict` gives the full fp32 weights (every rank) for the
  consolidated copy each checkpoint also carries, so ``meshforge generate``, conversion
  and the parity tests read a DeepSpeed checkpoint like any other.

On a CPU-only machine DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``, set
here when ``train.device`` is the CPU) over our gloo process group, in fp32. Its
shared-memory all-reduce op (used only by inference) is switched off so that no C++
extension is JIT-built at start-up; DeepSpeedCPUAdam, needed for optimizer offload, is
JIT-built once on first use (a few minutes, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, JobConfig, micro_batch_size
from .mesh import Degrees

CHECKPOINT_TAG = "deepspeed"
"""Sub-directory of a meshforge checkpoint that holds the engine's own files."""


def check_deepspeed(cfg: JobConfig, d: Degrees) -> None:
    """Everything about a DeepSpeed job that can be wrong, checked before any process group."""
    p = cfg.parallel
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "parallel.dp_backend = 'deepspeed' but DeepSpeed is not installed; install it with "
            "`DS_BUILD_OPS=0 pip install deepspeed` (or `pip install -e '.[test]'`), or use parallel.dp_backend = 'fsdp2'"
        )
    if d.tp > 1 or d.pp > 1 or d.dp_replicate > 1 or d.ep > 1:
        raise ConfigError(
            "parallel.dp_backend = 'deepspeed' supports data parallelism only (tp = pp = dp_replicate = ep = 1), got "
            f"tp = {d.tp}, pp = {d.pp}, dp_replicate = {d.dp_replicate}, ep = {d.ep}"
        )
    if p.offload_param != "none" and p.zero_stage != 3:
        raise ConfigError(
            f"parallel.offload_param = '{p.offload_param}' needs ZeRO stage 3 (parallel.zero_stage = 3), "
            f"got zero_stage = {p.zero_stage}"
        )
    if p.offload_optimizer == "nvme" and p.zero_stage != 3:
        raise ConfigError(
            f"parallel.offload_optimizer = 'nvme' needs ZeRO stage 3 (parallel.zero_stage = 3), got zero_stage = "
            f"{p.zero_stage}; stages 1 and 2 can offload the optimizer to 'cpu'"
        )
    if "nvme" in (p.offload_optimizer, p.offload_param):
        if not p.nvme_path:
            raise ConfigError(
                "NVMe offload (parallel.offload_optimizer/offload_param = 'nvme') needs "
                "parallel.nvme_path: a directory on a fast local disk"
            )
        if not Path(p.nvme_path).is_dir():
            raise ConfigError(f"parallel.nvme_path = {p.nvme_path!r} is not an existing directory")


def _use_bf16(cfg: JobConfig, device: torch.device) -> bool:
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return name == "bf16"


def _offload(device: str, nvme_path: str, pin: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def deepspeed_config(cfg: JobConfig, dp: int, device: torch.device, cp: int = 1) -> dict[str, Any]:
    """DeepSpeed's config dict for this job (no scheduler: the trainer steps our LambdaLR).

    ``cp`` (context parallel): DeepSpeed's data-parallel group is every rank, the cp ranks of a
    sample included, so it averages gradients over dp x cp (as FSDP2 over ``dp_shard_cp``
    does: each rank's loss is the mean over its share of the tokens) and its batch bookkeeping
    counts each sample once per cp rank."""
    p, t = cfg.parallel, cfg.train
    micro = micro_batch_size(t, dp)
    grad_accum = t.global_batch_size // (micro * dp)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    pin = device.type == "cuda"  # pinned host memory needs an accelerator
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, p.nvme_path, pin)
    if p.offload_param != "none":
        zero["offload_param"] = _offload(p.offload_param, p.nvme_path, pin)
    return {
        "train_batch_size": t.global_batch_size * cp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,  # 0 disables, as ours
        "zero_optimization": zero,
        "bf16": {"enabled": _use_bf16(cfg, device)},  # fp32 on the CPU
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _prepare_runtime(device: torch.device) -> None:
    """Accelerator from our device, quiet logs, no JIT-built shared-memory comm op (inference only)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed insists on LOCAL_RANK, which only torchrun sets: one process, SLURM and mpiexec jobs give
    # it here (our device is this rank's local device; on CPU the value selects nothing)
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0) if device.type == "cuda" else "0")
    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():  # one process: DeepSpeed still wants a (1-rank) process group
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=600))
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def _offload_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same param groups and AdamW hyper-parameters on DeepSpeed's CPU Adam kernel (JIT-built)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    groups = [
        {k: v for k, v in g.items() if k in ("params", "weight_decay", "lr", "betas", "eps")}
        for g in optimizer.param_groups
    ]
    return DeepSpeedCPUAdam(
        groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], adamw_mode=True
    )


def build_deepspeed_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig, dp: int, device: torch.device
):
    """Wrap ``model`` and our AdamW in a DeepSpeed engine -> ``(engine, base optimizer)``.

    The base optimizer is the torch optimizer whose param groups DeepSpeed steps (ours, or
    DeepSpeedCPUAdam with the same groups when the optimizer state is offloaded): build
    the LR scheduler on it.
    """
    _prepare_runtime(device)
    import deepspeed

    if cfg.parallel.offload_optimizer != "none":
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(
                "DeepSpeed CPU Adam (parallel.offload_optimizer): loading its C++ kernel; the first use on a "
                "machine compiles it, which takes about 2 minutes (cached in ~/.cache/torch_extensions after)",
                flush=True,
            )
        optimizer = _offload_optimizer(optimizer)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cp = world // dp  # DeepSpeed runs data (x context) parallel only: the rest of the world is cp
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dp, device, cp)
    )
    return engine, optimizer


def full_model_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's state dict with full fp32 weights on every rank (collective).

    Parameters come from DeepSpeed's fp32 master copy (gathered from the ZeRO partitions),
    buffers from the module; tied parameters keep all their names, as ``state_dict()``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter):
            if id(t) not in full:
                value = safe_get_full_fp32_param(t)
                full[id(t)] = (t.detach() if value is None else value).detach().float().cpu().clone()
            out[name] = full[id(t)]
        else:
            out[name] = t.detach().cpu().clone()
    return out


def save_engine(engine, directory: Path) -> None:
    """The engine's own files (module, ZeRO-partitioned optimizer state) under ``directory``; collective."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)
