"""What `convert inspect`, `convert import` and `generate` read or compute once, counted.

``convert inspect`` of an importable Hugging Face directory parses its ``config.json`` once (transformers
reads it once more for its own config) and each safetensors header once; ``convert import`` likewise reads
the config for the special token ids no second time; ``generate`` encodes the prompt once. The files are
real (a tiny Llama saved by transformers, a checkpoint written by ``write_init_checkpoint``); opens are
counted by a Python audit hook, which sees every ``open`` in the process.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from meshforge.config import load_config
from meshforge.convert.import_ import import_hf, write_init_checkpoint
from meshforge.convert.inspect import inspect_path
from meshforge.models import build_model
from meshforge.pretrain.generate import generate_from_checkpoint, generate_text
from meshforge.tokenizers import load_tokenizer

transformers = pytest.importorskip("transformers")

_OPENS: list[Counter] = []
"""The counter of the innermost ``_count_opens`` block (the hook counts nothing outside one)."""


def _hook(event: str, args) -> None:
    if event == "open" and _OPENS and isinstance(args[0], (str, Path)):
        _OPENS[-1][Path(args[0]).name] += 1


sys.addaudithook(_hook)  # an audit hook cannot be removed: it stays idle outside _count_opens


def _count_opens(fn) -> Counter:
    _OPENS.append(Counter())
    try:
        fn()
    finally:
        counts = _OPENS.pop()
    return counts


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path), max_shard_size="20KB")  # several shards
    return path


def test_inspect_reads_the_config_and_each_header_once(llama_dir):
    shards = sorted(p.name for p in llama_dir.glob("*.safetensors"))
    assert len(shards) > 1
    out = []
    opens = _count_opens(lambda: out.append(inspect_path(llama_dir)))
    assert "importable:   yes, as decoder: 2 layers" in out[0], out[0]
    assert opens["config.json"] == 2, opens  # ours, and transformers' AutoConfig
    assert {name: opens[name] for name in shards} == dict.fromkeys(shards, 1), opens
    assert opens["model.safetensors.index.json"] == 1, opens


def test_import_reads_the_config_once(llama_dir, tmp_path):
    opens = _count_opens(lambda: import_hf(llama_dir, tmp_path / "init", log=lambda *_: None))
    assert opens["config.json"] == 2, opens  # ours, and transformers' AutoConfig
    import json

    meta = json.loads((tmp_path / "init" / "meta.json").read_text())
    assert meta["hf_token_ids"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}


def test_generate_encodes_the_prompt_once(tiny_tokenizer, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_tokenizer)
    cfg = load_config("tiny-test")
    cfg.model.vocab_size = 448  # the tokenizer's 400 pieces, padded
    torch.manual_seed(0)
    model = build_model(cfg.model)
    write_init_checkpoint(tmp_path / "ckpt", cfg, model.state_dict(), {}, tok)
    expected = generate_text(model, tok, "In the year", 5)
    calls = []
    real = type(tok).encode
    monkeypatch.setattr(
        type(tok), "encode", lambda self, text, *a, **k: calls.append(text) or real(self, text, *a, **k)
    )
    assert generate_from_checkpoint(str(tmp_path / "ckpt"), "In the year", 5) == expected
    assert calls == ["In the year"]
