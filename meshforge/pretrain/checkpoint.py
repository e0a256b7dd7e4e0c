"""Checkpoints: written atomically with ``torch.distributed.checkpoint``, resumed exactly.

Layout of ``<output_dir>/checkpoints/``::

    step_00000100/          a complete checkpoint
        .metadata, *.distcp  model + optimizer (DCP, sharded by whatever layout saved it)
        rng_rank<r>.pt       each rank's RNG states
        tokenizer.model      the tokenizer, so the directory is self-contained
        meta.json            written last: step, scheduler, loader position, config, run identity,
                             and "files": the size (and, up to 256 MiB, the sha256) of every other file
    step_00000200.tmp/      being written (or left by a kill): never resumed from

A checkpoint is written into ``step_N.tmp``; when every rank has finished, rank 0 writes
``meta.json`` there, syncs it, and renames the directory to ``step_N`` -- one atomic
``rename``. Only directories named ``step_<digits>`` holding ``meta.json`` and
``.metadata`` count as checkpoints. Deleting one (keep-last-k pruning, or replacing a
checkpoint of the same step) first renames it to ``step_N.deleting.tmp``, so a kill during
the deletion cannot leave a half-deleted directory that still looks complete.

Before a checkpoint is resumed from (or generated from), its files are checked against the
sizes and checksums meta.json recorded. A damaged one is never skipped silently: the run
stops with a message naming the bad file and the intact checkpoints, one of which
``--checkpoint.resume_from`` picks.

Asynchronous saving (``checkpoint.async_save``) keeps that protocol: the step is blocked only
while the state is copied into CPU staging buffers; a background thread writes the ``.tmp``
directory (DCP's collectives run on a separate gloo group, so they never interleave with the
training's), and rank 0 finalizes -- meta.json, rename, prune -- on the main thread once the
write has finished (:meth:`Checkpointer.poll`, :meth:`Checkpointer.wait`). A kill at any
point leaves at most a ``.tmp`` directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..errors import MeshforgeError

from .checkpoint_files import file_records, unreadable, verify_checkpoint
from .output_dir import find_os_error, storage_error

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(MeshforgeError, ValueError):
    """A checkpoint that cannot be used, or an output dir that belongs to another run."""


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


def is_complete(path: Path) -> bool:
    return bool(CHECKPOINT_RE.match(path.name)) and (path / "meta.json").is_file() and (path / ".metadata").is_file()


def is_init_dir(path: Path) -> bool:
    """A complete weights directory under another name: ``meshforge convert import`` / ``grow`` output."""
    return (not path.name.endswith(".tmp") and not CHECKPOINT_RE.match(path.name) and (path / "meta.json").is_file()
            and (path / ".metadata").is_file())


def _retire(path: Path) -> Path:
    """Rename a complete checkpoint out of the way before deleting it (one atomic rename), so a kill
    during the deletion leaves a ``*.tmp`` directory, never a half-deleted ``step_N`` that looks complete."""
    gone = path.with_name(f"{path.name}.deleting.tmp")
    if gone.exists():
        shutil.rmtree(gone, ignore_errors=True)
    os.rename(path, gone)
    _fsync_dir(path.parent)
    return gone


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({e})") from None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint (or an init dir), else the newest checkpoint under an output dir."""
    p = Path(path)
    if is_complete(p) or is_init_dir(p):
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    raise CheckpointError(f"{p} is neither a complete checkpoint nor an output dir holding one")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _PendingSave:
    """An asynchronous save whose files are still being written."""

    step: int
    tmp: Path
    final: Path
    meta: dict[str, Any]
    files: dict[str, Path]
    future: Future
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
                raise CheckpointError(f"checkpoint.resume_from = {resume_from} is not a complete checkpoint (a "
                                      "step_NNNNNNNN dir holding meta.json and .metadata)")
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
        try:
            return self._save(step, model, optimizer, meta, files, engine)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._write_failure(e, step) from e

    def _write_failure(self, error: BaseException, step: int) -> BaseException:
        """A failed write of checkpoint ``step``: a one-line OutputError when the file system said why
        (disk full, quota, read-only); the partial ``.tmp`` dir is removed to give the space back."""
        os_error = find_os_error(error)
        if os_error is None:
            return error
        if self.rank == 0:
            shutil.rmtree(self.root / f"step_{step:08d}.tmp", ignore_errors=True)
        newest = self.latest()
        kept = (f"; the newest complete checkpoint, {newest.name}, is intact and a rerun resumes from it" if newest
                else "; no checkpoint of this run is complete yet")
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
            dcp.save({"model": full_model_state_dict(engine)}, checkpoint_id=str(tmp))
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._writer_group(),
                                        async_stager=self._async_stager())
                self._pending = _PendingSave(step, tmp, final, meta, dict(files or {}), future)
                return final
            dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if self.rank == 0:
            self._finalize(step, tmp, final, meta, files or {})
        _barrier()
        return final

    def poll(self) -> bool:
        """Finalize a finished asynchronous save early (rank 0 renames it); True if none is in flight.

        Needs no collective: DCP's future completes on every rank only after the coordinator
        has written ``.metadata``, i.e. after all ranks' data is on disk. The save stays
        "in flight" for :meth:`wait` until then, on every rank alike: whether a future is done
        is a matter of timing and differs between ranks, and the barrier in :meth:`wait` must
        be entered by all of them or none.
        """
        p = self._pending
        if p is None or p.finalized:
            return True
        if not p.future.done():
            return False
        try:
            p.future.result()  # re-raises a failed write
            if self.rank == 0:
                self._finalize(p.step, p.tmp, p.final, p.meta, p.files)
        except (Exception, CheckpointException) as e:
            self._pending = None
            raise self._write_failure(e, p.step) from e
        p.finalized = True
        return True

    def wait(self) -> None:
        """Block until an asynchronous save in flight is complete and visible on every rank.

        Collective whenever a save was started since the last wait (the same on every rank).
        """
        if self._pending is None:
            return
        try:
            self._pending.future.result()
        except (Exception, CheckpointException) as e:
            step, self._pending = self._pending.step, None
            raise self._write_failure(e, step) from e
        self.poll()
        self._pending = None
        _barrier()

    def close(self) -> None:
        """Finish any save in flight and release the staging buffers."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _writer_group(self):
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _async_stager(self):
        """Staging into pinned CPU buffers on CUDA (fast device-to-host copies), plain copies on CPU."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    engine=None) -> dict:
    """Load model + optimizer (any saved layout; a DeepSpeed ``engine``: the same layout) and this rank's RNG; return meta.json."""
    meta = read_meta(path)
    with unreadable(path, "--checkpoint.resume_from DIR"):
        if engine is not None:
            from ..parallel.deepspeed_engine import load_engine

            load_engine(engine, path)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def check_resume_backend(path: Path | None, dp_backend: str, zero_stage: int, world_size: int) -> None:
    """Refuse, before any process group, a resume the data-parallel backend cannot do.

    FSDP2 and DeepSpeed checkpoints hold their optimizer state in different formats, and a
    DeepSpeed checkpoint's ZeRO partitions belong to the dp degree and stage that wrote it.
    """
    if path is None:
        return
    saved = read_meta(path).get("config", {}).get("parallel", {})
    backend = saved.get("dp_backend", "fsdp2")
    if backend != dp_backend:
        raise CheckpointError(
            f"checkpoint {path} was written with parallel.dp_backend = '{backend}' and cannot be resumed with "
            f"'{dp_backend}' (their optimizer states differ); resume with parallel.dp_backend = '{backend}' or choose "
            "another train.output_dir (its model weights stay readable, e.g. by `meshforge generate`)"
        )
    if backend == "deepspeed":
        meta = read_meta(path)
        theirs = (meta.get("world_size"), saved.get("zero_stage"))
        if theirs != (world_size, zero_stage):
            raise CheckpointError(
                f"DeepSpeed checkpoint {path} was written by {theirs[0]} ranks with ZeRO stage {theirs[1]}; "
                f"resuming it needs the same layout (here {world_size} ranks, stage {zero_stage})"
            )


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint (for generation or evaluation)."""
    sd = get_model_state_dict(model, options=StateDictOptions())
    state = {"model": sd}
    with unreadable(path, "--checkpoint DIR"):  # DCP raises several types for missing/mismatched/garbled entries
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def check_init(path: str | Path, model: torch.nn.Module) -> Path:
    """The weights directory of ``checkpoint.init_from``, after checking it fits ``model``
    (a model built on the meta device is enough): complete, and every weight of the model
    present with the model's shape. Raises CheckpointError before anything is written."""
    from torch.distributed.checkpoint import FileSystemReader

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint.init_from = {str(path)!r} is not a directory")
    if not is_complete(p) and not ((p / "meta.json").is_file() and (p / ".metadata").is_file()):
        try:
            p = find_checkpoint(p)
        except CheckpointError:
            raise CheckpointError(f"checkpoint.init_from = {str(path)!r} holds no complete checkpoint (no meta.json "
                                  "and .metadata: still being written, or not a checkpoint)") from None
    md = FileSystemReader(str(p)).read_metadata().state_dict_metadata
    wrong = []
    for name, t in model.state_dict().items():
        entry = md.get(f"model.{name}")
        if entry is None or tuple(getattr(entry, "size", ())) != tuple(t.shape):
            have = None if entry is None else tuple(entry.size)
            wrong.append(f"{name}: {have} there vs {tuple(t.shape)} here")
    if wrong:
        raise CheckpointError(f"checkpoint.init_from = {str(path)!r} does not fit model config ({len(wrong)} weight(s) "
                              f"differ, e.g. {wrong[0]}); use the preset written next to it (model.toml)")
    return p
