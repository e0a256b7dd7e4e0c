"""A user's normal commands print no third-party warning text.

`meshforge train` (a few steps, one checkpoint), `generate`, `plan --dry-run` (a TP layout,
whose traced backward used to trigger torch's "Full backward hook" notice) and
`convert export` run as the user runs them, each in its own process; their combined output
must hold no warning line from another package (Python's ``...Warning:`` lines, torch's
glog-style ``W1207 12:00:00`` lines, logging's ``WARNING``). meshforge's own messages start
with ``meshforge:``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

THIRD_PARTY_WARNING = re.compile(r"\w*Warning\b|^[WE]\d{4} \d\d:\d\d:\d\d|^WARNING\b|^Failed to load ")


def third_party_warnings(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if THIRD_PARTY_WARNING.search(line) and not line.startswith("meshforge:")
    ]


def test_detector_sees_the_kinds_of_warning_we_used_to_print():
    seen = (
        "/x/torch/distributed/checkpoint/utils.py:485: UserWarning: torch.distributed is disabled, ...\n"
        "W1207 14:46:53.398000 6626 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum\n"
        "WARNING:torch.distributed.run:\n"
        "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library\n"
    )
    assert len(third_party_warnings(seen)) == 4
    assert third_party_warnings("step 10 | loss 6.0\nmeshforge: warning: train.steps is within warmup\n") == []


def _run(*args: str, env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "meshforge", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_train_generate_plan_export_print_no_third_party_warnings(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    run = tmp_path / "run"
    out = _run(
        "train",
        "--config",
        "tiny-test",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(run),
        "--train.steps",
        "4",
        "--checkpoint.interval",
        "4",
        "--train.eval_interval",
        "0",
        "--optim.warmup_steps",
        "2",
        env=env,
    )
    assert (run / "checkpoints" / "step_00000004" / "meta.json").exists()
    out += _run("generate", "--checkpoint", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "4", env=env)
    out += _run(
        "plan", "--config", "tiny-test", "--gpus", "2", "--gpu", "cpu", "--dry-run", "--parallel.tp", "2", env=env
    )
    out += _run("convert", "export", "--checkpoint", str(run), "--output", str(tmp_path / "hf"), env=env)
    assert (tmp_path / "hf" / "config.json").exists()
    assert third_party_warnings(out) == [], out
