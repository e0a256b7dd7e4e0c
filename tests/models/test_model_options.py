"""The architecture options of imported models (head_size, q/k/v bias, RoPE scaling, partial rotary,
sliding window, OLMo 2's norms): out-of-range values and options a family or layout lacks are one
clear ConfigError each, naming the option."""

from __future__ import annotations

import pytest

from meshforge.config import ConfigError, load_config
from meshforge.models import check_config

T5 = {
    "model.family": "encoder_decoder",
    "model.position_encoding": "relative",
    "model.ffn_activation": "gelu",
    "model.attn_scale": 1.0,
    "model.n_kv_heads": 0,
    "model.qk_norm": False,
}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.head_size": 15}, r"head width \(15"),
        ({"model.head_size": -2}, "model.head_size and model.sliding_window must be >= 0"),
        ({"model.dim": 66}, r"must divide by model.n_heads \(4\), or set model.head_size"),
        ({"model.rope_fraction": 0.0}, "model.rope_fraction must be in"),
        ({"model.rope_fraction": 0.1}, "rotate at least 2 channels"),
        ({"model.rope_scaling": "llama3", "model.rope_factor": 0.5}, "model.rope_factor must be >= 1"),
        ({"model.rope_scaling": "llama3", "model.rope_low_freq_factor": 4.0}, "rope_low_freq_factor < model.rope_high"),
        ({"model.rope_scaling": "yarn", "model.rope_beta_slow": 64.0}, "rope_beta_slow < model.rope_beta_fast"),
        ({"model.rope_scaling": "ntk"}, "model.rope_scaling = 'ntk' is not one of"),
        ({"model.sliding_window": -1}, "must be >= 0"),
        ({"model.sliding_window": 8, "parallel.cp": 2}, "does not apply a window"),
        ({"model.qk_norm_scope": "layer"}, "model.qk_norm_scope = 'layer' is not one of"),
        ({**T5, "model.qkv_bias": True}, "model.qkv_bias = True is implemented by decoder models, not encoder_decoder"),
        ({**T5, "model.sliding_window": 4}, "model.sliding_window = 4 is implemented by decoder models"),
        ({**T5, "model.norm_placement": "post"}, "model.norm_placement = 'post' is implemented by decoder models"),
    ],
)
def test_bad_model_option_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_config("tiny-test", overrides))


def test_encoder_decoder_takes_a_head_dim():
    """T5 v1.1 sizes have d_kv * heads != d_model (t5-v1_1-small: 6 heads of 64 in 512)."""
    from meshforge.models import build_model

    cfg = load_config("tiny-test", {**T5, "model.head_size": 24})
    attn = build_model(cfg.model).encoder.layers["0"].attention
    assert attn.wq.weight.shape == (4 * 24, 64) and attn.wo.weight.shape == (64, 4 * 24)
