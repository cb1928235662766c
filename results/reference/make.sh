#!/usr/bin/env bash
# The reference leaderboard (CPU), from the repository root. Resumable: every phase skips the runs whose
# record is complete and resumes interrupted ones from their last epoch, so running it again continues
# where it stopped. Phases: the longer-budget check, shared seed 0, paper recipes with 2 seeds, the remaining
# shared seeds, the third paper seed, the wider backbone.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
BIN=${ENSEMBLE_BENCH:-ensemble-bench}
# The budget check (phase 2) runs first: its answer decides whether the rest of the grid is at the right
# budget, and the first records already hinted it might not be (DE-4's member 3 still falling at epoch 30).
for phase in 2-budget-check 1-shared-seed0 3-paper-seeds01 4-shared-seeds12 5-paper-seed2 6-wide-shared; do
    "$BIN" sweep "results/reference/$phase.toml" --executor local --workers "${WORKERS:-2}"
done
"$BIN" leaderboard results/reference/runs -o results/reference/leaderboard.csv
"$BIN" report results/reference/runs -o results/reference/report
