"""Compute of one step on a rank: how the model's FLOPs split over pipeline stages.

FLOPs per token by block (in pipeline order) and for the head, from the parameter table
(:mod:`.state`): 6 per weight per token (MoE experts at ``top_k / experts`` of theirs), plus
attention's ``12 H Q T`` per block (PaLM appendix B), the output projection on the last stage
(also when tied to the embedding: the weight is then a copy on the last stage), the embedding
lookup none. A pipeline runs at the pace of its slowest rank, so a rank's share is that of the
heaviest pipeline rank (its stages' blocks, the output on the last stage), which is ``1 / pp``
only when the layers divide evenly and the head weighs nothing.
"""

from __future__ import annotations

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


def heaviest_share(cfg: JobConfig, layout: Layout, cache: dict | None = None) -> float:
    """The fraction of the model's FLOPs per token that the busiest pipeline rank runs (1 without pp)."""
    if layout.pp == 1:
        return 1.0
    from ..parallel.mesh import pipeline_layers
    from ..parallel.pipeline import split_layers

    key = ("heaviest", layout.pp, layout.spr)
    if cache is not None and key in cache:
        return cache[key]
    if cache is not None and "block_weights" in cache:
        blocks, head = cache["block_weights"]
    else:
        blocks, head = block_weights(cfg)
        if cache is not None:
            cache["block_weights"] = (blocks, head)
    n_stages = layout.pp * layout.spr
    ranges = split_layers(pipeline_layers(cfg.model)[0], n_stages, cfg.parallel.pp_split)
    per_rank = [0.0] * layout.pp
    for s, (a, b) in enumerate(ranges):
        per_rank[s % layout.pp] += sum(blocks[a:b]) + (head if s == n_stages - 1 else 0.0)
    share = max(per_rank) / (sum(blocks) + head)
    if cache is not None:
        cache[key] = share
    return share
