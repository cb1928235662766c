#!/usr/bin/env bash
# The GPU paths and the GPU benchmarks in one short script, for a lent GPU machine with little time on it.
#
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR
#
# DATA_DIR holds cifar10_train.npz + cifar10_test.npz, svhn.npz and cifar100_test.npz (a slice is enough: the
# runs below train 3 epochs to check the paths and time an epoch, not to rank anything; make one that fits
# the 64 MiB a device call carries with `python benchmarks/slice_data.py ../shared/data .gpu/data --drop
# x_test_exact,test_exact_index`, ignore .gpu/ in .git/info/exclude and carry it). Everything lands in OUT_DIR: log.txt (the whole
# output), runs.txt (one line per record: device, precision, compile, world size, epoch times, accuracy,
# latency with its spread), runs.tgz (the records) and the benchmark tables. Each step has its own time limit
# and a failing step never stops the next, so a partial result still comes back.
#
# Steps, cheapest first:
#   1. the CUDA tests of tests/test_cost.py (CUDA-event latency, bf16, channels_last, peak memory) and
#      tests/test_snapshot.py (a killed run resumed from a checkpoint loaded onto the GPU);
#   2. real runs on DATA_DIR with the suite's CLI: single ResNet-8 with torch.compile (bf16 autocast and
#      channels_last are the config's CUDA defaults), Packed-Ensembles and a deep ensemble of 4 without,
#      and the single run again under torchrun as a 1-rank DDP job (the nccl process group and the synced
#      batch norm on nccl; one GPU cannot host two nccl ranks);
#   3. benchmarks/throughput.py on resnet18, bf16 + channels_last against fp32 (issue 9's target: the suite's
#      training >= 80% of the bare forward+backward);
#   4. benchmarks/latency_noise.py on resnet20 and resnet18 (the target: spread < 3%), the eager forward as
#      records measure it, then its CUDA-graph replay (the GPU's time without the host's kernel launches).
# BENCH_ONLY=1 skips steps 1-2.
set -u
DATA=${1:?DATA_DIR}; OUT=${2:?OUT_DIR}
mkdir -p "$OUT"; RUNS=$(mktemp -d); LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
step() { local limit=$1; shift; echo "=== $(date +%T) [$limit s] $*" | tee -a "$LOG"
         timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== rc ${PIPESTATUS[0]}" | tee -a "$LOG"; }

nvidia-smi -L 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
EB=("$PY" -m ensemble_bench)
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu EPOCHS=1 SKIP_BENCH=1: a dry run of the script's plumbing on a CPU machine
COMMON=(--backbone resnet8 --dataset cifar10 --data-dir "$DATA" --epochs "${EPOCHS:-3}" --device "$DEVICE" --no-progress)
COMPILE=(); [ "$DEVICE" = cuda ] && COMPILE=(--compile)

if [ -z "${BENCH_ONLY:-}" ]; then
step 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cost.py tests/test_snapshot.py -k cuda
step 90 "${EB[@]}" run --method single "${COMMON[@]}" --out "$RUNS/compiled" "${COMPILE[@]}"
step 45 "${EB[@]}" run --method packed "${COMMON[@]}" --out "$RUNS/plain"
step 45 "${EB[@]}" run --method deep_ensemble "${COMMON[@]}" --out "$RUNS/plain"
step 50 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m ensemble_bench run --method single \
    "${COMMON[@]}" --out "$RUNS/ddp"
"$PY" - "$RUNS" <<'EOF' 2>&1 | tee "$OUT/runs.txt" | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("*/*.json")):
    r = json.loads(p.read_text())
    if r.get("status") != "complete":
        print(p.parent.name, p.stem, r.get("status"), (r.get("error") or "")[:300]); continue
    t, c, m = r["training"], r["cost"], r["metrics"]
    ep = [e["epoch_s"] for s in t["stages"].values() for e in s.get("curve", [])]
    print(f"{p.parent.name}/{r['run_id']}: device={t['device']!r} precision={t.get('precision')} compile={r['config']['compile']} "
          f"world={r['config']['effective_recipe'].get('world_size', 1)} epochs={len(ep)} "
          f"epoch_s first={ep[0]:.2f} median_rest={statistics.median(ep[1:] or ep):.2f} train_s={t['train_s']:.1f} "
          f"acc={m['acc']:.4f} nll={m['nll']:.3f} latency_ms={c['latency_ms']:.3f} "
          f"(p10 {c['latency_ms_p10']:.3f}, p90 {c['latency_ms_p90']:.3f}, {c['latency_device']}) "
          f"throughput={c['throughput']:.0f}/s peak_mem_mb={c.get('peak_mem_mb')}")
EOF
tar czf "$OUT/runs.tgz" -C "$RUNS" $(cd "$RUNS" && ls */*.json */*.csv 2>/dev/null)
fi
[ -n "${SKIP_BENCH:-}" ] && exit 0

step 170 "$PY" benchmarks/throughput.py --device cuda --backbone resnet18 --bf16 --channels-last --compare-fp32 \
    --train-steps 20 --train-repeats 3 --infer-runs 5 --out "$OUT"
step 120 "$PY" benchmarks/latency_noise.py --device cuda --backbones resnet20,resnet18 --bf16 --channels-last \
    --repeats 5 --out "$OUT"
step 90 "$PY" benchmarks/latency_noise.py --device cuda --backbones resnet20,resnet18 --bf16 --channels-last \
    --repeats 5 --cuda-graph --out "$OUT"
echo "=== $(date +%T) done" | tee -a "$LOG"
