"""The meshforge decoder's ``[model]`` <-> a Hugging Face decoder config, both ways.

Which HF class computes what a meshforge decoder computes (``choose_family``), that class's
config for a ModelConfig (``hf_config``), and the ModelConfig of an HF config
(``model_config_from_hf``): every HF option either maps to a model option or, when it
changes the math in a way meshforge does not reproduce, is refused by name.

    meshforge option                 HF config
    head_size                        head_dim (0 when it is hidden_size / heads)
    qkv_bias                         Qwen2 (always), GLM-4.5 attention_bias (q/k/v only)
    rope_scaling + rope_*            rope_parameters: rope_type linear / llama3 / yarn, factor, ...
    rope_fraction                    rope_parameters.partial_rotary_factor (GLM-4.5)
    moe_routed_scale                 routed_scaling_factor (GLM-4.5)
    sliding_window                   sliding_window (Mistral, Mixtral); Qwen use_sliding_window on
                                       every layer (max_window_layers = 0)
    qk_norm_scope = projection,      OLMo 2 (q_norm / k_norm over the whole projection, norms after
      norm_placement = post            attention and MLP)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..models import family_spec
from .safetensors_io import ConvertError

CONVERTER = "hf_decoder"
"""The decoder converter's name in ``ModelSpec.hf_converter``."""


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str


LLAMA = Family("llama", "LlamaForCausalLM", "llama")
MISTRAL = Family("mistral", "MistralForCausalLM", "mistral")
QWEN2 = Family("qwen2", "Qwen2ForCausalLM", "qwen2")
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", "qwen3")
OLMO2 = Family("olmo2", "Olmo2ForCausalLM", "olmo2")
MIXTRAL = Family("mixtral", "MixtralForCausalLM", "mixtral")
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe")
GLM4_MOE = Family("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe")
FAMILIES = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, OLMO2, MIXTRAL, QWEN3_MOE, GLM4_MOE)}
SLIDING = (MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE)
"""Families whose config has a sliding window over every layer."""


def _refuse(checks) -> None:
    for refused, why in checks:
        if refused:
            raise ConvertError(f"cannot export to Hugging Face: {why}")


def _choose_dense(m: ModelConfig) -> Family:
    if m.norm_placement == "post" or m.qk_norm_scope == "projection":
        _refuse(
            [
                (
                    not (m.norm_placement == "post" and m.qk_norm and m.qk_norm_scope == "projection"),
                    "post-norm blocks and whole-projection q/k norm come together in the one HF class with either "
                    "(OLMo 2): set model.norm_placement = 'post', model.qk_norm = true, model.qk_norm_scope = "
                    "'projection'",
                ),
                (m.qkv_bias, "q/k/v biases with OLMo 2's blocks (its attention_bias adds an output bias too)"),
                (m.sliding_window > 0, "sliding-window attention with OLMo 2's blocks"),
            ]
        )
        return OLMO2
    if m.qk_norm:
        _refuse([(m.qkv_bias, "q/k/v biases with qk-norm (Qwen3's attention_bias adds an output bias too)")])
        return QWEN3
    if m.qkv_bias:
        return QWEN2
    return MISTRAL if m.sliding_window else LLAMA


