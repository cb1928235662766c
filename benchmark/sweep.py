"""Sweeps: a TOML grid of runs, expanded to RunConfigs and run locally or on Slurm through submitit.

A sweep spec::

    name = "cifar10-resnet18"      # optional; the Slurm job name
    [grid]                         # every key a list of values; the sweep is their product
    method = ["single", "deep_ensemble", "packed"]
    backbone = ["resnet18"]
    dataset = ["cifar10"]
    seed = [0, 1, 2]
    epochs = [200]
    [options.packed]               # a method's option grid, crossed with the grid for that method only
    gamma = [1, 2]
    [run]                          # fixed settings of every run: out, data_dir, device, download, lr, ...
    out = "results/runs"
    [slurm]                        # executor settings (see SLURM_KEYS)
    partition = "gpu"
    timeout_min = 240

Every run is a :class:`~ensemble_bench.config.RunConfig` with its stable run id; a run whose record is
complete is skipped, so running a sweep again runs only what is missing, failed or interrupted.

On Slurm, the runs of one submission form ONE job array (``executor.batch()``); each task is a
:class:`RunJob`, a ``submitit.helpers.Checkpointable``: on a time limit or a preemption submitit calls
its ``checkpoint()``, which requeues the same run, and the run resumes from the trainer's per-epoch
checkpoint (``<out>/.ckpt/<run_id>/``), losing at most the epoch in progress. The submitit folder is
``<out>/.submitit/<job id>/`` (pickles, sbatch script, logs); ``<out>/.submitit/runs/<run_id>.json``
remembers which job runs which run, so a sweep started again while its jobs are still queued or
running submits nothing twice, and ``sweep-status`` can tell queued from running from interrupted.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import submitit

from ensemble_bench.config import NON_IDENTITY_FIELDS, RUN_FIELDS, RunConfig, canonical_json, load_toml, make_run_config
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import run_lock  # sweep.run_lock: the one lock per run id (plain runs take it too)

SPEC_KEYS = ("name", "grid", "options", "run", "slurm")
# the run fields a sweep requires to be spelled out (the RunConfig defaults are a CPU demo)
REQUIRED_RUN_KEYS = ("method", "backbone", "dataset")
# [slurm] keys: type, and what submitit calls it (None: an executor argument, not an sbatch setting)
SLURM_KEYS: dict[str, tuple[type, str | None]] = {
    "partition": (str, "partition"),
    "timeout_min": (int, "time"),
    "gpus_per_node": (int, "gpus_per_node"),
    "cpus_per_task": (int, "cpus_per_task"),
    "mem_gb": (float, "mem"),
    "array_parallelism": (int, "array_parallelism"),
    "additional_parameters": (dict, "additional_parameters"),
    "signal_delay_s": (int, "signal_delay_s"),
    "setup": (list, "setup"),
    "job_name": (str, "job_name"),
    "qos": (str, "qos"),
    "account": (str, "account"),
    "constraint": (str, "constraint"),
    "exclude": (str, "exclude"),
    "nodelist": (str, "nodelist"),
    "gres": (str, "gres"),
    "comment": (str, "comment"),
    "srun_args": (list, "srun_args"),
    "use_srun": (bool, "use_srun"),
    "tasks_per_node": (int, "ntasks_per_node"),   # DDP: one rank per task (ensemble_bench.distributed)
    "nodes": (int, "nodes"),
    "max_num_timeout": (int, None),   # how many time-limit requeues before a run gives up
    "python": (str, None),            # the python command on the nodes (default: this interpreter)
}
SLURM_DEFAULTS = {"timeout_min": 240, "cpus_per_task": 4, "array_parallelism": 256, "max_num_timeout": 3}
SUBMITIT_DIR = ".submitit"
# squeue states of a job that has not ended yet
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}
_QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED"}


# ------------------------------------------------------------------------------------------ spec
@dataclass
class SweepSpec:
    path: str
    name: str
    grid: dict[str, list]
    options: dict[str, dict[str, list]]
    run: dict[str, Any]
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.grid["method"]) if "method" in self.grid else [self.run["method"]]

    @property
    def out(self) -> Path:
        """The results folder of every run of the sweep (absolute: jobs may start elsewhere)."""
        return Path(self.run.get("out", RUN_FIELDS["out"].default)).expanduser().absolute()


def _type_name(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
            list: "a list"}.get(v, getattr(v, "__name__", str(v)))


# Spec strings that reach the generated sbatch script or file names: a newline (or any other control
# character) in one of them would start a line of its own in the script (shlex.quote does not protect
# newlines), so they are refused. ``[slurm] setup`` is shell by design: its lines are written into the
# script as they are (whoever writes the spec runs those commands on the nodes), and is not checked.
SHELL_BY_DESIGN = ("setup",)


def _control_char(text: str) -> str | None:
    """The first control character (C0, DEL, C1; newline, carriage return, NUL, tab, ...) in ``text``."""
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o <= 0x9F or ch in "\u2028\u2029":
            return ch
    return None


def _check_text(where: str, field_name: str, value: Any) -> None:
    if isinstance(value, str):
        ch = _control_char(value)
        if ch is not None:
            raise UsageError(f"{where}: {field_name} contains a control character ({ch!r} at position "
                             f"{value.index(ch)}); newlines and other control characters are not allowed there "
                             f"(they would break the sbatch script)")


def _check_slurm(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [slurm] must be a table")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k not in SLURM_KEYS:
            raise UsageError(f"{where}: unknown [slurm] key {k!r}; valid keys: {', '.join(SLURM_KEYS)}")
        tp = SLURM_KEYS[k][0]
        ok = isinstance(v, tp) and not (tp is int and isinstance(v, bool))
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise UsageError(f"{where}: [slurm] {k} must be {_type_name(tp)}; got {v!r}")
        if k in ("setup", "srun_args") and not all(isinstance(s, str) for s in v):
            raise UsageError(f"{where}: [slurm] {k} must be a list of strings; got {v!r}")
        if k == "additional_parameters":
            bad = [kk for kk, vv in v.items() if not isinstance(vv, (str, int, float, bool))]
            if bad:
                raise UsageError(f"{where}: [slurm] additional_parameters.{bad[0]} must be a string, number or boolean")
        if k in ("timeout_min", "cpus_per_task", "array_parallelism", "tasks_per_node", "nodes") and v < 1:
            raise UsageError(f"{where}: [slurm] {k} must be >= 1; got {v}")
        if k in ("gpus_per_node", "signal_delay_s", "max_num_timeout") and v < 0:
            raise UsageError(f"{where}: [slurm] {k} must be >= 0; got {v}")
        if k == "mem_gb" and not v > 0:
            raise UsageError(f"{where}: [slurm] mem_gb must be > 0; got {v}")
        if k not in SHELL_BY_DESIGN:
            if isinstance(v, str):
                _check_text(where, f"[slurm] {k}", v)
            elif isinstance(v, list):
                for i, item in enumerate(v):
                    _check_text(where, f"[slurm] {k}[{i}]", item)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    _check_text(where, f"[slurm] {k} key {kk!r}", kk)
                    _check_text(where, f"[slurm] {k}.{kk}", vv)
        out[k] = v
    return out


def parse_spec(doc: dict[str, Any], where: str = "sweep spec") -> SweepSpec:
    """Check a spec's structure (one-line :class:`UsageError`); names and values of each run are checked
    when the runs are made (:func:`expand`)."""
    unknown = [k for k in doc if k not in SPEC_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} at the top level; valid: {', '.join(SPEC_KEYS)}")
    for k in ("grid", "options", "run", "slurm"):
        if k in doc and not isinstance(doc[k], dict):
            raise UsageError(f"{where}: [{k}] must be a table")
    name = doc.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: name must be a non-empty string")
    _check_text(where, "name", name)
    grid = dict(doc.get("grid", {}))
    run = dict(doc.get("run", {}))
    if not grid:
        raise UsageError(f"{where}: [grid] is missing or empty; a sweep needs at least one list, e.g. seed = [0, 1, 2]")
    for k, v in grid.items():
        if k == "options":
            raise UsageError(f"{where}: method options go in [options.<method>] tables, not in [grid]")
        if k not in RUN_FIELDS:
            raise UsageError(f"{where}: unknown [grid] key {k!r}; valid run settings: {', '.join(RUN_FIELDS)}")
        if k in NON_IDENTITY_FIELDS:
            raise UsageError(f"{where}: [grid] {k} does not change what a run computes (it is not part of the "
                             f"run id); set it in [run]")
        if not isinstance(v, list):
            raise UsageError(f"{where}: [grid] {k} must be a list (the values to sweep); got {v!r}; write [{_toml(v)}] for one value")
        if not v:
            raise UsageError(f"{where}: [grid] {k} is an empty list")
    for k in run:
        if k == "options":
            raise UsageError(f"{where}: method options go in [options.<method>] tables, not in [run]")
        if k not in RUN_FIELDS:
            raise UsageError(f"{where}: unknown [run] key {k!r}; valid run settings: {', '.join(RUN_FIELDS)}")
        if k in grid:
            raise UsageError(f"{where}: {k} is set in both [grid] and [run]; keep one")
    for k in ("out", "data_dir"):   # folder names: they reach the sbatch script (submitit's log paths)
        _check_text(where, f"[run] {k}", run.get(k))
    for k in REQUIRED_RUN_KEYS:
        if k not in grid and k not in run:
            raise UsageError(f"{where}: say which {k} to run: {k} = [...] in [grid] (or {k} = ... in [run])")
    if not isinstance(run.get("method", ""), str):
        raise UsageError(f"{where}: [run] method must be a string")
    methods_in_sweep = list(grid["method"]) if "method" in grid else [run["method"]]
    options: dict[str, dict[str, list]] = {}
    for method, table in doc.get("options", {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"{where}: [options.{method}] must be a table of option = [values]")
        if method not in methods_in_sweep:
            raise UsageError(f"{where}: [options.{method}] is for method {method!r}, which this sweep does not run "
                             f"(methods: {', '.join(map(str, methods_in_sweep))})")
        for k, v in table.items():
            if not isinstance(v, list):
                raise UsageError(f"{where}: [options.{method}] {k} must be a list (the values to sweep); got {v!r}; "
                                 f"write [{_toml(v)}] for one value")
            if not v:
                raise UsageError(f"{where}: [options.{method}] {k} is an empty list")
        options[method] = dict(table)
    slurm = _check_slurm(where, doc.get("slurm", {}))
    return SweepSpec(path=where, name=name, grid=grid, options=options, run=run, slurm=slurm)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def load_spec(path: str | os.PathLike) -> SweepSpec:
    return parse_spec(load_toml(path), str(path))


def _product(table: dict[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(table)
    for values in itertools.product(*(table[k] for k in keys)):
        yield dict(zip(keys, values))


def expand(spec: SweepSpec) -> list[RunConfig]:
    """Every run of the sweep, in grid order, each validated by :func:`make_run_config` (names of methods,
    backbones, datasets and options; values) and by the method's build (a method / backbone combination
    the method refuses fails the whole sweep before anything is submitted). Runs that resolve to the same run id appear once. ``out``
    and ``data_dir`` are made absolute (relative to the current directory), which leaves run ids alone."""
    from ensemble_bench.runner import check_buildable, make_method

    from ensemble_bench import distributed

    ranks = int(spec.slurm.get("tasks_per_node", 1)) * int(spec.slurm.get("nodes", 1))
    runs: list[RunConfig] = []
    seen: set[str] = set()
    buildable: set[str] = set()   # (method, backbone, dataset, options) already built: seeds etc. share it
    fixed = dict(spec.run)
    fixed["out"] = str(spec.out)
    if fixed.get("data_dir"):
        fixed["data_dir"] = str(Path(fixed["data_dir"]).expanduser().absolute())
    for point in _product(spec.grid):
        method = point.get("method", fixed.get("method"))
        for opts in _product(spec.options.get(method, {})):
            values = {**fixed, **point, "options": opts}
            try:
                with distributed.assume_world_size(ranks):   # [slurm] tasks_per_node x nodes: DDP ranks
                    cfg = make_run_config(values)
                arch = canonical_json([cfg.method, cfg.backbone, cfg.dataset, cfg.options])
                if arch not in buildable:
                    check_buildable(make_method(cfg), cfg)
                    buildable.add(arch)
            except UsageError as e:
                shown = ", ".join(f"{k}={v}" for k, v in {**point, **opts}.items())
                raise UsageError(f"{spec.path}: run ({shown}): {e}") from None
            rid = cfg.run_id()
            if rid not in seen:
                seen.add(rid)
                runs.append(cfg)
    return runs


# ---------------------------------------------------------------------------------- the job
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _limit_threads() -> None:
    """Inside a Slurm job, use the CPUs given to the task unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = os.environ.get("SLURM_CPUS_PER_TASK")
    if n and n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


