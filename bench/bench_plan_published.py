"""The planner against published large runs: does it predict their throughput and rank their layout?

Published figures (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", arXiv 2104.04473): GPT models, vocabulary 51,200, sequence 2,048,
A100-80GB (8 per node), full activation recomputation, data parallel replicas (no ZeRO). Table 1
rows (parameters, heads, hidden, layers, TP, PP, GPUs, batch, achieved teraFLOP/s per GPU) and
Table 2's PTD row for the 174.6B GPT-3 (model-parallel size 96 = TP 8 x PP 12, microbatch 1).
Their teraFLOP/s count the recomputed forward: F = 96 B s l h^2 (1 + s/6h + V/16lh) per iteration
(eq. 3), so the published tokens/s is ``TFLOP/s x GPUs / (F / B s)``; the model FLOPs (no
recompute) are ``B s (72 l h^2 + 12 l s h + 6 h V)``.

For each run: (1) the planner prices the published layout exactly (``plan_layout``: TP, PP, the
rest replicas, microbatch 1, full recomputation, 1F1B) -- its predicted tokens/s against the
published one; (2) with ``--search``, where the published degrees (TP, PP, DP, no CP) rank, twice:
within the family the published system could run (:data:`FAMILY`: the search constrained, as
``meshforge plan --parallel.activation_checkpointing full ...`` constrains it, to full recomputation,
plain data parallelism -- replicas, gradients all-reduced, no ZeRO, no context parallelism -- and
Megatron-LM 2021's schedules, 1F1B and interleaved 1F1B; TP, PP, microbatch and virtual stages
searched) and among every layout (unconstrained; skipped with ``--family-only``). Each rank is
given two ways: among layouts (each row of the ranked list: degrees, data-parallel mode, schedule,
virtual stages, microbatch, recomputation) and among degree sets (TP x PP x CP x DP, each counted
once at its best row). ``--beaters N`` prints the family's first N layouts with their time terms
(``meshforge plan --why``). The GPT feed-forward (two h x 4h matrices) is written as a SwiGLU of
width 8h/3 (the same FLOPs and parameters).

Run: ``python bench/bench_plan_published.py [--search [--family-only] [--beaters N]] [--only NAME] [--record]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import loadavg, record  # noqa: E402

SECTION = "## Planner vs published runs"
# name, params (B), heads, hidden, layers, TP, PP, GPUs, batch, published TFLOP/s per GPU, source
RUNS = [
    ("GPT 18.4B", 18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, "Table 1"),
    ("GPT 39.1B", 39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, "Table 1"),
    ("GPT 145.6B", 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, "Table 1"),
    ("GPT-3 174.6B", 174.6, 96, 12288, 96, 8, 12, 384, 1536, 153, "Table 2 (PTD, 384 GPUs)"),
    ("GPT 1T", 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, "Table 1"),
]
SEQ, VOCAB = 2048, 51200
FAMILY = {
    "ac": frozenset({"full"}),
    "dp_shard": frozenset({1}),
    "cp": frozenset({1}),
    "zero": frozenset({"fsdp-zero3"}),  # with dp_shard x cp = 1: replicas, gradients all-reduced
    "schedule": frozenset({"1f1b", "interleaved_1f1b"}),
}
"""What the published runs fixed besides TP and PP (Megatron-LM, 2021: full recomputation, data-parallel
all-reduce, no ZeRO, no context parallelism; 1F1B or interleaved 1F1B)."""


def ranks(plan, degrees: tuple[int, int, int, int]) -> tuple[str, str, int]:
    """The rank of the first row with ``degrees`` (tp, pp, dp, cp) among layouts and among degree sets."""
    seen: list[tuple] = []
    for i, q in enumerate(plan.fitting, 1):
        key = (q.layout.tp, q.layout.pp, q.layout.dp, q.layout.cp)
        if key not in seen:
            seen.append(key)
        if key == degrees:
            return str(i), str(len(seen)), len(plan.fitting)
    return "not fitting", "not fitting", len(plan.fitting)


def time_terms(p) -> str:
    """``compute 9.1 + bubble 1.2 + exposed tp 0.8 ...`` (seconds, largest first)."""
    return " + ".join(f"{k} {v:.2f}" for k, v in sorted(p.time.terms.items(), key=lambda kv: -kv[1]) if v >= 0.005)


def overrides(heads: int, hidden: int, layers: int, batch: int) -> list[str]:
    ffn = -(-(8 * hidden // 3) // 64) * 64
    return [
        "--model.dim",
        str(hidden),
        "--model.n_heads",
        str(heads),
        "--model.n_layers",
        str(layers),
        "--model.ffn_dim",
        str(ffn),
        "--model.n_kv_heads",
        str(heads),
        "--model.qk_norm",
        "false",
        "--model.vocab_size",
        str(VOCAB),
        "--model.tie_embeddings",
        "true",
        "--model.max_seq_len",
        str(SEQ),
        "--data.seq_len",
        str(SEQ),
        "--train.global_batch_size",
        str(batch),
        "--train.micro_batch_size",
        "1",
    ]


def published_tokens_per_s(tflops: float, gpus: int, h: int, l: int) -> float:
    per_token = 96 * l * h * h * (1 + SEQ / (6 * h) + VOCAB / (16 * l * h))  # eq. 3 over B s
    return tflops * 1e12 * gpus / per_token


def model_flops_per_token(h: int, l: int) -> float:
    return 72 * l * h * h + 12 * l * SEQ * h + 6 * h * VOCAB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search", action="store_true", help="also search every layout and rank the published one")
    ap.add_argument("--only", default="", help="comma-separated run names to keep (e.g. 'GPT 1T')")
    ap.add_argument("--family-only", action="store_true", help="with --search: skip the unconstrained search")
    ap.add_argument("--beaters", type=int, default=0, help="with --search: print the family's first N and their terms")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    from meshforge.config import load_config
    from meshforge.plan.devices import get_device
    from meshforge.plan.planner import plan_job, plan_layout

    a100 = get_device("a100-80gb")
    lines = [
        "| run | GPUs | layout (TP x PP x DP) | published tokens/s | predicted tokens/s | error | published "
        "model TFLOP/s/GPU | predicted | rank in family: layouts / degree sets (of fitting) | family's first "
        "(tokens/s vs published layout) | rank unconstrained: layouts / degree sets (of fitting) | planner's "
        "first (tokens/s) | search CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    printed = 0
    for name, _, heads, h, l, tp, pp, gpus, batch, tflops, source in RUNS:
        if args.only and name not in args.only.split(","):
            continue
        dp = gpus // (tp * pp)
        base = overrides(heads, h, l, batch)
        layout_args = [
            "--parallel.tp",
            str(tp),
            "--parallel.pp",
            str(pp),
            "--parallel.dp_replicate",
            str(dp),
            "--parallel.dp_shard",
            "1",
            "--parallel.activation_checkpointing",
            "full",
            "--parallel.pp_schedule",
            "1f1b",
            "--parallel.pp_stages_per_rank",
            "0",
        ]
        cfg = load_config("llama-1b", base + layout_args)
        cfg.train.device = "cuda"
        plan = plan_layout(cfg, gpus, 8, a100)
        p = (plan.fitting or plan.overflowing)[0]
        pub = published_tokens_per_s(tflops, gpus, h, l)
        pred = p.time.tokens_per_s
        mf = model_flops_per_token(h, l)
        fam_rank, fam_first, all_rank, first, secs = "-", "-", "-", "-", "-"
        if args.search:
            t0 = time.process_time()
            search_cfg = load_config("llama-1b", base)
            search_cfg.train.device = "cuda"
            family = plan_job(search_cfg, gpus, 8, a100, fixed=FAMILY)
            r_lay, r_deg, n = ranks(family, (tp, pp, dp, 1))
            fam_rank = f"{r_lay} / {r_deg} ({n:,})"
            best = family.fitting[0]
            fam_first = (
                f"{best.layout.describe()} ({best.time.tokens_per_s:,.0f}, {best.time.tokens_per_s / pred:.2f}x)"
            )
            for i, q in enumerate(family.fitting[: args.beaters], 1):
                notes.append(f"{name} family #{i}: {q.layout.describe()}: {q.time.step_s:.2f} s = {time_terms(q)}")
            if args.beaters:
                notes.append(f"{name} published: {p.layout.describe()}: {p.time.step_s:.2f} s = {time_terms(p)}")
            del family
            if not args.family_only:
                found = plan_job(search_cfg, gpus, 8, a100)
                r_lay, r_deg, n = ranks(found, (tp, pp, dp, 1))
                all_rank = f"{r_lay} / {r_deg} ({n:,})"
                best = found.fitting[0]
                first = f"{best.layout.describe()} ({best.time.tokens_per_s:,.0f})"
                del found
            secs = f"{time.process_time() - t0:.0f}"
        fit = "" if p.fits else " (predicted not to fit)"
        lines.append(
            f"| {name} ({source}) | {gpus} | {tp} x {pp} x {dp} | {pub:,.0f} | {pred:,.0f}{fit} | "
            f"{100 * (pred / pub - 1):+.1f}% | {pub * mf / gpus / 1e12:.0f} | {pred * mf / gpus / 1e12:.0f} | "
            f"{fam_rank} | {fam_first} | {all_rank} | {first} | {secs} |"
        )
        print(lines[-1], flush=True)
        for note in notes[printed:]:
            print("    " + note, flush=True)
        printed = len(notes)
    lines += [""] + [f"- {note}" for note in notes]  # after the table, which they would split
    lines.append("")
    lines.append(f"load average {loadavg()}")
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
