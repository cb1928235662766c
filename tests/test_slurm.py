"""Sweeps on a real Slurm cluster: the single-node one of slurm/localcluster.sh.

The tests use a cluster that answers (SLURM_CONF, or the one `slurm/localcluster.sh up` left in its
default folder) or start one for this module and stop it afterwards (root only). They are skipped only
when Slurm is not installed (no sbatch): `bash slurm/ci-setup.sh` installs and starts it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ensemble_bench import records, sweep
from ensemble_bench.cli import main

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "localcluster.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="Slurm is not installed (no sbatch on PATH): bash slurm/ci-setup.sh installs and "
                              "starts a local cluster"),
]


def _default_conf() -> Path:
    base = os.environ.get("ENSEMBLE_BENCH_SLURM_DIR") or os.path.join(os.environ.get("TMPDIR") or "/tmp",
                                                                       "ensemble-bench-slurm")
    return Path(base) / "slurm.conf"


def _responds(conf: str | None) -> bool:
    env = dict(os.environ)
    if conf:
        env["SLURM_CONF"] = conf
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "is UP" in p.stdout


@pytest.fixture(scope="module")
def cluster():
    """SLURM_CONF of a cluster that answers; started here (and stopped after) when none does."""
    saved = os.environ.get("SLURM_CONF")
    started = False
    if saved and _responds(saved):
        conf = saved
    elif _default_conf().is_file() and _responds(str(_default_conf())):
        conf = str(_default_conf())
    else:
        if os.geteuid() != 0:
            pytest.fail("no Slurm cluster answers and the local one needs root: run slurm/localcluster.sh up as root")
        t0 = time.perf_counter()
        p = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, f"slurm/localcluster.sh up failed:\n{p.stdout}\n{p.stderr}"
        print(f"local Slurm cluster started in {time.perf_counter() - t0:.1f} s")
        started, conf = True, str(_default_conf())
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if started:
            subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=180)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


def write_spec(tmp_path: Path, name: str, grid: str, run: str, slurm: str, out: Path) -> Path:
    slurm = textwrap.dedent(slurm).strip()
    defaults = "".join(f"\n{k} = {v}" for k, v in (("cpus_per_task", 1), ("mem_gb", 1)) if k not in slurm)
    p = tmp_path / f"{name}.toml"
    p.write_text(textwrap.dedent(f"""
        name = "{name}"
        [grid]
        {textwrap.dedent(grid).strip()}
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        device = "cpu"
        latency_runs = 3
        out = "{out}"
        {textwrap.dedent(run).strip()}
        [slurm]
        """) + slurm + defaults + "\n")
    return p


def job_ids(out: Path, runs) -> dict[str, str]:
    return {r.run_id(): sweep.read_manifest(out, r.run_id())["job_id"] for r in runs}


def job_log(out: Path, job_id: str) -> str:
    folder = out / ".submitit" / job_id
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job_id}_0_log.*")))


def preempt(job, out: Path) -> None:
    """A preemption as Slurm makes it: SIGTERM, then (once the job has seen it) the USR signal submitit
    requeues on. submitit's own job._interrupt() sends both at once, and their delivery is not ordered: a
    SIGTERM arriving after the USR signal killed the job's `scontrol requeue` (CI on 2026-12-06), a race of the
    test's making (a real preemption sends SIGTERM first, the kill a grace time later)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    subprocess.check_call(["scancel", job.job_id, "--signal", "SIGTERM"])
    deadline = time.monotonic() + 30
    while "Bypassing signal SIGTERM" not in job_log(out, job.job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.check_call(["scancel", job.job_id, "--signal", SlurmJobEnvironment.USR_SIG])


def release_requeued(out: Path) -> None:
    """Slurm holds a requeued job back for about two minutes (Reason=BeginTime); the tests let it start
    at once (`scontrol update StartTime=now`, what an admin would do) so that they take seconds."""
    p = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "PENDING", "-o", "%i|%r|%o"], capture_output=True,
                       text=True, timeout=60)
    for line in p.stdout.splitlines():
        job, reason, cmd = (line.split("|", 2) + ["", ""])[:3]
        if reason == "BeginTime" and cmd.startswith(str(out / ".submitit") + os.sep):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=60)


