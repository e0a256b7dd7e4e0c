"""liger-kernel's Triton RMSNorm, RoPE and SwiGLU behind the same calls as ours (``fused_kernels = 'liger'``).

An alternative backend (``pip install liger-kernel``): our own kernels (rmsnorm.py, rope.py,
swiglu.py) are the tested default. Each adapter computes what the model's PyTorch code does:
RMSNorm with every step in fp32 (liger's "gemma" casting mode; ``in_place=False`` so the
incoming gradient is never overwritten), RoPE on liger's [B, H, T, D] layout by a transposed
view of ours ([B, T, H, D]; no copy), SwiGLU as silu(a) * b.
"""

from __future__ import annotations

from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction
from torch import Tensor

from ..models.layers import RMSNorm


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [B, T, H, D], k [B, T, H_kv, D] rotated by cos/sin [T, D] (``models.layers.apply_rope_qk``)."""
    q, k = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b (``models.layers.swiglu``)."""
    return LigerSiLUMulFunction.apply(a, b)


class LigerRMSNorm(RMSNorm):
    """``models.layers.RMSNorm`` computed by liger's kernel (same parameter, fp32 inside)."""

    def forward(self, x: Tensor) -> Tensor:
        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "gemma", False)
