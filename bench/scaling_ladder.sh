#!/usr/bin/env bash
# The end-to-end CPU scaling ladder on the built-in corpus: 3 IsoFLOP budgets 4x apart x 6 sizes over 8x, each
# budget's sizes centred on its expected optimum; run two at a time, fitted (approaches 1-3) and plotted into
# docs/scaling/. About 10 minutes on an idle 2-core box. Rerunning resumes (finished rows are skipped).
#   bash bench/scaling_ladder.sh [SWEEP_DIR]      (default runs/scaling_ladder)
set -euo pipefail
SWEEP=${1:-runs/scaling_ladder}
DOCS=${DOCS:-docs/scaling}
MF="python -m meshforge"
BUDGETS=4e10,1.6e11,6.4e11
if [ ! -f "$SWEEP/sweep.jsonl" ]; then
  # Centres: Chinchilla's N_opt ~ C^0.5, anchored at the one minimum the first ladder bracketed (N ~ 2.7e4 at
  # 3.6e11 FLOPs): 9e3, 1.8e4, 3.6e4; --span 2.83 puts 6 sizes from centre/2.83 to centre*2.83 around each.
  # A 512-token vocabulary, head dim 8 and FFN widths in steps of 8 (the finest shape grid: 1-2 layer models
  # from N = 3e3); batches of 16 x 64 tokens (116-3,145 optimizer steps), one cosine schedule per run.
  $MF scaling plan --budgets $BUDGETS --centers 9e3,1.8e4,3.6e4 --sizes 6 --span 2.83 --base-config small \
      --set model.vocab_size=512 --set data.builtin_vocab_size=512 --set model.dim=64 --set model.n_heads=8 \
      --set model.n_kv_heads=8 --set model.ffn_multiple_of=8 --set train.global_batch_size=16 \
      --set train.micro_batch_size=16 --set data.seq_len=64 --output "$SWEEP"
fi
$MF scaling run "$SWEEP" --parallel "${PARALLEL:-2}"
mkdir -p "$DOCS"
$MF scaling fit "$SWEEP" --approach all --budgets $BUDGETS,2.56e12 --json > "$DOCS/fit.json"
$MF scaling fit "$SWEEP" --approach all --budgets $BUDGETS,2.56e12 | tee "$DOCS/fit.txt"
$MF scaling plot "$SWEEP" --output "$DOCS"
cp "$SWEEP/results.csv" "$SWEEP/curves.csv" "$DOCS/"
