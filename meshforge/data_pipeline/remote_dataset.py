"""Samples of a remote data dir read by byte ranges: the same samples as the local copy, byte for byte.

:class:`RemoteTokenDataset` is a :class:`~meshforge.data_pipeline.dataset.TokenDataset` whose
order, epochs, split and packing are the parent's (computed from the cached ``.idx`` files);
only where the tokens come from differs. For each batch it walks the samples' documents once
to list the token pieces they need, merges pieces of one shard that overlap or touch (the
one token consecutive samples share, neighbouring documents), fetches the merged ranges
concurrently (``RemoteStore.read_ranges``), and fills the rows from them. Nothing else is
read: the bytes fetched are the bytes of the samples (plus at most ``max_gap`` per merge).

Over HTTP a batch's ranges of one shard go in one multi-range request (``remote_http``), so a
batch costs one request per shard it touches; over S3 (no multi-range) one per merged range,
all at once. The training loader (``DistributedLoader(prefetch=k, workers=k)``, ``k =
read_ahead``) reads the next ``k`` batches this way, concurrently, while the current step
runs; the fetched ranges live only as long as their batch is being assembled, so memory is
bounded by the prefetch depth.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from meshforge.data_pipeline.dataset import TokenDataset
from meshforge.data_pipeline.remote import RemoteStore


class _Ranges:
    """The fetched ranges of one shard, sliced like the shard's token array."""

    def __init__(self, starts: list[int], arrays: list[np.ndarray]):
        self.starts, self.arrays = starts, arrays

    def __getitem__(self, sl: slice) -> np.ndarray:
        k = bisect.bisect_right(self.starts, sl.start) - 1
        base = self.starts[k]
        return self.arrays[k][sl.start - base : sl.stop - base]


def merge_pieces(pieces: list[tuple[int, int, int]], max_gap: int = 0) -> dict[int, list[tuple[int, int]]]:
    """``(shard, token start, token end)`` pieces -> per shard, sorted disjoint ``[start, end)`` ranges
    covering them; ranges closer than ``max_gap`` tokens are merged."""
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for k, s, e in sorted(pieces):
        spans = by_shard.setdefault(k, [])
        if spans and s <= spans[-1][1] + max_gap:
            if e > spans[-1][1]:
                spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    return by_shard


class RemoteTokenDataset(TokenDataset):
    """A :class:`TokenDataset` over a remote data dir (``info.store``, ``info.bin_names``).

    The parent's code runs unchanged (the local path pays nothing for this class): its
    ``_tokens`` (one array per shard, sliced by ``_fill``) is here a per-thread attribute, set
    to the fetched ranges of the batch that thread is reading (the loader's prefetch thread and
    the main thread may read different batches at once).
    """

    read_ahead = 4
    """Batches a training loader prefetches, all read at once (each waits mostly on its requests)."""

    max_gap_tokens = 0
    """Ranges of one shard closer than this are fetched as one (0: only touching/overlapping ones)."""

    def __init__(self, info, *args, **kwargs):
        self._local = threading.local()
        super().__init__(info, *args, **kwargs)
        self.store: RemoteStore = info.store
        self._names = info.bin_names
        self._dtypes = [s.dtype for s in info.shards]
        self._etags = info.etags

    @property
    def _tokens(self) -> list:
        return self._local.tokens

    @_tokens.setter
    def _tokens(self, value: list) -> None:
        self._local.tokens = value

    def _jobs(self, idx: np.ndarray):
        """``(document order, stream offsets, stream start, first ordered doc)`` of each sample (the parent's walk)."""
        epochs, within = np.divmod(idx, len(self))
        for epoch in np.unique(epochs).tolist():
            order, offsets, samples = self._epoch(epoch)
            starts = samples[within[epochs == epoch]] * self.seq_len
            for start, d in zip(starts.tolist(), (np.searchsorted(offsets, starts, side="right") - 1).tolist()):
                yield order, offsets, start, d

    def _pieces(self, idx: np.ndarray) -> list[tuple[int, int, int]]:
        """``(shard, token start, token end)`` of every piece the samples ``idx`` are made of."""
        pieces, width = [], self.seq_len + 1
        doc_starts, doc_shards = self._starts, self._shard
        for order, offsets, start, d in self._jobs(idx):
            pos, end = start, start + width
            while pos < end:
                doc = order[d]
                stop = min(end, int(offsets[d + 1]))
                if stop > pos:
                    s = int(doc_starts[doc]) + pos - int(offsets[d])
                    pieces.append((int(doc_shards[doc]), s, s + stop - pos))
                    pos = stop
                d += 1
        return pieces

    def _fetch(self, idx: np.ndarray) -> None:
        """Fetch the byte ranges of samples ``idx`` and make them this thread's ``_tokens``."""
        spans = merge_pieces(self._pieces(idx), self.max_gap_tokens)
        requests = []
        for k, ranges in spans.items():
            size = self._dtypes[k].itemsize
            requests += [(self._names[k], s * size, e * size) for s, e in ranges]
        blobs = iter(self.store.read_ranges(requests, self._etags))
        tokens: list = [None] * len(self._names)
        for k, ranges in spans.items():
            tokens[k] = _Ranges(
                [s for s, _ in ranges], [np.frombuffer(next(blobs), dtype=self._dtypes[k]) for _ in ranges]
            )
        self._tokens = tokens

    def read_batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise IndexError(f"sample index must be >= 0, got {int(idx.min())}")
        self._fetch(idx)
        try:
            return super().read_batch(idx)
        finally:
            self._tokens = []

    def __getitem__(self, i: int):
        return self.read_batch([i])[0] if not self.return_segments else tuple(a[0] for a in self.read_batch([i]))
