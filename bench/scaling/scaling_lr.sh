#!/usr/bin/env bash
# A small LR x size sweep with and without QK-layernorm + z-loss (Wortsman et al.), on the CPU:
# 2 sizes x 3 learning rates x 2 variants, 1e5 tokens each; the LR-sensitivity figure and results.csv
# into DOCS (default SWEEP_DIR/report; the recorded ones in docs/scaling/lr/ came from DOCS=docs/scaling/lr).
#   bash bench/scaling/scaling_lr.sh [SWEEP_DIR]      (default runs/scaling_lr)
set -euo pipefail
SWEEP=${1:-runs/scaling_lr}
DOCS=${DOCS:-$SWEEP/report}
MF="python -m meshforge"
if [ ! -f "$SWEEP/sweep.jsonl" ]; then
  $MF scaling plan --kind lr --sizes 1.2e4,5e4 --lrs 1e-3,1e-2,1e-1 --tokens 1e5 --variants plain,qk_norm+z_loss \
      --base-config small --set model.vocab_size=512 --set data.builtin_vocab_size=512 --set model.dim=64 \
      --set model.n_heads=4 --set model.ffn_multiple_of=16 --set train.global_batch_size=8 \
      --set train.micro_batch_size=8 --set data.seq_len=64 --output "$SWEEP"
fi
$MF scaling run "$SWEEP" --parallel "${PARALLEL:-1}"
$MF scaling plot "$SWEEP" --output "$DOCS"
cp "$SWEEP/results.csv" "$DOCS/"
