"""Bad Hugging Face directories and damaged checkpoints: one line naming the problem, before anything is written.

A real tiny Llama saved by transformers, then broken the ways downloads and hand edits break
(truncated or garbage safetensors, a config.json that is not JSON or disagrees with the
weights); ``convert import`` and ``convert inspect`` each answer one ``meshforge: error:`` line
(exit 2) and write nothing. ``convert export`` checks the checkpoint's recorded sizes and
checksums as train and generate do. A T5 v1.1 made with transformers 5 (head tied to the
embedding but unscaled, no ``lm_head.weight``; d_kv * heads != d_model) imports exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meshforge.cli import main
from meshforge.config import load_config
from meshforge.convert.export import export_hf
from meshforge.convert.import_ import import_hf
from meshforge.convert.inspect import inspect_path
from meshforge.models import build_model
from meshforge.pretrain.checkpoint import CheckpointError, load_model_weights

transformers = pytest.importorskip("transformers")

LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    cfg = transformers.LlamaConfig(**LLAMA)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


BROKEN = [
    ("kv-heads", lambda d: _edit_config(d, num_key_value_heads=4), r"k_proj\.weight .*num_key_value_heads = 4"),
    (
        "no-intermediate-size",
        lambda d: _edit_config(d, intermediate_size=None),
        r"mlp\.\w+_proj\.weight .*intermediate_size \(not in config\.json; transformers' default \d+ was used\)",
    ),
    (
        "config-not-json",
        lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],'),
        r"config\.json is not valid JSON",
    ),
    ("truncated-weights", _truncate, r"model\.safetensors is truncated"),
    (
        "garbage-weights",
        lambda d: (d / "model.safetensors").write_bytes(b"\x00\xff" * 5000),
        r"model\.safetensors is not a safetensors file",
    ),
    ("empty-weights", lambda d: (d / "model.safetensors").write_bytes(b""), r"model\.safetensors is not a safetensors"),
]


@pytest.mark.parametrize("name, breaks, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_hf_directory_is_one_line_for_import_and_inspect(name, breaks, message, llama_dir, tmp_path, capsys):
    d = tmp_path / "hf"
    shutil.copytree(llama_dir, d)
    breaks(d)
    assert main(["convert", "import", "--from", "hf", str(d), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("meshforge: error:"), err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    if name in ("kv-heads", "no-intermediate-size"):  # inspect reads it, and says why it does not import
        assert main(["convert", "inspect", str(d)]) == 0
        out = capsys.readouterr().out
        assert "importable:   no:" in out and __import__("re").search(message, out) and "{" not in out, out
    else:
        assert main(["convert", "inspect", str(d)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_inspect_says_importable_in_plain_text(llama_dir, tmp_path, capsys):
    out = inspect_path(llama_dir)
    assert "importable:   yes, as decoder: 2 layers, dim 32, 4 heads (2 kv)" in out
    import_hf(llama_dir, tmp_path / "init", log=lambda *_: None)
    assert main(["convert", "inspect", str(tmp_path / "init")]) == 0
    out = capsys.readouterr().out
    assert f"made by convert from {llama_dir.resolve()}" in out and "{" not in out and "'" not in out, out


def test_export_verifies_the_checkpoint_checksums(llama_dir, tmp_path):
    import_hf(llama_dir, tmp_path / "init", log=lambda *_: None)
    data = next(p for p in (tmp_path / "init").iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other contents
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{data.name} does not match the sha256"):
        export_hf(tmp_path / "init", tmp_path / "hf", log=lambda *_: None)
    assert not (tmp_path / "hf").exists()


def test_transformers5_t5_v11_imports_with_its_tied_unscaled_head(tmp_path):
    """transformers 5 makes every T5 tie its head; a v1.1 config then says scale_decoder_outputs = false and the
    files hold no lm_head.weight. d_kv * num_heads (4 * 12) != d_model (32), as in google/t5-v1_1-small."""
    cfg = transformers.T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=12,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(str(tmp_path / "hf"))
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # what the import must cope with
    import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    m = load_config(str(tmp_path / "init" / "model.toml")).model
    assert (m.tie_embeddings, m.head_size) == (False, 12)
    ours = build_model(m)
    load_model_weights(tmp_path / "init", ours)
    src, tgt = torch.randint(2, 96, (2, 10)), torch.randint(2, 96, (2, 7))
    with torch.no_grad():
        theirs = hf(input_ids=src, decoder_input_ids=tgt).logits
        got = ours.eval()(src, tgt, torch.ones_like(src, dtype=torch.bool))
    torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-4)
    export_hf(tmp_path / "init", tmp_path / "hf2", log=lambda *_: None)
    back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=src, decoder_input_ids=tgt).logits, theirs, rtol=0, atol=0)
