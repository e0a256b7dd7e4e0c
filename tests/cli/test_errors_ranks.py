"""A multi-rank job's errors, for real (2 spawned ranks on gloo): printed once, by rank 0;
a rank that fails while starting stops its peer at once, named; one that dies without a
word is named when train.setup_timeout_s runs out; the normal output is printed once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from parallel_harness import PARITY_ARGS, start_ranks


def spawn(
    data: Path,
    out: Path,
    per_rank: dict[int, list[str]] | None = None,
    env_of: dict[int, dict] | None = None,
    *args: str,
    world: int = 2,
    timeout: float = 240,
) -> tuple[list[tuple[int, str, str]], float]:
    """``world`` ranks of ``meshforge train`` (rank r gets ``per_rank[r]`` and ``env_of[r]`` on top);
    returns (exit status, stdout, stderr) of each and the seconds until the last one ended."""
    start = time.monotonic()
    argv = ["train", *PARITY_ARGS, "--data.path", str(data), "--train.output_dir", str(out), *args]
    procs = start_ranks(world, argv, stdout=subprocess.PIPE, rank_args=per_rank, rank_extra_env=env_of)
    results = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            results.append((p.returncode, o.decode(errors="replace"), e.decode(errors="replace")))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results, time.monotonic() - start


def error_lines(results) -> list[str]:
    return [ln for _, _, err in results for ln in err.splitlines() if ln.startswith("meshforge: error:")]


def test_the_same_bad_config_on_every_rank_is_printed_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    results, _ = spawn(tiny_data, out, None, None, "--optim.lr", "nan")
    assert [r[0] for r in results] == [2, 2], results
    lines = error_lines(results)
    assert lines == ["meshforge: error: optim.lr must be a finite number, got nan"], results
    assert "Traceback" not in results[0][2] + results[1][2]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the injected failure is train.device = cuda without a GPU")
def test_a_rank_failing_while_starting_stops_its_peer_at_once_and_is_named(tiny_data, tmp_path):
    out = tmp_path / "run"
    # rank 1 alone has a setting it cannot run; rank 0 would wait in the rendezvous for
    # train.collective_timeout_s (600 s) without the check-in
    results, took = spawn(tiny_data, out, {1: ["--train.device", "cuda"]}, None)
    assert took < 60, f"the job took {took:.0f} s to stop"
    assert results[0][0] == 1 and results[1][0] == 2, results
    lines = error_lines(results)
    assert len(lines) == 1, results
    assert "rank 1 of 2: train.device = 'cuda' but this machine has no CUDA device" in lines[0], lines
    assert results[0][2].count("meshforge: error:") == 1 and "Traceback" not in results[0][2] + results[1][2]


@pytest.mark.slow
def test_a_rank_that_never_checks_in_is_named_after_the_setup_timeout(tiny_data, tmp_path):
    out = tmp_path / "run"
    # rank 1 cannot even read its place in the job (RANK is not a number): it cannot tell the
    # others, so rank 0 names it when train.setup_timeout_s runs out
    results, took = spawn(tiny_data, out, None, {1: {"RANK": "one"}}, "--train.setup_timeout_s", "5")
    assert results[1][0] == 2 and "RANK='one' is not an integer" in results[1][2], results
    assert results[0][0] == 1, results
    assert "rank 1 did not start within 5 s (train.setup_timeout_s)" in results[0][2], results[0][2]
    assert took < 90


def test_a_two_rank_run_prints_its_lines_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    results, _ = spawn(
        tiny_data,
        out,
        None,
        None,
        "--train.steps",
        "2",
        "--train.eval_interval",
        "2",
        "--train.sample_prompt",
        "ROMEO:",
        "--logging.log_interval",
        "1",
    )
    assert [r[0] for r in results] == [0, 0], results
    (_, out0, _), (_, out1, _) = results
    assert out0.count("step      0 | val_loss") == 1 and "val_loss" not in out1, (out0, out1)
    assert "sample>" not in out0 + out1  # no empty sample line: the weights are sharded
    assert out0.count("meshforge generate --checkpoint") == 1 and "generate" not in out1, out0
