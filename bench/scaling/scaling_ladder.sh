#!/usr/bin/env bash
# The end-to-end CPU scaling ladder on the built-in corpus: 3 IsoFLOP budgets 4x apart x 7 sizes over 8x, each
# budget's sizes centred on its expected optimum; run two at a time, fitted (approaches 1-3) and plotted.
# 19 runs: 17.5 minutes with PARALLEL=2 on the shared 2-core box at load average 5-7 (README, "The CPU
# ladder"). Rerunning resumes (finished rows are skipped).
#   bash bench/scaling/scaling_ladder.sh [SWEEP_DIR]      (default runs/scaling_ladder)
# The fit and the figures go to DOCS (default SWEEP_DIR/report, outside the tracked tree); the recorded
# ones in the repository came from DOCS=docs/scaling.
set -euo pipefail
SWEEP=${1:-runs/scaling_ladder}
DOCS=${DOCS:-$SWEEP/report}
MF="python -m meshforge"
BUDGETS=1.6e11,6.4e11,2.56e12
if [ ! -f "$SWEEP/sweep.jsonl" ]; then
  # Centres: N_opt ~ C^0.5 through the minima a first ladder bracketed (N ~ 1.1e4 at 1.6e11 FLOPs, 2.3e4 at
  # 6.4e11): 1.15e4, 2.3e4, 4.6e4; --span 2.83 puts 7 sizes from centre/2.83 to centre*2.83 around each. (At
  # 4e10 that first ladder's smallest model, N = 3e3, won: too few steps for the rest; so no budget below 1.6e11.)
  # A 512-token vocabulary, head dim 8 and FFN widths in steps of 8 (the finest shape grid: 1-2 layer models
  # from N = 3e3); batches of 16 x 64 tokens (428-6,851 optimizer steps), one cosine schedule per run.
  # --max-steps 7000 leaves out the two smallest sizes of 2.56e12 (8,600-9,500 steps: 40% of the ladder's time).
  $MF scaling plan --budgets $BUDGETS --centers 1.15e4,2.3e4,4.6e4 --sizes 7 --span 2.83 --max-steps 7000 \
      --base-config small \
      --set model.vocab_size=512 --set data.builtin_vocab_size=512 --set model.dim=64 --set model.n_heads=8 \
      --set model.n_kv_heads=8 --set model.ffn_multiple_of=8 --set train.global_batch_size=16 \
      --set train.micro_batch_size=16 --set data.seq_len=64 --output "$SWEEP"
fi
$MF scaling run "$SWEEP" --parallel "${PARALLEL:-2}"
mkdir -p "$DOCS"
$MF scaling fit "$SWEEP" --approach all --budgets $BUDGETS,1e13 --json > "$DOCS/fit.json"
$MF scaling fit "$SWEEP" --approach all --budgets $BUDGETS,1e13 | tee "$DOCS/fit.txt"
$MF scaling plot "$SWEEP" --output "$DOCS"
cp "$SWEEP/results.csv" "$SWEEP/curves.csv" "$DOCS/"
