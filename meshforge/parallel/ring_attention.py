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

GQA: fewer K/V heads than query heads; query head h reads K/V head h // (H / H_kv), as
``F.scaled_dot_product_attention(enable_gqa=True)`` does.

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


def _pair_mask(i: int, j: int, c: int, seg_q: torch.Tensor | None, seg_k: torch.Tensor | None,
               device) -> torch.Tensor | None:
    """Boolean [B|1, 1, c, c] mask (True = attend) of query chunk i against key chunk j, or None for all-visible."""
    mask = None
    if i == j:
        mask = torch.ones(c, c, dtype=torch.bool, device=device).tril()[None, None]
    if seg_q is not None:
        same = (seg_q[:, :, None] == seg_k[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, t, d = g.shape
    return g.view(b, h // groups, groups, t, d).sum(2)


def _block_forward(q, k, v, mask, scale):
    """Attention of q [B,H,c,D] on one K/V block: (out [B,H,c,D], lse [B,H,c]); rows with nothing visible: lse -inf."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p, v), lse


def _merge(out, lse, block_out, block_lse):
    """Online-softmax merge of a partial result into the running (out, lse)."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), 0.0, new_lse)
    w_old = torch.exp(lse - safe)[..., None]
    w_new = torch.exp(block_lse - safe)[..., None]
    return out * w_old + block_out * w_new, new_lse


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
    def forward(ctx, q, k, v, segments, group):
        ring = _Ring(group)
        cp, scale = ring.size, 1.0 / math.sqrt(q.shape[-1])
        groups = q.shape[1] // k.shape[1]
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
                    if j > i:
                        continue
                    mask = _pair_mask(i, j, c, seg_q[qi], seg_k[kj], q.device)
                    bo, bl = _block_forward(q_parts[qi], kf[kj], vf[kj], mask, scale)
                    out[qi], lse[qi] = _merge(out[qi], lse[qi], bo, bl)
            if step < cp - 1:
                kv = ring.shift(kv)
        out = torch.cat(out, dim=2)
        lse = torch.cat(lse, dim=2)
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse, *(() if segments is None else (segments,)))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *seg = ctx.saved_tensors
        segments = seg[0] if seg else None
        ring = _Ring(ctx.group)
        cp, scale = ring.size, 1.0 / math.sqrt(q.shape[-1])
        groups = q.shape[1] // k.shape[1]
        c = q.shape[2] // 2
        my_chunks = zigzag_chunks(ring.rank, cp)
        do = grad_out.float()
        delta = (do * out).sum(-1)  # rowsum(dO * O) [B,H,2c]
        q_parts, do_parts = q.float().split(c, dim=2), do.split(c, dim=2)
        lse_parts, delta_parts = lse.split(c, dim=2), delta.split(c, dim=2)
        seg_q = (None, None) if segments is None else segments.split(c, dim=1)
        dq = [torch.zeros_like(p) for p in q_parts]
        kv = [k, v] if segments is None else [k, v, segments]
        dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(cp):
            kf, vf = (_expand_kv(t.float(), groups).split(c, dim=2) for t in kv[:2])
            seg_k = (None, None) if segments is None else kv[2].split(c, dim=1)
            dk_parts = [torch.zeros_like(t) for t in kf]
            dv_parts = [torch.zeros_like(t) for t in vf]
            for qi, i in enumerate(my_chunks):
                for kj, j in enumerate(zigzag_chunks(_visiting(ring, step), cp)):
                    if j > i:
                        continue
                    mask = _pair_mask(i, j, c, seg_q[qi], seg_k[kj], q.device)
                    s = torch.matmul(q_parts[qi], kf[kj].transpose(-2, -1)) * scale
                    if mask is not None:
                        s = s.masked_fill(~mask, NEG_INF)
                    p = torch.exp(s - lse_parts[qi][..., None])
                    dv_parts[kj] += torch.matmul(p.transpose(-2, -1), do_parts[qi])
                    dp = torch.matmul(do_parts[qi], vf[kj].transpose(-2, -1))
                    ds = p * (dp - delta_parts[qi][..., None]) * scale
                    dq[qi] += torch.matmul(ds, kf[kj])
                    dk_parts[kj] += torch.matmul(ds.transpose(-2, -1), q_parts[qi])
            dkv[0] += _fold_kv_grad(torch.cat(dk_parts, dim=2), groups)
            dkv[1] += _fold_kv_grad(torch.cat(dv_parts, dim=2), groups)
            # the gradient travels with its block; the last hop brings every block's gradient home
            if step < cp - 1:
                kv = ring.shift(kv)
            dkv = ring.shift(dkv)
        dq = torch.cat(dq, dim=2)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this rank's zigzag chunks against the whole sequence held by ``group``.

    q [B, H, 2c, D], k/v [B, H_kv, 2c, D] (this rank's chunks r and 2*cp-1-r, concatenated);
    ``segments`` [B, 2c] document ids of the same tokens, or None. Returns [B, H, 2c, D].
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {k.shape[1]} key/value heads")
    if q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is not two zigzag chunks")
    return _RingAttention.apply(q, k, v, segments, group)
