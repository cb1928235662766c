"""Latency noise: how much does the suite's batch-1 latency move when it is measured again?

For every config (a method with its default options, or ``--set method.key=value``, on each of
``--backbones``; plus the plain backbone as a reference row), the deployed model is built untrained
(``ensemble_bench.runner.build_for_cost``) and ``ensemble_bench.cost.measure_latency`` (batch 1, median of
``--runs`` timed forwards after ``--warmup``; CUDA events on GPU, perf_counter on CPU) is repeated
``--repeats`` times. Per config it reports the median of the repeated medians and their spread:

  spread_pct   (max - min) / median of the R medians, in %   (issue 9's GPU target: < 3%)
  cv_pct       sample standard deviation / mean of the R medians, in %
  within_pct   mean over the repeats of (p90 - p10) / median of one measurement's runs, in %

``--order interleaved`` (default) measures config 1, 2, ..., n, then again 1, 2, ..., n, R times, so the
spread includes drift over the whole session, as between runs of a sweep; ``--order blocked`` repeats
each config R times back to back (the noise of one measurement alone).

    python benchmarks/latency_noise.py --device cpu --backbones resnet20
    python benchmarks/latency_noise.py --device cuda --backbones resnet20,resnet18 --bf16 --channels-last
Writes results/bench_latency_noise_<cpu|cuda>.{md,csv} (``--out`` for another folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the shared helpers of throughput.py

import throughput as tp  # noqa: E402

from ensemble_bench import cost  # noqa: E402
from ensemble_bench.backbones import build_backbone, check_name  # noqa: E402
from ensemble_bench.errors import UsageError  # noqa: E402
from ensemble_bench.runner import build_for_cost, resolve_device  # noqa: E402

TARGET_PCT = 3.0


def stats(meds: list[float], within: list[float]) -> dict[str, Any]:
    mid = statistics.median(meds)
    mean = statistics.fmean(meds)
    return {"latency_ms": mid, "min_ms": min(meds), "max_ms": max(meds),
            "spread_pct": 100 * (max(meds) - min(meds)) / mid if mid > 0 else float("nan"),
            "cv_pct": 100 * statistics.stdev(meds) / mean if len(meds) > 1 and mean > 0 else float("nan"),
            "within_pct": statistics.fmean(within) if within else float("nan"),
            "medians_ms": [round(m, 5) for m in meds]}


def pct(v: Any, spec: str) -> str:
    s = tp.fmt(v, spec)
    return s if s == "-" else s + "%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tp.config_args(ap)
    ap.add_argument("--backbones", default="resnet20", help="comma-separated backbones")
    ap.add_argument("--no-bare", action="store_true", help="skip the plain-backbone reference rows")
    ap.add_argument("--repeats", type=int, default=10, help="R: latency measurements per config")
    ap.add_argument("--runs", type=int, default=50, help="timed forwards per measurement (the spec: >= 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed forwards before each measurement")
    ap.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time the replay of the forward captured as a CUDA graph: the GPU's time without the "
                         "host's kernel launches (a diagnostic; records keep the eager forward's latency)")
    tp.machine_args(ap)
    return tp.run_cli(ap, run, argv)


def run(args, argv_used: list[str]) -> int:
    for k in ("image_size", "in_channels", "repeats", "runs"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.num_classes < 2:
        raise UsageError("--num-classes must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbones:
        raise UsageError("--backbones is empty")
    for b in backbones:
        check_name(b)
    dev = resolve_device(args.device)
    if dev.type != "cuda" and (args.bf16 or args.channels_last or args.cudnn_benchmark or args.cuda_graph):
        raise UsageError("--bf16, --channels-last, --cudnn-benchmark and --cuda-graph apply on CUDA only")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    known, problems = tp.load_registry()
    chosen = tp.select_methods(args.methods, known)
    sets = tp.parse_sets(args.sets, known)
    if args.methods:
        problems = {}
    setting = tp.Setting(args.bf16, args.channels_last)
    label = setting.label + (" + CUDA graph" if args.cuda_graph else "")
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device {cost.device_name(dev)}; torch {torch.__version__}; backbones {', '.join(backbones)}; "
          f"methods: {', '.join(chosen)}", flush=True)
    for mod, err in problems.items():
        print(f"warning: methods/{mod}.py failed to import: {err}", file=sys.stderr, flush=True)
    t_all = time.perf_counter()

    # ---- build every config once ------------------------------------------------------------------
    configs: list[dict[str, Any]] = []
    for backbone in backbones:
        entries = ([] if args.no_bare else [None]) + list(chosen)
        for name in entries:
            overrides = sets.get(name, {}) if name else {}
            row: dict[str, Any] = {"backbone": backbone, "method": name or "(bare backbone)",
                                   "options": ", ".join(f"{k}={v}" for k, v in overrides.items()) or
                                   ("" if name is None else "defaults"),
                                   "setting": label, "status": "ok", "error": ""}
            model = None
            try:
                torch.manual_seed(0)
                if name is None:
                    model = build_backbone(backbone, args.num_classes, args.in_channels).to(dev).eval()
                else:
                    model = build_for_cost(name, backbone, args.num_classes, args.in_channels, args.image_size,
                                           overrides, dev)
                if setting.channels_last:
                    model.to(memory_format=torch.channels_last)
                row["num_members"] = int(getattr(model, "num_members", 1))
            except Exception as e:  # noqa: BLE001  reported in the table, never a crash
                row.update(status=f"build failed for {backbone}", error=tp.short_error(e))
                model = None
                tp.release(dev)
            configs.append({"row": row, "model": model, "meds": [], "within": [], "errors": []})

    # ---- repeated measurements ----------------------------------------------------------------------
    live = [c for c in configs if c["model"] is not None]
    x1 = torch.randn(1, args.in_channels, args.image_size, args.image_size, device=dev)

    def measure_once(c: dict[str, Any]) -> None:
        if c["errors"]:
            return
        try:
            r = cost.measure_latency(c["model"], x1, dev, runs=args.runs, warmup=args.warmup,
                                     bf16=setting.bf16, channels_last=setting.channels_last,
                                     cuda_graph=args.cuda_graph)
        except Exception as e:  # noqa: BLE001
            c["errors"].append(tp.short_error(e))
            tp.release(dev)
            return
        c["meds"].append(r["latency_ms"])
        if r["latency_ms"] > 0:
            c["within"].append(100 * (r["latency_ms_p90"] - r["latency_ms_p10"]) / r["latency_ms"])

    if args.order == "interleaved":
        for i in range(args.repeats):
            for c in live:
                measure_once(c)
            print(f"repeat {i + 1}/{args.repeats} done ({time.perf_counter() - t_all:.0f}s)", flush=True)
    else:
        for c in live:
            for _ in range(args.repeats):
                measure_once(c)
            print(f"{c['row']['backbone']} / {c['row']['method']} done ({time.perf_counter() - t_all:.0f}s)",
                  flush=True)

    rows = []
    for c in configs:
        row = c["row"]
        if c["meds"]:
            row.update(stats(c["meds"], c["within"]))
            row["repeats"] = len(c["meds"])
            row["below_target"] = bool(row["spread_pct"] < TARGET_PCT)
        if c["errors"]:
            row.update(status="failed" if not c["meds"] else "partial", error="; ".join(c["errors"]))
        rows.append(row)
        c["model"] = None
    tp.release(dev)
    wall = time.perf_counter() - t_all

    # ---- report -------------------------------------------------------------------------------------
    lines = [f"# Latency noise: {args.repeats} repeated batch-1 latency measurements per config "
             f"({cost.device_name(dev)})", ""]
    lines += tp.environment_lines(dev, args, argv_used, load0)
    lines += [f"- each measurement: ensemble_bench.cost.measure_latency, median of {args.runs} timed forwards after "
              f"{args.warmup} warm-up ({'CUDA events' if dev.type == 'cuda' else 'perf_counter'}), "
              f"{label}, untrained deployed models; order {args.order}"
              + (" (fewer than the 50 runs of the metric spec: a quick check, not a recorded number)"
                 if args.runs < 50 else ""),
              f"- spread = (max - min) / median of the {args.repeats} medians; CV = stdev / mean of the medians; "
              f"within = mean (p90 - p10) / median inside one measurement. Target on GPU: spread < {TARGET_PCT:g}%",
              f"- total wall time {wall:.0f} s", "",
              "| backbone | method | options | M | latency ms (median) | min - max ms | spread | CV | within | "
              f"spread < {TARGET_PCT:g}% | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("below_target")
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['options']} | {tp.fmt(r.get('num_members'))} | "
            f"{tp.fmt(r.get('latency_ms'), '.4g')} | "
            + ("-" if r.get("min_ms") is None else f"{r['min_ms']:.4g} - {r['max_ms']:.4g}")
            + f" | {pct(r.get('spread_pct'), '.2f')} | {pct(r.get('cv_pct'), '.2f')} | "
              f"{pct(r.get('within_pct'), '.1f')} | {'-' if ok is None else ('yes' if ok else 'no')} | "
              f"{r['status'] + (': ' + r['error'] if r.get('error') else '')} |")
    if problems:
        lines += ["", "Method files that failed to import (their methods are missing above):"]
        lines += [f"- methods/{k}.py: {v}" for k, v in problems.items()]
    measured = [r for r in rows if r.get("spread_pct") is not None]
    if measured:
        n_ok = sum(bool(r["below_target"]) for r in measured)
        worst = max(measured, key=lambda r: r["spread_pct"])
        lines += ["", f"- {n_ok} of {len(measured)} configs with a spread under {TARGET_PCT:g}%; worst: "
                      f"{worst['backbone']} / {worst['method']} at {worst['spread_pct']:.2f}%; "
                      f"median spread {statistics.median(r['spread_pct'] for r in measured):.2f}%"]
    csv_path, md_path = tp.write_table(Path(args.out), f"bench_latency_noise_{dev.type}" + ("_graph" if args.cuda_graph else ""), rows, lines, dev,
                                       ("backbone", "method", "options", "setting", "num_members", "latency_ms",
                                        "min_ms", "max_ms", "spread_pct", "cv_pct", "within_pct", "below_target",
                                        "repeats", "medians_ms", "status", "error"))
    print()
    print("\n".join(lines))
    print(f"\nwrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
