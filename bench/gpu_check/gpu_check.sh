#!/usr/bin/env bash
# The prepared GPU check (issue 16): correctness on CUDA, speed of the ~1B decoder / MoE / T5-base,
# float8 and fused kernels where the build has them, the planner's memory prediction, and a
# Hugging Face LlamaForCausalLM bare-loop peer -- every case under its own time cap, 450 s in all.
#
#   bash bench/gpu_check/gpu_check.sh [--dry] [--out DIR] [--only CASE,CASE] [--budget S]
#
# Writes DIR/gpu_check.json (every figure), DIR/gpu_check.md (a section ready for
# bench/RESULTS.md) and DIR/gpu_check.log (the cases' output). DIR defaults to $OUT when set,
# else ./gpu_check_out. --dry runs every case on the CPU with tiny shapes (under a minute).
# Extra Python packages (wheels carried to a machine without a registry) are picked up from
# $PYTHONPATH; see README.md, section "GPU check".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
