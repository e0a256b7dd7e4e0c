"""The LM loss on vocab-sharded logits, without ever gathering the full logits.

Same math and result type as :func:`meshforge.models.losses.lm_loss`::

    lse_t  = m_t + log sum_r sum_{v in shard r} exp(z_tv - m_t),   m_t = max_r max_v z_tv
    ce     = mean_t [ lse_t - z_t[y_t] ]
    z_loss = coef * mean_t [ lse_t^2 ]

Each tp rank holds logits ``[B, T, V/tp]`` (a ``Shard(-1)`` DTensor from the output
projection). The forward all-reduces, over the tp group, the per-token max, the sum of
exponentials and the target logit (taken from whichever rank owns the target id): three
``[B*T]`` all-reduces instead of an all-gather of ``[B, T, V]``. The backward needs no
communication: d lse / d z = softmax (from the saved global lse), d z[y] / d z = one-hot on
the owning rank. Both ce and z-loss are built from the same differentiable ``lse``, so the
z-loss gradient is exact too.

:func:`fused_output_loss` is the fused linear + cross-entropy
(:mod:`meshforge.kernels.fused_loss`) in the layouts :func:`meshforge.parallel.parallelize`
produces, from the final hidden states and the module that holds the output weight:

- FSDP2: that module is the FSDP root (or a pipeline stage's root), which may have resharded
  its parameters after the forward; ``FSDPModule.unshard()`` gathers them again (a no-op when
  they are still gathered). The gradient lands on the gathered parameter, as in a forward,
  so FSDP's post-backward reduce-scatters it as usual.
- TP with loss parallel: the weight is a ``Shard(0)`` DTensor (vocab rows) and the hidden
  states a sequence-sharded DTensor. The hidden states are all-gathered once; each rank runs
  the chunked loss on its vocab slice with the log-sum-exp and the target logit reduced over
  tp per chunk; the gradient of the hidden states is a partial sum over tp, reduce-scattered
  back onto the sequence shard by DTensor. No ``[tokens, vocab]`` tensor, sharded or not.
- Pipeline: the last stage returns its hidden states (``return_hidden``) and the schedule's
  loss function is this one, bound to that stage.
- Context parallel: the tokens are this rank's already; the mean over them is the plain
  loss's, as without the fusion.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..config import JobConfig
from ..kernels.fused_loss import fused_linear_lm_loss
from ..models.losses import IGNORE_INDEX, LossParts, lm_loss


class _VocabParallelLSE(torch.autograd.Function):
    """(local logits [N, V/tp], targets [N]) -> (lse [N], target logit [N]), both global over the vocab."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group):
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max[:, None]
        sum_exp = shifted.exp().sum(dim=-1)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        lse = local_max + sum_exp.log()

        local_v = logits.shape[-1]
        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < local_v)
        local_t = torch.where(owned, local_t, 0)
        target_logit = logits.gather(1, local_t[:, None]).squeeze(1) * owned
        dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)

        ctx.save_for_backward(logits, lse, local_t, owned)
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor, grad_target: torch.Tensor):
        logits, lse, local_t, owned = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_().mul_(grad_lse[:, None])
        grad.scatter_add_(1, local_t[:, None], (grad_target * owned)[:, None])
        return grad, None, None, None


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_coef: float = 0.0) -> LossParts:
    """logits: a DTensor ``[B, T, V]`` sharded on the vocab dim over one mesh dim; targets ``[B, T]``.

    A plain tensor falls back to :func:`lm_loss`. The returned parts are plain (replicated)
    tensors, identical on every rank of the tp group.
    """
    if not isinstance(logits, DTensor):
        return lm_loss(logits, targets, z_loss_coef)
    vocab_dim = logits.ndim - 1
    mesh = logits.device_mesh
    shard_dims = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim in (-1, vocab_dim)]
    others = [p for i, p in enumerate(logits.placements) if i not in shard_dims and not p.is_replicate()]
    if len(shard_dims) != 1 or others:
        raise ValueError(
            f"vocab_parallel_lm_loss needs logits sharded on the vocab dim over one mesh dim, "
            f"got placements {logits.placements}"
        )
    mesh_dim = shard_dims[0]
    local = logits.to_local()
    vocab = logits.shape[-1]
    tp = mesh.size(mesh_dim)
    if vocab % tp or local.shape[-1] != vocab // tp:
        raise ValueError(f"vocab size {vocab} must shard evenly over {tp} ranks (local shard {local.shape[-1]})")
    vocab_start = mesh.get_local_rank(mesh_dim) * (vocab // tp)

    local = local.float().flatten(0, -2)
    targets = targets.flatten()
    mask = targets != IGNORE_INDEX
    safe_targets = torch.where(mask, targets, 0)
    lse, target_logit = _VocabParallelLSE.apply(local, safe_targets, vocab_start, mesh.get_group(mesh_dim))
    count = mask.sum().clamp(min=1)
    ce = ((lse - target_logit) * mask).sum() / count
    if z_loss_coef:
        z = z_loss_coef * (lse.square() * mask).sum() / count
    else:
        z = torch.zeros((), device=local.device)
    return LossParts(ce + z, ce, z)


def fused_output_loss(
    module: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    z_loss_coef: float = 0.0,
    chunk_size: int | None = None,
) -> LossParts:
    """The LM loss of ``module`` (a decoder, or the last stage of one, after parallelize) computed from its
    final hidden states ``module(..., return_hidden=True)`` and its output weight in chunks, never
    materialising the logits; equal to the plain loss of the same layout (see the module docstring)."""
    if not isinstance(module, FSDPModule):
        return _fused_output_loss(module, hidden, targets, z_loss_coef, chunk_size)
    module.unshard()  # the root's parameters, gathered (again) for the loss; reduce-scattered after backward
    parts = _fused_output_loss(module, hidden, targets, z_loss_coef, chunk_size)
    if not torch.is_grad_enabled():
        module.reshard()  # evaluation: no backward will reshard them
    return parts


def _fused_output_loss(module, hidden, targets, z_loss_coef, chunk_size) -> LossParts:
    weight = module.output.weight
    if not isinstance(weight, DTensor):
        return fused_linear_lm_loss(hidden, weight, targets, z_loss_coef, module.logit_scale, chunk_size)
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),) or not isinstance(hidden, DTensor):
        raise ValueError(
            f"the fused loss needs the output weight vocab-sharded on a 1-D tp mesh and DTensor hidden "
            f"states, got weight placements {weight.placements} on a {mesh.ndim}-D mesh"
        )
    vocab, tp = weight.shape[0], mesh.size()
    if vocab % tp:
        raise ValueError(f"vocab size {vocab} must shard evenly over {tp} ranks")
    # every token on every tp rank; the gradient that comes back is this rank's partial sum
    full = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    return fused_linear_lm_loss(
        full,
        weight.to_local(),
        targets,
        z_loss_coef,
        module.logit_scale,
        chunk_size,
        group=mesh.get_group(),
        vocab_start=mesh.get_local_rank() * (vocab // tp),
    )


def uses_loss_parallel(cfg: JobConfig, tp: int) -> bool:
    return tp > 1 and cfg.parallel.loss_parallel


def lm_loss_fn(cfg: JobConfig, tp: int) -> Callable[[torch.Tensor, torch.Tensor, float], LossParts]:
    """The loss for this job: vocab-parallel with tp > 1 and ``parallel.loss_parallel``, else :func:`lm_loss`."""
    return vocab_parallel_lm_loss if uses_loss_parallel(cfg, tp) else lm_loss


def pipeline_loss_fn(model: nn.Module, cfg: JobConfig, tp: int, fused: bool) -> tuple[Callable, dict]:
    """(the pipeline schedule's loss function, keyword inputs of every stage) for a PipelineModel: with
    ``fused`` the last stage returns its hidden states and the loss applies its output weight."""
    if not fused:
        return lm_loss_fn(cfg, tp), {}
    last = model.parts[-1]  # the stage the loss runs on, when this rank holds the last one
    return partial(fused_output_loss, last), {"return_hidden": True}


__all__ = ["fused_output_loss", "lm_loss_fn", "pipeline_loss_fn", "uses_loss_parallel", "vocab_parallel_lm_loss"]
