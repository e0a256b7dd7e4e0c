"""What a checkpoint's meta.json records about its files, and the check against it.

:func:`file_records` runs when a checkpoint is finalized (rank 0, just before meta.json is
written); :func:`damage` runs before a checkpoint is resumed or generated from. Sizes catch a
truncated or partly copied file at the cost of a ``stat``; checksums catch changed contents,
but only for files up to :data:`CHECKSUM_MAX_BYTES`, so a big model's shards are never read
back at save time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHECKSUM_MAX_BYTES = 256 << 20
"""Files up to this size get a sha256 in meta.json; larger ones (model/optimizer shards) their size only,
so finalizing a big checkpoint never reads it back."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(ckpt: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint dir except meta.json: relative path -> bytes (and sha256 if small)."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "meta.json":
            size = p.stat().st_size
            rec: dict[str, Any] = {"bytes": size}
            if size <= CHECKSUM_MAX_BYTES:
                rec["sha256"] = _sha256(p)
            out[str(p.relative_to(ckpt))] = rec
    return out


def damage(ckpt: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's files against what meta.json recorded; None if intact
    (or written before meta.json recorded its files)."""
    for name, rec in (meta.get("files") or {}).items():
        p = ckpt / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != rec.get("bytes"):
            return f"{p} has {size} bytes, {rec.get('bytes')} when written ({'truncated' if size < rec.get('bytes', 0) else 'grown'})"
        if "sha256" in rec and _sha256(p) != rec["sha256"]:
            return f"{p} does not match the sha256 recorded when it was written (its contents changed)"
    return None
