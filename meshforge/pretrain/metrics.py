"""Per-step metrics: ``<output_dir>/metrics.jsonl`` and TensorBoard, MFU and tokens/s.

On resume from step k the JSONL file keeps lines with ``step <= k`` only (rewritten
atomically) and TensorBoard purges later events, so a resumed run's logs read like an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s (no sparsity) by device-name substring, first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),  # checked before the SXM entry: the names share "H100"
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


class MetricsLogger:
    """Writes one JSON object per step and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: drop it and what follows
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
