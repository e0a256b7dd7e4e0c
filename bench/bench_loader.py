"""Throughput of DistributedLoader against a raw np.memmap read of the same shard.

Builds a data dir of ~20M synthetic tokens (uint16, documents of 200..8000 tokens) with
IndexedShardWriter, then reads batches of ``--batch`` x ``--seq-len`` (+1) tokens:

* ``raw memmap``: contiguous (seq_len+1)-token slices of the .bin in order, stacked into an
  int64 torch tensor (a lower bound on the cost of any loader);
* ``TokenDataset + DistributedLoader`` with and without background prefetch, each with and
  without the per-batch check of the largest token id against the vocabulary (``id check``).

With ``--remote`` the same shards are also served by nginx on localhost and read by HTTP range
requests (``bench/loader_remote.py``), with and without prefetch, against the memory map.

Prints a table; with ``--record`` appends it (machine, versions, command) to bench/RESULTS.md.
Run: ``python bench/bench_loader.py --record``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import record

from meshforge.data_pipeline import DistributedLoader, IndexedShardWriter, TokenDataset, ensure_builtin, open_data_dir


def build_shards(out: Path, tokens: int, vocab: int, shards: int = 4) -> None:
    rng = np.random.default_rng(0)
    per_shard = tokens // shards
    for k in range(shards):
        with IndexedShardWriter(out / f"bench_{k:02d}", np.uint16) as w:
            while w.num_tokens < per_shard:
                w.add_document(rng.integers(4, vocab, size=int(rng.integers(200, 8000)), dtype=np.uint16))


def time_batches(fn, n: int, repeats: int = 3) -> float:
    """Seconds for ``n`` calls of ``fn``: the best of ``repeats`` passes (each reads new batches)."""
    fn()  # warm-up (page cache, epoch build)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved passes per reader (the best counts)")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument(
        "--remote",
        action="store_true",
        help="also serve the shards with nginx on localhost and compare range reads with the memory map",
    )
    ap.add_argument("--step-ms", type=float, default=50.0, help="--remote: simulated training step between batches")
    ap.add_argument("--step-batches", type=int, default=40, help="--remote: batches per row with a simulated step")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="--remote: latency a proxy adds to each request")
    ap.add_argument("--latency-step-ms", type=float, default=10.0, help="--remote: simulated step behind that latency")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = ensure_builtin("shakespeare", tmp / "cache", 2048, progress=False)
        t_builtin = time.perf_counter() - t0
        tok_path = open_data_dir(data).tokenizer_path
        shard_dir = tmp / "shards"
        build_shards(shard_dir, args.tokens, 2048)
        info = open_data_dir(shard_dir, tok_path)

        t0 = time.perf_counter()
        ds = TokenDataset(info, args.seq_len, "train", valid_fraction=0.01, seed=0)
        t_startup = time.perf_counter() - t0

        B, S = args.batch, args.seq_len
        flat = info.shards[0].tokens
        pos = [0]

        def raw():
            rows = []
            for _ in range(B):
                if pos[0] + S + 1 > len(flat):
                    pos[0] = 0
                rows.append(flat[pos[0] : pos[0] + S + 1])
                pos[0] += S
            return torch.from_numpy(np.stack(rows).astype(np.int64))

        load_start = os.getloadavg()
        readers = {"raw memmap, contiguous slices": raw}
        loaders = []
        for prefetch in (0, 2):
            for vocab in (0, 2048):  # 2048: every batch's largest id checked against the vocabulary (one max)
                loaders.append(DistributedLoader(ds, B, prefetch=prefetch, vocab_size=vocab))
                name = f"DistributedLoader prefetch={prefetch}" + (", id check" if vocab else "")
                readers[name] = loaders[-1].next_batch
        best = {name: float("inf") for name in readers}
        for _ in range(args.rounds):  # interleaved: a load change on this shared machine hits every reader alike
            for name, fn in readers.items():
                best[name] = min(best[name], time_batches(fn, args.batches, repeats=1))
        rows = list(best.items())
        sample = loaders[0].next_batch().numpy()
        t0 = time.perf_counter()
        for _ in range(1000):
            int(sample.max())
        t_check = (time.perf_counter() - t0) / 1000  # the check alone: one max over a batch
        for loader in loaders:
            loader.close()
        load_end = os.getloadavg()
        remote = []
        if args.remote:
            import loader_remote  # bench/loader_remote.py: nginx + range reads

            remote = ["", *loader_remote.run(args, tmp, shard_dir, tok_path, ds)]

    toks = args.batches * B * (S + 1)
    lines = [
        f"data: {info.num_tokens / 1e6:.1f}M tokens in {len(info.shards)} shards, {info.num_documents} docs; "
        f"batch {B} x {S + 1} tokens; best of {args.rounds} interleaved passes of {args.batches} batches",
        f"load average at start / end: {' '.join(f'{x:.2f}' for x in load_start)} / "
        f"{' '.join(f'{x:.2f}' for x in load_end)}",
        f"TokenDataset startup: {t_startup * 1e3:.1f} ms; ensure_builtin('shakespeare', vocab 2048) cold: {t_builtin:.1f} s",
        "",
        "| reader | tokens/s | ms/batch |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {toks / t / 1e6:.1f}M | {t / args.batches * 1e3:.2f} |" for name, t in rows]
    check = {
        k: best[f"DistributedLoader prefetch={k}, id check"] / best[f"DistributedLoader prefetch={k}"] for k in (0, 2)
    }
    lines += [
        "",
        "time with the token-id check / without: "
        + ", ".join(f"prefetch={k}: {r:.3f}x" for k, r in check.items())
        + f"; the check alone (one max over a {B} x {S + 1} int64 batch): {t_check * 1e6:.1f} us",
    ]
    lines += remote
    print("\n".join(lines))
    if args.record:
        record("## Data loader", lines)


if __name__ == "__main__":
    sys.exit(main())
