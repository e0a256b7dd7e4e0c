"""Sharded safetensors files written tensor by tensor, and read lazily.

A safetensors file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte offsets; padded with spaces to a multiple of 8), then the raw tensor
bytes in header order. Because the header only needs names, shapes and dtypes, a shard can
be written before its tensors exist: :class:`ShardWriter` writes the header of a planned
shard, then each tensor's bytes as the caller produces it, so at most one tensor is held
in memory (``safetensors.torch.save_file`` would need the whole shard, copied once more).

Shard names follow Hugging Face: ``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json`` (``model.safetensors`` alone when there is one shard).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MeshforgeError

DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
}
"""torch dtype -> safetensors dtype name."""


class ConvertError(MeshforgeError, ValueError):
    """Input that cannot be converted (unknown architecture, missing shard, unrepresentable feature, ...)."""


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known by name, shape and dtype before its values are read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Writes one planned shard: the header at once, then each tensor in plan order."""

    def __init__(self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in plan:
            header[t.name] = {
                "dtype": DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._plan = list(plan)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._plan[self._next]
        if name != want.name or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RuntimeError(f"shard writer expected {want}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            missing = [t.name for t in self._plan[self._next :]]
            raise RuntimeError(f"shard closed before tensors {missing[:3]} were written")
        self._file.flush()
        self._file.close()


def write_index(directory: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    if len(names) == 1:
        return
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size (ConvertError naming the file)."""
    size = path.stat().st_size
    how = "re-download or re-save it (save_pretrained)"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (None,)
            if n is None or n > size - 8 or n > 100 << 20:
                raise ConvertError(f"{path} is not a safetensors file (its {size} bytes hold no valid header); {how}")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, struct.error):
        raise ConvertError(f"{path} is not a safetensors file (its header is not JSON); {how}") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path} is not a safetensors file (its header is not a table of tensors); {how}")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
        except (TypeError, KeyError, ValueError):
            raise ConvertError(f"{path}: the header entry of {name!r} has no shape / data_offsets; {how}") from None
        if not 0 <= start <= stop:
            raise ConvertError(f"{path}: tensor {name!r} has byte range [{start}, {stop}); {how}")
        info["shape"], end = shape, max(end, stop)
    if 8 + n + end > size:
        raise ConvertError(f"{path} is truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}; {how}")
    return header


class SafetensorsDir:
    """The tensors of a Hugging Face model directory, read lazily (memory-mapped) by name."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._headers: dict[str, dict] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise ConvertError(
                    f"{index} is not a safetensors index (JSON with a weight_map); re-download it"
                ) from None
        elif (self.dir / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in self.header("model.safetensors")}
        else:
            raise ConvertError(
                f"{self.dir} holds no model.safetensors nor model.safetensors.index.json "
                "(only safetensors weights are read; re-save the model with save_pretrained)"
            )
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise ConvertError(
                f"{self.dir}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json "
                "are missing; copy the complete model directory"
            )
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, object] = {}

    def header(self, fname: str) -> dict:
        """The checked header of the file ``fname`` of this directory (:func:`safetensors_header`, read once)."""
        if fname not in self._headers:
            self._headers[fname] = safetensors_header(self.dir / fname)
        return self._headers[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ConvertError(f"{self.dir} has no tensor {name!r}")
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = safe_open(self.dir / fname, "pt")
        return self._open[fname].get_tensor(name)  # type: ignore[attr-defined]
