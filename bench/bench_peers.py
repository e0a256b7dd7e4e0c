"""meshforge against its peers on the same work: a bare Hugging Face loop and litgpt, on CPU.

Every side trains the same Llama-style decoder (same widths, heads, SwiGLU width, RoPE, RMSNorm,
tied embeddings, vocabulary, sequence length, batch; parameter counts checked equal), fp32,
AdamW with gradient clipping at 1.0, one host read of the loss per step (meshforge's AdamW is torch's
fused kernel on CPU and GPU; the peers' is the multi-tensor (``foreach``) one, what a bare loop on a CPU
gets by asking for speed -- torch's default there is the slower per-tensor loop; ``--peer-adamw fused``
gives the peers the fused kernel too, for a like-for-like comparison):

- ``meshforge``: ``Trainer(cfg)._setup()`` then ``Trainer.train_step()`` (its loader included,
  z-loss 0 as the peers have none); compiled: ``--parallel.compile on`` (each block, the default scope);
- ``hf``: ``bench/hf_peer.py``'s bare loop around transformers' ``LlamaForCausalLM`` (random tokens
  made in the loop: no loader; ``labels=`` shifts inside the model, so it runs seq + 1 positions
  for the same seq predicted tokens, 0.8% more at seq 128); compiled: each decoder layer, as
  ``hf_peer.py`` does;
- ``litgpt`` (optional, kept out of the venv: litgpt 0.5.13 pins ``huggingface_hub<1.4``, which
  breaks the installed transformers 5; so it goes into its own directory, put on PYTHONPATH for
  its processes only (``--litgpt-path``), with the venv's huggingface_hub and torch 2.13:
  ``pip install --target .peers/litgpt --no-deps litgpt==0.5.13 lightning==2.6.6
  lightning-utilities==0.15.3 pytorch-lightning==2.6.6 torchmetrics==1.9.0 jsonargparse==4.41.0
  typer-slim==0.24.0 docstring_parser typeshed_client httpx==0.29.0 httpcore==1.0.9``; it runs on
  the CPU): ``litgpt.model.GPT`` with litgpt's own loss (``chunked_cross_entropy``, as
  ``litgpt pretrain`` calls it); compiled: the whole model, as ``litgpt pretrain`` does.

Each (shape, mode, side) runs in a fresh process; a round runs every side once per shape and
mode, in a rotated order, and rounds repeat, so drift on a shared machine hits all sides alike.
Per round: the median step time of each side over ``--steps`` timed steps after ``--warmup``,
in this process's CPU seconds (one torch thread per process by default: on a shared, loaded
2-core box wall time mostly measures the neighbours; the wall medians are reported too).
Reported per shape and mode: the median and the min over rounds of peer time / meshforge time
(> 1: meshforge is faster), next to the load averages before and after.

``--fused-projections`` adds a micro-benchmark: forward + backward of separate q/k/v (and
gate/up) matmuls against one fused matmul of the concatenated weights, at each shape's
widths, to size what fusing the projections could gain (not done in meshforge yet).
``--fused-prototype`` adds a side ``fused`` to the rounds: meshforge with fused q/k/v and gate/up weights
(``bench/fused_prototype.py``, the same initial weights), and a table of unfused / fused step time per
round with the two sides' largest loss difference (the whole step, not the matmuls alone);
``--sides`` picks the peers (``--sides`` alone: meshforge only, e.g. with ``--fused-prototype``).
``bench/profile_peers.py`` compares meshforge's step with the HF loop's or litgpt's (``--peer``) op by op, and
(``--host``) where each side's host time outside the ops goes. The sides' steps are in ``peer_sides.py``,
the tables in ``peer_report.py``.

Run: ``python bench/bench_peers.py --record`` (~30 min on 2 busy cores);
``--shapes 2m --rounds 1 --steps 3`` for a quick look. On a GPU the prepared GPU check runs the
same comparison (``bench/gpu_check/gpu_check.sh``, case ``peers``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "gpu_check")]
from benchlib import REPO, loadavg, record  # noqa: E402
from peer_report import SIDES, fused_projection_bench, fused_table, table  # noqa: E402
from peer_sides import SHAPES, job_config, run_hf, run_litgpt, run_meshforge  # noqa: E402, F401

SECTION = "## Peers: meshforge vs a bare Hugging Face loop and litgpt"
MODES = ("eager", "compiled")
LITGPT_PATH = REPO / ".peers" / "litgpt"


def worker(
    side: str, shape: str, mode: str, warmup: int, steps: int, threads: int, scope: str, adamw: str = "foreach"
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(shape, mode, tmp, warmup + steps, scope=scope)
        torch.manual_seed(0)
        if side == "meshforge":
            return run_meshforge(cfg, warmup, steps)
        if side == "fused":  # --fused-prototype: meshforge with fused q/k/v and gate/up weights
            import fused_prototype

            fused_prototype.install()
            return run_meshforge(cfg, warmup, steps)
        if side == "hf":
            return run_hf(cfg, warmup, steps, torch.device("cpu"), adamw=adamw)
        return run_litgpt(cfg, warmup, steps, adamw=adamw)


def litgpt_available(path: Path) -> str | None:
    """None if litgpt imports from ``path`` (or the environment), else why not."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH", "")]))}
    p = subprocess.run(
        [sys.executable, "-c", "import litgpt.model, litgpt.utils"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["import failed"])[-1]


def spawn(side: str, shape: str, mode: str, args) -> dict:
    env = dict(os.environ)
    if side == "litgpt":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.litgpt_path), env.get("PYTHONPATH", "")]))
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            shape,
            mode,
            f.name,
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--compile-scope",
            args.compile_scope,
            "--peer-adamw",
            args.peer_adamw,
        ]
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout:.0f}s"}
        if p.returncode == 0:
            return json.loads(Path(f.name).read_text())
        err = (p.stderr or "").strip().splitlines()
        sys.stderr.write(f"--- {side} {shape} {mode} failed ---\n" + "\n".join(err[-20:]) + "\n")
        return {"error": err[-1] if err else f"exit {p.returncode}"}


