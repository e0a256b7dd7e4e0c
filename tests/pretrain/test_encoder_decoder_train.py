"""Encoder-decoder pretraining with span corruption, end to end and under FSDP2.

The data is real: Shakespeare documents tokenized by a sentencepiece model trained with the
T5 preset (unigram, ``<extra_id_i>`` sentinels). Every run goes through `meshforge train`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.data_pipeline.errors import DataError
from meshforge.pretrain.trainer import train
from parallel_harness import REPO, assert_parity, train_layout

T5_ARGS = (
    "--config",
    "t5-small",
    "--model.vocab_size",
    "512",
    "--model.dim",
    "64",
    "--model.n_layers",
    "2",
    "--model.n_decoder_layers",
    "2",
    "--model.n_heads",
    "4",
    "--model.ffn_dim",
    "128",
    "--model.max_seq_len",
    "64",
    "--data.seq_len",
    "32",
    "--train.steps",
    "10",
    "--train.global_batch_size",
    "8",
    "--train.micro_batch_size",
    "2",
    "--train.eval_interval",
    "0",
    "--train.sample_prompt",
    "",
    "--checkpoint.interval",
    "0",
    "--train.progress",
    "false",
)
"""A 2+2-layer fp32 T5, 10 steps of 8 span-corrupted samples (32 encoder tokens)."""


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory):
    """150 Shakespeare documents prepared with a 512-piece T5-preset tokenizer."""
    from corpus_files import _corpus_slice
    from meshforge.data_pipeline.prepare import prepare_data
    from meshforge.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("t5_data")
    corpus = _corpus_slice(root / "corpus.jsonl", 0, 150)
    tok = train_tokenizer([corpus], root / "tok", 512, preset="t5")
    prepare_data([str(corpus)], str(tok), str(root / "data"), progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def t5_ref(t5_data, tmp_path_factory):
    return train_layout(t5_data, tmp_path_factory.mktemp("t5_ref") / "run", 1, extra_args=T5_ARGS)


def _cfg(data, out, *overrides):
    assert T5_ARGS[:2] == ("--config", "t5-small")
    return load_config("t5-small", [*T5_ARGS[2:], "--data.path", str(data), "--train.output_dir", str(out), *overrides])


def test_t5_learns_evaluates_and_fills_sentinels(t5_data, tmp_path):
    out = tmp_path / "run"
    result = train(
        _cfg(
            t5_data,
            out,
            "--train.steps",
            "30",
            "--train.eval_interval",
            "15",
            "--train.sample_prompt",
            "ROMEO: <extra_id_0> love <extra_id_1> night.",
            "--train.sample_tokens",
            "8",
        )
    )
    assert result.val_losses[30] < result.val_losses[0] - 1.5, result.val_losses
    assert result.sample  # a decoded fill of the sentinels
    # `meshforge generate` reloads the checkpoint as an encoder-decoder and decodes greedily
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshforge",
            "generate",
            "--checkpoint",
            str(out),
            "--prompt",
            "ROMEO: <extra_id_0> love.",
            "--max-new-tokens",
            "6",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_span_corrupted_batches_are_what_the_model_sees(t5_data, tmp_path):
    """Encoder inputs hold sentinels; targets start with a sentinel; the decoder reads them shifted right."""
    from meshforge.launch.env import DistEnv
    from meshforge.models.losses import IGNORE_INDEX
    from meshforge.parallel.mesh import resolve_degrees
    from meshforge.pretrain.data import prepare_train_data
    from meshforge.pretrain.objectives import sentinel_ids

    cfg = _cfg(t5_data, tmp_path / "x")
    data = prepare_train_data(cfg, DistEnv(0, 1, 0, 1), resolve_degrees(cfg.parallel, 1))
    batch = data.train_loader.next_batch()
    (src, tgt_in, src_mask), targets = data.objective.model_inputs(batch)
    sentinels = torch.tensor(sentinel_ids(data.tokenizer))
    assert src.shape == (8, 32) and src_mask.dtype == torch.bool
    assert torch.isin(src, sentinels).any(dim=1).all()
    assert torch.isin(targets[:, 0], sentinels).all()
    assert (tgt_in[:, 0] == data.tokenizer.pad_id).all() and torch.equal(tgt_in[:, 1:], batch[:, 32:-1])
    # the raw window is sized so that inputs fill the encoder; targets end with EOS and any
    # padding after it is left out of the loss
    assert (targets[:, -1] == data.tokenizer.eos_id).all() or (targets[:, -1] == IGNORE_INDEX).all()
    assert not (targets == data.tokenizer.pad_id).any()


def test_tokenizer_without_sentinels_fails_before_writing(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="sentinel"):
        train(_cfg(tiny_data, out))
    assert not out.exists()


def test_t5_rejects_the_lm_objective_before_writing(t5_data, tmp_path):
    assert (
        cli_main(
            [
                "train",
                *T5_ARGS,
                "--data.path",
                str(t5_data),
                "--train.output_dir",
                str(tmp_path / "a"),
                "--data.objective",
                "lm",
            ]
        )
        == 2
    )
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "name, world, overrides",
    [("fsdp2", 2, ()), pytest.param("hsdp-2x2", 4, ("--parallel.dp_replicate", "2"), marks=pytest.mark.slow)],
)
def test_t5_data_parallel_matches_single_process(name, world, overrides, t5_data, t5_ref, tmp_path):
    got = train_layout(t5_data, tmp_path / name, world, *overrides, extra_args=T5_ARGS)
    assert_parity(t5_ref, got)
