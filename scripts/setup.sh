#!/usr/bin/env bash
# Install meshforge into the current Python environment (use a venv): the CPU build of
# PyTorch first (an unpinned torch would pull a multi-GB CUDA build), then meshforge with
# its test extras (these include the PyPI mpich and mpi4py for the mpiexec launch test; on a
# cluster, build mpi4py against the cluster's own MPI instead). On a GPU machine, install
# your CUDA torch first and skip the pin with MESHFORGE_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${MESHFORGE_TORCH:-}" != "skip" ]; then
  "$PY" -m pip install -q "torch==${MESHFORGE_TORCH:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
# DeepSpeed (parallel.dp_backend = "deepspeed") is an sdist whose setup imports torch: build it
# against the torch installed above, without build isolation. Its C++ ops are JIT-built on first use.
"$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
