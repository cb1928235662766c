"""Epoch time of the suite's Trainer vs bare PyTorch loops, and the data path alone.

Measures, side by side, on the same model and the same images:
  suite            ensemble_bench.train.Trainer.fit (tensor loader, batch augmentation, hooks, NaN checks)
  bare_tensor      a hand-written loop over the same uint8 tensors with the same batch augmentation
  bare_dataloader  a hand-written loop with torchvision's DataLoader + per-image PIL transforms
                   (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize)
and the data path alone (one epoch of batches, no model): suite tensor path vs DataLoader + PIL with
0 and 2 workers. Every time is the median of --repeats epochs after one warm-up epoch.

    python benchmarks/epoch_time.py --data-dir ../shared/data --n 5000 --backbone cnn_small
Writes results/bench_epoch_time.{md,csv}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the shared helpers of throughput.py
import throughput as tp  # noqa: E402

from ensemble_bench import data as data_mod
from ensemble_bench.backbones import build_backbone
from ensemble_bench.resolve import make_run_config
from ensemble_bench.cost import device_name
from ensemble_bench.loader import augment_batch
from ensemble_bench.train import Trainer


def timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--n", type=int, default=5000, help="training images used")
    ap.add_argument("--backbone", default="cnn_small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    argv_used = list(sys.argv)
    started_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = data_mod.load("cifar10", args.data_dir)
    bundle.train = data_mod.Split(bundle.train.x[:args.n].clone(), bundle.train.y[:args.n].clone())
    bs = args.batch_size
    rows = []

    # --- suite ---------------------------------------------------------------------------------
    cfg = make_run_config({"method": "single", "backbone": args.backbone, "dataset": "cifar10", "epochs": 1,
                           "progress": False, "batch_size": bs, "data_dir": args.data_dir})
    trainer = Trainer(bundle, cfg, "cpu", log=lambda s: None)
    model_s = build_backbone(args.backbone, 10)

    # --- bare loop, same tensors and augmentation -------------------------------------------------
    model_b = build_backbone(args.backbone, 10)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    x_all, y_all = bundle.train.x, bundle.train.y
    g = torch.Generator().manual_seed(0)

    def bare_tensor_epoch():
        model_b.train()
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            xb = augment_batch(x_all[idx], bundle.augment, g).float().div_(255).sub_(mean).div_(std)
            loss = torch.nn.functional.cross_entropy(model_b(xb), y_all[idx])
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()

    # --- bare loop, torchvision DataLoader + PIL --------------------------------------------------
    import torchvision.transforms as T
    from PIL import Image

    class PILSet(torch.utils.data.Dataset):
        def __init__(self, x, y, tf):
            self.x = x.permute(0, 2, 3, 1).numpy()
            self.y = y.numpy()
            self.tf = tf

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(self.x[i])), int(self.y[i])

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(bundle.mean, bundle.std)])
    pil_set = PILSet(x_all, y_all, tf)
    model_d = build_backbone(args.backbone, 10)
    opt_d = torch.optim.SGD(model_d.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def loader(workers):
        return torch.utils.data.DataLoader(pil_set, batch_size=bs, shuffle=True, num_workers=workers,
                                           persistent_workers=workers > 0)

    dl_train = loader(0)

    def bare_dataloader_epoch():
        model_d.train()
        for xb, yb in dl_train:
            loss = torch.nn.functional.cross_entropy(model_d(xb), yb)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()

    # the suite's own per-epoch times (first epoch = warm-up), as a real run reports them
    res = trainer.fit(model_s, stage="suite", epochs=args.repeats + 1)
    ts = [h["epoch_s"] for h in res.history[1:]]
    rows.append({"what": "train epoch: suite", "seconds": statistics.median(ts), "runs": [round(t, 3) for t in ts]})
    print(rows[-1], flush=True)
    for name, fn in [("bare_tensor", bare_tensor_epoch), ("bare_dataloader", bare_dataloader_epoch)]:
        med, ts = timed(fn, args.repeats)
        rows.append({"what": f"train epoch: {name}", "seconds": med, "runs": [round(t, 3) for t in ts]})
        print(rows[-1], flush=True)

    # --- data path alone --------------------------------------------------------------------------
    def suite_data():
        for xb, yb in trainer.loader("train", generator=g):
            pass

    med, ts = timed(suite_data, args.repeats)
    rows.append({"what": "data epoch: suite tensor path", "seconds": med, "runs": [round(t, 3) for t in ts]})
    print(rows[-1], flush=True)
    for w in (0, 2):
        dl = loader(w)

        def pil_data():
            for xb, yb in dl:
                pass

        med, ts = timed(pil_data, args.repeats)
        rows.append({"what": f"data epoch: DataLoader + PIL, {w} workers", "seconds": med, "runs": [round(t, 3) for t in ts]})
        print(rows[-1], flush=True)

    t = {r["what"]: r["seconds"] for r in rows}
    suite, bare = t["train epoch: suite"], t["train epoch: bare_tensor"]
    best_pil = min(t["data epoch: DataLoader + PIL, 0 workers"], t["data epoch: DataLoader + PIL, 2 workers"])
    summary = {
        "suite_vs_bare_tensor_overhead_pct": 100 * (suite / bare - 1),
        "suite_vs_bare_dataloader_speedup": t["train epoch: bare_dataloader"] / suite,
        "data_path_speedup_vs_best_dataloader": best_pil / t["data epoch: suite tensor path"],
    }
    dev = device_name(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "bench_epoch_time.csv", index=False)
    lines = [f"# Epoch time: suite vs bare loops ({dev})", "",
             f"CIFAR-10 development copy, {args.n} training images, batch {bs}, backbone {args.backbone}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} epochs after a warm-up.", "",
             *tp.environment_lines(torch.device("cpu"), args, argv_used, started_load), "",
             "| what | seconds (median) | runs |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['seconds']:.3f} | {r['runs']} |" for r in rows]
    lines += ["", f"- suite epoch vs bare tensor loop: {summary['suite_vs_bare_tensor_overhead_pct']:+.1f}% (target: within 10%)",
              f"- suite epoch vs bare DataLoader + PIL loop: {summary['suite_vs_bare_dataloader_speedup']:.2f}x faster",
              f"- data path: suite {summary['data_path_speedup_vs_best_dataloader']:.1f}x faster than the best DataLoader + PIL setting (target: >= 5x)"]
    (out / "bench_epoch_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
