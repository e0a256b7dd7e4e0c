"""The T5-style encoder-decoder: matches Hugging Face T5 (v1.1) logits; masks behave."""

import pytest
import torch

from meshforge.config import ModelConfig
from meshforge.models import build_model
from meshforge.models.encoder_decoder import relative_position_bucket

transformers = pytest.importorskip("transformers")


def _hf_pair(tie: bool):
    from meshforge.convert.hf_t5 import from_hf, hf_t5_config_to_model_config

    hf_cfg = transformers.T5Config(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=tie,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        scale_decoder_outputs=tie,
    )
    hf_cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF's init leaves some weights tiny: randomise everything for a strong check
        for p in hf.parameters():
            p.normal_(0, 0.3)
        for stack in (hf.encoder, hf.decoder):  # as in real T5 checkpoints: one shared input embedding
            stack.embed_tokens.weight.copy_(hf.shared.weight)
    cfg = hf_t5_config_to_model_config(hf_cfg)
    ours = build_model(cfg)
    ours.load_state_dict(from_hf(hf.state_dict(), cfg), strict=False)
    missing = {n for n, _ in ours.named_parameters()} - set(from_hf(hf.state_dict(), cfg))
    assert not missing, missing
    return hf, ours.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_t5(tie):
    hf, ours = _hf_pair(tie)
    assert (hf.lm_head.weight is hf.shared.weight) == tie
    src = torch.randint(1, 120, (2, 30))
    tgt = torch.randint(1, 120, (2, 11))
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 25:] = False
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits
        got = ours(src, tgt, src_mask)
    torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-4)


def test_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-60, 61)[None, :]
    for bidirectional in (True, False):
        theirs = T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
        assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), theirs)


def test_decoder_is_causal_and_encoder_padding_is_ignored():
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=50,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        position_encoding="relative",
        ffn_activation="gelu",
    )
    model = build_model(cfg).eval()
    src = torch.randint(1, 50, (1, 12))
    tgt = torch.randint(1, 50, (1, 9))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[0, 8:] = False
    with torch.no_grad():
        base = model(src, tgt, mask)
        src2 = src.clone()
        src2[0, 8:] = (src2[0, 8:] + 7) % 50  # only padded positions change
        assert torch.allclose(model(src2, tgt, mask), base, atol=1e-6)
        tgt2 = tgt.clone()
        tgt2[0, 5:] = (tgt2[0, 5:] + 3) % 50  # later decoder tokens cannot change earlier logits
        out2 = model(src, tgt2, mask)
        assert torch.allclose(out2[:, :5], base[:, :5], atol=1e-6)
        assert not torch.allclose(out2[:, 5:], base[:, 5:])
    rope = build_model(
        ModelConfig(family="encoder_decoder", vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=64)
    )
    assert rope(src, tgt).shape == (1, 9, 50)
