"""Tensor (+ sequence) parallel plans of the built-in families, as data: ``{module path pattern: style name}``.

The names are defined (and turned into DTensor styles) in
:mod:`meshforge.parallel.tensor_parallel` (``STYLE_NAMES``); how the collectives fall out of
them is described there. A plan names every module of the whole model; a pipeline stage's
missing modules are dropped by the parallel code.
"""

from __future__ import annotations

from ..config import ModelConfig


def decoder_tp_plan(m: ModelConfig) -> dict[str, str]:
    """The plan of :class:`~meshforge.models.decoder.Decoder`.

    An MoE layer's feed-forward runs replicated over tp on the gathered sequence
    (``replicated_moe``): every tp rank computes the same routing, aux losses and expert
    gradients, so router and expert weights stay plain tensors; only its attention is split."""
    block = {
        "attention": "gather_input:3",  # (x, cos, sin): x gathered to the whole sequence
        "attention.wq": "colwise",
        "attention.wk": "colwise",
        "attention.wv": "colwise",
        "attention.wo": "rowwise",
        "feed_forward": "gather_input",
        "feed_forward.w1": "colwise",
        "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise",
        "attention_norm": "norm",
        "ffn_norm": "norm",
    }
    if m.qk_norm:  # per head, on the local heads after the colwise projections; or over the whole projection
        norm = "head_norm" if m.qk_norm_scope == "head" else "channel_norm"
        block["attention.q_norm"] = norm
        block["attention.k_norm"] = norm
    plan = {"tok_embeddings": "embedding"}
    if not m.moe_experts:
        plan.update({f"layers.*.{path}": style for path, style in block.items()})
    else:
        ffn = {k: v for k, v in block.items() if k.startswith("feed_forward")}
        plan.update({f"layers.*.{path}": style for path, style in block.items() if path not in ffn})
        for i in range(m.n_layers):
            if m.is_moe_layer(i):
                plan[f"layers.{i}.feed_forward"] = "replicated_moe"
            else:
                plan.update({f"layers.{i}.{path}": style for path, style in ffn.items()})
    plan["norm"] = "norm"
    plan["output"] = "output"
    return plan


def encoder_decoder_tp_plan(m: ModelConfig) -> dict[str, str]:
    """The plan of :class:`~meshforge.models.encoder_decoder.EncoderDecoder`: both stacks like the
    decoder, but each norm in front of a sublayer gathers its own output (``gathered_norm``: the
    self-attention reads it twice), the final encoder norm is gathered once for every
    cross-attention, and the relative position tables are split by heads (``heads``)."""

    def attention(path: str) -> dict[str, str]:
        return {f"{path}.wq": "colwise", f"{path}.wk": "colwise", f"{path}.wv": "colwise", f"{path}.wo": "rowwise"}

    ffn = {"feed_forward.w1": "colwise", "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise"}
    encoder_block = {"attention_norm": "gathered_norm", **attention("attention"), "ffn_norm": "gathered_norm", **ffn}
    decoder_block = {
        "self_attention_norm": "gathered_norm",
        **attention("self_attention"),
        "cross_attention_norm": "gathered_norm",
        **attention("cross_attention"),
        "ffn_norm": "gathered_norm",
        **ffn,
    }
    plan = {"tok_embeddings": "embedding", "encoder.rel_bias": "heads", "decoder.rel_bias": "heads"}
    plan.update({f"encoder.layers.*.{k}": v for k, v in encoder_block.items()})
    plan["encoder.norm"] = "gathered_norm"
    plan.update({f"decoder.layers.*.{k}": v for k, v in decoder_block.items()})
    plan["decoder.norm"] = "norm"
    plan["output"] = "output"
    return plan


__all__ = ["decoder_tp_plan", "encoder_decoder_tp_plan"]
