"""Time to first batch over many small shards (default 1,000).

    python bench/bench_startup.py [--shards 1000] [--record]

Writes N shards of random tokens (uint16, 20-200 docs each, Megatron format, manifest as
`data prepare` writes it), then in a fresh process times: open_data_dir (open + check every
shard), TokenDataset (document table + split), the first batch (builds the epoch's sample
index), and a second batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import torch  # the trainer has it loaded already
from meshforge.data_pipeline import DistributedLoader, TokenDataset, open_data_dir
t1 = time.perf_counter()
info = open_data_dir(sys.argv[1])
t2 = time.perf_counter()
ds = TokenDataset(info, 2048, "train", 0.01, seed=0)
t3 = time.perf_counter()
loader = DistributedLoader(ds, 32, prefetch=0)
loader.next_batch()
t4 = time.perf_counter()
loader.next_batch()
t5 = time.perf_counter()
print(json.dumps({"import (torch + meshforge)": t1 - t0, "open_data_dir": t2 - t1, "TokenDataset": t3 - t2, "first_batch": t4 - t3,
                  "second_batch": t5 - t4, "to_first_batch": t4 - t1, "samples": len(ds), "docs": info.num_documents,
                  "tokens": info.num_tokens}))
"""


def build(root: Path, shards: int, tokenizer: Path) -> Path:
    from meshforge.data_pipeline import IndexedShardWriter
    from meshforge.data_pipeline.layout import FORMAT, TOKENIZER_FILE
    from meshforge.tokenizers import load_tokenizer

    out = root / "data"
    out.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k in range(shards):
        prefix = f"shard_{k:05d}"
        w = IndexedShardWriter(out / prefix, np.uint16)
        for _ in range(int(rng.integers(20, 200))):
            w.add_document(rng.integers(4, 2000, size=int(rng.integers(50, 1500)), dtype=np.uint16))
        w.finalize()
        entries.append({"prefix": prefix, "slice": k, "documents": w.num_documents, "tokens": w.num_tokens})
    tok = load_tokenizer(tokenizer)
    (out / TOKENIZER_FILE).write_bytes(tok.path.read_bytes())
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": str(out / TOKENIZER_FILE), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
        "dtype": "uint16",
        "append_eos": True,
        "num_documents": sum(e["documents"] for e in entries),
        "num_tokens": sum(e["tokens"] for e in entries),
        "shards": entries,
        "sources": [],
        "skipped_records": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append the numbers to bench/RESULTS.md")
    args = ap.parse_args()
    from meshforge.data_pipeline import ensure_builtin

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = ensure_builtin("shakespeare", root / "cache", 2048, progress=False) / "tokenizer.model"
        t = time.perf_counter()
        data = build(root, args.shards, tok)
        build_s = time.perf_counter() - t
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(data)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    import torch

    lines = [
        f"### {time.strftime('%Y-%m-%d')} — `python bench/bench_startup.py --shards {args.shards} --record`",
        "",
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs, {platform.platform()}; python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
        "",
        f"data: {args.shards} shards, {best['docs']} docs, {best['tokens'] / 1e6:.1f}M tokens (written in {build_s:.1f} s); "
        f"seq_len 2048, batch 32, {best['samples']} train samples; best of {args.repeats} fresh processes",
        "",
        "to_first_batch = open_data_dir + TokenDataset + first_batch (imports excluded).",
        "",
        "| step | seconds |",
        "|---|---:|",
    ] + [
        f"| {k} | {best[k]:.3f} |"
        for k in (
            "import (torch + meshforge)",
            "open_data_dir",
            "TokenDataset",
            "first_batch",
            "second_batch",
            "to_first_batch",
        )
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        with open(path, "a") as f:
            f.write("\n## Startup with many shards\n\n" + text)


if __name__ == "__main__":
    main()
