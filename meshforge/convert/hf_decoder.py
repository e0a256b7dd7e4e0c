"""Hugging Face decoder families <-> the meshforge decoder: which class, its config, the names.

    meshforge decoder                          Hugging Face class
    dense                                      LlamaForCausalLM
    dense + qk_norm                            Qwen3ForCausalLM
    MoE, softmax top-k, renormalised, no       MixtralForCausalLM
      shared experts, no qk_norm
    MoE, softmax top-k, no shared experts,     Qwen3MoeForCausalLM (``norm_topk_prob`` either
      qk_norm                                    way, dense first layers as ``mlp_only_layers``)
    MoE, sigmoid routing (+ bias), shared      Glm4MoeForCausalLM (one expert group, full
      experts (DeepSeek-V3 style)                rotary, routed_scaling_factor 1, q/k norm if any)

Why Qwen3 for qk-norm: meshforge normalises each head's query and key (RMSNorm over
head_dim, one weight of size head_dim shared by the heads) before RoPE. Qwen3 does exactly
that (``q_norm(q_proj(x).view(..., head_dim))``); OLMo-2 normalises the whole projection
(RMSNorm over n_heads * head_dim, a weight per channel) -- another function, and it also
puts its norms after the attention and MLP instead of before.

Mixtral's router is softmax over all experts, top-k, weights renormalised to sum to 1,
dropless: meshforge's ``moe_score = softmax``, ``moe_norm_topk = true``, no capacity, no
routing bias. Mixtral files keep the per-expert names (``block_sparse_moe.experts.E.w1``,
what published Mixtral checkpoints and ``save_pretrained`` write); meshforge stacks the
experts in one ``[E, ...]`` tensor per projection, so each expert is one slice.

DeepSeek-V3-style routing (sigmoid scores, a per-expert bias added only to choose the
experts, ungated shared experts, dense first layers) is exactly GLM-4.5's MoE
(``Glm4MoeForCausalLM``, with standard grouped-query attention and optional per-head q/k
norm) when it uses one expert group, full rotary and no output scaling; DeepSeek-V3's own
class uses latent attention, which meshforge does not have.

Anything else is refused by :func:`choose_family` with the feature named: softmax routing
with shared experts (Qwen2-MoE gates its shared expert with a sigmoid) or with a routing
bias, sigmoid routing without shared experts, capacity dropping, dense first layers or
un-normalised weights in an MoE without qk-norm, another attention scale, a GELU feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..models import family_spec
from .safetensors_io import ConvertError

CONVERTER = "hf_decoder"
"""This module's name in ``ModelSpec.hf_converter`` (the decoder family's)."""


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str


LLAMA = Family("llama", "LlamaForCausalLM", "llama")
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", "qwen3")
MIXTRAL = Family("mixtral", "MixtralForCausalLM", "mixtral")
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe")
GLM4_MOE = Family("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe")
FAMILIES = {f.architecture: f for f in (LLAMA, QWEN3, MIXTRAL, QWEN3_MOE, GLM4_MOE)}


def choose_family(m: ModelConfig) -> Family:
    """The HF class that computes exactly what ``m`` computes, or ConvertError naming what does not map."""
    if family_spec(m.family).hf_converter != CONVERTER:
        raise ConvertError(f"model.family = {m.family!r} is not a decoder")
    if m.ffn_activation != "silu":
        raise ConvertError(f"model.ffn_activation = {m.ffn_activation!r}: the HF decoder classes use SwiGLU (silu)")
    if m.attn_scale and abs(m.attn_scale - m.head_dim**-0.5) > 1e-12:
        raise ConvertError(f"model.attn_scale = {m.attn_scale}: HF decoders scale attention logits by "
                           f"1/sqrt(head_dim) = {m.head_dim**-0.5:.6g}")
    if m.mup_base_dim:
        raise ConvertError(f"model.mup_base_dim = {m.mup_base_dim}: muP divides the logits by the width multiplier "
                           "(dim / mup_base_dim), which no HF decoder class does")
    if not m.moe_experts:
        return QWEN3 if m.qk_norm else LLAMA
    if m.moe_capacity_factor > 0:
        raise ConvertError(f"cannot export to Hugging Face: capacity dropping (model.moe_capacity_factor = "
                           f"{m.moe_capacity_factor}): HF MoE classes route dropless")
    if m.moe_score == "sigmoid":
        if not m.moe_shared_experts:
            raise ConvertError("cannot export to Hugging Face: sigmoid routing without shared experts (the HF class "
                               "with meshforge's sigmoid routing, Glm4Moe, always has a shared expert)")
        return GLM4_MOE
    refusals = [
        (m.moe_shared_experts > 0, f"shared experts with softmax routing (model.moe_shared_experts = "
                                   f"{m.moe_shared_experts}): Qwen2-MoE gates its shared expert with a sigmoid"),
        (m.moe_bias_update_rate > 0, "the aux-loss-free routing bias (model.moe_bias_update_rate > 0) with softmax "
                                     "routing: no HF softmax-routed class has a routing bias"),
    ]
    if not m.qk_norm:  # Mixtral; Qwen3-MoE would add the q/k norms meshforge does not have
        refusals += [
            (not m.moe_norm_topk, "un-normalised top-k weights (model.moe_norm_topk = false) without qk-norm: "
                                  "Mixtral renormalises, Qwen3-MoE has qk-norm"),
            (m.moe_dense_layers > 0, f"dense first layers (model.moe_dense_layers = {m.moe_dense_layers}) without "
                                     "qk-norm: every Mixtral layer is an MoE, Qwen3-MoE has qk-norm"),
        ]
    for refused, why in refusals:
        if refused:
            raise ConvertError(f"cannot export to Hugging Face: {why}")
    return QWEN3_MOE if m.qk_norm else MIXTRAL


def hf_config(m: ModelConfig, family: Family, token_ids: dict[str, int], dtype: str):
    """The transformers config object of ``family`` for ``m``."""
    import transformers

    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act="silu", max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, dtype=dtype, **token_ids,
    )
    if family is LLAMA:
        cfg = transformers.LlamaConfig(intermediate_size=m.hidden_dim, attention_bias=False, mlp_bias=False,
                                       pretraining_tp=1, **common)
    elif family is QWEN3:
        cfg = transformers.Qwen3Config(intermediate_size=m.hidden_dim, attention_bias=False, use_sliding_window=False,
                                       sliding_window=None, **common)
    elif family is QWEN3_MOE:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=m.hidden_dim, moe_intermediate_size=m.expert_dim,
                                          num_experts=m.moe_experts, num_experts_per_tok=m.moe_top_k,
                                          norm_topk_prob=m.moe_norm_topk, decoder_sparse_step=1,
                                          mlp_only_layers=list(range(m.moe_dense_layers)), attention_bias=False,
                                          use_sliding_window=False, sliding_window=None, output_router_logits=False,
                                          router_aux_loss_coef=m.moe_aux_loss_coef, **common)
    elif family is GLM4_MOE:
        common["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
        cfg = transformers.Glm4MoeConfig(intermediate_size=m.hidden_dim, moe_intermediate_size=m.expert_dim,
                                         n_routed_experts=m.moe_experts, num_experts_per_tok=m.moe_top_k,
                                         n_shared_experts=m.moe_shared_experts, first_k_dense_replace=m.moe_dense_layers,
                                         norm_topk_prob=m.moe_norm_topk, routed_scaling_factor=1.0, n_group=1,
                                         topk_group=1, use_qk_norm=m.qk_norm, attention_bias=False, **common)
    else:
        cfg = transformers.MixtralConfig(intermediate_size=m.expert_dim, num_local_experts=m.moe_experts,
                                         num_experts_per_tok=m.moe_top_k, sliding_window=None, router_jitter_noise=0.0,
                                         output_router_logits=False, router_aux_loss_coef=m.moe_aux_loss_coef, **common)
    cfg.architectures = [family.architecture]
    return cfg


def _get(hf, key, default=None):
    return getattr(hf, key, default)


def model_config_from_hf(hf) -> tuple[ModelConfig, Family]:
    """A meshforge ModelConfig computing what the HF decoder config ``hf`` computes (or ConvertError)."""
    arch = (_get(hf, "architectures") or [""])[0]
    if arch not in FAMILIES:
        raise ConvertError(f"unknown Hugging Face architecture {arch!r}; supported: "
                           f"{', '.join([*FAMILIES, 'T5ForConditionalGeneration'])}")
    family = FAMILIES[arch]
    rope = _get(hf, "rope_parameters") or {}
    head_dim = _get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads
    problems = [
        (_get(hf, "hidden_act") != "silu", f"hidden_act = {_get(hf, 'hidden_act')!r} (meshforge decoders use silu)"),
        (bool(_get(hf, "attention_bias")), "attention_bias = true (meshforge projections have no bias)"),
        (bool(_get(hf, "mlp_bias")), "mlp_bias = true (meshforge projections have no bias)"),
        (rope.get("rope_type", "default") != "default", f"RoPE scaling rope_type = {rope.get('rope_type')!r}"),
        (rope.get("partial_rotary_factor", 1.0) != 1.0, f"partial rotary ({rope.get('partial_rotary_factor')})"),
        (family is GLM4_MOE and (_get(hf, "topk_group") != _get(hf, "n_group") or _get(hf, "routed_scaling_factor") != 1.0
                                 or not _get(hf, "n_shared_experts")),
         "group-limited routing, routed_scaling_factor != 1 or no shared expert"),
        (head_dim * hf.num_attention_heads != hf.hidden_size,
         f"head_dim = {head_dim} with {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}"),
        ((_get(hf, "pretraining_tp") or 1) != 1, "pretraining_tp != 1"),
        (bool(_get(hf, "use_sliding_window")) or (family is MIXTRAL and _get(hf, "sliding_window") is not None),
         "sliding-window attention"),
        (bool(_get(hf, "router_jitter_noise")), "router jitter noise"),
    ]
    for bad, why in problems:
        if bad:
            raise ConvertError(f"cannot import {arch}: {why}")
    kw = dict(
        family="decoder", vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        ffn_dim=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 1e4)),
        norm_eps=hf.rms_norm_eps, tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qk_norm=family in (QWEN3, QWEN3_MOE) or bool(_get(hf, "use_qk_norm")), ffn_activation="silu", attn_scale=0.0,
    )
    if family is MIXTRAL:
        kw.update(moe_experts=hf.num_local_experts, moe_top_k=hf.num_experts_per_tok, moe_ffn_dim=hf.intermediate_size,
                  moe_score="softmax", moe_norm_topk=True, moe_capacity_factor=0.0, moe_shared_experts=0,
                  moe_dense_layers=0, moe_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.01)))
    if family is QWEN3_MOE:
        dense = list(_get(hf, "mlp_only_layers") or [])
        if dense != list(range(len(dense))) or (_get(hf, "decoder_sparse_step") or 1) != 1:
            raise ConvertError(f"cannot import {arch}: dense layers {dense} / decoder_sparse_step "
                               f"{_get(hf, 'decoder_sparse_step')} (meshforge keeps dense layers only first)")
        kw.update(moe_experts=hf.num_experts, moe_top_k=hf.num_experts_per_tok, moe_ffn_dim=hf.moe_intermediate_size,
                  moe_score="softmax", moe_norm_topk=bool(hf.norm_topk_prob), moe_capacity_factor=0.0,
                  moe_shared_experts=0, moe_dense_layers=len(dense),
                  moe_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.01)))
    if family is GLM4_MOE:
        kw.update(moe_experts=hf.n_routed_experts, moe_top_k=hf.num_experts_per_tok, moe_ffn_dim=hf.moe_intermediate_size,
                  moe_score="sigmoid", moe_norm_topk=bool(hf.norm_topk_prob), moe_capacity_factor=0.0,
                  moe_shared_experts=hf.n_shared_experts, moe_dense_layers=hf.first_k_dense_replace)
    return ModelConfig(**kw), family


def name_map(m: ModelConfig, family: Family) -> list[tuple[str, str, int | None]]:
    """``(hf name, meshforge name, expert index or None)`` for every HF tensor, in file order."""
    out: list[tuple[str, str, int | None]] = [("model.embed_tokens.weight", "tok_embeddings.weight", None)]
    for i in range(m.n_layers):
        h, g = f"model.layers.{i}", f"layers.{i}"
        out.append((f"{h}.input_layernorm.weight", f"{g}.attention_norm.weight", None))
        out += [(f"{h}.self_attn.{p}_proj.weight", f"{g}.attention.w{p}.weight", None) for p in "qkvo"]
        if m.qk_norm:
            out += [(f"{h}.self_attn.{p}_norm.weight", f"{g}.attention.{p}_norm.weight", None) for p in "qk"]
        out.append((f"{h}.post_attention_layernorm.weight", f"{g}.ffn_norm.weight", None))
        if m.is_moe_layer(i) and family is GLM4_MOE:
            out += [(f"{h}.mlp.gate.weight", f"{g}.feed_forward.router.weight", None),
                    (f"{h}.mlp.gate.e_score_correction_bias", f"{g}.feed_forward.route_bias", None)]
            for e in range(m.moe_experts):
                out += [(f"{h}.mlp.experts.{e}.{p}.weight", f"{g}.feed_forward.experts.{w}", e)
                        for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
            out += [(f"{h}.mlp.shared_experts.{p}.weight", f"{g}.feed_forward.shared.{w}.weight", None)
                    for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
        elif m.is_moe_layer(i) and family is QWEN3_MOE:
            out.append((f"{h}.mlp.gate.weight", f"{g}.feed_forward.router.weight", None))
            for e in range(m.moe_experts):
                out += [(f"{h}.mlp.experts.{e}.{p}.weight", f"{g}.feed_forward.experts.{w}", e)
                        for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
        elif m.is_moe_layer(i):
            out.append((f"{h}.block_sparse_moe.gate.weight", f"{g}.feed_forward.router.weight", None))
            for e in range(m.moe_experts):
                out += [(f"{h}.block_sparse_moe.experts.{e}.{w}.weight", f"{g}.feed_forward.experts.{w}", e)
                        for w in ("w1", "w2", "w3")]
        else:
            out += [(f"{h}.mlp.{p}.weight", f"{g}.feed_forward.{w}.weight", None)
                    for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
    out.append(("model.norm.weight", "norm.weight", None))
    if not m.tie_embeddings:
        out.append(("lm_head.weight", "output.weight", None))
    return out


def routing_biases(m: ModelConfig) -> list[str]:
    """meshforge buffers that must be zero for the export to be exact (the MoE routing bias)."""
    return [f"layers.{i}.feed_forward.route_bias" for i in range(m.n_layers) if m.is_moe_layer(i)]


# --------------------------------------------------------------------------- the converter interface
# (what export/import/inspect call for a family whose spec names this module: see convert/families.py)

ARCHITECTURES = tuple(FAMILIES)
"""The Hugging Face architectures this module imports."""
SEQ2SEQ = False
"""Whether the exported tokenizer is a sequence-to-sequence one (decoder start = pad)."""


def exports_to(m: ModelConfig) -> str:
    """The HF architecture ``m`` exports as (ConvertError naming what does not map)."""
    return choose_family(m).architecture


def export_plan(m: ModelConfig, token_ids: dict[str, int], dtype: str, reader) -> tuple[object, list, set[str]]:
    """(HF config, ``(HF name, our name, expert index or None)`` per HF tensor, our names kept fp32) of an
    export of ``reader``'s checkpoint; refuses a non-zero routing bias, which no HF class has."""
    family = choose_family(m)
    config = hf_config(m, family, token_ids, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    mapping = name_map(m, family)
    mapped = {ours for _, ours, _ in mapping}
    nonzero = [n for n in routing_biases(m) if n not in mapped and n in reader.entries and reader.get(n).abs().max() > 0]
    if nonzero:
        raise ConvertError(f"cannot export to Hugging Face: the routing bias {nonzero[0]} is not zero (aux-loss-free "
                           "balancing); HF MoE classes have no routing bias")
    return config, mapping, set(routing_biases(m))  # HF keeps the routing biases fp32


def import_plan(hf) -> tuple[ModelConfig, list, set[str], str]:
    """(our config, name map, HF tensors that may be present unmapped, the HF embedding's name)."""
    m, family = model_config_from_hf(hf)
    return m, name_map(m, family), ({"lm_head.weight"} if m.tie_embeddings else set()), "model.embed_tokens.weight"


def import_state(files, m: ModelConfig, pairs) -> dict:
    """Our state dict from the HF tensors ``files`` (experts stacked, zero routing biases)."""
    import torch

    if m.tie_embeddings and "lm_head.weight" in files and not torch.equal(
            files.get("lm_head.weight"), files.get("model.embed_tokens.weight")):
        raise ConvertError("config.json ties the embeddings but lm_head.weight differs from "
                           "model.embed_tokens.weight")
    state: dict = {}
    experts: dict[str, dict[int, object]] = {}
    for hf_name, ours, e in pairs:
        if e is None:
            state[ours] = files.get(hf_name)
        else:
            experts.setdefault(ours, {})[e] = files.get(hf_name)
    for ours, by_index in experts.items():
        state[ours] = torch.stack([by_index[e] for e in range(m.moe_experts)])
    for name in routing_biases(m):
        state.setdefault(name, torch.zeros(m.moe_experts))
    return state
