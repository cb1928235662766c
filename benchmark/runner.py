"""One run, end to end: RunConfig -> data -> method.fit -> predictions -> metrics -> cost -> record.

The record is written atomically as ``<out>/<run_id>.json``; while the run is going a record with
status "running" stands there, a failure leaves status "failed" with the error, and only a complete
record counts for the leaderboard. Checkpoints live in ``<out>/.ckpt/<run_id>/`` and are removed once
the record is complete, so a killed run resumes where it stopped when started again.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

import ensemble_bench.methods as methods
from ensemble_bench.api import COMBINE_RULES, EnsembleModel, FitContext
from ensemble_bench.config import RunConfig, build_options
from ensemble_bench.resolve import load_shift
from ensemble_bench.errors import MethodContractError, UsageError
from ensemble_bench.registry import error_line
from ensemble_bench.runlock import lock_holder, run_lock


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_method(cfg: RunConfig):
    cls = methods.get(cfg.method)
    return cls(build_options(cls.Config, cfg.options, cfg.method))


def check_model(model: Any, method: str) -> EnsembleModel:
    if not isinstance(model, EnsembleModel):
        raise MethodContractError(f"method {method!r} returned {type(model).__name__}, not an EnsembleModel")
    if model.combine not in COMBINE_RULES:
        raise MethodContractError(f"method {method!r} declares combine={model.combine!r}; expected one of "
                                  f"{COMBINE_RULES}")
    return model


def check_buildable(method: Any, cfg: RunConfig, shape: tuple[int, int, int] | None = None) -> Any:
    """Build the method's architecture on the meta device (no memory, no compute, no data) so that a
    method / backbone combination it refuses (a ``UsageError`` from ``build``) is bad input before any
    record or folder exists (and a sweep refuses it before submitting); then a model with lazy parameters and
    a backbone that cannot take a batch of the data's shape (:func:`check_forward`) are refused the same way.
    Any other failure of the build here is left for the real build inside ``fit`` to report. ``shape``:
    (classes, channels, image size), by default the run's dataset's. Returns the meta model (None when the build failed)."""
    from ensemble_bench.data import IMAGE_SHAPES, NUM_CLASSES

    if shape is None:
        shape = (NUM_CLASSES[cfg.dataset], *IMAGE_SHAPES[cfg.dataset])
    classes, channels, size = shape
    ctx = FitContext(config=cfg, num_classes=classes, in_channels=channels, image_size=size,
                     device=torch.device("meta"))
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = method.build(ctx)
    except UsageError:
        raise
    except Exception:
        model = None
    finally:
        torch.set_rng_state(rng)
    lazy = [n for n, t in (model.named_parameters() if isinstance(model, torch.nn.Module) else ())
            if torch.nn.parameter.is_lazy(t)]
    if lazy:   # the harness hashes, counts and sparsifies the weights before any forward could size them
        raise UsageError(f"{cfg.method} on backbone {cfg.backbone!r}: the model has lazy (unsized) parameters "
                         f"({', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''}), which the suite does not "
                         f"support: give those layers their input size (nn.Linear(in, out) for nn.LazyLinear(out))")
    check_forward(cfg, shape)
    return model


def check_forward(cfg: RunConfig, shape: tuple[int, int, int]) -> None:
    """A batch of the data's shape goes through the run's backbone (evaluation mode, as the backbone alone:
    the method's own forward is the method's), so a backbone that cannot take the data (a plugin's fixed input
    channels, a timm model's fixed image size) is bad input before any record exists, not a traceback at the
    first training step. On the meta device first (no memory, no compute); where that fails (an op without a
    meta kernel, or the mismatch itself), again on a real CPU build, whose error is the one reported. A
    backbone larger than a quarter of this machine's memory, or one that cannot be built here, is left to the
    run itself. Only a plugin's backbone or a timm model is checked: the suite's own are built from the data's
    channel count and pool adaptively (a test runs each family on 1 or 3 channels, 8x8 to 64x64 images), and
    skipping them spares every run the ~1-3 s of CPU that the first meta convolution of a process costs
    (importing the meta kernels)."""
    from ensemble_bench.backbones import PLUGINS, build_backbone
    from ensemble_bench.environment import exact_float32

    if cfg.backbone not in PLUGINS and not cfg.backbone.startswith("timm:"):
        return
    classes, channels, size = shape

    def forward(m: torch.nn.Module, device: str) -> None:
        with torch.no_grad(), exact_float32():   # as every forward of a run (no TF32 on CUDA)
            m.eval()(torch.zeros(2, channels, size, size, device=device))

    with torch.random.fork_rng(devices=[]):   # the check leaves the run's random stream as it found it
        try:
            with torch.device("meta"):
                meta = build_backbone(cfg.backbone, classes, channels)
        except Exception:  # noqa: BLE001 - cannot be built here: the run's own build reports it
            return
        try:
            forward(meta, "meta")
            return
        except Exception:  # noqa: BLE001 - decided on the CPU below
            pass
        if model_bytes(meta) > (device_memory(torch.device("cpu")) or 0) // 4:
            return
        try:
            real = build_backbone(cfg.backbone, classes, channels)
        except Exception:  # noqa: BLE001 - cannot be built here: the run's own build reports it
            return
        try:
            forward(real, "cpu")
        except Exception as e:  # noqa: BLE001 - any failure of the forward: the backbone does not take the data
            raise UsageError(f"backbone {cfg.backbone!r} cannot take the {cfg.dataset} data: a batch of shape "
                             f"(2, {channels}, {size}, {size}) fails in its forward ({error_line(e)}); check its "
                             f"input channels and image size") from None


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a lazy module's tensors, not sized yet, count nothing)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if not torch.nn.parameter.is_lazy(t))


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory a run on ``device`` can have at most: the GPU's total memory, or the machine's
    physical memory (less where a cgroup caps this process); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    with contextlib.suppress(OSError, ValueError):
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap.isdigit():
            limit = min(limit, int(cap))
    return limit


def check_fits_in_memory(model: Any, cfg: RunConfig, device: torch.device) -> None:
    """Refuse, before any record or folder exists, a model whose weights alone exceed the memory of the
    device it would train on (a member count, width or class count that cannot be meant): a lower bound,
    so it never refuses a run that fits. Checked where the run executes, not by a sweep's submitter (a
    login node is not the machine that trains)."""
    if not isinstance(model, torch.nn.Module):
        return
    need = model_bytes(model)
    have = device_memory(device)
    if have is not None and need > have:
        from ensemble_bench.cost import count_params

        n = count_params(model)["params"]
        raise UsageError(f"{cfg.method} on {cfg.backbone} with {cfg.options or 'its defaults'} has {n:,} parameters: "
                         f"its weights alone need {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
                         f"of {device.type} memory here")


def check_compiler(cfg: RunConfig, device: torch.device) -> None:
    """``--compile`` on a CPU builds C++ kernels (torch inductor): without a C++ compiler it would fail at the
    first training step, after the record was written. Refused before, in one line. The lookup is
    inductor's own (``torch._inductor.config.cpp.cxx``, ``$CXX``); a torch without it is left to report."""
    if not cfg.compile or device.type != "cpu":
        return
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except Exception:   # noqa: BLE001 - inductor's InvalidCxxCompiler, or whatever its search raises
        cxx = inductor_config.cpp.cxx
        names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
        raise UsageError(f"--compile on the CPU needs a C++ compiler (torch.compile's CPU kernels are C++) and "
                         f"none was found (looked for {', '.join(map(str, names)) or 'none'}; $CXX names another); "
                         f"install one (e.g. g++) or run without --compile") from None


