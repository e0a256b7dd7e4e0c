"""How long a sweep's runs take: each row's steps times a step time on a named device.

The step time is the planner's time model (:func:`meshforge.plan.time_model.estimate_time`:
compute at a fraction of the device's peak plus the layout's exposed communication) for the
row's config on ``gpus`` devices of one node, in the layout the config describes (its
``[parallel]`` section; by default FSDP2 over all of them), plus a per-step software cost the
model leaves out (Python, kernel launches, the optimizer's many small tensors): it dominates a
small model's step. With a measured rate instead (``tokens_per_s``), a run takes D / rate.
Neither counts evaluation, checkpoints, data preparation or start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ..config import ConfigError, config_from_dict

CPU_STEP_OVERHEAD_S = 0.032
"""Per-step cost beyond the time model on the ``cpu`` device: the median over the 19 runs of the CPU
ladder (``docs/scaling/results.csv``, 1.3-18 ms of modelled compute per step, 26-69 ms measured;
two runs at a time on the shared 2-core box, load 5-7). No GPU figure has been measured: 0 there."""
SMALL_STEP_S = 0.01
"""Below this much modelled time per step, software cost decides a step's time (see the note printed)."""


@dataclass(frozen=True)
class RunEstimate:
    seconds: float
    gpu_hours: float
    model_step_s: float = 0.0
    """The time model's step (0 with a measured rate)."""


@dataclass(frozen=True)
class Estimator:
    """Step times of sweep rows on ``gpus`` x ``device`` (a key of the planner's device table)."""

    device: str = "h100-80gb"
    gpus: int = 1
    efficiency: float | None = None
    """A flat fraction of peak for the matmuls; None: ``meshforge plan``'s default (compute priced op by op:
    GEMMs and attention at the device's curves in ``plan/efficiency.toml``, memory-bound ops at its bandwidth;
    a flat 0.5 of peak on a device without them)."""
    tokens_per_s: float = 0.0
    """A measured training rate (tokens/s of one run); 0: the planner's time model."""
    devices_file: str | None = None
    step_overhead_s: float | None = None
    """Per-step software cost added to the model's step; None: CPU_STEP_OVERHEAD_S on ``cpu``, else 0."""

    @property
    def overhead_s(self) -> float:
        if self.step_overhead_s is not None:
            return self.step_overhead_s
        return CPU_STEP_OVERHEAD_S if self.device == "cpu" else 0.0

    def check(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus (GPUs per run) must be at least 1, got {self.gpus}")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise ConfigError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if not (self.tokens_per_s >= 0 and math.isfinite(self.tokens_per_s)):
            raise ConfigError(
                f"--tokens-per-s must be a positive rate (or 0 for the time model), got {self.tokens_per_s}"
            )
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            raise ConfigError(f"--step-overhead-ms must be 0 or more, got {self.overhead_s * 1e3}")
        _ = self._device  # ConfigError for an unknown device or a bad --devices file

    @cached_property
    def _device(self):
        """The device's entry, read once (every row's estimate uses it)."""
        from ..plan.devices import get_device

        return get_device(self.device, self.devices_file)

    def describe(self) -> str:
        if self.tokens_per_s:
            return f"at a measured {self.tokens_per_s:,.0f} tokens/s per run on {self.gpus} GPU(s)"
        d = self._device
        at = (
            f"at {self.efficiency:.0%} of peak"
            if self.efficiency is not None
            else "with compute priced op by op at each run's shapes"
        )
        return (
            f"on {self.gpus} x {d.name} per run: the planner's time model {at} "
            f"+ {self.overhead_s * 1e3:g} ms per step of software cost (no evaluation, checkpoints or start-up)"
        )

    def notes(self, estimates: list[RunEstimate]) -> list[str]:
        """What makes the estimate a lower bound: small steps with no per-step cost counted."""
        small = [e for e in estimates if 0 < e.model_step_s < SMALL_STEP_S]
        if not small or self.overhead_s or self.tokens_per_s:
            return []
        return [
            f"{len(small)} of {len(estimates)} runs model under {SMALL_STEP_S * 1e3:g} ms per step: there "
            "per-step software cost (Python, kernel launches) decides, and no figure for it on this device is "
            "known, so these times are lower bounds; train a few steps of one row, then pass its tokens/s "
            "(--tokens-per-s) or its extra ms per step (--step-overhead-ms)"
        ]

    def row(self, row: dict) -> RunEstimate:
        """The time of one sweep row (its ``D`` tokens in ``steps`` steps of its config)."""
        step = 0.0
        if self.tokens_per_s:
            seconds = row["D"] / self.tokens_per_s
        else:
            from ..plan.planner import layout_of_config
            from ..plan.time_model import estimate_time

            cfg = config_from_dict(row["config"])
            device = self._device
            try:
                layout = layout_of_config(cfg, self.gpus)
            except ConfigError as e:
                raise ConfigError(
                    f"--gpus {self.gpus}: the estimate runs each row on {self.gpus} device(s) in "
                    f"the layout of its config, which refuses: {e}"
                ) from None
            step = estimate_time(cfg, layout, device, self.gpus, self.efficiency).step_s
            seconds = row["steps"] * (step + self.overhead_s)
        return RunEstimate(seconds, seconds * self.gpus / 3600, step)


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``, ``4.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
