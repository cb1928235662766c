"""Slurm: the sbatch parameters of a spec's [slurm] table, the queue (squeue), the state of every run
of a sweep (records, queue, locks) and the submission of the runs as one job array."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import submitit

from ensemble_bench.config import RunConfig
from ensemble_bench.errors import UsageError
from ensemble_bench.runlock import lock_owner, on_this_host
from ensemble_bench.sweep.jobs import SUBMITIT_DIR, RunJob, _now, member_jobs, read_manifest, write_manifest
from ensemble_bench.sweep.spec import SLURM_DEFAULTS, SLURM_KEYS, SweepSpec, expand

# squeue states of a job that has not ended yet
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}
_QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED"}


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
    state: str                 # done | running | pending | failed | problem
    detail: str = ""           # queued | not submitted | interrupted | ... (for pending/running)
    error: str | None = None   # the failed record's error; for a problem, why its file is refused (one line)
    job_id: str | None = None  # the Slurm job (array task) that runs or ran it
    holder: str | None = None  # "pid P on host H": the live process that holds the run's lock
    record: dict | None = field(default=None, repr=False, compare=False)   # done: as read (precision check)



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
    squeue answers) the Slurm queue. Returns (states, a note when the queue could not be read). A run whose
    file holds another run's record (``records.record_status``, the check ``run`` makes) is a "problem",
    never "done"."""
    from ensemble_bench import records
    from ensemble_bench.runner import check_run_paths

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
        job_id = entry["job_id"] if entry else None
        try:   # the checks `run` makes: a file of this run's name holding another run's record is refused, and
            # so is a path the run would write that is of the wrong kind (a folder named <run_id>.json)
            status, rec = records.read_status(out, rid)
            if status != "complete":
                check_run_paths(out, rid)
        except UsageError as e:
            states.append(RunState(cfg, rid, "problem", error=str(e), job_id=job_id))
            continue
        job = _job_active(entry, queue, folder)
        held, holder = (None, None) if status == "complete" or job is not None else lock_owner(out, rid)
        if status == "complete":
            states.append(RunState(cfg, rid, "done", job_id=job_id, record=rec))
        elif job is not None:   # alive in the queue: its state says more than a record of an earlier attempt
            queued = job[0] in _QUEUED_STATES
            states.append(RunState(cfg, rid, "pending" if queued else "running",
                                   "queued" if queued else job[0].lower(), job_id=job_id))
        elif held:              # a live process holds the run's lock: it is at it (whatever the record says yet)
            states.append(RunState(cfg, rid, "running", holder or "running", job_id=job_id, holder=holder))
        elif status == "failed":
            states.append(RunState(cfg, rid, "failed", error=(rec or {}).get("error") or "(no error recorded)",
                                   job_id=job_id))
        elif status == "running":
            if entry is not None and queue is not None:
                # sent to Slurm, its job is gone, the record says running: killed or cancelled mid-run
                states.append(RunState(cfg, rid, "pending", "interrupted", job_id=job_id))
            elif held is False and (entry is None or on_this_host(holder)):
                # nobody holds its lock: the process that wrote "running" was killed; resumable
                states.append(RunState(cfg, rid, "pending", "interrupted", job_id=job_id))
            else:               # cannot tell (a Slurm run without squeue, a lock that cannot be probed)
                states.append(RunState(cfg, rid, "running", job_id=job_id))
        elif entry is not None and queue is not None:
            states.append(RunState(cfg, rid, "pending", "job ended without a record", job_id=job_id))
        else:
            states.append(RunState(cfg, rid, "pending", "not submitted", job_id=job_id))
    return states, note



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

