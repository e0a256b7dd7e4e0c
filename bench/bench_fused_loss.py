"""Activation memory of the output projection + LM loss: plain (materialised logits) vs fused (chunked).

For each vocabulary size, one forward of ``lm_loss(h @ W.T, y)`` and of
``fused_linear_lm_loss(h, W, y)`` on N tokens of width D. Reported per path:

- saved for backward: the bytes of the distinct storages autograd keeps between forward and
  backward, other than the inputs h and W (counted with ``saved_tensors_hooks``). Exact and
  independent of the machine. The plain path keeps the fp32 [N, V] logits; the fused path keeps
  dh [N, D] and dW [V, D] (the weight's gradient, which backward produces anyway);
- largest vocab-wide transient: [N, V] fp32 for the plain path (logits, then their gradient),
  [chunk, V] fp32 for the fused one (from the shapes, not measured).

By default the tensors live on the ``meta`` device: shapes and dtypes flow through the same
code, nothing is computed, so the figures come in a second at any size. ``--device cpu`` (or
``cuda``) runs the real computation (on CUDA it adds the measured peak allocated memory).
Run: ``python bench/bench_fused_loss.py [--tokens 8192 --dim 2048 --record]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import record  # noqa: E402

from meshforge.kernels.fused_loss import default_chunk, fused_linear_lm_loss  # noqa: E402
from meshforge.models.losses import lm_loss  # noqa: E402

SECTION = "## Fused linear + cross-entropy memory"


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


def measure(n: int, d: int, v: int, chunk: int, device: str) -> dict:
    h = torch.randn(n, d, device=device, requires_grad=True)
    w = torch.randn(v, d, device=device, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)
    row = {}
    for name, fn in (("plain", lambda: lm_loss(h @ w.t(), y, 1e-4)),
                     ("fused", lambda: fused_linear_lm_loss(h, w, y, 1e-4, chunk_size=chunk))):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        row[name] = saved_bytes(fn, [h, w])
        if device == "cuda":
            row[name + "_peak"] = torch.cuda.max_memory_allocated() - base
        h.grad = w.grad = None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro batch (N)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk; 0: the library default (default_chunk)")
    p.add_argument("--device", default="meta", help="meta (shapes only, default), cpu or cuda")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args()
    mib = 2 ** 20
    lines = [f"N = {a.tokens} tokens, D = {a.dim}, chunk = {a.chunk or 'default_chunk'}, fp32, device = {a.device} "
             "(saved = bytes kept for backward besides h and W, counted with saved_tensors_hooks)", "",
             "| vocab | plain saved MiB | fused saved MiB (dh + dW) | saved by fusing MiB | plain [N,V] transient MiB "
             "| fused chunk | fused [chunk,V] transient MiB |"
             + (" plain / fused peak MiB |" if a.device == "cuda" else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if a.device == "cuda" else "")]
    for v in a.vocab:
        chunk = a.chunk or default_chunk(a.tokens, a.dim, v)
        r = measure(a.tokens, a.dim, v, chunk, a.device)
        peak = f" {r['plain_peak'] / mib:.1f} / {r['fused_peak'] / mib:.1f} |" if a.device == "cuda" else ""
        lines.append(f"| {v} | {r['plain'] / mib:.1f} | {r['fused'] / mib:.1f} | {(r['plain'] - r['fused']) / mib:.1f} "
                     f"| {a.tokens * v * 4 / mib:.1f} | {chunk} | {min(chunk, a.tokens) * v * 4 / mib:.1f} |{peak}")
    print("\n".join(lines))
    if a.record:
        record(SECTION, lines)


if __name__ == "__main__":
    main()
