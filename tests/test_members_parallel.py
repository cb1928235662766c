"""Members as jobs (``run --members-parallel``, a sweep's ``members_parallel``): each independent member
trained by a task of its own, then one task that assembles, evaluates and writes the record. The record's
metrics are bitwise those of the sequential run; its training cost is the sum over members, with the
critical path's wall time beside it; members trained by an earlier run of another size are reused."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from ensemble_bench import members, records, runner, sweep
from ensemble_bench.resolve import make_run_config

TINY = dict(method="deep_ensemble", backbone="cnn_small", dataset="digits", epochs=1, lr=0.05, device="cpu",
            latency_runs=2, progress=False, seed=0)


@pytest.fixture
def one_thread():
    """Every process of the test trains with one thread (the member processes get one each): CPU kernels
    with another thread count may round differently, and the check here is bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(out: Path, members: int, **kw):
    return make_run_config(dict(TINY, out=str(out), options={"num_members": members}, **kw))


def test_contract_no_method_names_and_declared_members():
    import ensemble_bench.methods as methods

    de = runner.make_method(_cfg(Path("x"), 3))
    assert members.member_task_count(de) == 3
    batched = runner.make_method(make_run_config(dict(TINY, options={"num_members": 3, "batched": True})))
    assert members.member_task_count(batched) == 0          # one grouped network: one job
    packed = runner.make_method(make_run_config(dict(TINY, method="packed")))
    assert members.member_task_count(packed) == 0           # not declared independent
    assert methods.get("single").independent_members


def test_members_parallel_record_equals_sequential_bitwise_and_reuses_across_sizes(tmp_path, one_thread):
    seq = runner.execute(_cfg(tmp_path / "seq", 3))
    par_cfg = _cfg(tmp_path / "par", 3, members_parallel=True)
    assert par_cfg.run_id() == seq["run_id"]                # not part of the run id
    par = runner.execute(par_cfg)                           # 3 member processes, then the assembly here
    assert par["status"] == "complete"
    assert par["metrics"] == seq["metrics"]                 # bitwise: float equality of every metric
    tasks = par["training"]["member_tasks"]
    assert sorted(tasks) == ["member0", "member1", "member2"]
    assert all(t["trained"] and t["reused_from"] is None for t in tasks.values())
    assert {t["task"] for t in tasks.values()} == {0, 1, 2}
    tr = par["training"]
    assert tr["train_s"] == pytest.approx(sum(s["train_s"] for s in tr["stages"].values()))
    assert tr["train_s"] == pytest.approx(sum(t["train_s"] for t in tasks.values()))
    assert par["timings"]["critical_path_s"] >= max(t["wall_s"] for t in tasks.values())
    assert tr["samples_seen"] == seq["training"]["samples_seen"]
    assert not (tmp_path / "par" / ".ckpt").exists()        # checkpoints (and task notes) gone once complete



def test_member_tasks_reuse_members_of_another_size_and_the_record_says_which(tmp_path, one_thread):
    """DE-2's member tasks train members 0 and 1; DE-3's member tasks in the same folder reuse them from the
    stage store and train member 2 only; DE-3's record says so, and equals the sequential DE-3 bitwise."""
    out = tmp_path / "runs"
    de2, de3 = _cfg(out, 2), _cfg(out, 3)
    assert all(members.execute_member(de2, k)["stages"][f"member{k}"]["reused_from"] is None for k in range(2))
    infos = [members.execute_member(de3, k) for k in range(3)]
    assert [i["stages"][f"member{k}"]["reused_from"] for k, i in enumerate(infos)] == \
        [f"{de2.run_id()}/member0", f"{de2.run_id()}/member1", None]
    rec = runner.execute(de3)
    tasks = rec["training"]["member_tasks"]
    assert [tasks[f"member{k}"]["trained"] for k in range(3)] == [False, False, True]
    assert rec["training"]["reused_stages"] == {f"member{k}": f"{de2.run_id()}/member{k}" for k in range(2)}
    assert rec["metrics"] == runner.execute(_cfg(tmp_path / "seq", 3))["metrics"]


def test_a_missing_member_is_trained_by_the_assembly(tmp_path, one_thread):
    """A member task that failed or never ran: the assembling run trains that member itself (afterany)."""
    cfg = _cfg(tmp_path / "a", 2)
    members.execute_member(cfg, 1)
    rec = runner.execute(cfg)
    assert set(rec["training"]["member_tasks"]) == {"member1"}
    assert rec["metrics"] == runner.execute(_cfg(tmp_path / "b", 2))["metrics"]
    with pytest.raises(Exception, match="no member task 2"):
        members.execute_member(_cfg(tmp_path / "c", 2), 2)


def test_sweep_local_executor_runs_member_tasks_then_the_run(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "runs"
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(textwrap.dedent(f"""
        [grid]
        method = ["deep_ensemble"]
        [options.deep_ensemble]
        num_members = [2]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        lr = 0.05
        device = "cpu"
        latency_runs = 2
        progress = false
        members_parallel = true
        out = "{out}"
        """))
    spec = sweep.load_spec(spec_path)
    runs = sweep.expand(spec)
    assert len(runs) == 1 and runs[0].members_parallel
    assert len(sweep.member_jobs(runs[0])) == 2
    outcomes = sweep.run_local(runs, workers=2)
    assert [o.status for o in outcomes] == ["complete"]
    rec = records.read_record(out / f"{runs[0].run_id()}.json")
    assert sorted(rec["training"]["member_tasks"]) == ["member0", "member1"]
    ref = runner.execute(_cfg(tmp_path / "ref", 2))
    assert rec["metrics"] == ref["metrics"]


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (no sbatch on PATH)")
def test_slurm_members_as_an_array_and_a_dependent_assembly(tmp_path, one_thread):
    """DE-4 on the local Slurm cluster: an array of 4 member tasks and one dependent job (5 tasks in
    all); the record equals the sequential run's bitwise."""
    import os
    import time

    from tests.test_slurm import _default_conf, _responds

    conf = os.environ.get("SLURM_CONF") or str(_default_conf())
    if not _responds(conf):
        pytest.skip("no Slurm cluster answers (slurm/localcluster.sh up)")
    os.environ["SLURM_CONF"] = conf
    out = tmp_path / "runs"
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(textwrap.dedent(f"""
        name = "members"
        [grid]
        method = ["deep_ensemble"]
        [options.deep_ensemble]
        num_members = [4]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        lr = 0.05
        device = "cpu"
        latency_runs = 2
        progress = false
        members_parallel = true
        out = "{out}"
        [slurm]
        timeout_min = 5
        cpus_per_task = 1
        mem_gb = 1
        setup = ["export OMP_NUM_THREADS=1"]
        """))
    spec = sweep.load_spec(spec_path)
    runs = sweep.expand(spec)
    submitted = sweep.submit_slurm(spec, runs)
    entry = sweep.read_manifest(spec.out, runs[0].run_id())
    assert len(entry["member_jobs"]) == 4 and entry["job_id"] not in entry["member_jobs"]
    path = out / f"{runs[0].run_id()}.json"
    deadline = time.time() + 240
    while time.time() < deadline and records.record_status(out, runs[0].run_id()) != "complete":
        time.sleep(2)
    assert records.record_status(out, runs[0].run_id()) == "complete", submitted
    rec = records.read_record(path)
    assert sorted(rec["training"]["member_tasks"]) == ["member0", "member1", "member2", "member3"]
    ref = runner.execute(_cfg(tmp_path / "ref", 4))
    assert rec["metrics"] == ref["metrics"]
