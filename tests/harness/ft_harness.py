"""Replica groups under torchft for the tests: a real lighthouse, groups of real ranks, a one-process reference.

A group is ``python -m meshforge train`` on N ranks with torchrun's variables (its own MASTER_PORT, as
each torchrun job has), ``parallel.fault_tolerance = torchft`` and its group id. The reference
replays one group's metrics.jsonl in one process: per committed step the samples the record names
(``ft_samples``), the same micro-batches, loss (with a MoE's aux losses), clipping, AdamW and LR schedule; a step that did
not commit moves only the schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from parallel_harness import PARITY_ARGS, free_port, start_ranks

LIGHTHOUSE = shutil.which("torchft_lighthouse")


class Lighthouse:
    """``torchft_lighthouse`` on 127.0.0.1 (a free port) for the life of a ``with`` block; its log (stdout and
    stderr, RUST_LOG=info: each quorum it forms) goes to a temporary file, :meth:`log_tail` reads it."""

    def __init__(self, heartbeat_ms: int = 1000, join_ms: int = 300, min_replicas: int = 1, tick_ms: int = 100):
        self.port = free_port()
        self.args = [
            LIGHTHOUSE,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--min_replicas",
            str(min_replicas),
            "--join_timeout_ms",
            str(join_ms),
            "--heartbeat_timeout_ms",
            str(heartbeat_ms),
            "--quorum_tick_ms",
            str(tick_ms),
        ]
        self.proc = None
        self.log = tempfile.NamedTemporaryFile(prefix="torchft-lighthouse-", suffix=".log")

    def log_tail(self, chars: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Lighthouse":
        env = {**os.environ, "RUST_LOG": "info"}
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.kill()
        self.log.close()


FT_LR = "3e-4"
"""The tests' peak LR: the replay sums gradients in another order than the ranks (FSDP's reduce-scatter,
the cross-group sum), and at the tiny model's own 3e-3 AdamW grows those last-bit differences by ~10x
every few steps after warm-up (1e-2 in the loss by step 60); at 3e-4 a 150-step run with a heal stays
within 7.2e-7 of the replay (measured), so 1e-6 tests the data and commit logic, not the rounding."""


def group_args(
    data_dir: Path, out: Path, lighthouse: Lighthouse, steps: int, groups: int = 2, *extra: str
) -> list[str]:
    return [
        "train",
        *PARITY_ARGS,
        "--optim.lr",
        FT_LR,
        "--data.path",
        str(data_dir),
        "--train.output_dir",
        str(out),
        "--train.steps",
        str(steps),
        "--parallel.fault_tolerance",
        "torchft",
        "--parallel.ft_groups",
        str(groups),
        "--parallel.ft_lighthouse",
        lighthouse.address,
        "--parallel.ft_timeout_s",
        "10",
        "--parallel.ft_quorum_timeout_s",
        "15",
        *extra,
    ]


def start_group(args: list[str], group: int, ranks: int = 2, script: list[str] | None = None) -> list[subprocess.Popen]:
    return start_ranks(ranks, args + ["--parallel.ft_replica_group", str(group)], script=script)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every rank (killing all of them when time runs out); -> (exit status, stderr) per rank."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            _, err = p.communicate()
        out.append((p.returncode, err.decode(errors="replace")))
    return out


@contextlib.contextmanager
def logs_on_failure(lighthouse: Lighthouse, groups: dict, finished: dict, chars: int = 3000):
    """A failure inside the block (an assertion, a timeout) ends every rank still running and fails with each
    rank's exit status and stderr tail and the lighthouse's log tail appended. ``groups``: the running ranks
    by name, ``finished``: :func:`finish`'s results by name, both kept up to date by the block."""
    try:
        yield
    except BaseException as e:
        parts = [
            f"--- {name} rank {r} (exit {status}):\n{err[-chars:]}"
            for name, ranks in finished.items()
            for r, (status, err) in enumerate(ranks)
        ]
        for name, procs in groups.items():
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                try:
                    _, err = p.communicate(timeout=30)
                except (subprocess.TimeoutExpired, ValueError):  # ValueError: its stderr was read already
                    err = b""
                parts.append(
                    f"--- {name} rank {r} (exit {p.returncode}):\n{(err or b'').decode(errors='replace')[-chars:]}"
                )
        parts.append(f"--- lighthouse:\n{lighthouse.log_tail(chars)}")
        raise AssertionError(f"{e!r}\n" + "\n".join(parts)) from e


def records(out: Path, group: int) -> list[dict]:
    """The step records of group ``group`` (its metrics.jsonl under ``out/group_<id>``)."""
    return read_records(out / f"group_{group}" / "metrics.jsonl")


def read_records(path: Path) -> list[dict]:
    """The step records of a metrics.jsonl, so far (a line being written ends the list)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in rows if "loss" in r]


def wait_for_steps(out: Path, group: int, steps: int, timeout: float, peer: list | None = None) -> None:
    """Until group ``group`` has ``steps`` records; ``peer``: ranks that must still run meanwhile."""
    deadline = time.monotonic() + timeout
    while len(records(out, group)) < steps:
        assert peer is None or all(p.poll() is None for p in peer), (
            f"the peer group ended before group {group} reached step {steps}"
        )
        assert time.monotonic() < deadline, f"group {group} did not reach step {steps} in {timeout:.0f}s"
        time.sleep(0.2)


def final_weights(out: Path, group: int) -> dict[str, torch.Tensor]:
    from parallel_harness import read_result

    return read_result(out / f"group_{group}").params


def replay(out: Path, group: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process trains what group ``group``'s metrics.jsonl says was trained;
    -> (recorded losses, reference losses) of the committed steps, and the final weights."""
    from meshforge.config import config_from_dict
    from meshforge.launch.env import DistEnv
    from meshforge.models import build_model
    from meshforge.models.losses import lm_loss
    from meshforge.models.moe import RouterStats, collect_router_stats
    from meshforge.parallel.mesh import Degrees
    from meshforge.pretrain.data import prepare_train_data
    from meshforge.pretrain.optim import build_optimizer, build_scheduler

    cfg = config_from_dict(json.loads((out / f"group_{group}" / "config.json").read_text()))
    cfg.parallel.fault_tolerance = "none"
    data = prepare_train_data(cfg, DistEnv(0, 1, 0), Degrees(1, 1, 1, 1, 1, 1))
    dataset = data.train_loader.dataset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): on a busy machine more threads only wait
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim, "cpu", 1.0 / cfg.model.width_mult)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    mbs = cfg.train.micro_batch_size
    got, want = [], []
    for rec in records(out, group):
        if rec["ft_committed"]:
            micro = [
                torch.from_numpy(__import__("numpy").stack([dataset[i] for i in range(s, s + mbs)]))
                for first, end in rec["ft_samples"]
                for s in range(first, end, mbs)
            ]
            ce = 0.0
            with collect_router_stats(model, RouterStats(aux_grad_scale=1.0 / len(micro))):  # MoE: the aux losses
                for mb in micro:
                    args, targets = data.objective.model_inputs(mb)
                    parts = lm_loss(model(*args), targets, cfg.train.z_loss_coef)
                    (parts.total / len(micro)).backward()
                    ce += parts.ce.item() / len(micro)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            got.append(rec["loss"])
            want.append(ce)
        scheduler.step()
    data.train_loader.close()
    torch.set_num_threads(threads)
    return got, want, {k: v.detach().clone() for k, v in model.state_dict().items()}
