"""The decoder features people's models use, from the Hugging Face side: a random-init tiny model of each
HF config class (head_dim apart from hidden / heads, q/k/v biases, llama3 / YaRN RoPE scaling,
partial rotary, sliding windows, OLMo 2's projection q/k norm and post-norm blocks) saved with
``save_pretrained`` -> ``convert import`` -> meshforge logits within 1e-4 of transformers (fp32, on a
right-padded batch) -> ``convert export`` writes every tensor bit-exact and a config transformers
reads back to the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshforge.config import load_config
from meshforge.convert.export import export_hf
from meshforge.convert.import_ import import_hf
from meshforge.convert.safetensors_io import ConvertError
from meshforge.models import build_model
from meshforge.pretrain.checkpoint import load_model_weights

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=160,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    # name: (config class, its kwargs, what the imported [model] must say)
    "llama3.1-rope-scaling": (
        "LlamaConfig",
        dict(rope_parameters=LLAMA3, tie_word_embeddings=True),
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_seq_len": 16},
    ),
    "llama-yarn-head_dim": (
        "LlamaConfig",
        dict(
            head_dim=8,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        {"rope_scaling": "yarn", "head_size": 8},
    ),
    "qwen2.5-qkv-bias": ("Qwen2Config", dict(tie_word_embeddings=True), {"qkv_bias": True}),
    "qwen3-head_dim": ("Qwen3Config", dict(head_dim=24), {"head_size": 24, "qk_norm": True}),
    "qwen3-sliding": (
        "Qwen3Config",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
        {"sliding_window": 4},
    ),
    "qwen3-moe-head_dim": (
        "Qwen3MoeConfig",
        dict(head_dim=24, num_experts=4, norm_topk_prob=True, **MOE),
        {"head_size": 24, "moe_experts": 4},
    ),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=4, head_dim=32), {"sliding_window": 4, "head_size": 32}),
    "olmo2": ("Olmo2Config", {}, {"qk_norm_scope": "projection", "norm_placement": "post"}),
    "glm4.5-partial-rotary": (
        "Glm4MoeConfig",
        dict(
            head_dim=24,
            attention_bias=True,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            **MOE,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        {"rope_fraction": 0.5, "qkv_bias": True, "moe_shared_experts": 1, "moe_routed_scale": 2.5},
    ),
}
FAST = ("qwen3-moe-head_dim", "olmo2", "llama3.1-rope-scaling", "glm4.5-partial-rotary")
"""The default suite's cases (together every new option but the sliding window, which test_model.py and the
parity test cover); the rest are slow."""


def hf_dir(path: Path, cls: str, kwargs: dict, seed: int = 0) -> Path:
    """A randomised tiny HF model of config class ``cls`` saved with save_pretrained (fp32)."""
    cfg = getattr(transformers, cls)(**{**SMALL, **kwargs})
    cfg.architectures = [cls.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # away from the init's zeros and ones: biases, norms and all weights matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return path


def padded_batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_hf_feature_imports_matches_and_exports_bit_exact(name, tmp_path):
    from safetensors.torch import load_file

    cls, kwargs, expect = CASES[name]
    hf_dir(tmp_path / "hf", cls, kwargs)
    import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    cfg = load_config(str(tmp_path / "init" / "model.toml"))
    assert {k: getattr(cfg.model, k) for k in expect} == expect
    ours = build_model(cfg.model)
    load_model_weights(tmp_path / "init", ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask = padded_batch(SMALL["vocab_size"])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.eval()(ids)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], theirs[valid], rtol=1e-4, atol=1e-4)

    export_hf(tmp_path / "init", tmp_path / "hf2", log=lambda *_: None)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(a) == set(b)
    for key, value in b.items():
        assert torch.equal(value, a[key]), key
    back = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf2"))
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_back(input_ids=ids, attention_mask=mask).logits, theirs, rtol=0, atol=0)
    assert type(back) is type(hf.config)


@pytest.mark.parametrize(
    "cls, kwargs, feature",
    [
        ("LlamaConfig", dict(attention_bias=True), "output-projection bias"),
        ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "dynamic"),
        ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "some layers only"),
        (
            "LlamaConfig",
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "partial rotary",
        ),
    ],
)
def test_unrepresentable_hf_feature_is_refused_by_name(cls, kwargs, feature, tmp_path):
    hf_dir(tmp_path / "hf", cls, kwargs)
    with pytest.raises(ConvertError, match=feature):
        import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    assert not (tmp_path / "init").exists()


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },  # Llama 3.1 8B
        {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },  # Qwen3
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=["llama3.1", "yarn", "linear"],
)
def test_rope_scaling_frequencies_of_full_size_configs_match_transformers(rope):
    """At real sizes (head_dim 128, 128k positions) the frequencies and the cos/sin factor are transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from meshforge.convert.hf_decoder_config import model_config_from_hf
    from meshforge.models.rope_scaling import rope_frequencies

    hf = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope
    )
    hf.architectures = ["LlamaForCausalLM"]
    m, _ = model_config_from_hf(hf)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    ours, scale = rope_frequencies(m)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    assert scale == pytest.approx(their_scale, rel=1e-12)


def test_glm_multi_token_prediction_layers_are_left_out_as_transformers_does(tmp_path):
    from safetensors.torch import load_file, save_file

    cls, kwargs, _ = CASES["glm4.5-partial-rotary"]
    hf_dir(tmp_path / "hf", cls, {**kwargs, "num_nextn_predict_layers": 1})
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file(
        {**weights, "model.layers.2.eh_proj.weight": torch.zeros(64, 128)},
        tmp_path / "hf" / "model.safetensors",
        metadata={"format": "pt"},
    )
    import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    assert load_config(str(tmp_path / "init" / "model.toml")).model.n_layers == 2
    save_file(
        {**weights, "model.layers.3.eh_proj.weight": torch.zeros(64, 128)},
        tmp_path / "hf" / "model.safetensors",
        metadata={"format": "pt"},
    )  # beyond the prediction layers: unknown, refused
    with pytest.raises(ConvertError, match="model.layers.3.eh_proj.weight; refusing to drop them"):
        import_hf(tmp_path / "hf", tmp_path / "init2", log=lambda *_: None)
