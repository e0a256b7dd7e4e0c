"""The SwiGLU gate silu(a) * b as one Triton kernel each way, fp32 inside, for fp32 or bf16.

With s = sigmoid(a):  y = a s b,  da = dy b s (1 + a (1 - s)),  db = dy a s.
The backward recomputes s from a (nothing but a and b is kept). Elementwise over the
flattened tensors, behind ``torch.library`` custom ops with a registered autograd formula
(one opaque call each way under ``torch.compile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu_fwd(A, B, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, A, B, DA, DB, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DA + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)


def _check(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must agree")


@torch.library.custom_op("meshforge::swiglu", mutates_args=())
def _swiglu(a: Tensor, b: Tensor) -> Tensor:
    _check(a, b)
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty_like(a)
    _swiglu_fwd[(triton.cdiv(a.numel(), BLOCK),)](a, b, y, a.numel(), BLOCK=BLOCK)
    return y


@_swiglu.register_fake
def _(a, b):
    return a.new_empty(a.shape)


@torch.library.custom_op("meshforge::swiglu_backward", mutates_args=())
def _swiglu_backward(grad_y: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b, dy = a.contiguous(), b.contiguous(), grad_y.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    _swiglu_bwd[(triton.cdiv(a.numel(), BLOCK),)](dy, a, b, da, db, a.numel(), BLOCK=BLOCK)
    return da, db


@_swiglu_backward.register_fake
def _(grad_y, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    a, b = ctx.saved_tensors
    return torch.ops.meshforge.swiglu_backward(grad_y, a, b)


_swiglu.register_autograd(_backward, setup_context=_setup_context)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """``models.layers.swiglu``: silu(a) * b in a's dtype (fp32 inside)."""
    return torch.ops.meshforge.swiglu(a, b)
