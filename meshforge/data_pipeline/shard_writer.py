"""Writing the documents of one slice into its indexed shard(s).

A slice becomes ``shard_<slice>`` (or ``shard_<slice>_<part>`` every ``docs_per_shard``
documents). Shard files are written as ``.tmp`` and renamed by :class:`IndexedShardWriter`;
whatever an earlier crash left of the slice is deleted before it is written again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshforge.data_pipeline.indexed import IndexedShardWriter
from meshforge.file_hash import file_sha256


def _slice_prefix(i: int, part: int | None) -> str:
    return f"shard_{i:05d}" if part is None else f"shard_{i:05d}_{part:04d}"


def _remove_slice_files(out: Path, i: int) -> None:
    for p in list(out.glob(f"shard_{i:05d}.*")) + list(out.glob(f"shard_{i:05d}_*")):
        p.unlink(missing_ok=True)


class SliceSink:
    """Writes the documents of one slice: one shard, or a new one every ``docs_per_shard``."""

    def __init__(self, out: Path, index: int, dtype, docs_per_shard: int):
        self.out, self.index, self.dtype, self.docs_per_shard = out, index, dtype, docs_per_shard
        self.writer: IndexedShardWriter | None = None
        self.shards: list[dict] = []
        self.documents = 0
        _remove_slice_files(out, index)  # debris of a crash mid-slice is never reused

    def add(self, tokens: np.ndarray) -> None:
        full = self.docs_per_shard > 0 and self.writer is not None and self.writer.num_documents >= self.docs_per_shard
        if self.writer is None or full:
            self._close_writer()
            part = len(self.shards) if self.docs_per_shard > 0 else None
            prefix = _slice_prefix(self.index, part)
            self.writer = IndexedShardWriter(self.out / prefix, self.dtype)
            self.shards.append({"prefix": prefix, "slice": self.index})
        self.writer.add_document(tokens)
        self.documents += 1

    def _close_writer(self) -> None:
        if self.writer is None:
            return
        w, entry = self.writer, self.shards[-1]
        w.finalize()
        bp, ip = self.out / f"{entry['prefix']}.bin", self.out / f"{entry['prefix']}.idx"
        entry.update(
            documents=w.num_documents,
            tokens=w.num_tokens,
            bin_bytes=bp.stat().st_size,
            idx_bytes=ip.stat().st_size,
            bin_sha256=file_sha256(bp),
            idx_sha256=file_sha256(ip),
            max_token_id=w.max_token_id,
        )
        self.writer = None

    def finish(self) -> list[dict]:
        self._close_writer()
        return self.shards

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
