"""``meshforge scaling plan|run|fit|plot``: argument parsing and printing; the work is in the modules."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from pathlib import Path

from . import ScalingError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 1e15,3e15") from None


def positive_numbers(flag: str, values: list[float] | None) -> list[float]:
    """``values`` of ``flag`` if each is a positive finite number; else one ScalingError line."""
    bad = [v for v in values or [] if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ScalingError(
            f"{flag} {','.join(f'{v:g}' for v in bad)}: expected positive finite numbers, e.g. 1e15,3e15"
        )
    return list(values or [])


def _overrides(pairs: list[str]) -> dict:
    from ..config import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def cmd_plan(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from .estimate import Estimator, format_duration
    from .plan import PlanSpec, write_plan

    sizes = args.sizes.split(",") if args.sizes else []
    n_sizes = int(sizes[0]) if args.kind == "isoflop" and len(sizes) == 1 and sizes[0].isdigit() else 7
    if args.kind == "isoflop" and sizes and not (len(sizes) == 1 and sizes[0].isdigit()):
        raise ScalingError(
            "--sizes for an isoflop sweep is the number of sizes per budget (use --n-min/--n-max for the range)"
        )
    spec = PlanSpec(
        kind=args.kind,
        output=Path(args.output),
        base_config=args.base_config,
        overrides=_overrides(args.set),
        budgets=positive_numbers("--budgets", args.budgets),
        sizes=[] if args.kind == "isoflop" else positive_numbers("--sizes", _floats(args.sizes or "")),
        n_sizes=n_sizes,
        n_min=args.n_min,
        n_max=args.n_max,
        span=args.span,
        centers=positive_numbers("--centers", args.centers),
        tokens=positive_numbers("--tokens", args.tokens),
        lrs=positive_numbers("--lrs", args.lrs),
        variants=args.variants.split(","),
        aspect=args.aspect,
        layers=args.layers,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        warmup_fraction=args.warmup_fraction,
    )
    estimator = Estimator(
        args.gpu,
        args.gpus,
        args.efficiency,
        args.tokens_per_s,
        args.devices,
        None if args.step_overhead_ms is None else args.step_overhead_ms / 1e3,
    )
    estimator.check()  # before anything is written
    estimates = []
    rows, skipped = write_plan(
        spec, overwrite=args.overwrite, check=lambda rows: estimates.extend(estimator.row(r) for r in rows)
    )
    for s in skipped:
        where = f"C={s['budget']:.3g} " if s.get("budget") else ""
        print(f"skipped {where}N~{s['target_N']:.3g}: {s['reason']}")
    for r, est in zip(rows, estimates):
        print(
            f"{r['id']}: N={r['N']:,} (total {r['N_total']:,}) D={r['D']:,} FLOPs={r['flops']:.3g} "
            f"d={r['width']} L={r['layers']} steps={r['steps']:,} ~{format_duration(est.seconds)}"
        )
    print(f"wrote {len(rows)} rows to {spec.output}/sweep.jsonl ({len(skipped)} skipped)")
    total_s, gpu_h = sum(e.seconds for e in estimates), sum(e.gpu_hours for e in estimates)
    print(
        f"estimated: {sum(r['steps'] for r in rows):,} steps, {format_duration(total_s)} one run after another, "
        f"{gpu_h:,.1f} GPU-hours, {estimator.describe()}"
    )
    for note in estimator.notes(estimates):
        print(f"note: {note}")
    return 0


def cmd_run(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from .run import run_array_task, run_local, write_slurm_array

    if args.array_task:
        return run_array_task(args.sweep)
    if args.slurm:
        path, indices = write_slurm_array(args.sweep, args)
        print(f"wrote {path} (array of {len(indices)} rows)")
        if not args.submit:
            print(f"submit with: sbatch {path}")
            return 0
        if shutil.which("sbatch") is None:
            raise ScalingError("sbatch not found; is this a SLURM login node?")
        return subprocess.run(["sbatch", str(path)]).returncode
    try:
        results = run_local(args.sweep, parallel=args.parallel, max_runs=args.max_runs)
    except KeyboardInterrupt as e:
        print(f"meshforge scaling run: {e or 'interrupted'}", flush=True)
        return 130
    bad = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(bad)} ok, {len(bad)} not ok; results in {Path(args.sweep)}/results.csv")
    return 0


def add_scaling_parser(sub) -> None:
    grp = sub.add_parser("scaling", help="scaling-law experiments: plan, run, fit, plot a ladder")
    s = grp.add_subparsers(dest="scaling_command", required=True)

    p = s.add_parser("plan", help="write a sweep (one resolved config per run) into --output")
    p.add_argument("--kind", choices=("isoflop", "tokens", "lr"), default="isoflop")
    p.add_argument("--budgets", type=_floats, help="isoflop: FLOP budgets, e.g. 1e15,3e15,1e16")
    p.add_argument("--sizes", default="", help="isoflop: sizes per budget (default 7); tokens/lr: N values")
    p.add_argument("--n-min", type=float, default=0.0, help="isoflop: smallest N of a fixed grid (with --n-max)")
    p.add_argument("--n-max", type=float, default=0.0, help="isoflop: largest N of a fixed grid")
    p.add_argument(
        "--span",
        type=float,
        default=4.0,
        help="isoflop without --n-min/max: N from N*/span to N*·span, N* = sqrt(C/120) or --centers",
    )
    p.add_argument(
        "--centers",
        type=_floats,
        help="isoflop: the expected optimum N* of each budget (one per budget, "
        "in order): each budget's grid is centred there",
    )
    p.add_argument("--tokens", type=_floats, help="tokens/lr: training tokens per run")
    p.add_argument("--lrs", type=_floats, help="lr: peak learning rates")
    p.add_argument(
        "--variants",
        default="plain,qk_norm+z_loss",
        help="lr: comma-separated of plain, qk_norm, z_loss, qk_norm+z_loss",
    )
    p.add_argument("--base-config", default=None, help="TOML preset the runs start from (default: built-in small)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the base config")
    p.add_argument("--aspect", type=float, default=32.0, help="target width/depth ratio of the shape rule")
    p.add_argument("--layers", type=int, default=0, help="fix every size's depth (width alone varies; muP sweeps)")
    p.add_argument("--min-steps", type=int, default=20, help="skip sizes the budget gives fewer steps")
    p.add_argument("--max-steps", type=int, default=0, help="skip sizes the budget gives more steps (0: no limit)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--output", required=True, help="the sweep dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep.jsonl there")
    from ..plan.devices import load_devices

    p.add_argument(
        "--gpu",
        default="h100-80gb",
        help="device the time estimate is for (`meshforge plan`'s device "
        f"table: {', '.join(load_devices())}; more with --devices)",
    )
    p.add_argument("--gpus", type=int, default=1, help="devices per run, for the estimate (default 1)")
    p.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="a flat fraction of peak the matmuls reach (default: as `meshforge plan`, compute priced op by op "
        "from the device's curves in plan/efficiency.toml and its memory bandwidth)",
    )
    p.add_argument(
        "--tokens-per-s",
        type=float,
        default=0.0,
        help="a measured training rate per run: estimate D / rate instead of the time model",
    )
    p.add_argument(
        "--step-overhead-ms",
        type=float,
        default=None,
        help="per-step software cost added to the time model (default: 32 on cpu, measured; 0 elsewhere)",
    )
    p.add_argument("--devices", default=None, help="a TOML file of extra or changed devices (as `meshforge plan`)")
    p.set_defaults(func=cmd_plan)

    p = s.add_parser("run", help="run every pending row of a sweep (resumes after an interruption)")
    p.add_argument("sweep", help="the sweep dir")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (SLURM: array tasks at a time)")
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many rows (0: all)")
    p.add_argument("--array-task", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slurm", action="store_true", help="write sweep.sbatch: a job array, one task per row")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit it")
    for flag, kw in (
        ("--nodes", dict(type=int, default=1)),
        ("--gpus-per-node", dict(type=int, default=1)),
        ("--cpu", dict(action="store_true")),
        ("--partition", {}),
        ("--time", {}),
        ("--account", {}),
        ("--job-name", dict(default="meshforge-sweep")),
        ("--cpus-per-task", dict(type=int)),
        ("--sbatch-arg", dict(action="append", default=[])),
    ):
        p.add_argument(flag, **kw)
    p.set_defaults(func=cmd_run)

    from .commands_fit import add_fit_parsers

    add_fit_parsers(s)
