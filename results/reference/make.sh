#!/usr/bin/env bash
# The reference leaderboard (CPU), from the repository root. Resumable: every phase skips the runs whose
# record is complete and resumes interrupted ones from their last epoch, so running it again continues
# where it stopped. Phases (README): 0 the shorter budget as it ran (30 epochs, seed 0), 1 the budget check
# (60 and 120 epochs), then at 60 epochs: 2 shared seed 0, 3 paper recipes seeds 0-1, 4 shared seeds 1-2,
# 5 paper seed 2, 6 the wider backbone seed 0, 7 its seeds 1-2 (the wider backbone costs ~4x: one seed of
# it comes before the others).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
BIN=${ENSEMBLE_BENCH:-ensemble-bench}          # the code that trains: the pinned commit (README)
POST=${ENSEMBLE_BENCH_POST:-ensemble-bench}    # the code that reads the records: leaderboard and report
for phase in 0-shorter-30ep 1-budget-60 1b-budget-120 2-shared-seed0 3-paper-seeds01 4-shared-seeds12 \
             5-paper-seed2 6-wide-shared-seed0 \
             7-wide-shared-seeds12; do
    "$BIN" sweep "results/reference/$phase.toml" --executor local --workers "${WORKERS:-2}"
done
"$POST" leaderboard results/reference/runs -o results/reference/leaderboard.csv
"$POST" report results/reference/runs -o results/reference/report
python results/reference/budget_check.py
python results/reference/latency.py "$POST"     # batch-1 latency with nothing else running (README: Latency)
