"""Member tasks (``run --members-parallel``, a sweep's ``members_parallel``): each independent member of
a run trained by a task of its own (``execute_member``, which writes what it did to
``<out>/.ckpt/<run_id>/member_tasks/<k>.json``); the run, started after its member tasks, assembles the
members, evaluates them and writes the record with ``read_member_tasks``. ``train_members_local`` runs a
run's member tasks as parallel processes on this machine; the sweep's ``MemberJob`` runs one on Slurm."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ensemble_bench.methods as methods
from ensemble_bench.api import FitContext
from ensemble_bench.config import RunConfig
from ensemble_bench.resolve import make_run_config
from ensemble_bench.errors import UsageError
from ensemble_bench.runlock import run_lock
from ensemble_bench.runner import (_now, check_output_dir, code_identity, cost_device_name, make_method, make_trainer,
                                   resolve_device, seed_everything)

def member_task_count(method: Any) -> int:
    """How many member tasks the method's members split into (0: not a method with independent members)."""
    if not getattr(type(method), "independent_members", False):
        return 0
    return int(method.member_tasks())


MEMBER_TASKS_DIR = "member_tasks"   # <out>/.ckpt/<run_id>/member_tasks/<k>.json: what each member task did


def execute_member(cfg: RunConfig, k: int, *, log: Callable[[str], None] | None = None,
                   force: bool = False) -> dict:
    """Member task ``k`` of a run (``--members-parallel``): train member k alone with the method's
    ``fit_member``, exactly as the run's ``fit`` trains it (same stage, seed, recipe, checkpoints in the
    run's checkpoint folder, the stage stored in ``<out>/.members/``); the run, started after its member
    tasks, assembles, evaluates and writes the record. Returns what the task did (also written to
    ``<out>/.ckpt/<run_id>/member_tasks/<k>.json`` for the record)."""
    from ensemble_bench import data as data_mod
    from ensemble_bench import records

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    run_id = cfg.run_id()
    check_output_dir(out)
    method = make_method(cfg)
    n = member_task_count(method)
    if not 0 <= k < n:
        raise UsageError(f"{cfg.method}: no member task {k} (this run has {n} member tasks)")
    if not force and records.record_status(out, run_id) == "complete":
        log(f"{run_id}: complete record exists; member task {k} skipped")
        return {"run_id": run_id, "member": k, "status": "skipped"}
    with run_lock(out, f"{run_id}.member{k}") as mine:
        if not mine:
            log(f"{run_id}: member task {k} is being run by another process; left to that one")
            return {"run_id": run_id, "member": k, "status": "busy"}
        t0 = time.perf_counter()
        started = _now()
        device = resolve_device(cfg.device)
        bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
        seed_everything(cfg.seed)
        trainer = make_trainer(cfg, bundle, device, code_identity(methods.get(cfg.method), cfg.plugins), log)
        ctx = FitContext(config=cfg, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                         image_size=bundle.image_size, device=device, data=bundle, trainer=trainer)
        log(f"{run_id}: member task {k}/{n} of {cfg.method}, seed {cfg.seed}, {device}")
        method.fit_member(ctx, k)
        info = {"run_id": run_id, "member": k, "status": "complete", "host": socket.gethostname(),
                "pid": os.getpid(), "device": cost_device_name(device), "started": started, "finished": _now(),
                "wall_s": time.perf_counter() - t0,
                "stages": {name: {"train_s": st.train_s, "reused_from": st.reused_from,
                                  "resumed_from_epoch": st.resumed_from_epoch}
                           for name, st in trainer.stages.items()}}
        if trainer.is_writer:
            records.write_json_atomic(out / ".ckpt" / run_id / MEMBER_TASKS_DIR / f"{k}.json", info)
        return info


