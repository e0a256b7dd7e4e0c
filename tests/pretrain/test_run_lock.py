"""One trainer per output directory: a second one (at once, staggered, or a whole multi-rank job) is
refused with one line naming the holder before it writes anything; a lock left by a dead process
is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from meshforge.cli import main as cli_main
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.run_lock import LOCK_NAME, RunLock
from parallel_harness import PARITY_ARGS, REPO, start_ranks
from test_errors import fails, tree_digest


def _args(data, out, *extra):
    return ["train", *PARITY_ARGS, "--data.path", str(data), "--train.output_dir", str(out), *extra]


def test_a_second_trainer_is_refused_naming_the_holder_before_writing(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    held = RunLock(out).acquire()  # the first trainer (this process) is running
    try:
        before = tree_digest(out)
        fails(
            capsys,
            _args(tiny_data, out),
            f"output dir {out} is in use by another meshforge train",
            f"host {socket.gethostname()}, pid {os.getpid()}, SLURM job 4242",
        )
        assert tree_digest(out) == before  # nothing written, nothing removed
        procs = start_ranks(2, _args(tiny_data, out))  # a whole job: every rank stops before any writes
        codes = [p.wait(timeout=300) for p in procs]
        err = procs[0].stderr.read().decode()
        assert codes[0] == 2 and codes[1] != 0, (codes, err[-2000:])
        assert "is in use by another meshforge train" in err.strip().splitlines()[-1], err[-2000:]
        assert tree_digest(out) == before
    finally:
        held.release()
    assert not (out / LOCK_NAME).exists()


def test_two_trainers_started_at_once_one_runs_the_other_refuses(tiny_data, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "meshforge", *_args(tiny_data, out, "--train.steps", "30")]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
        errs = [p.stderr.read().decode() for p in procs]
    finally:  # a timeout or a failed read leaves no trainer running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(codes) == [0, 2], (codes, [e[-1500:] for e in errs])
    refused = errs[codes.index(2)]
    assert refused.startswith("meshforge: error: ") and refused.count("\n") == 1, refused
    assert f"output dir {out} is in use by another meshforge train (host" in refused
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 31))  # the survivor's record is complete
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    assert cli_main(_args(tiny_data, out, "--train.steps", "2")) == 0
    said = capsys.readouterr().out
    assert f"output dir lock: taken over from host {socket.gethostname()}, pid {dead.pid}, since earlier" in said
    assert not (out / LOCK_NAME).exists() and (out / "metrics.jsonl").is_file()


def test_a_refused_start_leaves_no_output_dir(tiny_data, tmp_path, capsys):
    out = tmp_path / "new"
    fails(capsys, _args(tiny_data, out, "--data.path", str(tmp_path / "missing")), "missing")
    assert not out.exists()
