"""The reference leaderboard's budget check (README: "Budget rule"), from the records in runs/.

For the single model and DE-2 at 30 and 60 epochs, and the single model at 60 and 120 (seed 0, shared recipe,
ResNet-8, CIFAR-10 dev copy), it prints each member's final validation accuracy and NLL (the rule's data: the
held-out 1,900 training images) and the record's test accuracy / NLL (reported beside the decision, not used
for it), then the rule's verdict per budget: E epochs stands if 2E improves every compared validation NLL by
less than 3 % relative.

    python results/reference/budget_check.py          # from the repository root; standard library only
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"
THRESHOLD = 0.03   # relative validation-NLL gain that makes 30 epochs underfit (fixed before the results)


def find(method: str, epochs: int, members: int) -> dict | None:
    """The complete seed-0 shared-recipe ResNet-8 record of ``method`` with ``members`` members at ``epochs``."""
    for path in sorted(RUNS.glob(f"{method}-*.json")):
        rec = json.loads(path.read_text())
        cfg = rec["config"]
        if (rec["status"] == "complete" and cfg["epochs"] == epochs and cfg["seed"] == 0
                and cfg["backbone"] == "resnet8" and cfg.get("recipe") == "shared"
                and rec["method"].get("num_members", 1) == members):
            return rec
    return None


def final_val(run_id: str) -> dict[str, tuple[float, float]]:
    """Per stage: (validation accuracy, validation NLL) of its last epoch, from ``<run_id>.curves.csv``."""
    last: dict[str, tuple[float, float]] = {}
    with open(RUNS / f"{run_id}.curves.csv", newline="") as f:
        for row in csv.DictReader(f):
            last[row["stage"]] = (float(row["val_acc"]), float(row["val_nll"]))
    return last


# (method, members, shorter budget, longer budget): the comparisons of the budget check, in the order they ran
CHECKS = (("single", 1, 30, 60), ("deep_ensemble", 2, 30, 60), ("single", 1, 60, 120))


def main() -> int:
    gains: dict[int, list[float]] = {}
    for method, members, short_ep, long_ep in CHECKS:
        short, long = find(method, short_ep, members), find(method, long_ep, members)
        label = "single" if members == 1 else f"DE-{members}"
        if short is None or long is None:
            missing = short_ep if short is None else long_ep
            print(f"{label} {short_ep} -> {long_ep} epochs: the {missing}-epoch record is not complete yet")
            continue
        a, b = final_val(short["run_id"]), final_val(long["run_id"])
        for stage in sorted(a):
            gain = (a[stage][1] - b[stage][1]) / a[stage][1]
            gains.setdefault(short_ep, []).append(gain)
            print(f"{label} {stage} {short_ep} -> {long_ep} epochs: validation acc {a[stage][0]:.4f} -> {b[stage][0]:.4f}, "
                  f"NLL {a[stage][1]:.4f} -> {b[stage][1]:.4f} ({100 * gain:+.1f} % better)")
        ma, mb = short["metrics"], long["metrics"]
        print(f"{label} {short_ep} -> {long_ep} epochs, test (not used for the decision): acc {100 * ma['acc']:.2f} -> "
              f"{100 * mb['acc']:.2f} %, NLL {ma['nll']:.4f} -> {mb['nll']:.4f}, ECE {100 * ma['ece']:.2f} -> "
              f"{100 * mb['ece']:.2f} %  ({short['run_id']} -> {long['run_id']})")
    for ep, g in sorted(gains.items()):
        worst = max(g)
        verdict = f"{ep} epochs stands" if worst < THRESHOLD else f"{ep} epochs is underfit"
        print(f"{ep} epochs: largest validation-NLL gain from doubling {100 * worst:.1f} % "
              f"(threshold {100 * THRESHOLD:.0f} %): {verdict}")
    return 0 if gains else 1


if __name__ == "__main__":
    sys.exit(main())
