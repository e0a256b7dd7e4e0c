"""Device and link specs for the planner: a small TOML table (``devices.toml``) users can extend.

Each entry gives per-GPU peaks (dense bf16/fp8 FLOP/s), the memory a process can use, and
the two links of the alpha-beta model: NVLink inside a node and the NIC between nodes
(bandwidth one way per GPU, latency alpha).
"""

from __future__ import annotations

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
    comm_overlap: bool = True
    """Whether data-parallel traffic (FSDP2 / DeepSpeed gathers and reductions) runs behind compute
    (optional; GPUs: yes, on their own streams; the CPU: no, gloo collectives are issued inline)."""


_KEYS = [f.name for f in fields(Device) if f.name != "key"]
_OPTIONAL = {"cores": 0, "comm_overlap": True}


def load_devices(extra: str | Path | None = None) -> dict[str, Device]:
    """The built-in table, updated by ``extra`` (a TOML file of the same form; its entries win)."""
    tables = tomllib.loads(BUILTIN_DEVICES.read_text())
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise ConfigError(f"device table '{path}' not found")
        for key, table in read_toml_tables(path, "device").items():
            tables[key] = {**tables.get(key, {}), **table}
    out = {}
    for key, table in tables.items():
        table = {**_OPTIONAL, **table}
        missing = [k for k in _KEYS if k not in table]
        unknown = [k for k in table if k not in _KEYS]
        if missing or unknown:
            raise ConfigError(f"device '{key}': " + "; ".join(
                part for part in (f"missing {', '.join(missing)}" if missing else "",
                                  f"unknown keys {', '.join(unknown)}" if unknown else "") if part))
        if not isinstance(table["comm_overlap"], bool):
            raise ConfigError(f"device '{key}': comm_overlap must be true or false")
        try:
            values = {k: (table[k] if k == "comm_overlap" else str(table[k]) if k == "name" else float(table[k]))
                      for k in _KEYS}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"device '{key}': a number is not a number ({e})") from None
        values["hbm_bytes"] = int(values["hbm_bytes"])
        values["cores"] = int(values["cores"])
        if values["cores"] < 0:
            raise ConfigError(f"device '{key}': cores must be 0 (one per rank) or positive")
        if min(values[k] for k in ("peak_bf16_flops", "hbm_bytes", "nvlink_bw", "internode_bw")) <= 0:
            raise ConfigError(f"device '{key}': peaks, memory and bandwidths must be positive")
        out[key] = Device(key=key, **values)
    return out


def get_device(key: str, extra: str | Path | None = None) -> Device:
    devices = load_devices(extra)
    if key not in devices:
        raise ConfigError(f"unknown device '{key}' (known: {', '.join(sorted(devices))}; add one with --devices FILE.toml)")
    return devices[key]
