"""Reader and writer of Megatron's memory-mapped indexed dataset format (``.bin`` + ``.idx``).

``.bin`` holds the tokens of all sequences back to back in one dtype. ``.idx`` holds, all
little-endian::

    b"MMIDIDX\\x00\\x00"          magic (9 bytes)
    <Q  version (1)
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count S
    <Q  document-index count D (number of documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence byte offsets into .bin
    int64[D]  document indices: sequence index where each document starts, then S
    int8[S]   sequence modes (only in Megatron's multimodal files; ignored here)

This matches ``megatron.core.datasets.indexed_dataset`` (``IndexedDataset`` reads what
:class:`IndexedShardWriter` writes, and :class:`IndexedShard` reads ``IndexedDatasetBuilder``
output). The writer stores one sequence per document.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from meshforge.data_pipeline.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> type:
    """Smallest token dtype Megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


class IndexedShardWriter:
    """Write one shard: ``add_document(tokens)`` for each document, then ``finalize()``.

    Tokens go to ``<prefix>.bin.tmp`` while writing; ``finalize`` writes ``<prefix>.idx.tmp``
    and renames both into place (``.bin`` first, ``.idx`` last, so a shard with an ``.idx`` is
    complete). ``abort()`` (or leaving a ``with`` block by an exception) removes the temp files.
    """

    def __init__(self, prefix: str | Path, dtype: type = np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(
                f"token dtype {self.dtype} cannot be stored: use one of {sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}"
            )
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._bin_tmp = Path(f"{bin_path(prefix)}.tmp")
        self._idx_tmp = Path(f"{idx_path(prefix)}.tmp")
        self._bin_tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0
        self.max_token_id = -1
        """The largest token id written so far (-1: none); recorded in the manifest."""
        self._done = False

    def add_document(self, tokens) -> None:
        """Append one document (a sequence of token ids)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and self._info is not None and (arr.min() < self._info.min or arr.max() > self._info.max):
            raise DataError(
                f"token ids {int(arr.min())}..{int(arr.max())} do not fit {self.dtype} in {self.prefix}: use a wider dtype"
            )
        if arr.size:
            self.max_token_id = max(self.max_token_id, int(arr.max()))
        self._file.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files into place."""
        self._file.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            self.abort()
            raise DataError(f"a document in {self.prefix} has more than 2**31-1 tokens: split it")
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._file.closed:
            self._file.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if p.exists():
                p.unlink()
        self._done = True

    def __enter__(self) -> "IndexedShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedShard:
    """A validated, memory-mapped view of one ``<prefix>.idx/.bin`` pair.

    ``shard[i]`` is sequence ``i`` (a read-only view into the memmap); ``document_indices``
    maps documents to sequences; ``tokens`` is the whole ``.bin`` as one flat array.
    ``bin_size`` (remote data): the ``.bin`` lives elsewhere and has this many bytes; only the
    index is read here and ``tokens`` stays empty (the remote dataset reads ranges instead).
    """

    def __init__(self, prefix: str | Path, bin_size: int | None = None):
        self.prefix = Path(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp) if bin_size is None else (ip,):
            if not p.is_file():
                raise DataError(f"shard file {p} is missing: re-run data preparation or remove the shard {self.prefix}")
        idx_size = ip.stat().st_size
        with open(ip, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{ip} is not a Megatron indexed-dataset index (bad magic): the file is corrupt, re-run data preparation"
            )
        version, code, n_seq, n_doc_idx = struct.unpack("<QBQQ", head[len(MAGIC) :])
        if version != VERSION:
            raise DataError(f"{ip} has index version {version}, only {VERSION} is supported: re-run data preparation")
        if code not in DTYPE_CODES:
            raise DataError(f"{ip} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)}): the file is corrupt")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = HEADER_SIZE + n_seq * 4 + n_seq * 8 + n_doc_idx * 8
        if idx_size < need:
            raise DataError(
                f"{ip} is truncated: {idx_size} bytes, its header ({n_seq} sequences, {n_doc_idx} document indices) "
                f"needs {need}: re-run data preparation"
            )
        if n_doc_idx < 1:
            raise DataError(f"{ip} has no document index (count 0): the file is corrupt")
        idx = np.memmap(ip, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc_idx, offset=off)
        self._check_index(ip, n_seq)

        itemsize = self.dtype.itemsize
        self.num_tokens = int(self.lengths.sum(dtype=np.int64))
        expected = self.num_tokens * itemsize
        actual = bp.stat().st_size if bin_size is None else bin_size
        if actual != expected:
            kind = "truncated" if actual < expected else "padded"
            raise DataError(f"{bp} is {kind}: {actual} bytes, index expects {expected}: re-run data preparation")
        if self.num_tokens and bin_size is None:
            self.tokens = np.memmap(bp, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def _check_index(self, ip: Path, n_seq: int) -> None:
        if n_seq and (self.lengths.min() < 0):
            raise DataError(f"{ip} has negative sequence lengths: the file is corrupt")
        di = self.document_indices
        if di[0] != 0 or di[-1] != n_seq or (len(di) > 1 and np.any(np.diff(di) < 0)):
            raise DataError(
                f"{ip} has an inconsistent document index (must rise from 0 to {n_seq}): the file is corrupt"
            )
        if n_seq:
            expect = np.zeros(n_seq, dtype=np.int64)
            np.cumsum(self.lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=expect[1:])
            if not np.array_equal(expect, self.pointers):
                raise DataError(f"{ip} has sequence pointers that do not match the lengths: the file is corrupt")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of sequence ``i`` (to its end when length is None)."""
        seq = self[i]
        end = len(seq) if length is None else offset + length
        if offset < 0 or end > len(seq):
            raise IndexError(f"tokens {offset}..{end} out of range for sequence {i} of length {len(seq)}")
        return seq[offset:end]

    def max_token_id(self) -> int:
        """The largest token id in the shard (-1 when empty): one pass over ``.bin``."""
        return int(self.tokens.max()) if self.num_tokens else -1

    def document_token_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Start (in tokens, within ``tokens``) and length of every document."""
        seq_start = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, dtype=np.int64, out=seq_start[1:])
        bounds = seq_start[self.document_indices]
        return bounds[:-1], np.diff(bounds)

    def __repr__(self) -> str:
        return f"IndexedShard({str(self.prefix)!r}, documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype})"
