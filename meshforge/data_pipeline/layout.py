"""The files of a prepared data dir, and the small helpers that read and write them.

A prepared data dir holds::

    shard_00000.bin/.idx ...   Megatron indexed format (no shard for a slice without documents)
    tokenizer.model            the tokenizer the data was tokenized with: a sentencepiece model, or
    tokenizer.json (+ tokenizer_config.json)    a Hugging Face tokenizer (special tokens resolved)
    .prepare/plan.json         the slices and settings (same on every node and restart)
    .prepare/slice_00000.json  done-marker of one slice: its shards with sizes and sha256
    .prepare/node_00000-of-00002.json   per-node partial manifest
    manifest.json              written last, by the merge step: the data dir is complete

``manifest.json``::

    {"format": "meshforge-indexed-v1",
     "tokenizer": {"path": ..., "fingerprint": ..., "vocab_size": ..., "kind": "sentencepiece" | "hf",
                   "bos_id": n | null, "eos_id": n | null, "pad_id": n | null, "add_bos": bool,
                   "files": ["tokenizer.model"] (the tokenizer's files in the data dir)},
     "dtype": "uint16" (int32 from a 65,500-token vocabulary), "append_eos": true, "add_bos": false, "num_documents": N, "num_tokens": N,
     "num_slices": S, "plan": "<hash>",
     "shards": [{"prefix": "shard_00000", "slice": 0, "documents": n, "tokens": n,
                 "bin_bytes": n, "idx_bytes": n, "bin_sha256": ..., "idx_sha256": ...,
                 "max_token_id": n}],
     "sources": [{"type": "file", "path": ..., "documents": n, "skipped": {...}}, ...],
     "skipped_records": {"empty": n, "invalid_utf8": n, "invalid_json": n,
                         "missing_field": n, "non_string_field": n}}

Manifests written before the ``kind`` .. ``add_bos`` fields existed read the same (they were
sentencepiece, EOS-only). JSON files are written to a temporary name and renamed (:func:`atomic_write_json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "meshforge-indexed-v1"
TOKENIZER_FILE = "tokenizer.model"
"""A sentencepiece data dir's tokenizer (an HF one's is ``tokenizer.json``; load either with ``load_tokenizer(dir)``)."""
WORK_DIR = ".prepare"
PLAN_FILE = "plan.json"


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def marker_path(work: Path, i: int) -> Path:
    return work / WORK_DIR / f"slice_{i:05d}.json"


def slice_done(work: Path, i: int, plan_hash: str) -> dict | None:
    """The done-marker of slice ``i`` if it belongs to this plan and its shard files are all there."""
    m = read_json(marker_path(work, i))
    if m is None or m.get("plan") != plan_hash:
        return None
    for s in m["shards"]:
        bp, ip = work / f"{s['prefix']}.bin", work / f"{s['prefix']}.idx"
        if not (
            bp.is_file()
            and ip.is_file()
            and bp.stat().st_size == s["bin_bytes"]
            and ip.stat().st_size == s["idx_bytes"]
        ):
            return None
    return m
