"""Model families and how to build them.

``build_model(cfg, device)`` creates the model on the meta device (no memory, no init
cost), materialises it on ``device`` and initialises it explicitly with torch's global
RNG, so the same seed gives the same weights on any device layout that initialises the
full model before sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .decoder import Decoder
from .encoder_decoder import EncoderDecoder


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the system needs to know about a model family."""

    name: str
    build: Callable[[ModelConfig], nn.Module]


MODEL_SPECS: dict[str, ModelSpec] = {
    "decoder": ModelSpec("decoder", Decoder),
    "encoder_decoder": ModelSpec("encoder_decoder", EncoderDecoder),
}


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", init: bool = True) -> nn.Module:
    spec = MODEL_SPECS[cfg.family]
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if init:
        model.init_weights()
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, in forward order: the units that parallel/ wraps (checkpointing,
    compile, FSDP). A decoder (or a pipeline stage of one) keeps them in ``layers``; an
    encoder-decoder in ``encoder.layers`` then ``decoder.layers``."""
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return [*model.encoder.layers.values(), *model.decoder.layers.values()]
    return list(model.layers.values())


def active_params(model: nn.Module, cfg: ModelConfig) -> int:
    """Parameters a token passes through: no input embedding (a lookup), only top-k (+ shared)
    experts of each MoE layer. The N of the 6N FLOPs rule."""
    from .moe import GroupedExperts

    n = 0
    for name, p in model.named_parameters():  # a tied embedding counts once, as the output
        if name.startswith("tok_embeddings.") and not cfg.tie_embeddings:
            continue
        n += p.numel()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            per_expert = sum(p.numel() for p in m.parameters()) // cfg.moe_experts
            n -= per_expert * (cfg.moe_experts - cfg.moe_top_k)
    return n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B).

    N excludes the input embedding (a lookup, no matmul) but includes the output
    projection; L layers, H heads, Q head dim, T sequence length.
    """
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def encoder_decoder_flops_per_token(model: nn.Module, cfg: ModelConfig, enc_len: int, dec_len: int) -> float:
    """Training FLOPs per token (encoder + decoder tokens) of an encoder-decoder, by the same rule.

    Each weight does 6 FLOPs per token it sees: encoder weights see ``enc_len`` tokens, decoder
    weights (and the output) ``dec_len`` -- except cross-attention's key/value projections,
    which read the encoder output (``enc_len``). Attention scores: 12 * H * Q per (query, key)
    pair per layer: enc_len^2 (encoder), dec_len^2 (decoder), dec_len * enc_len (cross).
    """
    by_stack = {"encoder": 0, "decoder": 0}
    for stack in by_stack:
        sub = getattr(model, stack)
        by_stack[stack] = active_params(sub, cfg)
    cross_kv = sum(p.numel() for n, p in model.decoder.named_parameters()
                   if ".cross_attention.wk." in f".{n}" or ".cross_attention.wv." in f".{n}")
    n_dec = by_stack["decoder"] + model.output.weight.numel() - cross_kv
    hq = 12 * cfg.n_heads * cfg.head_dim
    n_dec_layers = cfg.n_decoder_layers or cfg.n_layers
    flops = (6 * (by_stack["encoder"] + cross_kv) * enc_len + 6 * n_dec * dec_len
             + hq * cfg.n_layers * enc_len * enc_len + hq * n_dec_layers * (dec_len * dec_len + dec_len * enc_len))
    return flops / (enc_len + dec_len)


__all__ = ["Decoder", "EncoderDecoder", "MODEL_SPECS", "ModelSpec", "active_params", "build_model", "encoder_decoder_flops_per_token", "flops_per_token", "transformer_blocks"]