# A Slurm job interrupted by a time limit or a preemption runs submitit's signal handler inside the training
# step: it calls the job's ``checkpoint()`` (sweep.jobs), which calls note_interrupted(), then runs `scontrol
# requeue` and exits. Whatever reaches execute() after that (SystemExit as a rule; a CalledProcessError when a
# SIGTERM of the same preemption kills scontrol before it returns, seen in CI on 2026-12-06) is the
# interruption, not the run's failure: the "running" record stays and the next attempt resumes the checkpoint.
_interrupted = False


def note_interrupted() -> None:
    """Mark this process's run as interrupted (called by a sweep job's ``checkpoint()``)."""
    global _interrupted
    _interrupted = True


def execute(cfg: RunConfig, *, log: Callable[[str], None] | None = None, force: bool = False,
            locked: bool = False) -> dict:
    """Run one configuration and return its complete record (an existing complete record is returned
    as is unless ``force``). The run's lock is taken here (``locked``: the caller holds it already);
    another process running the same run id is one line, exit 2. A failure never overwrites a
    complete record."""
    global _interrupted
    _interrupted = False   # a mark left by an earlier run of this process is not this run's
    out, run_id = Path(cfg.out), cfg.run_id()
    shift_set = preflight(cfg, force=force)
    from ensemble_bench import distributed

    from ensemble_bench.environment import exact_float32

    with exact_float32():   # "fp32" in a record means float32, not CUDA's default TF32 convolutions
        if distributed.rank() > 0:     # torchrun: rank 0 holds the lock and writes; the others train beside it
            return distributed.follow(cfg, log=log)
        if cfg.members_parallel and not locked:   # the members as parallel processes; the run below assembles
            from ensemble_bench.members import train_members_local

            train_members_local(cfg, log=log, force=force)
        if locked:
            return _execute(cfg, log=log, force=force, shift_set=shift_set)
        with run_lock(out, run_id) as mine:
            if not mine:
                raise UsageError(f"run {run_id} is being run by another process "
                                 f"({lock_holder(out, run_id) or 'unknown'}); "
                                 f"wait for it to finish (its record will be {out / (run_id + '.json')})")
            return _execute(cfg, log=log, force=force, shift_set=shift_set)


