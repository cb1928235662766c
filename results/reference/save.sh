#!/usr/bin/env bash
# Commit what the reference sweep has made so far, so that the next session continues it from a fresh clone:
#  - every complete record (<run_id>.json, .curves.csv, .preds.npz, .weights.safetensors);
#  - the resume state of the unfinished runs (runs/.ckpt/<run_id>/*.pt, one file per stage, rewritten
#    atomically after every epoch) and the stage store (runs/.members/*.pt, the plain stages that later runs
#    reuse). Both are ignored by .gitignore everywhere else and are force-added here; a run that completes
#    deletes its checkpoints, and the next save removes them from git too.
# Records still running (status "running") are not committed: their checkpoints are what resumes them.
# From the repository root (or anywhere: it changes to it). Commits only these paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/reference/runs
mapfile -t done_ids < <(python3 - "$R" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        if json.loads(f.read_text()).get("status") == "complete":
            print(f.stem)
    except (ValueError, OSError):
        pass          # a record being rewritten at this moment: the next save takes it
EOF
)
paths=()
for id in "${done_ids[@]}"; do
    for ext in json curves.csv preds.npz weights.safetensors; do
        [[ -e "$R/$id.$ext" ]] && paths+=("$R/$id.$ext")
    done
done
[[ ${#paths[@]} -gt 0 ]] && git add -- "${paths[@]}"
mapfile -t state < <(find "$R/.ckpt" "$R/.members" -name '*.pt' 2>/dev/null)
mapfile -t gone < <(git ls-files -d -- "$R/.ckpt" "$R/.members")     # committed, then deleted: run completed
[[ ${#state[@]} -gt 0 ]] && git add -f -- "${state[@]}"
[[ ${#gone[@]} -gt 0 ]] && git rm -q --cached -- "${gone[@]}"
# Checkpoints change every epoch and each committed version stays in the history: with SAVE_SINCE=<the commit
# the session started from>, a save right after another save of this session amends it, so a session adds
# one version of each checkpoint, not one per save (commits before SAVE_SINCE have landed: never amended).
base=HEAD
if [[ -n "${SAVE_SINCE:-}" ]] && [[ "$(git rev-parse HEAD)" != "$(git rev-parse "$SAVE_SINCE")" ]] \
        && git merge-base --is-ancestor "$SAVE_SINCE" HEAD \
        && git log -1 --format=%s HEAD | grep -Eq '^Reference sweep: [0-9]+ new complete record'; then
    base=HEAD~1
fi
if git diff --cached --quiet; then
    echo "save.sh: nothing new"
    exit 0
fi
n_rec=$(git diff --cached --name-only --diff-filter=A "$base" -- "$R/*.json" | wc -l)
# A save that cannot amend (other commits came after this session's last save) adds a new version of every
# checkpoint to the history. With no new record, such a save waits until SAVE_CKPT_EVERY seconds (default
# 3600) have passed since this session's last save; FORCE_SAVE=1 (the save before a session stops) never waits.
if [[ "$base" == HEAD && "$n_rec" -eq 0 && "${FORCE_SAVE:-0}" != 1 && -n "${SAVE_SINCE:-}" ]]; then
    last=$(git log -1 --format=%ct --grep='^Reference sweep: [0-9]* new complete record' "$SAVE_SINCE"..HEAD)
    if [[ -n "$last" ]] && (( $(date +%s) - last < ${SAVE_CKPT_EVERY:-3600} )); then
        git reset -q -- "$R"
        echo "save.sh: checkpoints only, this session's last save $(( $(date +%s) - last )) s ago: not yet"
        exit 0
    fi
fi
n_ckpt=$(git diff --cached --name-only "$base" -- "$R/.ckpt" | wc -l)
n_mem=$(git diff --cached --name-only "$base" -- "$R/.members" | wc -l)
msg="Reference sweep: $n_rec new complete record(s); resume state: $n_ckpt checkpoint file(s) changed, $n_mem stage-store file(s) changed"
detail="$(git diff --cached --name-status "$base" -- "$R" | sed 's/^/  /')"
if [[ "$base" == HEAD~1 ]]; then
    git commit -q --amend -m "$msg" -m "$detail"
else
    git commit -q -m "$msg" -m "$detail"
fi
git log --oneline -1
