"""Writing checkpoints: :class:`Checkpointer` saves, prunes and finds the checkpoints of one output dir.

The protocol (format: :mod:`meshforge.pretrain.checkpoint`): every rank writes into
``step_N.tmp``; when all have finished, rank 0 copies the extra files in, writes
``meta.json`` last (with every file's size and checksum), syncs it and renames the
directory to ``step_N`` -- one atomic ``rename``. Deleting a checkpoint (keep-last-k
pruning, or replacing one of the same step) first renames it to ``step_N.deleting.tmp``, so
a kill during the deletion cannot leave a half-deleted directory that still looks complete.

Asynchronous saving (``checkpoint.async_save``) keeps that protocol: the state is copied into
CPU staging buffers by a staging thread while the next step's forward and backward run (the
step waits for it, :meth:`Checkpointer.wait_staged`, only before its optimizer changes the
weights in place); a background thread writes the ``.tmp``
directory (DCP's collectives run on a separate gloo group, so they never interleave with the
training's), and once the write has finished rank 0 finalizes -- extra files, meta.json and
its fsync, rename, prune -- on a finalizer thread of its own, off the training thread
(:meth:`Checkpointer.poll` notices it is done, :meth:`Checkpointer.wait` waits for it). A kill
at any point leaves at most a ``.tmp`` directory (or a ``.deleting.tmp`` one being pruned).

Every save's cost to the training thread -- the save call, plus the polls and waits spent
on it until it is complete -- is kept per save; :meth:`Checkpointer.completed` hands out
``(step, blocked seconds)`` of the saves completed since it was last asked (the trainer logs
them as ``checkpoint_blocked_s``).

A write the file system refuses (disk full, quota, read-only) becomes one line naming the
newest intact checkpoint, and the partial ``.tmp`` directory is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from ..parallel.group_timeout import group_timeout
from . import dcp_io
from .checkpoint import CheckpointError, is_complete, list_checkpoints, rng_state
from .checkpoint_files import file_records, verify_checkpoint
from .output_dir import find_os_error, storage_error


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _retire(path: Path) -> Path:
    """Rename a complete checkpoint out of the way before deleting it (one atomic rename), so a kill
    during the deletion leaves a ``*.tmp`` directory, never a half-deleted ``step_N`` that looks complete."""
    gone = path.with_name(f"{path.name}.deleting.tmp")
    if gone.exists():
        shutil.rmtree(gone, ignore_errors=True)
    os.rename(path, gone)
    _fsync_dir(path.parent)
    return gone


@dataclass
class _PendingSave:
    """An asynchronous save whose files are still being written (or finalized)."""

    step: int
    future: Future
    """Done once the files are written and (rank 0) the checkpoint is finalized: visible as ``step_N``."""
    blocked_s: float = 0.0
    """Seconds the training thread has spent on this save so far (the save call, polls, waits)."""
    finalized: bool = False


class Checkpointer:
    """Saves, prunes and finds the checkpoints of one output dir."""

    def __init__(self, output_dir: str | Path, keep_last: int, rank: int = 0, async_save: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.async_save = async_save
        self._pending: _PendingSave | None = None
        self._group = None  # gloo group for the background writer's collectives (made at the first async save)
        self._stager = None  # staging buffers reused across async saves
        self._finalizer: ThreadPoolExecutor | None = None  # waits for an async write, then finalizes (rank 0)
        self._completed: list[tuple[int, float]] = []  # (step, blocked s) of saves complete since completed()
        self._staged: Future | None = None  # done when the async save's state is copied: the weights may change

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def check_identity(self, identity: dict[str, Any], resume: bool, resume_from: str = "") -> Path | None:
        """The checkpoint to resume from, after refusing an output dir of another run.

        Raises CheckpointError (before anything is written) when the newest checkpoint (or
        ``resume_from``) was made by a run with a different model/data/seed, when checkpoints
        exist and resuming is off (they would be overwritten), or when the checkpoint to resume
        from is damaged (its files differ from what meta.json recorded).
        """
        pick = "--checkpoint.resume_from DIR"
        if resume_from:
            latest = Path(resume_from)
            if not is_complete(latest):
                raise CheckpointError(
                    f"checkpoint.resume_from = {resume_from} is not a complete checkpoint (a "
                    "step_NNNNNNNN dir holding meta.json and .metadata)"
                )
        else:
            latest = self.latest()
        if latest is None:
            return None
        theirs = verify_checkpoint(latest, pick).get("identity", {})
        from ..config import JobConfig, run_identity

        defaults = run_identity(JobConfig())  # a key added since that run was written: it had the default
        theirs = {k: theirs.get(k, defaults.get(k)) for k in identity}
        diff = [f"{k}: {theirs.get(k)!r} there vs {v!r} here" for k, v in identity.items() if theirs.get(k) != v]
        if diff:
            raise CheckpointError(
                f"output dir {self.root.parent} holds checkpoints of a different run ({'; '.join(diff[:4])}); "
                "choose another train.output_dir"
            )
        if not resume and not resume_from:
            raise CheckpointError(
                f"output dir {self.root.parent} already holds checkpoints (newest {latest.name}) and "
                "checkpoint.resume is false; choose another train.output_dir or enable resume"
            )
        return latest

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        files: dict[str, Path] | None = None,
        engine=None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; collective over all ranks.

        With ``async_save`` (and no DeepSpeed engine) this returns once the state is staged in
        CPU memory; the checkpoint becomes visible (``step_N``) when :meth:`poll` or
        :meth:`wait` finds the write finished. With a DeepSpeed ``engine`` (``model``/
        ``optimizer`` unused), the engine writes its own files into ``deepspeed/`` and DCP gets
        the full fp32 weights under ``model``, so every reader of model weights works unchanged.
        """
        self.wait()  # one save in flight at a time; it also finishes before a newer one starts
        start = time.perf_counter()
        try:
            path = self._save(step, model, optimizer, meta, files, engine)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._write_failure(e, step) from e
        blocked = time.perf_counter() - start
        if self._pending is not None:
            self._pending.blocked_s += blocked
        else:
            self._completed.append((step, blocked))
        return path

    def completed(self) -> list[tuple[int, float]]:
        """``(step, seconds the training thread was blocked by it)`` of each save completed since the last call:
        a synchronous save's whole write; an asynchronous one's staging plus the polls and waits spent on it."""
        done, self._completed = self._completed, []
        return done

    def _write_failure(self, error: BaseException, step: int) -> BaseException:
        """A failed write of checkpoint ``step``: a one-line OutputError when the file system said why
        (disk full, quota, read-only); the partial ``.tmp`` dir is removed to give the space back."""
        os_error = find_os_error(error)
        if os_error is None:
            return error
        if self.rank == 0:
            shutil.rmtree(self.root / f"step_{step:08d}.tmp", ignore_errors=True)
        newest = self.latest()
        kept = (
            f"; the newest complete checkpoint, {newest.name}, is intact and a rerun resumes from it"
            if newest
            else "; no checkpoint of this run is complete yet"
        )
        err = storage_error(os_error, f"writing checkpoint step_{step:08d} in {self.root} failed")
        return type(err)(f"{err}{kept}")

    def _save(self, step, model, optimizer, meta, files, engine) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if engine is not None:
            from ..parallel.deepspeed_engine import full_model_state_dict, save_engine

            save_engine(engine, tmp)
            dcp_io.save({"model": full_model_state_dict(engine)}, tmp)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if self.async_save:
                meta = json.loads(json.dumps(meta))  # as of this call: training goes on while the finalizer runs
                response = dcp_io.async_save(state, tmp, self._writer_group(), self._async_stager())
                write = response
                if isinstance(response, AsyncSaveResponse):  # staging runs on its own thread too
                    self._staged, write = response.staging_completion, response.upload_completion
                if self._finalizer is None:
                    self._finalizer = ThreadPoolExecutor(1, thread_name_prefix="meshforge-checkpoint-finalizer")
                done = self._finalizer.submit(self._finish_async, write, step, tmp, final, meta, dict(files or {}))
                self._pending = _PendingSave(step, done)
                return final
            dcp_io.save(state, tmp)
        _barrier()
        if self.rank == 0:
            self._finalize(step, tmp, final, meta, files or {})
        _barrier()
        return final

    def _finish_async(
        self, write: Future, step: int, tmp: Path, final: Path, meta: dict[str, Any], files: dict[str, Path]
    ) -> None:
        """The finalizer thread: wait for the write, then (rank 0) finalize. No collective: DCP's future
        completes on every rank only after the coordinator has written ``.metadata``, i.e. after all
        ranks' data is on disk."""
        write.result()  # re-raises a failed write (on the training thread, through this future)
        if self.rank == 0:
            self._finalize(step, tmp, final, meta, files)

    def wait_staged(self) -> None:
        """Block until an asynchronous save has copied the state it saves (call before changing the weights
        or optimizer state in place: the trainer's step calls it before the optimizer step)."""
        staged, self._staged = self._staged, None
        if staged is None:
            return
        start = time.perf_counter()
        try:
            staged.result()
        except (Exception, CheckpointException) as e:
            p, self._pending = self._pending, None
            raise self._write_failure(e, p.step if p else -1) from e
        if self._pending is not None:
            self._pending.blocked_s += time.perf_counter() - start

    def poll(self) -> bool:
        """Whether no asynchronous save is being written or finalized any more (never blocks on one).

        The save stays "in flight" for :meth:`wait` until then, on every rank alike: whether a
        future is done is a matter of timing and differs between ranks, and the barrier in
        :meth:`wait` must be entered by all of them or none.
        """
        p = self._pending
        if p is None or p.finalized:
            return True
        start = time.perf_counter()
        if not p.future.done():
            p.blocked_s += time.perf_counter() - start
            return False
        try:
            p.future.result()  # re-raises a failed write or finalization
        except (Exception, CheckpointException) as e:
            self._pending = None
            raise self._write_failure(e, p.step) from e
        p.finalized = True
        p.blocked_s += time.perf_counter() - start  # this last poll counts too
        self._completed.append((p.step, p.blocked_s))
        return True

    def wait(self) -> None:
        """Block until an asynchronous save in flight is complete and visible on every rank.

        Collective whenever a save was started since the last wait (the same on every rank).
        """
        self.wait_staged()
        p = self._pending
        if p is None:
            return
        start = time.perf_counter()
        try:
            p.future.result()
        except (Exception, CheckpointException) as e:
            self._pending = None
            raise self._write_failure(e, p.step) from e
        self._pending = None
        _barrier()
        if not p.finalized:  # else a poll has reported it already (this wait then only meets the other ranks)
            self._completed.append((p.step, p.blocked_s + time.perf_counter() - start))

    def close(self) -> None:
        """Finish any save in flight and release the staging buffers and the finalizer thread."""
        self.wait()
        if self._finalizer is not None:
            self._finalizer.shutdown()
            self._finalizer = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _writer_group(self):
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=group_timeout())  # the job's collective timeout
        return self._group

    def _async_stager(self):
        """Staging on a thread of its own (:meth:`wait_staged`), into pinned CPU buffers on CUDA (fast
        device-to-host copies), plain copies on CPU."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda
                )
            )
        return self._stager

    def _finalize(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], files: dict[str, Path]) -> None:
        """Rank 0, after every rank's files are in ``tmp``: meta.json last, then the atomic rename."""
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        record = {"step": step, **meta, "files": file_records(tmp)}  # checked before a resume or generate
        _fsync_write(tmp / "meta.json", json.dumps(record, indent=1))
        replaced = _retire(final) if final.exists() else None  # the same step from an earlier attempt
        os.rename(tmp, final)
        _fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(_retire(old), ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove ``*.tmp`` dirs left by a kill (rank 0; they are never resumed from)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()
