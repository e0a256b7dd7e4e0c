"""Keeping a run alive through the failures big jobs meet: preemption, NaNs, loss spikes.

- :class:`PreemptionWatcher` turns SIGTERM (SLURM's warning before the time limit, or
  ``scancel --signal=TERM``) into a flag the loop checks after each step; all ranks agree
  on it, write a checkpoint and exit with :data:`EXIT_PREEMPTED` so a wrapper can requeue.
  The trainer reduces every rank's flag with the step's losses (``TrainStep.with_stop_flag``:
  no collective or device-to-host transfer of its own).
- :class:`NonFiniteGuard` skips an update whose loss or gradient norm is not finite and
  stops the run after too many in a row. No checkpoint is written while such a streak is
  open (a scheduled save waits for the next good step), so the newest checkpoint is always
  from before the streak and pruning cannot delete it.
- :class:`SpikeDetector` flags a loss far above its recent history (logged, not acted on).
- :class:`CollectiveWatch` marks, in the rendezvous store, which group of collectives each
  rank is entering; when a collective fails (a peer died) or times out (a peer stalls for
  ``train.collective_timeout_s``), it turns the backend's error into a one-line
  :class:`CollectiveError` naming the operation, this rank and the ranks that never got there;
  with each rank's :class:`~meshforge.pretrain.heartbeat.Heartbeat`, the ranks that stopped
  answering (a lost link or host) are named with their hosts, apart from those merely behind.
"""

from __future__ import annotations

import math
import re
import signal
from collections import deque
from contextlib import contextmanager

import torch.distributed as dist

from ..errors import CollectiveError, MeshforgeError
from .heartbeat import STOPPED_AFTER, Heartbeat, name_by_host, within

STORE_READ_S = 5.0
"""How long a failing rank waits for the store's answers before saying the others' progress is unknown."""

EXIT_PREEMPTED = 42
"""Exit status of a run that stopped on a preemption signal after writing a checkpoint."""
PREEMPTED_MARKER_ENV = "MESHFORGE_PREEMPTED_MARKER"
"""Environment variable naming a file that rank 0 creates once its preemption checkpoint is complete.

A job script cannot rely on the exit status alone: when the first rank exits with
:data:`EXIT_PREEMPTED`, ``srun --kill-on-bad-exit`` signals the ranks still shutting down and
reports their signal instead (143). The marker says "the checkpoint is written; requeue"."""


