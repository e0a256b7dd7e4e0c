#!/usr/bin/env bash
# Install meshforge into the current Python environment (use a venv).
#
#   bash scripts/setup.sh          PyTorch, then meshforge with what training needs (numpy,
#                                  sentencepiece, tensorboard, tqdm): the quick start
#   bash scripts/setup.sh --test   the same plus the test extras (pyproject.toml's `test`:
#                                  transformers, datasets, megatron-core, torchao, triton, mpich,
#                                  mpi4py, scipy, matplotlib, ...) and DeepSpeed: what the tests need
#
# Which PyTorch (MESHFORGE_TORCH, default auto):
#   auto      cuda if `nvidia-smi -L` lists a GPU, else cpu
#   cpu       torch==2.13.0, CPU build: from the package index pip is configured with when the
#             build it offers needs no nvidia-* packages (macOS and Windows wheels, or an index that
#             holds a +cpu wheel), else from PyTorch's CPU index (https://download.pytorch.org/whl/cpu,
#             Linux x86_64/aarch64); about 200 MB instead of several GB
#   cuda      torch==2.13.0 from the package index pip is configured with (on Linux, PyPI's wheel
#             is a CUDA build and brings the nvidia-* runtime packages). For another CUDA version,
#             install torch from https://download.pytorch.org/whl/cuXYZ first and use skip
#   skip      keep the torch already installed
#   2.11.0    another torch version, build chosen as auto does
# MESHFORGE_TORCH_INDEX=registry: never use an index other than pip's own (CI sets it: only the
# package registry is reachable there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

CHOICE=${MESHFORGE_TORCH:-auto}
VERSION=2.13.0
case "$CHOICE" in
  auto|cpu|cuda|skip) ;;
  [0-9]*) VERSION=$CHOICE; CHOICE=auto ;;
  *) echo "setup.sh: MESHFORGE_TORCH must be auto, cpu, cuda, skip or a version such as 2.13.0 (got '$CHOICE')" >&2
     exit 2 ;;
esac
if [ "$CHOICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then CHOICE=cuda; else CHOICE=cpu; fi
fi

# "cpu" or "cuda": the build of torch==$VERSION that pip's own index would install (a build that
# requires nvidia-* packages is a CUDA build)
registry_build() {
  local report
  report=$(mktemp)
  "$PY" -m pip install -q --dry-run --no-deps --ignore-installed --report "$report" "torch==$VERSION" >/dev/null
  "$PY" - "$report" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))["install"][0]["metadata"]
cuda = any(r.startswith("nvidia") for r in meta.get("requires_dist", []))
print("cuda" if cuda else "cpu")
EOF
  rm -f "$report"
}

case "$CHOICE" in
  skip) ;;
  cuda) "$PY" -m pip install -q "torch==$VERSION" ;;
  cpu)
    if [ "${MESHFORGE_TORCH_INDEX:-}" = registry ] || [ "$(registry_build)" = cpu ]; then
      "$PY" -m pip install -q "torch==$VERSION"
    else
      "$PY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==$VERSION"
    fi ;;
esac
echo "setup.sh: torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA " + str(torch.version.cuda) + ")" if torch.version.cuda else "(CPU build)")')"

if [ "$TEST" = 0 ]; then
  "$PY" -m pip install -q -e .
  exit 0
fi
# the test extras include the PyPI mpich and mpi4py for the mpiexec launch test; on a cluster,
# build mpi4py against the cluster's own MPI instead
"$PY" -m pip install -q -e ".[test]"
# DeepSpeed (parallel.dp_backend = "deepspeed") is an sdist whose setup imports torch: build it
# against the torch installed above, without build isolation. Its C++ ops are JIT-built on first use.
"$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
