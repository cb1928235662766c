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

import dataclasses
import os
import sys
from typing import Any

from ensemble_bench.config import RunConfig
from ensemble_bench.errors import UsageError
from ensemble_bench.runlock import lock_owner, run_lock
from ensemble_bench.sweep.jobs import SUBMITIT_DIR, MemberJob, RunJob, member_jobs, read_manifest, write_manifest
from ensemble_bench.sweep.estimate import estimate_runs, time_left
from ensemble_bench.sweep.local import LocalOutcome, format_duration, progress_line, run_local
from ensemble_bench.sweep.slurm import (RunState, _to_submit, run_states, slurm_available, slurm_parameters,
                                        slurm_queue, submit_slurm)
from ensemble_bench.sweep.spec import (REQUIRED_RUN_KEYS, SLURM_DEFAULTS, SLURM_KEYS, SPEC_KEYS, SweepSpec, expand,
                                       load_spec, parse_spec)

__all__ = ["SPEC_KEYS", "REQUIRED_RUN_KEYS", "SLURM_KEYS", "SLURM_DEFAULTS", "SUBMITIT_DIR", "SweepSpec", "parse_spec",
           "load_spec", "expand", "RunJob", "MemberJob", "member_jobs", "read_manifest", "write_manifest", "run_lock",
           "lock_owner", "RunState", "run_states", "slurm_available", "slurm_queue", "slurm_parameters",
           "submit_slurm", "LocalOutcome", "format_duration", "progress_line", "run_local", "format_status",
           "estimate_runs", "time_left",
           "check_out_dir", "check_no_problem", "cli_sweep", "cli_status", "_to_submit"]


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
    return {k: sum(s.state == k for s in states) for k in ("done", "running", "pending", "failed", "problem")}


def _target_device(cfg: RunConfig, spec: SweepSpec, executor: str) -> str | None:
    """The device type a run of this sweep would train on, where the submitter can tell: this machine's for
    the local executor; on Slurm the run's own ``device`` when it names one, cuda where ``[slurm]`` asks for
    GPUs, else unknown (the run itself checks on its node, as ``run`` does)."""
    if executor == "local":
        from ensemble_bench.runner import resolve_device

        return resolve_device(cfg.device).type
    if cfg.device != "auto":
        return cfg.device
    wants_gpu = int(spec.slurm.get("gpus_per_node", 0) or 0) > 0 or "gpu" in str(spec.slurm.get("gres", ""))
    return "cuda" if wants_gpu else None


def mark_precision_conflicts(states: list[RunState], spec: SweepSpec, executor: str) -> list[RunState]:
    """A complete record that the run would not have trained, where it is going to train (another precision:
    a CPU record of a run sent to GPUs, ``runner.precision_conflict``), is a "problem", not "done": ``run``
    refuses to skip it, so the sweep must not list it as complete."""
    from ensemble_bench import records
    from ensemble_bench.runner import precision_conflict

    marked = []
    for s in states:
        device = _target_device(s.config, spec, executor) if s.state == "done" else None
        rec = (s.record or records.read_record(records.record_path(spec.out, s.run_id))) if device else None
        why = device and precision_conflict(s.config, rec, device)
        if why:
            why += (f": set another out, or bf16 = false, in {spec.path}'s [run] (fp32 under its own ids), or move "
                    f"the record away to train it again")
        # the record read for the check is not kept: a sweep's states live as long as it runs
        marked.append(dataclasses.replace(s, state="problem", error=why, record=None) if why
                      else dataclasses.replace(s, record=None))
    return marked


def check_no_problem(states: list[RunState], spec_path: str) -> None:
    """A run whose file ``run`` refuses (another run's record under its name): the sweep refuses, one line,
    before anything is submitted or written."""
    bad = [s for s in states if s.state == "problem"]
    if bad:
        more = f" (and {len(bad) - 1} more: ensemble-bench sweep-status {spec_path})" if len(bad) > 1 else ""
        raise UsageError(f"{bad[0].error}{more}")


def format_status(spec: SweepSpec, states: list[RunState], note: str | None = None) -> str:
    c = _counts(states)
    lines = [f"sweep {spec.name} ({spec.path}): {len(states)} runs, records in {spec.out}",
             f"  done {c['done']}   running {c['running']}   pending {c['pending']}   failed {c['failed']}"
             + (f"   problem {c['problem']}" if c["problem"] else "")]
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
    problems = [s for s in states if s.state == "problem"]
    if problems:
        lines.append("problem runs (`run` and `sweep` refuse their files until they are moved away):")
        for s in problems:
            lines.append(f"  {s.run_id}  {_describe(s.config, spec)}")
            lines.append(f"      {s.error}")
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
    left = [s.config for s in states if s.state != "done"]
    if left:   # the runs not done (a running one less the epochs its checkpoints hold), one after another
        print(f"  {_estimate_line(estimate_runs(left), 1)}")
    return 0


def _estimate_line(est: dict[str, float | None], workers: int) -> str:
    """The sweep's time on this machine, as far as earlier records of its configurations tell (``est``:
    ``estimate.estimate_runs`` of the runs to do)."""
    known = [x for x in est.values() if x is not None]
    if not known:
        return "estimated time: unknown (no record of these configurations in the results folder yet)"
    w = max(1, min(workers, len(est)))
    total = time_left(list(est.values()), [], w)
    how = ("from earlier records of the same configurations" if len(known) == len(est) else
           f"{len(known)} of {len(est)} runs from earlier records of the same configuration, "
           f"the others as their mean")
    return f"estimated time: ~{format_duration(total)} on {w} worker{'s' * (w > 1)} ({how})"


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
    states = mark_precision_conflicts(states, spec, executor)
    check_no_problem(states, args.spec)
    todo = _to_submit(states)
    todo_ids = {s.run_id for s in todo}
    c = _counts(states)
    alive = [s for s in states if s.state in ("pending", "running") and s.run_id not in todo_ids]
    print(f"sweep {spec.name}: {len(states)} runs: {c['done']} complete (skipped), {len(alive)} queued or running "
          f"(skipped), {len(todo)} to run on {executor}", flush=True)
    if note:
        print(f"  note: {note}")
    from ensemble_bench.recipe import ignored_settings

    for ignored in dict.fromkeys(n for cfg in runs for n in ignored_settings(cfg)):   # each once, not per run
        print(f"  note: {ignored}")
    for s in alive:
        print(f"  skip  {s.run_id}  {s.state} (" + (f"job {s.job_id}" if s.job_id else s.detail) + ")")
    est = estimate_runs([s.config for s in todo]) if executor == "local" and todo else {}
    if est:
        print(f"  {_estimate_line(est, workers)}", flush=True)
    if args.dry_run:
        for s in todo:
            why = s.state if s.state != "pending" else s.detail
            took = est.get(s.run_id)
            print(f"  run   {s.run_id}  ({why})  {_describe(s.config, spec)}"
                  + (f"  ~{format_duration(took)}" if took is not None else ""))
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

    outcomes = run_local(cfgs, workers, report=report, progress=progress, estimate=estimate_runs)
    n = {k: sum(o.status == k for o in outcomes) for k in ("complete", "failed", "busy")}
    print(f"ran {len(outcomes)} runs locally: {n['complete']} complete, {n['failed']} failed"
          + (f", {n['busy']} left to another process running them" if n["busy"] else ""))
    return 1 if n["failed"] else 0