def preflight(cfg: RunConfig, force: bool = False) -> Any:
    """Every check of a run's input that needs no training, in the order ``execute`` makes them: a
    UsageError (one line) before anything is written. Returns the loaded ``--shift`` set (None without one).
    A command that runs several configurations (quickstart) checks them all first."""
    out = Path(cfg.out)
    run_id = cfg.run_id()
    check_output_dir(out)
    from ensemble_bench import records

    status = records.record_status(out, run_id)   # a file of that name holding another run's record: refused here
    if status == "complete" and not force:   # a record this device would not have trained: refused here
        check_same_precision(cfg, records.read_record(out / f"{run_id}.json"))
    check_run_paths(out, run_id)         # a folder where a result file goes (or the reverse): refused here
    method = make_method(cfg)      # bad options fail here, before anything is written
    meta_model = check_buildable(method, cfg)   # a method that cannot take this backbone: refused, nothing written
    device = resolve_device(cfg.device)
    check_fits_in_memory(meta_model, cfg, device)   # weights larger than the device: refused
    check_compiler(cfg, device)   # --compile on a CPU without a C++ compiler: refused
    return load_shift(cfg)         # --shift: a missing or bad corrupted set is refused before any work


def check_output_dir(out: Path, flag: str = "--out") -> None:
    """The output folder is a writable folder (or can be made one): bad input before any work. One check
    for every command that writes (run, sweep, leaderboard -o, report -o)."""
    for p in [out, *out.parents]:
        if p.is_symlink() and not p.exists():   # dangling, or a loop: mkdir would fail after the work
            raise UsageError(f"{flag} {out}: {p} is a symbolic link to nothing ({os.readlink(p)})")
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{flag} {out}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {out}: {p} is not writable")
            try:   # the permission bits can say yes where the file system says no (/proc, a read-only mount)
                fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=p)   # a file: no scan descends into it
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise UsageError(f"{flag} {out}: cannot create anything in {p} ({e.strerror or e})") from None
            return