def wait_until_settled(*spec_paths: Path, timeout: float) -> list[list[sweep.RunState]]:
    """Poll until every run of the sweeps is done or failed and their jobs have left the queue (requeued
    jobs are released at once); fail with the states and logs after ``timeout``. Returns each sweep's
    states."""
    specs = [sweep.load_spec(p) for p in spec_paths]
    runs = [sweep.expand(spec) for spec in specs]
    deadline = time.monotonic() + timeout
    while True:
        settled, all_states = True, []
        for spec, rs in zip(specs, runs):
            states, note = sweep.run_states(spec, rs)
            assert note is None, note
            all_states.append(states)
            settled &= all(s.state in ("done", "failed") for s in states) and not our_jobs_in_queue(spec.out)
        if settled:
            return all_states
        if time.monotonic() > deadline:
            report = []
            for spec, states in zip(specs, all_states):
                report.append(sweep.format_status(spec, states))
                report += [f"--- {s.job_id}\n{job_log(spec.out, s.job_id)[-3000:]}" for s in states if s.job_id]
            squeue = subprocess.run(["squeue", "-r"], capture_output=True, text=True).stdout
            pytest.fail(f"not settled after {timeout:.0f} s; squeue:\n{squeue}\n" + "\n".join(report))
        for spec in specs:
            release_requeued(spec.out)
        time.sleep(0.5)


def our_jobs_in_queue(out: Path) -> list[str]:
    queue = sweep.slurm_queue()
    return [j for j, (_, cmd) in queue.items() if cmd.startswith(str(out / ".submitit") + os.sep)]


# --------------------------------------------------------------------------------------------- tests
def test_tiny_sweep_is_one_job_array_and_resubmits_nothing(cluster, tmp_path, capsys):
    out = tmp_path / "slurm-runs"
    spec = write_spec(tmp_path, "tiny", grid="""
        method = ["single", "deep_ensemble"]
        seed = [0, 1]
        [options.deep_ensemble]
        num_members = [2]
        """, run="epochs = 1\nlr = 0.05", slurm="timeout_min = 5", out=out)
    runs = sweep.expand(sweep.load_spec(spec))
    t0 = time.perf_counter()
    assert main(["sweep", str(spec), "--executor", "slurm"]) == 0
    submit_s = time.perf_counter() - t0
    text = capsys.readouterr().out
    array = re.search(r"submitted 4 runs to Slurm as job array (\d+)", text)
    assert array, text
    jobs = job_ids(out, runs)
    assert sorted(jobs.values()) == [f"{array.group(1)}_{i}" for i in range(4)]   # ONE array, 4 tasks

    # while the array is queued or running: the same sweep submits nothing
    assert main(["sweep", str(spec), "--executor", "slurm"]) == 0
    text = capsys.readouterr().out
    assert "nothing to submit" in text and "submitted" not in text
    assert job_ids(out, runs) == jobs

    # meanwhile, the same sweep on the local executor, into another folder
    local_out = tmp_path / "local-runs"
    local_spec = tmp_path / "tiny-local.toml"
    local_spec.write_text(spec.read_text().replace(str(out), str(local_out)))
    assert main(["sweep", str(local_spec)]) == 0
    capsys.readouterr()

    (states,) = wait_until_settled(spec, timeout=240)
    with capsys.disabled():
        print(f"\n4-task array: submitted in {submit_s:.1f} s, all records after {time.perf_counter() - t0:.1f} s")
    assert [s.state for s in states] == ["done"] * 4
    recs, problems = records.load_records(out)
    assert not problems
    assert sorted(r["run_id"] for r in recs) == sorted(r.run_id() for r in runs)
    assert all(r["status"] == "complete" and r["metrics"]["acc"] > 0.1 for r in recs)
    local, _ = records.load_records(local_out)
    assert sorted(r["run_id"] for r in local) == sorted(r["run_id"] for r in recs)

    assert main(["sweep-status", str(spec)]) == 0
    assert "done 4   running 0   pending 0   failed 0" in capsys.readouterr().out
    # finished: a second sweep of the same spec still submits nothing
    assert main(["sweep", str(spec), "--executor", "slurm"]) == 0
    text = capsys.readouterr().out
    assert "4 complete (skipped)" in text and "nothing to submit" in text
    assert job_ids(out, runs) == jobs and our_jobs_in_queue(out) == []


