#!/usr/bin/env bash
# The reference leaderboard (CPU), from the repository root. Resumable: every phase skips the runs whose
# record is complete and resumes interrupted ones from their last epoch, so running it again continues
# where it stopped. Phases in the order of the issue: shared seed 0, paper recipes with 2 seeds, then the
# remaining shared seeds, the third paper seed, the wider backbone and the longer-budget check.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
BIN=${ENSEMBLE_BENCH:-ensemble-bench}
for spec in results/reference/[1-6]-*.toml; do
    "$BIN" sweep "$spec" --executor local --workers "${WORKERS:-2}"
done
"$BIN" leaderboard results/reference/runs -o results/reference/leaderboard.csv
"$BIN" report results/reference/runs -o results/reference/report
