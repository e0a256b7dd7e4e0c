"""Training from a URL (nginx over HTTP, moto over S3) equals training from the local copy, bit for bit.

The comparisons are exact (``==``): the remote dataset must hand the trainer the very same
batches, so nothing in the run may differ. With a resume from a checkpoint, a change from 1
to 2 ranks on resume, `data prepare --output s3://...` then training from it, and a server
taken away mid-run (slow); a bad URL is one line before any output. Servers and data: the
``shards_data``, ``http`` and ``s3`` fixtures of conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from meshforge.pretrain.metrics import read_metrics
from parallel_harness import PARITY_ARGS, REPO, read_result, run_ranks
from remote_servers import Nginx, need_nginx


@pytest.mark.parametrize(
    "path, message",
    [
        ("https://user:hunter2@127.0.0.1:1/data", "carries credentials"),
        ("http://127.0.0.1:1/data", "http://127.0.0.1:1/data/manifest.json: stat failed, retried for"),
        ("0.5:http://127.0.0.1:1/a,0.5:s3://user:hunter2@b/c", "carries credentials"),
    ],
)
def test_train_from_a_bad_url_is_one_line_before_any_output(path, message, tmp_path, capsys):
    from meshforge.cli import main as cli_main

    key = "--data.blend" if path.startswith("0.5:") else "--data.path"
    out = tmp_path / "run"
    code = cli_main(
        [
            "train",
            "--config",
            "tiny-test",
            key,
            path,
            "--train.output_dir",
            str(out),
            "--data.remote_retry_seconds",
            "1",
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err and not out.exists()


STEPS = ("--train.steps", "20", "--checkpoint.interval", "10")


def _train(data, out, world, *extra):
    run_ranks(world, ["train", *PARITY_ARGS, "--data.path", str(data), "--train.output_dir", str(out), *STEPS, *extra])


def _resumed_run(data, out, worlds, *extra):
    """20 steps on ``worlds[0]`` ranks, the last checkpoint dropped, then resumed at step 10 on ``worlds[1]``."""
    _train(data, out, worlds[0], *extra)
    shutil.rmtree(out / "checkpoints" / "step_00000020")
    _train(data, out, worlds[1], *extra)
    return read_result(out)


def assert_identical(ref, got) -> None:
    assert len(got.losses) == len(ref.losses) == 20 and got.losses == ref.losses
    assert ref.params.keys() == got.params.keys()
    for name, p in ref.params.items():
        assert (got.params[name] == p).all(), name
    assert ref.losses[-1] < ref.losses[0]


def test_train_from_http_equals_local(shards_data, http, tmp_path):
    """The default suite's case: 20 steps straight (resume and 1 -> 2 ranks: the slow tests below)."""
    _train(shards_data, tmp_path / "local", 1)
    _train(f"{http.url}/data", tmp_path / "remote", 1, "--data.cache_dir", str(tmp_path / "cache"))
    ref, got = read_result(tmp_path / "local"), read_result(tmp_path / "remote")
    assert_identical(ref, got)
    last = [r for r in read_metrics(got.output_dir) if "loss" in r][-1]
    assert last["data_bytes_fetched"] > 0 and last["data_retries"] == 0


@pytest.mark.slow
def test_s3_prepare_then_train_1_to_2_ranks_equals_local(shards_data, s3, tiny_data, tmp_path):
    src = tiny_data.parent
    cmd = [
        sys.executable,
        "-m",
        "meshforge",
        "data",
        "prepare",
        "--input",
        str(src / "corpus.jsonl"),
        "--tokenizer",
        str(src / "tok.model"),
        "--output",
        "s3://bucket/cli",
        "--docs-per-shard",
        "40",
        "--cache-dir",
        str(tmp_path / "stage"),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    ref = _resumed_run(shards_data, tmp_path / "local", (1, 2))
    got = _resumed_run("s3://bucket/cli", tmp_path / "remote", (1, 2), "--data.cache_dir", str(tmp_path / "cache"))
    assert_identical(ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["range", "download"])
def test_http_resume_on_2_ranks_equals_local(mode, shards_data, http, tmp_path):
    ref = _resumed_run(shards_data, tmp_path / "local", (1, 2))
    got = _resumed_run(
        f"{http.url}/data",
        tmp_path / "remote",
        (1, 2),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.remote_mode",
        mode,
    )
    assert_identical(ref, got)


@pytest.mark.slow
def test_server_stopped_mid_run_continues_with_the_same_losses(shards_data, tmp_path):
    need_nginx()
    extra = ("--train.steps", "60", "--checkpoint.interval", "0")
    run_ranks(
        1,
        ["train", *PARITY_ARGS, "--data.path", str(shards_data), "--train.output_dir", str(tmp_path / "local"), *extra],
    )
    server = Nginx(shards_data.parent, tmp_path / "ng").start()
    proc = None
    try:
        out = tmp_path / "remote"
        args = [
            sys.executable,
            "-m",
            "meshforge",
            "train",
            *PARITY_ARGS,
            "--data.path",
            f"{server.url}/data",
            "--train.output_dir",
            str(out),
            "--data.cache_dir",
            str(tmp_path / "cache"),
            *extra,
        ]
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        server.stop()
        time.sleep(3)
        server.start()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        if proc is not None:
            proc.kill()
        server.stop()
    ref = [r["loss"] for r in read_metrics(tmp_path / "local") if "loss" in r]
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["loss"] for r in records] == ref
    assert records[-1]["data_retries"] > 0 and records[-1]["step"] == 60
