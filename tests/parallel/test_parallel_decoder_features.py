"""The decoder options imported models use, trained under tp2, pp2, fsdp2 and cp2 against one process.

One model combines them all (each changes a different part of the block, so a layout that
mishandles one cannot pass): head_size 24 apart from dim / n_heads = 16, q/k/v biases, llama3
RoPE scaling, partial rotary (half of each head), an 8-token sliding window (the sequence is
32), OLMo 2's whole-projection q/k norm (under tp the projection's channels are sharded: the
norm gathers them) and post-norm blocks. Tolerances as in test_parallel_tp.py / test_parallel_pp.py.
"""

from __future__ import annotations

import pytest

from parallel_harness import TP_ATOL, assert_parity, train_layout

FEATURES = (
    "--model.head_size",
    "24",
    "--model.qkv_bias",
    "true",
    "--model.rope_scaling",
    "llama3",
    "--model.rope_factor",
    "4",
    "--model.rope_original_max_seq_len",
    "16",
    "--model.rope_fraction",
    "0.5",
    "--model.sliding_window",
    "8",
    "--model.qk_norm_scope",
    "projection",
    "--model.norm_placement",
    "post",
    "--model.tie_embeddings",
    "false",
)


@pytest.fixture(scope="module")
def features_ref(tiny_data, tmp_path_factory):
    return train_layout(tiny_data, tmp_path_factory.mktemp("features_ref") / "ref", 1, *FEATURES)


@pytest.mark.parametrize(
    "name, world, overrides, atol",
    [
        ("tp2", 2, ("--parallel.tp", "2"), TP_ATOL),
        pytest.param("pp2", 2, ("--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"), 1e-6, marks=pytest.mark.slow),
        pytest.param("fsdp2", 2, ("--parallel.dp_shard", "2"), 1e-6, marks=pytest.mark.slow),
        pytest.param(
            "tp2-no-loss-parallel",
            2,
            ("--parallel.tp", "2", "--parallel.loss_parallel", "false"),
            TP_ATOL,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_decoder_features_match_single_process(name, world, overrides, atol, tiny_data, features_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *FEATURES, *overrides)
    assert_parity(features_ref, got, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ring", "alltoall"])
def test_decoder_features_but_the_window_under_context_parallel(method, tiny_data, tmp_path):
    """cp refuses the sliding window (test_model_options.py); everything else runs under it."""
    i = FEATURES.index("--model.sliding_window")
    features = FEATURES[:i] + FEATURES[i + 2 :]
    ref = train_layout(tiny_data, tmp_path / "ref", 1, *features)
    got = train_layout(tiny_data, tmp_path / method, 2, *features, "--parallel.cp", "2", "--parallel.cp_method", method)
    assert_parity(ref, got, atol=TP_ATOL)


GLM_MOE = (
    "--model.moe_experts",
    "4",
    "--model.moe_top_k",
    "2",
    "--model.moe_score",
    "sigmoid",
    "--model.moe_shared_experts",
    "1",
    "--model.moe_routed_scale",
    "2.5",
    "--model.qkv_bias",
    "true",
    "--model.rope_fraction",
    "0.5",
)
"""GLM-4.5's MoE options: sigmoid routing with a shared expert, routed experts scaled by 2.5."""


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides, atol",
    [("ep2", 2, ("--parallel.ep", "2", "--parallel.dp_shard", "2"), 1e-6), ("tp2", 2, ("--parallel.tp", "2"), TP_ATOL)],
)
def test_glm_moe_options_match_single_process(name, world, overrides, atol, tiny_data, tmp_path):
    ref = train_layout(tiny_data, tmp_path / "ref", 1, *GLM_MOE)
    got = train_layout(tiny_data, tmp_path / name, world, *GLM_MOE, *overrides)
    assert_parity(ref, got, atol=atol)


def test_feature_model_has_what_it_claims():
    """The options reach the modules (a run that silently ignored them would still be in parity)."""
    from meshforge.config import load_config
    from meshforge.models import build_model

    cfg = load_config(
        "tiny-test",
        {
            "model.head_size": 24,
            "model.qkv_bias": True,
            "model.rope_fraction": 0.5,
            "model.qk_norm_scope": "projection",
            "model.norm_placement": "post",
        },
    )
    model = build_model(cfg.model)
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (4 * 24, 64) and attn.wq.bias is not None and attn.wo.bias is None
    assert attn.q_norm.weight.shape == (96,) and attn.k_norm.weight.shape == (48,)
    assert model.rope_cos.shape == (128, 12) and model.layers["0"].post_norm
