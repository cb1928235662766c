#!/usr/bin/env bash
# The reference leaderboard (CPU), from the repository root. Resumable: every phase skips the runs whose
# record is complete and resumes interrupted ones from their last epoch, so running it again continues
# where it stopped. Phases (README): 0 the shorter budget as it ran (30 epochs, seed 0), 1 the budget check
# (60 and 120 epochs), then at 60 epochs: 2 shared seed 0, 3 paper recipes seeds 0-1, 4 shared seeds 1-2,
# 5 paper seed 2, 6 the wider backbone seed 0, 7 its seeds 1-2 (the wider backbone costs ~4x: one seed of
# it comes before the others). 3c: a control added after phase 3's snapshot row (the single model under
# the snapshot paper's optimiser; its own file says why). 3d: the same kind of control for phase 3's MC-dropout
# row (the single model, i.e. MC dropout at rate 0, under MC dropout's paper recipe). 3e: the single model under
# uncertainty-baselines' recipe, the paper recipe of BatchEnsemble and MIMO. Phases 6-7 train compiled
# (compile = true in their specs) with ENSEMBLE_BENCH_WIDE, a later pin than phases 0-5 (README: Pace).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
BIN=${ENSEMBLE_BENCH:-ensemble-bench}          # the code that trains: the pinned commit (README)
WIDE=${ENSEMBLE_BENCH_WIDE:-$BIN}              # the code that trains phases 6-7 (the wider backbone, compiled)
POST=${ENSEMBLE_BENCH_POST:-ensemble-bench}    # the code that reads the records: leaderboard and report
PHASES="0-shorter-30ep 1-budget-60 1b-budget-120 2-shared-seed0 3-paper-seeds01 3c-control-snapshot-recipe
        3d-control-mc-dropout-recipe 3e-control-ub-recipe 4-shared-seeds12 5-paper-seed2 6-wide-shared-seed0 7-wide-shared-seeds12"
# LANES (default 2, one per core) processes each go through every phase in order, one run at a time. A run
# one lane is training is locked, so the others skip it ("left to another process") and take the next: when
# a phase has fewer runs left than lanes, the free lane starts the next phase instead of waiting (on
# 2026-12-04 phase 2 had only BatchEnsemble left, ~2.5 hours on one core). The order still holds: a lane
# starts a phase only when every run of the phases before it is complete or being trained.
lane() {
    for phase in $PHASES; do
        case $phase in 6-*|7-*) bin=$WIDE ;; *) bin=$BIN ;; esac
        "$bin" sweep "results/reference/$phase.toml" --executor local --workers 1
    done 2>&1 | sed -u "s/^/[lane $1] /"
}
pids=()
for i in $(seq "${LANES:-2}"); do
    lane "$i" &
    pids+=($!)
    sleep 10          # the next lane lists the runs after this one has locked its first
done
for p in "${pids[@]}"; do wait "$p"; done    # a lane whose run failed stops there (set -e: so does make.sh)
"$POST" leaderboard results/reference/runs -o results/reference/leaderboard.csv
"$POST" report results/reference/runs -o results/reference/report
python results/reference/budget_check.py
python results/reference/latency.py "$POST"     # batch-1 latency with nothing else running (README: Latency)
