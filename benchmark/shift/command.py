"""``ensemble-bench corrupt``: CIFAR-10-C / CIFAR-100-C style sets written from a clean test split."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ensemble_bench.errors import UsageError
from ensemble_bench.shift import (FOLDERS, FROST_ENV, GENERATOR, IMAGE_SIZE, _check_corruptions, _check_seed,
                                  _check_severities, _frost_dir, _load_frost, _out_metadata_compatible, write_corrupted)

# ------------------------------------------------------------------------------------------ command
def corrupt_command(dataset: str = "cifar10", data_dir=None, out=None, corruptions=None, severities=None,
                    limit: int | None = None, seed: int = 0, *, progress: bool = True, frost_dir=None,
                    download: bool = False) -> dict:
    """``ensemble-bench corrupt``: corrupt the clean test split of ``dataset`` (ensemble_bench.data.load) and write
    the release layout under ``out/CIFAR-10-C`` (or ``CIFAR-100-C``), so that ``--data-dir out`` finds it.
    ``corruptions`` / ``severities`` are lists or comma-separated strings; ``limit`` keeps the first N test
    images. Everything is validated before anything is written. Returns {dir, files, metadata, seconds}."""
    from ensemble_bench import data

    if dataset not in FOLDERS:
        raise UsageError(f"corrupt: dataset {dataset!r} has no corrupted release layout; choose from "
                         f"{', '.join(FOLDERS)}")
    names = _check_corruptions(corruptions)
    sev = _check_severities(severities)
    seed = _check_seed(seed)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise UsageError(f"--limit must be an integer >= 1; got {limit!r}")
    if out is None:
        raise UsageError("corrupt needs --out DIR")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    target = out / FOLDERS[dataset]
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file, not a folder")
    fd = _frost_dir(frost_dir)
    if "frost" in names and fd is not None:
        _load_frost(fd)   # fail now, not after an hour of other corruptions
    bundle = data.load(dataset, data_dir, download)   # download: as for run (torchvision's copy)
    x = bundle.test.x
    y = bundle.test.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = x.cpu().numpy()
    if x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise UsageError(f"corrupt needs 3 x 32 x 32 images; {dataset} test images are {list(x.shape[1:])}")
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    source = f"{dataset} test split, first {len(x)} images; {bundle.source}"
    # the same checks write_corrupted makes, before the (long) generation starts
    _out_metadata_compatible(target, {"generator": GENERATOR, "seed": seed, "severities": sev,
                                      "n_per_severity": len(x), "source_dataset": source}, names)
    t0 = time.perf_counter()
    meta = write_corrupted(x, y.cpu().numpy(), target, names, sev, seed, progress, source=source, frost_dir=fd)
    return {"dir": str(target), "files": [f"{c}.npy" for c in names] + ["labels.npy", "metadata.json"],
            "metadata": meta, "seconds": round(time.perf_counter() - t0, 2)}


def cli_corrupt(args) -> int:
    """Entry point of the ``corrupt`` sub-command (argparse namespace of add_corrupt_parser)."""
    res = corrupt_command(args.dataset, args.data_dir, args.out, args.corruptions, args.severities, args.limit,
                          args.seed, progress=not args.no_progress, frost_dir=args.frost_dir, download=args.download)
    meta = res["metadata"]
    print(json.dumps({"dir": res["dir"], "corruptions": meta["corruptions"], "severities": meta["severities"],
                      "n_per_severity": meta["n_per_severity"], "approximate": sorted(meta["approximate"]),
                      "seconds": res["seconds"]}, indent=1))
    return 0


def add_corrupt_parser(subparsers) -> Any:
    """Add ``corrupt`` to the CLI's sub-parsers; sets ``fn`` (the CLI's dispatch attribute) to cli_corrupt."""
    p = subparsers.add_parser(
        "corrupt", help="write CIFAR-10-C / CIFAR-100-C style corrupted test sets (Hendrycks & Dietterich 2019)",
        description="Corrupt the clean test split with the 15 corruptions of CIFAR-10-C at severities 1-5 and "
                    "write the official release layout to OUT/CIFAR-10-C (or OUT/CIFAR-100-C).")
    p.add_argument("--dataset", default="cifar10", help="cifar10 or cifar100 (default cifar10)")
    p.add_argument("--data-dir", dest="data_dir", help="folder with the clean data (as for run)")
    p.add_argument("--download", action="store_true",
                   help="download the clean data into the data folder when it is not there (as for run)")
    p.add_argument("--out", required=True, help="output folder; the set is written to OUT/CIFAR-10-C")
    p.add_argument("--corruptions", help="comma-separated subset (default: all 15)")
    p.add_argument("--severities", help="comma-separated subset of 1,2,3,4,5 (default: all)")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption noise (default 0)")
    p.add_argument("--frost-dir", dest="frost_dir",
                   help=f"folder with the official frost images (default ${FROST_ENV}); "
                        "without it frost is approximate")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cli_corrupt)
    return p
