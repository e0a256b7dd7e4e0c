"""Arguments and entry of ``meshforge plan``."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML preset: a path or a name in configs/ (e.g. llama-1b)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the cluster (the world size)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    from .devices import load_devices

    p.add_argument(
        "--gpu", default="h100-80gb", help=f"device from the table ({', '.join(load_devices())}; more with --devices)"
    )
    p.add_argument("--devices", default=None, help="a TOML file of extra or changed devices (same keys)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the config's data.seq_len)")
    p.add_argument(
        "--global-batch-tokens",
        default=None,
        help="tokens per optimizer step, e.g. 4M (= 4*2^20); default: the config's global batch",
    )
    p.add_argument("--top", type=int, default=10, help="layouts to list")
    p.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="flat fraction of peak a step's compute reaches (default: priced op by op -- GEMMs and attention "
        "at the device's curves in meshforge/plan/efficiency.toml, memory-bound ops at its HBM bandwidth; "
        "0.5 on a device without them)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="price the one layout the config and its --parallel.* / --train.* overrides give (keys not given at "
        "their config values), as `meshforge train` would run it; without it those overrides only fix their "
        "dimensions of the search",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model on the meta device and apply the real parallelize for the config's layout "
        "(its parallel.* keys) at the full world size in this process (fake process group)",
    )
    p.add_argument("--rank", type=int, default=0, help="the rank a dry run plays")
    p.add_argument(
        "--why",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="N",
        help="list the time terms (compute, bubble, exposed communication by group) of the N-th "
        "layout of the table (default: the first; with --exact: the given one)",
    )


def run_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from .constraints import constraints_of
    from .devices import get_device
    from .planner import check_cluster, layout_keys_given, layout_of_config, plan_config, plan_job, plan_layout
    from .report import dry_run_json, dry_run_text, plan_json, table, why_text

    if args.top <= 0:
        raise ConfigError(f"--top must be positive, got {args.top}")
    efficiency = args.efficiency  # None: op by op (roofline.py) where the device allows, else a flat default
    if efficiency is not None and not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {efficiency}")
    device = get_device(args.gpu, args.devices)
    check_cluster(args.gpus, args.gpus_per_node)
    cfg = plan_config(args.config, rest, args.seq_len, args.global_batch_tokens)
    if args.dry_run:
        from .dry_run import dry_run
        from .state import state_bytes

        layout = layout_of_config(cfg, args.gpus)
        res = dry_run(cfg, layout, args.rank)
        est = state_bytes(cfg, layout, args.rank)
        emit((dry_run_json if args.json else dry_run_text)(res, est, layout.describe()))
        return 0
    if args.exact:  # one layout given: price exactly that one
        plan = plan_layout(cfg, args.gpus, args.gpus_per_node, device, efficiency)
    else:  # the layout keys given fix their dimensions; the rest is searched
        fixed = constraints_of(cfg, layout_keys_given(rest))
        plan = plan_job(cfg, args.gpus, args.gpus_per_node, device, efficiency, fixed=fixed)
    train_args = (["--config", args.config] if args.config else []) + list(rest)
    if args.why is not None:
        listed = plan.fitting or plan.overflowing
        if not 1 <= args.why <= len(listed):
            raise ConfigError(f"--why {args.why}: the plan lists layouts 1 to {len(listed)}")
        emit(why_text(plan, listed[args.why - 1]))
        return 0
    emit(plan_json(plan, args.top) if args.json else table(plan, args.top, train_args))
    return 0


def emit(text: str) -> None:
    """Print to stdout; a reader that went away (``meshforge plan ... | head``) ends the output quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # point stdout at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
