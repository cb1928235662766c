#!/usr/bin/env bash
# The development leaderboard, from the repository root: sweep (2 local worker processes, 1 thread
# each), then the leaderboard table and the report with figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
ensemble-bench sweep results/dev-leaderboard/spec.toml --executor local --workers 2
ensemble-bench leaderboard results/dev-leaderboard/runs -o results/dev-leaderboard/leaderboard.csv
ensemble-bench report results/dev-leaderboard/runs -o results/dev-leaderboard/report