def check_run_paths(out: Path, run_id: str) -> None:
    """Every path the run will write is free or of the kind it writes: its result files (``<run_id>.json``,
    ``.curves.csv``, ``.preds.npz``, ``.weights.safetensors``) are files; the checkpoints (``.ckpt/<run_id>``),
    the stage store (``.members``) and the locks (``.submitit/locks``) are folders. Else a run would fail
    at its first write, some after training: bad input, before any work."""
    from ensemble_bench.records import RESULT_SUFFIXES
    from ensemble_bench.runlock import LOCK_DIR

    targets = [(Path(f"{run_id}{suffix}"), "a file") for suffix in RESULT_SUFFIXES]
    targets += [(Path(d), "a folder") for d in (Path(".ckpt") / run_id, ".members", LOCK_DIR)]
    for rel, kind in targets:
        for depth in range(1, len(rel.parts) + 1):   # the target and the folders on the way to it
            p, want = out.joinpath(*rel.parts[:depth]), kind if depth == len(rel.parts) else "a folder"
            if os.path.lexists(p) and not p.exists():
                raise UsageError(f"{p} is a symbolic link to nothing ({os.readlink(p)}): the run writes "
                                 f"{want} there; mend or remove the link")
            if p.exists() and (p.is_dir() if want == "a file" else not p.is_dir()):
                raise UsageError(f"{p} is in the way: the run writes {want} there; move it away")


def make_trainer(cfg: RunConfig, bundle: Any, device: torch.device, code: dict, log: Callable[[str], None]):
    """The run's Trainer: checkpoints in ``<out>/.ckpt/<run_id>/``, finished plain stages shared through
    ``<out>/.members/`` (keys salted with the harness's code and the data), so a member task and the run
    that assembles its members find the same stages."""
    from ensemble_bench.train import Trainer

    out = Path(cfg.out)
    return Trainer(bundle, cfg, device, ckpt_dir=out / ".ckpt" / cfg.run_id(), log=log,
                   share_dir=out / ".members" if cfg.reuse_stages else None,
                   share_salt=f"{code['harness_sha256']}/{cfg.data_id['sha256']}/{cfg.val_fraction}")



def _earlier_processes(out: Path, run_id: str, status: str | None) -> dict:
    """For a run that resumes a killed or failed one (its record is there, not complete): when the first
    process started and how many processes this one makes, so that ``timings.started`` and ``wall_s``
    (this process's) are not read as the whole run's; {} for a fresh run."""
    from ensemble_bench import records

    if status not in ("running", "failed"):
        return {}
    try:
        old = records.read_record(out / f"{run_id}.json").get("timings") or {}
    except (OSError, records.RecordError):   # unreadable: nothing to carry (the run still resumes from checkpoints)
        return {}
    first = old.get("first_started") or old.get("started")
    return {**({"first_started": first} if first else {}), "processes": int(old.get("processes") or 1) + 1}


