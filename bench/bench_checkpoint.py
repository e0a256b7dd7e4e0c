"""How long a checkpoint blocks training: synchronous vs asynchronous saving.

For each case, one ``Trainer`` (meshforge's own, in this process) is built and warmed up;
then it alternates synchronous and asynchronous saves of its real state (model, AdamW
moments, scheduler, loader, RNG) through ``Trainer._checkpoint()``, the call the training
loop makes:

- blocked s: how long the save held the training thread in all, as the trainer logs it
  (``checkpoint_blocked_s``, from ``Checkpointer.completed()``): sync, the whole write and its
  finalisation; async, the save call (planning, starting the staging thread), the wait for
  staging into CPU memory (pinned buffers on GPU) before the next optimizer step, every poll
  and the final wait spent on it (finalisation -- meta.json, fsync, rename, pruning the
  previous checkpoint -- runs on the finalizer thread, so it counts only where the loop had to
  wait for it); "async / sync" is the ratio of the two medians;
- visible after s: from the call until the checkpoint directory was complete and renamed
  (async: training steps run meanwhile; the loop polls after each step);
- step during write: the median step time while an async write was in flight, against the
  median step time with none (the cost of sharing the machine with the writer thread).

Run: ``python bench/bench_checkpoint.py --record`` (the small preset on CPU; ``--cases small
llama-0.1b-cpu`` adds a ~100M-parameter model, 1.2 GB of state);
on a GPU machine ``--cases small llama-1b``; ``--cases llama-1b-cpu`` needs ~40 GB of RAM,
``llama-0.5b-cpu`` (the same shapes, 6 layers) ~16 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import QUIET_TRAIN, REPO, RESULTS, record  # noqa: E402

SECTION = "## Checkpoint saving: synchronous vs asynchronous"

_OFF = (*QUIET_TRAIN, "--checkpoint.keep_last", "1")

CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "small": ("small", (), "small preset (2.2M params), batch 16 x 128"),
    "llama-1b": (
        "llama-1b",
        ("--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--parallel.compile", "off"),
        "1.14B params, fp32 weights + AdamW moments (13.7 GB of state), seq 4096, bf16 autocast",
    ),
    "llama-1b-cpu": (
        "llama-1b",
        (
            "--train.device",
            "cpu",
            "--data.seq_len",
            "128",
            "--train.global_batch_size",
            "1",
            "--train.micro_batch_size",
            "1",
        ),
        "the same 1.14B model on the CPU (fp32), batch 1 x 128",
    ),
    "llama-0.1b-cpu": (
        "llama-1b",
        (
            "--model.dim",
            "768",
            "--model.n_layers",
            "12",
            "--model.n_heads",
            "12",
            "--model.n_kv_heads",
            "4",
            "--model.ffn_dim",
            "2048",
            "--model.tie_embeddings",
            "true",
            "--train.device",
            "cpu",
            "--data.seq_len",
            "128",
            "--train.global_batch_size",
            "1",
            "--train.micro_batch_size",
            "1",
        ),
        "llama-1b's shapes cut to dim 768, 12 layers, 12 heads (4 KV), FFN 2048, tied (0.10B params) "
        "on the CPU (fp32), batch 1 x 128",
    ),
    "llama-0.5b-cpu": (
        "llama-1b",
        (
            "--model.n_layers",
            "6",
            "--train.device",
            "cpu",
            "--data.seq_len",
            "128",
            "--train.global_batch_size",
            "1",
            "--train.micro_batch_size",
            "1",
        ),
        "llama-1b with 6 of its 16 layers (0.51B params) on the CPU (fp32), batch 1 x 128",
    ),
}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_case(name: str, reps: int, extra: list[str]) -> dict:
    from meshforge.config import load_config
    from meshforge.pretrain.checkpoint import list_checkpoints
    from meshforge.pretrain.trainer import Trainer

    preset, overrides, note = CASES[name]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the repo's disk, not a tmpfs
        cfg = load_config(preset, [*overrides, *_OFF, "--train.steps", "100000", "--train.output_dir", tmp, *extra])
        trainer = Trainer(cfg)
        trainer._setup()

        def timed_step() -> float:
            start = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            return time.perf_counter() - start

        for _ in range(3):
            timed_step()
        idle = [timed_step() for _ in range(3)]
        rows = {"sync": [], "async": []}
        busy = []
        for _ in range(reps):
            for mode in ("sync", "async"):
                trainer.checkpointer.async_save = mode == "async"
                start = time.perf_counter()
                trainer._checkpoint()
                n = 0
                while not trainer.checkpointer.poll() and n < 200:
                    busy.append(timed_step())
                    n += 1
                trainer.checkpointer.wait()
                visible = time.perf_counter() - start
                ((_, blocked),) = trainer.checkpointer.completed()  # staging + polls + wait: what the trainer logs
                rows[mode].append({"blocked_s": blocked, "visible_s": visible, "steps_during": n})
                idle.append(timed_step())
        trainer.checkpointer.close()
        size = _dir_bytes(list_checkpoints(trainer.checkpointer.root)[-1])
    return {
        "case": name,
        "note": note,
        "params": trainer.n_params,
        "device": str(trainer.device),
        "bytes": size,
        "idle_step_s": statistics.median(idle),
        "busy_step_s": statistics.median(busy) if busy else None,
        "rows": rows,
    }


def spawn(name: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--case", name, "--json", f.name, "--reps", str(args.reps), "--", *args.extra]
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"case": name, "error": f"timed out after {args.timeout:.0f}s"}
        if p.returncode == 0:
            return json.loads(Path(f.name).read_text())
        err = (p.stderr or "").strip().splitlines()
        sys.stderr.write(f"--- {name} failed ---\n" + "\n".join(err[-25:]) + "\n")
        return {"case": name, "error": err[-1] if err else f"exit {p.returncode}"}


def table(results: list[dict], reps: int) -> list[str]:
    lines = [
        f"{reps} saves per mode, alternating; medians. Checkpoints written to the local disk under the repo.",
        "",
        "| case | device | state | mode | blocked s | async / sync | visible after s | steps during write | step s (idle → during write) |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error'][:160]} ||||||||")
            continue
        sync_blocked = statistics.median(x["blocked_s"] for x in r["rows"]["sync"])
        for mode in ("sync", "async"):
            rows = r["rows"][mode]
            med = {k: statistics.median(x[k] for x in rows) for k in ("blocked_s", "visible_s", "steps_during")}
            ratio = f"{med['blocked_s'] / sync_blocked:.3f}" if mode == "async" else ""
            steps = (
                f"{r['idle_step_s']:.3f} → {r['busy_step_s']:.3f}"
                if mode == "async" and r["busy_step_s"]
                else f"{r['idle_step_s']:.3f}"
            )
            lines.append(
                f"| {r['case']} | {r['device']} | {r['bytes'] / 1e9:.2f} GB | {mode} | {med['blocked_s']:.3f} | {ratio} | "
                f"{med['visible_s']:.3f} | {med['steps_during']:.0f} | {steps} |"
            )
    lines.append("")
    lines += [f"- {r['case']}: {r['note']}" for r in results if "note" in r]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["small"], choices=sorted(CASES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="config overrides for every case, after --")
    args = ap.parse_args()
    if args.case:
        Path(args.json).write_text(json.dumps(run_case(args.case, args.reps, args.extra)))
        return 0
    results = []
    for name in args.cases:
        results.append(spawn(name, args))
        print(json.dumps(results[-1]), flush=True)
    lines = table(results, args.reps)
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines, args.results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
