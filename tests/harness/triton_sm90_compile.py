"""Compile meshforge's Triton kernels ahead of time for a Hopper GPU (sm_90), with no GPU: Triton's front
end, its GPU passes, LLVM and the ptxas its wheel ships. Run without TRITON_INTERPRET (the interpreter
replaces the kernels' JIT functions); prints one line per kernel and exits 1 if any failed.

    python tests/harness/triton_sm90_compile.py
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels' JIT functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from meshforge.kernels import rmsnorm, rope, swiglu  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def kernels(dtype: str):
    """(kernel, argument types, constexprs, warps) as the launchers call them at llama-1b-like shapes."""
    p = "*" + dtype
    norm = {"X": p, "W": "*fp32", "Y": p, "R": "*fp32", "N": "i32", "D": "i32", "eps": "fp32"}
    norm_bwd = {"DY": p, "X": p, "W": "*fp32", "R": "*fp32", "DX": p, "DW": "*fp32", "N": "i32", "D": "i32"}
    rot = {"X": p, "COS": "*fp32", "SIN": "*fp32", "Y": p, "T": "i32", "H": "i32", "HALF": "i32"}
    return [
        (rmsnorm._rms_norm_fwd, norm, {"BLOCK_ROWS": 1, "BLOCK": 2048}, 8),  # the model width
        (rmsnorm._rms_norm_fwd, norm, {"BLOCK_ROWS": 32, "BLOCK": 64}, 8),  # QK-norm's head dim
        (rmsnorm._rms_norm_bwd, norm_bwd, {"ROWS_PER_PROGRAM": 64, "BLOCK_ROWS": 1, "BLOCK": 2048}, 8),
        (rope._rope_kernel, rot, {"BACKWARD": False, "BLOCK_H": 32, "BLOCK_HALF": 32}, 4),
        (rope._rope_kernel, rot, {"BACKWARD": True, "BLOCK_H": 32, "BLOCK_HALF": 32}, 4),
        (swiglu._swiglu_fwd, {"A": p, "B": p, "Y": p, "N": "i32"}, {"BLOCK": swiglu.BLOCK}, 4),
        (swiglu._swiglu_bwd, {"DY": p, "A": p, "B": p, "DA": p, "DB": p, "N": "i32"}, {"BLOCK": swiglu.BLOCK}, 4),
    ]


def main() -> int:
    failed = 0
    for dtype in ("fp32", "bf16"):
        for fn, sig, consts, warps in kernels(dtype):
            src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            what = f"{fn.__name__} {dtype} {consts}"
            try:
                compiled = triton.compile(src, target=HOPPER, options={"num_warps": warps})
                assert compiled.asm.get("cubin"), "no cubin"
                print(f"ok {what}")
            except Exception as e:  # noqa: BLE001 - every kernel is tried; the exit status says
                failed += 1
                print(f"FAILED {what}: {type(e).__name__}: {str(e)[:1500]}")
    print(f"triton {triton.__version__}: {failed} of {2 * len(kernels('fp32'))} kernels failed to compile for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
