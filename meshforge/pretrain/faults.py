"""Keeping a run alive through the failures big jobs meet: preemption, NaNs, loss spikes.

- :class:`PreemptionWatcher` turns SIGTERM (SLURM's warning before the time limit, or
  ``scancel --signal=TERM``) into a flag the loop checks after each step; all ranks agree
  on it, write a checkpoint and exit with :data:`EXIT_PREEMPTED` so a wrapper can requeue.
- :class:`NonFiniteGuard` skips an update whose loss or gradient norm is not finite and
  stops the run after too many in a row (the last good checkpoint stays intact, because
  checkpoints are only written after good steps).
- :class:`SpikeDetector` flags a loss far above its recent history (logged, not acted on).
"""

from __future__ import annotations

import math
import signal
from collections import deque

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 42
"""Exit status of a run that stopped on a preemption signal after writing a checkpoint."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop polls :meth:`should_stop`."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal (one small all-reduce when distributed)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises after ``max_consecutive`` of them."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the update may be applied; False when it must be skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive steps with non-finite loss/gradients (last: step {step}, "
                f"loss {loss}, grad norm {grad_norm}); stopping. The newest checkpoint is from before them: "
                "lower the LR or check the data, then resume"
            )
        return False


class SpikeDetector:
    """A loss more than ``sigmas`` standard deviations above the mean of the last ``window`` losses."""

    def __init__(self, window: int = 50, sigmas: float = 6.0, min_history: int = 10):
        self.history: deque[float] = deque(maxlen=window)
        self.sigmas = sigmas
        self.min_history = min_history

    def update(self, loss: float) -> bool:
        spike = False
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            var = sum((x - mean) ** 2 for x in self.history) / len(self.history)
            spike = loss > mean + self.sigmas * max(math.sqrt(var), 1e-3 * abs(mean))
        if math.isfinite(loss) and not spike:
            self.history.append(loss)
        return spike
