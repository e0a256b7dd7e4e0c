"""Hugging Face T5 (v1.1 layout) <-> meshforge encoder-decoder parameter names.

HF keeps the relative position bias in block 0 of each stack; meshforge keeps it on the
stack (it is shared by every layer either way). Only gated feed-forwards map (T5 v1.1's
``feed_forward_proj = "gated-gelu"``).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..models import family_spec
from .safetensors_io import ConvertError

CONVERTER = "hf_t5"
"""This module's name in ``ModelSpec.hf_converter`` (the encoder-decoder family's)."""


def _tied(hf) -> bool:
    """Whether HF scales the decoder output by d_model^-1/2 and shares the embedding with the head.

    transformers 5 forces ``tie_word_embeddings = True`` on every T5Config and keeps what the
    config file said in ``scale_decoder_outputs`` (T5 v1.1 files say ``false``: no scaling, own
    ``lm_head``); transformers 4 keeps ``tie_word_embeddings`` as written.
    """
    return bool(getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings))


def hf_t5_config_to_model_config(hf) -> ModelConfig:
    """A meshforge ModelConfig equivalent to a transformers ``T5Config`` (v1.1, gated-GELU)."""
    if not getattr(hf, "is_gated_act", False) or "gelu" not in hf.dense_act_fn:
        raise ConvertError(
            f"only gated-GELU T5 (v1.1) maps onto meshforge, got feed_forward_proj={hf.feed_forward_proj}"
        )
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=hf.vocab_size,
        dim=hf.d_model,
        n_layers=hf.num_layers,
        head_size=0 if hf.d_kv * hf.num_heads == hf.d_model else hf.d_kv,
        n_decoder_layers=hf.num_decoder_layers or hf.num_layers,
        n_heads=hf.num_heads,
        ffn_dim=hf.d_ff,
        position_encoding="relative",
        rel_pos_buckets=hf.relative_attention_num_buckets,
        rel_pos_max_distance=hf.relative_attention_max_distance,
        ffn_activation="gelu",
        attn_scale=1.0,
        norm_eps=hf.layer_norm_epsilon,
        tie_embeddings=_tied(hf),
        max_seq_len=512,
    )


def check_exportable(cfg: ModelConfig) -> None:
    """ConvertError naming the first feature of ``cfg`` that T5ForConditionalGeneration cannot compute."""
    problems = [
        (family_spec(cfg.family).hf_converter != CONVERTER, f"model.family = {cfg.family!r} is not an encoder-decoder"),
        (
            cfg.position_encoding != "relative",
            f"RoPE in an encoder-decoder (model.position_encoding = "
            f"{cfg.position_encoding!r}): T5 has only relative position bias",
        ),
        (
            cfg.attn_scale != 1.0,
            f"attention scale model.attn_scale = {cfg.attn_scale} (0 means 1/sqrt(head_dim)): "
            "T5 never scales attention logits (it needs attn_scale = 1)",
        ),
        (
            cfg.kv_heads != cfg.n_heads,
            f"grouped-query attention (model.n_kv_heads = {cfg.n_kv_heads} < n_heads = "
            f"{cfg.n_heads}): T5 has as many key/value heads as query heads",
        ),
        (cfg.ffn_activation != "gelu", f"model.ffn_activation = {cfg.ffn_activation!r}: T5 v1.1 is gated-GELU"),
        (cfg.moe_experts > 0, "MoE feed-forwards (model.moe_experts > 0): T5 is dense"),
    ]
    for bad, why in problems:
        if bad:
            raise ConvertError(f"cannot export to Hugging Face T5: {why}")


def hf_config(cfg: ModelConfig, token_ids: dict[str, int]):
    """The ``T5Config`` of a meshforge encoder-decoder (checked by :func:`check_exportable`)."""
    from transformers import T5Config

    hf = T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.head_dim,
        d_ff=cfg.hidden_dim,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.rel_pos_buckets,
        relative_attention_max_distance=cfg.rel_pos_max_distance,
        dropout_rate=0.0,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=cfg.tie_embeddings,
        is_encoder_decoder=True,
        decoder_start_token_id=token_ids["pad_token_id"],
        pad_token_id=token_ids["pad_token_id"],
        eos_token_id=token_ids["eos_token_id"],
    )
    hf.architectures = ["T5ForConditionalGeneration"]
    return hf


def _attn(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [
        (f"{ours}.w{a}.weight", f"{theirs}.{b}.weight") for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))
    ]


def _ffn(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [
        (f"{ours}.w1.weight", f"{theirs}.wi_0.weight"),
        (f"{ours}.w3.weight", f"{theirs}.wi_1.weight"),
        (f"{ours}.w2.weight", f"{theirs}.wo.weight"),
    ]


def name_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(meshforge name, HF name) for every parameter (only meshforge's T5 layout: see check_exportable)."""
    pairs = [("tok_embeddings.weight", "shared.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("output.weight", "lm_head.weight"))
    pairs += [
        ("encoder.rel_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        ("decoder.rel_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        ("encoder.norm.weight", "encoder.final_layer_norm.weight"),
        ("decoder.norm.weight", "decoder.final_layer_norm.weight"),
    ]
    for i in range(cfg.n_layers):
        e, h = f"encoder.layers.{i}", f"encoder.block.{i}.layer"
        pairs += _attn(f"{e}.attention", f"{h}.0.SelfAttention")
        pairs += [
            (f"{e}.attention_norm.weight", f"{h}.0.layer_norm.weight"),
            (f"{e}.ffn_norm.weight", f"{h}.1.layer_norm.weight"),
        ]
        pairs += _ffn(f"{e}.feed_forward", f"{h}.1.DenseReluDense")
    for i in range(cfg.n_decoder_layers or cfg.n_layers):
        d, h = f"decoder.layers.{i}", f"decoder.block.{i}.layer"
        pairs += _attn(f"{d}.self_attention", f"{h}.0.SelfAttention")
        pairs += _attn(f"{d}.cross_attention", f"{h}.1.EncDecAttention")
        pairs += [
            (f"{d}.self_attention_norm.weight", f"{h}.0.layer_norm.weight"),
            (f"{d}.cross_attention_norm.weight", f"{h}.1.layer_norm.weight"),
            (f"{d}.ffn_norm.weight", f"{h}.2.layer_norm.weight"),
        ]
        pairs += _ffn(f"{d}.feed_forward", f"{h}.2.DenseReluDense")
    return pairs


def from_hf(hf_state, cfg: ModelConfig, pairs: list[tuple[str, str]] | None = None) -> dict[str, torch.Tensor]:
    """meshforge state from an HF T5 state (a dict, or anything with ``in`` and ``[]`` / ``get``); ``pairs``:
    (meshforge name, HF name), default :func:`name_map`."""
    get = hf_state.get if hasattr(hf_state, "get") and not isinstance(hf_state, dict) else hf_state.__getitem__
    shared = get("shared.weight")
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        if key in hf_state and not torch.equal(get(key), shared):
            raise ConvertError(f"{key} differs from shared.weight: meshforge has one input embedding for both stacks")
    if cfg.tie_embeddings and "lm_head.weight" in hf_state and not torch.equal(get("lm_head.weight"), shared):
        raise ConvertError(
            "the config scales decoder outputs (tied embeddings) but lm_head.weight differs from "
            "shared.weight: meshforge scales exactly when the head is the embedding"
        )
    return {
        ours: get(theirs).clone() if theirs == "shared.weight" and ours != "tok_embeddings.weight" else get(theirs)
        for ours, theirs in (pairs or name_map(cfg))
    }


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {theirs: state[ours] for ours, theirs in name_map(cfg)}


# --------------------------------------------------------------------------- the converter interface
# (what export/import/inspect call for a family whose spec names this module: see convert/families.py)

ARCHITECTURES = ("T5ForConditionalGeneration",)
"""The Hugging Face architectures this module imports."""
SEQ2SEQ = True
"""The exported tokenizer is a sequence-to-sequence one (decoder start = pad)."""


def exports_to(m: ModelConfig) -> str:
    check_exportable(m)
    return ARCHITECTURES[0]


def export_plan(m: ModelConfig, token_ids: dict[str, int], dtype: str, reader) -> tuple[object, list, set[str]]:
    """(HF config, ``(HF name, our name, None)`` per HF tensor, our names kept fp32: none)."""
    check_exportable(m)
    return hf_config(m, token_ids), [(theirs, ours, None) for ours, theirs in name_map(m)], set()


def import_plan(hf, names: set[str]) -> tuple[ModelConfig, list, set[str], str]:
    """(our config, name map, HF tensors that may be present unmapped, the HF embedding's name) of the HF
    config ``hf`` whose files hold the tensors ``names``.

    A T5 v1.1 saved by transformers 5 has an unscaled head tied to the embedding (the config says
    ``tie_word_embeddings = true``, ``scale_decoder_outputs = false``; no ``lm_head.weight`` in the files):
    meshforge keeps it as an untied output projection starting from the embedding, which computes the same.
    """
    m = hf_t5_config_to_model_config(hf)
    extra_ok = {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
    head = (
        "lm_head.weight"
        if m.tie_embeddings or "lm_head.weight" in names or not hf.tie_word_embeddings
        else "shared.weight"
    )
    pairs = [(head if theirs == "lm_head.weight" else theirs, ours, None) for ours, theirs in name_map(m)]
    return m, pairs, extra_ok, "shared.weight"


def import_state(files, m: ModelConfig, pairs) -> dict[str, torch.Tensor]:
    return from_hf(files, m, [(ours, theirs) for theirs, ours, _ in pairs])
