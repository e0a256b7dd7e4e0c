"""Hugging Face T5 (v1.1 layout) <-> meshforge encoder-decoder parameter names.

HF keeps the relative position bias in block 0 of each stack; meshforge keeps it on the
stack (it is shared by every layer either way). Only gated feed-forwards map (T5 v1.1's
``feed_forward_proj = "gated-gelu"``).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def hf_t5_config_to_model_config(hf) -> ModelConfig:
    """A meshforge ModelConfig equivalent to a transformers ``T5Config`` (v1.1, gated-GELU)."""
    if not getattr(hf, "is_gated_act", False) or "gelu" not in hf.dense_act_fn:
        raise ValueError(f"only gated-GELU T5 (v1.1) maps onto meshforge, got feed_forward_proj={hf.feed_forward_proj}")
    if getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings) != hf.tie_word_embeddings:
        raise ValueError("meshforge scales decoder outputs by d_model^-1/2 exactly when embeddings are tied")
    if hf.d_kv * hf.num_heads != hf.d_model:
        raise ValueError(f"d_kv * num_heads ({hf.d_kv} * {hf.num_heads}) must equal d_model ({hf.d_model})")
    return ModelConfig(
        family="encoder_decoder", vocab_size=hf.vocab_size, dim=hf.d_model, n_layers=hf.num_layers,
        n_decoder_layers=hf.num_decoder_layers, n_heads=hf.num_heads, ffn_dim=hf.d_ff,
        position_encoding="relative", rel_pos_buckets=hf.relative_attention_num_buckets,
        rel_pos_max_distance=hf.relative_attention_max_distance, ffn_activation="gelu", attn_scale=1.0,
        norm_eps=hf.layer_norm_epsilon, tie_embeddings=hf.tie_word_embeddings, max_seq_len=512,
    )


def _attn(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.w{a}.weight", f"{theirs}.{b}.weight") for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))]


def _ffn(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.w1.weight", f"{theirs}.wi_0.weight"), (f"{ours}.w3.weight", f"{theirs}.wi_1.weight"),
            (f"{ours}.w2.weight", f"{theirs}.wo.weight")]


def name_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(meshforge name, HF name) for every parameter."""
    pairs = [("tok_embeddings.weight", "shared.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("output.weight", "lm_head.weight"))
    pairs += [("encoder.rel_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              ("decoder.rel_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              ("encoder.norm.weight", "encoder.final_layer_norm.weight"),
              ("decoder.norm.weight", "decoder.final_layer_norm.weight")]
    for i in range(cfg.n_layers):
        e, h = f"encoder.layers.{i}", f"encoder.block.{i}.layer"
        pairs += _attn(f"{e}.attention", f"{h}.0.SelfAttention")
        pairs += [(f"{e}.attention_norm.weight", f"{h}.0.layer_norm.weight"),
                  (f"{e}.ffn_norm.weight", f"{h}.1.layer_norm.weight")]
        pairs += _ffn(f"{e}.feed_forward", f"{h}.1.DenseReluDense")
    for i in range(cfg.n_decoder_layers or cfg.n_layers):
        d, h = f"decoder.layers.{i}", f"decoder.block.{i}.layer"
        pairs += _attn(f"{d}.self_attention", f"{h}.0.SelfAttention")
        pairs += _attn(f"{d}.cross_attention", f"{h}.1.EncDecAttention")
        pairs += [(f"{d}.self_attention_norm.weight", f"{h}.0.layer_norm.weight"),
                  (f"{d}.cross_attention_norm.weight", f"{h}.1.layer_norm.weight"),
                  (f"{d}.ffn_norm.weight", f"{h}.2.layer_norm.weight")]
        pairs += _ffn(f"{d}.feed_forward", f"{h}.2.DenseReluDense")
    return pairs


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        if key in hf_state and not torch.equal(hf_state[key], hf_state["shared.weight"]):
            raise ValueError(f"{key} differs from shared.weight: meshforge has one input embedding for both stacks")
    return {ours: hf_state[theirs] for ours, theirs in name_map(cfg)}


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {theirs: state[ours] for ours, theirs in name_map(cfg)}
