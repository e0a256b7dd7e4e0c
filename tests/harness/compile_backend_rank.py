"""One rank of ``meshforge ARGV`` with ``torch.compile``'s backend defaulting to ``aot_eager``
(run by tests/parallel/test_compile.py through the parallel harness).

``aot_eager`` runs TorchDynamo's graph capture and AOT autograd's forward and backward graphs
without Inductor's code generation, whose C++ builds take minutes per rank on a small CPU
machine; what ``parallel.compile_scope = model`` changes in the step (one traced graph for the
forward and the loss, the DTensor and FSDP2 hooks inside it) is all exercised.

    RANK=r WORLD_SIZE=n ... python tests/harness/compile_backend_rank.py train ARGS...
"""

from __future__ import annotations

import sys

import torch

_compile = torch.compile


def compile_aot_eager(*args, **kwargs):
    kwargs.setdefault("backend", "aot_eager")
    return _compile(*args, **kwargs)


if __name__ == "__main__":
    torch.compile = compile_aot_eager
    from meshforge.cli import main

    sys.exit(main(sys.argv[1:]))