def peers_case(ctx) -> dict:
    """The GPU check's ``peers`` case: the same comparison in one process on the GPU (bf16 autocast on
    every side), shape 28m at batch 32 x 128, eager and compiled; litgpt where it imports (carry it
    with ``--litgpt-path``'s directory on PYTHONPATH). ``--dry``: tiny shapes on the CPU, eager."""
    import importlib.util
    import math

    from gpu_check_lib import check

    dev = ctx.device
    warmup, steps = (1, 2) if ctx.dry else (3, 8)
    modes = ("eager",) if ctx.dry else MODES
    sides = ["meshforge", "hf"] + (["litgpt"] if importlib.util.find_spec("litgpt") else [])
    figures, checks = {}, []
    for mode in modes:
        with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
            cfg = job_config("28m", mode, tmp, warmup + steps, dry=ctx.dry, device=dev.type, batch=32)
            got = {
                "meshforge": lambda: run_meshforge(cfg, warmup, steps, dev),
                "hf": lambda: run_hf(cfg, warmup, steps, dev, bf16=dev.type == "cuda"),
                "litgpt": lambda: run_litgpt(cfg, warmup, steps, dev, bf16=dev.type == "cuda"),
            }
            runs = {side: got[side]() for side in sides}
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        for side, r in runs.items():
            figures[f"{mode}_{side}_s"] = r["median_s"]
            if side != "meshforge":
                figures[f"{mode}_{side}_ratio"] = r["median_s"] / runs["meshforge"]["median_s"]
                checks.append(
                    check(
                        f"{mode}: parameter count, {side} minus meshforge",
                        abs(r["params"] - runs["meshforge"]["params"]),
                        0,
                    )
                )
        checks.append(
            check(f"{mode}: non-finite step times", sum(not math.isfinite(r["median_s"]) for r in runs.values()), 0)
        )
        if mode == "eager":
            figures["tokens_per_step"] = tokens
            figures["tokens_per_s"] = tokens / runs["meshforge"]["median_s"]
    note = ("--dry: tiny shapes, CPU, eager" if ctx.dry else "28m, batch 32 x 128, bf16 autocast") + (
        "" if "litgpt" in sides else "; litgpt not importable here: hf only"
    )
    return {"figures": figures, "checks": checks, "note": note}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of every side (0: torch's default; 1 keeps a shared, loaded box sane)",
    )
    ap.add_argument(
        "--compile-scope",
        choices=("model", "blocks"),
        default="model",
        help="meshforge's parallel.compile_scope in the compiled mode",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per process")
    ap.add_argument(
        "--litgpt-path",
        type=Path,
        default=LITGPT_PATH,
        help="a directory holding litgpt (pip install --target DIR litgpt ...), put before PYTHONPATH",
    )
    ap.add_argument(
        "--fused-projections", action="store_true", help="add the fused vs separate projection micro-benchmark"
    )
    ap.add_argument(
        "--fused-prototype",
        action="store_true",
        help="add a side: meshforge with fused q/k/v and gate/up projections (bench/fused_prototype.py)",
    )
    ap.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES), help="which peers run")
    ap.add_argument(
        "--peer-adamw",
        choices=("foreach", "fused"),
        default="foreach",
        help="the peers' AdamW kernel (meshforge's is fused)",
    )
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, shape, mode, path = args.worker
        Path(path).write_text(
            json.dumps(
                worker(side, shape, mode, args.warmup, args.steps, args.threads, args.compile_scope, args.peer_adamw)
            )
        )
        return 0
    sides = [s for s in SIDES if s in args.sides or s == "meshforge"] + (["fused"] if args.fused_prototype else [])
    skipped = {}
    why = litgpt_available(args.litgpt_path) if "litgpt" in sides else None
    if why:
        sides.remove("litgpt")
        skipped["litgpt"] = f"it does not import ({why})"
    load_before = loadavg()
    results: dict = {(s, m): [] for s in args.shapes for m in args.modes}
    for r in range(args.rounds):
        for (shape, mode), rounds in results.items():
            this = {}
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                this[side] = spawn(side, shape, mode, args)
                print(json.dumps({"round": r, "shape": shape, "mode": mode, "side": side, **this[side]}), flush=True)
            rounds.append(this)
    lines = table(results, args, (load_before, loadavg()), skipped)
    if args.fused_prototype:
        lines += fused_table(results)
    if args.fused_projections:
        lines += [
            "",
            "Fused vs separate projections, forward + backward of the matmuls alone (median s per call):",
            "",
            "| shape | tokens | qkv separate | qkv fused | separate / fused | gate+up separate | gate+up fused | separate / fused |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        if args.threads:
            torch.set_num_threads(args.threads)
        for shape in args.shapes:
            f = fused_projection_bench(shape)
            q, g = f["qkv"], f["gate_up"]
            lines.append(
                f"| {shape} | {SHAPES[shape][1] * 128} | {q['separate']:.4f} | {q['fused']:.4f} | "
                f"{q['separate'] / q['fused']:.3f} | {g['separate']:.4f} | {g['fused']:.4f} | "
                f"{g['separate'] / g['fused']:.3f} |"
            )
        lines.append("")
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
