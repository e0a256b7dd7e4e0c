"""Checkpoints: written atomically with ``torch.distributed.checkpoint``, resumed exactly.

Layout of ``<output_dir>/checkpoints/``::

    step_00000100/          a complete checkpoint
        .metadata, *.distcp  model + optimizer (DCP, sharded by whatever layout saved it)
        rng_rank<r>.pt       each rank's RNG states
        tokenizer.model      the tokenizer, so the directory is self-contained
        meta.json            written last: step, scheduler, loader position, config, run identity
    step_00000200.tmp/      being written (or left by a kill): never resumed from

A checkpoint is written into ``step_N.tmp``; when every rank has finished, rank 0 writes
``meta.json`` there, syncs it, and renames the directory to ``step_N`` -- one atomic
``rename``. Only directories named ``step_<digits>`` holding ``meta.json`` and
``.metadata`` count as checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
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


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({e})") from None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest checkpoint under an output dir."""
    p = Path(path)
    if is_complete(p):
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


class Checkpointer:
    """Saves, prunes and finds the checkpoints of one output dir."""

    def __init__(self, output_dir: str | Path, keep_last: int, rank: int = 0):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def check_identity(self, identity: dict[str, Any], resume: bool) -> Path | None:
        """The checkpoint to resume from, after refusing an output dir of another run.

        Raises CheckpointError (before anything is written) when the newest checkpoint was
        made by a run with a different model/data/seed, or when checkpoints exist and
        resuming is off (they would be overwritten).
        """
        latest = self.latest()
        if latest is None:
            return None
        theirs = read_meta(latest).get("identity", {})
        diff = [f"{k}: {theirs.get(k)!r} there vs {v!r} here" for k, v in identity.items() if theirs.get(k) != v]
        if diff:
            raise CheckpointError(
                f"output dir {self.root.parent} holds checkpoints of a different run ({'; '.join(diff[:4])}); "
                "choose another train.output_dir"
            )
        if not resume:
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

        With a DeepSpeed ``engine`` (``model``/``optimizer`` unused), the engine writes its own
        files into ``deepspeed/`` and DCP gets the full fp32 weights under ``model``, so every
        reader of model weights works unchanged.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        if engine is not None:
            from ..parallel.deepspeed_engine import full_model_state_dict, save_engine

            save_engine(engine, tmp)
            dcp.save({"model": full_model_state_dict(engine)}, checkpoint_id=str(tmp))
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            for name, src in (files or {}).items():
                shutil.copyfile(src, tmp / name)
            _fsync_write(tmp / "meta.json", json.dumps({"step": step, **meta}, indent=1))
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

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
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several types for missing/mismatched entries
        raise CheckpointError(f"checkpoint {path} does not match the model: {e}") from None
    set_model_state_dict(model, state["model"])