def _choose_moe(m: ModelConfig) -> Family:
    _refuse(
        [
            (
                m.moe_capacity_factor > 0,
                f"capacity dropping (model.moe_capacity_factor = {m.moe_capacity_factor}): "
                "HF MoE classes route dropless",
            ),
            (
                m.norm_placement == "post" or m.qk_norm_scope == "projection",
                "post-norm blocks or whole-projection q/k norm in an MoE (no HF MoE class has them)",
            ),
        ]
    )
    if m.moe_score == "sigmoid":
        _refuse(
            [
                (
                    not m.moe_shared_experts,
                    "sigmoid routing without shared experts (the HF class with meshforge's "
                    "sigmoid routing, Glm4Moe, always has a shared expert)",
                ),
                (m.sliding_window > 0, "sliding-window attention in a GLM-4.5 MoE"),
            ]
        )
        return GLM4_MOE
    refusals = [
        (
            m.moe_routed_scale != 1.0,
            f"scaled routed experts (model.moe_routed_scale = {m.moe_routed_scale}) with "
            "softmax routing: only GLM-4.5 (sigmoid routing) scales them",
        ),
        (
            m.moe_shared_experts > 0,
            f"shared experts with softmax routing (model.moe_shared_experts = "
            f"{m.moe_shared_experts}): Qwen2-MoE gates its shared expert with a sigmoid",
        ),
        (
            m.moe_bias_update_rate > 0,
            "the aux-loss-free routing bias (model.moe_bias_update_rate > 0) with softmax "
            "routing: no HF softmax-routed class has a routing bias",
        ),
        (m.qkv_bias, "q/k/v biases with softmax routing (Mixtral and Qwen3-MoE have none)"),
    ]
    if not m.qk_norm:  # Mixtral; Qwen3-MoE would add the q/k norms meshforge does not have
        refusals += [
            (
                not m.moe_norm_topk,
                "un-normalised top-k weights (model.moe_norm_topk = false) without qk-norm: "
                "Mixtral renormalises, Qwen3-MoE has qk-norm",
            ),
            (
                m.moe_dense_layers > 0,
                f"dense first layers (model.moe_dense_layers = {m.moe_dense_layers}) without "
                "qk-norm: every Mixtral layer is an MoE, Qwen3-MoE has qk-norm",
            ),
        ]
    _refuse(refusals)
    return QWEN3_MOE if m.qk_norm else MIXTRAL


def choose_family(m: ModelConfig) -> Family:
    """The HF class that computes exactly what ``m`` computes, or ConvertError naming what does not map."""
    if family_spec(m.family).hf_converter != CONVERTER:
        raise ConvertError(f"model.family = {m.family!r} is not a decoder")
    if m.ffn_activation != "silu":
        raise ConvertError(f"model.ffn_activation = {m.ffn_activation!r}: the HF decoder classes use SwiGLU (silu)")
    if m.attn_scale and abs(m.attn_scale - m.head_dim**-0.5) > 1e-12:
        raise ConvertError(
            f"model.attn_scale = {m.attn_scale}: HF decoders scale attention logits by "
            f"1/sqrt(head_dim) = {m.head_dim**-0.5:.6g}"
        )
    if m.mup_base_dim:
        raise ConvertError(
            f"model.mup_base_dim = {m.mup_base_dim}: muP divides the logits by the width multiplier "
            "(dim / mup_base_dim), which no HF decoder class does"
        )
    family = _choose_moe(m) if m.moe_experts else _choose_dense(m)
    _refuse(
        [
            (
                m.rope_fraction != 1.0 and family is not GLM4_MOE,
                f"partial rotary (model.rope_fraction = {m.rope_fraction}) outside a GLM-4.5 MoE: the other HF "
                "decoder classes rotate the whole head",
            ),
            (
                m.rope_dim != int(m.head_dim * m.rope_fraction),
                f"model.rope_fraction = {m.rope_fraction} of {m.head_dim} channels is not an even count",
            ),
        ]
    )
    return family


def rope_parameters(m: ModelConfig) -> dict:
    """HF ``rope_parameters`` of ``m``."""
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    original = {"original_max_position_embeddings": m.rope_original_max_seq_len or m.max_seq_len}
    if m.rope_scaling == "linear":
        rope["factor"] = m.rope_factor
    elif m.rope_scaling == "llama3":
        rope.update(
            factor=m.rope_factor,
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            **original,
        )
    elif m.rope_scaling == "yarn":
        rope.update(
            factor=m.rope_factor, beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow, truncate=True, **original
        )
    if m.rope_fraction != 1.0:
        rope["partial_rotary_factor"] = m.rope_fraction
    return rope


