"""RMSNorm as one Triton kernel each way, fp32 inside, for x [..., D] in fp32 or bf16.

Forward, per row:  r = 1 / sqrt(sum(x^2) / D + eps),  y = x r w  (r is kept); one program
normalises a tile of rows (one row of the model width, several of QK-norm's head dim).
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
def _rms_norm_fwd(X, W, Y, R, N, D, eps, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(Y + offs, (x * r[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(R + rows, r, mask=rows < N)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, R, DX, DW, N, D, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK), dtype=tl.float32)
    # constant bounds: a loop bound read at run time fails under the interpreter with numpy 2
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_ROWS):
        rows = (pid * ROWS_PER_PROGRAM + i + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        live = (rows[:, None] < N) & (cols[None, :] < D)  # the last program's run may end past the last row
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.load(R + rows, mask=rows < N, other=0.0)[:, None]
        xhat = x * r
        g = dy * w[None, :]
        dx = r * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=live)
        dw += dy * xhat
    tl.store(DW + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


def _tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK: the row width padded to a power of two, BLOCK_ROWS: rows per tile, num_warps): narrow rows
    (QK-norm's head dim) go several to a tile of about 2048 elements."""
    block = triton.next_power_of_2(d)
    block_rows = max(1, 2048 // block)
    tile = block * block_rows
    return block, block_rows, 4 if tile <= 1024 else 8 if tile <= 4096 else 16


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
    block, block_rows, warps = _tiles(d)
    _rms_norm_fwd[(triton.cdiv(x2.shape[0], block_rows),)](
        x2, weight.contiguous(), y, r, x2.shape[0], d, eps, BLOCK_ROWS=block_rows, BLOCK=block, num_warps=warps
    )
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
    block, block_rows, warps = _tiles(d)
    programs = _programs(x.device, triton.cdiv(n, block_rows))
    rows_per_program = triton.cdiv(triton.cdiv(n, programs), block_rows) * block_rows
    programs = triton.cdiv(n, rows_per_program)
    partial_dw = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    _rms_norm_bwd[(programs,)](
        dy,
        x2,
        weight.contiguous(),
        r,
        dx,
        partial_dw,
        n,
        d,
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_ROWS=block_rows,
        BLOCK=block,
        num_warps=warps,
    )
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
