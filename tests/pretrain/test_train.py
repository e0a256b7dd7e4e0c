"""End to end: `meshforge train` learns, checkpoints, resumes bit-exactly after a real kill,
generates, and refuses bad input before writing anything."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.pretrain.checkpoint import list_checkpoints, read_meta
from meshforge.pretrain.generate import generate_from_checkpoint
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(data_dir: Path, out: Path, **over):
    base = {"data.path": str(data_dir), "train.output_dir": str(out)}
    return load_config("tiny-test", {**base, **over})


def cli_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny-test", "--data.path", str(data_dir), "--train.output_dir", str(out), *extra]


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_train_learns_checkpoints_and_logs(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, **{"train.steps": 60, "train.eval_interval": 20, "checkpoint.interval": 20})
    result = Trainer(cfg).run()
    assert result.final_step == 60
    vals = result.val_losses
    assert sorted(vals) == [0, 20, 40, 60]
    assert vals[60] < vals[0] - 1.0 and vals[60] < vals[20], vals
    records = read_metrics(out)
    assert records[0] == {"step": 0, "val_loss": vals[0]}
    saves = [r for r in records[1:] if "checkpoint_blocked_s" in r]  # a record of its own after each save
    assert [r["step"] for r in saves] == [20, 40, 60] and all(r["checkpoint_blocked_s"] > 0 for r in saves)
    records = [r for r in records[1:] if "checkpoint_blocked_s" not in r]
    assert [r["step"] for r in records] == list(range(1, 61))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "z_loss"):
        assert all(isinstance(r[key], float) for r in records), key
    assert "val_loss" in records[19] and "val_loss" not in records[18]
    assert records[0]["loss"] > records[-1]["loss"]
    assert all(r["z_loss"] > 0 for r in records)
    # keep_last=2: only the two newest checkpoints remain, each complete and self-contained
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000040", "step_00000060"]
    meta = read_meta(ckpts[-1])
    assert meta["step"] == 60 and meta["loader"]["consumed_samples"] == 60 * 8
    assert (ckpts[-1] / "tokenizer.model").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert result.sample.startswith("ROMEO:") and len(result.sample) > len("ROMEO:")


def test_generate_from_checkpoint_matches_trained_model(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, **{"train.steps": 10, "train.eval_interval": 0, "train.sample_prompt": ""})
    trainer = Trainer(cfg)
    trainer.run()
    from meshforge.pretrain.generate import generate_text

    expected = generate_text(trainer.model, trainer.data.tokenizer, "ROMEO:", 12)
    assert generate_from_checkpoint(str(out), "ROMEO:", 12) == expected
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    sampled = generate_from_checkpoint(str(out), "ROMEO:", 12, top_k=5, temperature=1.0, seed=7)
    assert sampled == generate_from_checkpoint(str(out), "ROMEO:", 12, top_k=5, temperature=1.0, seed=7)


def _train_proc(data_dir: Path, out: Path, steps: int, interval: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "meshforge",
        *cli_args(
            data_dir,
            out,
            "--train.steps",
            str(steps),
            "--checkpoint.interval",
            str(interval),
            "--train.eval_interval",
            "0",
            "--train.sample_prompt",
            "",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


def test_resume_after_kill_is_bit_identical(tiny_data, tmp_path):
    steps, interval = 120, 15
    ref = tmp_path / "ref"
    p = _train_proc(tiny_data, ref, steps, interval)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()

    out = tmp_path / "killed"
    p = _train_proc(tiny_data, out, steps, interval)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        done = [int(c.name.split("_")[1]) for c in list_checkpoints(out / "checkpoints")]
        metrics = out / "metrics.jsonl"
        if done and max(done) >= 30 and metrics.exists():
            lines = metrics.read_text().splitlines()
            if len(lines) >= max(done) + 3:  # past a checkpoint, mid-interval
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed_at = len(lines)
                break
        time.sleep(0.005)
    assert killed_at is not None, "training finished before it could be killed"
    assert killed_at < steps
    p = _train_proc(tiny_data, out, steps, interval)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    ref_losses, got = _losses(ref), _losses(out)
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert got == ref_losses  # bit-identical, not merely close


def test_resume_continues_from_newest_complete_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    over = {"train.steps": 20, "checkpoint.interval": 10, "train.eval_interval": 0, "train.sample_prompt": ""}
    Trainer(tiny_cfg(tiny_data, out, **over)).run()
    ref = _losses(out)
    ckpt_root = out / "checkpoints"
    # Fake the debris of a kill: a half-written newer checkpoint and a final dir missing meta.json.
    (ckpt_root / "step_00000030.tmp").mkdir()
    (ckpt_root / "step_00000030.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (ckpt_root / "step_00000040").mkdir()
    (ckpt_root / "step_00000040" / ".metadata").write_bytes(b"partial")
    import shutil

    shutil.rmtree(ckpt_root / "step_00000020")  # so the newest complete one is step 10
    trainer = Trainer(tiny_cfg(tiny_data, out, **over))
    assert trainer.resume_from.name == "step_00000010"
    trainer.run()
    assert _losses(out) == ref
    assert not (ckpt_root / "step_00000030.tmp").exists()


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, args: list[str], message: str) -> None:
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1, f"expected one line: {err!r}"


def test_bad_config_fails_before_writing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, cli_args(tiny_data, out, "--model.n_layer", "2"), "unknown config key 'model.n_layer'")
    _fails(capsys, cli_args(tiny_data, out, "--train.steps", "ten"), "train.steps: expected int")
    _fails(capsys, cli_args(tiny_data, out, "--data.seq_len", "512"), "beyond the model's positions")
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, cli_args(tmp_path / "nowhere", out), "does not exist")
    assert not out.exists()


def test_truncated_shard(tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bin_file = sorted(data.glob("*.bin"))[0]
    with open(bin_file, "r+b") as f:
        f.truncate(bin_file.stat().st_size - 10)
    out = tmp_path / "run"
    _fails(capsys, cli_args(data, out), "truncated")
    assert not out.exists()


def test_tokenizer_not_matching_manifest(tiny_data, other_tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(
        capsys, cli_args(tiny_data, out, "--data.tokenizer", str(other_tokenizer)), "does not match the data manifest"
    )
    assert not out.exists()


def test_tokenizer_larger_than_model_vocab(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, cli_args(tiny_data, out, "--model.vocab_size", "256"), "raise model.vocab_size")
    assert not out.exists()


def test_output_dir_of_another_run_is_refused_and_untouched(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    over = ["--train.steps", "10", "--train.eval_interval", "0", "--train.sample_prompt", ""]
    assert cli_main(cli_args(tiny_data, out, *over)) == 0
    before = tree_digest(out)
    _fails(
        capsys,
        cli_args(tiny_data, out, *over, "--model.dim", "32", "--model.n_heads", "2"),
        "holds checkpoints of a different run (model.dim: 64 there vs 32 here",
    )
    _fails(capsys, cli_args(tiny_data, out, *over, "--checkpoint.resume", "false"), "already holds checkpoints")
    assert tree_digest(out) == before


@pytest.mark.slow
def test_small_preset_main_job(tmp_path):
    """The README's main job: the built-in small preset on the built-in corpus, on CPU."""
    out = tmp_path / "small"
    result = Trainer(load_config("small", {"train.output_dir": str(out), "train.progress": False})).run()
    first, last = result.val_losses[min(result.val_losses)], result.val_losses[max(result.val_losses)]
    assert last < first - 1.0, result.val_losses
    assert torch.isfinite(torch.tensor(result.losses)).all()
    assert json.loads((out / "config.json").read_text())["model"]["dim"] == 192


