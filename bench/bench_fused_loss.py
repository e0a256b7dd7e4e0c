"""Output projection + LM loss, plain (materialised logits) vs fused (chunked): memory, and with --time speed.

For each vocabulary size, one forward of ``lm_loss(h @ W.T, y)`` and of
``fused_linear_lm_loss(h, W, y)`` on N tokens of width D. Reported per path:

- saved for backward: the bytes of the distinct storages autograd keeps between forward and
  backward, other than the inputs h and W (counted with ``saved_tensors_hooks``). Exact and
  independent of the machine. The plain path keeps the fp32 [N, V] logits; the fused path keeps
  dh [N, D] and dW [V, D] (the weight's gradient, which backward produces anyway);
- largest vocab-wide transient: [N, V] fp32 for the plain path (logits, then their gradient),
  [chunk, V] fp32 for the fused one, plus its 16-bit copy (dz) with ``--dtype bf16`` (from the
  shapes, not measured).

``--dtype bf16`` makes h and W bf16 (FSDP2's ``param_dtype = bf16``): the chunk matmuls then
run in bf16, dh and dW are kept in bf16.

By default the tensors live on the ``meta`` device: shapes and dtypes flow through the same
code, nothing is computed, so the figures come in a second at any size. ``--device cpu`` (or
``cuda``) runs the real computation (on CUDA it adds the measured peak allocated memory).

``--time`` (cpu or cuda) times forward + backward of both paths instead, with fp32 parameters
and h, in fp32 and under bf16 autocast (as ``train.dtype = bf16``: the plain path's output
layer and the fused loss's chunk matmuls in bf16, the softmax in fp32): median milliseconds of
``--repeat`` runs after one warm-up. CPU bf16 matmul speed (oneDNN, AMX where present) says
little about a GPU's tensor cores.
Run: ``python bench/bench_fused_loss.py [--tokens 8192 --dim 2048 --dtype bf16 --record]``,
``python bench/bench_fused_loss.py --time --device cpu --tokens 1024 --dim 512 --vocab 32768``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.nn.functional as F  # noqa: E402
from benchlib import loadavg, record  # noqa: E402

from meshforge.kernels.fused_loss import default_chunk, fused_linear_lm_loss  # noqa: E402
from meshforge.models.losses import lm_loss  # noqa: E402

SECTION = "## Fused linear + cross-entropy memory"
TIME_SECTION = "## Fused linear + cross-entropy speed"


def saved_bytes(fn, inputs: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages fn() saves for backward, the inputs' own storages left out."""
    skip = {t.untyped_storage()._cdata for t in inputs}  # the storage object itself (meta tensors have no data_ptr)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in skip:
            storages[key] = max(storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if out.total.device.type != "meta":
        out.total.backward()
    return sum(storages.values())


def measure(n: int, d: int, v: int, chunk: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, device=device, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)
    row = {}
    for name, fn in (
        ("plain", lambda: lm_loss(h @ w.t(), y, 1e-4)),
        ("fused", lambda: fused_linear_lm_loss(h, w, y, 1e-4, chunk_size=chunk)),
    ):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        row[name] = saved_bytes(fn, [h, w])
        if device == "cuda":
            row[name + "_peak"] = torch.cuda.max_memory_allocated() - base
        h.grad = w.grad = None
    return row


def time_paths(n: int, d: int, v: int, chunk: int, device: str, repeat: int, autocast: bool) -> dict:
    """Median ms of forward + backward of the plain and the fused path, fp32 parameters, bf16 autocast or not."""
    h = torch.randn(n, d, device=device, requires_grad=True)
    w = (torch.randn(v, d, device=device) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)

    def plain():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = F.linear(h, w)
        return lm_loss(logits, y, 1e-4)

    def fused():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return fused_linear_lm_loss(h, w, y, 1e-4, chunk_size=chunk)

    row = {}
    for name, fn in (("plain", plain), ("fused", fused)):
        times = []
        for _ in range(repeat + 1):  # the first is a warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn().total.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            h.grad = w.grad = None
        row[name] = statistics.median(times[1:])
    return row


def time_table(a) -> list[str]:
    lines = [
        f"N = {a.tokens} tokens, D = {a.dim}, chunk = {a.chunk or 'default_chunk'}, device = {a.device}, "
        f"median of {a.repeat} forward + backward after one warm-up, fp32 parameters and h; bf16 = under "
        f"bf16 autocast (matmuls in bf16, softmax in fp32); load average at the start {loadavg()}",
        "",
        "| vocab | precision | plain ms | fused ms | fused chunks | fused ms per chunk | fused / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in a.vocab:
        chunk = a.chunk or default_chunk(a.tokens, a.dim, v)
        chunks = -(-a.tokens // chunk)
        for precision in ("fp32", "bf16"):
            r = time_paths(a.tokens, a.dim, v, chunk, a.device, a.repeat, precision == "bf16")
            lines.append(
                f"| {v} | {precision} | {r['plain']:.1f} | {r['fused']:.1f} | {chunks} x {chunk} "
                f"| {r['fused'] / chunks:.2f} | {r['fused'] / r['plain']:.2f} |"
            )
    return lines


def memory_table(a) -> list[str]:
    mib = 2**20
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dz_bytes = 4 + (2 if a.dtype == "bf16" else 0)  # fp32 logits / dz, plus dz's bf16 copy for the matmuls
    lines = [
        f"N = {a.tokens} tokens, D = {a.dim}, chunk = {a.chunk or 'default_chunk'}, h and W {a.dtype}, "
        f"device = {a.device} (saved = bytes kept for backward besides h and W, counted with saved_tensors_hooks)",
        "",
        "| vocab | plain saved MiB | fused saved MiB (dh + dW) | saved by fusing MiB | plain [N,V] transient MiB "
        "| fused chunk | fused [chunk,V] transient MiB |" + (" plain / fused peak MiB |" if a.device == "cuda" else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if a.device == "cuda" else ""),
    ]
    for v in a.vocab:
        chunk = a.chunk or default_chunk(a.tokens, a.dim, v)
        r = measure(a.tokens, a.dim, v, chunk, a.device, dtype)
        peak = f" {r['plain_peak'] / mib:.1f} / {r['fused_peak'] / mib:.1f} |" if a.device == "cuda" else ""
        lines.append(
            f"| {v} | {r['plain'] / mib:.1f} | {r['fused'] / mib:.1f} | {(r['plain'] - r['fused']) / mib:.1f} "
            f"| {a.tokens * v * 4 / mib:.1f} | {chunk} | {min(chunk, a.tokens) * v * dz_bytes / mib:.1f} |{peak}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro batch (N)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk; 0: the library default (default_chunk)")
    p.add_argument("--device", default="meta", help="meta (shapes only, default), cpu or cuda")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="memory table: the dtype of h and W (bf16: FSDP2 param_dtype bf16)",
    )
    p.add_argument("--time", action="store_true", help="time both paths in fp32 and under bf16 autocast (cpu, cuda)")
    p.add_argument("--repeat", type=int, default=3, help="--time: timed runs per case")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args()
    if a.time and a.device == "meta":
        p.error("--time needs a device that computes: --device cpu or cuda")
    lines = time_table(a) if a.time else memory_table(a)
    print("\n".join(lines))
    if a.record:
        record(TIME_SECTION if a.time else SECTION, lines)


if __name__ == "__main__":
    main()
