"""Parameter counts of a decoder config, and the rule that picks a shape for a target N.

Counts (dense Llama-style decoder, :class:`meshforge.models.decoder.Decoder`), per block:

    attention  d*(H*q) + 2*d*(K*q) + (H*q)*d      (wq, wk, wv, wo; q = head dim, K = kv heads)
               + 2*q                              (QK-norm weights, when on)
    FFN        3*d*h                              (SwiGLU w1, w3, w2; h = ffn hidden width)
    norms      2*d

``non_embedding = L * block + d`` (the final norm) is the N the scaling fits use (Kaplan et
al.'s choice: the embedding of a small model is a large, compute-light share of its
parameters). ``total`` adds the embedding (V*d), and the output projection (V*d) when it is
not tied.

Shape rule: the head dim and the query/kv head ratio are kept from the base config; the
width d is a multiple of ``head_dim * (n_heads / n_kv_heads)``, the depth L any integer such
that the aspect ratio d / L stays within a factor 2 of ``aspect`` (default 32), and the FFN
width h a multiple of ``ffn_multiple_of`` within 12.5% of the usual 8d/3 (the fine knob that
lets small models hit N closely). Of those shapes the one whose non-embedding N is closest to
the target (in log) wins; ties go to the aspect ratio nearest ``aspect``, then to h nearest 8d/3.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..models import family_spec
from . import ScalingError


@dataclass(frozen=True)
class ParamCounts:
    non_embedding: int
    """Every parameter but the token embedding and the output projection: the N of the fits."""
    total: int
    """All parameters (a tied embedding counted once)."""
    active: int
    """What a token passes through (the trainer's ``active_params``): non-embedding + the output projection."""


def count_params(m: ModelConfig) -> ParamCounts:
    """Exact parameter counts of a dense decoder config (checked against the built model in the tests)."""
    if not family_spec(m.family).supports_scaling_sweeps or m.moe_experts:
        raise ScalingError(
            f"scaling sweeps plan dense decoders; model.family = {m.family!r}, model.moe_experts = {m.moe_experts}"
        )
    d, q = m.dim, m.head_dim
    qk_norm = 2 * q if m.qk_norm_scope == "head" else (m.n_heads + m.kv_heads) * q
    attn = (
        d * m.n_heads * q
        + 2 * d * m.kv_heads * q
        + m.n_heads * q * d
        + (qk_norm if m.qk_norm else 0)
        + ((m.n_heads + 2 * m.kv_heads) * q if m.qkv_bias else 0)
    )
    block = attn + 3 * d * m.hidden_dim + 2 * d
    non_emb = m.n_layers * block + d
    emb = m.vocab_size * d
    total = non_emb + emb * (1 if m.tie_embeddings else 2)
    return ParamCounts(non_embedding=non_emb, total=total, active=non_emb + emb)


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int

    def apply(self, m: ModelConfig) -> ModelConfig:
        return dataclasses.replace(
            m,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_dim=self.ffn_dim,
        )


def _block_without_ffn(base: ModelConfig, dim: int) -> int:
    """Parameters of one block other than the FFN's, at width ``dim`` (base head dim and head ratio)."""
    q = base.head_dim
    heads = dim // q
    kv = heads // (base.n_heads // base.kv_heads)
    return dim * heads * q + 2 * dim * kv * q + heads * q * dim + (2 * q if base.qk_norm else 0) + 2 * dim


def candidate_shapes(
    base: ModelConfig, aspect: float, n_target: float, max_dim: int = 8192, max_layers: int = 128, layers: int = 0
):
    """For every (width, depth) the rule allows, the FFN width nearest ``n_target``: (Shape, non-embedding N).
    ``layers`` > 0 fixes the depth (any aspect ratio): the width alone varies, as a muP LR-transfer sweep wants."""
    q = base.head_dim
    group = base.n_heads // base.kv_heads
    step = q * group
    m = base.ffn_multiple_of
    for dim in range(step, max_dim + 1, step):
        lo, hi = max(1, math.ceil(dim / (2 * aspect))), min(max_layers, max(1, math.floor(2 * dim / aspect)))
        if layers:
            lo = hi = layers
        h_lo, h_hi = m * max(1, math.ceil(7 * dim / 3 / m)), max(m, m * math.floor(3 * dim / m))
        h_lo = min(h_lo, h_hi)
        other = _block_without_ffn(base, dim)
        for depth in range(lo, hi + 1):
            ideal = ((n_target - dim) / depth - other) / (3 * dim)
            hidden = min(h_hi, max(h_lo, m * round(ideal / m)))
            heads = dim // q
            n = depth * (other + 3 * dim * hidden) + dim
            yield Shape(dim, depth, heads, heads // group, hidden), n


def smallest_n(base: ModelConfig, aspect: float) -> int:
    """The smallest non-embedding N the rule can build (one block of the narrowest width)."""
    return min(n for _, n in candidate_shapes(base, aspect, 0, max_dim=base.head_dim * (base.n_heads // base.kv_heads)))


def shape_for(n_target: float, base: ModelConfig, aspect: float = 32.0, layers: int = 0) -> tuple[Shape, int]:
    """The shape whose non-embedding N is closest to ``n_target``, and that N."""
    if n_target <= 0:
        raise ScalingError(f"target parameter count must be positive, got {n_target:g}")
    count_params(base)  # a dense decoder, or a clear error
    # width grows ~ (N * aspect / 12)^(1/3); look a little beyond it
    max_dim = int(4 * (n_target * aspect / 12) ** (1 / 3)) + 4 * base.head_dim
    best = None
    if layers:
        max_dim = int(2 * (n_target / (12 * layers)) ** 0.5) + 4 * base.head_dim
    for shape, n in candidate_shapes(base, aspect, n_target, max_dim=max_dim, layers=layers):
        key = (
            round(abs(math.log(n / n_target)), 6),
            abs(math.log(shape.dim / shape.n_layers / aspect)),
            abs(shape.ffn_dim - 8 * shape.dim / 3),
        )
        if best is None or key < best[0]:
            best = (key, shape, n)
    assert best is not None
    assert best[2] == count_params(best[1].apply(base)).non_embedding
    return best[1], best[2]
