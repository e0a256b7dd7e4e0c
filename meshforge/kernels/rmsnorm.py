"""RMSNorm as one Triton kernel each way, fp32 inside, for x [..., D] in fp32 or bf16.

Forward, one program per row:  r = 1 / sqrt(sum(x^2) / D + eps),  y = x r w  (r is kept).
Backward, with x^ = x r and g = dy w:

    dx = r (g - x^ mean(g x^)),      dw = sum over rows of dy x^

each backward program walks a contiguous run of rows and writes its own fp32 partial dw;
the partials are summed afterwards (no atomics, so the result is deterministic).

The kernels sit behind ``torch.library`` custom ops with a registered autograd formula
(the ``autograd.Function`` of the op system): ``torch.compile`` then traces a block that
uses them as one opaque call each way, on any backend. Importing this module needs
``triton``; on a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..models.layers import RMSNorm


@triton.jit
def _rms_norm_fwd(X, W, Y, R, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(Y + row * D + cols, (x * r * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(R + row, r)


@triton.jit
def _rms_norm_bwd(DY, X, W, R, DX, DW, N, D, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):  # a constant: a loop bound read at run time fails under numpy 2's interpreter
        row = pid * ROWS_PER_PROGRAM + i
        live = mask & (row < N)  # the last program's run may end past the last row
        offs = row.to(tl.int64) * D + cols
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.load(R + row, mask=row < N, other=0.0)
        xhat = x * r
        g = dy * w
        dx = r * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=live)
        dw += dy * xhat
    tl.store(DW + pid * D + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _programs(device: torch.device, n_rows: int) -> int:
    """Backward programs: a few per streaming multiprocessor on a GPU, a handful on the interpreter."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_rows, per_device))


@torch.library.custom_op("meshforge::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    r = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, r, d, eps, BLOCK=block, num_warps=_num_warps(block))
    return y.view(x.shape), r


@_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@torch.library.custom_op("meshforge::rms_norm_backward", mutates_args=())
def _rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    dy = grad_y.reshape(-1, d).contiguous()
    dx = torch.empty_like(x2)
    n = x2.shape[0]
    programs = _programs(x.device, n)
    rows_per_program = triton.cdiv(n, programs)
    partial_dw = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_bwd[(programs,)](dy, x2, weight.contiguous(), r, dx, partial_dw, n, d,
                               ROWS_PER_PROGRAM=rows_per_program, BLOCK=block, num_warps=_num_warps(block))
    return dx.view(x.shape), partial_dw.sum(0).to(weight.dtype)


@_rms_norm_backward.register_fake
def _(grad_y, x, weight, r):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, _grad_r):
    x, weight, r = ctx.saved_tensors
    dx, dw = torch.ops.meshforge.rms_norm_backward(grad_y, x, weight, r)
    return dx, dw, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in x's dtype (fp32 inside)."""
    return torch.ops.meshforge.rms_norm(x, weight, eps)[0]


class TritonRMSNorm(RMSNorm):
    """``models.layers.RMSNorm`` computed by the Triton kernels above (same parameter, same math)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