def mark_preempted(environ=None) -> None:
    """Create the file named by :data:`PREEMPTED_MARKER_ENV`, if that variable is set (rank 0, after its checkpoint)."""
    import os
    from pathlib import Path

    path = (os.environ if environ is None else environ).get(PREEMPTED_MARKER_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{EXIT_PREEMPTED}\n")


class TrainingDiverged(MeshforgeError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 instead of dying (:attr:`received`); the step's loss all-reduce carries the flag
    to every rank (``TrainStep.with_stop_flag``)."""

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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Counts consecutive non-finite steps (a *streak*); after ``max_consecutive`` of them the run stops.

    :meth:`check` never raises, so the step that ends a streak still gets its metrics record;
    the trainer asks :attr:`diverged` after logging it and raises :meth:`diverged_error`.
    While a streak is open (:attr:`consecutive` > 0) the trainer writes no checkpoint.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0
        self.first_bad_step = 0
        self.last = (0, math.nan, math.nan)  # step, loss, grad norm of the latest non-finite step
        self.stop_reason = ""
        """Set by a backend that cannot skip an update (DeepSpeed applies it itself): stop after this step."""

    def stop_after_this_step(self, reason: str) -> None:
        """Stop the run once this step's record is logged (:attr:`diverged`), saying ``reason``."""
        self.stop_reason = reason

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the update may be applied; False when it must be skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        if self.consecutive == 0:
            self.first_bad_step = step
        self.consecutive += 1
        self.total_skipped += 1
        self.last = (step, loss, grad_norm)
        return False

    @property
    def diverged(self) -> bool:
        """The open streak has reached ``max_consecutive`` steps: the run must stop."""
        return self.consecutive >= self.max_consecutive or bool(self.stop_reason)

    def diverged_error(self, newest_checkpoint: str | None) -> TrainingDiverged:
        """The stop, naming the newest checkpoint (written before the streak: none is written inside one)."""
        step, loss, grad_norm = self.last
        if self.stop_reason:
            newest = (
                f"the newest checkpoint is {newest_checkpoint}" if newest_checkpoint else "no checkpoint was written"
            )
            return TrainingDiverged(f"{self.stop_reason}; {newest}")
        where = (
            f"the newest checkpoint, {newest_checkpoint}, is from before them: lower the LR or check the data, "
            "then rerun the same command to resume from it"
            if newest_checkpoint
            else "no checkpoint was written before them: lower the LR or check the data, then start again"
        )
        return TrainingDiverged(
            f"{self.consecutive} consecutive steps with non-finite loss/gradients (steps {self.first_bad_step}-{step}; "
            f"last: loss {loss}, grad norm {grad_norm}); stopping. The updates of those steps were skipped and "
            f"{where}"
        )


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


def is_collective_failure(error: BaseException) -> bool:
    """An error of the communication backend: torch's ``DistError`` family (NCCL, store, network)
    or one of gloo's, which reach Python as plain RuntimeErrors carrying gloo's source path."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and "gloo" in str(error)


def _is_timeout(error: BaseException) -> bool:
    return "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower()


def _peer_gone(error: BaseException) -> bool:
    text = str(error).lower()
    return any(s in text for s in ("closed by peer", "reset by peer", "broken pipe", "connection refused"))


def _backend_reason(error: BaseException) -> str:
    """The backend's own words, one line: no ``[source/file.cc:123]`` prefix, no advice paragraph."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).splitlines()[0] if str(error).strip() else ""
    return text.split(". This is typically")[0].rstrip(".") or type(error).__name__


class CollectiveWatch:
    """Where this rank is among its collectives, shared through the rendezvous store.

    The trainer calls :meth:`at` before each group of collectives ("all_reduce of the loss at
    step 7"); every rank makes the same calls in the same order, so their sequence numbers line
    up. Inside :meth:`explain_failures`, a backend error becomes a :class:`CollectiveError` that
    names the operation this rank was in, the ranks whose heartbeat stopped (with their hosts: a
    lost link, a dead host) and, of the others, those whose last mark is older: the ones that never
    reached it (stalled). A mark is one store write (no reply awaited).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None, heartbeat_s: float = 1.0):
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.store = store
        self.seq = 0
        self.label = "startup"
        self.heartbeat = (
            Heartbeat(store, rank, world_size, heartbeat_s) if store is not None and world_size > 1 else None
        )

    def close(self) -> None:
        """Stop this rank's heartbeat (the end of the run)."""
        if self.heartbeat is not None:
            self.heartbeat.close()

    def at(self, label: str) -> None:
        """Record that this rank now enters ``label`` (the collectives up to the next mark)."""
        self.seq += 1
        self.label = label
        if self.store is None:
            return
        try:
            self.store.set(f"at/{self.rank}", f"{self.seq} {label}")
        except Exception:  # the store's host is gone: the next collective fails and says so
            self.store = None

    def others(self) -> dict[int, tuple[int, str]] | None:
        """Every other rank's last mark (seq, label); None when the store cannot be read."""
        if self.store is None:
            return None
        try:
            keys = [f"at/{r}" for r in range(self.world_size) if r != self.rank]
            present = [k for k in keys if self.store.check([k])]
            values = self.store.multi_get(present) if present else []
        except Exception:
            return None
        marks = {}
        for key, value in zip(present, values):
            seq, _, label = bytes(value).decode().partition(" ")
            marks[int(key.split("/")[1])] = (int(seq), label)
        for key in set(keys) - set(present):  # never marked anything: still starting up
            marks[int(key.split("/")[1])] = (0, "startup")
        return marks

    def describe(self, error: BaseException) -> str:
        """One line: this rank, the operation, what happened, and which ranks were behind."""
        if _is_timeout(error):
            what = f"timed out after {self.timeout_s:g} s (train.collective_timeout_s; raise it if a rank is just slow)"
        elif _peer_gone(error):
            what = "failed: a peer closed its connection (it crashed or was killed; see its log)"
        else:
            what = "failed"
        text = f"rank {self.rank} of {self.world_size}: {self.label} {what}"
        return f"{text}; {self._laggards()}; {type(error).__name__}: {_backend_reason(error)}"

    def _laggards(self, show: int = 8) -> str:
        """Which ranks stopped answering (heartbeat gone: named with their hosts), and which of the others
        never reached this rank's operation, with where they were last."""
        marks = within(STORE_READ_S, self.others)
        if marks is None:
            return "the other ranks' progress is unknown (the rendezvous store is unreachable)"
        lost = {}
        if self.heartbeat is not None:
            lost = within(STORE_READ_S + STOPPED_AFTER * self.heartbeat.interval_s, self.heartbeat.stopped) or {}
        behind = sorted(r for r, (seq, _) in marks.items() if seq < self.seq and r not in lost)
        parts = []
        if lost:
            several = len(lost) > 1
            parts.append(
                f"{name_by_host(lost, show)} stopped answering: {'their' if several else 'its'} heartbeat in "
                f"the rendezvous store stopped (a lost network link, a host that went down, or a frozen "
                f"process; rank{'s' if several else ''} {', '.join(map(str, sorted(lost)[:show]))} "
                f"last at: {marks[sorted(lost)[0]][1]})"
            )
        if behind:
            names = ", ".join(str(r) for r in behind[:show]) + (
                f" and {len(behind) - show} more" if len(behind) > show else ""
            )
            where = "; ".join(f"rank {r} last at: {marks[r][1]}" for r in behind[:show])
            parts.append(f"rank{'s' if len(behind) > 1 else ''} {names} never reached it ({where})")
        return "; ".join(parts) or "every rank reached it"

    @contextmanager
    def explain_failures(self):
        """Re-raise a backend error from the block as a :class:`CollectiveError` (more than one rank only)."""
        try:
            yield
        except CollectiveError:
            raise
        except Exception as e:
            if self.world_size > 1 and is_collective_failure(e):
                raise CollectiveError(self.describe(e)) from e
            raise
