"""Building blocks shared by the model families: RMSNorm, rotary embeddings, attention, SwiGLU.

Modules here read like the math and know nothing about parallelism. Attention takes the
number of heads from the projected tensor's width, so a tensor-parallel plan that shards
the projections column-wise (fewer local heads) needs no change here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's plain frequencies theta^(-2i/dim), i < dim / 2, in float64."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device=None, inv_freq: torch.Tensor | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim] for the rotate-half convention.

    ``inv_freq`` [head_dim / 2]: the frequencies (default theta^(-2i/head_dim); a scaled RoPE passes
    its own, see ``models/rope_scaling.py``); ``scale`` multiplies cos and sin (YaRN's attention factor).
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta, device)
    angles = torch.outer(
        torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq.to(device, torch.float64)
    )
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rope_factors(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] -> what ``apply_rope`` multiplies by, [T, 1, D] in ``dtype`` (broadcast over [B, T, H, D]):
    cos, and sin with rotate-half's sign on its first half (-sin_i, i < D / 2), negated once on the table
    rather than on every query and key."""
    d = sin.shape[-1] // 2
    signed_sin = torch.cat([-sin[:, :d], sin[:, d:]], dim=-1)
    return cos[:, None, :].to(dtype), signed_sin[:, None, :].to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., d:], x[..., :d]], dim=-1) * signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x [B, T, H, D] by the position angles:
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x_{d/2:}, x_{:d/2}) (the sign is carried by sin,
    :func:`rope_factors`: the same numbers, one op fewer per tensor)."""
    return _rotate(x, *rope_factors(cos, sin, x.dtype))


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``apply_rope`` to queries and keys, as one call (a fused kernel may take both at once); the tables
    are shaped once for both."""
    cos_q, sin_q = rope_factors(cos, sin, q.dtype)
    cos_k, sin_k = (cos_q, sin_q) if k.dtype == q.dtype else rope_factors(cos, sin, k.dtype)
    return _rotate(q, cos_q, sin_q), _rotate(k, cos_k, sin_k)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE and optional QK-norm.

    ``head_dim``: each head's width (0: dim / n_heads); ``qkv_bias``: biases on the q/k/v
    projections; ``qk_norm_scope``: ``head`` (RMSNorm over each head, one weight shared by the
    heads) or ``projection`` (RMSNorm over the whole q / k projection); RoPE rotates the first
    ``cos.shape[-1]`` channels of each head and passes the rest through (partial rotary).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        qk_norm: bool,
        norm_eps: float,
        *,
        head_dim: int = 0,
        qkv_bias: bool = False,
        qk_norm_scope: str = "head",
    ):
        super().__init__()
        self.head_dim = head_dim or dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        per_head = qk_norm_scope == "head"
        self.q_norm = RMSNorm(self.head_dim if per_head else n_heads * self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim if per_head else n_kv_heads * self.head_dim, norm_eps) if qk_norm else None
        self.norm_per_head = per_head
        self.core = AttentionCore()
        self.rope = apply_rope_qk
        """How q and k are rotated (``kernels/apply.py`` may put a fused kernel of the same math here)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        """``cos``/``sin``: RoPE tables of x's positions; ``mask``: what ``self.core`` takes (see AttentionCore)."""
        bsz, seqlen, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.q_norm is not None and not self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(bsz, seqlen, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None and self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        rot = cos.shape[-1]
        if rot == self.head_dim:
            q, k = self.rope(q, k, cos, sin)
        else:  # partial rotary: the first ``rot`` channels of each head turn, the rest pass through
            q_rot, k_rot = self.rope(q[..., :rot], k[..., :rot], cos, sin)
            q, k = torch.cat([q_rot, q[..., rot:]], dim=-1), torch.cat([k_rot, k[..., rot:]], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        out = self.core(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v for q [B, H, T, D], k/v [B, H_kv, T, D] (GQA when H_kv < H).

    ``mask``: None (causal), a boolean [B, 1, T, T] mask (SDPA), or a FlexAttention BlockMask.
    Its own module so that another way of computing the same thing (context parallel over
    ranks) can take its place without a change to the model.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if isinstance(mask, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


def document_mask(segments: torch.Tensor, use_flex: bool, window: int = 0):
    """Causal attention within documents: position i sees j iff j <= i and both are in the same
    document (``segments`` [B, T] holds a document id per position); with ``window`` > 0 also
    i - j < window (sliding-window attention).

    A dense boolean [B, 1, T, T] mask for SDPA, or a FlexAttention BlockMask (which skips
    whole blocks across documents and outside the window: the fast path on GPU).
    """
    bsz, seqlen = segments.shape
    if use_flex:

        def same_doc_causal(b, h, q_idx, kv_idx):
            keep = (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])
            return keep & (q_idx - kv_idx < window) if window else keep

        return create_block_mask(same_doc_causal, bsz, None, seqlen, seqlen, device=segments.device)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segments.device).tril()
    if window:
        causal = causal & ~torch.ones_like(causal).tril(-window)
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b"""
    return F.silu(a) * b


def geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu(a) * b (tanh approximation, as T5 v1.1)"""
    return F.gelu(a, approximate="tanh") * b


GATES = {"silu": swiglu, "gelu": geglu}


class FeedForward(nn.Module):
    """Gated feed-forward: w2(act(w1 x) * w3 x) -- SwiGLU with silu, T5 v1.1 gated-GELU with gelu."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.gate = GATES[activation]
        """act(a) * b of the two projections (``kernels/apply.py`` may put a fused kernel of the same math here)."""
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.gate(self.w1(x), self.w3(x)))


def matmul_dtype(*operands: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``operands`` runs in here: autocast's when it is on for their device,
    else theirs when that is 16-bit, else fp32."""
    device = operands[0].device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    own = operands[0].dtype
    for t in operands[1:]:
        own = torch.promote_types(own, t.dtype)
    return own if own in (torch.bfloat16, torch.float16) else torch.float32


def init_linear(linear: nn.Linear, std: float) -> None:
    """Truncated normal (at 3 std) for a projection; zero bias."""
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def output_std(init_std: float, n_layers: int) -> float:
    """Std for projections that write into the residual stream (GPT-2 / Megatron scaling)."""
    return init_std / math.sqrt(2 * n_layers)
