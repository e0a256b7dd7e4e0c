"""RMSNorm, RoPE and SwiGLU: eager PyTorch vs torch.compile vs our Triton kernels (vs liger-kernel).

Shapes come from a preset (default ``llama-1b``: one micro batch of 4 x 4096 tokens, dim 2048,
16 query / 8 key heads of 128, FFN 8192, bf16). For each kernel and implementation it times
the forward and forward + backward (CUDA events, median of ``--iters`` after warm-up), the
peak memory of forward + backward above the inputs, and the largest difference from the fp32
PyTorch result. The implementations are the ones ``train.fused_kernels`` chooses between:

- eager: the models' own PyTorch code (``models/layers.py``);
- compiled: the same code under ``torch.compile`` (what ``parallel.compile`` gives a block);
- triton: ``meshforge/kernels/{rmsnorm,rope,swiglu}.py``;  liger: liger-kernel, when installed
  (its RoPE rotates q and k in place, so it is timed on copies: two extra copies in its figures).

The last line says per kernel which is fastest forward + backward: the figure that decides
whether ``train.fused_kernels = auto`` may turn on (it stays off until triton beats compiled).

Needs CUDA. ``--dry`` runs everything once on tiny shapes on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``; compiled = the ``aot_eager`` backend), to prove the script
and the kernels work; its times mean nothing.
Run: ``python bench/bench_kernels.py [--preset llama-1b --micro-batch 4 --record --json K.json --md K.md]``
"""

from __future__ import annotations

import os
import sys

if "--dry" in sys.argv:  # Triton reads it when first imported (torch._dynamo imports it): set before torch
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import record  # noqa: E402

from meshforge.config import load_config  # noqa: E402
from meshforge.models.layers import apply_rope_qk, rope_tables, swiglu  # noqa: E402

SECTION = "## Fused RMSNorm / RoPE / SwiGLU kernels"
EPS = 1e-5


def eager_rms_norm(x, w):
    """``models.layers.RMSNorm.forward``."""
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), EPS).type_as(x)


def implementations(compile_backend: str) -> dict[str, dict[str, object]]:
    """kernel -> implementation name -> function of that kernel's inputs."""
    impls = {"rmsnorm": {"eager": eager_rms_norm}, "rope": {"eager": apply_rope_qk}, "swiglu": {"eager": swiglu}}
    for fns in impls.values():
        fns["compiled"] = torch.compile(fns["eager"], backend=compile_backend, fullgraph=True)
    if importlib.util.find_spec("triton") is not None:
        from meshforge.kernels.rmsnorm import rms_norm
        from meshforge.kernels.rope import rope_qk
        from meshforge.kernels.swiglu import swiglu as triton_swiglu

        impls["rmsnorm"]["triton"] = lambda x, w: rms_norm(x, w, EPS)
        impls["rope"]["triton"] = rope_qk
        impls["swiglu"]["triton"] = triton_swiglu
    if importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available():
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        from meshforge.kernels import liger

        impls["rmsnorm"]["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "gemma", False)
        impls["rope"]["liger"] = lambda q, k, cos, sin: liger.rope_qk(q.clone(), k.clone(), cos, sin)  # it writes q, k
        impls["swiglu"]["liger"] = liger.swiglu
    return impls


def make_inputs(kernel: str, tokens: int, seq: int, m, dtype, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, the ones that take a gradient)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt).requires_grad_(grad)

    if kernel == "rmsnorm":
        x, w = rand(tokens, m.dim), rand(m.dim, dt=torch.float32)
        return [x, w], [x, w]
    if kernel == "rope":
        cos, sin = rope_tables(m.head_dim, seq, m.rope_theta, device=device)
        q, k = rand(tokens // seq, seq, m.n_heads, m.head_dim), rand(tokens // seq, seq, m.kv_heads, m.head_dim)
        return [q, k, cos, sin], [q, k]
    a, b = rand(tokens, m.hidden_dim), rand(tokens, m.hidden_dim)
    return [a, b], [a, b]


def forward_backward(fn, inputs, grad_inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs])


def timed(fn, iters: int, device: str) -> float:
    """Median milliseconds of fn() after 3 warm-up calls (CUDA events on a GPU)."""
    for _ in range(3 if device == "cuda" else 1):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(args) -> tuple[list[str], list[dict]]:
    cfg = load_config(args.preset)
    m, seq = cfg.model, args.seq or cfg.data.seq_len
    tokens = args.micro_batch * seq
    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    impls = implementations("aot_eager" if args.dry else "inductor")
    lines = [
        f"preset {args.preset}: {tokens} tokens ({args.micro_batch} x {seq}), dim {m.dim}, heads {m.n_heads}/"
        f"{m.kv_heads} x {m.head_dim}, FFN {m.hidden_dim}, {args.dtype}, device {device}, median of {args.iters}"
        + (" -- DRY RUN on Triton's CPU interpreter: the times mean nothing" if args.dry else ""),
        "",
        "| kernel | impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB | max abs err vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    rows, best = [], []
    for kernel, fns in impls.items():
        inputs, grad_inputs = make_inputs(kernel, tokens, seq, m, dtype, device)
        ref = _fp32_reference(fns["eager"], inputs, grad_inputs)
        for name, fn in fns.items():
            fwd = timed(lambda: fn(*inputs), args.iters, device)
            both = timed(lambda: forward_backward(fn, inputs, grad_inputs), args.iters, device)
            peak = peak_mib(lambda: forward_backward(fn, inputs, grad_inputs), device)
            err = _error(fn, inputs, grad_inputs, ref)
            rows.append(
                {
                    "kernel": kernel,
                    "impl": name,
                    "fwd_ms": fwd,
                    "fwd_bwd_ms": both,
                    "peak_mib": peak,
                    "max_abs_err": err,
                }
            )
            peak_text = "-" if peak is None else f"{peak:.1f}"
            lines.append(f"| {kernel} | {name} | {fwd:.3f} | {both:.3f} | {peak_text} | {err:.2e} |")
        fastest = min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["fwd_bwd_ms"])
        best.append(f"{kernel}: {fastest['impl']}")
    lines += ["", "fastest forward + backward: " + ", ".join(best)]
    return lines, rows


def _fp32_reference(eager, inputs, grad_inputs):
    """Outputs and input gradients of the eager code on fp32 copies of the inputs."""
    ref = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    ref_grad = [ref[i] for i, t in enumerate(inputs) if any(t is g for g in grad_inputs)]
    out = eager(*ref)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, ref_grad, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs] + list(grads)


def _error(fn, inputs, grad_inputs, ref) -> float:
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs])
    return max((a.float() - b).abs().max().item() for a, b in zip([o.detach() for o in outs] + list(grads), ref))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b", help="model shapes from this preset (default llama-1b)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro batch")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: the preset's data.seq_len)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU under Triton's interpreter (smoke check)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--md", type=Path, help="also write the table (markdown, as printed) here")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args()
    if a.dry:
        a.preset, a.micro_batch, a.seq, a.iters = "tiny-test", 1, 8, 1
        a.dtype = "fp32"
    elif not torch.cuda.is_available():
        print(
            "bench_kernels.py measures GPU kernels and needs CUDA; on this machine run it with --dry "
            "(a smoke check on Triton's CPU interpreter)",
            file=sys.stderr,
        )
        return 2
    lines, rows = run(a)
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.md:
        a.md.write_text("\n".join(lines) + "\n")
    if a.record and not a.dry:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
