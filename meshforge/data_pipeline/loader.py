"""The resumable distributed loader: this DP rank's slice of the global sample order.

Global batch ``b`` holds dataset samples ``[b*G, (b+1)*G)``; DP rank ``r`` of ``dp`` reads
the contiguous slice ``[r*G/dp, (r+1)*G/dp)`` of it. The data seen depends only on the
dataset and ``G``, never on the DP degree, and the position is one number (global samples
consumed), so a run can resume on a different DP degree and continue the same order.
For a :class:`~meshforge.data_pipeline.blend.BlendedDataset` the state also carries the
blend history, so a changed blend applies from the resume point (see ``blend.py``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import numpy as np

from meshforge.data_pipeline.errors import DataError

if TYPE_CHECKING:  # imported lazily at run time (the loader's first batch)
    import torch


class DistributedLoader:
    """Yields ``[G/dp, seq_len+1]`` LongTensors for one DP rank; optional thread prefetch.

    A dataset whose samples are ``(tokens, segments)`` tuples (``return_segments=True``)
    gives ``(tokens [B, T+1] int64, segments [B, T+1] int32)`` batches instead.

    ``prefetch`` batches ahead are read in the background, by ``workers`` threads at once (1 by
    default; more only for a dataset whose reads wait on the network, and that is safe to read
    from several threads, like :class:`RemoteTokenDataset`); prefetching never changes the
    batches or :meth:`state_dict` (which counts only batches returned).
    """

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        prefetch: int = 2,
        vocab_size: int = 0,
        locate: Callable[[int], str] | None = None,
        workers: int = 1,
    ):
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not a rank of dp_size {dp_size}")
        if global_batch_size % dp_size:
            raise DataError(
                f"global_batch_size {global_batch_size} does not divide by dp_size {dp_size}: "
                f"choose a global batch that is a multiple of the data-parallel degree"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        self.prefetch = max(0, int(prefetch))
        self.vocab_size = vocab_size
        """Every batch's largest token id must be below it (0: unchecked): one reduction per batch."""
        self.locate = locate
        """``locate(vocab_size)``: where the data holds an id beyond it (shard, document), for the error."""
        self.consumed_samples = 0
        self._pool = (
            ThreadPoolExecutor(
                max_workers=max(1, min(int(workers), self.prefetch)), thread_name_prefix="meshforge-loader"
            )
            if self.prefetch
            else None
        )
        self._pending: dict[int, Future] = {}

    def _read(self, consumed: int) -> "torch.Tensor":
        """This rank's slice of the global batch starting at sample ``consumed``."""
        return self.read_slice(consumed, self.dp_rank)

    def read_slice(self, consumed: int, dp_rank: int) -> "torch.Tensor":
        """Slice ``dp_rank`` (of ``dp_size``) of the global batch starting at sample ``consumed``; the
        position does not move (a standby replica group reads a missing group's slice with it)."""
        import torch  # imported here so tokenizing worker processes need not load torch

        if not 0 <= dp_rank < self.dp_size:
            raise DataError(f"dp_rank {dp_rank} is not a rank of dp_size {self.dp_size}")
        first = consumed + dp_rank * self.local_batch_size
        # the whole slice in one call, no per-sample arrays; looked up on the class: a wrapper that
        # forwards unknown attributes to its base (span corruption, UL2) must not hand over the
        # base's raw windows instead of its own samples
        if getattr(type(self.dataset), "read_batch", None) is not None:
            batch = self.dataset.read_batch(np.arange(first, first + self.local_batch_size))
            if isinstance(batch, tuple):
                return torch.from_numpy(self._checked(batch[0], first)), torch.from_numpy(batch[1])
            return torch.from_numpy(self._checked(batch, first))
        rows = [self.dataset[first + k] for k in range(self.local_batch_size)]
        if isinstance(rows[0], tuple):
            tokens = torch.from_numpy(self._checked(np.stack([r[0] for r in rows]).astype(np.int64, copy=False), first))
            return tokens, torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int32, copy=False))
        return torch.from_numpy(self._checked(np.stack(rows).astype(np.int64, copy=False), first))

    def _checked(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """``tokens``, after one max-reduction proves every id has an embedding (a shard changed after its
        manifest recorded its largest id would otherwise crash the embedding, on a GPU as a device assert)."""
        if self.vocab_size and tokens.size and (top := int(tokens.max())) >= self.vocab_size:
            where = self.locate(self.vocab_size) if self.locate is not None else "the data"
            raise DataError(
                f"{where} holds token id {top}, beyond the model's vocabulary (model.vocab_size = {self.vocab_size}; "
                f"met in the batch of samples {first}..{first + len(tokens) - 1}): the shard changed after its "
                "manifest was written; re-prepare the data with `meshforge data prepare`"
            )
        return tokens

    def next_batch(self) -> "torch.Tensor":
        pos = self.consumed_samples
        fut = self._pending.pop(pos, None)
        batch = fut.result() if fut is not None else self._read(pos)
        self.consumed_samples = pos + self.global_batch_size
        if self._pool is not None:
            for k in range(1, self.prefetch + 1):
                ahead = pos + k * self.global_batch_size
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._read, ahead)
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self, consumed: int | None = None) -> dict:
        """``{"consumed_samples": n}``, plus ``"blend"`` (its history) for a blended dataset; ``consumed``: the
        state at an earlier position instead (before the batch just read: ``consumed_samples - global_batch_size``)."""
        consumed = self.consumed_samples if consumed is None else consumed
        state = {"consumed_samples": int(consumed)}
        if hasattr(self.dataset, "consumed_per_source"):
            state["blend"] = self.dataset.state_dict(consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; a blended dataset continues each source where it was."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed}")
        self._drop_pending()
        if hasattr(self.dataset, "consumed_per_source"):
            self.dataset.load_state_dict(consumed, state.get("blend"))
        self.consumed_samples = consumed

    def _drop_pending(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop the prefetch thread (also done when the loader is garbage collected)."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
