"""The GPU check's kernel case: fused RMSNorm / RoPE / SwiGLU (meshforge's Triton kernels, liger's
when installed) against eager and ``torch.compile``d PyTorch at llama-1b shapes, through
:mod:`bench_kernels` (the same table it prints). The figures say which implementation
``train.fused_kernels = auto`` should choose; each implementation's error against fp32 is checked.
"""

from __future__ import annotations

import argparse

from gpu_check_lib import Skip, check

ERR_TOL = 5e-2
"""Max abs error of bf16 forward + backward against the fp32 reference (bf16 rounds at rel. 4e-3;
the inputs are O(1) and a SwiGLU / RoPE output is O(1-10))."""


def kernels_case(ctx) -> dict:
    try:
        import triton  # noqa: F401  (the kernels' only extra package)
    except ImportError as e:
        raise Skip("triton is not installed") from e
    import bench_kernels

    args = argparse.Namespace(preset="llama-1b", micro_batch=4, seq=0, dtype="bf16", iters=20, dry=ctx.dry)
    if ctx.dry:  # the CPU interpreter: tiny shapes, one iteration (times mean nothing)
        args.preset, args.micro_batch, args.seq, args.iters, args.dtype = "tiny-test", 1, 8, 1, "fp32"
    lines, rows = bench_kernels.run(args)
    figures, checks = {}, []
    for r in rows:
        key = f"{r['kernel']}/{r['impl']}"
        figures[f"{key}/fwd_bwd_ms"] = r["fwd_bwd_ms"]
        checks.append(check(f"{key}: max abs error vs fp32", r["max_abs_err"], ERR_TOL))
    for kernel in sorted({r["kernel"] for r in rows}):
        fastest = min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["fwd_bwd_ms"])
        figures[f"{kernel}/fastest"] = fastest["impl"]
    return {"figures": figures, "checks": checks, "note": lines[0]}
