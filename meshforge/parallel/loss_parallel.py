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
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..config import JobConfig
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
    shard_dims = [i for i, p in enumerate(logits.placements)
                  if isinstance(p, Shard) and p.dim in (-1, vocab_dim)]
    others = [p for i, p in enumerate(logits.placements) if i not in shard_dims and not p.is_replicate()]
    if len(shard_dims) != 1 or others:
        raise ValueError(f"vocab_parallel_lm_loss needs logits sharded on the vocab dim over one mesh dim, "
                         f"got placements {logits.placements}")
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


def uses_loss_parallel(cfg: JobConfig, tp: int) -> bool:
    return tp > 1 and cfg.parallel.loss_parallel


def lm_loss_fn(cfg: JobConfig, tp: int) -> Callable[[torch.Tensor, torch.Tensor, float], LossParts]:
    """The loss for this job: vocab-parallel with tp > 1 and ``parallel.loss_parallel``, else :func:`lm_loss`."""
    return vocab_parallel_lm_loss if uses_loss_parallel(cfg, tp) else lm_loss


__all__ = ["lm_loss_fn", "uses_loss_parallel", "vocab_parallel_lm_loss"]
