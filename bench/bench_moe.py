"""Forward+backward throughput of the MoE feed-forward against a dense FFN of equal ACTIVE parameters.

For each shape (dim D, E experts of hidden width H, top-k) the dense baseline is a SwiGLU
FeedForward of hidden width k*H: a token passes through the same number of expert weights
(3*D*k*H) either way; the MoE adds the router (D*E), the sort/gather/scatter of tokens and
the per-expert loop. Both run in fp32 on CPU on ``--tokens`` tokens, timed over ``--iters``
iterations after ``--warmup``; the median is reported.

Prints a table; with ``--record`` appends it (machine, versions, command) to bench/RESULTS.md
under ``## MoE``. Run: ``python bench/bench_moe.py --record``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from meshforge.config import ModelConfig
from meshforge.models.layers import FeedForward, init_linear
from meshforge.models.moe import MoE

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

SHAPES = [  # (dim, experts, hidden per expert, top_k)
    (256, 8, 512, 2),  # Mixtral-like, small
    (256, 16, 256, 4),  # finer experts, same active width
    (256, 64, 128, 8),  # fine-grained
]


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds of one forward+backward."""
    times = []
    for i in range(warmup + iters):
        xi = x.detach().requires_grad_(True)
        start = time.perf_counter()
        module(xi).square().mean().backward()
        elapsed = time.perf_counter() - start
        module.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def run(tokens: int, warmup: int, iters: int) -> list[dict]:
    rows = []
    for dim, experts, hidden, top_k in SHAPES:
        torch.manual_seed(0)
        cfg = ModelConfig(dim=dim, n_heads=4, moe_experts=experts, moe_top_k=top_k, moe_ffn_dim=hidden)
        moe = MoE(cfg)
        moe.init_weights(0.02, 0.02)
        dense = FeedForward(dim, top_k * hidden)
        for lin in (dense.w1, dense.w2, dense.w3):
            init_linear(lin, 0.02)
        x = torch.randn(tokens, dim)
        t_moe = time_fwd_bwd(moe, x, warmup, iters)
        t_dense = time_fwd_bwd(dense, x, warmup, iters)
        rows.append(
            {
                "shape": f"D={dim} E={experts} H={hidden} k={top_k}",
                "active": 3 * dim * top_k * hidden + dim * experts,
                "total": sum(p.numel() for p in moe.parameters()),
                "moe_tps": tokens / t_moe,
                "dense_tps": tokens / t_dense,
            }
        )
    return rows


def table(rows: list[dict], tokens: int) -> str:
    lines = [
        f"fp32, {tokens} tokens per forward+backward, dense baseline = SwiGLU FFN of width k*H",
        "",
        "| MoE shape | active params | total params | MoE tokens/s | dense tokens/s | MoE / dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['active'] / 1e6:.2f}M | {r['total'] / 1e6:.2f}M | {r['moe_tps']:,.0f} | "
            f"{r['dense_tps']:,.0f} | {r['moe_tps'] / r['dense_tps']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    rows = run(args.tokens, args.warmup, args.iters)
    text = table(rows, args.tokens)
    print(text)
    if args.record:
        machine = (
            f"machine: {torch.get_num_threads()} threads, {platform.platform()}, {platform.machine()}; "
            f"python {platform.python_version()}, torch {torch.__version__}"
        )
        cmd = "python bench/bench_moe.py " + " ".join(sys.argv[1:])
        block = [f"\n### {date.today().isoformat()} — `{cmd.strip()}`", "", machine, "", text, ""]
        existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if "\n## MoE\n" not in existing:
            block.insert(
                0, "\n## MoE\n\nMoE feed-forward vs a dense FFN of equal active parameters (`bench/bench_moe.py`)."
            )
        RESULTS.write_text(existing.rstrip("\n") + "\n" + "\n".join(block))


if __name__ == "__main__":
    main()
