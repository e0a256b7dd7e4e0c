"""A model vocabulary larger than the tokenizer's: trains, samples at the end, generates from
its checkpoint, and never produces an id the tokenizer lacks; ``model.vocab_size = 0`` is the
tokenizer's size rounded up to ``model.vocab_multiple_of``; a smaller one is refused."""

from __future__ import annotations

import json

import torch
from torch import nn

from meshforge.cli import main as cli_main
from meshforge.config import load_config, padded_vocab_size
from meshforge.pretrain.data import resolve_vocab_size
from meshforge.pretrain.generate import generate_text
from meshforge.tokenizers import load_tokenizer


def test_padded_vocab_size_rule(tiny_data):
    assert [padded_vocab_size(n, 64) for n in (1, 64, 65, 512, 32000, 32001)] == [64, 64, 128, 512, 32000, 32064]
    assert padded_vocab_size(513, 1) == 513
    cfg = load_config("tiny-test", {"data.path": str(tiny_data), "model.vocab_size": 0, "model.vocab_multiple_of": 96})
    resolve_vocab_size(cfg)
    assert cfg.model.vocab_size == 576  # the data's 512-piece tokenizer, rounded up to 6 * 96
    builtin = load_config("tiny-test", {"model.vocab_size": 0, "data.builtin_vocab_size": 1000})
    resolve_vocab_size(builtin)
    assert builtin.model.vocab_size == 1024
    explicit = load_config("tiny-test", {"data.path": str(tiny_data), "model.vocab_size": 640})
    resolve_vocab_size(explicit)
    assert explicit.model.vocab_size == 640


class FavoursPadding(nn.Module):
    """Logits that peak on an id beyond the tokenizer (what an untrained padding row can do)."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.cfg = type("Cfg", (), {"max_seq_len": 64})()
        self.vocab, self.favourite = vocab, favourite

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.favourite] = 50.0
        logits[..., 10] = 49.0  # the best id the tokenizer has
        return logits


def test_generation_never_picks_an_id_beyond_the_tokenizer(tiny_data):
    tok = load_tokenizer(tiny_data / "tokenizer.model")
    model = FavoursPadding(tok.vocab_size + 64, tok.vocab_size + 7)
    greedy = generate_text(model, tok, "ROMEO:", 4)
    assert greedy == "ROMEO:" + tok.decode([10] * 4)
    sampled = generate_text(model, tok, "ROMEO:", 4, top_k=3, temperature=5.0, seed=3)
    assert sampled.startswith("ROMEO:")  # would raise "piece id is out of range" on a padding id


def test_train_with_a_padded_vocab_samples_and_generates(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "tiny-test",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--model.vocab_size",
        "0",
        "--model.vocab_multiple_of",
        "96",
        "--train.steps",
        "3",
        "--train.eval_interval",
        "0",
        "--checkpoint.interval",
        "0",
        "--train.sample_tokens",
        "24",
    ]
    assert cli_main(argv) == 0
    assert "sample> ROMEO:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 576
    for args in ([], ["--top-k", "0", "--temperature", "2.0", "--seed", "5"]):
        assert (
            cli_main(["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "24", *args]) == 0
        )
        assert capsys.readouterr().out.startswith("ROMEO:")
    # the same run again resumes (its identity holds the resolved size, as an explicit 576 would)
    assert cli_main([*argv[:-2], "--train.steps", "4"]) == 0


def test_a_vocab_smaller_than_the_tokenizer_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "tiny-test",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--model.vocab_size",
        "500",
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "has 512 tokens but model.vocab_size is 500" in err and err.count("\n") == 1
    assert not out.exists()
