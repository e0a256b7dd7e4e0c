"""``train.fused_kernels``: which code computes RMSNorm, RoPE and SwiGLU, and the swap that puts it in.

The models compute these in plain PyTorch (``models/layers.py``). This module swaps, in a
built model, each ``RMSNorm`` for a subclass computed by a Triton kernel (same parameter, same
name), each decoder ``Attention.rope`` and each SwiGLU ``FeedForward.gate`` for the fused
function: the model code itself is unchanged. ``parallelize`` runs the swap after tensor
parallel and before compile and FSDP2.

Backends: ``triton``, our kernels (``rmsnorm.py``, ``rope.py``, ``swiglu.py``; the tested
default, CUDA, or a CPU under ``TRITON_INTERPRET=1``); ``liger``, liger-kernel's (CUDA only).
How they compose:
- tensor parallel: RoPE and SwiGLU run on the plain local tensors between the colwise and
  rowwise projections (this rank's heads / FFN columns) and are swapped; a norm whose weight
  tensor parallel made a DTensor (every sequence-parallel norm, and QK-norm) keeps PyTorch's
  code, as the kernels take plain tensors (DTensor propagation stays with PyTorch's ops).
- FSDP2 / DeepSpeed / pipeline / expert / context parallel: the swapped modules see plain
  local tensors (FSDP2 unshards parameters before the forward; the pipeline swaps per stage;
  experts are not touched; context parallel hands RoPE the tables of this rank's positions).
- ``torch.compile``: our kernels are ``torch.library`` custom ops with registered fake
  (shape) functions and autograd formulas, so a compiled block traces them whole
  (``fullgraph=True``) as opaque calls, which Inductor does not fuse with their neighbours.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ConfigError, JobConfig
from ..models.layers import Attention, FeedForward, RMSNorm, swiglu

PACKAGES = {"triton": "triton", "liger": "liger_kernel"}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_fused_kernels(cfg: JobConfig, device_type: str | None = None) -> None:
    """ConfigError for a ``train.fused_kernels`` backend this job cannot run: a missing package, or a
    device it does not run on; ``device_type`` None (the planner's layouts) checks nothing."""
    backend = cfg.train.fused_kernels
    if backend in ("auto", "off") or device_type in (None, "meta"):
        return
    package = PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.fused_kernels = {backend!r} needs the {package} package "
            f"(pip install -e \".[gpu]\"); use 'off' without it"
        )
    if device_type != "cuda" and not (backend == "triton" and interpreting()):
        only = (
            "runs on CUDA only" if backend == "liger" else "runs on CUDA, or on a CPU under TRITON_INTERPRET=1 (tests)"
        )
        raise ConfigError(
            f"train.fused_kernels = {backend!r} {only}, and this job runs on {device_type}; "
            "use train.fused_kernels = 'off'"
        )


def fused_kernels_backend(cfg: JobConfig, device_type: str) -> str | None:
    """The backend to swap in, or None. ``auto`` is off until ``bench/bench_kernels.py`` has measured
    the kernels faster than the compiled PyTorch code on a GPU (the same rule as ``train.fused_loss``)."""
    check_fused_kernels(cfg, device_type)
    backend = cfg.train.fused_kernels
    return None if backend in ("auto", "off") or device_type == "meta" else backend


def apply_fused_kernels(model: nn.Module, backend: str) -> nn.Module:
    """Swap RMSNorm modules, decoder RoPE and SwiGLU gates of ``model`` for ``backend``'s kernels, in place.

    Parameters and module names are unchanged (checkpoints see the same model). Norms whose weight
    is a DTensor (tensor parallel's) are left alone.
    """
    if backend == "triton":
        from .rmsnorm import TritonRMSNorm as FusedNorm
        from .rope import rope_qk
        from .swiglu import swiglu as fused_swiglu
    elif backend == "liger":
        from .liger import LigerRMSNorm as FusedNorm
        from .liger import rope_qk
        from .liger import swiglu as fused_swiglu
    else:
        raise ValueError(f"unknown fused kernel backend {backend!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm and not isinstance(child.weight, DTensor):
                setattr(parent, name, _swap_norm(child, FusedNorm))
        if isinstance(parent, Attention):
            parent.rope = rope_qk
        if isinstance(parent, FeedForward) and parent.gate is swiglu:  # gelu gates (T5) stay PyTorch's
            parent.gate = fused_swiglu
    return model


def _swap_norm(norm: RMSNorm, cls: type[RMSNorm]) -> RMSNorm:
    with torch.device("meta"):
        fused = cls(norm.weight.shape[0], norm.eps)
    fused.weight = norm.weight  # the same Parameter: optimizer, init and checkpoints are unaffected
    return fused
