"""Checkpoints: the format, finding one, and loading it (any layout), resumed exactly.

Layout of ``<output_dir>/checkpoints/``::

    step_00000100/          a complete checkpoint
        .metadata, *.distcp  model + optimizer (DCP, sharded by whatever layout saved it)
        rng_rank<r>.pt       each rank's RNG states
        tokenizer.model      the tokenizer, so the directory is self-contained
        deepspeed/           a DeepSpeed run only: the engine's own files (the DCP part holds full fp32 weights)
        meta.json            written last: step, scheduler, loader position, config, run identity,
                             and "files": the size (and, up to 256 MiB, the sha256) of every other file
    step_00000200.tmp/      being written (or left by a kill): never resumed from

Only directories named ``step_<digits>`` holding ``meta.json`` and ``.metadata`` count as
checkpoints. They are written atomically by :class:`~meshforge.pretrain.checkpoint_writer.Checkpointer`
(``step_N.tmp``, then one rename; synchronously or in the background).

Before a checkpoint is resumed from (or generated from), its files are checked against the
sizes and checksums meta.json recorded (:mod:`meshforge.pretrain.checkpoint_files`). A
damaged one is never skipped silently: the run stops with a message naming the bad file and
the intact checkpoints, one of which ``--checkpoint.resume_from`` picks.

Names are the single-process model's under every layout, so :func:`load_checkpoint` and
:func:`load_model_weights` load any layout's checkpoint into any other (DCP reshards); a
DeepSpeed checkpoint's optimizer state resumes only under the layout that wrote it
(:func:`check_resume_backend`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError
from . import dcp_io
from .checkpoint_files import unreadable

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


def is_complete(path: Path) -> bool:
    return bool(CHECKPOINT_RE.match(path.name)) and (path / "meta.json").is_file() and (path / ".metadata").is_file()


def is_init_dir(path: Path) -> bool:
    """A complete weights directory under another name: ``meshforge convert import`` / ``grow`` output."""
    return (
        not path.name.endswith(".tmp")
        and not CHECKPOINT_RE.match(path.name)
        and (path / "meta.json").is_file()
        and (path / ".metadata").is_file()
    )


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


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    load_state: Callable[[Path], None] | None = None,
) -> dict:
    """Load model + optimizer (any saved layout; ``load_state(path)`` instead: a step backend's own files, such as
    the DeepSpeed engine's in the same layout) and this rank's RNG; return meta.json."""
    meta = read_meta(path)
    with unreadable(path, "--checkpoint.resume_from DIR"):
        if load_state is not None:
            load_state(path)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp_io.load(state, path)
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
        dcp_io.load(state, path)
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
            raise CheckpointError(
                f"checkpoint.init_from = {str(path)!r} holds no complete checkpoint (no meta.json "
                "and .metadata: still being written, or not a checkpoint)"
            ) from None
    md = FileSystemReader(str(p)).read_metadata().state_dict_metadata
    wrong = []
    for name, t in model.state_dict().items():
        entry = md.get(f"model.{name}")
        if entry is None or tuple(getattr(entry, "size", ())) != tuple(t.shape):
            have = None if entry is None else tuple(entry.size)
            wrong.append(f"{name}: {have} there vs {tuple(t.shape)} here")
    if wrong:
        raise CheckpointError(
            f"checkpoint.init_from = {str(path)!r} does not fit model config ({len(wrong)} weight(s) "
            f"differ, e.g. {wrong[0]}); use the preset written next to it (model.toml)"
        )
    return p
