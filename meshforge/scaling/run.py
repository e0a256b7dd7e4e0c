"""Run the rows of a sweep: local subprocesses K at a time, or a SLURM job array.

Each row trains as its own ``python -m meshforge train --config runs/<id>/job.toml`` (the
row's resolved config written as TOML) with its own output dir, log in ``runs/<id>/train.log``.
When it ends, one result row is appended to ``results.csv`` (under a file lock: array tasks
append concurrently) and its training curve to ``curves.csv``.

Resuming: a row whose latest result has status ``ok`` is skipped; any other row is (re)run,
and the trainer resumes it from the newest checkpoint in its output dir (a partial run). A
failed row is recorded as ``failed`` (or ``diverged``) with the last line of its log, and the
sweep goes on. On SIGINT/SIGTERM the runner stops its children with SIGTERM (the trainer
checkpoints and exits) and records nothing for them, so the next invocation resumes them.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import ScalingError
from .plan import read_sweep

RESULT_FIELDS = [
    "id",
    "kind",
    "budget",
    "N",
    "N_total",
    "D",
    "flops",
    "steps",
    "lr",
    "variant",
    "width",
    "layers",
    "qk_norm",
    "z_loss_coef",
    "loss",
    "train_loss",
    "val_loss",
    "init_loss",
    "tokens_per_s",
    "wall_s",
    "train_s",
    "status",
    "error",
]
"""Columns of results.csv; ``loss`` is the final validation loss (the held-out split, the same for every row)."""
CURVE_FIELDS = ["id", "budget", "N", "step", "D", "flops", "loss"]
EXIT_PREEMPTED = 42


def toml_text(config: dict[str, dict]) -> str:
    """A config dict (sections of scalars) as TOML."""
    lines = []
    for sec, table in config.items():
        lines.append(f"[{sec}]")
        for key, value in table.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = (
                    repr(value)
                    if math.isfinite(value)
                    else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
                )
            else:
                text = json.dumps(str(value))
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def read_results(path: Path) -> dict[str, dict]:
    """The latest result row of each id in a results.csv (empty when there is none)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _append(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerows(rows)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def collect(row: dict, rc: int, wall_s: float) -> tuple[dict, list[dict]]:
    """The result row of a finished subprocess (and its curve) from its metrics.jsonl."""
    cfg = row["config"]
    out = Path(cfg["train"]["output_dir"])
    steps = cfg["train"]["steps"]
    tps = cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"]
    per_token = row["flops"] / row["D"]
    result = {
        k: row.get(k)
        for k in ("id", "kind", "budget", "N", "N_total", "D", "flops", "steps", "lr", "variant", "width", "layers")
    }
    result.update(qk_norm=cfg["model"]["qk_norm"], z_loss_coef=cfg["train"]["z_loss_coef"], wall_s=round(wall_s, 2))
    records = []
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    train = [r for r in records if "loss" in r]
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    last = train[-10:]
    if last:
        result["train_loss"] = sum(r["loss"] for r in last) / len(last)
        speeds = sorted(r["tokens_per_s"] for r in train)
        result["tokens_per_s"] = round(speeds[len(speeds) // 2], 1)
        result["train_s"] = round(sum(r.get("step_time_s", 0.0) for r in train), 2)
    result["init_loss"] = vals.get(0)
    result["val_loss"] = result["loss"] = vals.get(steps)
    done = train and train[-1]["step"] == steps and steps in vals
    if rc == 0 and done and math.isfinite(vals[steps]):
        result["status"] = "ok"
    else:
        log = out / "train.log"
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] if log.is_file() else []
        diverged = any(not math.isfinite(r["loss"]) for r in train) or (done and not math.isfinite(vals[steps]))
        result["status"] = "diverged" if diverged or (tail and "diverged" in tail[0].lower()) else "failed"
        result["error"] = f"exit {rc}: {tail[0][:300] if tail else 'no log'}"
    curve = [
        {
            "id": row["id"],
            "budget": row.get("budget"),
            "N": row["N"],
            "step": r["step"],
            "D": r["step"] * tps,
            "flops": per_token * r["step"] * tps,
            "loss": r["loss"],
        }
        for r in train
    ]
    return result, curve


class Runner:
    """Runs rows as subprocesses; stops them all on SIGINT/SIGTERM."""

    def __init__(self, sweep_dir: Path, python: str = sys.executable, threads: int = 0):
        self.sweep_dir = sweep_dir
        self.python = python
        self.threads = threads
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run_row(self, row: dict, record: bool = True) -> dict | None:
        out = Path(row["config"]["train"]["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        job = out / "job.toml"
        tmp = out / f".job.toml.{os.getpid()}"  # every rank of an array task writes it: atomically
        tmp.write_text(toml_text(row["config"]))
        tmp.replace(job)
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        start = time.perf_counter()
        with (out / "train.log").open("a") as log:
            log.write(f"--- meshforge scaling run: row {row['id']} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return None
                proc = subprocess.Popen(
                    [self.python, "-m", "meshforge", "train", "--config", str(job)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                self.children.add(proc)
            rc = proc.wait()
            with self.lock:
                self.children.discard(proc)
        if self.stopping or rc == EXIT_PREEMPTED:
            return None  # interrupted: its checkpoint resumes it next time
        result, curve = collect(row, rc, time.perf_counter() - start)
        if record and is_main_task():
            _append(self.sweep_dir / "results.csv", RESULT_FIELDS, [result])
            _append(self.sweep_dir / "curves.csv", CURVE_FIELDS, curve)
        return result

    def stop(self, *_):
        with self.lock:
            self.stopping = True
            for proc in self.children:
                proc.send_signal(signal.SIGTERM)


def is_main_task() -> bool:
    """Rank 0 of an srun step (or a plain process): the one that records the result."""
    return os.environ.get("SLURM_PROCID", "0").strip() in ("", "0")


def pending_rows(sweep_dir: Path, rows: list[dict]) -> list[tuple[int, dict]]:
    done = {i for i, r in read_results(sweep_dir / "results.csv").items() if r.get("status") == "ok"}
    return [(i, r) for i, r in enumerate(rows) if r["id"] not in done]


def run_local(sweep: str | Path, parallel: int = 1, max_runs: int = 0, log=print) -> list[dict]:
    """Run every pending row, ``parallel`` at a time; returns this invocation's result rows."""
    if parallel < 1:
        raise ScalingError(f"--parallel {parallel}: need at least 1")
    sweep_dir, rows = read_sweep(sweep)
    todo = pending_rows(sweep_dir, rows)
    if max_runs:
        todo = todo[:max_runs]
    log(f"{len(rows) - len(pending_rows(sweep_dir, rows))} of {len(rows)} rows already done; running {len(todo)}")
    runner = Runner(sweep_dir, threads=max(1, (os.cpu_count() or 1) // parallel))
    previous = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    results = []
    try:
        with ThreadPoolExecutor(parallel) as pool:
            for res in pool.map(lambda ir: runner.run_row(ir[1]), todo):
                if res is not None:
                    results.append(res)
                    loss = res.get("loss")
                    log(
                        f"{res['id']}: {res['status']}"
                        + (f", val loss {loss:.4f}" if isinstance(loss, float) else "")
                        + (f" ({res['error']})" if res.get("error") else "")
                    )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if runner.stopping:
        raise KeyboardInterrupt("sweep interrupted; rerun the same command to resume")
    return results


def run_array_task(sweep: str | Path) -> int:
    """One row of a SLURM job array: the row index is SLURM_ARRAY_TASK_ID."""
    sweep_dir, rows = read_sweep(sweep)
    index = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if not index.isdigit() or int(index) >= len(rows):
        raise ScalingError(f"SLURM_ARRAY_TASK_ID={index!r} is not a row of {sweep_dir}/sweep.jsonl ({len(rows)} rows)")
    runner = Runner(sweep_dir)
    signal.signal(signal.SIGTERM, runner.stop)
    res = runner.run_row(rows[int(index)])
    return EXIT_PREEMPTED if res is None else 0


def slurm_args(sweep_dir: Path, indices: list[int], opts: argparse.Namespace) -> argparse.Namespace:
    """``meshforge launch --slurm`` arguments for a job array over ``indices`` (at most --parallel at once)."""
    array = ",".join(str(i) for i in indices) + (f"%{opts.parallel}" if opts.parallel else "")
    return argparse.Namespace(
        nodes=opts.nodes,
        gpus_per_node=opts.gpus_per_node,
        cpu=opts.cpu,
        partition=opts.partition,
        time=opts.time,
        account=opts.account,
        job_name=opts.job_name,
        cpus_per_task=opts.cpus_per_task,
        sbatch_arg=[f"--array={array}", *opts.sbatch_arg],
        script=str(sweep_dir / "sweep.sbatch"),
        log_dir=str(sweep_dir / "slurm-logs"),
        python=sys.executable,
        command=["scaling", "run", str(sweep_dir.resolve()), "--array-task"],
    )


def write_slurm_array(sweep: str | Path, opts: argparse.Namespace) -> tuple[Path, list[int]]:
    """Write ``sweep.sbatch`` (through the launcher's script writer) for the pending rows."""
    from ..launch.launcher import LaunchError, sbatch_script

    sweep_dir, rows = read_sweep(sweep)
    indices = [i for i, _ in pending_rows(sweep_dir, rows)]
    if not indices:
        raise ScalingError(f"every row of {sweep_dir} is done")
    args = slurm_args(sweep_dir, indices, opts)
    try:
        script = sbatch_script(args)
    except LaunchError as e:
        raise ScalingError(str(e)) from None
    (sweep_dir / "slurm-logs").mkdir(exist_ok=True)
    path = Path(args.script)
    path.write_text(script)
    path.chmod(0o755)
    return path, indices