def test_trains_on_shards_written_by_megatron_core(tiny_data, tmp_path):
    """A data dir of plain .bin/.idx pairs from megatron-core's IndexedDatasetBuilder trains,
    with the tokenizer given explicitly, and sees the same tokens as our own shards."""
    import numpy as np

    pytest.importorskip("megatron.core")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from meshforge.data_pipeline.indexed import IndexedShard

    ours = sorted(tiny_data.glob("*.idx"))
    mega = tmp_path / "mega"
    mega.mkdir()
    for idx in ours:
        shard = IndexedShard(idx.with_suffix(""))
        builder = IndexedDatasetBuilder(str(mega / f"{idx.stem}.bin"), dtype=np.uint16)
        for i in range(len(shard)):
            builder.add_item(torch.from_numpy(shard[i].astype(np.int64)))
            builder.end_document()
        builder.finalize(str(mega / f"{idx.stem}.idx"))
    over = {"train.steps": 3, "train.eval_interval": 0, "train.sample_prompt": ""}
    ref = Trainer(tiny_cfg(tiny_data, tmp_path / "a", **over)).run().losses
    got = Trainer(
        tiny_cfg(mega, tmp_path / "b", **over, **{"data.tokenizer": str(tiny_data / "tokenizer.model")})
    ).run()
    assert got.losses == ref
