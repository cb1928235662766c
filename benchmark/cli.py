"""The ``ensemble-bench`` command line. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ensemble_bench import report
from ensemble_bench.errors import MethodContractError, TrainingDiverged, UsageError

QUICKSTART_OUT = "quickstart-runs"
# The quickstart's budget on the 8x8 digits (cnn_small, CPU): chosen from the measured learning curves
# so that every method's row is converged by the leaderboard's rule. Measured (results/quickstart_budget.md):
# at 15 epochs Packed-Ensembles (NLL 0.50) and MIMO (0.35) were still falling; at 30 every row is converged.
QUICKSTART_EPOCHS = 30
QUICKSTART_LR = 0.05


def check_output_path(folder: Path, flag: str) -> None:
    from ensemble_bench.runner import check_output_dir

    check_output_dir(folder, flag)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)   # --members is not --members-parallel, --epoch not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error by default)
        raise UsageError(message)


def _add_plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", dest="plugins", action="append", metavar="FILE.py|MODULE",
                   help="import your own methods, backbones or datasets first (repeatable; ensemble_bench.plugins)")


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    from ensemble_bench.config import RunConfig
    from ensemble_bench.recipe import RECIPE_MODES, SCHEDULES

    d = RunConfig()   # the defaults, shown in --help
    p.add_argument("--method", help="a registered method (ensemble-bench list)")
    p.add_argument("--backbone", help=f"a suite backbone or timm:<name> (required without --config; a run "
                                      f"TOML's default: {d.backbone})")
    p.add_argument("--dataset", help=f"dataset name, or your own dataset's FILE.toml (required without --config; "
                                     f"a run TOML's default: {d.dataset})")
    p.add_argument("--data-dir", dest="data_dir", help="folder with the data files (default $ENSEMBLE_BENCH_DATA or ./data)")
    p.add_argument("--download", action="store_true", default=None, help="fetch the dataset with torchvision")
    p.add_argument("--recipe", choices=RECIPE_MODES,
                   help="shared: every method trains with this run's recipe; paper: each with its published one "
                        f"(default {d.recipe})")
    p.add_argument("--epochs", type=int, help=f"base training epochs E (default {d.epochs})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"(default {d.batch_size})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (default {d.nesterov})")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help=f"(default {d.weight_decay})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, help=f"linear warm-up (default {d.warmup_epochs})")
    p.add_argument("--milestones", help="multistep: comma-separated fractions of the epochs (default "
                                        + ",".join(str(m) for m in d.milestones) + ")")
    p.add_argument("--lr-decay", dest="lr_decay", type=float, help=f"multistep factor (default {d.lr_decay})")
    p.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help=f"last fraction of the training set held out for validation (default {d.val_fraction})")
    p.add_argument("--out", help=f"folder of the records (default {d.out})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"(default {d.device})")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training forward (CUDA, or a CPU with a C++ compiler)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--no-keep-weights", dest="keep_weights", action="store_false", default=None,
                   help="do not keep the final weights beside the record (they allow evaluating again)")
    p.add_argument("--shift", help="after training, also evaluate on a corrupted test set read from the data folder "
                                   "(cifar10c: DATA/CIFAR-10-C, cifar100c: DATA/CIFAR-100-C; make one with "
                                   "`ensemble-bench corrupt`); not part of the run id")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    _add_plugin_arg(p)
    p.add_argument("--members-parallel", dest="members_parallel", action="store_true", default=None,
                   help="train the independent members of the method (deep ensemble, bridge bases) as parallel "
                        "processes, then assemble: the same record (not part of the run id)")


RUN_KEYS = ("method", "backbone", "dataset", "data_dir", "download", "recipe", "epochs", "seed", "lr", "batch_size",
            "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "milestones", "lr_decay",
            "val_fraction", "out", "device", "compile", "progress", "keep_weights", "shift",
            "members_parallel", "plugins")


def _run_config(args):
    from ensemble_bench.config import parse_assignments
    from ensemble_bench.resolve import make_run_config, run_config_from_toml

    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}
    opts = parse_assignments(args.sets)
    if args.config:
        if opts:
            given["options"] = opts
        return run_config_from_toml(args.config, given)
    for k in ("method", "backbone", "dataset"):
        if k not in given:
            raise UsageError(f"run needs --{k} (or --config FILE.toml)")
    given["options"] = opts
    return make_run_config(given)


def cmd_run(args) -> int:
    from ensemble_bench.runner import execute

    from ensemble_bench.recipe import ignored_settings

    cfg = _run_config(args)
    for note in ignored_settings(cfg):
        print(f"ensemble-bench: note: {note}", file=sys.stderr)
    rec = execute(cfg, force=args.force)
    path = Path(cfg.out) / f"{rec['run_id']}.json"
    m = rec["metrics"]
    summary = {"run_id": rec["run_id"], "record": str(path), "acc": round(m["acc"], 6),
               "nll": round(m["nll"], 6), "ece": round(m["ece"], 6), "params": rec["cost"]["params"],
               "flops": rec["cost"]["flops"]}
    if isinstance(m.get("shift"), dict):
        summary["shift_acc"] = round(m["shift"]["mean"]["acc"], 6)
        summary["shift_nll"] = round(m["shift"]["mean"]["nll"], 6)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_evaluate(args) -> int:
    from ensemble_bench.evaluate import EvaluationIncomplete, evaluate_records

    try:
        done = evaluate_records(args.target, shift=args.shift, ood=args.ood, data_dir=args.data_dir,
                                device=args.device, progress=args.progress,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
    except EvaluationIncomplete as e:   # a folder with records skipped: what was evaluated, then exit 2
        if e.done:
            print(json.dumps(e.done, indent=1))
        raise
    print(json.dumps(done, indent=1))
    return 0


def cmd_list(args) -> int:
    import ensemble_bench.methods as methods
    from ensemble_bench import backbones, data

    print("methods (options and defaults; set with --set key=value):")
    for name in methods.names():
        cls = methods.get(name)
        defaults = cls.option_defaults()
        opts = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "(no options)"
        print(f"  {name:<15} {opts}")
        if cls.summary:
            print(f"  {'':<15} {cls.summary}")
        if cls.staged_backbone:
            print(f"  {'':<15} backbones: staged only ({cls.staged_backbone})")
        if not methods.source(name).startswith(methods.__name__ + "."):
            print(f"  {'':<15} from {methods.source(name)}")
    for where, err in methods.load_errors().items():
        print(f"  failed to import {where}: {err}")
    print("backbones (staged: built from the suite's layer factory, so every method takes them):")
    print("  staged: " + ", ".join(n for n in backbones.EXAMPLES if not n.startswith("timm:")))
    print("  plain (methods without 'staged only'): timm:<name>")
    for name in backbones.PLUGINS.names():
        spec = backbones.PLUGINS.get(name)
        print(f"  {name:<15} {'staged' if spec.staged else 'plain'}, from {backbones.PLUGINS.source(name)}"
              + (f": {spec.summary}" if spec.summary else ""))
    print("datasets (OOD sets):")
    for d in data.names():
        print(f"  {d:<9} ({', '.join(data.OOD_SETS[d])})" + ("  offline default, ships with scikit-learn" if d == "digits" else ""))
    print("  FILE.toml your own dataset (README: Your own dataset)")
    return 0


def cmd_score(args) -> int:
    from ensemble_bench.metrics import score_npz

    try:
        scores = score_npz(args.file)
    except ValueError as e:   # the metrics module's one-line input errors
        raise UsageError(str(e)) from None
    print(json.dumps(scores, indent=1))
    return 0


def cmd_cost(args) -> int:
    from ensemble_bench import cost
    from ensemble_bench.config import parse_assignments
    from ensemble_bench.runner import build_for_cost, resolve_device

    if args.dataset is not None:   # the dataset's declared shape (ensemble_bench.data), flags given win
        from ensemble_bench import data

        ds = data.check_name(args.dataset)
        channels, size = data.IMAGE_SHAPES[ds]
        args.num_classes = data.NUM_CLASSES[ds] if args.num_classes is None else args.num_classes
        args.in_channels = channels if args.in_channels is None else args.in_channels
        args.image_size = size if args.image_size is None else args.image_size
    if args.num_classes is None:
        raise UsageError("cost needs --num-classes (or --dataset NAME|FILE.toml)")
    args.in_channels = 3 if args.in_channels is None else args.in_channels
    args.image_size = 32 if args.image_size is None else args.image_size
    if args.num_classes < 2:
        raise UsageError(f"--num-classes must be >= 2; got {args.num_classes}")
    for flag, v in (("--image-size", args.image_size), ("--in-channels", args.in_channels), ("--runs", args.runs)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1; got {v}")
    device = resolve_device(args.device)
    try:
        model = build_for_cost(args.method, args.backbone, args.num_classes, args.in_channels, args.image_size,
                               parse_assignments(args.sets), device)
    except UsageError:
        raise
    except (RuntimeError, ValueError) as e:   # a build that runs the network (NFE's SNIP) on too small images
        raise UsageError(f"{args.method} on {args.backbone} cannot be built for {args.in_channels}x{args.image_size}"
                         f"x{args.image_size} images: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    try:
        res = cost.measure(model, (args.in_channels, args.image_size, args.image_size), device,
                           latency=args.latency, latency_runs=args.runs)
    except (RuntimeError, ValueError) as e:   # e.g. images too small for the backbone's downsampling
        raise UsageError(f"{args.backbone} cannot run on {args.in_channels}x{args.image_size}x{args.image_size} "
                         f"images: {str(e).splitlines()[0][:200]}") from None
    res.pop("per_layer", None)
    res["num_members"] = model.num_members
    print(json.dumps(res, indent=1))
    return 0


def cmd_leaderboard(args) -> int:
    from ensemble_bench import formatting, leaderboard, records, runlock

    if args.output is not None:
        out = Path(args.output)
        if not out.name or out.name == "..":   # "", ".", "..": no file name
            raise UsageError(f"-o {args.output!r} names no file: name a CSV file (e.g. leaderboard.csv); the "
                             f"markdown table is written beside it")
        check_output_path(out.parent, "-o")
        for path in (out, out.with_suffix(".md")):
            if path.is_dir():
                raise UsageError(f"-o: {path} is a folder; name a CSV file")
            if records.result_file_of(path):
                raise UsageError(f"-o: {path} is a file of run {records.result_file_of(path)}'s results; "
                                 f"writing the table there would destroy it")
        if out.suffix != ".csv":   # a records folder's .json, the .md written beside it, a typo: refused
            raise UsageError(f"-o {out}: name the CSV, ending in .csv (e.g. {out.with_suffix('.csv')}); the "
                             f"markdown table is written beside it as {out.with_suffix('.md').name}")
    folders = ", ".join(str(d) for d in records.as_folders(args.runs_dirs))
    try:
        pairs, problems = records.scan_records(args.runs_dirs, statuses=None, recursive=True)
    except records.RecordError as e:
        raise UsageError(str(e)) from None
    recs = [r for _, r in pairs if r.get("status") == "complete"]
    if not recs:   # one line that says why, not a warning per file first
        why = f" ({len(problems)} unreadable or invalid record(s); first: {problems[0]})" if problems else ""
        raise UsageError(f"no complete run records in {folders}{why}")
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    running = [(p, r["run_id"]) for p, r in pairs if r.get("status") == "running"]
    if running:   # not in the table; say so, and which were killed (a sweep or `run` resumes them)
        states = [runlock.running_state(p.parent, rid) for p, rid in running]
        stale = [rid for (_, rid), (is_stale, _) in zip(running, states) if is_stale]
        print(f"note: {len(running)} record(s) still 'running' are not in the table"
              + (f"; {len(stale)} of them stopped (no process holds the lock: killed or preempted; running them "
                 f"again resumes them): {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}" if stale else ""),
              file=sys.stderr)
    failed = [r["run_id"] for _, r in pairs if r.get("status") == "failed"]
    if failed:
        print(f"note: {len(failed)} failed record(s) are not in the table: {', '.join(failed[:5])}"
              f"{' ...' if len(failed) > 5 else ''}", file=sys.stderr)
    df = leaderboard.leaderboard(recs)
    md = formatting.format_markdown(df)
    if args.output:
        out = Path(args.output)
        leaderboard.write_leaderboard(df, csv_path=out, md_path=out.with_suffix(".md"))
    print(md)
    return 0


def cmd_quickstart(args) -> int:
    """Every registered method on the offline default (digits, cnn_small, CPU), then the leaderboard."""
    import ensemble_bench.methods as methods
    from ensemble_bench import columns, formatting, leaderboard, records
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.runner import execute, preflight

    import time

    names = [n.strip() for n in args.methods.split(",") if n.strip()] if args.methods else methods.names()
    if args.methods is not None and not names:
        raise UsageError(f"--methods {args.methods!r} names no method; give names separated by commas "
                         f"(`ensemble-bench list` shows them), or leave it out for every method")
    def config(name: str, epochs: int):
        return make_run_config({
            "method": name, "backbone": "cnn_small", "dataset": args.dataset, "epochs": epochs,
            "seed": args.seed, "out": args.out, "device": "cpu", "lr": QUICKSTART_LR, "progress": False,
            "plugins": args.plugins or (),
            "options": dict(methods.get(name).quickstart_options)})

    def passes(cfg) -> bool:
        try:
            preflight(cfg)
        except UsageError:
            return False
        return True

    cfgs = [config(name, args.epochs) for name in names]   # every name and option checked before anything trains
    for cfg in cfgs:     # and every check a run makes before it trains (options against the epochs, --out, ...)
        try:
            preflight(cfg)
        except UsageError:
            # A method's own hint names run's flags (--set an option), but here the quickstart sets the options:
            # when the quickstart's own budget passes, the cure is --epochs or leaving the method out.
            if args.epochs < QUICKSTART_EPOCHS and passes(config(cfg.method, QUICKSTART_EPOCHS)):
                given = ", ".join(f"{k}={v}" for k, v in methods.get(cfg.method).quickstart_options.items())
                raise UsageError(f"--epochs {args.epochs} is too few for {cfg.method}"
                                 + (f" with the quickstart's {given}" if given else "")
                                 + f"; raise --epochs (the default {QUICKSTART_EPOCHS} fits it), or leave "
                                 f"{cfg.method} out of --methods") from None
            raise
    t0 = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        if i:
            spent = time.perf_counter() - t0
            print(f"[{i + 1}/{len(cfgs)}] {cfg.method} ({spent:.0f}s so far, ~{spent / i * (len(cfgs) - i):.0f}s left)",
                  file=sys.stderr, flush=True)
        else:
            print(f"[1/{len(cfgs)}] {cfg.method}", file=sys.stderr, flush=True)
        rec = execute(cfg, log=lambda s: None if args.quiet else print(s, file=sys.stderr, flush=True))
        print(f"{cfg.method:<15} acc {rec['metrics']['acc']:.4f}  nll {rec['metrics']['nll']:.4f}  "
              f"train {rec['training']['train_s']:.1f}s  converged {columns.verdict_text(columns.record_trends(rec))}",
              flush=True)
    recs, _ = records.load_records(args.out)
    df = leaderboard.leaderboard(recs)
    leaderboard.write_leaderboard(df, csv_path=Path(args.out) / "leaderboard.csv", md_path=Path(args.out) / "leaderboard.md")
    print()
    print(formatting.format_markdown(df))
    print(f"\nrecords and leaderboard.csv in {args.out}/")
    return 0


def cmd_sweep(args) -> int:
    from ensemble_bench import sweep

    return sweep.cli_sweep(args)


def cmd_sweep_status(args) -> int:
    from ensemble_bench import sweep

    return sweep.cli_status(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ensemble-bench", description="Fair, fast benchmarks of efficient-ensemble methods.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("list", help="methods with their options, backbones, datasets")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("run", help="train one method and write its result record")
    s.add_argument("--config", help="a TOML file with the run settings ([options] for the method)")
    s.add_argument("--force", action="store_true", help="run again even if a complete record exists")
    _add_run_settings(s)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("evaluate", help="add shift / OOD metrics to complete records from their kept weights "
                                        "(no training)")
    s.add_argument("target", metavar="RUNS_DIR_OR_RECORD", help="a folder of records or one <run_id>.json")
    s.add_argument("--shift", help="a corrupted test set under the data folder (cifar10c, cifar100c)")
    s.add_argument("--ood", action="append", metavar="NAME",
                   help="an OOD set of the record's dataset to (re-)evaluate (repeatable; ensemble-bench list)")
    s.add_argument("--data-dir", dest="data_dir",
                   help="folder with the data (default: the record's, else $ENSEMBLE_BENCH_DATA or ./data)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("score", help="metrics from saved member outputs (.npz)")
    s.add_argument("file")
    s.set_defaults(fn=cmd_score)

    s = sub.add_parser("cost", help="params, FLOPs (and latency) of a method without training")
    s.add_argument("--method", required=True)
    s.add_argument("--backbone", required=True)
    s.add_argument("--dataset", help="take classes, channels and image size from a dataset (a name or a .toml; "
                                     "no array is read); the three flags below override it")
    s.add_argument("--num-classes", dest="num_classes", type=int, help="(required without --dataset)")
    s.add_argument("--in-channels", dest="in_channels", type=int, help="(default 3)")
    s.add_argument("--image-size", dest="image_size", type=int, help="(default 32)")
    s.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE")
    s.add_argument("--latency", action="store_true", help="also time batch-1 latency and throughput")
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_cost)

    s = sub.add_parser("leaderboard", help="aggregate run records: mean and std over seeds")
    s.add_argument("runs_dirs", nargs="+", metavar="runs_dir", help="folders of run records (subfolders too)")
    s.add_argument("-o", "--output", help="CSV path (a .md table is written beside it)")
    s.set_defaults(fn=cmd_leaderboard)

    s = sub.add_parser("quickstart", help="every method on the offline default (CPU), then the leaderboard")
    s.add_argument("--out", default=QUICKSTART_OUT)
    s.add_argument("--epochs", type=int, default=QUICKSTART_EPOCHS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--methods", help="comma-separated subset")
    s.add_argument("--dataset", default="digits",
                   help="a dataset name or your own dataset's .toml (README: Your own dataset); default digits")
    s.add_argument("--quiet", action="store_true")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_quickstart)

    s = sub.add_parser("sweep", help="run a grid of runs locally or on Slurm (submitit)")
    s.add_argument("spec")
    s.add_argument("--executor", choices=("local", "slurm"), default="local")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--status", action="store_true", help="only print done/running/pending/failed counts")
    s.add_argument("--workers", type=int, default=1, help="local executor: parallel processes")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("sweep-status", help="done / running / pending / failed counts of a sweep")
    s.add_argument("spec")
    _add_plugin_arg(s)
    s.set_defaults(fn=cmd_sweep_status)

    from ensemble_bench.shift import add_corrupt_parser

    add_corrupt_parser(sub)   # `corrupt`: CIFAR-10-C / CIFAR-100-C style sets from the clean test split

    s = sub.add_parser("report", help="figures and a markdown/HTML report from run records")
    s.add_argument("runs_dirs", nargs="+", metavar="runs_dir", help="folders of run records (subfolders too)")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(fn=report.cli_report)
    return p


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning from the suite's code as one line, like its errors (not Python's two-line source echo)."""
    print(f"ensemble-bench: warning: {message}", file=sys.stderr if file is None else file)


class _PipeSafe:
    """A text stream whose reader may go away (``run ... | head``): from the first write that finds the pipe
    closed on, what is written goes nowhere, and the command goes on (a run is not lost to its log)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except BrokenPipeError:
            self._close()
            return len(s)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._close()

    def _close(self) -> None:
        import os

        with contextlib.suppress(OSError, ValueError, AttributeError):   # the fd: nothing more reaches the pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        self._stream = open(os.devnull, "w")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    import warnings

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(out), _PipeSafe(err)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "fn", None):
            build_parser().print_help()
            return 2
        if getattr(args, "plugins", None):
            from ensemble_bench import plugins

            plugins.load_all(args.plugins)   # before any name is looked up; a broken plugin: one line
        return int(args.fn(args) or 0)
    except UsageError as e:
        print(f"ensemble-bench: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, MethodContractError) as e:   # the run failed; its record says why
        print(f"ensemble-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ensemble-bench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. `ensemble-bench list | head`: the reader went away, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
