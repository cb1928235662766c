"""Batch-1 latency of every reference configuration on an idle CPU (README: "Latency").

The latencies in the records are measured at the end of each run, while the sweep's other worker trains on
the other core: most of them show a busy machine (the leaderboard marks them with a dagger). Latency does not
depend on the trained weights (the sparse methods run dense kernels), so this script times the untrained
architectures instead, one after the other, with `ensemble-bench cost --latency` on one thread. Run it with
nothing else running (pause or finish the sweep first); it writes latency_idle.json and latency_idle.md (the
table it prints). On the project's 2-core VM even an idle machine is noisy: the median of 300 forwards of the
same ResNet-8 moved between 1.19 and 1.91 ms from one batch of runs to the next, so the table marks spreads as
the leaderboard does (†) and the README reads latency for direction only.

    python results/reference/latency.py [ENSEMBLE_BENCH]     # from the repository root, ~7 minutes on the 2-core VM
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUSY = 0.5          # (p90 - p10) / median above this: a busy machine (the leaderboard's LATENCY_BUSY_SPREAD)
RUNS = 200
# (label, method, options): the configurations of the shared grid (2-shared-seed0.toml) and the wide backbone
CONFIGS = [("single", "single", {}), *[(f"deep_ensemble M={m}", "deep_ensemble", {"num_members": m}) for m in (2, 3, 4)],
           ("packed", "packed", {}), ("mimo", "mimo", {}), ("dst_ensemble", "dst_ensemble", {}),
           ("edst_ensemble", "edst_ensemble", {}), ("nfe", "nfe", {}), ("bridge", "bridge", {}),
           ("batch_ensemble", "batch_ensemble", {}), ("mc_dropout", "mc_dropout", {}), ("snapshot", "snapshot", {})]
BACKBONES = ["resnet8", "resnet8x2"]
WIDE = {"single", "deep_ensemble", "packed", "mimo"}     # 6-wide-shared-seed0.toml, 7-wide-shared-seeds12.toml


def measure(exe: list[str], backbone: str, method: str, options: dict) -> dict:
    cmd = [*exe, "cost", "--method", method, "--backbone", backbone, "--dataset", "cifar10", "--latency",
           "--runs", str(RUNS), "--device", "cpu"]
    for k, v in options.items():
        cmd += ["--set", f"{k}={v}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return json.loads(out[out.index("{"):])


def main() -> int:
    exe = [sys.argv[1]] if len(sys.argv) > 1 else ["ensemble-bench"]
    rows = []
    for backbone in BACKBONES:
        for label, method, options in CONFIGS:
            if backbone != "resnet8" and method not in WIDE:
                continue
            c = measure(exe, backbone, method, options)
            spread = (c["latency_ms_p90"] - c["latency_ms_p10"]) / c["latency_ms"]
            rows.append({"backbone": backbone, "config": label, "method": method, "options": options,
                         "num_members": c["num_members"], "mflops": c["flops"] / 1e6, "latency_ms": c["latency_ms"],
                         "p10": c["latency_ms_p10"], "p90": c["latency_ms_p90"], "spread": spread,
                         "throughput": c["throughput"], "device": c["latency_device"]})
            print(f"{backbone:10s} {label:22s} {c['latency_ms']:7.2f} ms (p10 {c['latency_ms_p10']:.2f}, "
                  f"p90 {c['latency_ms_p90']:.2f})", file=sys.stderr)
    table = ["| backbone | config | M | inference MFLOPs | latency (ms, batch 1, median) | p10 | p90 | "
             "throughput (img/s) |", "|:---|:---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['backbone']} | {r['config']} | {r['num_members']} | {r['mflops']:.1f} | "
                     f"{r['latency_ms']:.2f}{' †' if r['spread'] > BUSY else ''} | {r['p10']:.2f} | {r['p90']:.2f} | "
                     f"{r['throughput']:.0f} |")
    table.append(f"\n{rows[0]['device']}; {RUNS} timed batch-1 forwards per config after warm-up, one config after "
                 f"the other with nothing else running. † spread (p90 - p10) / median above {BUSY:.0%}.")
    print("\n".join(table))
    (HERE / "latency_idle.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "latency_idle.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
