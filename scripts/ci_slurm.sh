#!/usr/bin/env bash
# Install (Debian packages, once) and start a one-node SLURM cluster for the launch tests.
# Used by .ci/run; on a developer machine run it with sudo, or skip it: the SLURM test then
# skips itself. Idempotent and quick when everything is already there and running.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "ci_slurm.sh: installing SLURM needs root" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
bash scripts/slurm/start.sh
