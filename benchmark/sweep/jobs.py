"""What a sweep runs: :class:`RunJob` (one run) and :class:`MemberJob` (one member task of a
``members_parallel`` run), picklable ``submitit.helpers.Checkpointable`` jobs for Slurm and the local pool;
and the manifest that remembers which Slurm job runs which run (``<out>/.submitit/runs/<run_id>.json``).
Who holds a run's lock is :mod:`ensemble_bench.runlock`."""
from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import submitit

from ensemble_bench.config import RunConfig
from ensemble_bench.resolve import make_run_config
from ensemble_bench.members import MemberTask, limit_threads, member_tasks
from ensemble_bench.runlock import run_lock  # the one lock per run id (plain runs take it too)

SUBMITIT_DIR = ".submitit"


# ---------------------------------------------------------------------------------- the job
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        from ensemble_bench import distributed
        from ensemble_bench.runner import execute

        limit_threads()
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
        from ensemble_bench.runner import note_interrupted

        note_interrupted()   # what the requeue raises, if anything, is not the run's failure (runner.execute)
        self.requeues += 1
        print(f"{self.run_id}: interrupted; requeue {self.requeues} resumes after the last finished epoch",
              file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class MemberJob(MemberTask, submitit.helpers.Checkpointable):
    """Member task ``k`` of a run (``members_parallel``) as a Slurm job: trains that member alone
    (``ensemble_bench.members.execute_member``); the run's own job, started after all its member tasks,
    assembles the ensemble, evaluates it and writes the record. Requeued like a RunJob; the member resumes
    from its per-epoch checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.requeues = 0

    def __call__(self) -> dict[str, Any]:
        return {**super().__call__(), "requeues": self.requeues}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def member_jobs(cfg: RunConfig, force: bool = False, prefix_logs: bool = False) -> list[MemberJob]:
    """The member tasks of a run with ``members_parallel`` as Slurm jobs (see ``members.member_tasks``)."""
    return member_tasks(cfg, force, prefix_logs, task=MemberJob)


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