def test_a_failing_job_is_recorded_with_its_error_and_the_others_finish(cluster, tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write_spec(tmp_path, "diverge", grid="""
        method = ["single"]
        lr = [1e5, 0.05]
        """, run="epochs = 1", slurm="timeout_min = 5", out=out)
    bad, good = sweep.expand(sweep.load_spec(spec))
    assert main(["sweep", str(spec), "--executor", "slurm"]) == 0
    capsys.readouterr()
    (states,) = wait_until_settled(spec, timeout=180)
    assert [s.state for s in states] == ["failed", "done"]
    assert states[0].error.startswith("TrainingDiverged: training diverged")
    assert records.record_status(out, good.run_id()) == "complete"
    # Slurm and submitit saw the job fail, with the run's error
    import submitit

    job = submitit.SlurmJob(folder=out / ".submitit" / "%j", job_id=sweep.read_manifest(out, bad.run_id())["job_id"])
    deadline = time.monotonic() + 60
    while not job.paths.result_pickle.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "TrainingDiverged" in str(job.exception())

    assert main(["sweep-status", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "done 1   running 0   pending 0   failed 1" in text
    assert bad.run_id() in text and "TrainingDiverged: training diverged" in text
    # a new sweep of the spec would submit the failed run only
    assert main(["sweep", str(spec), "--executor", "slurm", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"run   {bad.run_id()}  (failed)" in text and "one job array of 1 tasks" in text
    assert good.run_id() not in text


def epoch_seconds(out: Path) -> float:
    """Seconds per epoch of the requeue tests' run (single, cnn_small, digits, batch 16) here and now:
    the median of the epochs after the first of a short run, on one thread as the jobs run
    (cpus_per_task = 1). Measured on this process's own thread count instead, the estimate was 1.4 s an
    epoch with another process busy on the second core (two threads fighting for one), where the jobs ran
    0.3-0.6 s an epoch: the time-limit job then finished inside its first attempt and the test failed."""
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.runner import execute

    cfg = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 4,
                           "batch_size": 16, "lr": 0.02, "device": "cpu", "out": str(out), "latency_runs": 1,
                           "save_predictions": False, "progress": False})
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        execute(cfg, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    times = sorted(float(m.group(1)) for m in (re.search(r"epoch [234]/4 .* ([0-9.]+)s$", ln) for ln in lines) if m)
    assert len(times) == 3, lines
    return max(times[1], 0.01)


def _resume_points(log: str, epochs: int) -> list[tuple[int, int]]:
    """[(last epoch logged before a resumption, epoch the resumed attempt starts after)] from a job's
    stderr, which collects every attempt (submitit appends)."""
    points, last = [], 0
    for line in log.splitlines():
        m = re.search(rf"\] epoch (\d+)/{epochs} loss", line)
        if m:
            last = int(m.group(1))
        m = re.search(rf"resuming after epoch (\d+)/{epochs}", line)
        if m:
            points.append((last, int(m.group(1))))
    return points


def _check_resumed(out: Path, run, epochs: int, case: str) -> dict:
    import submitit

    jid = sweep.read_manifest(out, run.run_id())["job_id"]
    err = (out / ".submitit" / jid / f"{jid}_0_log.err").read_text(errors="replace")
    log = job_log(out, jid)
    assert f"this job is {case}" in log, log[-4000:]
    # submitit logs "Requeued job" once `scontrol requeue` returns; on a loaded machine Slurm can stop the job
    # (and the scontrol inside it) before it returns, so the requeue is proven by the next attempt instead
    assert "Requeued job" in log or re.search(r"attempt [2-9]\d* \(requeued", log), log[-4000:]
    requeues = err.count("interrupted; requeue ")
    points = _resume_points(err, epochs)
    assert requeues >= 1 and points and points[0][1] >= 1, (requeues, points, err[-4000:])
    for logged, resumed in points:
        # an epoch is logged, then checkpointed: an attempt resumes after the last epoch it logged, or the
        # one before when the signal fell between the two; nothing more is lost
        assert resumed in (logged, logged - 1), (points, err[-4000:])
    rec = records.read_record(out / f"{run.run_id()}.json")
    assert rec["status"] == "complete"
    assert rec["training"]["epochs_run"] == {"member0": epochs}
    summary = submitit.SlurmJob(folder=out / ".submitit" / "%j", job_id=jid).result()
    assert summary["status"] == "complete" and summary["requeues"] == requeues
    return {"job": jid, "requeues": requeues, "resumed_after": [p[1] for p in points]}


def test_time_limit_and_preemption_requeue_and_resume_from_checkpoint(cluster, tmp_path, capsys):
    """Two jobs at once: one outlives its real 1-minute time limit (Slurm sends USR2 before the end), one is
    preempted (SIGTERM, then USR2: preempt()). Both requeue themselves through submitit and
    finish from their per-epoch checkpoints."""
    import submitit

    # With a 1-minute limit and signal_delay_s = 25, Slurm (which checks limits every 30 s) signals the job
    # 5-35 s after it starts and kills it at 60-90 s: ~55 s of training (at this machine's current speed)
    # outlasts the first attempt even if the job runs 1.5x faster than measured, and is done after 2-4
    per_epoch = epoch_seconds(tmp_path / "calibrate")
    timeout_epochs = max(30, min(800, round(55 / per_epoch)))
    preempt_epochs = max(10, min(200, round(12 / per_epoch)))
    t_out = tmp_path / "timeout"
    t_spec = write_spec(tmp_path, "timelimit", grid="method = [\"single\"]",
                        run=f"epochs = {timeout_epochs}\nbatch_size = 16\nlr = 0.02",
                        slurm="timeout_min = 1\nsignal_delay_s = 25\nmax_num_timeout = 12", out=t_out)
    p_out = tmp_path / "preempt"
    p_spec = write_spec(tmp_path, "preempt", grid="method = [\"single\"]",
                        run=f"epochs = {preempt_epochs}\nbatch_size = 16\nlr = 0.02",
                        slurm="timeout_min = 20", out=p_out)
    t0 = time.perf_counter()
    assert main(["sweep", str(t_spec), "--executor", "slurm"]) == 0
    assert main(["sweep", str(p_spec), "--executor", "slurm"]) == 0
    capsys.readouterr()
    (t_run,) = sweep.expand(sweep.load_spec(t_spec))
    (p_run,) = sweep.expand(sweep.load_spec(p_spec))

    # preempt once the run has a checkpoint of a finished epoch or two
    ckpt = p_out / ".ckpt" / p_run.run_id() / "member0.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), job_log(p_out, sweep.read_manifest(p_out, p_run.run_id())["job_id"])
    time.sleep(1.0)
    p_job = submitit.SlurmJob(folder=p_out / ".submitit" / "%j",
                              job_id=sweep.read_manifest(p_out, p_run.run_id())["job_id"])
    preempt(p_job, p_out)
    t_preempt = time.perf_counter()

    p_states, t_states = wait_until_settled(p_spec, t_spec, timeout=300)
    t_done = time.perf_counter() - t0
    assert [s.state for s in p_states] == ["done"], sweep.format_status(sweep.load_spec(p_spec), p_states)
    assert [s.state for s in t_states] == ["done"], sweep.format_status(sweep.load_spec(t_spec), t_states)
    p_info = _check_resumed(p_out, p_run, preempt_epochs, "preempted")
    t_info = _check_resumed(t_out, t_run, timeout_epochs, "timed-out")
    assert p_info["requeues"] == 1
    with capsys.disabled():
        print(f"\n{per_epoch:.2f} s/epoch; preempted at {t_preempt - t0:.1f} s: {p_info}; time limit ({timeout_epochs} "
              f"epochs): {t_info}; both done after {t_done:.1f} s")


def test_a_job_array_sbatch_refuses_is_one_line_and_leaves_no_state(cluster, tmp_path, capsys):
    # EnforcePartLimits=ALL: asking for more CPUs than the cluster has is refused at submission
    out = tmp_path / "runs"
    spec = write_spec(tmp_path, "toobig", grid='method = ["single"]', run="epochs = 1",
                      slurm="cpus_per_task = 4096", out=out)
    assert main(["sweep", str(spec), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ensemble-bench: error: sbatch refused the job array:") and len(err.splitlines()) == 1
    assert "More processors requested than permitted" in err
    assert not (out / ".submitit" / "runs").exists() and our_jobs_in_queue(out) == []
