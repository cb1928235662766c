#!/usr/bin/env bash
# Continue the reference sweep where the last session left it, or stop it for the session's end: the steps of
# README "Making it" as one command, from any folder of this checkout (idempotent: what exists is kept, what
# runs is left running).
#
#   bash results/reference/continue.sh        # pinned worktree at 879fd50 (created if missing), an installed copy
#                                              # of e3e6bb1 for phases 6-7 (made if missing), make.sh's two lanes
#                                              # and the save loop (each started unless already running)
#   bash results/reference/continue.sh stop   # stop the save loop, then save everything (FORCE_SAVE=1)
#
# The sweep itself is not stopped by `stop`: a session's end kills it, and the next session resumes it from the
# checkpoints the save committed. Files outside the checkout, beside it: ../ref-sweep (the worktree),
# ../ref-bench.sh (the pinned code's wrapper), ../ref-wide-pkgs and ../ref-bench-wide.sh (phases 6-7's code
# and its wrapper), ../ref-sweep.log, ../save-loop.log, ../ref-save-since (the
# commit this session's saves amend onto: save.sh's SAVE_SINCE).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PIN=879fd50          # the code of phases 0-5 (ResNet-8)
WIDE_PIN=e3e6bb1     # the code of phases 6-7 (ResNet-8x2, compiled on the CPU: README, Pace)
WT=$(dirname "$ROOT")/ref-sweep
PARENT=$(dirname "$ROOT")
WIDE_PKGS=$PARENT/ref-wide-pkgs
LOOP='while sleep 900; do bash results/reference/save.sh; done'

mine() {   # the pids of processes matching $1 whose working folder is $2 (another checkout's are not ours)
    local pid want
    want=$(cd "$2" 2>/dev/null && pwd -P) || return 0
    for pid in $(pgrep -f "$1" || true); do
        [ "$(readlink "/proc/$pid/cwd" || true)" = "$want" ] && echo "$pid"
    done
    return 0
}

if [ "${1:-start}" = stop ]; then
    loops=$(mine "$LOOP" "$ROOT")
    since=$(git rev-parse HEAD)   # no loop of this session: a new save commit, never an amend of an older one
    if [ -n "$loops" ]; then
        kill $loops
        [ -f "$PARENT/ref-save-since" ] && since=$(cat "$PARENT/ref-save-since")
    fi
    for _ in $(seq 120); do   # a save the loop had started finishes first (two saves would race on git's index)
        [ -z "$(mine "results/reference/save.sh" "$ROOT")" ] && break
        sleep 1
    done
    FORCE_SAVE=1 SAVE_SINCE=$since bash results/reference/save.sh
    exit 0
fi
[ "${1:-start}" = start ] || { echo "usage: continue.sh [start|stop]" >&2; exit 2; }
[ -x .venv/bin/ensemble-bench ] || { echo "continue.sh: no .venv/bin/ensemble-bench in $ROOT: install first (README)" >&2; exit 2; }

if [ -n "$(mine "results/reference/make.sh" "$WT")" ]; then
    echo "continue.sh: make.sh is already running (log: $PARENT/ref-sweep.log)"
else
    if [ ! -d "$WT" ]; then
        git worktree prune
        git worktree add --detach "$WT" "$PIN"
    fi
    [ "$(git -C "$WT" rev-parse HEAD)" = "$(git rev-parse "$PIN^{commit}")" ] || { echo "continue.sh: $WT is not at $PIN" >&2; exit 2; }
    cp results/reference/[0-7]*-*.toml results/reference/{make.sh,budget_check.py,latency.py,pinned.py} "$WT/results/reference/"
    if [ ! -L "$WT/results/reference/runs" ]; then
        if [ -n "$(git -C "$WT" status --porcelain --untracked-files=all -- results/reference/runs)" ]; then
            echo "continue.sh: $WT/results/reference/runs holds files git does not have: move them away first" >&2
            exit 2
        fi
        rm -rf "$WT/results/reference/runs"
        ln -s "$ROOT/results/reference/runs" "$WT/results/reference/runs"
    fi
    printf '#!/usr/bin/env bash\ncd %q\nexec %q %q "$@"\n' "$WT" "$ROOT/.venv/bin/python" "$WT/results/reference/pinned.py" \
        > "$PARENT/ref-bench.sh"
    chmod +x "$PARENT/ref-bench.sh"
    # phases 6-7: an installed copy (pip install --target) of WIDE_PIN's package, run from the same folder
    want=$(git rev-parse "$WIDE_PIN^{commit}")
    if [ "$(cat "$WIDE_PKGS/PIN" 2>/dev/null || true)" != "$want" ]; then
        src=$(mktemp -d)
        git archive "$want" pyproject.toml README.md benchmark methods | tar -x -C "$src"
        rm -rf "$WIDE_PKGS"
        "$ROOT/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation --target "$WIDE_PKGS" "$src"
        rm -rf "$src"
        echo "$want" > "$WIDE_PKGS/PIN"
    fi
    printf '#!/usr/bin/env bash\ncd %q\nPYTHONPATH=%q exec %q -m ensemble_bench "$@"\n' "$WT" "$WIDE_PKGS" \
        "$ROOT/.venv/bin/python" > "$PARENT/ref-bench-wide.sh"
    chmod +x "$PARENT/ref-bench-wide.sh"
    (cd "$WT" && ENSEMBLE_BENCH="$PARENT/ref-bench.sh" ENSEMBLE_BENCH_WIDE="$PARENT/ref-bench-wide.sh" \
        ENSEMBLE_BENCH_POST="$ROOT/.venv/bin/ensemble-bench" nohup bash results/reference/make.sh >> "$PARENT/ref-sweep.log" 2>&1 &)
    echo "continue.sh: make.sh started in $WT (log: $PARENT/ref-sweep.log)"
fi

if [ -n "$(mine "$LOOP" "$ROOT")" ]; then
    echo "continue.sh: the save loop is already running (since $(cat "$PARENT/ref-save-since" 2>/dev/null || echo '?'))"
else
    git rev-parse HEAD > "$PARENT/ref-save-since"
    (SAVE_SINCE=$(cat "$PARENT/ref-save-since") nohup bash -c "$LOOP" >> "$PARENT/save-loop.log" 2>&1 &)
    echo "continue.sh: save loop started (every 15 min; log: $PARENT/save-loop.log); before the session stops:" \
         "bash results/reference/continue.sh stop"
fi