def _execute(cfg: RunConfig, *, log: Callable[[str], None] | None = None, force: bool = False,
             shift_set: Any = None) -> dict:
    from ensemble_bench import cost as cost_mod
    from ensemble_bench import data as data_mod
    from ensemble_bench import metrics as metrics_mod
    from ensemble_bench import environment, predictions, records
    from ensemble_bench.members import read_member_tasks
    from ensemble_bench.shift import evaluate_shift

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    run_id = cfg.run_id()
    code = code_identity(methods.get(cfg.method), cfg.plugins)
    status = records.record_status(out, run_id)   # read again under the lock: another process may have finished it
    if not force and status == "complete":
        rec = records.read_record(out / f"{run_id}.json")
        theirs = rec.get("code") or {}
        changed = [k for k, v in code.items() if k.endswith("sha256") and theirs.get(k) != v]
        from ensemble_bench.columns import plugin_hashes

        if plugin_hashes(code) != plugin_hashes(theirs):   # a plugin may define the backbone or the data
            changed.append("plugins' sha256")
        if changed:
            log(f"{run_id}: a complete record exists, made by other code ({', '.join(changed)} differ): skipped; "
                f"--force runs it again with this code")
        else:
            log(f"{run_id}: complete record exists, skipped")
        if cfg.shift and (rec.get("metrics") or {}).get("shift", {}).get("set") != cfg.shift:
            log(f"{run_id}: the record has no {cfg.shift} evaluation; add it without training: "
                f"ensemble-bench evaluate {out / (run_id + '.json')} --shift {cfg.shift}"
                + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else ""))
        return rec
    # a forced re-run of a complete record leaves that record where it is until the new one is complete: a
    # failure or a kill part way must not lose a result
    replacing = force and status == "complete"
    method = make_method(cfg)
    device = resolve_device(cfg.device)
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    record: dict[str, Any] = records.RunRecord(
        run_id=run_id, status="running", config=cfg.to_dict(),
        method=records.MethodInfo(name=cfg.method, options=dict(cfg.options),
                                  size_reference=bool(getattr(type(method), "size_reference", False))),
        data=bundle.describe(), code=code, env=environment.environment_info(),
        timings={"started": _now(), **_earlier_processes(out, run_id, status)}, error=None,
    ).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    if not replacing:
        records.write_record(out, record)
    t_start = time.perf_counter()
    try:
        seed_everything(cfg.seed)
        trainer = make_trainer(cfg, bundle, device, code, log)
        ctx = FitContext(config=cfg, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                         image_size=bundle.image_size, device=device, data=bundle, trainer=trainer)
        log(f"{run_id}: {cfg.method} on {cfg.backbone} / {data_mod.identity_name(cfg.dataset, cfg.data_id)}, "
            f"{cfg.epochs} epochs, seed {cfg.seed}, {device}")
        model = check_model(method.fit(ctx), cfg.method)
        model = trainer.prepare(model).eval()
        t_eval = time.perf_counter()
        test = trainer.data.test
        logits = trainer.predict(model, test.x)
        if logits.shape[0] != model.num_members:   # the record's M (and the DEE curve) would be another model's
            raise MethodContractError(f"method {cfg.method!r} declares {model.num_members} members (num_members) "
                                      f"but its forward returns {logits.shape[0]} ([M, B, C] = {list(logits.shape)})")
        val_logits = trainer.predict(model, trainer.data.val.x) if trainer.data.val is not None else None
        ood = {k: trainer.predict(model, v) for k, v in trainer.data.ood.items()}
        labels = test.y.cpu()
        val_labels = trainer.data.val.y.cpu() if val_logits is not None else None
        metrics = metrics_mod.evaluate(logits, labels, val_logits=val_logits, val_labels=val_labels,
                                       ood=ood, combine=model.combine)
        eval_s = time.perf_counter() - t_eval
        shift_logits: dict[str, Any] = {}
        shift_s = None
        if shift_set is not None:   # every corruption x severity, in batches on the training device
            t_shift = time.perf_counter()
            metrics["shift"] = evaluate_shift(lambda x: trainer.predict(model, x), shift_set, val_logits=val_logits,
                                              val_labels=val_labels, combine=model.combine, progress=cfg.progress,
                                              logits_out=shift_logits if cfg.save_predictions else None)
            shift_s = time.perf_counter() - t_shift
            record["data"]["shift"] = shift_set.describe()
            log(f"{run_id}: {shift_set.name}: {len(shift_set)} cells x {shift_set.n_per_severity} images in "
                f"{shift_s:.1f}s, mean acc {metrics['shift']['mean']['acc']:.4f}")
        cost = cost_mod.measure(model, (bundle.in_channels, bundle.image_size, bundle.image_size), device,
                                latency=True, latency_runs=cfg.latency_runs,
                                bf16=trainer.bf16, channels_last=trainer.channels_last)
        training = trainer.summary()
        # work a method does outside Trainer.fit (e.g. mask updates, batch-norm passes) joins the totals
        if ctx.extra_train_flops and training["train_flops"] is not None:
            training["train_flops"] += ctx.extra_train_flops
        if ctx.extra_train_s:
            training["train_s"] += ctx.extra_train_s
            training["train_s_extra"] = ctx.extra_train_s
        training["device"] = trainer.training_device()   # every device that trained its epochs, " + "-joined
        training.update(trainer.scale_out_summary())   # world size (DDP): per device and in total
        tasks = read_member_tasks(out, run_id, training)   # members trained by member tasks (--members-parallel)
        if tasks:
            training["member_tasks"] = tasks
        training["reused_stages"] = {k: s["reused_from"] for k, s in training["stages"].items() if s.get("reused_from")}
        if cfg.keep_weights:      # evaluate again later (new shift or OOD sets) without training again
            record["weights"] = f"{run_id}{records.WEIGHTS_SUFFIX}"
        record["timings"].update(finished=_now(), wall_s=time.perf_counter() - t_start, eval_s=eval_s)
        if shift_s is not None:
            record["timings"]["shift_eval_s"] = shift_s
        if tasks:   # the wall time of the critical path: the slowest member task, then this assembly
            record["timings"]["critical_path_s"] = (max(t.get("wall_s") or 0.0 for t in tasks.values())
                                                    + record["timings"]["wall_s"])
        # the complete record through its types (ensemble_bench.record_types): what every reader validates
        started = records.RunRecord.from_dict(record, f"run {run_id}")
        record = records.RunRecord(
            run_id=run_id, status="complete", config=started.config,
            method=records.MethodInfo(name=cfg.method, options=started.method.options,
                                      size_reference=started.method.size_reference, combine=model.combine,
                                      num_members=model.num_members, info=ctx.info),
            data=started.data, code=started.code, env=started.env, timings=started.timings, error=None,
            extra=started.extra,   # e.g. weights
            metrics=records.Metrics.from_dict(metrics, f"run {run_id}", complete=True, path="metrics"),
            cost=records.Cost.from_dict(cost, f"run {run_id}", path="cost"),
            training=records.Training.from_dict(training, f"run {run_id}", path="training"),
        ).to_dict()
        # the files beside the record once the record itself is known to be whole, the record last
        records.write_curves(out, run_id, training["stages"])
        if cfg.keep_weights:
            records.save_weights(out, run_id, model)
        if cfg.save_predictions:
            predictions.save_predictions(out, run_id, logits=logits, labels=labels, val_logits=val_logits,
                                         val_labels=val_labels, ood=ood, combine=model.combine, extra=shift_logits)
        records.write_record(out, record)
        shutil.rmtree(out / ".ckpt" / run_id, ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / ".ckpt").rmdir()          # only when no other run's checkpoints are left
        return record
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or type(e).__name__ in ("JobInterrupted",):
            raise   # interrupted, not failed: the "running" record stays and the checkpoint resumes it
        if _interrupted:
            log(f"{run_id}: interrupted (time limit or preemption), then {type(e).__name__}: {e}; the record stays "
                f"running and the next attempt resumes its checkpoint")
            raise
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=20))
        record["timings"].update(finished=_now(), wall_s=time.perf_counter() - t_start)
        if records.record_status(out, run_id) != "complete":   # never over a finished result
            records.write_record(out, record)
        else:
            log(f"{run_id}: the forced run failed; the complete record is kept as it was")
        raise


