"""Model families and how to build them.

Each family is a :class:`~meshforge.models.spec.ModelSpec` in ``MODEL_SPECS``; the two built-in
ones (``decoder``, ``encoder_decoder``) are registered at the end of this file. Everything
outside ``models/`` asks ``family_spec(cfg.family)`` instead of comparing family names.

``build_model(cfg, device)`` creates the model on the meta device (no memory, no init
cost), materialises it on ``device`` and initialises it explicitly with torch's global
RNG, so the same seed gives the same weights on any device layout that initialises the
full model before sharding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ENCODER_DECODER_OBJECTIVES, ModelConfig
from .decoder import Decoder
from .decoder_stage import (
    decoder_blocks,
    decoder_pipeline_blocks,
    decoder_stage,
    decoder_stage_inputs,
    decoder_stage_view,
)
from .encoder_decoder import EncoderDecoder
from .encoder_decoder_stage import (
    EncoderDecoderStage,
    encoder_decoder_blocks,
    encoder_decoder_pipeline_blocks,
    encoder_decoder_stage_inputs,
    encoder_decoder_stage_view,
)
from .family_checks import check_config, resolve_objective
from .spec import ARCHITECTURE_OPTIONS, MODEL_SPECS, ModelSpec, families_with, family_spec, register
from .tp_plans import decoder_tp_plan, encoder_decoder_tp_plan


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", init: bool = True) -> nn.Module:
    spec = family_spec(cfg.family)
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if init:
        model.init_weights()
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (or of a pipeline stage of one), in forward order: the units
    that parallel/ wraps (checkpointing, compile, FSDP). Its family's spec says which they are."""
    return list(family_spec(model.cfg.family).blocks(model).values())


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
    cross_kv = sum(
        p.numel()
        for n, p in model.decoder.named_parameters()
        if ".cross_attention.wk." in f".{n}" or ".cross_attention.wv." in f".{n}"
    )
    n_dec = by_stack["decoder"] + model.output.weight.numel() - cross_kv
    hq = 12 * cfg.n_heads * cfg.head_dim
    n_dec_layers = cfg.n_decoder_layers or cfg.n_layers
    flops = (
        6 * (by_stack["encoder"] + cross_kv) * enc_len
        + 6 * n_dec * dec_len
        + hq * cfg.n_layers * enc_len * enc_len
        + hq * n_dec_layers * (dec_len * dec_len + dec_len * enc_len)
    )
    return flops / (enc_len + dec_len)


def decoder_flops(model: nn.Module, cfg: ModelConfig, lengths: tuple[int, ...]) -> float:
    """:func:`flops_per_token` of a decoder reading ``lengths = (seq_len,)``."""
    return flops_per_token(cfg, active_params(model, cfg), lengths[-1])


def encoder_decoder_flops(model: nn.Module, cfg: ModelConfig, lengths: tuple[int, ...]) -> float:
    """:func:`encoder_decoder_flops_per_token` for ``lengths = (encoder_len, decoder_len)``; one length
    (no objective to split it) counts like a decoder's sequence."""
    if len(lengths) == 1:
        return decoder_flops(model, cfg, lengths)
    return encoder_decoder_flops_per_token(model, cfg, *lengths)


register(
    ModelSpec(
        "decoder",
        Decoder,
        blocks=decoder_blocks,
        tp_plan=decoder_tp_plan,
        pipeline_blocks=decoder_pipeline_blocks,
        stage=decoder_stage,
        stage_view=decoder_stage_view,
        stage_inputs=decoder_stage_inputs,
        flops_per_token=decoder_flops,
        objectives=("lm",),
        position_encodings=("rope",),
        hf_converter="hf_decoder",
        supports_moe_parallel=True,
        supports_context_parallel=True,
        supports_fused_loss=True,
        supports_mup=True,
        supports_scaling_sweeps=True,
        supports_grow=True,
        model_options=ARCHITECTURE_OPTIONS,
        uniform_blocks=lambda cfg: len({cfg.is_moe_layer(i) for i in range(cfg.n_layers)}) == 1,
    )
)
register(
    ModelSpec(
        "encoder_decoder",
        EncoderDecoder,
        blocks=encoder_decoder_blocks,
        tp_plan=encoder_decoder_tp_plan,
        pipeline_blocks=encoder_decoder_pipeline_blocks,
        stage=EncoderDecoderStage,
        stage_view=encoder_decoder_stage_view,
        stage_inputs=encoder_decoder_stage_inputs,
        flops_per_token=encoder_decoder_flops,
        objectives=ENCODER_DECODER_OBJECTIVES,
        position_encodings=("relative", "rope"),
        hf_converter="hf_t5",
        model_options=("head_size",),
    )
)


__all__ = [
    "Decoder",
    "EncoderDecoder",
    "MODEL_SPECS",
    "ModelSpec",
    "active_params",
    "build_model",
    "check_config",
    "encoder_decoder_flops_per_token",
    "families_with",
    "family_spec",
    "flops_per_token",
    "register",
    "resolve_objective",
    "transformer_blocks",
]
