"""Rotary position embedding as one Triton kernel, fp32 inside, for x [B, T, H, D] in fp32 or bf16.

With x = (x1, x2) the two halves of a head and cos = (c1, c2), sin = (s1, s2) the halves of
the tables ``models.layers.rope_tables`` builds (rotate-half convention), RoPE is a rotation

    y1 = x1 c1 - x2 s1,      y2 = x2 c2 + x1 s2

whose transpose is the backward:  dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1.
One program rotates all heads of one (batch, position) row; forward and backward are the
same kernel with the sign of the sines flipped, behind one ``torch.library`` custom op that
is its own gradient (so ``torch.compile`` traces it as one opaque call each way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rope_kernel(X, COS, SIN, Y, T, H, HALF, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    t = row % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    first = row * H * 2 * HALF + heads * 2 * HALF + cols  # offsets of x1; x2 sits HALF further
    x1 = tl.load(X + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + first + HALF, mask=mask, other=0.0).to(tl.float32)
    table = t * 2 * HALF + cols
    c1 = tl.load(COS + table, mask=cols < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table, mask=cols < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + first, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + first + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("meshforge::rope", mutates_args=())
def _rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    bsz, seqlen, heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != (seqlen, head_dim) or sin.shape != cos.shape:
        raise ValueError(
            f"rope: x {tuple(x.shape)} needs an even head dim and cos/sin of shape "
            f"({seqlen}, {head_dim}), got {tuple(cos.shape)} / {tuple(sin.shape)}"
        )
    x = x.contiguous()
    y = torch.empty_like(x)
    half = head_dim // 2
    block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    _rope_kernel[(bsz * seqlen,)](
        x,
        cos.contiguous(),
        sin.contiguous(),
        y,
        seqlen,
        heads,
        half,
        BACKWARD=backward,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4 if block_h * block_half <= 2048 else 8,
    )
    return y


@_rope.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _x, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _backward(ctx, grad_y):
    cos, sin = ctx.saved_tensors
    return torch.ops.meshforge.rope(grad_y, cos, sin, not ctx.backward), None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``models.layers.apply_rope``: x [B, T, H, D] rotated by cos/sin [T, D], in x's dtype (fp32 inside)."""
    return torch.ops.meshforge.rope(x, cos, sin, False)


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``models.layers.apply_rope_qk`` by the kernel (queries and keys may have different head counts)."""
    return rope(q, cos, sin), rope(k, cos, sin)
