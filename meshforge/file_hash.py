"""The sha256 of a file, read in blocks (shards, checkpoints and corpora can be large)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, block_size: int = 1 << 22) -> str:
    """Hex sha256 of the file at ``path``, read ``block_size`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            h.update(block)
    return h.hexdigest()
