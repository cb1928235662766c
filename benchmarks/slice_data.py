"""Copy the first N images of each .npz data file into another folder: a data folder small enough to travel.

    python benchmarks/slice_data.py ../shared/data .gpu/data --drop x_test_exact,test_exact_index
    # 3,000 train, 1,000 test, 500 OOD images: 15 MiB (the arrays dropped are not read by the suite's runs)

A lent GPU machine receives the repository and at most 64 MiB with it; the CIFAR-10 development copy is
71 MB. `benchmarks/gpu_check.sh` only checks the paths and times epochs, so the first images of each file
are enough: every array of a file as long as one of its image arrays is cut to the same N (labels, indices,
extra splits such as CIFAR-100's ``x_train_extra``), other arrays are copied as they are. The output is
compressed. The slices are a different dataset for the suite (another sha256, so other run ids).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

LIMITS = {"cifar10_train.npz": "train", "cifar10_test.npz": "test", "svhn.npz": "ood", "cifar100_test.npz": "ood"}


def slice_file(src: Path, dst: Path, n: int, drop: frozenset = frozenset()) -> dict[str, tuple]:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    # per-image arrays: those as long as one of the file's image arrays (x, x_train, x_train_extra, ...);
    # anything else (a list of class names, a source tag) is metadata and is copied whole
    lengths = {a.shape[0] for k, a in arrays.items() if k.startswith("x") and a.ndim == 4}
    out = {k: (a[:n] if a.ndim and a.shape[0] in lengths else a) for k, a in arrays.items()}
    np.savez_compressed(dst, **out)
    return {k: a.shape for k, a in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--ood", type=int, default=500)
    ap.add_argument("--drop", default="", help="comma-separated array names to leave out")
    args = ap.parse_args(argv)
    if min(args.train, args.test, args.ood) < 1:
        print("error: --train, --test and --ood must be >= 1", file=sys.stderr)
        return 2
    found = [name for name in LIMITS if (args.src / name).is_file()]
    if not found:
        print(f"error: {args.src} holds none of {', '.join(LIMITS)}", file=sys.stderr)
        return 2
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in found:
        shapes = slice_file(args.src / name, args.dst / name, getattr(args, LIMITS[name]),
                            frozenset(k.strip() for k in args.drop.split(",") if k.strip()))
        size = (args.dst / name).stat().st_size
        print(f"{name}: {', '.join(f'{k} {list(s)}' for k, s in shapes.items())} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
