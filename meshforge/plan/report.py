"""Text and JSON output of ``meshforge plan``."""

from __future__ import annotations

import json
import shlex

from .constraints import describe
from .dry_run import DryRunResult
from .memory import KINDS
from .planner import HEADROOM, Plan, Priced

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:6.2f}"


def table(plan: Plan, top: int, train_args: list[str] | None = None) -> str:
    """The ranked table; ``train_args`` (the plan's own ``--config`` and overrides) start the
    ``meshforge train`` line of the best layout."""
    c, d = plan.cfg, plan.device
    lines = [
        f"{plan.gpus} x {d.name} ({plan.gpus_per_node} per node, {HEADROOM * d.hbm_bytes / GIB:.1f} GiB usable each); "
        f"seq {c.data.seq_len}, global batch {c.train.global_batch_size} x {c.data.seq_len} = "
        f"{c.train.global_batch_size * c.data.seq_len:,} tokens",
        f"{len(plan.fitting)} layouts fit, {len(plan.overflowing)} do not; per-GPU memory in GiB on the fullest rank",
        "",
    ]
    if plan.fixed:
        lines.insert(1, f"layouts with {describe(plan.fixed)} (given); the other dimensions searched")
    head = (
        f"{'#':>3}  {'layout':<60} {'step s':>8} {'MFU':>6} {'bubble':>6} "
        f"{'params':>6} {'grads':>6} {'optim':>6} {'acts':>6} {'comm':>6} {'total':>6}"
    )
    lines.append(head)
    for i, p in enumerate(plan.fitting[:top], 1):
        lines.append(_row(i, p))
    if plan.overflowing:
        lines += ["", "do not fit (leanest first):"]
        for p in plan.overflowing[: min(top, 5)]:
            lines.append(f"     {p.layout.describe():<60} {p.overflow}")
    if not plan.fitting:  # one given layout that does not fit
        return "\n".join(lines)
    best = plan.fitting[0]
    keys = {
        "data.seq_len": c.data.seq_len,
        "model.max_seq_len": c.model.max_seq_len,
        "train.global_batch_size": c.train.global_batch_size,
        **best.layout.overrides(),
    }
    layout_args = [a for k, v in keys.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    train_args = _without(train_args or [], set(keys))  # the layout's own keys replace the ones given
    lines += [
        "",
        f"run the best on {plan.gpus} ranks (one per GPU, under torchrun / srun / mpirun) with:",
        "  meshforge train " + shlex.join([*train_args, *layout_args]),
    ]
    return "\n".join(lines)


def _without(args: list[str], keys: set[str]) -> list[str]:
    """``args`` less the ``--key value`` / ``--key=value`` pairs of ``keys``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("--") and a[2:].split("=", 1)[0] in keys:
            skip = "=" not in a
        else:
            out.append(a)
    return out


def _row(i: int, p: Priced) -> str:
    m, t = p.memory, p.time
    return (
        f"{i:>3}  {p.layout.describe():<60} {t.step_s:8.3f} {100 * t.mfu:5.1f}% {100 * t.bubble_fraction:5.1f}% "
        + " ".join(_gib(m[k]) for k in (*KINDS, "total"))
    )


PARTS = {"gemm": "GEMMs", "attention": "attention", "memory": "memory-bound ops", "optimizer": "optimizer step"}
"""The compute's parts under the op-by-op model (:mod:`.roofline`), as ``--why`` names them."""


def why_text(plan: Plan, p: Priced) -> str:
    """The time terms of one layout, largest first, and what each is made of: compute, the pipeline bubble,
    the exposed communication of each critical-path group, the data-parallel traffic beyond compute."""
    t, d = p.time, plan.device
    lines = [f"why {p.layout.describe()}: step {t.step_s:.4f} s on {plan.gpus} x {d.name}, MFU {100 * t.mfu:.1f}%"]
    for name, secs in sorted(t.terms.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<24} {secs:10.4f} s  {100 * secs / t.step_s:5.1f}%")
        if name == "compute":
            for part, label in PARTS.items():
                if part in t.compute_parts:
                    secs = t.compute_parts[part]
                    lines.append(f"      {label:<20} {secs:10.4f} s  {100 * secs / t.step_s:5.1f}%")
        group = name.removeprefix("exposed ")
        calls = [
            c
            for c in t.comm
            if (c["group"] == group and c["exposed"]) or (name == "exposed data parallel" and not c["exposed"])
        ]
        for c in sorted(calls, key=lambda c: -c["seconds"]):
            lines.append(
                f"      {c['op']:<15} {c['group']:<13} n={c['group_size']:<6} {c['link']:<9} "
                f"{c['count']:>9,.0f} x {c['bytes']:>14,} B = {c['seconds']:.4f} s"
                + ("" if c["exposed"] else " (behind compute)")
            )
    lines.append(f"  {'total':<24} {t.step_s:10.4f} s")
    return "\n".join(lines)


def plan_json(plan: Plan, top: int) -> str:
    return json.dumps(
        {
            "gpus": plan.gpus,
            "gpus_per_node": plan.gpus_per_node,
            "device": plan.device.key,
            "seq_len": plan.cfg.data.seq_len,
            "global_batch_size": plan.cfg.train.global_batch_size,
            "usable_bytes": int(HEADROOM * plan.device.hbm_bytes),
            "fixed": {dim: sorted(vals, key=str) for dim, vals in plan.fixed.items()},
            "layouts": [p.record() for p in plan.fitting[:top]],
            "overflowing": [p.record() for p in plan.overflowing[:top]],
        },
        indent=1,
    )


def dry_run_text(res: DryRunResult, estimate: dict[str, int], layout_text: str) -> str:
    lines = [
        f"dry run of {layout_text} as rank {res.rank} of {res.world_size} (fake process group, meta device)",
        f"{'':<12}{'dry run':>16}{'estimate':>16}",
    ]
    for k in ("params", "grads", "optimizer"):
        mark = "" if res.state[k] == estimate[k] else "   <- differs"
        lines.append(f"{k:<12}{res.state[k]:>16,}{estimate[k]:>16,}{mark}")
    lines.append("collectives of one step (count x bytes per call, group size):")
    for c in res.collectives:
        size = f"{c['bytes']:,} B" if c["bytes"] else "activation-sized"
        lines.append(f"  {c['op']:<26} {c['group']:<14} n={c['group_size']:<6} {c['count']:>7} x {size}")
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def dry_run_json(res: DryRunResult, estimate: dict[str, int], layout_text: str) -> str:
    return json.dumps(
        {
            "layout": layout_text,
            "rank": res.rank,
            "world_size": res.world_size,
            **res.state,
            "estimate": {k: estimate[k] for k in ("params", "grads", "optimizer")},
            "collectives": res.collectives,
            "notes": res.notes,
        },
        indent=1,
    )