def read_member_tasks(out: Path, run_id: str, training: dict) -> dict[str, dict]:
    """For the record: per stage trained by a member task of this run, which task, where, its wall time
    and whether it trained the stage or reused it (``reused_from``: another run's stage of the store)."""
    import json

    folder = Path(out) / ".ckpt" / run_id / MEMBER_TASKS_DIR
    tasks: dict[str, dict] = {}
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            t = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for stage, st in (t.get("stages") or {}).items():
            if stage not in training.get("stages", {}):
                continue
            tasks[stage] = {"task": t.get("member"), "host": t.get("host"), "device": t.get("device"),
                            "wall_s": t.get("wall_s"), "train_s": st.get("train_s"),
                            "trained": st.get("reused_from") is None, "reused_from": st.get("reused_from")}
    return tasks


def limit_threads() -> None:
    """Inside a Slurm job, use the CPUs given to the task unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = os.environ.get("SLURM_CPUS_PER_TASK")
    if n and n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


def member_task(config: dict[str, Any], run_id: str, k: int, *, force: bool = False,
                prefix_logs: bool = False) -> dict[str, Any]:
    """Member task ``k`` of the run ``run_id`` (its config as a dict), as a job runs it: the config must
    still give that run id; returns a small summary."""
    limit_threads()
    cfg = make_run_config(config)
    if cfg.run_id() != run_id:
        raise RuntimeError(f"run {run_id}: this code gives the config the id {cfg.run_id()}; submit again")
    tag = f"{run_id}.member{k}"

    def log(s: str) -> None:
        print(f"{tag}: {s}" if prefix_logs else s, file=sys.stderr, flush=True)
    info = execute_member(cfg, k, log=log, force=force)
    return {"run_id": tag, "status": info["status"], "wall_s": info.get("wall_s")}


class MemberTask:
    """Member task ``k`` of a run as a picklable callable (a process pool's work item)."""

    def __init__(self, config: dict[str, Any], run_id: str, k: int, force: bool = False, prefix_logs: bool = False):
        self.config = dict(config)
        self.run_id = run_id
        self.k = int(k)
        self.force = force
        self.prefix_logs = prefix_logs

    def __call__(self) -> dict[str, Any]:
        return {**member_task(self.config, self.run_id, self.k, force=self.force, prefix_logs=self.prefix_logs),
                "requeues": 0}


def member_tasks(cfg: RunConfig, force: bool = False, prefix_logs: bool = False,
                 task: type = MemberTask) -> list:
    """The member tasks of a run with ``members_parallel`` (none when its method, with these options,
    has no independent members: it then trains as one job), as ``task`` objects (a pool's work items, or
    the sweep's Slurm ``MemberJob``)."""
    if not getattr(cfg, "members_parallel", False):
        return []
    n = member_task_count(make_method(cfg))
    return [task(cfg.to_dict(), cfg.run_id(), k, force, prefix_logs) for k in range(n)]


def pool_init(threads: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


def pool_run(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``job`` in a pool worker; the summary carries ``seconds`` (the run's own wall time). A failing
    run (recorded as failed by the runner) comes back as {"error": ...} so that its time is known too."""
    t0 = time.perf_counter()
    try:
        summary = job()
    except Exception as e:
        return {"run_id": job.run_id, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}
    return {**summary, "seconds": time.perf_counter() - t0}


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
    jobs = member_tasks(cfg, force=force, prefix_logs=True)
    if not jobs:
        log(f"{cfg.run_id()}: {cfg.method} has no independent members with these options: trained as one job")
        return []
    n = min(len(jobs), workers or len(jobs))
    log(f"{cfg.run_id()}: {len(jobs)} member tasks in {n} parallel processes")
    done = []
    with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                initializer=pool_init, initargs=(max(1, (os.cpu_count() or 1) // n),)) as pool:
        for summary in pool.map(pool_run, jobs):
            if summary.get("error"):
                log(f"{summary['run_id']}: member task failed ({summary['error']}); the run trains it itself")
            done.append(summary)
    return done
