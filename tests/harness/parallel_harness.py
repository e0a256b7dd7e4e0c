"""Run `meshforge train` as N real processes (gloo on CPU) and compare with one process.

Each rank is a `python -m meshforge train` subprocess with torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the test goes
through the same entry point as a user's job. Per-step losses come from metrics.jsonl;
final parameters come from the run's last checkpoint, loaded (resharded by DCP) into a
single-process model, so a layout that trains the wrong thing or saves the wrong thing
cannot pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

PARITY_ARGS = (
    "--config",
    "tiny-test",
    "--model.n_layers",
    "4",
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
"""A 4-layer fp32 decoder, 10 steps of 8 samples: small enough for 8 ranks on 2 cores."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, extra_env: dict | None = None) -> dict:
    """torchrun's environment for ``rank`` of ``world_size`` on this machine, one compute thread per rank."""
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }


def start_ranks(
    world_size: int,
    argv: list[str],
    extra_env: dict | None = None,
    script: list[str] | None = None,
    stdout=subprocess.DEVNULL,
    rank_args: dict[int, list[str]] | None = None,
    rank_extra_env: dict[int, dict] | None = None,
) -> list[subprocess.Popen]:
    """Start ``world_size`` ranks of ``python -m meshforge ARGV`` (or ``python SCRIPT... ARGV``); stderr is piped.
    Rank r gets ``rank_args[r]`` after ARGV and ``rank_extra_env[r]`` on top of its environment."""
    port = free_port()
    cmd = [sys.executable, *(script or ["-m", "meshforge"]), *argv]
    rank_args, rank_extra_env = rank_args or {}, rank_extra_env or {}
    return [
        subprocess.Popen(
            cmd + rank_args.get(rank, []),
            env=rank_env(rank, world_size, port, {**(extra_env or {}), **rank_extra_env.get(rank, {})}),
            cwd=REPO,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        for rank in range(world_size)
    ]


class RanksFailed(AssertionError):
    """Some ranks exited with an error (``failed``: their ranks; ``errs``: every finished rank's stderr)."""

    def __init__(self, message: str, failed: list[int] = (), errs: list[str] = ()):
        super().__init__(message)
        self.failed, self.errs = list(failed), list(errs)

    def last_line(self) -> str:
        """The last stderr line of the first failed rank (the error a user would read), or this message."""
        if not self.failed:
            return str(self)
        tail = self.errs[self.failed[0]].strip().splitlines()
        return f"rank {self.failed[0]} exited with an error: " + (tail[-1] if tail else "(no stderr)")


def run_ranks(
    world_size: int,
    args: list[str],
    timeout: float = 600,
    extra_env: dict | None = None,
    script: list[str] | None = None,
) -> list[str]:
    """Run ``world_size`` ranks of ``python -m meshforge <args>`` (or ``python SCRIPT... <args>``) to the end,
    within ``timeout`` seconds in all; return their stderr; raise RanksFailed if any fails or time runs out
    (every rank is then killed)."""
    procs = start_ranks(world_size, args, extra_env, script=script)
    deadline = time.monotonic() + timeout
    errs, failed = [], []
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            raise RanksFailed(f"rank {rank} of {world_size} timed out after {timeout:.0f}s") from None
        errs.append(err.decode(errors="replace"))
        if p.returncode != 0:
            failed.append(rank)
            for q in procs:
                if q.poll() is None:
                    q.kill()
    if failed:
        raise RanksFailed(f"ranks {failed} failed:\n" + "\n".join(errs[r][-3000:] for r in failed), failed, errs)
    return errs


@dataclass
class RunResult:
    losses: list[float]
    params: dict[str, torch.Tensor]
    output_dir: Path


def read_result(out: Path) -> RunResult:
    from meshforge.config import config_from_dict
    from meshforge.models import build_model
    from meshforge.pretrain.checkpoint import find_checkpoint, load_model_weights, read_meta
    from meshforge.pretrain.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    ckpt = find_checkpoint(out)
    cfg = config_from_dict(read_meta(ckpt)["config"])
    model = build_model(cfg.model, "cpu")
    load_model_weights(ckpt, model)
    return RunResult(losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, out)


def train_layout(
    data_dir: Path,
    out: Path,
    world_size: int,
    *overrides: str,
    extra_args: tuple = PARITY_ARGS,
    timeout: float = 600,
    script: list[str] | None = None,
) -> RunResult:
    args = ["train", *extra_args, "--data.path", str(data_dir), "--train.output_dir", str(out), *overrides]
    run_ranks(world_size, args, timeout=timeout, script=script)
    return read_result(out)


TP_ATOL = 1e-5
"""Parameter tolerance of layouts with TP: it sums matmul partials in another order than one process, and
AdamW turns that rounding into up to ~lr-sized differences on elements whose gradient is near zero (on an AMD
EPYC, pp2 x tp2 after 10 steps: one element of 2,048 in ``layers.3.attention.wv`` 4.2e-6 away, all others
within 1e-6; losses and gradient norms stay within rtol 1e-5)."""


def assert_parity(ref: RunResult, got: RunResult, rtol: float = 1e-5, atol: float = 1e-6, min_steps: int = 10) -> None:
    """Per-step losses (at least ``min_steps``) and final parameters equal within fp32 tolerance."""
    assert len(got.losses) == len(ref.losses) >= min_steps, (len(ref.losses), len(got.losses))
    torch.testing.assert_close(
        torch.tensor(got.losses, dtype=torch.float64), torch.tensor(ref.losses, dtype=torch.float64), rtol=rtol, atol=0
    )
    assert ref.params.keys() == got.params.keys()
    for name, p in ref.params.items():
        torch.testing.assert_close(got.params[name], p, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    # the run must have moved the weights, or parity would be vacuous
    assert ref.losses[-1] < ref.losses[0]
