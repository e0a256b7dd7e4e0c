"""``bench_loader.py --remote``: the same shards served by nginx on localhost, read by range requests.

Writes a manifest for the benchmark's shards (sizes, sha256, the tokenizer), serves the dir
with nginx (``tests/harness/remote_servers.py``: the tests' server), and times, in one process and one
run, the local memory-mapped loader against the remote one, before (one HTTP request per
range) and after (one multi-range request per shard and batch), each without prefetch, with
the loader's default prefetch and with the training loader's depth for remote data
(``RemoteTokenDataset.read_ahead`` batches read at once): in a tight loop (the loader alone)
and with a simulated training step of ``--step-ms`` between batches (what prefetch is for:
the ``waited`` column is the time a step would stall), and through a loopback proxy that
adds ``--latency-ms`` to every request (a remote store's latency, which only reading several
batches at once hides when it exceeds the step). Also counts requests per batch and the
bytes fetched against the bytes of the samples read (read amplification).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from meshforge.data_pipeline import DistributedLoader, IndexedShard, TokenDataset
from meshforge.data_pipeline.layout import FORMAT, MANIFEST, TOKENIZER_FILE, atomic_write_json
from meshforge.data_pipeline.remote import RemoteStats
from meshforge.data_pipeline.remote_cache import open_remote_data_dir
from meshforge.data_pipeline.remote_dataset import RemoteTokenDataset
from meshforge.file_hash import file_sha256
from meshforge.tokenizers import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "harness"))
from remote_servers import Nginx, TcpProxy  # noqa: E402 -- the tests' nginx wrapper and loopback proxy


def write_manifest(shard_dir: Path, tok_path: str) -> None:
    """Make ``shard_dir`` (bare .idx/.bin pairs) a prepared data dir: tokenizer + manifest."""
    shutil.copyfile(tok_path, shard_dir / TOKENIZER_FILE)
    tok = load_tokenizer(shard_dir / TOKENIZER_FILE)
    shards = []
    for idx in sorted(shard_dir.glob("*.idx")):
        prefix = idx.with_suffix("")
        s = IndexedShard(prefix)
        shards.append(
            {
                "prefix": prefix.name,
                "documents": s.num_documents,
                "tokens": s.num_tokens,
                "bin_bytes": prefix.with_suffix(".bin").stat().st_size,
                "idx_bytes": idx.stat().st_size,
                "bin_sha256": file_sha256(prefix.with_suffix(".bin")),
                "idx_sha256": file_sha256(idx),
                "max_token_id": s.max_token_id(),
            }
        )
    atomic_write_json(
        shard_dir / MANIFEST,
        {
            "format": FORMAT,
            "tokenizer": {
                "path": str(shard_dir / TOKENIZER_FILE),
                "fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size,
            },
            "dtype": "uint16",
            "num_documents": sum(s["documents"] for s in shards),
            "num_tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        },
    )


def _rate(loader: DistributedLoader, n: int, step_s: float) -> tuple[float, float]:
    """(seconds per batch, seconds per batch spent waiting in ``next_batch``) over ``n`` batches,
    a simulated step of ``step_s`` after each."""
    loader.next_batch()  # warm-up: connection pool, epoch build, first prefetch
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        loader.next_batch()
        waited += time.perf_counter() - t
        if step_s:
            time.sleep(step_s)
    return (time.perf_counter() - t0) / n, waited / n


# (prefetch, workers): none; the loader's default; the training loader's for remote data (read_ahead)
DEPTHS = ((0, 1), (2, 1), (RemoteTokenDataset.read_ahead, RemoteTokenDataset.read_ahead))


def _rows(
    label: str, step_ms: float, n: int, depths, local_ds, remote_ds, stats: RemoteStats, B: int, S: int
) -> list[str]:
    """One table row per (depth, reader): the local memory map, then remote before/after multi-range."""
    rows, toks = [], B * (S + 1)
    for prefetch, workers in depths:
        loader = DistributedLoader(local_ds, B, prefetch=prefetch)
        local_s, _ = _rate(loader, n, step_ms / 1e3)
        loader.close()
        depth = f"{prefetch} / {workers if prefetch else '-'}"
        rows.append(f"| {label} | {step_ms:.0f} | {depth} | local mmap | {toks / local_s / 1e6:.1f}M | 1 | - | - | - |")
        for multi in (False, True):  # before (one request per range) / after (one per shard)
            remote_ds.store.multi_range = multi
            loader = DistributedLoader(remote_ds, B, prefetch=prefetch, workers=workers)
            r0, b0 = stats.requests, stats.bytes_fetched
            per, waited = _rate(loader, n, step_ms / 1e3)
            loader.close()
            read = n + 1 + prefetch  # batches read, the warm-up and those prefetched past the end included
            rows.append(
                f"| {label} | {step_ms:.0f} | {depth} | {'multi-range' if multi else 'one request per range'} | "
                f"{toks / per / 1e6:.2f}M | {local_s / per:.3f}x | {waited * 1e3:.2f} | "
                f"{(stats.requests - r0) / read:.1f} | {(stats.bytes_fetched - b0) / (read * toks * 2):.3f} |"
            )
    return rows


def run(args, tmp: Path, shard_dir: Path, tok_path: str, local_ds: TokenDataset) -> list[str]:
    write_manifest(shard_dir, tok_path)
    server = Nginx(shard_dir, tmp / "nginx").start()
    proxy = TcpProxy(server.port, delay_s=args.latency_ms / 1e3).start()  # the same nginx behind a network's latency
    B, S = args.batch, args.seq_len
    try:
        stats = RemoteStats()
        info = open_remote_data_dir(server.url, "", tmp / "remote-cache", stats=stats)
        remote_ds = RemoteTokenDataset(info, S, "train", valid_fraction=0.01, seed=0)
        same = all(
            np.array_equal(local_ds.read_batch(np.arange(k, k + B)), remote_ds.read_batch(np.arange(k, k + B)))
            for k in (0, 5 * B)
        )
        rows = []
        for step_ms, n in ((0.0, args.batches), (args.step_ms, args.step_batches)):
            rows += _rows("0", step_ms, n, DEPTHS, local_ds, remote_ds, stats, B, S)
        far = RemoteTokenDataset(
            open_remote_data_dir(proxy.url, "", tmp / "remote-cache", stats=stats),
            S,
            "train",
            valid_fraction=0.01,
            seed=0,
        )
        rows += _rows(
            f"{args.latency_ms:g}", args.latency_step_ms, args.step_batches, DEPTHS[1:], local_ds, far, stats, B, S
        )
    finally:
        proxy.stop()
        server.stop()
    return [
        f"remote: the same shards from nginx {os.popen('nginx -v 2>&1').read().strip().split('/')[-1]} on 127.0.0.1 "
        f"(HTTP range requests, fsspec + aiohttp); {args.batches} batches of {B} x {S + 1} per tight-loop row, "
        f"{args.step_batches} per row with a simulated step; the last rows through a loopback proxy that delays each "
        f"request by {args.latency_ms:g} ms (a store's latency); one process, one run; batches equal to the local ones: "
        f"{same}; load average {os.getloadavg()[0]:.2f}",
        "",
        "| added latency ms | simulated step ms | prefetch / workers | reader | tokens/s | / local (same prefetch) | "
        "waited in next_batch ms | requests / batch | bytes fetched / sample bytes |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
