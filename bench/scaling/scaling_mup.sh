#!/usr/bin/env bash
# muP LR transfer on the CPU: an LR x width sweep at fixed depth (2 blocks; width 32, 64, 128),
# once in the standard parametrisation and once with muP relative to width 32; the two result
# tables are merged (variant sp / mup) and plotted into DOCS (default ROOT/report; the recorded ones in
# docs/scaling/mup/ came from DOCS=docs/scaling/mup).
#   bash bench/scaling/scaling_mup.sh [ROOT]      (default runs/scaling_mup)
set -euo pipefail
ROOT=${1:-runs/scaling_mup}
DOCS=${DOCS:-$ROOT/report}
MF="python -m meshforge"
COMMON=(--kind lr --layers 2 --sizes 2.37e4,1e5,4e5 --lrs 1e-3,3e-3,1e-2,3e-2,1e-1 --tokens 5e4 --variants plain
        --base-config small --set model.vocab_size=512 --set data.builtin_vocab_size=512 --set model.dim=64
        --set model.n_heads=4 --set model.ffn_multiple_of=16 --set train.global_batch_size=8
        --set train.micro_batch_size=8 --set data.seq_len=64)
[ -f "$ROOT/sp/sweep.jsonl" ] || $MF scaling plan "${COMMON[@]}" --output "$ROOT/sp"
[ -f "$ROOT/mup/sweep.jsonl" ] || $MF scaling plan "${COMMON[@]}" --set model.mup_base_dim=32 --output "$ROOT/mup"
$MF scaling run "$ROOT/sp" --parallel "${PARALLEL:-1}"
$MF scaling run "$ROOT/mup" --parallel "${PARALLEL:-1}"
mkdir -p "$DOCS"
python - "$ROOT" "$DOCS/results.csv" <<'PY'
import csv, sys
root, out = sys.argv[1], sys.argv[2]
rows = []
for name in ("sp", "mup"):
    with open(f"{root}/{name}/results.csv", newline="") as f:
        rows += [{**r, "variant": name} for r in csv.DictReader(f)]
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
PY
$MF scaling plot "$DOCS/results.csv" --output "$DOCS"
