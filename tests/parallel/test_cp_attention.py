"""Context-parallel attention cores (ring, all-to-all) against one process's attention.

Processes spawned here (gloo): for cp2 and cp4 ring and cp2 all-to-all, the output and the
gradients of q, k, v equal ``F.scaled_dot_product_attention`` over the full sequence (causal,
GQA: 4 query / 2 key-value heads), without and with a document mask whose documents cross
the zigzag chunk boundaries. The ring runs each block pair both through PyTorch's fused CPU
kernel (the default on CPU) and through explicit matmuls (the portable path). The ring test
also counts every byte it sends: exactly cp-1 hops of this rank's K/V (+ document ids)
forward, cp-1 hops of K/V and cp hops of fp32 dK/dV backward, and no collective at all, so an
implementation gathering the sequence cannot pass.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from meshforge.models.layers import document_mask
from meshforge.parallel.ring_attention import ring_attention, zigzag_merge, zigzag_positions, zigzag_split
from meshforge.parallel.ulysses import ulysses_attention
from parallel_harness import free_port

B, H, HKV, D = 2, 4, 2, 8


def _inputs(seqlen: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, seqlen, D, generator=g)
    k = torch.randn(B, HKV, seqlen, D, generator=g)
    v = torch.randn(B, HKV, seqlen, D, generator=g)
    w = torch.randn(B, H, seqlen, D, generator=g)  # the loss weights: loss = (out * w).sum()
    # documents of random lengths 1..9: most boundaries fall inside chunks, many documents span two
    lengths = torch.randint(1, 10, (B, seqlen), generator=g)
    starts = torch.zeros(B, seqlen, dtype=torch.long)
    for b in range(B):
        pos = torch.cumsum(lengths[b], 0)
        starts[b, pos[pos < seqlen]] = 1
    return q, k, v, w, torch.cumsum(starts, dim=1)


def _reference(q, k, v, w, segments):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = None if segments is None else document_mask(segments, use_flex=False)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


class _SendCounter:
    """Wraps dist.isend to count bytes; every collective raises."""

    def __init__(self):
        self.bytes = 0
        self.sends = 0
        self._isend = dist.isend
        dist.isend = self._count

    def _count(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        self.sends += 1
        return self._isend(tensor, *args, **kwargs)


def _forbid_collectives():
    def refuse(*args, **kwargs):
        raise AssertionError("ring attention called a collective")

    for name in (
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "broadcast",
        "all_to_all_single",
        "reduce_scatter_tensor",
    ):
        setattr(dist, name, refuse)


def _check(rank, cp, method, seqlen, count_bytes, fused):
    q, k, v, w, segments = _inputs(seqlen)
    attn = ulysses_attention if method == "alltoall" else partial(ring_attention, fused=fused)
    group = dist.group.WORLD
    for seg in (None, segments):
        ref = _reference(q, k, v, w, seg)
        local = [zigzag_split(t, rank, cp, dim=2).requires_grad_() for t in (q, k, v)]
        local_seg = None if seg is None else zigzag_split(seg, rank, cp, dim=1)
        counter = _SendCounter() if count_bytes else None
        out = attn(*local, group, segments=local_seg)
        (out * zigzag_split(w, rank, cp, dim=2)).sum().backward()
        if counter is not None:
            dist.isend = counter._isend
            kv_bytes = sum(t.numel() * t.element_size() for t in local[1:])
            seg_bytes = 0 if local_seg is None else local_seg.numel() * local_seg.element_size()
            expected = (cp - 1) * (kv_bytes + seg_bytes) * 2 + cp * kv_bytes  # fwd + bwd K/V(+ids), bwd dK/dV
            assert counter.bytes == expected, (counter.bytes, expected)
            assert counter.sends == (cp - 1) * (2 + (seg is not None)) * 2 + 2 * cp
        got = [out.detach()] + [t.grad for t in local]
        for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
            torch.testing.assert_close(
                g,
                zigzag_split(r, rank, cp, dim=2),
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"{method} (fused {fused}) cp{cp} rank {rank} segments={seg is not None} {name}: {m}",
            )


def _worker(rank, cp, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    try:
        for method, seqlen, count_bytes, fused in cases:
            if method == "ring" and count_bytes:
                saved = {
                    n: getattr(dist, n)
                    for n in (
                        "all_gather",
                        "all_gather_into_tensor",
                        "all_reduce",
                        "broadcast",
                        "all_to_all_single",
                        "reduce_scatter_tensor",
                    )
                }
                _forbid_collectives()
                try:
                    _check(rank, cp, method, seqlen, count_bytes, fused)
                finally:
                    for n, f in saved.items():
                        setattr(dist, n, f)
            else:
                _check(rank, cp, method, seqlen, count_bytes, fused)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "cp, cases",
    [
        (2, [("ring", 24, True, True), ("ring", 24, False, False), ("alltoall", 24, False, None)]),
        (4, [("ring", 40, True, True), ("ring", 40, False, False)]),
    ],
)
def test_cp_attention_matches_full_sequence(cp, cases):
    mp.start_processes(_worker, args=(cp, free_port(), cases), nprocs=cp, join=True, start_method="spawn")


def test_zigzag_split_merge_and_positions():
    x = torch.arange(2 * 16).view(2, 16)
    parts = [zigzag_split(x, r, 4, dim=1) for r in range(4)]
    assert parts[1][0].tolist() == [2, 3, 12, 13]
    assert torch.equal(zigzag_merge(parts, dim=1), x)
    assert zigzag_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
