"""Fixed-length training samples over the documents of a data dir.

Each document (over all shards, in order) gets a global id; it belongs to the validation
split iff a hash of that id falls below ``valid_fraction`` (independent of the seed, so the
split never changes between runs). For each epoch the split's documents are shuffled with
``np.random.default_rng([seed, epoch])``, concatenated into one token stream and cut into
samples of ``seq_len + 1`` tokens with stride ``seq_len`` (consecutive samples share one
token, as Megatron does); the epoch's samples are then shuffled with the same generator.
Sample ``i`` (any ``i >= 0``) is sample ``i % len`` of epoch ``i // len``.

With ``return_segments=True`` a sample is ``(tokens, segments)``: ``segments`` (int32, same
length) numbers the documents the positions come from, 0, 1, 2, ... within the sample, so a
model can keep attention inside documents. Boundaries come from the shards' document index
(not from EOS tokens, which Megatron-written data may lack).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.manifest import DataInfo, open_data_dir

SPLITS = ("train", "valid")
_EPOCHS_CACHED = 3


def doc_hash_uniform(ids: np.ndarray) -> np.ndarray:
    """A fixed hash (splitmix64) of document ids mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(num_docs: int, valid_fraction: float) -> np.ndarray:
    """Boolean mask of validation documents (at least one when there are >= 2 docs)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    u = doc_hash_uniform(np.arange(num_docs, dtype=np.int64))
    valid = u < valid_fraction
    if valid_fraction > 0 and num_docs >= 2 and not valid.any():
        valid[int(np.argmin(u))] = True
    return valid


class TokenDataset:
    """Samples of ``seq_len + 1`` tokens (np.int64) from one split of a data dir."""

    def __init__(
        self,
        data: str | Path | DataInfo,
        seq_len: int,
        split: str = "train",
        valid_fraction: float = 0.02,
        seed: int = 0,
        return_segments: bool = False,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.info = data if isinstance(data, DataInfo) else open_data_dir(data)
        self.seq_len, self.split, self.seed = seq_len, split, seed
        self.return_segments = return_segments
        self._tokens = [np.asarray(s.tokens) for s in self.info.shards]  # plain views: np.memmap slicing is slow

        starts, lengths, shard_ids = [], [], []
        for k, shard in enumerate(self.info.shards):
            s, n = shard.document_token_ranges()
            starts.append(s)
            lengths.append(n)
            shard_ids.append(np.full(len(s), k, dtype=np.int32))
        all_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        all_shards = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)

        valid = split_documents(len(all_starts), valid_fraction)
        chosen = np.flatnonzero(valid if split == "valid" else ~valid)
        self.doc_ids = chosen
        self._starts, self._lengths, self._shard = all_starts[chosen], all_lengths[chosen], all_shards[chosen]
        self.num_tokens = int(self._lengths.sum())
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"the {split} split of {self.info.data_dir} has {self.num_tokens} tokens in {len(chosen)} documents, "
                f"fewer than seq_len+1 = {seq_len + 1}: lower seq_len, change valid_fraction or add data"
            )
        self._len = (self.num_tokens - 1) // seq_len
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, stream offset of each ordered doc, sample order) of one epoch."""
        with self._lock:
            cached = self._epochs.get(epoch)
            if cached is not None:
                self._epochs.move_to_end(epoch)
                return cached
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self._lengths))
            offsets = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self._lengths[order], out=offsets[1:])
            samples = rng.permutation(self._len)
            built = (order, offsets, samples)
            self._epochs[epoch] = built
            while len(self._epochs) > _EPOCHS_CACHED:
                self._epochs.popitem(last=False)
            return built

    def __getitem__(self, i: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, j = divmod(i, self._len)
        order, offsets, samples = self._epoch(epoch)
        start = int(samples[j]) * self.seq_len
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        segments = np.empty(self.seq_len + 1, dtype=np.int32) if self.return_segments else None
        self._fill(out, segments, order, offsets, start, int(np.searchsorted(offsets, start, side="right")) - 1)
        return out if segments is None else (out, segments)

    def read_batch(self, indices) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` as one ``[n, seq_len + 1]`` int64 array (with ``return_segments``,
        also their ``[n, seq_len + 1]`` int32 document segments): what ``self[i]`` gives, row by row.

        The loader's path: one epoch lookup and one search per epoch touched, and each sample's
        pieces copied straight from the shards into its row (no per-sample arrays to stack).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise IndexError(f"sample index must be >= 0, got {int(idx.min())}")
        width = self.seq_len + 1
        out = np.empty((len(idx), width), dtype=np.int64)
        segments = np.empty((len(idx), width), dtype=np.int32) if self.return_segments else None
        epochs, within = np.divmod(idx, self._len)
        for epoch in np.unique(epochs).tolist():
            rows = np.flatnonzero(epochs == epoch)
            order, offsets, samples = self._epoch(epoch)
            starts = samples[within[rows]] * self.seq_len
            first_docs = np.searchsorted(offsets, starts, side="right") - 1
            for r, start, d in zip(rows.tolist(), starts.tolist(), first_docs.tolist()):
                self._fill(out[r], None if segments is None else segments[r], order, offsets, start, d)
        return out if segments is None else (out, segments)

    def _fill(
        self, row: np.ndarray, segments: np.ndarray | None, order: np.ndarray, offsets: np.ndarray, start: int, d: int
    ) -> None:
        """Copy stream positions ``[start, start + len(row))`` of the epoch's document order into ``row``;
        ``d`` is the ordered document holding ``start``."""
        end = start + len(row)
        pos, seg = start, 0
        tokens, doc_starts, doc_shards = self._tokens, self._starts, self._shard
        while pos < end:
            doc = order[d]
            stop = min(end, int(offsets[d + 1]))
            if stop > pos:  # empty documents (possible in Megatron data) take no positions
                s = int(doc_starts[doc]) + pos - int(offsets[d])
                row[pos - start : stop - start] = tokens[doc_shards[doc]][s : s + stop - pos]
                if segments is not None:
                    segments[pos - start : stop - start] = seg
                    seg += 1
                pos = stop
            d += 1

    def document_ids(self) -> np.ndarray:
        """Global ids of this split's documents."""
        return self.doc_ids.copy()
