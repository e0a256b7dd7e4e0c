"""The tables of ``bench_peers.py``: peer / meshforge ratios per shape and mode, the fused-prototype
table, and the fused-projection micro-benchmark."""

from __future__ import annotations

import statistics
import time

import torch
from peer_sides import SHAPES

SIDES = ("meshforge", "hf", "litgpt")


def ratios(rounds: list[dict], peer: str) -> list[float]:
    """peer / meshforge median step time of each round where both ran."""
    return [
        r[peer]["median_s"] / r["meshforge"]["median_s"]
        for r in rounds
        if "median_s" in r.get(peer, {}) and "median_s" in r.get("meshforge", {})
    ]


def fused_projection_bench(shape: str, reps: int = 20) -> dict:
    """Forward + backward of x @ [Wq; Wk; Wv]^T as one matmul vs three (and gate/up), seconds per call."""
    from meshforge.config import load_config

    cfg = load_config("small", [*SHAPES[shape][0], "--train.global_batch_size", str(SHAPES[shape][1])])
    m = cfg.model
    n = cfg.train.global_batch_size * cfg.data.seq_len
    x = torch.randn(n, m.dim, requires_grad=True)
    out = {}
    for name, rows in {
        "qkv": (m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim),
        "gate_up": (m.hidden_dim, m.hidden_dim),
    }.items():
        ws = [torch.randn(r, m.dim, requires_grad=True) for r in rows]
        fused = torch.cat([w.detach() for w in ws]).requires_grad_()

        def separate():
            sum(torch.nn.functional.linear(x, w).sum() for w in ws).backward()

        def one():
            sum(part.sum() for part in torch.nn.functional.linear(x, fused).split(rows, dim=-1)).backward()

        best = {"separate": [], "fused": []}
        for _ in range(reps):
            for label, fn in (("separate", separate), ("fused", one)):
                start = time.perf_counter()
                fn()
                best[label].append(time.perf_counter() - start)
        out[name] = {k: statistics.median(v) for k, v in best.items()}
    return out


def table(results: dict, args, loads: tuple[str, str], skipped: dict[str, str]) -> list[str]:
    lines = [
        f"{args.rounds} rounds, each side in a fresh process per round, order rotated; {args.warmup} warmup "
        f"+ {args.steps} timed steps; fp32, AdamW (meshforge fused, peers {args.peer_adamw}), clip 1.0, {args.threads or 'default'} torch "
        f"thread(s) per process. Ratio = peer step time / meshforge "
        f"step time (> 1: meshforge faster), median and min over rounds. Load average before: {loads[0]}; "
        f"after: {loads[1]}.",
        "",
        "| shape | params | batch x seq | mode | meshforge CPU s/step (wall) | hf | litgpt | hf / meshforge (median, min) | litgpt / meshforge (median, min) |",
        "|---|---:|---|---|---:|---:|---:|---|---|",
    ]
    for (shape, mode), rounds in results.items():
        med = {}
        params = {}
        for side in SIDES:
            ok = [r[side] for r in rounds if "median_s" in r.get(side, {})]
            med[side] = (
                (
                    f"{statistics.median(x['median_s'] for x in ok):.3f} "
                    f"({statistics.median(x.get('wall_median_s', x['median_s']) for x in ok):.3f})"
                )
                if ok
                else (skipped.get(side) and "n/a" or next((r[side]["error"][:60] for r in rounds if side in r), "n/a"))
            )
            if ok:
                params[side] = ok[0]["params"]
        cells = []
        for peer in ("hf", "litgpt"):
            rs = ratios(rounds, peer)
            cells.append(f"{statistics.median(rs):.3f}, {min(rs):.3f}" if rs else "n/a")
        counts = sorted(set(params.values()))
        pcell = (
            f"{counts[0] / 1e6:.2f}M"
            if len(counts) == 1
            else " / ".join(f"{k} {v / 1e6:.3f}M" for k, v in params.items())
        )
        batch = SHAPES[shape][1]
        lines.append(
            f"| {shape} | {pcell} | {batch} x 128 | {mode} | {med['meshforge']} | {med['hf']} | "
            f"{med['litgpt']} | {cells[0]} | {cells[1]} |"
        )
    lines.append("")
    lines += [f"- {side} not run: {why}" for side, why in skipped.items()]
    return lines


def fused_table(results: dict) -> list[str]:
    """``--fused-prototype``: unfused / fused meshforge step time per round, and whether their losses agree."""
    lines = [
        "",
        "meshforge unfused vs the fused-projection prototype (`bench/fused_prototype.py`), same weights; "
        "ratio = unfused / fused step time (> 1: fusing pays), per round in run order:",
        "",
        "| shape | mode | unfused CPU s/step | fused CPU s/step | unfused / fused (median, min, max) | rounds | max loss diff |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for (shape, mode), rounds in results.items():
        both = [r for r in rounds if "median_s" in r.get("fused", {}) and "median_s" in r.get("meshforge", {})]
        if not both:
            lines.append(f"| {shape} | {mode} | n/a | n/a | n/a | | |")
            continue
        rs = [r["meshforge"]["median_s"] / r["fused"]["median_s"] for r in both]
        diff = max(abs(a - b) for r in both for a, b in zip(r["meshforge"]["losses"], r["fused"]["losses"]))
        lines.append(
            f"| {shape} | {mode} | {statistics.median(r['meshforge']['median_s'] for r in both):.4f} | "
            f"{statistics.median(r['fused']['median_s'] for r in both):.4f} | "
            f"{statistics.median(rs):.3f}, {min(rs):.3f}, {max(rs):.3f} | "
            f"{' '.join(f'{x:.3f}' for x in rs)} | {diff:.1e} |"
        )
    return lines
