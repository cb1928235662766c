"""What ``--compile`` buys a CPU run: one training step (forward, cross-entropy, backward, SGD with momentum)
of a backbone, eager against ``torch.compile`` (inductor's C++ kernels), and what the compilation costs.

Per backbone, eager and compiled alternate ``--repeats`` times, each on a freshly built model. Inductor's
on-disk cache starts empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so the first compiled build pays the whole
C++ compilation, as a user's first run does; later builds reuse the cache, as later runs on that machine do.
A row: the wall time of the first two steps (the compilation, which runs in compiler subprocesses that
process CPU time does not see) and the median of ``--steps`` steps after them in process CPU time (what the
step costs; on a shared machine its wall time is the share it got, also in the table). The images are
random: the step's cost does not depend on them.

    OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py --backbones resnet8,resnet8x2
Writes results/bench_compile_cpu.{md,csv}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the shared helpers of throughput.py
import throughput as tp  # noqa: E402

from ensemble_bench.backbones import build_backbone  # noqa: E402


def measure(backbone: str, compiled: bool, batch: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model = build_backbone(backbone, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    w0 = time.perf_counter()
    step()
    step()
    first_wall = time.perf_counter() - w0
    cpu, wall = [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"backbone": backbone, "mode": "compiled" if compiled else "eager", "batch": batch,
            "first_two_steps_wall_s": first_wall,
            "step_cpu_s": statistics.median(cpu), "step_wall_s": statistics.median(wall), "steps": steps}


def run(args, argv_used: list[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")   # read when it compiles
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for backbone in args.backbones.split(","):
        for rep in range(args.repeats):
            for compiled in (False, True):
                r = measure(backbone, compiled, args.batch, args.steps, rep)
                r["repeat"] = rep
                rows.append(r)
                print(f"{backbone} {r['mode']:8s} repeat {rep}: first two steps {r['first_two_steps_wall_s']:.1f} s "
                      f"wall, then {r['step_cpu_s']:.4f} s CPU a step", flush=True)
    lines = ["# --compile on the CPU: one training step, eager vs torch.compile", "",
             *tp.environment_lines(torch.device("cpu"), args, argv_used, load0), "",
             "| backbone | repeat | eager step (CPU s) | compiled step (CPU s) | speed-up | compiled: first two steps "
             "(wall s) | eager step (wall s) | compiled step (wall s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e, c in zip(rows[::2], rows[1::2]):
        lines.append(f"| {e['backbone']} | {e['repeat']} | {e['step_cpu_s']:.4f} | {c['step_cpu_s']:.4f} | "
                     f"{e['step_cpu_s'] / c['step_cpu_s']:.2f}x | {c['first_two_steps_wall_s']:.1f} | "
                     f"{e['step_wall_s']:.4f} | {c['step_wall_s']:.4f} |")
    lines += ["", f"Batch {args.batch}, median of {args.steps} steps after the first two. Inductor's cache started "
              "empty: the first compiled build (the first backbone's repeat 0) paid the whole C++ compilation; a "
              "later build reuses the cache (kernels of an earlier backbone too), as a later run on the same "
              "machine would."]
    csv_path, md_path = tp.write_table(Path(args.out), "bench_compile_cpu", rows, lines, torch.device("cpu"),
                                       first=("backbone", "mode", "repeat"))
    print("\n".join(lines))
    print(f"wrote {md_path} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="resnet8,resnet8x2", help="comma-separated registered backbones")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25, help="timed steps after the first two")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--note", help="a line for the table, e.g. 'two sweep lanes on the other cores'")
    ap.add_argument("--out", default="results")
    return tp.run_cli(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
