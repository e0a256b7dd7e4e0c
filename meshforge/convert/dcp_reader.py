"""Read a meshforge checkpoint's model weights in one CPU process, a few tensors at a time.

Every layout writes the same thing to DCP: ``model.<name>`` entries with the model's full
(global) shapes, however they were sharded -- FSDP2 and TP as DTensor shards, pipeline
stages each with their own layers (names keep the layer index), expert parallel as shards
of the stacked expert weights, and DeepSpeed ZeRO as the full fp32 weights gathered at save
time (next to the engine's own files). DCP's ``.metadata`` lists every entry with its shape
and dtype, so :class:`CheckpointReader` can plan the output before reading anything, and
``dcp.load`` of a small state dict (``no_dist``: no process group, any saved world size)
reassembles just the tensors asked for from whatever shards hold them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..config import JobConfig, config_from_dict
from ..pretrain import dcp_io
from ..pretrain.checkpoint import CHECKPOINT_RE, CheckpointError, find_checkpoint
from ..pretrain.checkpoint_files import unreadable, verify_checkpoint

PREFIX = "model."


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """The checkpoint to convert: ``path`` itself, its ``step`` (or newest) checkpoint, or an init dir.

    A checkpoint still being written (``step_N.tmp``, or a directory without ``meta.json``
    or ``.metadata``) is refused with a message saying so.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if step is not None:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = root / f"step_{step:08d}"
        if not p.exists():
            if (root / f"step_{step:08d}.tmp").exists():
                raise CheckpointError(
                    f"checkpoint {p} is still being written (only {p.name}.tmp exists); wait for the save to finish"
                )
            have = sorted(q.name for q in root.glob("step_*") if CHECKPOINT_RE.match(q.name))
            raise CheckpointError(f"no checkpoint of step {step} under {root} (have: {', '.join(have) or 'none'})")
    if p.name.endswith(".tmp") or ((p / ".metadata").exists() and not (p / "meta.json").is_file()):
        raise CheckpointError(
            f"checkpoint {p} is still being written or was interrupted (no meta.json yet); use a complete checkpoint"
        )
    if (p / "meta.json").is_file() and (p / ".metadata").is_file():
        return p  # a step_N checkpoint, or an init dir written by `convert import` / `convert grow`
    return find_checkpoint(p)


class CheckpointReader:
    """Names, shapes, dtypes and values of one checkpoint's model weights."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = verify_checkpoint(self.path, "--checkpoint DIR")  # sizes and checksums, as train and generate do
        if "config" not in self.meta:
            raise CheckpointError(f"checkpoint {self.path} has no config in meta.json")
        self.config: JobConfig = config_from_dict(self.meta["config"])
        with unreadable(self.path, "--checkpoint DIR"):
            md = FileSystemReader(str(self.path)).read_metadata()
        self.entries: dict[str, TensorStorageMetadata] = {
            k[len(PREFIX) :]: v
            for k, v in md.state_dict_metadata.items()
            if k.startswith(PREFIX) and isinstance(v, TensorStorageMetadata)
        }
        if not self.entries:
            raise CheckpointError(f"checkpoint {self.path} holds no model weights")

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name).size)

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).properties.dtype

    def _entry(self, name: str) -> TensorStorageMetadata:
        if name not in self.entries:
            raise CheckpointError(f"checkpoint {self.path} has no model weight {name!r}")
        return self.entries[name]

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors ``names`` (in their saved dtype), read from whichever shards hold them."""
        state = {PREFIX + n: torch.empty(self.shape(n), dtype=self.dtype(n)) for n in names}
        with unreadable(self.path, "--checkpoint DIR"):
            dcp_io.load(state, self.path, alone=True)
        return {n: state[PREFIX + n] for n in names}

    def get(self, name: str) -> torch.Tensor:
        return self.load([name])[name]

    def layout(self) -> str:
        """The parallel layout the checkpoint was written with, in words."""
        p = self.meta["config"].get("parallel", {})
        world = self.meta.get("world_size", 1)
        if p.get("dp_backend") == "deepspeed":
            return f"DeepSpeed ZeRO-{p.get('zero_stage')} on {world} rank(s)"
        parts = [f"{k}={p[k]}" for k in ("pp", "tp", "ep", "dp_replicate") if p.get(k, 1) > 1]
        return f"{world} rank(s)" + (
            f" ({', '.join(parts)}, rest FSDP2)" if parts else (" (FSDP2)" if world > 1 else " (single process)")
        )