HARNESS_DIR = Path(__file__).resolve().parent
METHODS_DIR = Path(methods.__file__).resolve().parent


def harness_files() -> list[Path]:
    """The harness's source: every .py file under benchmark/ (installed as ensemble_bench/), its sub-packages
    too, but not the methods. In the repository methods/ sits beside benchmark/; an installed copy (``pip install
    .``) nests it as ensemble_bench/methods/, and counting it there would give the same code another harness hash
    and make every method file part of every record's harness."""
    return [p for p in HARNESS_DIR.rglob("*.py") if METHODS_DIR not in p.parents]


def _sha256_files(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def precision_conflict(cfg: RunConfig, rec: Mapping, device_type: str) -> str | None:
    """Why a complete record cannot stand for this run on a ``device_type`` device (None when it can): it
    trained in another precision. The ``bf16`` flag is in the run id but acts only on CUDA, and the id is fixed
    before the device is known, so a CPU run (fp32) and a CUDA run (bf16) of the same flags share an id:
    another experiment, which skipping would silently replace by the record there."""
    from ensemble_bench import columns

    theirs = columns.flatten_record(rec).get("precision")
    mine = "bf16" if device_type == "cuda" and cfg.bf16 else "fp32"
    if not theirs or theirs == mine:
        return None
    return (f"{rec.get('run_id')}: the complete record of this run id trained in {theirs}; on {device_type} this "
            f"run would train in {mine}, another experiment under the same id (bf16 acts on CUDA only, and the id "
            f"is fixed before the device is known)")


def check_same_precision(cfg: RunConfig, rec: Mapping) -> None:
    """Refuse to take a complete record for this run when this device would train it in another precision
    (:func:`precision_conflict`): one line, before any work."""
    why = precision_conflict(cfg, rec, resolve_device(cfg.device).type)
    if why:
        raise UsageError(f"{why}: give it another --out, or bf16 = false in a --config file to train in fp32 "
                         f"under its own id, or --force to replace the record")


def code_identity(method_cls: type, plugin_specs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Which code made a record: a hash of the harness (every .py file under benchmark/, its sub-packages
    too) and of the method's source file, with the method's module and file, so a leaderboard row traces
    to the code that made it."""
    from ensemble_bench import plugins

    src = Path(inspect.getsourcefile(method_cls) or "")
    code = {"harness_sha256": _sha256_files(harness_files(), HARNESS_DIR),
            "method_module": method_cls.__module__, "method_file": src.name,
            "method_sha256": _sha256_files([src], src.parent) if src.is_file() else None}
    if src.parent.resolve() != METHODS_DIR:   # a plugin's method: where its file is, and every plugin loaded
        code["method_path"] = str(src.resolve())
    if plugin_specs:   # the run's plugins (a method, backbone or dataset may come from any of them)
        code["plugins"] = [{k: p[k] for k in ("spec", "module", "sha256")} for p in plugins.load_all(plugin_specs)]
    return code


def build_for_cost(method_name: str, backbone: str, num_classes: int, in_channels: int, image_size: int,
                   options: dict[str, Any], device: torch.device) -> EnsembleModel:
    """The method's deployed architecture, untrained (``cost`` without training)."""
    from ensemble_bench import backbones

    backbones.check_name(backbone)
    cls = methods.get(method_name)
    cls.check_backbone(backbone)
    opts = build_options(cls.Config, options, method_name)
    cfg = RunConfig(method=method_name, backbone=backbone, dataset="digits", options=dict(vars(opts)))
    # a model whose weights alone exceed the device's memory: one line (as `run`), not an allocator crash
    check_fits_in_memory(check_buildable(cls(opts), cfg, (num_classes, in_channels, image_size)), cfg, device)
    ctx = FitContext(config=cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                     device=device)
    return check_model(cls(opts).build(ctx), method_name).to(device).eval()



def cost_device_name(device: torch.device) -> str:
    from ensemble_bench.cost import device_name

    return device_name(device)
