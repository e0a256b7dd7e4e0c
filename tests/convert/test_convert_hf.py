"""`meshforge convert export/import` against real transformers models (built locally, no downloads).

Each family: a meshforge checkpoint -> HF directory -> ``from_pretrained`` with no missing or
unexpected keys, logits within 1e-4 (fp32) on a right-padded batch, the same 32 greedy
tokens as meshforge's own generation, the tokenizer encoding like ours; then HF -> meshforge
import is bit-exact with the original weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meshforge.config import load_config
from meshforge.convert.dcp_reader import CheckpointReader
from meshforge.convert.export import export_hf
from meshforge.convert.import_ import import_hf, write_init_checkpoint
from meshforge.convert.safetensors_io import ConvertError
from meshforge.models import build_model
from meshforge.pretrain.checkpoint import CheckpointError
from meshforge.pretrain.generate import generate_ids

transformers = pytest.importorskip("transformers")

DENSE = {"model.qk_norm": False, "model.init_std": 0.1}
FAMILIES = {
    "llama": ("LlamaForCausalLM", DENSE),
    "llama-untied": ("LlamaForCausalLM", {**DENSE, "model.tie_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {"model.qk_norm": True, "model.init_std": 0.1}),
    "mixtral": ("MixtralForCausalLM", {**DENSE, "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_dim": 32}),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        {
            "model.qk_norm": True,
            "model.init_std": 0.1,
            "model.moe_experts": 4,
            "model.moe_top_k": 2,
            "model.moe_ffn_dim": 32,
            "model.moe_dense_layers": 1,
            "model.moe_norm_topk": False,
        },
    ),
    "glm4-moe": (
        "Glm4MoeForCausalLM",
        {
            **DENSE,
            "model.moe_experts": 4,
            "model.moe_top_k": 2,
            "model.moe_ffn_dim": 32,
            "model.moe_score": "sigmoid",
            "model.moe_shared_experts": 1,
            "model.moe_dense_layers": 1,
            "model.moe_bias_update_rate": 0.01,
        },
    ),
}


def make_checkpoint(path: Path, tokenizer: Path | None, overrides: dict, seed: int = 0):
    """A meshforge checkpoint dir (DCP + meta.json + tokenizer) of a randomly initialised model."""
    cfg = load_config("tiny-test", overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if cfg.model.moe_bias_update_rate:  # a routing bias as aux-loss-free balancing would have moved it
        for name, buf in model.named_buffers():
            if name.endswith("route_bias"):
                buf.normal_(0, 0.2)
    write_init_checkpoint(path, cfg, dict(model.state_dict()), {}, tokenizer)
    return cfg, model.eval()


def hf_load(directory: Path, seq2seq: bool = False):
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(str(directory), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def padded_batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # right padding
    return ids, mask


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_hf_matches_and_imports_back(name, tiny_tokenizer, tmp_path):
    arch, overrides = FAMILIES[name]
    cfg, ours = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, overrides)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    hf = hf_load(tmp_path / "hf")

    ids, mask = padded_batch(cfg.model.vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], theirs[valid], rtol=1e-4, atol=1e-4)

    prompt = ids[0, :5].tolist()
    mine = generate_ids(ours, prompt, 32, cfg.model.max_seq_len)
    gen = transformers.GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long), generation_config=gen
        )[0].tolist()
    assert len(mine) == len(hf_out) == 37 and mine == hf_out

    from meshforge.tokenizers import load_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "In the year 1601 there were 37 players,  and\tplays!"
    assert tok.encode(text, add_special_tokens=False) == load_tokenizer(tiny_tokenizer).encode(text)
    assert (tok.eos_token_id, tok.pad_token_id) == (3, 0)

    import_hf(tmp_path / "hf", tmp_path / "back", log=lambda *_: None)
    a, b = CheckpointReader(tmp_path / "ckpt"), CheckpointReader(tmp_path / "back")
    assert set(a.entries) == set(b.entries)
    for key in a.entries:
        assert torch.equal(a.get(key), b.get(key)), key
    back = load_config(str(tmp_path / "back" / "model.toml")).model
    training_only = (
        "ffn_dim",
        "ffn_multiple_of",
        "init_std",
        "moe_aux_loss_coef",
        "moe_z_loss_coef",
        "moe_bias_update_rate",
    )
    assert {k: v for k, v in vars(back).items() if k not in training_only} == {
        k: v for k, v in vars(cfg.model).items() if k not in training_only
    }


def test_bf16_export_and_sharding(tiny_tokenizer, tmp_path):
    make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, DENSE)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="bf16", max_shard_mb=0, log=lambda *_: None)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    hf = hf_load(tmp_path / "hf")
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
    reader = CheckpointReader(tmp_path / "ckpt")
    torch.testing.assert_close(
        hf.model.layers[1].mlp.down_proj.weight,
        reader.get("layers.1.feed_forward.w2.weight").bfloat16(),
        rtol=0,
        atol=0,
    )


# --------------------------------------------------------------------------- refusals, bad input


@pytest.mark.parametrize(
    "overrides, feature",
    [
        ({"model.attn_scale": 0.5}, "attn_scale"),
        (
            {"model.moe_experts": 4, "model.moe_shared_experts": 1, "model.qk_norm": False},
            "shared experts with softmax",
        ),
        (
            {"model.moe_experts": 4, "model.moe_score": "sigmoid", "model.qk_norm": False},
            "sigmoid routing without shared",
        ),
        ({"model.moe_experts": 4, "model.moe_capacity_factor": 1.25, "model.qk_norm": False}, "capacity"),
        ({"model.moe_experts": 4, "model.moe_dense_layers": 1, "model.qk_norm": False}, "dense first layers"),
        ({"model.moe_experts": 4, "model.moe_bias_update_rate": 0.01}, "routing bias"),
        ({"model.ffn_activation": "gelu"}, "ffn_activation"),
        ({"model.mup_base_dim": 32}, "mup_base_dim"),
    ],
)
def test_unrepresentable_decoder_is_refused_before_writing(overrides, feature, tmp_path):
    make_checkpoint(tmp_path / "ckpt", None, overrides)
    with pytest.raises(ConvertError, match=feature):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bad_inputs_fail_cleanly(tiny_tokenizer, tmp_path):
    quiet = {"log": lambda *_: None}
    make_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005", tiny_tokenizer, DENSE)
    run = tmp_path / "run"
    # a checkpoint still being written: step_N.tmp, or a dir whose meta.json is not there yet
    shutil.copytree(run / "checkpoints" / "step_00000005", run / "checkpoints" / "step_00000007.tmp")
    (run / "checkpoints" / "step_00000007.tmp" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="still being written"):
        export_hf(run, tmp_path / "a", step=7, **quiet)
    with pytest.raises(CheckpointError, match="still being written"):
        export_hf(run / "checkpoints" / "step_00000007.tmp", tmp_path / "a", **quiet)
    # output not empty: refused, its file untouched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not an empty directory"):
        export_hf(run, tmp_path / "busy", **quiet)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    # the newest complete checkpoint is step 5 (the .tmp one is ignored)
    export_hf(run, tmp_path / "hf", max_shard_mb=0, **quiet)
    # HF side: missing shard, unknown architecture, mismatched vocab
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "hf", broken)
    second = sorted(set(json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (broken / second).unlink()
    with pytest.raises(ConvertError, match=f"{second}.*missing"):
        import_hf(broken, tmp_path / "x", **quiet)
    unknown = tmp_path / "unknown"
    shutil.copytree(tmp_path / "hf", unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match="unknown Hugging Face architecture 'GPT2LMHeadModel'"):
        import_hf(unknown, tmp_path / "x", **quiet)
    (unknown / "config.json").write_text(json.dumps({**cfg, "vocab_size": 600}))
    with pytest.raises(ConvertError, match="vocab_size"):
        import_hf(unknown, tmp_path / "x", **quiet)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging dir left behind


def test_checkpoint_with_bigger_tokenizer_than_vocab_is_refused(tiny_tokenizer, tmp_path):
    make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, {**DENSE, "model.vocab_size": 256})
    with pytest.raises(ConvertError, match="400 pieces but the model's vocab_size is 256"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert not (tmp_path / "hf").exists()


def test_cli_export_error_is_one_line(tmp_path, capsys):
    from meshforge.cli import main

    assert main(["convert", "export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- T5


def _hf_t5_dir(path: Path, tie: bool):
    """A randomised T5 v1.1-style model saved the way users get one: save_pretrained of a directory."""
    cfg = transformers.T5Config(
        vocab_size=512,
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
        pad_token_id=0,
        eos_token_id=3,
    )
    cfg.tie_word_embeddings = tie  # transformers 5 forces True; an untied v1.1 model has its own lm_head
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        for stack in (hf.encoder, hf.decoder):  # as in real T5 checkpoints: one shared input embedding
            stack.embed_tokens.weight.copy_(hf.shared.weight)
    hf.save_pretrained(str(path))


@pytest.mark.parametrize("tie", [False, True], ids=["v1.1-untied", "tied"])
def test_t5_directory_imports_matches_and_exports_back(tie, tmp_path):
    from safetensors.torch import load_file

    from meshforge.pretrain.checkpoint import load_model_weights
    from meshforge.pretrain.generate import generate_seq2seq_ids

    _hf_t5_dir(tmp_path / "hf", tie)
    import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    cfg = load_config(str(tmp_path / "init" / "model.toml"))
    assert cfg.model.tie_embeddings == tie
    ours = build_model(cfg.model)
    load_model_weights(tmp_path / "init", ours)
    ours.eval()
    hf = hf_load(tmp_path / "hf", seq2seq=True)
    src, mask = padded_batch(512)
    tgt = torch.randint(4, 512, (2, 9))
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, tgt, mask.bool())
    torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-4)
    mine = generate_seq2seq_ids(ours, src[0].tolist(), 32, start_id=0)
    gen = transformers.GenerationConfig(
        max_new_tokens=32, do_sample=False, eos_token_id=None, decoder_start_token_id=0, pad_token_id=0, use_cache=False
    )  # HF's cache breaks with more decoder layers
    with torch.no_grad():
        hf_out = hf.generate(src[:1], generation_config=gen)[0, 1:].tolist()
    assert len(mine) == 32 and mine == hf_out

    export_hf(tmp_path / "init", tmp_path / "hf2", log=lambda *_: None)
    hf_load(tmp_path / "hf2", seq2seq=True)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    for key, value in b.items():
        assert torch.equal(value, a[key]), key
    assert ("lm_head.weight" in b) == (not tie)


@pytest.mark.parametrize(
    "overrides, feature",
    [
        ({"model.attn_scale": 0.0}, "attention scale"),
        ({"model.n_kv_heads": 2}, "grouped-query attention"),
        ({"model.position_encoding": "rope"}, "RoPE"),
    ],
)
def test_unrepresentable_t5_is_refused_before_writing(overrides, feature, tmp_path):
    t5 = {
        "model.family": "encoder_decoder",
        "model.position_encoding": "relative",
        "model.ffn_activation": "gelu",
        "model.attn_scale": 1.0,
        "model.n_kv_heads": 0,
        "model.qk_norm": False,
    }
    make_checkpoint(tmp_path / "ckpt", None, {**t5, **overrides})
    with pytest.raises(ConvertError, match=feature):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert not (tmp_path / "hf").exists()


def test_t5_checkpoint_exports_with_its_unigram_tokenizer(tmp_path, small_corpus):
    from meshforge.tokenizers import load_tokenizer, train_tokenizer

    spm = train_tokenizer([small_corpus], tmp_path / "t5tok", 500, preset="t5")
    t5 = {
        "model.family": "encoder_decoder",
        "model.position_encoding": "relative",
        "model.ffn_activation": "gelu",
        "model.attn_scale": 1.0,
        "model.n_kv_heads": 0,
        "model.qk_norm": False,
    }
    make_checkpoint(tmp_path / "ckpt", spm, t5)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    hf_load(tmp_path / "hf", seq2seq=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "<extra_id_0> In the year  1601\n\tthere were <extra_id_1> plays."
    ids = load_tokenizer(spm).encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok(text).input_ids == ids + [3]  # T5 appends </s> to encoder inputs, as meshforge's generation does
    assert tok.decode(ids) == text