class RunJob(submitit.helpers.Checkpointable):
    """One run of a sweep, as submitit runs it. Picklable (a config dict); ``checkpoint()`` (called by
    submitit on a time limit or preemption) resubmits the same run, which resumes from the trainer's
    per-epoch checkpoint. Returns a small summary; a failing run raises after the runner has recorded
    the failure, so Slurm and submitit see it failed too."""

    def __init__(self, config: dict[str, Any], run_id: str, prefix_logs: bool = False):
        self.config = dict(config)
        self.run_id = run_id
        self.prefix_logs = prefix_logs
        self.requeues = 0

    def __call__(self) -> dict[str, Any]:
        from ensemble_bench.runner import execute

        from ensemble_bench import distributed

        _limit_threads()
        distributed.export_slurm_env()   # a job of several tasks ([slurm] tasks_per_node / nodes): one rank each
        cfg = make_run_config(self.config)
        if cfg.run_id() != self.run_id:
            raise RuntimeError(f"run {self.run_id}: this code gives the config the id {cfg.run_id()} (a method's "
                               f"options or RunConfig changed since submission); submit the sweep again")
        if self.prefix_logs:
            def log(s: str) -> None:
                print(f"{self.run_id}: {s}" if not s.startswith(self.run_id) else s, file=sys.stderr, flush=True)
        else:
            def log(s: str) -> None:
                print(s, file=sys.stderr, flush=True)
        if self.requeues:
            log(f"{self.run_id}: attempt {self.requeues + 1} (requeued {self.requeues}x); resuming from checkpoints")
        if distributed.rank() > 0:   # rank 0 holds the lock and writes the record
            return execute(cfg, log=log, locked=True)
        with run_lock(Path(cfg.out), self.run_id) as mine:
            if not mine:
                log(f"{self.run_id}: another process is running it; left to that one")
                return {"run_id": self.run_id, "status": "busy", "requeues": self.requeues}
            rec = execute(cfg, log=log, locked=True)
        return {"run_id": self.run_id, "status": rec["status"], "requeues": self.requeues,
                "acc": rec.get("metrics", {}).get("acc")}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The training state is on disk (per-epoch checkpoints): requeue the same run, counting attempts.
        self.requeues += 1
        print(f"{self.run_id}: interrupted; requeue {self.requeues} resumes after the last finished epoch",
              file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class MemberJob(submitit.helpers.Checkpointable):
    """Member task ``k`` of a run (``members_parallel``): trains that member alone
    (``ensemble_bench.runner.execute_member``); the run's own job, started after all its member tasks,
    assembles the ensemble, evaluates it and writes the record. Requeued like a RunJob; the member resumes
    from its per-epoch checkpoint."""

    def __init__(self, config: dict[str, Any], run_id: str, k: int, force: bool = False, prefix_logs: bool = False):
        self.config = dict(config)
        self.run_id = run_id
        self.k = int(k)
        self.force = force
        self.prefix_logs = prefix_logs
        self.requeues = 0

    def __call__(self) -> dict[str, Any]:
        from ensemble_bench.runner import execute_member

        _limit_threads()
        cfg = make_run_config(self.config)
        if cfg.run_id() != self.run_id:
            raise RuntimeError(f"run {self.run_id}: this code gives the config the id {cfg.run_id()}; submit again")
        tag = f"{self.run_id}.member{self.k}"

        def log(s: str) -> None:
            print(f"{tag}: {s}" if self.prefix_logs else s, file=sys.stderr, flush=True)
        info = execute_member(cfg, self.k, log=log, force=self.force)
        return {"run_id": tag, "status": info["status"], "wall_s": info.get("wall_s"), "requeues": self.requeues}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def member_jobs(cfg: RunConfig, force: bool = False, prefix_logs: bool = False) -> list[MemberJob]:
    """The member tasks of a run with ``members_parallel`` (none when its method, with these options,
    has no independent members: it then trains as one job)."""
    from ensemble_bench.runner import make_method, member_task_count

    if not getattr(cfg, "members_parallel", False):
        return []
    n = member_task_count(make_method(cfg))
    return [MemberJob(cfg.to_dict(), cfg.run_id(), k, force, prefix_logs) for k in range(n)]


def train_members_local(cfg: RunConfig, *, log: Callable[[str], None] | None = None, force: bool = False,
                        workers: int | None = None) -> list[dict]:
    """``run --members-parallel``: the run's member tasks as parallel processes on this machine (one per
    member, at most ``workers``; each with its share of the CPU threads), before the run assembles them.
    A member task that fails is reported; the assembling run then trains that member itself."""
    import concurrent.futures as cf
    import multiprocessing

    from ensemble_bench import records

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not force and records.record_status(Path(cfg.out), cfg.run_id()) == "complete":
        return []
    jobs = member_jobs(cfg, force=force, prefix_logs=True)
    if not jobs:
        log(f"{cfg.run_id()}: {cfg.method} has no independent members with these options: trained as one job")
        return []
    n = min(len(jobs), workers or len(jobs))
    log(f"{cfg.run_id()}: {len(jobs)} member tasks in {n} parallel processes")
    done = []
    with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_pool_init, initargs=(max(1, (os.cpu_count() or 1) // n),)) as pool:
        for summary in pool.map(_pool_run, jobs):
            if summary.get("error"):
                log(f"{summary['run_id']}: member task failed ({summary['error']}); the run trains it itself")
            done.append(summary)
    return done


# ----------------------------------------------------------------------------- queue and state
def _manifest_path(out: Path, run_id: str) -> Path:
    return out / SUBMITIT_DIR / "runs" / f"{run_id}.json"


def read_manifest(out: Path, run_id: str) -> dict | None:
    import json

    p = _manifest_path(out, run_id)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("job_id"), str) else None


def write_manifest(out: Path, run_id: str, entry: dict) -> None:
    from ensemble_bench.records import write_json_atomic

    write_json_atomic(_manifest_path(out, run_id), entry)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def slurm_queue() -> dict[str, tuple[str, str]]:
    """``{job id: (state, command)}`` of this user's jobs that Slurm still knows, one row per array task
    (``1234_5``). Raises RuntimeError when squeue fails (no controller)."""
    try:
        p = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i|%T|%o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"squeue failed: {e}") from None
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise RuntimeError(f"squeue failed: {msg}")
    out: dict[str, tuple[str, str]] = {}
    for line in p.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3:
            out[parts[0]] = (parts[1].upper(), parts[2])
    return out


@dataclass
class RunState:
    config: RunConfig
    run_id: str
    state: str                 # done | running | pending | failed
    detail: str = ""           # queued | not submitted | interrupted | ... (for pending/running)
    error: str | None = None   # the failed record's error
    job_id: str | None = None  # the Slurm job (array task) that runs or ran it
    holder: str | None = None  # "pid P on host H": the live process that holds the run's lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, another user's
        return True
    except OSError:
        return True
    return True


def lock_owner(out: Path, run_id: str) -> tuple[bool | None, str | None]:
    """(whether a live process holds the run's lock, "pid P on host H" of the holder or last holder).
    None for the first when it cannot be told (the lock file cannot be opened, e.g. a read-only folder).

    The lock (``ensemble_bench.runner.run_lock``) is released by the kernel however its process ends, so a
    killed run's lock is free. Probing it means taking it for an instant, which a run starting at that
    very instant would take for another process's, so the probe is avoided where the answer is certain
    without it: no lock file (never locked: not held), a holder on this host whose pid is gone (killed:
    not held). A holder on another host, or a live pid here (it holds the lock, or its pid was reused),
    is probed."""
    import socket

    from ensemble_bench.runner import LOCK_DIR, lock_holder, lock_is_held

    path = Path(out) / LOCK_DIR / f"{run_id}.lock"
    if not path.is_file():
        return False, None
    holder = lock_holder(out, run_id)    # read first: a probe that takes the lock rewrites the file
    if holder is not None:
        pid, host = holder.split()[1], holder.split()[-1]
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            return False, holder
    try:
        held = lock_is_held(out, run_id)
    except OSError:
        return None, holder
    return held, holder


def _job_active(entry: dict | None, queue: dict[str, tuple[str, str]] | None, folder: Path) -> tuple[str, str] | None:
    """The queue row of the run's job if that job is still alive and is ours (its batch script lives in
    our submitit folder: a job id reused by Slurm after a reset is not mistaken for ours)."""
    if not entry or queue is None:
        return None
    row = queue.get(entry["job_id"])
    if row is None or row[0] not in _ACTIVE_STATES:
        return None
    if row[1] and not row[1].startswith(str(folder) + os.sep):
        return None
    return row


def run_states(spec: SweepSpec, runs: list[RunConfig] | None = None, *,
               queue: dict[str, tuple[str, str]] | None | str = "auto") -> tuple[list[RunState], str | None]:
    """The state of every run of the sweep, from the records and (when any run was sent to Slurm and
    squeue answers) the Slurm queue. Returns (states, a note when the queue could not be read)."""
    from ensemble_bench import records

    runs = expand(spec) if runs is None else runs
    out = spec.out
    folder = out / SUBMITIT_DIR
    entries = {cfg.run_id(): read_manifest(out, cfg.run_id()) for cfg in runs}
    note = None
    if queue == "auto":
        queue = None
        if any(entries.values()):
            if slurm_available():
                try:
                    queue = slurm_queue()
                except RuntimeError as e:
                    note = f"Slurm queue not readable ({e}); states from the records only"
            else:
                note = "runs were sent to Slurm but squeue is not available here; states from the records only"
    states = []
    for cfg in runs:
        rid = cfg.run_id()
        entry = entries[rid]
        rec = None
        path = records.record_path(out, rid)
        if path.is_file():
            try:
                rec = records.read_record(path)
            except records.RecordError:
                rec = None
        status = rec["status"] if rec else None
        job = _job_active(entry, queue, folder)
        job_id = entry["job_id"] if entry else None
        held, holder = (None, None) if status == "complete" or job is not None else lock_owner(out, rid)
        if status == "complete":
            states.append(RunState(cfg, rid, "done", job_id=job_id))
        elif job is not None:   # alive in the queue: its state says more than a record of an earlier attempt
            queued = job[0] in _QUEUED_STATES
            states.append(RunState(cfg, rid, "pending" if queued else "running",
                                   "queued" if queued else job[0].lower(), job_id=job_id))
        elif held:              # a live process holds the run's lock: it is at it (whatever the record says yet)
            states.append(RunState(cfg, rid, "running", holder or "running", job_id=job_id, holder=holder))
        elif status == "failed":
            states.append(RunState(cfg, rid, "failed", error=rec.get("error") or "(no error recorded)", job_id=job_id))
        elif status == "running":
            if entry is not None and queue is not None:
                # sent to Slurm, its job is gone, the record says running: killed or cancelled mid-run
                states.append(RunState(cfg, rid, "pending", "interrupted", job_id=job_id))
            elif held is False and (entry is None or _on_this_host(holder)):
                # nobody holds its lock: the process that wrote "running" was killed; resumable
                states.append(RunState(cfg, rid, "pending", "interrupted", job_id=job_id))
            else:               # cannot tell (a Slurm run without squeue, a lock that cannot be probed)
                states.append(RunState(cfg, rid, "running", job_id=job_id))
        elif entry is not None and queue is not None:
            states.append(RunState(cfg, rid, "pending", "job ended without a record", job_id=job_id))
        else:
            states.append(RunState(cfg, rid, "pending", "not submitted", job_id=job_id))
    return states, note


def _on_this_host(holder: str | None) -> bool:
    import socket

    return bool(holder) and holder.split()[-1] == socket.gethostname()


def _to_submit(states: list[RunState]) -> list[RunState]:
    """Runs that need a job: not done and no job of theirs alive in the queue. Failed and interrupted
    runs are submitted again (they resume from their checkpoints), and so is a run whose record says
    running without a Slurm job known to run it whose lock nobody could be seen to hold; a run whose
    lock a live process holds is left to that process (should one start meanwhile, the new job finds
    the run locked and leaves it alone)."""
    return [s for s in states if s.state == "failed" or (s.state == "pending" and s.detail != "queued")
            or (s.state == "running" and s.job_id is None and s.holder is None)]


# ------------------------------------------------------------------------------------ executors
def slurm_parameters(spec: SweepSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sbatch parameters in submitit's names, SlurmExecutor arguments) from the spec's [slurm] table."""
    s = {**SLURM_DEFAULTS, **spec.slurm}
    params: dict[str, Any] = {"job_name": spec.name}
    exec_args: dict[str, Any] = {}
    for k, v in s.items():
        target = SLURM_KEYS[k][1]
        if target is None:
            exec_args[k] = v
        elif k == "mem_gb":
            params["mem"] = f"{int(v)}GB" if float(v).is_integer() else f"{int(v * 1024)}MB"
        else:
            params[target] = v
    if params.get("gpus_per_node") == 0:
        params.pop("gpus_per_node")
    return params, exec_args


def submit_slurm(spec: SweepSpec, runs: list[RunConfig]) -> list[tuple[RunConfig, Any]]:
    """Submit ``runs`` as one Slurm job array; returns [(config, submitit job)] and records which job
    runs which run."""
    if not runs:
        return []
    if not slurm_available():
        raise UsageError("--executor slurm needs Slurm's sbatch and squeue on PATH "
                         "(for a local test cluster: slurm/localcluster.sh install && slurm/localcluster.sh up)")
    out = spec.out
    folder = out / SUBMITIT_DIR
    params, exec_args = slurm_parameters(spec)
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=exec_args.get("max_num_timeout", 3),
                                      python=exec_args.get("python"))
    try:
        executor.update_parameters(**params)
    except ValueError as e:
        raise UsageError(f"{spec.path}: bad [slurm] settings: {str(e).splitlines()[0]}") from None
    members = {cfg.run_id(): member_jobs(cfg) for cfg in runs}
    plain = [cfg for cfg in runs if not members[cfg.run_id()]]
    parallel = [cfg for cfg in runs if members[cfg.run_id()]]
    jobs: dict[str, Any] = {}
    member_ids: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def refused() -> Iterator[None]:
        try:
            # submitit prints sbatch's stderr before raising; the error below says it in one line
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError,
                submitit.core.utils.FailedSubmissionError) as e:
            text = (e.stderr or e.output) if isinstance(e, subprocess.CalledProcessError) else str(e)
            text = text.decode(errors="replace") if isinstance(text, bytes) else str(text or e)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            raise UsageError(f"sbatch refused the job array: {lines[-1] if lines else type(e).__name__}") from None

    if plain:
        with refused(), executor.batch():
            submitted_jobs = [executor.submit(RunJob(cfg.to_dict(), cfg.run_id())) for cfg in plain]
        jobs.update({cfg.run_id(): job for cfg, job in zip(plain, submitted_jobs)})
    if parallel:
        # members_parallel: ONE array of every member task (one rank each: a member is one network), then
        # per run one job that depends on its member tasks (afterany: a member task that failed is trained
        # by the run itself) and assembles, evaluates and writes the record
        executor.update_parameters(ntasks_per_node=1, nodes=1)
        flat = [(cfg.run_id(), job) for cfg in parallel for job in members[cfg.run_id()]]
        with refused(), executor.batch():
            member_subs = [executor.submit(job) for _, job in flat]
        for (rid, _), sub in zip(flat, member_subs):
            member_ids.setdefault(rid, []).append(str(sub.job_id))
        params_back = {k: params[k] for k in ("ntasks_per_node", "nodes") if k in params}
        executor.update_parameters(ntasks_per_node=params_back.get("ntasks_per_node", 1), nodes=params_back.get("nodes", 1))
        for cfg in parallel:
            rid = cfg.run_id()
            executor.update_parameters(dependency="afterany:" + ":".join(member_ids[rid]))
            with refused():
                jobs[rid] = executor.submit(RunJob(cfg.to_dict(), rid))
        executor.update_parameters(dependency=None)
    submitted = _now()
    for cfg in runs:
        rid, job = cfg.run_id(), jobs[cfg.run_id()]
        entry = {"run_id": rid, "job_id": str(job.job_id), "executor": "slurm", "submitted": submitted,
                 "spec": str(Path(spec.path).absolute()), "folder": str(job.paths.folder)}
        if rid in member_ids:
            entry["member_jobs"] = member_ids[rid]
        write_manifest(out, rid, entry)
    return [(cfg, jobs[cfg.run_id()]) for cfg in runs]


@dataclass
class LocalOutcome:
    run_id: str
    status: str            # complete | failed | busy
    error: str | None = None
    seconds: float | None = None   # how long the run took (wall clock)


def _pool_init(threads: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


def _pool_run(job: RunJob) -> dict[str, Any]:
    """Run ``job`` in a pool worker; the summary carries ``seconds`` (the run's own wall time). A failing
    run (recorded as failed by the runner) comes back as {"error": ...} so that its time is known too."""
    import time

    t0 = time.perf_counter()
    try:
        summary = job()
    except Exception as e:
        return {"run_id": job.run_id, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}
    return {**summary, "seconds": time.perf_counter() - t0}


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h07m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, sec = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def progress_line(i: int, n: int, outcome: LocalOutcome, durations: list[float], workers: int) -> str:
    """"[i/n] run_id done in Xs (status); ~Y left": Y is the mean time of the runs finished so far times
    the runs left, over the workers that will share them (runs left to another process, which take no
    time here, are not in the mean)."""
    took = format_duration(outcome.seconds) if outcome.seconds is not None else "?"
    left = n - i
    if left <= 0:
        eta = "0s"
    elif durations:
        eta = format_duration(sum(durations) / len(durations) * left / max(1, min(workers, left)))
    else:
        eta = "?"
    return f"[{i}/{n}] {outcome.run_id} done in {took} ({outcome.status}); ~{eta} left"


def run_local(runs: list[RunConfig], workers: int = 1, *,
              report: Callable[[LocalOutcome], None] | None = None,
              progress: Callable[[str], None] | None = None) -> list[LocalOutcome]:
    """Run ``runs`` on this machine: in this process one after another (``workers=1``) or in a pool of
    ``workers`` processes. A failing run is recorded as failed (by the runner) and the others go on.
    ``report`` gets each outcome; ``progress`` one line per finished run (:func:`progress_line`)."""
    import time

    report = report or (lambda o: None)
    outcomes: list[LocalOutcome] = []
    durations: list[float] = []
    n_total = len(runs)
    # a members_parallel run is one task per member, then the run (which waits for them)
    n_tasks = sum(max(1, len(member_jobs(cfg))) for cfg in runs) if workers > 1 else len(runs)
    n_workers = 1 if workers <= 1 or n_tasks <= 1 else min(workers, n_tasks)

    def done(rid: str, summary: dict | None, err: BaseException | None, seconds: float | None) -> None:
        if err is not None:
            o = LocalOutcome(rid, "failed", f"{type(err).__name__}: {err}", seconds)
        elif summary.get("error"):
            o = LocalOutcome(rid, summary.get("status", "failed"), summary["error"], seconds)
        else:
            o = LocalOutcome(rid, summary["status"], None, seconds)
        outcomes.append(o)
        if seconds is not None and o.status != "busy":
            durations.append(seconds)
        report(o)
        if progress is not None:
            progress(progress_line(len(outcomes), n_total, o, durations, n_workers))

    if n_workers == 1:
        for cfg in runs:
            rid = cfg.run_id()
            t0 = time.perf_counter()
            try:
                summary = RunJob(cfg.to_dict(), rid)()
            except Exception as e:   # recorded by the runner; the sweep goes on
                done(rid, None, e, time.perf_counter() - t0)
            else:
                done(rid, summary, None, time.perf_counter() - t0)
        return outcomes
    import concurrent.futures as cf
    import multiprocessing

    n = n_workers
    threads = max(1, (os.cpu_count() or 1) // n)
    # members_parallel runs: their member tasks go first (in the same pool), the run itself, which
    # assembles, evaluates and writes the record, once all its member tasks have ended
    waiting = {cfg.run_id(): (cfg, member_jobs(cfg, prefix_logs=True)) for cfg in runs}
    members_left = {rid: len(jobs) for rid, (_, jobs) in waiting.items()}
    with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_pool_init, initargs=(threads,)) as pool:
        futures: dict[Any, tuple[str, bool]] = {}   # future -> (run id, is a member task)

        def submit_run(cfg: RunConfig) -> None:
            futures[pool.submit(_pool_run, RunJob(cfg.to_dict(), cfg.run_id(), prefix_logs=True))] = (cfg.run_id(), False)

        for rid, (cfg, jobs) in waiting.items():
            for job in jobs:
                futures[pool.submit(_pool_run, job)] = (rid, True)
            if not jobs:
                submit_run(cfg)
        try:
            while futures:
                finished, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    rid, is_member = futures.pop(fut)
                    try:
                        summary = fut.result()
                    except Exception as e:   # the worker itself died (e.g. killed for memory)
                        summary, err = None, e
                    else:
                        err = None
                    if is_member:   # a failed member task is trained by the run itself
                        if err is not None or (summary or {}).get("error"):
                            print(f"{rid}: a member task failed ({err or summary['error']}); the run trains "
                                  f"that member itself", file=sys.stderr, flush=True)
                        members_left[rid] -= 1
                        if members_left[rid] == 0:
                            submit_run(waiting[rid][0])
                    elif err is not None:
                        done(rid, None, err, None)
                    else:
                        done(rid, summary, None, summary.get("seconds"))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes


# ------------------------------------------------------------------------------------------ CLI
def _describe(cfg: RunConfig, spec: SweepSpec) -> str:
    """A run in one line: what it is, the other grid settings the sweep varies and its swept options."""
    base = ("method", "backbone", "dataset", "seed", "epochs")
    extra = [f"{k}={getattr(cfg, k)}" for k, v in spec.grid.items() if k not in base and len(v) > 1]
    table = spec.options.get(cfg.method, {})
    opts = [f"{k}={cfg.options[k]}" for k, v in table.items() if len(v) > 1 and k in cfg.options]
    text = f"{cfg.method} {cfg.backbone} {cfg.dataset} seed={cfg.seed} epochs={cfg.epochs}"
    return text + "".join(f" {e}" for e in extra) + (f" [{','.join(opts)}]" if opts else "")


def _counts(states: list[RunState]) -> dict[str, int]:
    return {k: sum(s.state == k for s in states) for k in ("done", "running", "pending", "failed")}


def format_status(spec: SweepSpec, states: list[RunState], note: str | None = None) -> str:
    c = _counts(states)
    lines = [f"sweep {spec.name} ({spec.path}): {len(states)} runs, records in {spec.out}",
             f"  done {c['done']}   running {c['running']}   pending {c['pending']}   failed {c['failed']}"]
    details: dict[str, int] = {}
    for s in states:
        if s.state == "pending":
            details[s.detail] = details.get(s.detail, 0) + 1
    if details:
        lines.append("  pending: " + ", ".join(f"{n} {d}" for d, n in sorted(details.items())))
    if details.get("interrupted"):
        lines.append("  interrupted: killed mid-run (no live process holds the run); running the sweep again "
                     "resumes them from their checkpoints")
    holders = [s for s in states if s.state == "running" and s.holder]
    if holders:
        lines.append("  running: " + ", ".join(f"{s.run_id} ({s.holder})" for s in holders))
    if note:
        lines.append(f"  note: {note}")
    failed = [s for s in states if s.state == "failed"]
    if failed:
        lines.append("failed runs:")
        for s in failed:
            err = (s.error or "").strip().splitlines()
            lines.append(f"  {s.run_id}  {_describe(s.config, spec)}")
            lines.append(f"      {err[0] if err else '(no error recorded)'}")
    return "\n".join(lines)


def check_out_dir(spec: SweepSpec) -> None:
    """The sweep's results folder is a writable folder or can be made one (its nearest existing
    ancestor is a writable folder): bad input, one line, before anything is run or written."""
    out = spec.out
    for p in [out, *out.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is a file" if p == out else f"is under {p}, which is a file"
                raise UsageError(f"{spec.path}: [run] out {out} {what}, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                what = "is not writable" if p == out else f"cannot be made: {p} is not writable"
                raise UsageError(f"{spec.path}: [run] out {out} {what}")
            return


def _spec_and_runs(path: str, plugins: list[str] | None = None) -> tuple[SweepSpec, list[RunConfig]]:
    spec = load_spec(path)
    if plugins:   # --plugin on the command line: every run of the sweep carries it to its job
        spec.run["plugins"] = [*spec.run.get("plugins", ()), *plugins]
    return spec, expand(spec)


def cli_status(args) -> int:
    spec, runs = _spec_and_runs(args.spec, getattr(args, "plugins", None))
    states, note = run_states(spec, runs)
    print(format_status(spec, states, note))
    return 0


def cli_sweep(args) -> int:
    if getattr(args, "status", False):
        return cli_status(args)
    workers = getattr(args, "workers", 1)
    if workers is None or workers < 1:
        raise UsageError(f"--workers must be >= 1; got {workers}")
    executor = getattr(args, "executor", "local")
    if executor == "slurm" and workers > 1:
        raise UsageError("--workers is for the local executor; on Slurm, [slurm] array_parallelism sets how many runs go at once")
    spec, runs = _spec_and_runs(args.spec, getattr(args, "plugins", None))
    check_out_dir(spec)
    if executor == "local" and int(spec.slurm.get("tasks_per_node", 1)) * int(spec.slurm.get("nodes", 1)) > 1:
        raise UsageError(f"{spec.path}: [slurm] tasks_per_node / nodes make every run a data-parallel job of several "
                         f"ranks: use --executor slurm (or torchrun for one run)")
    if executor == "slurm" and not slurm_available() and not args.dry_run:
        raise UsageError("--executor slurm needs Slurm's sbatch and squeue on PATH "
                         "(for a local test cluster: slurm/localcluster.sh install && slurm/localcluster.sh up)")
    queue: Any = "auto"
    if executor == "slurm" and not args.dry_run:
        try:   # submitting without knowing what is queued could submit a run twice
            queue = slurm_queue()
        except RuntimeError as e:
            raise UsageError(f"cannot submit: {e} (is the cluster up?)") from None
    states, note = run_states(spec, runs, queue=queue)
    todo = _to_submit(states)
    todo_ids = {s.run_id for s in todo}
    c = _counts(states)
    alive = [s for s in states if s.state in ("pending", "running") and s.run_id not in todo_ids]
    print(f"sweep {spec.name}: {len(states)} runs: {c['done']} complete (skipped), {len(alive)} queued or running "
          f"(skipped), {len(todo)} to run on {executor}", flush=True)
    if note:
        print(f"  note: {note}")
    for s in alive:
        print(f"  skip  {s.run_id}  {s.state} (" + (f"job {s.job_id}" if s.job_id else s.detail) + ")")
    if args.dry_run:
        for s in todo:
            why = s.state if s.state != "pending" else s.detail
            print(f"  run   {s.run_id}  ({why})  {_describe(s.config, spec)}")
        if executor == "slurm" and todo:
            params, exec_args = slurm_parameters(spec)
            shown = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
            print(f"  slurm: one job array of {len(todo)} tasks: {shown}; max_num_timeout="
                  f"{exec_args.get('max_num_timeout', 3)}")
        print("dry run: nothing submitted")
        return 0
    if not todo:
        print("nothing to submit")
        return 0
    cfgs = [s.config for s in todo]
    if executor == "slurm":
        submitted = submit_slurm(spec, cfgs)
        array_id = str(submitted[0][1].job_id).split("_")[0]
        print(f"submitted {len(submitted)} runs to Slurm as job array {array_id} "
              f"(at most {spec.slurm.get('array_parallelism', SLURM_DEFAULTS['array_parallelism'])} at once); "
              f"submitit files and logs in {spec.out / SUBMITIT_DIR}")
        for cfg, job in submitted:
            print(f"  {job.job_id}  {cfg.run_id()}  {_describe(cfg, spec)}")
        print(f"follow with: ensemble-bench sweep-status {args.spec}")
        return 0

    def report(o: LocalOutcome) -> None:
        print(f"  {o.status:<8} {o.run_id}" + (f"  {o.error}" if o.error else ""), flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    outcomes = run_local(cfgs, workers, report=report, progress=progress)
    n = {k: sum(o.status == k for o in outcomes) for k in ("complete", "failed", "busy")}
    print(f"ran {len(outcomes)} runs locally: {n['complete']} complete, {n['failed']} failed"
          + (f", {n['busy']} left to another process running them" if n["busy"] else ""))
    return 1 if n["failed"] else 0
