"""Compute of one step on a rank: how the model's FLOPs split over pipeline stages, and how fast the
device runs them at the layout's matrix shapes.

FLOPs per token by block (in pipeline order) and for the head, from the parameter table
(:mod:`.state`): 6 per weight per token (MoE experts at ``top_k / experts`` of theirs), plus
attention's ``12 H Q T`` per block (PaLM appendix B), the output projection on the last stage
(also when tied to the embedding: the weight is then a copy on the last stage), the embedding
lookup none (nor any other lookup table); their sum is the model's FLOPs per token
(:func:`model_flops_per_token`). A pipeline runs at the pace of its slowest rank, so a rank's share is that of the
heaviest pipeline rank (its stages' blocks, the output on the last stage), which is ``1 / pp``
only when the layers divide evenly and the head weighs nothing.
"""

from __future__ import annotations

import math
import tomllib
from functools import lru_cache
from pathlib import Path

from ..config import JobConfig
from .layouts import Layout
from .state import param_table


def block_weights(cfg: JobConfig) -> tuple[list[float], float]:
    """FLOPs per token of each block (pipeline order) and of the head (final norm + output)."""
    m = cfg.model
    from ..parallel.mesh import pipeline_layers

    n_blocks = pipeline_layers(m)[0]
    blocks = [12.0 * m.n_heads * m.head_dim * cfg.data.seq_len] * n_blocks
    head = 0.0
    for info in param_table(m):
        n = 1
        for s in info.shape:
            n *= s
        if info.kind == "experts":
            n = n * m.moe_top_k / m.moe_experts
        if info.layer >= 0:
            blocks[info.layer] += 6.0 * n
        elif info.layer == -2 or (info.layer == -1 and m.tie_embeddings and info.kind == "embedding"):
            head += 6.0 * n
    return blocks, head


def model_flops_per_token(cfg: JobConfig, cache: dict | None = None) -> float:
    """Training FLOPs per token of the whole model: the blocks' and the head's of :func:`block_weights` (the
    one walk of the parameter table that the pipeline split is priced by too)."""
    blocks, head = cached_block_weights(cfg, cache)
    return sum(blocks) + head


def cached_block_weights(cfg: JobConfig, cache: dict | None) -> tuple[list[float], float]:
    """:func:`block_weights`, computed once per plan (``cache``: the planner's shared dict)."""
    if cache is None:
        return block_weights(cfg)
    if "block_weights" not in cache:
        cache["block_weights"] = block_weights(cfg)
    return cache["block_weights"]


def heaviest_share(cfg: JobConfig, layout: Layout, cache: dict | None = None) -> float:
    """The fraction of the model's FLOPs per token that the busiest pipeline rank runs (1 without pp)."""
    if layout.pp == 1:
        return 1.0
    from ..parallel.mesh import pipeline_layers
    from ..parallel.pipeline import split_layers

    key = ("heaviest", layout.pp, layout.spr, cfg.parallel.pp_split)
    if cache is not None and key in cache:
        return cache[key]
    blocks, head = cached_block_weights(cfg, cache)
    n_stages = layout.pp * layout.spr
    ranges = split_layers(pipeline_layers(cfg.model)[0], n_stages, cfg.parallel.pp_split)
    per_rank = [0.0] * layout.pp
    for s, (a, b) in enumerate(ranges):
        per_rank[s % layout.pp] += sum(blocks[a:b]) + (head if s == n_stages - 1 else 0.0)
    share = max(per_rank) / (sum(blocks) + head)
    if cache is not None:
        cache[key] = share
    return share


EFFICIENCY_TABLE = Path(__file__).with_name("efficiency.toml")


@lru_cache(maxsize=4)
def efficiency_curves(path: Path = EFFICIENCY_TABLE) -> dict[str, dict]:
    """Device key -> its entry of ``efficiency.toml``: ``gemm``, ``(FLOPs of one call, fraction of peak)``
    points, and where given ``attention``, ``(sequence length, fraction of peak)`` points, and ``overhead``
    (a float, 1 when absent)."""
    table = tomllib.loads(path.read_text())
    return {
        key: {
            **{
                curve: tuple((float(x), float(e)) for x, e in entry[curve])
                for curve in ("gemm", "attention")
                if curve in entry
            },
            "overhead": float(entry.get("overhead", 1.0)),
        }
        for key, entry in table.items()
    }


def gemm_efficiency(points: tuple[tuple[float, float], ...], flops: float) -> float:
    """The fraction of peak one GEMM of ``flops`` reaches (or attention at sequence length ``flops``):
    log-linear between the points, flat beyond them."""
    if flops <= points[0][0]:
        return points[0][1]
    for (f0, e0), (f1, e1) in zip(points, points[1:]):
        if flops <= f1:
            return e0 + (e1 - e0) * math.log(flops / f0) / math.log(f1 / f0)
    return points[-1][1]


def layout_gemms(cfg: JobConfig, layout: Layout, B: int) -> list[tuple[float, float]]:
    """``(FLOPs of one call, calls per block or head)`` of the forward GEMMs a rank runs per microbatch: the
    block's projections at ``B T / cp`` tokens (TP cuts one side of each), attention's score and value
    products, the experts at their balanced share of tokens, the output projection."""
    m = cfg.model
    tp, M = layout.tp, B * cfg.data.seq_len // layout.cp
    D, Dkv, Hl = m.dim, m.kv_heads * m.head_dim, max(1, m.n_heads // tp)
    out = [
        (2.0 * M * (D + 2 * Dkv) / tp * D, 1),
        (2.0 * M * D * D / tp, 1),
        (2.0 * 2 * B * Hl * (cfg.data.seq_len // layout.cp) * cfg.data.seq_len * m.head_dim, 1),
    ]
    if m.moe_experts:
        tokens = max(1.0, M * m.moe_top_k / m.moe_experts)
        out.append((2.0 * tokens * m.expert_dim * D, 3 * m.moe_experts / layout.ep))
    else:
        out.append((2.0 * M * m.hidden_dim / tp * D, 3))
    out.append((2.0 * M * m.vocab_size / tp * D, 0))  # the head: weighted below by its share of the FLOPs
    return out


def shape_efficiency(
    cfg: JobConfig, layout: Layout, B: int, device_key: str, cache: dict | None = None
) -> float | None:
    """How fast the layout's GEMMs run on ``device_key`` relative to the device's largest ones: the
    FLOP-weighted (harmonic) efficiency of its GEMMs (the flat fraction of peak that takes as long as the
    GEMMs at their own efficiencies) over the curve's top value, at most 1; None when the device has no
    curve. The time model multiplies its whole-step efficiency by it (a step also runs non-GEMM work --
    norms, activations, optimizer, launches -- which the curve of bare GEMMs does not see)."""
    entry = efficiency_curves().get(device_key)
    if entry is None:
        return None
    points = entry["gemm"]
    key = ("efficiency", device_key, layout.tp, layout.cp, layout.ep, B)
    if cache is not None and key in cache:
        return cache[key]
    gemms = layout_gemms(cfg, layout, B)
    blocks, head = cached_block_weights(cfg, cache)
    *body, (head_call, _) = gemms
    work = sum(f * n for f, n in body)
    time = sum(f * n / gemm_efficiency(points, f) for f, n in body)
    share = head / (sum(blocks) + head)  # the output projection's part of the model's FLOPs
    eff = 1.0 / ((1 - share) * time / work + share / gemm_efficiency(points, head_call))
    eff /= max(e for _, e in points)
    if cache is not None:
        cache[key] = eff
    return eff
