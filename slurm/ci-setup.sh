#!/usr/bin/env bash
# CI: install Debian's Slurm packages (if missing) and start the local single-node cluster, so that
# tests/test_slurm.py runs against a real Slurm. Stop it with `bash slurm/localcluster.sh down`
# (the daemons detach: .ci/run sets `trap ... down EXIT` before calling this).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
t0=$(date +%s)
bash "$here/localcluster.sh" install
bash "$here/localcluster.sh" up
echo "ci-setup: Slurm installed and up in $(( $(date +%s) - t0 )) s"
