"""Language-model losses: token cross-entropy plus the output z-loss.

    ce     = mean_t [ logsumexp(z_t) - z_t[y_t] ]
    z_loss = coef * mean_t [ logsumexp(z_t)^2 ]          (PaLM; small-scale proxies)

Both in fp32; targets equal to ``ignore_index`` are left out of both means (a batch with
none left gives 0, not 0/0). Without z-loss the cross-entropy is PyTorch's fused
``F.cross_entropy`` (one log-softmax pass, its backward in one more; on a CPU over cache-sized
row blocks, :data:`CPU_CHUNK_BYTES`). With z-loss both terms
come from one log-sum-exp per token (:class:`_LogSumExpAndTarget`: the log-sum-exp and the
target logit in forward; in backward one ``softmax * weight`` pass over the logits, written in
place, plus the target's scatter), so the z-loss adds only a reduction over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CPU_CHUNK_BYTES = 1 << 20
"""On a CPU the cross-entropy runs over row blocks of about this many bytes of fp32 logits (when there
are more than four blocks): each block's log-softmax and its backward stay in cache (2x faster at
8192 x 2048 logits, one thread; ``python bench/bench_peers.py``)."""


@dataclass
class LossParts:
    total: torch.Tensor
    """The loss to differentiate: ce + z_loss."""
    ce: torch.Tensor
    """Mean token cross-entropy (the reported ``loss``)."""
    z_loss: torch.Tensor
    """Weighted z-loss term (0 when the coefficient is 0)."""


class _LogSumExpAndTarget(torch.autograd.Function):
    """(logits [N, V], targets [N]) -> (lse [N], z[y] [N]); d/dz = softmax * g_lse + onehot(y) * g_target."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, targets)
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor, grad_target: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_().mul_(grad_lse[:, None])
        grad.scatter_add_(1, targets[:, None], grad_target[:, None])
        return grad, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_coef: float = 0.0) -> LossParts:
    """logits [B, T, V], targets [B, T] -> mean losses over the non-ignored tokens."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    mask = targets != IGNORE_INDEX
    count = mask.sum().clamp(min=1)
    if not z_loss_coef:
        rows = max(1, CPU_CHUNK_BYTES // (4 * logits.shape[-1]))
        if logits.device.type != "cpu" or logits.shape[0] <= 4 * rows:
            ce_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            ce_sum = sum(
                F.cross_entropy(x, y, ignore_index=IGNORE_INDEX, reduction="sum")
                for x, y in zip(logits.split(rows), targets.split(rows))
            )
        ce = ce_sum / count
        return LossParts(ce, ce, torch.zeros((), device=logits.device))
    lse, target_logit = _LogSumExpAndTarget.apply(logits, torch.where(mask, targets, 0))
    ce = ((lse - target_logit) * mask).sum() / count
    z = z_loss_coef * (lse.square() * mask).sum() / count
    return LossParts(ce + z, ce, z)
