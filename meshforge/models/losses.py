"""Language-model losses: token cross-entropy plus the output z-loss.

    ce     = mean_t [ logsumexp(z_t) - z_t[y_t] ]
    z_loss = coef * mean_t [ logsumexp(z_t)^2 ]          (PaLM; small-scale proxies)

Both are computed in fp32 from one logsumexp. Targets equal to ``ignore_index`` are
left out of both means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class LossParts:
    total: torch.Tensor
    """The loss to differentiate: ce + z_loss."""
    ce: torch.Tensor
    """Mean token cross-entropy (the reported ``loss``)."""
    z_loss: torch.Tensor
    """Weighted z-loss term (0 when the coefficient is 0)."""


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_coef: float = 0.0) -> LossParts:
    """logits [B, T, V], targets [B, T] -> mean losses over the non-ignored tokens."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    mask = targets != IGNORE_INDEX
    safe_targets = torch.where(mask, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
    count = mask.sum().clamp(min=1)
    ce = ((lse - target_logit) * mask).sum() / count
    if z_loss_coef:
        z = z_loss_coef * (lse.square() * mask).sum() / count
    else:
        z = torch.zeros((), device=logits.device)
    return LossParts(ce + z, ce, z)
