"""Fused output projection + LM loss, computed in token chunks.

For final hidden states h [N, D], output weight W [V, D] and a logit scale s
(1, or muP's 1/width_mult), with z = s * h W^T:

    ce     = mean_t [ lse(z_t) - z_t[y_t] ]
    z_loss = coef * mean_t [ lse(z_t)^2 ]

the same quantities as ``models.losses.lm_loss`` (means over non-ignored tokens).
The gradient of total = ce + z_loss with respect to one token's logits is

    dz_t = mask_t / count * ( softmax(z_t) * (1 + 2 coef lse(z_t)) - onehot(y_t) )

so the forward pass, one chunk of tokens at a time, computes the chunk's logits,
its loss sums, dh_chunk = s * dz W and accumulates dW += s * dz^T h_chunk. Only
dh [N, D] and dW [V, D] are kept for backward, which just scales them by the
incoming gradient: no [N, V] tensor exists, and at most one [chunk, V] at a time
(in fp32, plus its copy in the compute dtype when that is 16-bit).

Precision, as the plain path (output layer, then ``lm_loss``): the three matmuls per chunk
(z = h W^T, dh = dz W, dW += dz^T h) run in the compute dtype, which is autocast's dtype when
autocast is on for the device, else the operands' own dtype when that is bf16 / fp16 (FSDP2
with ``param_dtype = bf16``), else fp32. The chunk's logits are upcast to fp32 for the
softmax, log-sum-exp and z-loss; dz is cast back to the compute dtype for the two gradient
matmuls. dW is accumulated in fp32 over the chunks (a 16-bit product a block of vocab rows at
a time, so no [V, D] temporary) and returned in the weight's dtype; dh in the hidden states'.
With fp32 everywhere (the CPU default) every step is fp32, as it always was.

Only ``total`` carries a gradient; ``ce`` and ``z_loss`` are reported values.

Vocab-parallel (``group`` given: W is this rank's rows ``[V/tp, D]``, starting at vocab id
``vocab_start``, and h holds every token): per chunk the rank's logits slice gives a local
max and then a local sum of exponentials and the target logit (the rank that owns the target
id contributes it); one all-reduce MAX and one all-reduce SUM of ``[2, chunk]`` over ``group``
make lse and z[y] global. dz is then local to the slice, dW is this rank's rows exactly, and
dh = s * dz W_slice is a partial sum over the group, which the caller reduces
(:func:`meshforge.parallel.loss_parallel.fused_output_loss`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..models.layers import matmul_dtype
from ..models.losses import IGNORE_INDEX, LossParts


def default_chunk(n_tokens: int, dim: int, vocab: int) -> int:
    """Tokens per chunk such that one [chunk, V] block is about the size of h [N, D]: the
    transient then never exceeds the hidden states, while the matmuls stay large."""
    return max(1, -(-n_tokens * dim // vocab))


class _FusedLinearLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        z_loss_coef,
        logit_scale,
        chunk_size,
        grad_enabled,
        dtype,
        group=None,
        vocab_start=0,
    ):
        # grad mode is off inside forward: grad_enabled says whether the caller records a graph (not in eval)
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        no_autocast = nullcontext() if hidden.is_meta else torch.autocast(hidden.device.type, enabled=False)
        with no_autocast:  # the dtypes below are explicit (meta: shapes only, for bench_fused_loss)
            ce, z = _chunked_loss(
                hidden,
                weight.to(dtype),
                targets,
                z_loss_coef,
                logit_scale,
                chunk_size,
                grad_h,
                grad_w,
                group,
                vocab_start,
            )
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        ctx.mark_non_differentiable(ce, z)
        return ce + z, ce, z

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * grad_total.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None, None, None


def _chunked_loss(hidden, w, targets, z_loss_coef, logit_scale, chunk_size, grad_h, grad_w, group=None, vocab_start=0):
    """(ce, z_loss); fills grad_h [N, D] and accumulates grad_w [V, D] (fp32) unless they are None.
    The matmuls run in w's dtype (the compute dtype), everything else in fp32.
    With ``group``: w is the vocab slice from ``vocab_start``; lse and the target logit are reduced."""
    mask = targets != IGNORE_INDEX
    count = mask.sum().clamp(min=1).float()
    ce_sum = torch.zeros((), device=hidden.device)
    z_sum = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, m = hidden[rows].to(w.dtype), mask[rows]
        y = torch.where(m, targets[rows], 0)
        # [chunk, V] (or [chunk, V/tp]) fp32: the only vocab-wide tensor (with its compute-dtype copy as dz)
        logits = (h @ w.t()).float().mul_(logit_scale)
        if group is None:
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            onehot = torch.ones_like(lse)
        else:  # y becomes the local column (0 where another rank owns the target; onehot 0 there)
            y, onehot, lse, target_logit = _vocab_parallel_lse(logits, y, vocab_start, group)
        ce_sum += ((lse - target_logit) * m).sum()
        if z_loss_coef:
            z_sum += (lse.square() * m).sum()
        if grad_h is None and grad_w is None:
            del logits  # before the next chunk's: one vocab-wide block at a time
            continue
        # logits becomes dz in place: (softmax * (1 + 2 coef lse) - onehot) * mask / count, times s
        logits.sub_(lse[:, None]).exp_()
        if z_loss_coef:
            logits.mul_(1 + 2 * z_loss_coef * lse[:, None])
        logits.scatter_add_(1, y[:, None], -onehot[:, None])
        dz = logits.mul_((m.float() * logit_scale / count)[:, None]).to(w.dtype)
        del logits  # 16-bit: the fp32 block goes (fp32: dz is that block)
        if grad_h is not None:
            grad_h[rows] = (dz @ w).to(grad_h.dtype)
        if grad_w is not None and dz.dtype == torch.float32:
            grad_w.addmm_(dz.t(), h)
        elif grad_w is not None:
            _accumulate_low_precision(grad_w, dz, h)
        del dz
    return ce_sum / count, z_loss_coef * z_sum / count


def _accumulate_low_precision(grad_w, dz, h):
    """grad_w [V, D] (fp32) += dz^T h for 16-bit dz [c, V] and h [c, D]: each product in the 16-bit dtype
    (as the plain path's dW), a block of vocab rows at a time so that it never outgrows dz."""
    block = max(1, dz.numel() // h.shape[1])
    for v in range(0, grad_w.shape[0], block):
        grad_w[v : v + block] += dz[:, v : v + block].t() @ h


def _vocab_parallel_lse(logits, y, vocab_start, group):
    """Local logits [c, V/tp], global target ids -> (local target column, owned 0/1, lse, target logit);
    lse and the target logit are global over ``group``: two all-reduces of [c] and [2, c]."""
    local_y = y - vocab_start
    owned = (local_y >= 0) & (local_y < logits.shape[1])
    local_y = torch.where(owned, local_y, 0)
    owned = owned.float()
    peak = logits.max(dim=-1).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack(
        [(logits - peak[:, None]).exp().sum(dim=-1), logits.gather(1, local_y[:, None]).squeeze(1) * owned]
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return local_y, owned, peak + sums[0].log(), sums[1]


def fused_linear_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_coef: float = 0.0,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    group=None,
    vocab_start: int = 0,
) -> LossParts:
    """hidden [..., D] (after the final norm), weight [V, D], targets [...] -> LossParts,
    equal to ``lm_loss(logit_scale * hidden @ weight.T, targets, z_loss_coef)``.
    ``chunk_size``: tokens per chunk, default ``default_chunk``. The matmuls run in
    :func:`~meshforge.models.layers.matmul_dtype` (autocast's, or the operands' 16-bit dtype), the softmax in fp32.

    Vocab-parallel: ``group`` (a process group) with ``weight`` this rank's rows ``[V/tp, D]``
    from id ``vocab_start`` and ``hidden`` every token; the values are then global and the
    gradient of ``hidden`` is this rank's partial sum (see the module docstring)."""
    if chunk_size is None:
        chunk_size = default_chunk(targets.numel(), hidden.shape[-1], weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the token dims")
    total, ce, z = _FusedLinearLMLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        float(z_loss_coef),
        float(logit_scale),
        int(chunk_size),
        torch.is_grad_enabled(),
        matmul_dtype(hidden, weight),
        group,
        int(vocab_start),
    )
    return LossParts(total, ce, z)