def hf_config(m: ModelConfig, family: Family, token_ids: dict[str, int], dtype: str):
    """The transformers config object of ``family`` for ``m``."""
    import transformers

    window = m.sliding_window or None
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_parameters=rope_parameters(m),
        tie_word_embeddings=m.tie_embeddings,
        attention_dropout=0.0,
        dtype=dtype,
        **token_ids,
    )
    qwen_window = dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    if family is LLAMA:
        cfg = transformers.LlamaConfig(
            intermediate_size=m.hidden_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1, **common
        )
    elif family is MISTRAL:
        cfg = transformers.MistralConfig(intermediate_size=m.hidden_dim, sliding_window=window, **common)
    elif family is QWEN2:
        cfg = transformers.Qwen2Config(intermediate_size=m.hidden_dim, **qwen_window, **common)
    elif family is QWEN3:
        cfg = transformers.Qwen3Config(intermediate_size=m.hidden_dim, attention_bias=False, **qwen_window, **common)
    elif family is OLMO2:
        cfg = transformers.Olmo2Config(intermediate_size=m.hidden_dim, attention_bias=False, **common)
    elif family is QWEN3_MOE:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=m.hidden_dim,
            moe_intermediate_size=m.expert_dim,
            num_experts=m.moe_experts,
            num_experts_per_tok=m.moe_top_k,
            norm_topk_prob=m.moe_norm_topk,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(m.moe_dense_layers)),
            attention_bias=False,
            use_sliding_window=window is not None,
            sliding_window=window,
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coef,
            **common,
        )
    elif family is GLM4_MOE:
        common["rope_parameters"] = {"partial_rotary_factor": 1.0, **common["rope_parameters"]}
        cfg = transformers.Glm4MoeConfig(
            intermediate_size=m.hidden_dim,
            moe_intermediate_size=m.expert_dim,
            n_routed_experts=m.moe_experts,
            num_experts_per_tok=m.moe_top_k,
            n_shared_experts=m.moe_shared_experts,
            first_k_dense_replace=m.moe_dense_layers,
            norm_topk_prob=m.moe_norm_topk,
            routed_scaling_factor=m.moe_routed_scale,
            n_group=1,
            topk_group=1,
            use_qk_norm=m.qk_norm,
            attention_bias=m.qkv_bias,
            **common,
        )
    else:
        cfg = transformers.MixtralConfig(
            intermediate_size=m.expert_dim,
            num_local_experts=m.moe_experts,
            num_experts_per_tok=m.moe_top_k,
            sliding_window=window,
            router_jitter_noise=0.0,
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coef,
            **common,
        )
    cfg.architectures = [family.architecture]
    return cfg


def _get(hf, key, default=None):
    return getattr(hf, key, default)


def _rope_options(hf, arch: str) -> dict:
    """The model.rope_* options of the HF ``rope_parameters`` (ConvertError for a kind meshforge lacks)."""
    rope = dict(_get(hf, "rope_parameters") or {})
    kind = rope.get("rope_type", "default")
    out = {
        "rope_theta": float(rope.get("rope_theta", 1e4)),
        "rope_fraction": float(rope.get("partial_rotary_factor", 1.0)),
    }
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "yarn"):
        raise ConvertError(
            f"cannot import {arch}: RoPE scaling rope_type = {kind!r} (meshforge has linear, llama3, yarn)"
        )
    out.update(
        rope_scaling=kind,
        rope_factor=float(rope["factor"]),
        rope_original_max_seq_len=int(rope.get("original_max_position_embeddings") or 0),
    )
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"])
        )
    if kind == "yarn":
        default_attention = 0.1 * math.log(out["rope_factor"]) + 1.0 if out["rope_factor"] > 1 else 1.0
        odd = [k for k in ("mscale", "mscale_all_dim") if rope.get(k)]
        if rope.get("attention_factor") not in (None, default_attention):
            odd.append("attention_factor")
        if rope.get("truncate", True) is False:
            odd.append("truncate = false")
        if odd:
            raise ConvertError(
                f"cannot import {arch}: YaRN with {', '.join(odd)} (meshforge's yarn scales cos and sin "
                "by 0.1 ln(factor) + 1 over truncated correction ranges)"
            )
        out.update(rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1))
    return out


def _sliding_window(hf, family: Family, arch: str) -> int:
    window = _get(hf, "sliding_window")
    if family in (QWEN2, QWEN3):
        kinds = set(_get(hf, "layer_types") or ["full_attention"])
        if kinds == {"full_attention"}:
            return 0
        if kinds != {"sliding_attention"}:
            raise ConvertError(
                f"cannot import {arch}: sliding-window attention on some layers only (layer_types / "
                "max_window_layers); meshforge's window applies to every layer"
            )
        return int(window)
    if family in SLIDING:
        return int(window or 0)
    if window or _get(hf, "use_sliding_window"):
        raise ConvertError(f"cannot import {arch}: sliding-window attention")
    return 0


