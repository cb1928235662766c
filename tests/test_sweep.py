"""Sweep specs, grid expansion, run ids, run states and the local executor (no Slurm needed here;
tests/test_slurm.py runs sweeps on a real local Slurm cluster)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ensemble_bench import records, sweep
from ensemble_bench.cli import main
from ensemble_bench.recipe import UNUSED_UNLESS
from ensemble_bench.config import DERIVED_FIELDS, RUN_FIELDS, NON_IDENTITY_FIELDS
from ensemble_bench.resolve import make_run_config
from ensemble_bench.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

# the tiny sweep of the issue: 2 methods x 2 seeds, tiny backbone, 1 epoch, data that ships offline
TINY = """
name = "tiny"
[grid]
method = ["single", "deep_ensemble"]
seed = [0, 1]
[options.deep_ensemble]
num_members = [2]
[run]
backbone = "cnn_small"
dataset = "digits"
epochs = 1
lr = 0.05
device = "cpu"
latency_runs = 3
progress = false
out = "{out}"
[slurm]
timeout_min = 5
cpus_per_task = 1
mem_gb = 1
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml", **fmt) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).format(**fmt) if fmt else textwrap.dedent(text))
    return p


def ids(runs) -> list[str]:
    return [r.run_id() for r in runs]


# ------------------------------------------------------------------------------------- grid and ids
def test_grid_is_a_product_and_method_options_cross_their_method_only(tmp_path):
    spec = sweep.load_spec(write(tmp_path, """
        [grid]
        method = ["single", "deep_ensemble"]
        seed = [0, 1, 2]
        epochs = [1, 2]
        [options.deep_ensemble]
        num_members = [2, 3]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        """))
    runs = sweep.expand(spec)
    single = [r for r in runs if r.method == "single"]
    de = [r for r in runs if r.method == "deep_ensemble"]
    assert len(single) == 3 * 2 and len(de) == 3 * 2 * 2
    assert all(r.options == {} for r in single)
    assert sorted({r.options["num_members"] for r in de}) == [2, 3]
    assert {(r.seed, r.epochs, r.options["num_members"]) for r in de} == {
        (s, e, m) for s in (0, 1, 2) for e in (1, 2) for m in (2, 3)}
    assert len(set(ids(runs))) == len(runs)
    # fixed [run] settings reach every run; out is absolute so jobs can start anywhere
    assert all(r.backbone == "cnn_small" and r.dataset == "digits" for r in runs)
    assert all(Path(r.out).is_absolute() for r in runs)


def test_run_ids_identical_for_reordered_keys_and_tables(tmp_path):
    a = sweep.load_spec(write(tmp_path, """
        [grid]
        method = ["deep_ensemble"]
        seed = [0, 1]
        lr = [0.05, 0.1]
        [options.deep_ensemble]
        num_members = [2, 3]
        batched = [false]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        """, "a.toml"))
    b = sweep.load_spec(write(tmp_path, """
        [run]
        epochs = 1
        dataset = "digits"
        backbone = "cnn_small"
        [options.deep_ensemble]
        batched = [false]
        num_members = [2, 3]
        [grid]
        lr = [0.05, 0.1]
        seed = [0, 1]
        method = ["deep_ensemble"]
        """, "b.toml"))
    assert sorted(ids(sweep.expand(a))) == sorted(ids(sweep.expand(b)))
    assert len(sweep.expand(a)) == 8


def test_run_ids_do_not_depend_on_where_records_go_or_typed_out_defaults(tmp_path):
    base = """
        [grid]
        method = ["deep_ensemble"]
        seed = [0]
        {opts}
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        out = "{out}"
        device = "{device}"
        """
    a = sweep.load_spec(write(tmp_path, base, "a.toml", opts="", out="x", device="cpu"))
    b = sweep.load_spec(write(tmp_path, base, "b.toml", out="/elsewhere/y", device="auto",
                              opts="[options.deep_ensemble]\nnum_members = [4]"))
    assert ids(sweep.expand(a)) == ids(sweep.expand(b))


PINNED_SPEC = """
[grid]
method = ["single", "deep_ensemble"]
seed = [0, 1]
[options.deep_ensemble]
num_members = [2]
[run]
backbone = "cnn_small"
dataset = "digits"
epochs = 1
lr = 0.05
"""
# computed once; a change here means every run id of every stored record changed: do it on purpose
PINNED_IDS = ["single-265332e1e0f5be96", "single-2eca7517a303f64b",
              "deep_ensemble-917f2058d7595c79", "deep_ensemble-be73d40afa0d2ebc"]


