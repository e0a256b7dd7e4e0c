"""All-to-all context parallelism (DeepSpeed-Ulysses) over a cp group.

Before attention, one all-to-all turns "all heads, my part of the sequence" into "H/cp heads,
the whole sequence"; attention then runs as in one process (causal, document mask) on those
heads; a second all-to-all turns the result back. The sequence parts are the zigzag chunks
of ``ring_attention`` (the data is split the same way for both methods), put back in order
around the attention.

GQA: the K/V heads must divide by cp as well (each rank takes a contiguous run of H/cp query
heads and the H_kv/cp K/V heads those read); they are not replicated to make up a shortfall.
Uses ``all_to_all_single`` (gloo and NCCL), so it runs on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.layers import document_mask
from .ring_attention import zigzag_merge, zigzag_split


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [cp, ...] -> y [cp, ...] with y[j] on rank i = x[i] of rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SeqToHeads(torch.autograd.Function):
    """[B, H, t, D] (local sequence, all heads) -> [B, H/cp, T, D] (all sequence in zigzag rank order, my heads)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x, group):
    cp = dist.get_world_size(group)
    b, h, t, d = x.shape
    send = x.reshape(b, cp, h // cp, t, d).transpose(0, 1)  # [cp(dest), B, h/cp, t, D]
    recv = _all_to_all(send, group)  # [cp(source), B, h/cp, t, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * t, d)


def _heads_to_seq(x, group):
    cp = dist.get_world_size(group)
    b, hl, total, d = x.shape
    t = total // cp
    send = x.reshape(b, hl, cp, t, d).permute(2, 0, 1, 3, 4)  # [cp(dest), B, h/cp, t, D]
    recv = _all_to_all(send, group)  # [cp(source: head group), B, h/cp, t, D]
    return recv.transpose(0, 1).reshape(b, cp * hl, t, d)


def _natural_order(x: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    """Rank-ordered zigzag parts (rank 0's two chunks, rank 1's, ...) -> the sequence in order."""
    return zigzag_merge(list(x.chunk(cp, dim=dim)), dim=dim)


def _rank_order(x: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    return torch.cat([zigzag_split(x, r, cp, dim=dim) for r in range(cp)], dim=dim)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention for this rank's zigzag chunks via head/sequence all-to-all.

    Same contract as ``ring_attention``: q [B, H, 2c, D], k/v [B, H_kv, 2c, D], ``segments``
    [B, 2c] or None; H and H_kv must divide by the group size.
    """
    cp = dist.get_world_size(group)
    if q.shape[1] % cp or k.shape[1] % cp:
        raise ValueError(
            f"all-to-all context parallel needs heads ({q.shape[1]}) and key/value heads "
            f"({k.shape[1]}) divisible by cp = {cp}"
        )
    q, k, v = (_natural_order(_SeqToHeads.apply(t, group), cp, dim=2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if segments is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        gathered = [torch.empty_like(segments) for _ in range(cp)]
        dist.all_gather(gathered, segments.contiguous(), group=group)
        full = zigzag_merge(gathered, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(full, use_flex=False), enable_gqa=gqa)
    return _HeadsToSeq.apply(_rank_order(out, cp, dim=2), group)
