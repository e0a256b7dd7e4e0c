#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels the GPU check (bench/gpu_check/gpu_check.sh) needs on the
# GPU machine, which has none: Python 3.12, x86_64, torch 2.11.0, triton 3.6.0 and transformers 5.17.0
# already installed (see README.md, section "GPU check"). Writes .whl/ at the repository root (ignored
# through .git/info/exclude, added here if missing; never committed), one version of each package:
#
#   torchao 0.18.0       train.float8 (its C++ extensions ask for torch >= 2.11.0; float8 training is Python)
#   liger-kernel 0.8.5   the kernels case's liger rows (needs torch >= 2.1.2, triton >= 2.3.1: both there)
#
# Neither needs a package the GPU machine lacks (torchao declares no requirement; liger-kernel torch and
# triton). The device command then installs them with pip install --target /tmp/site .whl/*.whl.
#
#   bash bench/gpu_check/fetch_gpu_wheels.sh
set -euo pipefail
WHEELS=(torchao==0.18.0 liger-kernel==0.8.5)
LIMIT_MIB=16  # the device tool carries 64 MiB of working tree in all
root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
exclude="$(git -C "$root" rev-parse --path-format=absolute --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf "$root/.whl"  # two versions of one package stop the whole install there
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$root/.whl" "${WHEELS[@]}"
n=$(find "$root/.whl" -type f -name '*.whl' | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "fetch_gpu_wheels: expected ${#WHEELS[@]} wheels in .whl/, found $n" >&2
  exit 1
fi
kib=$(du -sk "$root/.whl" | cut -f1)
if [ "$kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "fetch_gpu_wheels: .whl/ holds $((kib / 1024)) MiB, over the $LIMIT_MIB MiB this script allows" >&2
  exit 1
fi
ls -l "$root/.whl"
echo "fetch_gpu_wheels: $n wheels, $((kib / 1024)) MiB ($kib KiB) in $root/.whl"
