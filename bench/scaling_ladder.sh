#!/usr/bin/env bash
# The end-to-end CPU scaling ladder on the built-in corpus: 3 IsoFLOP budgets x 5 sizes (a few too large for the smallest budget are skipped),
# run one at a time, fitted (approaches 1-3) and plotted into docs/scaling/.
# About 10 minutes on an idle 2-core box. Rerunning resumes (finished rows are skipped).
#   bash bench/scaling_ladder.sh [SWEEP_DIR]      (default runs/scaling_ladder)
set -euo pipefail
SWEEP=${1:-runs/scaling_ladder}
DOCS=${DOCS:-docs/scaling}
MF="python -m meshforge"
if [ ! -f "$SWEEP/sweep.jsonl" ]; then
  # a 512-token vocabulary, head dim 16 and FFN widths in steps of 16 (small models, fine-grained N);
  # batches of 8 x 64 tokens: enough optimizer steps (150-2400) for these budgets
  $MF scaling plan --budgets 4e10,1.2e11,3.6e11 --sizes 5 --span 2.5 --base-config small \
      --set model.vocab_size=512 --set data.builtin_vocab_size=512 --set model.dim=64 --set model.n_heads=4 \
      --set model.ffn_multiple_of=16 --set train.global_batch_size=8 --set train.micro_batch_size=8 \
      --set data.seq_len=64 --output "$SWEEP"
fi
$MF scaling run "$SWEEP" --parallel "${PARALLEL:-1}"
mkdir -p "$DOCS"
$MF scaling fit "$SWEEP" --approach all --budgets 4e10,1.2e11,3.6e11,3.6e12 --json > "$DOCS/fit.json"
$MF scaling fit "$SWEEP" --approach all --budgets 4e10,1.2e11,3.6e11,3.6e12 | tee "$DOCS/fit.txt"
$MF scaling plot "$SWEEP" --output "$DOCS"
cp "$SWEEP/results.csv" "$SWEEP/curves.csv" "$DOCS/"
