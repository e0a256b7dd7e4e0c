"""Device and link specs for the planner: a small TOML table (``devices.toml``) users can extend.

Each entry gives per-GPU peaks (dense bf16/fp8 FLOP/s), the memory a process can use (and, optionally,
its bandwidth), and
the two links of the alpha-beta model: NVLink inside a node and the NIC between nodes
(bandwidth one way per GPU, latency alpha).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ConfigError, read_toml_tables

BUILTIN_DEVICES = Path(__file__).with_name("devices.toml")


@dataclass(frozen=True)
class Device:
    key: str
    """Table name, as given to ``--gpu`` (e.g. ``h100-80gb``)."""
    name: str
    """Display name (e.g. ``H100-80GB``)."""
    peak_bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    peak_fp8_flops: float
    """Dense fp8 peak, FLOP/s (0: none)."""
    hbm_bytes: int
    """Device memory a process can allocate, bytes."""
    nvlink_bw: float
    """Intra-node bandwidth per GPU, one direction, bytes/s."""
    internode_bw: float
    """Inter-node (NIC) bandwidth per GPU, one direction, bytes/s."""
    nvlink_latency: float
    """Alpha of one intra-node message, seconds."""
    internode_latency: float
    """Alpha of one inter-node message, seconds."""
    cores: int = 0
    """Compute slots per node (optional; 0: one per rank, as on GPUs). More ranks than this on a node
    time-share them: their compute and communication stretch by ranks per node / cores (the CPU)."""
    hbm_bytes_per_s: float = 0.0
    """Device memory bandwidth, bytes/s (optional; 0: unknown). With it and the device's GEMM and attention
    curves (``efficiency.toml``) compute is priced op by op (:mod:`.roofline`): memory-bound ops at this rate."""
    comm_overlap: bool = True
    """Whether data-parallel traffic (FSDP2 / DeepSpeed gathers and reductions) runs behind compute
    (optional; GPUs: yes, on their own streams; the CPU: no, gloo collectives are issued inline)."""


_KEYS = [f.name for f in fields(Device) if f.name != "key"]
_OPTIONAL = {"cores": 0, "comm_overlap": True, "hbm_bytes_per_s": 0.0}
_POSITIVE = ("peak_bf16_flops", "hbm_bytes", "nvlink_bw", "internode_bw")
"""Keys that must be above 0 (the other numbers may be 0: no fp8, zero latency, one core per rank)."""


def load_devices(extra: str | Path | None = None) -> dict[str, Device]:
    """The built-in table, updated by ``extra`` (a TOML file of the same form; its entries win)."""
    tables = tomllib.loads(BUILTIN_DEVICES.read_text())
    source = {key: "the built-in table" for key in tables}
    if extra is not None:
        path = Path(extra)
        if not path.exists():
            raise ConfigError(f"--devices: device table '{path}' not found")
        if not path.is_file():
            raise ConfigError(f"--devices: '{path}' is not a file (give a TOML file of [device] tables)")
        for key, table in read_toml_tables(path, "device").items():
            tables[key] = {**tables.get(key, {}), **table}
            source[key] = str(path)
    return {key: _device(key, table, source[key]) for key, table in tables.items()}


def _device(key: str, table: dict, source: str) -> Device:
    """One entry, every value checked: ConfigError naming the device, the key and the file."""
    where = f"device '{key}' (in {source})"
    table = {**_OPTIONAL, **table}
    missing = [k for k in _KEYS if k not in table]
    unknown = [k for k in table if k not in _KEYS]
    if missing or unknown:
        raise ConfigError(
            f"{where}: "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown keys {', '.join(unknown)} (known: {', '.join(_KEYS)})" if unknown else "",
                )
                if part
            )
        )
    values: dict = {}
    for k in _KEYS:
        v = table[k]
        if k == "comm_overlap":
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: comm_overlap must be true or false, got {v!r}")
        elif k == "name":
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{where}: name must be a non-empty string, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: {k} must be a finite number, got {v!r}")
        elif k in ("cores", "hbm_bytes") and v != int(v):
            raise ConfigError(f"{where}: {k} must be a whole number, got {v!r}")
        elif k in _POSITIVE and v <= 0:
            raise ConfigError(f"{where}: {k} must be positive, got {v!r}")
        elif v < 0:
            raise ConfigError(
                f"{where}: {k} must be 0 or positive, got {v!r}" + (" (0: one per rank)" if k == "cores" else "")
            )
        values[k] = v if k in ("comm_overlap", "name") else int(v) if k in ("cores", "hbm_bytes") else float(v)
    return Device(key=key, **values)


def get_device(key: str, extra: str | Path | None = None) -> Device:
    devices = load_devices(extra)
    if key not in devices:
        low = key.lower()
        close = [k for k in sorted(devices) if k.startswith(low)] or difflib.get_close_matches(
            low, list(devices), n=1, cutoff=0.75
        )
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown device '{key}' for --gpu ({hint}known: {', '.join(sorted(devices))}; add one "
            "with --devices FILE.toml)"
        )
    return devices[key]
