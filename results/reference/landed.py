"""Every complete record of the reference sweep, one line each, in the order they landed (README: "Landed so
far"): what it trained (method, options and recipe as they depart from the folder's most common), its test
accuracy / NLL / ECE and temperature-scaled NLL, its own convergence verdict with the evidence (the record
alone: the leaderboard also pools seeds and compares budgets), the stages it reused and where it trained.

    .venv/bin/python results/reference/landed.py                  # from the repository root: markdown to stdout
    .venv/bin/python results/reference/landed.py -o results/reference/landed.md

It reads the records with the current code (as the leaderboard does), never trains, and takes a few seconds.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ensemble_bench import columns, records
from ensemble_bench.formatting import md_cell, non_default_options, options_text

RUNS = Path(__file__).resolve().parent / "runs"


def machine(device: object) -> str:
    """A training device without what every record here shares: "Intel Xeon @ 2.80GHz", "AMD EPYC"."""
    parts = []
    for d in str(device or "?").split(" + "):
        d = re.sub(r"\(R\)|^cpu: | Processor| \(\d+ threads?\)", "", d)
        parts.append(re.sub(r"\s+", " ", d).strip())
    return " + ".join(parts)


def table(recs: list[dict]) -> str:
    recs = sorted(recs, key=lambda r: str((r.get("timings") or {}).get("finished")))
    flat = [columns.flatten_record(r) for r in recs]
    recipes = [f["recipe"] for f in flat]
    common = columns.common_recipe(recipes)
    departs = columns.recipe_differences(recipes, against_common=True, common=common)
    lines = ["recipe: – = " + (", ".join(f"{k}={v}" for k, v in common.items()) or "the same for all"), "",
             "| finished (UTC) | run id | method | options | epochs | batch / lr | recipe | seed | acc (%) / NLL / ECE (%) | "
             "NLL TS | converged (this record's curves) | reused stages | trained on |",
             "|---|---|---|---|---:|---:|---|---:|---|---:|---|---|---|"]
    for rec, f, recipe in zip(recs, flat, departs):
        verdict = columns.verdict_text(columns.record_trends(rec), no="**no**")
        training = rec.get("training") or {}
        reused = ", ".join(sorted(training.get("reused_stages") or {})) or "–"
        cells = [str((rec.get("timings") or {}).get("finished", "?"))[:16].replace("T", " "), f"`{f['run_id']}`",
                 str(f["method"]), options_text(non_default_options(f["method"], f["config_key"]), empty="–"),
                 f"{f['epochs']}", f"{f['batch_size']} / {f['lr']}", recipe or "–", f"{f['seed']}",
                 f"{100 * f['acc']:.2f} / {f['nll']:.3f} / {100 * f['ece']:.2f}",
                 f"{f['nll_ts']:.3f}" if f["nll_ts"] == f["nll_ts"] else "–", verdict, reused,
                 machine(training.get("device"))]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", default=str(RUNS), help="records folder (default: this folder's runs/)")
    ap.add_argument("-o", "--output", help="write the table here instead of stdout")
    args = ap.parse_args(argv)
    recs, problems = records.load_records(args.runs, statuses=None)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    complete = [r for r in recs if r.get("status") == "complete"]
    text = (f"{len(complete)} complete records in `{Path(args.runs).name}/` "
            f"({len(recs) - len(complete)} not complete: running, stopped or failed, not listed).\n\n" + table(complete))
    if args.output:
        records.write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
