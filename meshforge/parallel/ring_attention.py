"""Ring attention over a context-parallel group, zigzag load-balanced (forward and backward).

The sequence of T tokens is cut into 2*cp chunks of c = T / (2*cp); cp rank r holds chunk r
and chunk 2*cp-1-r (one early, one late: "zigzag"), so under a causal mask every rank has the
same amount of unmasked work. Each rank keeps its queries; the K/V blocks (and their document
ids) travel around the ring, one hop per step, cp-1 hops in the forward. A step attends the
local query chunks to the visiting key chunks; the partial results are merged with their
log-sum-exp (online softmax), so no rank ever holds more than two K/V blocks.

Per (query chunk i, key chunk j) pair, by chunk index: j < i is fully visible, j == i is the
causal diagonal, j > i is skipped; a document mask (a document id per token) masks inside a
computed pair as well. The backward recomputes the probabilities from the saved log-sum-exp
and sends dK/dV around the ring with their K/V: after cp hops every block's gradient is home.

A block pair runs through PyTorch's fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp, and its
backward, which takes the final output and log-sum-exp), so no [c, c] score matrix is kept;
on other devices (or with ``fused=False``) through explicit matmuls.

GQA: fewer K/V heads than query heads; query head h reads K/V head h // (H / H_kv), as
``F.scaled_dot_product_attention(enable_gqa=True)`` does (the fused kernel does it itself;
the matmul path repeats K/V per block and sums the repeated heads' gradients).

PyTorch's own ``torch.distributed.tensor.experimental.context_parallel`` (2.13) rewrites the
CUDA SDPA kernels (flash / efficient / cuDNN) into a ring, with ``is_causal`` only (no
attention mask, so no document masking), and handles FlexAttention by all-gathering K/V. On
CPU, SDPA runs kernels it does not intercept, so it does not apply there. This module uses
only point-to-point sends of plain tensors (gloo, NCCL), so it runs on CPU and GPU alike;
meshforge uses it on every device (the GPU may later swap in torch's kernels for the plain
causal case).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def zigzag_chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp) that cp rank ``cp_rank`` holds."""
    return cp_rank, 2 * cp - 1 - cp_rank


def zigzag_positions(seqlen: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions [2c] of the tokens this rank holds (c = seqlen / (2*cp))."""
    c = seqlen // (2 * cp)
    a, b = zigzag_chunks(cp_rank, cp)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


def zigzag_split(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``x`` along ``dim`` (the sequence), concatenated."""
    chunks = x.chunk(2 * cp, dim=dim)
    a, b = zigzag_chunks(cp_rank, cp)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def zigzag_merge(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``zigzag_split`` over all cp ranks: ``parts[r]`` is rank r's local tensor."""
    cp = len(parts)
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        a, b = zigzag_chunks(r, cp)
        chunks[a], chunks[b] = first, second
    return torch.cat(chunks, dim=dim)


# --------------------------------------------------------------------------- one block pair

MASKED = -1e30
"""Additive mask value of the fused kernel: finite, so a row with nothing visible in a block
gets a log-sum-exp of about -1e30 (weight 0 in the merge) instead of NaN."""


def _doc_mask(seg_q: torch.Tensor | None, seg_k: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, c, c] True where query and key are in the same document (None: no documents)."""
    return None if seg_q is None else (seg_q[:, :, None] == seg_k[:, None, :])[:, None]


def _math_mask(diagonal: bool, same_doc: torch.Tensor | None, c: int, device) -> torch.Tensor | None:
    mask = torch.ones(c, c, dtype=torch.bool, device=device).tril()[None, None] if diagonal else None
    if same_doc is not None:
        mask = same_doc if mask is None else mask & same_doc
    return mask


def _fused_mask(diagonal: bool, same_doc: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Additive float mask for the fused kernel (the plain diagonal uses its is_causal instead)."""
    if same_doc is None:
        return None
    mask = same_doc
    if diagonal:
        c = q.shape[2]
        mask = mask & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    return torch.where(mask, zero, MASKED).to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)


def _block_forward(q, k, v, diagonal: bool, same_doc, scale: float, fused: bool):
    """q [B,H,c,D] on one K/V block (K/V with H_kv heads for the fused kernel, expanded to H
    for the matmuls): (out, lse [B,H,c])."""
    if fused:
        causal = diagonal and same_doc is None
        return _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=_fused_mask(diagonal, same_doc, q), scale=scale)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    mask = _math_mask(diagonal, same_doc, q.shape[2], q.device)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p, v), lse


