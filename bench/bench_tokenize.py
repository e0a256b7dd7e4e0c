"""Tokenization throughput of `prepare_data` with 1 and 2 worker processes.

    python bench/bench_tokenize.py [--copies 8] [--record]

Input: the built-in corpus (Shakespeare, 1209 docs) written as --copies .jsonl files
(slices); tokenizer: the built-in 2048-piece BPE. Reports documents, tokens and tokens/s
per worker count (best of --repeats), and checks the outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from meshforge.data_pipeline import ensure_builtin, prepare_data
    from meshforge.data_pipeline.builtin import BUILTIN_CORPORA

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = ensure_builtin("shakespeare", root / "cache", 2048, progress=False) / "tokenizer.model"
        raw = gzip.decompress(BUILTIN_CORPORA["shakespeare"].read_bytes())
        for k in range(args.copies):
            (root / f"in_{k:03d}.jsonl").write_bytes(raw)
        mb = len(raw) * args.copies / 1e6
        outputs = {}
        for w in args.workers:
            best = None
            for r in range(args.repeats):
                out = root / f"out_w{w}_{r}"
                t = time.perf_counter()
                m = prepare_data([str(root / "in_*.jsonl")], str(tok), str(out), workers=w, progress=False)
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
                outputs[w] = {p.name: p.read_bytes() for p in out.glob("shard_*")}
                if r:
                    shutil.rmtree(out)
            rows.append((w, m["num_documents"], m["num_tokens"], best))
        assert all(o == outputs[args.workers[0]] for o in outputs.values()), "outputs differ between worker counts"
    import torch

    lines = [
        f"### {time.strftime('%Y-%m-%d')} — `python bench/bench_tokenize.py --copies {args.copies} --record`",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, sentencepiece {__import__('sentencepiece').__version__}",
        "",
        f"input: {args.copies} x built-in corpus as .jsonl ({mb:.1f} MB of text, {args.copies} slices); tokenizer: "
        f"built-in BPE 2048; best of {args.repeats}; outputs byte-identical across worker counts",
        "",
        "| workers | docs | tokens | seconds | tokens/s | MB/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {w} | {d} | {t} | {s:.2f} | {t / s / 1e6:.2f}M | {mb / s:.1f} |" for w, d, t, s in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write("\n## Tokenization (data prepare)\n\n" + text)


if __name__ == "__main__":
    main()
