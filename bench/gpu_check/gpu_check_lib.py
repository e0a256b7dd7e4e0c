"""What the GPU check's driver and its cases share: the case table, the context a case runs in,
how a case says it was skipped, and how it states a checked number with its tolerance.

A case is a function ``fn(ctx) -> dict`` in one of the ``gpu_check_*`` modules (or
``hf_peer``). It returns ``{"figures": {name: number | str}, "checks": [check(...), ...],
"note": str}``; it raises :class:`Skip` with the reason when it cannot run here. Its status is
``ok`` when every check passes, ``failed`` when one does not, ``error`` on an exception,
``timeout`` past its cap, ``skipped`` with a reason.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


class Skip(Exception):
    """The case cannot run on this machine or in this build; the message says why."""


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    """``correctness``, ``speed``, ``kernels``, ``peer`` or ``selftest`` (never in the default list)."""
    func: str
    """``module:function`` in bench/gpu_check/ or bench/."""
    cap_s: float
    """Time cap on a GPU machine (compile included)."""
    what: str
    """One line for the report."""
    option: tuple[str, str] | None = None
    """A config key (and the value the case sets) that not every build has: unknown -> skipped."""
    needs: tuple[str, ...] = ()
    """Python modules the case needs; missing -> skipped (carry their wheels to the GPU machine)."""
    dry_cap_s: float = 60.0
    """Time cap of the --dry run (CPU, tiny shapes)."""


GB = 2**30
ONE_B = "1b"
FLOAT8 = ("train.float8", "tensorwise")
FUSED_KERNELS = ("train.fused_kernels", "triton")

CASES: list[Case] = [
    Case(
        "compile",
        "correctness",
        "gpu_check_correct:compile_case",
        150,
        "small preset, 20 steps, fp32: per-block torch.compile vs eager (per-step loss)",
    ),
    Case(
        "bf16",
        "correctness",
        "gpu_check_correct:bf16_case",
        60,
        "small preset, 20 steps, eager: bf16 autocast vs fp32 (per-step loss)",
    ),
    Case(
        "flex_doc_mask",
        "correctness",
        "gpu_check_correct:flex_case",
        120,
        "document mask: FlexAttention (compiled) vs the dense SDPA mask, loss and gradients, fp32",
    ),
    Case(
        "grouped_mm",
        "correctness",
        "gpu_check_correct:grouped_mm_case",
        45,
        "MoE experts: torch._grouped_mm (bf16) vs the per-expert loop (fp32), outputs and gradients",
    ),
    Case(
        "fused_loss",
        "correctness",
        "gpu_check_correct:fused_loss_case",
        45,
        "fused linear + cross-entropy vs plain logits + loss, fp32, values and gradients",
    ),
    Case(
        "float8_loss",
        "correctness",
        "gpu_check_correct:float8_loss_case",
        90,
        "llama-100m, 50 steps: float8 (torchao, tensorwise) vs bf16 (per-step loss)",
        option=FLOAT8,
        needs=("torchao",),
    ),
    Case(
        ONE_B,
        "speed",
        "gpu_check_speed:one_b_case",
        150,
        "llama-1b (Llama architecture: qk_norm off), seq 4096, bf16, per-block compile, no AC, train.fused_loss auto",
    ),
    Case(
        "peer",
        "peer",
        "hf_peer:peer_case",
        150,
        "the same 1B architecture and batch in a bare loop around transformers' LlamaForCausalLM "
        "(SDPA, bf16 autocast, fused AdamW, per-layer torch.compile)",
        needs=("transformers",),
        dry_cap_s=90,
    ),
    Case(
        "peers",
        "peer",
        "bench_peers:peers_case",
        150,
        "bench_peers.py's comparison on the GPU: meshforge vs the bare HF loop (and litgpt when importable), "
        "28m shape, batch 32 x 128, bf16 autocast, AdamW foreach, eager and compiled; ratio = peer / meshforge "
        "step time",
        needs=("transformers",),
        dry_cap_s=90,
    ),
    Case(
        "1b-fused-loss",
        "speed",
        "gpu_check_speed:fused_loss_toggle_case",
        90,
        "as 1b with train.fused_loss the other way (on if auto chose off)",
    ),
    Case(
        "compile_model",
        "speed",
        "gpu_check_speed:compile_model_case",
        210,
        "as 1b with parallel.compile_scope = model: the whole forward + loss compiled as one graph (compile "
        "time in first_step_s)",
        option=("parallel.compile_scope", "model"),
    ),
    Case(
        "1b-float8",
        "speed",
        "gpu_check_speed:float8_case",
        120,
        "as 1b with float8 matmuls (torchao, tensorwise scaling)",
        option=FLOAT8,
        needs=("torchao",),
    ),
    Case(
        "1b-fused-kernels",
        "speed",
        "gpu_check_speed:fused_kernels_case",
        120,
        "as 1b with the fused RMSNorm / RoPE / SwiGLU kernels",
        option=FUSED_KERNELS,
    ),
    Case(
        "kernels",
        "kernels",
        "gpu_check_kernels:kernels_case",
        90,
        "RMSNorm / RoPE / SwiGLU at llama-1b shapes: eager vs torch.compile vs meshforge's Triton kernels "
        "(vs liger-kernel's when installed), forward + backward time and error vs fp32",
        needs=("triton",),
    ),
    Case(
        "moe",
        "speed",
        "gpu_check_speed:moe_case",
        120,
        "mixtral-8x layer shape (dim 4096, 8 experts x 14336, top-2) cut to 2 layers, seq 4096, bf16; MFU on active params",
    ),
    Case(
        "t5-base",
        "speed",
        "gpu_check_speed:t5_case",
        120,
        "T5 v1.1 base, encoder 512 + decoder 114 tokens, span corruption, bf16, per-block compile",
    ),
    Case(
        "cp2",
        "speed",
        "gpu_check_speed:cp2_case",
        150,
        "llama-1b architecture, seq 8192, context parallel over 2 ranks (ring)",
        dry_cap_s=90,
    ),
    # never in the default list: they prove the driver's time caps and crash handling
    Case("selftest-hang", "selftest", "gpu_check_lib:hang_case", 3, "sleeps past its cap", dry_cap_s=3),
    Case("selftest-crash", "selftest", "gpu_check_lib:crash_case", 5, "the process dies", dry_cap_s=5),
]
BY_NAME = {c.name: c for c in CASES}
DEFAULT = [c.name for c in CASES if c.kind != "selftest"]


@dataclass
class Ctx:
    """Where and how a case runs."""

    dry: bool
    scratch: Path
    """The driver's scratch dir: other cases' results (``prior``), temporary outputs."""
    cache: str
    """MESHFORGE_CACHE with the built-in corpus prepared."""
    extra: dict = field(default_factory=dict)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    def prior(self, name: str) -> dict | None:
        """The result of an earlier case of this run, or None."""
        p = self.scratch / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None


def check(what: str, value: float, tol: float, note: str = "", at_least: bool = False) -> dict:
    """``value`` (an error measure) must be at most ``tol`` (``at_least``: at least); NaN fails."""
    value = float(value)
    ok = math.isfinite(value) and (value >= tol if at_least else value <= tol)
    return {
        "what": what,
        "value": value,
        "tol": tol,
        "op": ">=" if at_least else "<=",
        "pass": bool(ok),
        **({"note": note} if note else {}),
    }


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all elements (tensors or sequences of numbers)."""
    import torch

    a = torch.as_tensor(a, dtype=torch.float64) if not isinstance(a, torch.Tensor) else a.double()
    b = torch.as_tensor(b, dtype=torch.float64) if not isinstance(b, torch.Tensor) else b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads_rel_err(ga: dict, gb: dict) -> tuple[float, str]:
    """The worst ``rel_err`` over named gradients, and its name."""
    worst, name = -1.0, ""
    for k in gb:
        e = rel_err(ga[k], gb[k])
        if not math.isfinite(e) or e > worst:
            worst, name = e, k
        if not math.isfinite(e):
            break
    return worst, name


def hang_case(ctx) -> dict:
    """selftest-hang (here, not with the torch cases: its module must load at once)."""
    time.sleep(3600)
    return {}


def crash_case(ctx) -> dict:
    os._exit(7)
