"""Training throughput (tokens/s) and MFU of presets, through meshforge's own Trainer.

Each case builds ``Trainer(load_config(preset, overrides))`` in a fresh subprocess (so one
case's memory, compile caches or OOM cannot touch the next), runs ``--warmup`` steps (the
per-block ``torch.compile`` happens there), then times ``--steps`` calls of
``Trainer.train_step()`` (one optimizer step each, its loss read back, so the device is
synchronized). tokens/s counts every token of the global batch (decoder: ``seq_len``;
encoder-decoder: encoder + decoder length); MFU is the Trainer's own
(``flops_per_token x tokens / s / peak``, dense bf16 peak of the device), as
``meshforge train`` reports it.

Run on a GPU machine: ``python bench/bench_throughput.py --record``; one case:
``--only llama-1b``. On CPU ``--cases small`` is a quick smoke run.
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

SECTION = "## Training throughput and MFU"

_OFF = QUIET_TRAIN

# name -> (preset, overrides, note); micro-batch fallbacks are tried in order on out-of-memory.
CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "small": (
        "small",
        ("--train.global_batch_size", "16", "--train.micro_batch_size", "16"),
        "the CPU preset (2.2M params), as a smoke case",
    ),
    "llama-1b": (
        "llama-1b",
        (
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "4",
            "--parallel.activation_checkpointing",
            "selective",
            "--parallel.compile",
            "on",
        ),
        "1.14B params, seq 4096, bf16 autocast, per-block compile, selective AC, 2 microbatches of 4",
    ),
    "llama-1b-noac": (
        "llama-1b",
        (
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "2",
            "--parallel.activation_checkpointing",
            "none",
            "--parallel.compile",
            "on",
        ),
        "as llama-1b without activation checkpointing, 4 microbatches of 2",
    ),
    "mixtral-2l": (
        "mixtral-8x",
        (
            "--model.n_layers",
            "2",
            "--parallel.ep",
            "1",
            "--train.global_batch_size",
            "4",
            "--train.micro_batch_size",
            "2",
            "--parallel.activation_checkpointing",
            "selective",
            "--parallel.compile",
            "on",
        ),
        "the mixtral-8x preset's layer shape (dim 4096, 8 experts x 14336, top-2) cut to 2 layers to fit "
        "one GPU; MFU on active parameters",
    ),
    "moe-64e": (
        "moe-64e",
        (
            "--model.n_layers",
            "4",
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "4",
            "--parallel.ep",
            "1",
            "--parallel.activation_checkpointing",
            "selective",
            "--parallel.compile",
            "on",
        ),
        "the moe-64e preset (64 experts x 1408, top-6, 2 shared, first layer dense) cut to 4 layers to fit one GPU; MFU on active parameters",
    ),
    "t5-base": (
        "t5-base",
        ("--train.global_batch_size", "64", "--train.micro_batch_size", "64", "--parallel.compile", "on"),
        "T5 v1.1 base, encoder 512 + decoder 114 tokens, span corruption, bf16 autocast",
    ),
}
DEFAULT_CASES = ["llama-1b", "llama-1b-noac", "mixtral-2l", "moe-64e", "t5-base"]


def run_case(name: str, warmup: int, steps: int, extra: list[str]) -> dict:
    """In this process: build the Trainer for ``name`` and time its steps."""
    import torch

    from meshforge.config import load_config
    from meshforge.pretrain.trainer import Trainer

    preset, overrides, note = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            preset, [*overrides, *_OFF, "--train.steps", str(warmup + steps), "--train.output_dir", tmp, *extra]
        )
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer._setup()
        setup_s = time.perf_counter() - t0
        tokens = cfg.train.global_batch_size * trainer.data.objective.tokens_per_sample()
        times, losses = [], []
        t0 = time.perf_counter()
        for i in range(warmup + steps):
            start = time.perf_counter()
            rec = trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(rec["loss"])
        warm_s = time.perf_counter() - t0 - sum(times)
        med = statistics.median(times)
        out = {
            "case": name,
            "preset": preset,
            "note": note,
            "params": trainer.n_params,
            "tokens_per_step": tokens,
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "tokens_per_s": tokens / med,
            "setup_s": setup_s,
            "warmup_s": warm_s,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "device": str(trainer.device),
            "micro_batch": cfg.train.micro_batch_size,
        }
        if trainer.peak:
            out["mfu"] = trainer.flops_per_token * tokens / med / trainer.peak
            out["tflops"] = trainer.flops_per_token * tokens / med / 1e12
        if trainer.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def spawn(name: str, args, extra: list[str]) -> dict:
    """Run one case in a subprocess; on out-of-memory retry with half the micro batch."""
    mb = None
    for _attempt in range(3):
        more = [*extra, *(["--train.micro_batch_size", str(mb)] if mb else [])]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                name,
                "--json",
                f.name,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--",
                *more,
            ]
            try:
                p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return {"case": name, "error": f"timed out after {args.timeout:.0f}s"}
            if p.returncode == 0:
                return json.loads(Path(f.name).read_text())
        err = (p.stderr or "").strip().splitlines()
        sys.stderr.write(f"--- {name} failed ---\n" + "\n".join(err[-25:]) + "\n")
        if "out of memory" in (p.stderr or "").lower():
            cur = mb or int(dict(zip(CASES[name][1][::2], CASES[name][1][1::2]))["--train.micro_batch_size"])
            if cur > 1:
                mb = cur // 2
                continue
        return {"case": name, "error": err[-1] if err else f"exit {p.returncode}"}
    return {"case": name, "error": "out of memory at micro batch 1"}


def table(rows: list[dict], warmup: int, steps: int) -> list[str]:
    lines = [
        f"{steps} timed `Trainer.train_step()` calls after {warmup} warm-up steps (compile included there); "
        "median step time.",
        "",
        "| case | params | micro batch | tokens/step | median s/step | tokens/s | TFLOP/s | MFU | peak GPU mem | "
        "loss first → last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error'][:160]} |||||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        tfl = f"{r['tflops']:.0f}" if "tflops" in r else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else "n/a"
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:,.0f}M | {r['micro_batch']} | {r['tokens_per_step']:,} | "
            f"{r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | {tfl} | {mfu} | {mem} | "
            f"{r['loss_first']:.2f} → {r['loss_last']:.2f} |"
        )
    lines.append("")
    lines += [f"- {r['case']}: {r.get('note', '')}" for r in rows if "note" in r]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=sorted(CASES))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=420, help="seconds per case")
    ap.add_argument("--record", action="store_true", help="append the table to the results file")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file for --record")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="config overrides for every case, after --")
    args = ap.parse_args()
    if args.case:  # the subprocess of one case
        Path(args.json).write_text(json.dumps(run_case(args.case, args.warmup, args.steps, args.extra)))
        return 0
    rows = []
    for name in args.cases:
        rows.append(spawn(name, args, args.extra))
        print(json.dumps(rows[-1]), flush=True)
    lines = table(rows, args.warmup, args.steps)
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines, args.results)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