def _block_backward(do, q, k, v, out, lse, diagonal: bool, same_doc, scale: float, fused: bool):
    """(dq, dk, dv) of one block pair from the FINAL out and lse of the query rows."""
    if fused:
        causal = diagonal and same_doc is None
        return _FLASH_CPU_BACKWARD(
            do, q, k, v, out, lse, 0.0, causal, attn_mask=_fused_mask(diagonal, same_doc, q), scale=scale
        )
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    mask = _math_mask(diagonal, same_doc, q.shape[2], q.device)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    p = torch.exp(s - lse[..., None])
    dv = torch.matmul(p.transpose(-2, -1), do)
    dp = torch.matmul(do, v.transpose(-2, -1))
    ds = p * (dp - (do * out).sum(-1, keepdim=True)) * scale
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), dv


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, t, d = g.shape
    return g.view(b, h // groups, groups, t, d).sum(2)


def _merge(out, lse, block_out, block_lse):
    """Online-softmax merge of a partial result into the running (out, lse); ``out`` and
    ``block_out`` (fresh buffers of this Function) are updated in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), 0.0, new_lse)
    out.mul_(torch.exp(lse - safe)[..., None])
    out.add_(block_out.mul_(torch.exp(block_lse - safe)[..., None]))
    return out, new_lse


# --------------------------------------------------------------------------- the ring


class _Ring:
    """Point-to-point hops to the next rank of the cp group (receiving from the previous)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Send each tensor to the next rank; return what the previous rank sent."""
        if self.size == 1:
            return tensors
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        works = []
        for t, r in zip(tensors, received):
            works.append(dist.isend(t, self.next, group=self.group))
            works.append(dist.irecv(r, self.prev, group=self.group))
        for w in works:
            w.wait()
        return received


def _visiting(ring: _Ring, step: int) -> int:
    """The cp rank whose K/V block this rank holds after ``step`` hops."""
    return (ring.rank - step) % ring.size


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, group, fused):
        ring = _Ring(group)
        cp, scale = ring.size, 1.0 / math.sqrt(q.shape[-1])
        groups = 1 if fused else q.shape[1] // k.shape[1]  # the fused kernel reads GQA K/V itself
        c = q.shape[2] // 2
        my_chunks = zigzag_chunks(ring.rank, cp)
        q_parts = q.float().split(c, dim=2)
        seg_q = (None, None) if segments is None else segments.split(c, dim=1)
        out = [torch.zeros_like(p) for p in q_parts]
        lse = [torch.full(p.shape[:-1], NEG_INF, dtype=p.dtype, device=p.device) for p in q_parts]
        kv = [k, v] if segments is None else [k, v, segments]
        for step in range(cp):
            kf, vf = (_expand_kv(t.float(), groups).split(c, dim=2) for t in kv[:2])
            seg_k = (None, None) if segments is None else kv[2].split(c, dim=1)
            for qi, i in enumerate(my_chunks):
                for kj, j in enumerate(zigzag_chunks(_visiting(ring, step), cp)):
                    if j > i:  # a later chunk: causally invisible
                        continue
                    bo, bl = _block_forward(
                        q_parts[qi], kf[kj], vf[kj], i == j, _doc_mask(seg_q[qi], seg_k[kj]), scale, fused
                    )
                    out[qi], lse[qi] = _merge(out[qi], lse[qi], bo, bl)
            if step < cp - 1:
                kv = ring.shift(kv)
        # stored [B, T, H, D] in memory (as SDPA's fused kernels do), so the caller's
        # transpose + reshape before the output projection is a view, not a second copy
        out = torch.cat([o.transpose(1, 2) for o in out], dim=1).transpose(1, 2)
        lse = torch.cat(lse, dim=2)
        ctx.group, ctx.fused = group, fused
        ctx.save_for_backward(q, k, v, out, lse, *(() if segments is None else (segments,)))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *seg = ctx.saved_tensors
        segments = seg[0] if seg else None
        ring = _Ring(ctx.group)
        cp, scale = ring.size, 1.0 / math.sqrt(q.shape[-1])
        groups = 1 if ctx.fused else q.shape[1] // k.shape[1]
        c = q.shape[2] // 2
        my_chunks = zigzag_chunks(ring.rank, cp)
        q_parts, do_parts = q.float().split(c, dim=2), grad_out.float().split(c, dim=2)
        out_parts, lse_parts = out.split(c, dim=2), lse.split(c, dim=2)
        seg_q = (None, None) if segments is None else segments.split(c, dim=1)
        dq = [torch.zeros_like(p) for p in q_parts]
        kv = [k, v] if segments is None else [k, v, segments]
        dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(cp):
            kf, vf = (_expand_kv(t.float(), groups).split(c, dim=2) for t in kv[:2])
            seg_k = (None, None) if segments is None else kv[2].split(c, dim=1)
            dk_parts, dv_parts = dkv[0].split(c, dim=2), dkv[1].split(c, dim=2)  # views: += lands in dkv
            for qi, i in enumerate(my_chunks):
                for kj, j in enumerate(zigzag_chunks(_visiting(ring, step), cp)):
                    if j > i:
                        continue
                    g = _block_backward(
                        do_parts[qi],
                        q_parts[qi],
                        kf[kj],
                        vf[kj],
                        out_parts[qi],
                        lse_parts[qi],
                        i == j,
                        _doc_mask(seg_q[qi], seg_k[kj]),
                        scale,
                        ctx.fused,
                    )
                    dq[qi] += g[0]
                    dk_parts[kj].add_(_fold_kv_grad(g[1], groups))
                    dv_parts[kj].add_(_fold_kv_grad(g[2], groups))
            # the gradient travels with its block; the last hop brings every block's gradient home
            if step < cp - 1:
                kv = ring.shift(kv)
            dkv = ring.shift(dkv)
        dq = torch.cat(dq, dim=2)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    segments: torch.Tensor | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's zigzag chunks against the whole sequence held by ``group``.

    q [B, H, 2c, D], k/v [B, H_kv, 2c, D] (this rank's chunks r and 2*cp-1-r, concatenated);
    ``segments`` [B, 2c] document ids of the same tokens, or None. Returns [B, H, 2c, D].
    ``fused``: each block pair through PyTorch's fused CPU attention kernel (which returns the
    log-sum-exp and has a backward taking it; O(c) memory per pair); otherwise explicit
    matmuls that materialize the [c, c] scores (any device). None: fused on CPU.
    """
    if fused is None:
        fused = q.device.type == "cpu"
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {k.shape[1]} key/value heads")
    if q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is not two zigzag chunks")
    return _RingAttention.apply(q, k, v, segments, group, fused)
