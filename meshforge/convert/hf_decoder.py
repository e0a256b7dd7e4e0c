"""Hugging Face decoder families <-> the meshforge decoder: which class, its config, the names.

    meshforge decoder                          Hugging Face class
    dense                                      LlamaForCausalLM (MistralForCausalLM with a
                                                 sliding window)
    dense + qkv_bias                           Qwen2ForCausalLM (Qwen2 / Qwen2.5)
    dense + qk_norm (per head)                 Qwen3ForCausalLM
    dense + qk_norm over the projection +      Olmo2ForCausalLM
      post-norm blocks
    MoE, softmax top-k, renormalised, no       MixtralForCausalLM
      shared experts, no qk_norm
    MoE, softmax top-k, no shared experts,     Qwen3MoeForCausalLM (``norm_topk_prob`` either
      qk_norm                                    way, dense first layers as ``mlp_only_layers``)
    MoE, sigmoid routing (+ bias), shared      Glm4MoeForCausalLM (one expert group; q/k norm,
      experts (DeepSeek-V3 style)                q/k/v bias, partial rotary and
                                                 routed_scaling_factor if any)

How each model option maps to the HF config (head_dim, RoPE scaling, partial rotary,
sliding window, ...) is in ``hf_decoder_config.py``. Qwen3 normalises each head's query and
key (``q_norm(q_proj(x).view(..., head_dim))``: meshforge's ``qk_norm_scope = head``);
OLMo 2 normalises the whole projection (a weight per channel: ``qk_norm_scope =
projection``) and puts its norms after attention and MLP (``norm_placement = post``; its
``post_attention_layernorm`` is then meshforge's ``attention_norm``, not ``ffn_norm``).

Mixtral's router is softmax over all experts, top-k, weights renormalised to sum to 1,
dropless: meshforge's ``moe_score = softmax``, ``moe_norm_topk = true``, no capacity, no
routing bias. Mixtral files keep the per-expert names (``block_sparse_moe.experts.E.w1``,
what published Mixtral checkpoints and ``save_pretrained`` write); meshforge stacks the
experts in one ``[E, ...]`` tensor per projection, so each expert is one slice.

DeepSeek-V3-style routing (sigmoid scores, a per-expert bias added only to choose the
experts, ungated shared experts, dense first layers) is exactly GLM-4.5's MoE
(``Glm4MoeForCausalLM``, with standard grouped-query attention and optional per-head q/k
norm, q/k/v biases, partial rotary and a routed_scaling_factor, meshforge's
``moe_routed_scale``) when it uses one expert group; DeepSeek-V3's own class uses latent
attention, which meshforge does not have.

Anything else is refused by :func:`choose_family` with the feature named: softmax routing
with shared experts (Qwen2-MoE gates its shared expert with a sigmoid) or with a routing
bias, sigmoid routing without shared experts, capacity dropping, dense first layers or
un-normalised weights in an MoE without qk-norm, another attention scale, a GELU feed-forward,
an output-projection bias (HF ``attention_bias`` outside GLM-4.5), sliding windows on some
layers only, partial rotary outside GLM-4.5, RoPE types other than linear / llama3 / yarn.
"""

from __future__ import annotations

from ..config import ModelConfig
from .hf_decoder_config import FAMILIES, GLM4_MOE, QWEN3_MOE, Family, choose_family, hf_config, model_config_from_hf
from .safetensors_io import ConvertError


