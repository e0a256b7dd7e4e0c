"""What ``meshforge train`` prints about memory: the planner's prediction for its own layout at
start, then what the run measures, so that every run checks the planner.

The prediction is passed in (``train(cfg, memory_plan=...)``: the command passes
:func:`meshforge.plan.planner.predict_run_memory`), so that training does not import the planner.

Measured over step 2 (step 1 allocates the optimizer state and warms the allocators):

- GPU: ``torch.cuda.max_memory_allocated`` over the step (reset after step 1) -- the whole
  per-GPU peak, compared with the predicted total; and its part above the memory at rest
  after step 1 (parameters + optimizer state), compared with the predicted activations.
- both: the same peak up to the optimizer step (a step pre-hook on the optimizer), compared
  with the predicted backward peak (activations + communication buffers + gradients if they
  already exist then);
- CPU: the peak resident set size of the process over the step (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``) above the resident size at the end of step 1. The
  interpreter and libraries make the process's own peak RSS no memory prediction, so only
  this step peak is compared (with the predicted activations). glibc keeps freed small
  blocks in its heap, so for a tight number start the ranks with ``MALLOC_MMAP_THRESHOLD_``
  set (bench/bench_plan_memory.py uses 65536).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import JobConfig

MemoryPlan = Callable[[JobConfig, int, int, str], dict[str, int]]
"""``memory_plan(cfg, world_size, rank, device_type)``: the planner's prediction for this rank (bytes by part,
with ``backward`` and ``step`` peaks)."""
GIB = 2**30


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Prediction at construction; ``after_step()`` (after each step) returns the measured metrics once,
    after the second step of this process (``{}`` otherwise)."""

    def __init__(
        self, cfg: JobConfig, degrees, rank: int, device, optimizer=None, memory_plan: MemoryPlan | None = None
    ):
        self.device = device
        self.backward_peak = -1
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            optimizer.register_step_pre_hook(self._before_optimizer_step)
        self.rank = rank
        self.predicted: dict[str, int] | None = None
        self.baseline = 0
        self.calls = 0
        self.error = "no memory plan was given"
        if memory_plan is not None:
            try:
                self.predicted = memory_plan(cfg, degrees.world_size, rank, device.type)
            except Exception as e:  # a prediction must never stop a run
                self.error = f"{type(e).__name__}: {e}"

    def _peak_now(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024

    def _before_optimizer_step(self, *args) -> None:
        if self.calls == 1 and self.baseline >= 0 and self.backward_peak < 0:  # within the measured step
            self.backward_peak = self._peak_now()

    def start_line(self) -> str:
        if self.predicted is None:
            return f"memory plan: no prediction for this job ({self.error})"
        p = self.predicted
        return (
            f"memory plan (rank {self.rank}): params {p['params'] / GIB:.3f} + grads {p['grads'] / GIB:.3f} + "
            f"optimizer {p['optimizer'] / GIB:.3f} + activations {p['activations'] / GIB:.3f} + comm buffers "
            f"{p['comm_buffers'] / GIB:.3f} = {p['total'] / GIB:.3f} GiB"
        )

    def after_step(self) -> dict:
        import torch

        self.calls += 1
        step = self.calls
        cuda = self.device.type == "cuda"
        if step == 1:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.baseline = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                self.baseline = _status_kib("VmRSS") * 1024 if _reset_cpu_peak() else -1
            return {}
        if step != 2 or self.baseline < 0:
            return {}
        peak = self._peak_now()
        out = {"mem_step_peak_bytes": peak - self.baseline}
        if cuda:
            out["mem_peak_bytes"] = peak
        if self.backward_peak >= 0:
            out["mem_backward_peak_bytes"] = self.backward_peak - self.baseline
        if self.predicted is not None:
            p = self.predicted
            out["mem_predicted_activations"] = p["activations"]
            out["mem_predicted_backward"] = p["backward"]
            out["mem_predicted_step"] = p["step"]
            out["mem_predicted_total"] = p["total"]
        return out

    def measured_line(self, rec: dict) -> str:
        if not rec:
            return ""
        parts = [f"memory measured at step 2 (rank {self.rank}):"]
        if "mem_peak_bytes" in rec:
            parts.append(
                f"peak allocated {rec['mem_peak_bytes'] / GIB:.3f} GiB"
                + (f" (predicted {rec['mem_predicted_total'] / GIB:.3f})" if "mem_predicted_total" in rec else "")
                + ";"
            )
        parts.append(
            f"step peak above the state at rest {rec['mem_step_peak_bytes'] / GIB:.3f} GiB"
            + (f" (predicted {rec['mem_predicted_step'] / GIB:.3f})" if "mem_predicted_step" in rec else "")
        )
        if "mem_backward_peak_bytes" in rec:
            parts.append(
                f"; up to the optimizer step {rec['mem_backward_peak_bytes'] / GIB:.3f} GiB"
                + (
                    f" (predicted backward peak {rec['mem_predicted_backward'] / GIB:.3f})"
                    if "mem_predicted_backward" in rec
                    else ""
                )
            )
        return " ".join(parts)