def test_run_ids_pinned(tmp_path):
    assert ids(sweep.expand(sweep.load_spec(write(tmp_path, PINNED_SPEC)))) == PINNED_IDS


def test_run_ids_stable_across_processes(tmp_path):
    spec = write(tmp_path, PINNED_SPEC)
    code = ("import json, sys; from ensemble_bench import sweep; "
            "print(json.dumps([r.run_id() for r in sweep.expand(sweep.load_spec(sys.argv[1]))]))")
    outs = []
    for seed in ("0", "12345"):   # a different str hash seed in each process
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout))
    assert outs[0] == outs[1] == PINNED_IDS


def _other_value(name, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, (list, tuple)):
        return [v * 0.5 for v in value]
    return {"method": "deep_ensemble", "backbone": "resnet20", "dataset": "svhn", "schedule": "multistep"}[name]


def test_any_changed_setting_or_option_changes_the_run_id(tmp_path):
    base = {"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 1, "seed": 0}
    ref = make_run_config(dict(base))
    # every setting of the experiment; the data's identity has its own test (test_config), the recipe mode
    # changes the id only where it changes the effective recipe (below)
    identity = [k for k in RUN_FIELDS if k not in NON_IDENTITY_FIELDS and k not in DERIVED_FIELDS
                and k not in ("options", "recipe", "dataset")]
    seen = {ref.run_id()}
    assert make_run_config(dict(base, recipe="paper")).run_id() == ref.run_id()   # single: the same recipe
    nfe = make_run_config(dict(base, method="nfe"))
    assert make_run_config(dict(base, method="nfe", recipe="paper")).run_id() != nfe.run_id()
    for k in identity:
        # milestones and lr_decay are read by the multistep schedule only (under cosine they are aliases of
        # the defaults: tests/test_recipe.py), so they are changed on a multistep run
        unused = k in UNUSED_UNLESS and UNUSED_UNLESS[k] != ref.schedule
        cfg = make_run_config(dict(base, **({"schedule": UNUSED_UNLESS[k]} if unused else {}),
                                   **{k: _other_value(k, getattr(ref, k))}))
        assert cfg.run_id() not in seen, k
        seen.add(cfg.run_id())
    # every option of deep_ensemble, through a sweep spec
    de = make_run_config(dict(base, method="deep_ensemble"))
    for opt, value in de.options.items():
        spec = sweep.load_spec(write(tmp_path, f"""
            [grid]
            method = ["deep_ensemble"]
            [options.deep_ensemble]
            {opt} = [{json.dumps(value)}, {json.dumps(_other_value(opt, value))}]
            [run]
            backbone = "cnn_small"
            dataset = "digits"
            epochs = 1
            """, f"{opt}.toml"))
        a, b = sweep.expand(spec)
        assert a.run_id() == de.run_id() and b.run_id() != a.run_id(), opt


def test_duplicate_points_are_one_run(tmp_path):
    spec = sweep.load_spec(write(tmp_path, """
        [grid]
        method = ["deep_ensemble"]
        seed = [0, 0]
        [options.deep_ensemble]
        num_members = [4, 4]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        """))
    assert len(sweep.expand(spec)) == 1


# ------------------------------------------------------------------------------------- validation
GOOD_RUN = '[run]\nbackbone = "cnn_small"\ndataset = "digits"\n'


@pytest.mark.parametrize("text, message", [
    ('[grid]\nmethod = "single"\n' + GOOD_RUN, "[grid] method must be a list"),
    ('[grid]\nmethod = ["single"]\nseed = []\n' + GOOD_RUN, "[grid] seed is an empty list"),
    ('[grid]\nmethod = ["single"]\nsed = [0]\n' + GOOD_RUN, "unknown [grid] key 'sed'"),
    ('[grid]\nmethod = ["single"]\nout = ["a", "b"]\n' + GOOD_RUN, "[grid] out does not change what a run computes"),
    ('[grid]\nmethod = ["single"]\n' + GOOD_RUN + 'lr = 0.1\nepochs = 1\nbogus = 1\n', "unknown [run] key 'bogus'"),
    ('[grid]\nmethod = ["single"]\nlr = [0.1]\n' + GOOD_RUN + 'lr = 0.2\n', "lr is set in both [grid] and [run]"),
    ('[grid]\nseed = [0]\n' + GOOD_RUN, "say which method to run"),
    ('[grid]\nmethod = ["single"]\n[options.deep_ensemble]\nnum_members = [2]\n' + GOOD_RUN,
     "[options.deep_ensemble] is for method 'deep_ensemble', which this sweep does not run"),
    ('[grid]\nmethod = ["deep_ensemble"]\n[options.deep_ensemble]\nnum_members = 2\n' + GOOD_RUN,
     "[options.deep_ensemble] num_members must be a list"),
    ('[grid]\nmethod = ["single"]\n[slurm]\npartion = "gpu"\n' + GOOD_RUN, "unknown [slurm] key 'partion'"),
    ('[grid]\nmethod = ["single"]\n[slurm]\ntimeout_min = "4h"\n' + GOOD_RUN, "[slurm] timeout_min must be an integer"),
    ('[grid]\nmethod = ["single"]\n[slurm]\nmem_gb = -1\n' + GOOD_RUN, "[slurm] mem_gb must be a finite number > 0"),
    ('[grid]\nmethod = ["single"]\n[slurm]\nmem_gb = inf\n' + GOOD_RUN, "[slurm] mem_gb must be a finite number > 0"),
    ('[grid]\nmethod = ["single"]\n[slurm]\nadditional_parameters = {x = [1]}\n' + GOOD_RUN,
     "additional_parameters.x must be a string"),
    ('[grids]\nmethod = ["single"]\n' + GOOD_RUN, "unknown key 'grids' at the top level"),
    ('[grid]\nmethod = ["single"]\noptions = [1]\n' + GOOD_RUN, "method options go in [options.<method>]"),
    # names and values are checked for every run by make_run_config
    ('[grid]\nmethod = ["single", "no_such_method"]\n' + GOOD_RUN, "unknown method 'no_such_method'"),
    ('[grid]\nmethod = ["deep_ensemble"]\n[options.deep_ensemble]\nnum_membres = [2]\n' + GOOD_RUN,
     "unknown option 'num_membres' for method 'deep_ensemble'"),
    ('[grid]\nmethod = ["single"]\nepochs = [1, 0]\n' + GOOD_RUN, "epochs must be >= 1"),
    ('[grid]\nmethod = ["single"]\nlr = ["fast"]\n' + GOOD_RUN, "bad value for lr"),
    ('[grid]\nmethod = ["single"]\n' + GOOD_RUN.replace("cnn_small", "cnn_huge"), "cnn_huge"),
    ('[grid\nmethod = ["single"]\n', "cannot parse"),
    # a method that refuses the backbone: the whole sweep, before anything is submitted
    ('[grid]\nmethod = ["single", "packed"]\n' + GOOD_RUN.replace("cnn_small", "timm:resnet18"),
     "run (method=packed): packed needs a staged backbone"),
])
def test_bad_specs_are_one_line_usage_errors(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        sweep.expand(sweep.load_spec(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    # the CLI: exit 2, one line on stderr, nothing written
    for argv in (["sweep", str(path), "--dry-run"], ["sweep-status", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_missing_spec_and_bad_workers(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    spec = write(tmp_path, TINY, out=tmp_path / "runs")
    assert main(["sweep", str(spec), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert main(["sweep", str(spec), "--workers", "2", "--executor", "slurm"]) == 2
    assert "--workers is for the local executor" in capsys.readouterr().err


def test_slurm_settings_map_to_submitit(tmp_path):
    spec = sweep.load_spec(write(tmp_path, """
        name = "paper"
        [grid]
        method = ["single"]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        [slurm]
        partition = "gpu"
        timeout_min = 240
        gpus_per_node = 1
        cpus_per_task = 8
        mem_gb = 1.5
        array_parallelism = 64
        max_num_timeout = 7
        setup = ["module load cuda"]
        additional_parameters = {hint = "nomultithread"}
        """))
    params, exec_args = sweep.slurm_parameters(spec)
    assert params == {"job_name": "paper", "partition": "gpu", "time": 240, "gpus_per_node": 1, "cpus_per_task": 8,
                      "mem": "1536MB", "array_parallelism": 64, "setup": ["module load cuda"],
                      "additional_parameters": {"hint": "nomultithread"}}
    assert exec_args == {"max_num_timeout": 7}
    # submitit itself accepts them (the sbatch script it would write)
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="true", folder=tmp_path, map_count=3, **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=1536MB",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --array=0-2%3", "#SBATCH --hint=nomultithread",
                 "#SBATCH --job-name=paper", "module load cuda"):
        assert line in text


def test_dry_run_writes_nothing_and_lists_the_runs(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY, out=out)
    assert main(["sweep", str(spec), "--dry-run", "--executor", "slurm"]) == 0
    text = capsys.readouterr().out
    for rid in ids(sweep.expand(sweep.load_spec(spec))):
        assert f"run   {rid}  (not submitted)" in text
    assert "one job array of 4 tasks" in text and "time=5" in text and "mem=1GB" in text
    assert "dry run: nothing submitted" in text
    assert not out.exists()


# ------------------------------------------------------------------------------------ run states
def _record(out: Path, rid: str, status: str, error: str | None = None) -> None:
    done = {"config": {}, "metrics": {"acc": 0.5, "nll": 1.0}} if status == "complete" else {}
    records.write_record(out, {"schema_version": records.SCHEMA_VERSION, "run_id": rid, "status": status,
                               "error": error, **done})


def _single_seeds(tmp_path: Path, out: Path, n: int):
    """A sweep of the single model over seeds 0..n-1 writing to ``out``: (spec, its runs)."""
    spec = sweep.load_spec(write(tmp_path, """
        [grid]
        method = ["single"]
        seed = {seeds}
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        out = "{out}"
        """, out=out, seeds=list(range(n))))
    return spec, sweep.expand(spec)


def test_states_from_records_and_the_slurm_queue(tmp_path):
    out = tmp_path / "runs"
    spec, runs = _single_seeds(tmp_path, out, 8)
    r = ids(runs)
    folder = out / ".submitit"
    script = str(folder / ".submission_file_x.sh")
    _record(out, r[0], "complete")
    _record(out, r[1], "failed", "TrainingDiverged: loss is nan")
    _record(out, r[2], "running")                # its job is running
    _record(out, r[3], "running")                # its job is gone: interrupted
    _record(out, r[4], "failed", "OOM")          # failed earlier, submitted again, queued
    # r[5]: queued, never started; r[6]: never submitted; r[7]: job id reused by someone else's job
    for i, job in ((0, "9_0"), (1, "9_1"), (2, "9_2"), (3, "9_3"), (4, "10_0"), (5, "10_1"), (7, "9_7")):
        sweep.write_manifest(out, r[i], {"run_id": r[i], "job_id": job, "executor": "slurm"})
    queue = {"9_2": ("RUNNING", script), "10_0": ("PENDING", script), "10_1": ("PENDING", script),
             "9_7": ("RUNNING", "/home/someone/else.sh")}
    states, note = sweep.run_states(spec, runs, queue=queue)
    got = [(s.state, s.detail) for s in states]
    assert got == [("done", ""), ("failed", ""), ("running", "running"), ("pending", "interrupted"),
                   ("pending", "queued"), ("pending", "queued"), ("pending", "not submitted"),
                   ("pending", "job ended without a record")]
    assert states[1].error == "TrainingDiverged: loss is nan" and note is None
    # what a sweep started now would submit: failed, interrupted, never submitted, lost; not the live ones
    assert [s.run_id for s in sweep._to_submit(states)] == [r[1], r[3], r[6], r[7]]
    text = sweep.format_status(spec, states)
    assert "done 1   running 1   pending 5   failed 1" in text
    assert "TrainingDiverged: loss is nan" in text and "1 interrupted" in text and "2 queued" in text
    # without the queue (squeue unavailable): records only
    states, _ = sweep.run_states(spec, runs, queue=None)
    assert [s.state for s in states][:4] == ["done", "failed", "running", "running"]


def test_a_run_locked_by_another_process_is_left_alone(tmp_path):
    cfg = sweep.expand(sweep.load_spec(write(tmp_path, TINY, out=tmp_path / "runs")))[0]
    with sweep.run_lock(Path(cfg.out), cfg.run_id()) as mine:
        assert mine
        summary = sweep.RunJob(cfg.to_dict(), cfg.run_id())()
    assert summary["status"] == "busy"
    assert records.record_status(cfg.out, cfg.run_id()) is None


def test_a_job_refuses_a_config_whose_id_changed(tmp_path):
    cfg = sweep.expand(sweep.load_spec(write(tmp_path, TINY, out=tmp_path / "runs")))[0]
    with pytest.raises(RuntimeError, match="gives the config the id"):
        sweep.RunJob(cfg.to_dict(), "single-0000000000000000")()


def test_checkpoint_requeues_the_same_run_and_counts():
    job = sweep.RunJob({"method": "single"}, "single-x")
    delayed = job.checkpoint()
    assert delayed.function is job and job.requeues == 1
    assert delayed.function.checkpoint().function.requeues == 2


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (hidden ones too) with its modification time: what a command wrote."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _plant_foreign_record(out: Path, runs, how: str) -> tuple[str, str]:
    """Put, under the file name of the sweep's first run (single, seed 0), a record that is not its own:
    ``copy``: the complete record of seed 1 copied there; ``stub``: a hand-made stub of run "x". Returns
    (the planned run id, the run id the file holds)."""
    single = [cfg for cfg in runs if cfg.method == "single"]
    r0, r1 = single[0].run_id(), single[1].run_id()
    assert single[0].seed == 0 and single[1].seed == 1
    out.mkdir(parents=True, exist_ok=True)
    if how == "copy":
        records.write_record(out, {"schema_version": records.SCHEMA_VERSION, "run_id": r1, "status": "complete",
                                   "config": single[1].to_dict(), "metrics": {"acc": 0.9, "nll": 0.3},
                                   "error": None})
        (out / f"{r0}.json").write_bytes((out / f"{r1}.json").read_bytes())
        return r0, r1
    (out / f"{r0}.json").write_text(json.dumps({"schema_version": 1, "run_id": "x", "status": "complete"}))
    return r0, "x"


@pytest.mark.parametrize("how", ["copy", "stub"])
def test_a_file_holding_another_runs_record_is_refused_not_skipped(tmp_path, capsys, monkeypatch, how):
    """A run's file holding another run's record (seed 1's copied under seed 0's name, or a stub of run "x")
    is not that run's result: `run` refuses it, and so does the sweep (local and Slurm, dry run or not):
    one line naming the file, exit 2, nothing trained, submitted or written. sweep-status shows a problem,
    never "done"."""
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY, out=out)
    runs = sweep.expand(sweep.load_spec(spec))
    planned, held = _plant_foreign_record(out, runs, how)
    before = _files(tmp_path)

    def never(*a, **k):
        raise AssertionError("the sweep started work")

    monkeypatch.setattr(sweep, "run_local", never)
    monkeypatch.setattr(sweep, "submit_slurm", never)
    monkeypatch.setattr(sweep, "slurm_available", lambda: True)   # the Slurm path gets as far as the records
    monkeypatch.setattr(sweep, "slurm_queue", dict)
    for extra in ([], ["--workers", "2"], ["--dry-run"], ["--executor", "slurm"], ["--executor", "slurm", "--dry-run"]):
        assert main(["sweep", str(spec), *extra]) == 2, extra
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{out / planned}.json holds the record of run {held}, not {planned}" in err
        assert "move it away" in err and "Traceback" not in err
        assert cap.out == ""                       # no "N complete (skipped)" line: nothing was decided
    assert _files(tmp_path) == before
    # the run of that name is what `run` refuses too
    with pytest.raises(UsageError, match="holds the record of run"):
        records.record_status(out, planned)

    states, _ = sweep.run_states(sweep.load_spec(spec), runs, queue=None)
    by_id = {s.run_id: s for s in states}
    assert by_id[planned].state == "problem" and "move it away" in by_id[planned].error
    assert planned not in [s.run_id for s in sweep._to_submit(states)]
    assert main(["sweep-status", str(spec)]) == 0
    text = capsys.readouterr().out
    done = 1 if how == "copy" else 0               # seed 1's own record is complete
    assert f"done {done}   running 0   pending {3 - done}   failed 0   problem 1" in text
    assert f"{out / planned}.json holds the record of run {held}" in text
    assert _files(tmp_path) == before


def test_several_foreign_records_are_one_line_naming_the_first(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY, out=out)
    runs = sweep.expand(sweep.load_spec(spec))
    out.mkdir()
    for cfg in runs[:2]:
        (out / f"{cfg.run_id()}.json").write_text(json.dumps({"schema_version": 1, "run_id": "x", "status": "complete"}))
    before = _files(tmp_path)
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"(and 1 more: ensemble-bench sweep-status {spec})" in err
    assert _files(tmp_path) == before


# --------------------------------------------------------------------------------- local executor
def test_local_sweep_records_skip_and_status(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY, out=out)
    expected = ids(sweep.expand(sweep.load_spec(spec)))
    assert main(["sweep", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "4 to run on local" in text and "4 complete, 0 failed" in text
    recs, problems = records.load_records(out)
    assert not problems and sorted(r["run_id"] for r in recs) == sorted(expected)
    assert all(r["status"] == "complete" and r["config"]["epochs"] == 1 for r in recs)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    # again: nothing to do, nothing rewritten
    assert main(["sweep", str(spec)]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes
    for argv in (["sweep-status", str(spec)], ["sweep", str(spec), "--status"]):
        assert main(argv) == 0
        assert "done 4   running 0   pending 0   failed 0" in capsys.readouterr().out


def test_local_failing_run_is_recorded_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write(tmp_path, """
        [grid]
        method = ["single"]
        lr = [1e5, 0.05]
        [run]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        latency_runs = 3
        device = "cpu"
        out = "{out}"
        """, out=out)
    bad, good = ids(sweep.expand(sweep.load_spec(spec)))
    assert main(["sweep", str(spec)]) == 1
    text = capsys.readouterr().out
    assert f"failed   {bad}  TrainingDiverged" in text and f"complete {good}" in text
    assert records.record_status(out, good) == "complete"
    rec = records.read_record(out / f"{bad}.json")
    assert rec["status"] == "failed" and rec["error"].startswith("TrainingDiverged: training diverged")
    assert main(["sweep-status", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "done 1   running 0   pending 0   failed 1" in text
    assert bad in text and "TrainingDiverged: training diverged" in text
    # a second sweep would run the failed one only
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 complete (skipped)" in text and f"run   {bad}  (failed)" in text and good not in text


def test_local_process_pool_gives_the_same_records(tmp_path, capsys):
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY.replace('"single", "deep_ensemble"', '"single"').replace("num_members = [2]", "")
                 .replace("[options.deep_ensemble]", ""), out=out)
    assert main(["sweep", str(spec), "--workers", "2"]) == 0
    assert "2 complete, 0 failed" in capsys.readouterr().out
    recs, _ = records.load_records(out)
    assert sorted(r["run_id"] for r in recs) == sorted(ids(sweep.expand(sweep.load_spec(spec))))


def test_time_left_comes_from_earlier_records_of_the_same_configuration(tmp_path, capsys):
    """A sweep's estimate of a run is the time the records of its configuration (another seed or budget)
    spent on the stages they trained themselves, less what its checkpoints already hold."""
    import statistics

    import torch

    from ensemble_bench.sweep import estimate

    out = tmp_path / "runs"
    seed0 = write(tmp_path, TINY.replace("seed = [0, 1]", "seed = [0]").replace("epochs = 1", "epochs = 2"),
                  "seed0.toml", out=out)
    assert main(["sweep", str(seed0)]) == 0
    capsys.readouterr()
    recs = {r["method"]["name"]: r for r in records.load_records(out)[0]}
    de = recs["deep_ensemble"]
    assert list(de["training"]["reused_stages"]) == ["member0"]      # the single model of seed 0
    epochs, stages, eval_s = estimate.record_profile(de)
    assert epochs == 2 and list(stages) == ["member1"] and eval_s == de["timings"]["eval_s"]
    curve = de["training"]["stages"]["member1"]["curve"]
    assert stages["member1"] == (statistics.median(e["epoch_s"] + e["val_s"] for e in curve), 2)

    # seed 1 at twice the budget: each stage's epochs scale; a method nothing has tried has no estimate
    seed1 = write(tmp_path, TINY.replace("seed = [0, 1]", "seed = [1]").replace("epochs = 1", "epochs = 4")
                  .replace('"single", "deep_ensemble"', '"single", "deep_ensemble", "mimo"'), "seed1.toml", out=out)
    runs = sweep.expand(sweep.load_spec(seed1))
    est = estimate.estimate_runs(runs)
    by_method = {r.method: est[r.run_id()] for r in runs}
    sec, _ = stages["member1"]
    assert by_method["deep_ensemble"] == pytest.approx(eval_s + sec * 4)
    s_epochs, s_stages, s_eval = estimate.record_profile(recs["single"])
    assert by_method["single"] == pytest.approx(s_eval + s_stages["member0"][0] * 4)
    assert by_method["mimo"] is None
    # an interrupted run: the epochs its checkpoint holds are done
    de1 = next(r for r in runs if r.method == "deep_ensemble")
    (out / ".ckpt" / de1.run_id()).mkdir(parents=True)
    torch.save({"result": {"history": [{}, {}, {}]}, "done": False}, out / ".ckpt" / de1.run_id() / "member1.pt")
    assert estimate.estimate_runs([de1])[de1.run_id()] == pytest.approx(eval_s + sec * 1)
    # another device kind or other method options are another configuration
    assert estimate.estimate_runs([de1.replace(device="cuda")]) == {de1.replace(device="cuda").run_id(): None}
    other = de1.replace(options={"num_members": 3})
    assert estimate.estimate_runs([other])[other.run_id()] is None

    assert main(["sweep", str(seed1), "--dry-run", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "estimated time: ~" in text and "on 2 workers (2 of 3 runs from earlier records" in text
    assert f"run   {de1.run_id()}" in text and text.count("epochs=4  ~") == 2     # the two known runs


# --------------------------------------------------------------------------------- example specs
def test_example_specs_cover_the_paper_grid(monkeypatch):
    import dataclasses

    import ensemble_bench.methods as methods
    from ensemble_bench import data

    # the paper specs read CIFAR from data/ (fetched before submitting): identify it without the files
    monkeypatch.setattr(data, "identity", lambda name, *a, **k: {"name": name, "sha256": "not-loaded"})

    want = {"single", "deep_ensemble", "packed", "mimo", "dst_ensemble", "edst_ensemble", "nfe", "bridge"}
    specs = sorted((REPO / "slurm").glob("*.toml"))
    assert specs, "no example specs in slurm/"
    covered: set[tuple[str, str, str]] = set()
    for path in specs:
        spec = sweep.load_spec(path)     # structure and [slurm] settings
        # every name and option is known to the code (for the methods registered in this checkout)
        known = [m for m in spec.methods if m in methods.names()]
        runs = sweep.expand(dataclasses.replace(
            spec, grid={**spec.grid, "method": known} if "method" in spec.grid else spec.grid,
            options={m: o for m, o in spec.options.items() if m in known}))
        assert runs
        if spec.name.startswith("paper"):
            assert set(spec.methods) == want
            assert sorted(spec.grid["seed"]) == [0, 1, 2]
            assert spec.slurm.get("gpus_per_node") == 1 and spec.slurm.get("timeout_min")
            assert {r.method for r in runs} == set(known)
            covered |= {(m, b, d) for m in spec.methods for b in spec.grid["backbone"] for d in spec.grid["dataset"]}
    assert covered == {(m, b, d) for m in want for b in ("resnet18", "wrn28_10") for d in ("cifar10", "cifar100")}


def _write_records(out: str, worker: int, n: int) -> None:
    for i in range(n):
        rid = "shared-run" if i % 2 else f"run-{worker}-{i}"
        records.write_record(out, {"schema_version": records.SCHEMA_VERSION, "run_id": rid, "status": "complete",
                                   "error": None, "writer": worker, "payload": "x" * (1000 + 37 * i),
                                   "config": {}, "metrics": {"acc": 0.5, "nll": 1.0}})


def test_records_written_by_concurrent_jobs_are_always_whole(tmp_path):
    """Many jobs write into one results folder at once (one shares a run id with all the others): a
    reader at any moment sees only whole records, and the leaderboard loader reports no problem."""
    import multiprocessing

    out = tmp_path / "runs"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_records, args=(str(out), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        recs, problems = records.load_records(out, statuses=None)
        assert problems == []
        assert all(len(r["payload"]) >= 1000 for r in recs)
        reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    recs, problems = records.load_records(out)
    assert problems == [] and len(recs) == 4 * 30 + 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_complete_stub_of_the_runs_own_id_is_not_done(tmp_path):
    """"complete" without a config or metrics is no result (the leaderboard drops it): the sweep runs it
    again instead of counting it done, as it does for an unreadable file of that name."""
    out = tmp_path / "runs"
    spec, runs = _single_seeds(tmp_path, out, 2)
    r = ids(runs)
    out.mkdir(parents=True)
    (out / f"{r[0]}.json").write_text(json.dumps({"schema_version": 1, "run_id": r[0], "status": "complete"}))
    _record(out, r[1], "complete")
    states, _ = sweep.run_states(spec, runs, queue={})
    assert [s.state for s in states] == ["pending", "done"]


@pytest.mark.parametrize("where", ["local", "gpu-nodes"])
def test_a_record_of_another_precision_is_a_problem_not_done(tmp_path, capsys, monkeypatch, where):
    """bf16 acts on CUDA only and the run id is fixed before the device is known: a complete record of the id
    trained in another precision than the run would train in where the sweep sends it (bf16 from a GPU, run
    here on a CPU; fp32 from a CPU, sent to Slurm nodes with GPUs) is not the run's result. `run` refuses to
    skip it; the sweep refuses too (one line, exit 2, nothing run, submitted or written), never "complete"."""
    out = tmp_path / "runs"
    text = TINY if where == "local" else TINY.replace('device = "cpu"', 'device = "auto"') + "gpus_per_node = 1\n"
    spec = write(tmp_path, text, out=out)
    runs = sweep.expand(sweep.load_spec(spec))
    cfg = runs[0]
    theirs = "bf16" if where == "local" else "fp32"
    records.write_record(out, {"schema_version": records.SCHEMA_VERSION, "run_id": cfg.run_id(), "status": "complete",
                               "config": cfg.to_dict(), "metrics": {"acc": 0.9, "nll": 0.3}, "error": None,
                               "training": {"precision": theirs}})
    before = _files(tmp_path)

    def never(*a, **k):
        raise AssertionError("the sweep started work")

    monkeypatch.setattr(sweep, "run_local", never)
    monkeypatch.setattr(sweep, "submit_slurm", never)
    monkeypatch.setattr(sweep, "slurm_available", lambda: True)
    monkeypatch.setattr(sweep, "slurm_queue", dict)
    argv = [["--dry-run"], []] if where == "local" else [["--executor", "slurm", "--dry-run"], ["--executor", "slurm"]]
    mine, device = ("fp32", "cpu") if where == "local" else ("bf16", "cuda")
    for extra in argv:
        assert main(["sweep", str(spec), *extra]) == 2, extra
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and cap.out == "", err
        assert f"trained in {theirs}; on {device} this run would train in {mine}" in err and "[run]" in err
    assert _files(tmp_path) == before
    if where == "local":   # the same record on a CPU sweep of a CPU record's precision: complete, skipped
        records.write_record(out, {**records.read_record(records.record_path(out, cfg.run_id())),
                                   "training": {"precision": "fp32"}})
        assert main(["sweep", str(spec), "--dry-run"]) == 0
        assert "1 complete (skipped)" in capsys.readouterr().out


def test_a_path_in_the_way_of_a_run_is_refused_before_the_sweep_starts(tmp_path, capsys, monkeypatch):
    """A folder where a run writes its record (``<run_id>.json``): `run` refuses it before any work, and so
    does a sweep (dry run too), one line, exit 2, instead of listing it "to run" and failing it later."""
    out = tmp_path / "runs"
    spec = write(tmp_path, TINY, out=out)
    rid = sweep.expand(sweep.load_spec(spec))[0].run_id()
    (out / f"{rid}.json").mkdir(parents=True)
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("the sweep started work"))
    for extra in (["--dry-run"], []):
        assert main(["sweep", str(spec), *extra]) == 2
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert len(err.splitlines()) == 1 and f"{out / rid}.json is in the way" in err and cap.out == "", err


def test_an_error_while_requeuing_leaves_the_run_interrupted_not_failed(tmp_path, monkeypatch):
    """submitit's handler runs inside the training step: the job's checkpoint(), then `scontrol requeue`, which a
    SIGTERM of the same preemption can kill before it returns (CI, 2026-12-06: "CalledProcessError: Command
    '['scontrol', 'requeue', '13']' died with <Signals.SIGTERM: 15>" became the run's failed record). That is the
    interruption, not the run's failure: the record stays running and the next attempt completes it. The same
    error without an interruption is a failure, as before."""
    from ensemble_bench import metrics

    cfg = sweep.expand(sweep.load_spec(write(tmp_path, TINY, out=tmp_path / "runs")))[0]
    job = sweep.RunJob(cfg.to_dict(), cfg.run_id())
    evaluate = metrics.evaluate
    scontrol = subprocess.CalledProcessError(-15, ["scontrol", "requeue", "13"])

    def preempted(*a, **k):
        job.checkpoint()          # what submitit calls first
        raise scontrol            # then the requeue, killed

    monkeypatch.setattr(metrics, "evaluate", preempted)
    with pytest.raises(subprocess.CalledProcessError):
        job()
    assert records.record_status(cfg.out, cfg.run_id()) == "running" and job.requeues == 1

    def broken(*a, **k):
        raise scontrol

    monkeypatch.setattr(metrics, "evaluate", broken)   # a later attempt: the mark of the last one is gone
    with pytest.raises(subprocess.CalledProcessError):
        job()
    assert records.record_status(cfg.out, cfg.run_id()) == "failed"
    monkeypatch.setattr(metrics, "evaluate", evaluate)
    assert job()["status"] == "complete"
