#!/usr/bin/env bash
# Continue the reference sweep where the last session left it, or stop it for the session's end: the steps of
# README "Making it" as one command, from any folder of this checkout (idempotent: what exists is kept, what
# runs is left running).
#
#   bash results/reference/continue.sh        # pinned worktree at 879fd50 (created if missing), make.sh's two
#                                              # lanes and the save loop (each started unless already running)
#   bash results/reference/continue.sh stop   # stop the save loop, then save everything (FORCE_SAVE=1)
#
# The sweep itself is not stopped by `stop`: a session's end kills it, and the next session resumes it from the
# checkpoints the save committed. Files outside the checkout, beside it: ../ref-sweep (the worktree),
# ../ref-bench.sh (the pinned code's wrapper), ../ref-sweep.log, ../save-loop.log, ../ref-save-since (the
# commit this session's saves amend onto: save.sh's SAVE_SINCE).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PIN=879fd50
WT=$(dirname "$ROOT")/ref-sweep
PARENT=$(dirname "$ROOT")
LOOP='while sleep 900; do bash results/reference/save.sh; done'

if [ "${1:-start}" = stop ]; then
    pkill -f "$LOOP" || true
    [ -f "$PARENT/ref-save-since" ] || { echo "continue.sh stop: no $PARENT/ref-save-since (was the sweep started with continue.sh?)" >&2; exit 2; }
    FORCE_SAVE=1 SAVE_SINCE=$(cat "$PARENT/ref-save-since") bash results/reference/save.sh
    exit 0
fi
[ "${1:-start}" = start ] || { echo "usage: continue.sh [start|stop]" >&2; exit 2; }
[ -x .venv/bin/ensemble-bench ] || { echo "continue.sh: no .venv/bin/ensemble-bench in $ROOT: install first (README)" >&2; exit 2; }

running=""   # a make.sh working in this checkout's worktree (another checkout's sweep is not this one)
for pid in $(pgrep -f "results/reference/make.sh" || true); do
    [ -d "$WT" ] && [ "$(readlink "/proc/$pid/cwd" || true)" = "$(cd "$WT" && pwd -P)" ] && running=$pid
done
if [ -n "$running" ]; then
    echo "continue.sh: make.sh is already running (log: $PARENT/ref-sweep.log)"
else
    if [ ! -d "$WT" ]; then
        git worktree prune
        git worktree add --detach "$WT" "$PIN"
    fi
    [ "$(git -C "$WT" rev-parse --short=7 HEAD)" = "$PIN" ] || { echo "continue.sh: $WT is not at $PIN" >&2; exit 2; }
    cp results/reference/[0-7]*-*.toml results/reference/{make.sh,budget_check.py,latency.py,pinned.py} "$WT/results/reference/"
    if [ ! -L "$WT/results/reference/runs" ]; then
        rm -rf "$WT/results/reference/runs"
        ln -s "$ROOT/results/reference/runs" "$WT/results/reference/runs"
    fi
    printf '#!/usr/bin/env bash\ncd %s\nexec %s/.venv/bin/python %s/results/reference/pinned.py "$@"\n' "$WT" "$ROOT" "$WT" \
        > "$PARENT/ref-bench.sh"
    chmod +x "$PARENT/ref-bench.sh"
    (cd "$WT" && ENSEMBLE_BENCH="$PARENT/ref-bench.sh" ENSEMBLE_BENCH_POST="$ROOT/.venv/bin/ensemble-bench" \
        nohup bash results/reference/make.sh >> "$PARENT/ref-sweep.log" 2>&1 &)
    echo "continue.sh: make.sh started in $WT (log: $PARENT/ref-sweep.log)"
fi

if pgrep -f "$LOOP" >/dev/null; then
    echo "continue.sh: the save loop is already running (since $(cat "$PARENT/ref-save-since" 2>/dev/null || echo '?'))"
else
    git rev-parse HEAD > "$PARENT/ref-save-since"
    (SAVE_SINCE=$(cat "$PARENT/ref-save-since") nohup bash -c "$LOOP" >> "$PARENT/save-loop.log" 2>&1 &)
    echo "continue.sh: save loop started (every 15 min; log: $PARENT/save-loop.log); before the session stops:" \
         "bash results/reference/continue.sh stop"
fi
