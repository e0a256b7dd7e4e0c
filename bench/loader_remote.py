"""``bench_loader.py --remote``: the same shards served by nginx on localhost, read by range requests.

Writes a manifest for the benchmark's shards (sizes, sha256, the tokenizer), serves the dir
with nginx (``tests/harness/remote_servers.py``: the tests' server), and times, in one process and one
run, the local memory-mapped loader against the remote one, each with and without the
loader's background prefetch: in a tight loop (the loader alone) and with a simulated
training step of ``--step-ms`` between batches (what prefetch is for). Also counts the bytes
fetched against the bytes of the samples read (read amplification).
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
from remote_servers import Nginx  # noqa: E402 -- the tests' nginx wrapper


def write_manifest(shard_dir: Path, tok_path: str) -> None:
    """Make ``shard_dir`` (bare .idx/.bin pairs) a prepared data dir: tokenizer + manifest."""
    shutil.copyfile(tok_path, shard_dir / TOKENIZER_FILE)
    tok = load_tokenizer(shard_dir / TOKENIZER_FILE)
    shards = []
    for idx in sorted(shard_dir.glob("*.idx")):
        prefix = idx.with_suffix("")
        s = IndexedShard(prefix)
        shards.append({"prefix": prefix.name, "documents": s.num_documents, "tokens": s.num_tokens,
                       "bin_bytes": prefix.with_suffix(".bin").stat().st_size, "idx_bytes": idx.stat().st_size,
                       "bin_sha256": file_sha256(prefix.with_suffix(".bin")), "idx_sha256": file_sha256(idx),
                       "max_token_id": s.max_token_id()})
    atomic_write_json(shard_dir / MANIFEST, {
        "format": FORMAT, "tokenizer": {"path": str(shard_dir / TOKENIZER_FILE), "fingerprint": tok.fingerprint,
                                        "vocab_size": tok.vocab_size},
        "dtype": "uint16", "num_documents": sum(s["documents"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards), "shards": shards})


def _rate(loader: DistributedLoader, n: int, step_s: float) -> float:
    """Seconds per batch over ``n`` batches, a simulated step of ``step_s`` after each."""
    loader.next_batch()  # warm-up: connection pool, epoch build, first prefetch
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
        if step_s:
            time.sleep(step_s)
    return (time.perf_counter() - t0) / n


def run(args, tmp: Path, shard_dir: Path, tok_path: str, local_ds: TokenDataset) -> list[str]:
    write_manifest(shard_dir, tok_path)
    server = Nginx(shard_dir, tmp / "nginx").start()
    B, S = args.batch, args.seq_len
    try:
        stats = RemoteStats()
        info = open_remote_data_dir(server.url, "", tmp / "remote-cache", stats=stats)
        remote_ds = RemoteTokenDataset(info, S, "train", valid_fraction=0.01, seed=0)
        same = all(np.array_equal(local_ds.read_batch(np.arange(k, k + B)), remote_ds.read_batch(np.arange(k, k + B)))
                   for k in (0, 5 * B))
        rows = []
        for step_ms in (0.0, args.step_ms):
            for prefetch in (0, 2):
                per = {}
                for name, ds in (("local mmap", local_ds), ("nginx ranges", remote_ds)):
                    loader = DistributedLoader(ds, B, prefetch=prefetch)
                    before = stats.bytes_fetched
                    per[name] = _rate(loader, args.batches, step_ms / 1e3)
                    fetched = stats.bytes_fetched - before
                    loader.close()
                toks = B * (S + 1)
                amp = fetched / ((args.batches + 1 + prefetch) * toks * 2)
                rows.append(f"| {step_ms:.0f} | {prefetch} | {toks / per['local mmap'] / 1e6:.1f}M | "
                            f"{toks / per['nginx ranges'] / 1e6:.2f}M | {per['local mmap'] / per['nginx ranges']:.2f}x | "
                            f"{amp:.3f} |")
    finally:
        server.stop()
    return [
        f"remote: the same shards from nginx {os.popen('nginx -v 2>&1').read().strip().split('/')[-1]} on 127.0.0.1 "
        f"(HTTP range requests, fsspec + aiohttp), {args.batches} batches of {B} x {S + 1} per row, one process, "
        f"one run; batches equal to the local ones: {same}; load average {os.getloadavg()[0]:.2f}",
        "",
        "| simulated step ms | prefetch | local tokens/s | remote tokens/s | remote / local | bytes fetched / sample bytes |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