def model_config_from_hf(hf) -> tuple[ModelConfig, Family]:
    """A meshforge ModelConfig computing what the HF decoder config ``hf`` computes (or ConvertError)."""
    arch = (_get(hf, "architectures") or [""])[0]
    if arch not in FAMILIES:
        raise ConvertError(
            f"unknown Hugging Face architecture {arch!r}; supported: "
            f"{', '.join([*FAMILIES, 'T5ForConditionalGeneration'])}"
        )
    family = FAMILIES[arch]
    head_dim = _get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads
    bias = bool(_get(hf, "attention_bias"))
    problems = [
        (_get(hf, "hidden_act") != "silu", f"hidden_act = {_get(hf, 'hidden_act')!r} (meshforge decoders use silu)"),
        (
            bias and family is not GLM4_MOE,
            "attention_bias = true (it also adds an output-projection bias, which "
            "meshforge does not have; q/k/v biases alone are Qwen2's)",
        ),
        (bool(_get(hf, "mlp_bias")), "mlp_bias = true (meshforge feed-forwards have no bias)"),
        (
            family is GLM4_MOE and (_get(hf, "topk_group") != _get(hf, "n_group") or not _get(hf, "n_shared_experts")),
            "group-limited routing (topk_group < n_group) or no shared expert",
        ),
        ((_get(hf, "pretraining_tp") or 1) != 1, "pretraining_tp != 1"),
        (bool(_get(hf, "router_jitter_noise")), "router jitter noise"),
    ]
    for bad, why in problems:
        if bad:
            raise ConvertError(f"cannot import {arch}: {why}")
    rope = _rope_options(hf, arch)
    if rope["rope_fraction"] != 1.0 and family is not GLM4_MOE:
        raise ConvertError(f"cannot import {arch}: partial rotary ({rope['rope_fraction']})")
    kw = dict(
        family="decoder",
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_size=0 if head_dim * hf.num_attention_heads == hf.hidden_size else head_dim,
        ffn_dim=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qk_norm=family in (QWEN3, QWEN3_MOE, OLMO2) or bool(_get(hf, "use_qk_norm")),
        ffn_activation="silu",
        attn_scale=0.0,
        qkv_bias=family is QWEN2 or bias,
        sliding_window=_sliding_window(hf, family, arch),
        **rope,
    )
    if family is OLMO2:
        kw.update(qk_norm_scope="projection", norm_placement="post")
    if family is MIXTRAL:
        kw.update(
            moe_experts=hf.num_local_experts,
            moe_top_k=hf.num_experts_per_tok,
            moe_ffn_dim=hf.intermediate_size,
            moe_score="softmax",
            moe_norm_topk=True,
            moe_capacity_factor=0.0,
            moe_shared_experts=0,
            moe_dense_layers=0,
            moe_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.01)),
        )
    if family is QWEN3_MOE:
        dense = list(_get(hf, "mlp_only_layers") or [])
        if dense != list(range(len(dense))) or (_get(hf, "decoder_sparse_step") or 1) != 1:
            raise ConvertError(
                f"cannot import {arch}: dense layers {dense} / decoder_sparse_step "
                f"{_get(hf, 'decoder_sparse_step')} (meshforge keeps dense layers only first)"
            )
        kw.update(
            moe_experts=hf.num_experts,
            moe_top_k=hf.num_experts_per_tok,
            moe_ffn_dim=hf.moe_intermediate_size,
            moe_score="softmax",
            moe_norm_topk=bool(hf.norm_topk_prob),
            moe_capacity_factor=0.0,
            moe_shared_experts=0,
            moe_dense_layers=len(dense),
            moe_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.01)),
        )
    if family is GLM4_MOE:
        kw.update(
            moe_experts=hf.n_routed_experts,
            moe_top_k=hf.num_experts_per_tok,
            moe_ffn_dim=hf.moe_intermediate_size,
            moe_score="sigmoid",
            moe_norm_topk=bool(hf.norm_topk_prob),
            moe_capacity_factor=0.0,
            moe_shared_experts=hf.n_shared_experts,
            moe_dense_layers=hf.first_k_dense_replace,
            moe_routed_scale=float(_get(hf, "routed_scaling_factor") or 1.0),
        )
    return ModelConfig(**kw), family


__all__ = ["FAMILIES", "Family", "choose_family", "hf_config", "model_config_from_hf", "rope_parameters"]