def name_map(m: ModelConfig, family: Family) -> list[tuple[str, str, int | None]]:
    """``(hf name, meshforge name, expert index or None)`` for every HF tensor, in file order."""
    out: list[tuple[str, str, int | None]] = [("model.embed_tokens.weight", "tok_embeddings.weight", None)]
    for i in range(m.n_layers):
        h, g = f"model.layers.{i}", f"layers.{i}"
        post = m.norm_placement == "post"  # OLMo 2: the norms after attention and after the MLP
        if not post:
            out.append((f"{h}.input_layernorm.weight", f"{g}.attention_norm.weight", None))
        out += [(f"{h}.self_attn.{p}_proj.weight", f"{g}.attention.w{p}.weight", None) for p in "qkvo"]
        if m.qkv_bias:
            out += [(f"{h}.self_attn.{p}_proj.bias", f"{g}.attention.w{p}.bias", None) for p in "qkv"]
        if m.qk_norm:
            out += [(f"{h}.self_attn.{p}_norm.weight", f"{g}.attention.{p}_norm.weight", None) for p in "qk"]
        out.append((f"{h}.post_attention_layernorm.weight", f"{g}.{'attention' if post else 'ffn'}_norm.weight", None))
        if post:
            out.append((f"{h}.post_feedforward_layernorm.weight", f"{g}.ffn_norm.weight", None))
        if m.is_moe_layer(i) and family is GLM4_MOE:
            out += [
                (f"{h}.mlp.gate.weight", f"{g}.feed_forward.router.weight", None),
                (f"{h}.mlp.gate.e_score_correction_bias", f"{g}.feed_forward.route_bias", None),
            ]
            for e in range(m.moe_experts):
                out += [
                    (f"{h}.mlp.experts.{e}.{p}.weight", f"{g}.feed_forward.experts.{w}", e)
                    for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
                ]
            out += [
                (f"{h}.mlp.shared_experts.{p}.weight", f"{g}.feed_forward.shared.{w}.weight", None)
                for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
            ]
        elif m.is_moe_layer(i) and family is QWEN3_MOE:
            out.append((f"{h}.mlp.gate.weight", f"{g}.feed_forward.router.weight", None))
            for e in range(m.moe_experts):
                out += [
                    (f"{h}.mlp.experts.{e}.{p}.weight", f"{g}.feed_forward.experts.{w}", e)
                    for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
                ]
        elif m.is_moe_layer(i):
            out.append((f"{h}.block_sparse_moe.gate.weight", f"{g}.feed_forward.router.weight", None))
            for e in range(m.moe_experts):
                out += [
                    (f"{h}.block_sparse_moe.experts.{e}.{w}.weight", f"{g}.feed_forward.experts.{w}", e)
                    for w in ("w1", "w2", "w3")
                ]
        else:
            out += [
                (f"{h}.mlp.{p}.weight", f"{g}.feed_forward.{w}.weight", None)
                for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
            ]
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
    nonzero = [
        n for n in routing_biases(m) if n not in mapped and n in reader.entries and reader.get(n).abs().max() > 0
    ]
    if nonzero:
        raise ConvertError(
            f"cannot export to Hugging Face: the routing bias {nonzero[0]} is not zero (aux-loss-free "
            "balancing); HF MoE classes have no routing bias"
        )
    return config, mapping, set(routing_biases(m))  # HF keeps the routing biases fp32


def import_plan(hf, names: set[str]) -> tuple[ModelConfig, list, set[str], str]:
    """(our config, name map, HF tensors that may be present unmapped, the HF embedding's name) of the HF
    config ``hf`` whose files hold the tensors ``names``.

    GLM-4.5 checkpoints also hold their multi-token-prediction layers (``num_nextn_predict_layers``
    more layers after the last one), which transformers' class does not load either: left out."""
    m, family = model_config_from_hf(hf)
    extra_ok = {"lm_head.weight"} if m.tie_embeddings else set()
    mtp = int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if family is GLM4_MOE else 0
    extra_ok |= {n for n in names for j in range(mtp) if n.startswith(f"model.layers.{m.n_layers + j}.")}
    return m, name_map(m, family), extra_ok, "model.embed_tokens.weight"


def import_state(files, m: ModelConfig, pairs) -> dict:
    """Our state dict from the HF tensors ``files`` (experts stacked, zero routing biases)."""
    import torch

    if (
        m.tie_embeddings
        and "lm_head.weight" in files
        and not torch.equal(files.get("lm_head.weight"), files.get("model.embed_tokens.weight"))
    ):
        raise ConvertError("config.json ties the embeddings but lm_head.weight differs from model.embed_tokens.weight")
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
