"""Tests for the record files (ensemble_bench.records, .predictions, .environment) and the leaderboard: atomic writes, loading, predictions, leaderboard aggregation."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble_bench import columns, environment, formatting, leaderboard, predictions, record_types, records


def make_record(run_id="r0", *, method="deep_ensemble", options=None, seed=0, acc=0.9, nll=0.3, ece=0.02,
                brier=0.15, dataset="cifar10", backbone="resnet18", latency_device="NVIDIA H100",
                train_device="NVIDIA H100", latency_ms=3.0, train_s=100.0, ood=None, status="complete",
                params=1_000_000, flops=2e9, with_ts=True):
    options = {"num_members": 4} if options is None else options
    metrics = {"acc": acc, "nll": nll, "brier": brier, "ece": ece, "member_acc": acc - 0.02,
               "disagreement": 0.1}
    if with_ts:
        metrics.update(nll_ts=nll - 0.01, ece_ts=ece / 2, temperature=1.2)
    metrics["ood"] = ood if ood is not None else {
        "svhn": {"msp": {"auroc": 0.9 + seed / 100, "aupr_in": 0.8, "aupr_out": 0.85, "fpr95": 0.3},
                 "entropy": {"auroc": 0.91, "aupr_in": 0.8, "aupr_out": 0.85, "fpr95": 0.3},
                 "mi": {"auroc": 0.7, "aupr_in": 0.6, "aupr_out": 0.65, "fpr95": 0.5}}}
    return {
        "schema_version": records.SCHEMA_VERSION, "run_id": run_id, "status": status,
        "config": {"method": method, "backbone": backbone, "dataset": dataset, "epochs": 10, "seed": seed,
                   "batch_size": 128, "lr": 0.1, "options": dict(options)},
        "method": {"name": method, "options": dict(options), "combine": "probs",
                   "num_members": options.get("num_members", 1), "info": {}},
        "metrics": metrics,
        "cost": {"params": params, "params_nonzero": params, "flops": flops, "macs": flops / 2,
                 "latency_ms": latency_ms, "latency_device": latency_device, "throughput": 1000.0,
                 "throughput_device": latency_device, "peak_mem_mb": 500.0, "device": latency_device},
        "training": {"train_s": train_s, "epochs_run": {"main": 10}, "samples_seen": 500000,
                     "train_flops": 3e15, "device": train_device},
        "env": {}, "timings": {"started": "2024-01-01T00:00:00", "finished": "2024-01-01T01:00:00", "wall_s": 3600.0},
        "error": None,
    }


# ---------------------------------------------------------------------------- writes and reads


def test_write_read_round_trip(tmp_path):
    rec = make_record("abc123")
    rec["metrics"]["np_value"] = np.float32(0.5)   # numpy scalars become plain numbers
    rec["metrics"]["nan_value"] = float("nan")     # non-finite -> null (strict JSON)
    p = records.write_record(tmp_path / "runs", rec)
    assert p == tmp_path / "runs" / "abc123.json"
    back = records.read_record(p)
    assert back["run_id"] == "abc123" and back["config"] == rec["config"]
    assert back["metrics"]["np_value"] == 0.5 and back["metrics"]["nan_value"] is None
    json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert records.record_status(tmp_path / "runs", "abc123") == "complete"
    assert records.record_status(tmp_path / "runs", "nope") is None


def test_write_record_validates(tmp_path):
    rec = make_record()
    for key in ("run_id", "status", "schema_version"):
        bad = dict(rec)
        del bad[key]
        with pytest.raises(records.RecordError, match=key):
            records.write_record(tmp_path, bad)
    with pytest.raises(records.RecordError):
        records.write_record(tmp_path, {**rec, "status": "done"})
    with pytest.raises(records.RecordError):
        records.write_record(tmp_path, {**rec, "run_id": "../escape"})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_no_temp_and_failed_serialisation_keeps_old(tmp_path):
    p = tmp_path / "x.json"
    records.write_json_atomic(p, {"a": 1})
    records.write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.json"]
    before = p.read_bytes()
    with pytest.raises(TypeError):
        records.write_json_atomic(p, {"a": 3, "bad": object()})
    assert p.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.json"]


def test_failed_write_midway_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "y.json"
    records.write_json_atomic(p, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        records.write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["y.json"]


def _writer(args):
    out_dir, proc, n = args
    for i in range(n):
        # a large payload so that a non-atomic write would be visible half-done
        payload = {"proc": proc, "i": i, "blob": [proc * 1000 + i] * 20000}
        for run_id in (f"own-{proc}-{i % 5}", "shared", f"shared-{i % 3}"):
            rec = {"schema_version": 1, "run_id": run_id, "status": "complete", "payload": payload,
                   "config": {}, "metrics": {"acc": 0.5, "nll": 1.0}}
            records.write_record(out_dir, rec)
    return proc


def test_concurrent_writers_never_leave_unreadable_files(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        res = pool.map_async(_writer, [(str(out), p, 20) for p in range(4)])
        reads = 0
        while not res.ready():   # read while they write: every visible record must parse
            for f in out.glob("*.json"):
                try:
                    rec = records.read_record(f)
                except records.RecordError as e:
                    if "cannot read" in str(e):  # replaced between glob and open: fine
                        continue
                    raise
                assert len(rec["payload"]["blob"]) == 20000
                reads += 1
            time.sleep(0.001)
        assert sorted(res.get(timeout=60)) == [0, 1, 2, 3]
    names = sorted(f.name for f in out.iterdir())
    assert not [n for n in names if not n.endswith(".json")], names   # no leftover temp files
    assert len(names) == 4 * 5 + 1 + 3
    recs, problems = records.load_records(out)
    assert problems == [] and len(recs) == 24
    shared = records.read_record(out / "shared.json")
    blob = shared["payload"]["blob"]
    assert len(set(blob)) == 1  # one writer's complete content, not a mix


# ---------------------------------------------------------------------------- load_records


def test_load_records_skips_and_reports_bad_files(tmp_path):
    records.write_record(tmp_path, make_record("good1"))
    records.write_record(tmp_path, make_record("good2"))
    records.write_record(tmp_path, make_record("fail1", status="failed"))
    full = (tmp_path / "good1.json").read_text()
    (tmp_path / "truncated.json").write_text(full[: len(full) // 2])
    (tmp_path / "notrecord.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / ".good3.json.abc.tmp").write_text("{partial")  # a writer's temp file
    predictions.save_predictions(tmp_path, "good1", logits=np.zeros((2, 3, 4)), labels=np.zeros(3, dtype=int))

    recs, problems = records.load_records(tmp_path)
    assert sorted(r["run_id"] for r in recs) == ["good1", "good2"]
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "truncated.json" in joined and "invalid JSON" in joined
    assert "notrecord.json" in joined and "missing" in joined
    assert "list.json" in joined
    assert all("\n" not in p for p in problems)

    everything, _ = records.load_records(tmp_path, statuses=None)
    assert sorted(r["run_id"] for r in everything) == ["fail1", "good1", "good2"]
    failed, _ = records.load_records(tmp_path, statuses=("failed",))
    assert [r["run_id"] for r in failed] == ["fail1"]

    with pytest.raises(records.RecordError):
        records.read_record(tmp_path / "truncated.json")
    assert records.record_status(tmp_path, "truncated") is None
    assert records.record_status(tmp_path, "fail1") == "failed"


def test_load_records_missing_dir(tmp_path):
    with pytest.raises(records.RecordError, match="does not exist"):
        records.load_records(tmp_path / "absent")
    assert issubclass(records.RecordError, ValueError)


def test_read_record_rejects_newer_schema(tmp_path):
    p = tmp_path / "new.json"
    p.write_text(json.dumps({**make_record("new"), "schema_version": records.SCHEMA_VERSION + 1}))
    with pytest.raises(records.RecordError, match="newer"):
        records.read_record(p)


# ---------------------------------------------------------------------------- leaderboard


def _std(xs):
    return float(np.std(xs, ddof=1))


def test_flatten_record_columns():
    row = columns.flatten_record(make_record("r", seed=2))
    assert row["dataset"] == "cifar10" and row["backbone"] == "resnet18" and row["method"] == "deep_ensemble"
    assert row["config_key"] == '{"num_members":4}'
    assert row["auroc_svhn"] == pytest.approx(0.92)          # msp score
    assert row["aupr_in_svhn"] == 0.8 and row["aupr_out_svhn"] == 0.85 and row["fpr95_svhn"] == 0.3
    assert row["auroc_svhn_entropy"] == 0.91 and row["auroc_svhn_mi"] == 0.7
    assert row["latency_device"] == "NVIDIA H100" and row["train_device"] == "NVIDIA H100"
    assert row["train_s"] == 100.0 and row["train_flops"] == 3e15 and row["params"] == 1e6
    # absent metrics -> NaN, not errors
    row = columns.flatten_record(make_record("r", with_ts=False))
    assert math.isnan(row["nll_ts"]) and math.isnan(row["ece_ts"])
    bare = columns.flatten_record({"schema_version": 1, "run_id": "x", "status": "complete"})
    assert math.isnan(bare["acc"]) and bare["method"] is None


def test_leaderboard_means_stds_and_rows():
    recs = []
    de_acc, pk_acc = [0.90, 0.92, 0.91], [0.93, 0.94, 0.96]
    for s in range(3):
        recs.append(make_record(f"de{s}", method="deep_ensemble", seed=s, acc=de_acc[s], nll=0.3 + s / 10))
        recs.append(make_record(f"pk{s}", method="packed", options={"alpha": 2, "num_estimators": 4, "gamma": 1},
                                seed=s, acc=pk_acc[s], latency_ms=1.0 + s))
    recs.append(make_record("pk_alt", method="packed", options={"alpha": 3, "num_estimators": 4, "gamma": 1},
                            seed=0, acc=0.5, with_ts=False))
    df = leaderboard.leaderboard(recs)
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 3   # one row per (method, options)
    assert list(df["method"]) == ["packed", "deep_ensemble", "packed"]  # acc_mean descending
    assert list(df["n_seeds"]) == [3, 3, 1]
    assert df.loc[0, "seeds"] == "[0, 1, 2]"

    de = df[df["method"] == "deep_ensemble"].iloc[0]
    assert de["acc_mean"] == pytest.approx(np.mean(de_acc))
    assert de["acc_std"] == pytest.approx(_std(de_acc))
    assert de["nll_std"] == pytest.approx(_std([0.3, 0.4, 0.5]))
    pk = df.iloc[0]
    assert pk["acc_mean"] == pytest.approx(np.mean(pk_acc)) and pk["acc_std"] == pytest.approx(_std(pk_acc))
    assert pk["latency_ms_mean"] == pytest.approx(2.0) and pk["latency_ms_std"] == pytest.approx(1.0)
    # OOD columns flattened with the msp score, other scores suffixed
    assert pk["auroc_svhn_mean"] == pytest.approx(np.mean([0.90, 0.91, 0.92]))
    assert pk["fpr95_svhn_mean"] == pytest.approx(0.3)
    assert pk["auroc_svhn_entropy_mean"] == pytest.approx(0.91)
    alt = df.iloc[2]
    assert alt["config_key"] == '{"alpha":3,"gamma":1,"num_estimators":4}'
    assert math.isnan(alt["acc_std"])             # one seed: std is NaN (ddof=1)
    assert math.isnan(alt["nll_ts_mean"])          # absent metric -> NaN

    md = formatting.format_markdown(df)
    assert "±" in md and "alpha=3" in md and "NVIDIA H100" in md and "AUROC svhn" in md


def test_seeds_pool_across_machines_but_timings_never_average_across_devices():
    """A row is one experiment, whatever machines its seeds ran on (the reference sweep's sessions land on
    Intel and AMD CPUs): one row of 5 seeds, its timings those of its main device, marked §."""
    recs = [make_record(f"a{s}", seed=s, acc=0.90, latency_ms=2.0, train_s=100.0) for s in range(2)]
    recs += [make_record(f"b{s}", seed=s + 2, acc=0.80, latency_ms=20.0, latency_device="cpu: AMD EPYC",
                         train_s=900.0, train_device="cpu: AMD EPYC") for s in range(2)]
    recs += [make_record("c0", seed=9, acc=0.85, train_device="NVIDIA A100", latency_ms=4.0, train_s=50.0)]
    df = leaderboard.leaderboard(recs)
    assert len(df) == 1
    r = df.iloc[0]
    assert r["n_seeds"] == 5 and r["acc_mean"] == pytest.approx(0.85)          # every seed's accuracy
    assert r["latency_device"] == "NVIDIA H100" and r["latency_ms_mean"] == pytest.approx(8 / 3)   # a0, a1, c0
    # training: H100 and AMD have 2 seeds each, A100 1: the tie goes to the first by name
    assert r["train_device"] == "NVIDIA H100" and r["train_s_mean"] == pytest.approx(100.0)
    assert r["train_devices"] == 3
    md = formatting.format_markdown(df)
    assert "| 5 § |" in md and "§ seeds trained on different machines" in md
    assert "latency ms (NVIDIA H100)" in md and "cpu: AMD EPYC" not in md
    # a busy latency on another device does not mark the row's latency
    recs[2]["cost"].update(latency_ms_p10=1.0, latency_ms_p90=60.0)
    assert not leaderboard.leaderboard(recs).iloc[0]["latency_busy"]
    # one machine: no mark, no footnote
    one = formatting.format_markdown(leaderboard.leaderboard(recs[:2]))
    assert "§" not in one and "precision" not in one
    # bf16 autocast (bf16 on a CUDA device) is another experiment than fp32 (bf16 on a CPU does nothing):
    # the same config (the same run id) trained on a GPU and on CPUs is two rows
    bf = make_record("g0", seed=0, train_device="NVIDIA H100")
    cpu = [make_record(f"k{s}", seed=s, train_device="cpu: AMD EPYC (1 threads)") for s in (1, 2)]
    for r in (bf, *cpu):
        r["config"]["bf16"] = True
    # records from before training.precision: derived from bf16 and the device, as the Trainer decides it
    T = record_types.Training
    assert [columns.train_precision(r["config"], T(device=r["training"]["device"])) for r in (bf, cpu[0], recs[0])] \
        == ["bf16", "fp32", "fp32"]
    assert columns.train_precision({"bf16": True}, T(device="2 x cpu: AMD EPYC (1 threads)")) == "fp32"
    assert columns.train_precision({"bf16": True}, T()) == ""
    # a record that states its precision is read as it says, whatever the device string looks like
    assert columns.train_precision({"bf16": True}, T(device="cpu: x", precision="bf16")) == "bf16"
    df2 = leaderboard.leaderboard([bf, *cpu])
    assert sorted(zip(df2["precision"], df2["n_seeds"])) == [("bf16", 1), ("fp32", 2)]
    assert " precision |" in formatting.format_markdown(df2).splitlines()[2]     # the header shows it
    # on a CPU neither flag acts (bf16 acts only through the precision, channels_last only on CUDA): two CPU
    # seeds that differ in both flags are one row; on a GPU channels_last picks other kernels: two rows
    cpu[1]["config"].update(bf16=False, channels_last=False)
    assert list(leaderboard.leaderboard(cpu)["n_seeds"]) == [2]
    gpu = [make_record(f"h{s}", seed=s, train_device="NVIDIA H100") for s in (1, 2)]
    gpu[1]["config"]["channels_last"] = not gpu[0]["config"].get("channels_last", True)
    assert sorted(leaderboard.leaderboard(gpu)["n_seeds"]) == [1, 1]


def test_leaderboard_missing_metric_in_one_seed_is_nan_and_edge_cases(tmp_path):
    recs = [make_record(f"r{s}", seed=s) for s in range(2)]
    del recs[1]["metrics"]["nll_ts"]
    df = leaderboard.leaderboard(recs)
    assert math.isnan(df.loc[0, "nll_ts_mean"]) and df.loc[0, "acc_mean"] == pytest.approx(0.9)
    with pytest.warns(UserWarning, match="not 'complete'"):
        df2 = leaderboard.leaderboard(recs + [make_record("f", seed=5, status="failed")])
    assert df2.loc[0, "n_seeds"] == 2
    empty = leaderboard.leaderboard([])
    assert len(empty) == 0 and "acc_mean" in empty.columns
    assert "no results" in formatting.format_markdown(empty)

    leaderboard.write_leaderboard(df, tmp_path / "lb" / "lb.csv", tmp_path / "lb" / "lb.md")
    back = pd.read_csv(tmp_path / "lb" / "lb.csv")
    assert back.loc[0, "acc_mean"] == pytest.approx(0.9) and back.loc[0, "n_seeds"] == 2
    assert (tmp_path / "lb" / "lb.md").read_text().startswith("### cifar10")


# ---------------------------------------------------------------------------- predictions


def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50, 10)).astype(np.float32) * 5
    logits[0, 0, 0] = 1e6  # beyond float16: clipped, not inf
    labels = rng.integers(0, 10, size=50)
    val_logits = rng.normal(size=(3, 20, 10))
    val_labels = rng.integers(0, 10, size=20)
    ood = {"svhn": rng.normal(size=(3, 30, 10)), "cifar100": rng.normal(size=(3, 40, 10))}
    p = predictions.save_predictions(tmp_path, "run1", logits=logits, labels=labels, val_logits=val_logits,
                           val_labels=val_labels, ood=ood, combine="logits")
    assert p == tmp_path / "run1.preds.npz"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["run1.preds.npz"]
    with np.load(p) as z:
        assert sorted(z.files) == ["combine", "labels", "logits", "ood_cifar100", "ood_svhn", "val_labels", "val_logits"]
        assert z["logits"].dtype == np.float16 and z["ood_svhn"].dtype == np.float16
        assert z["labels"].dtype == np.int64
    assert zipfile.ZipFile(p).infolist()[0].compress_type == zipfile.ZIP_DEFLATED

    d = predictions.load_predictions(tmp_path, "run1")
    assert d["logits"].shape == (3, 50, 10) and d["val_logits"].shape == (3, 20, 10)
    assert set(d["ood"]) == {"svhn", "cifar100"} and d["ood"]["cifar100"].shape == (3, 40, 10)
    assert d["combine"] == "logits"
    np.testing.assert_array_equal(d["labels"], labels)
    np.testing.assert_allclose(d["logits"][:, 1:], logits[:, 1:], rtol=1e-3, atol=1e-2)
    assert np.isfinite(d["logits"]).all() and d["logits"][0, 0, 0] == 65504.0
    d16 = predictions.load_predictions(p, dtype=None)
    assert d16["logits"].dtype == np.float16
    via_record = predictions.load_predictions(tmp_path / "run1.json")
    np.testing.assert_array_equal(via_record["val_labels"], val_labels)

    # without validation / OOD; torch tensors accepted
    torch = pytest.importorskip("torch")
    predictions.save_predictions(tmp_path, "run2", logits=torch.randn(1, 5, 3), labels=torch.arange(5) % 3)
    d2 = predictions.load_predictions(tmp_path / "run2.preds.npz")
    assert d2["val_logits"] is None and d2["ood"] == {} and d2["combine"] == "probs" and d2["logits"].shape == (1, 5, 3)
    with pytest.raises(ValueError):
        predictions.save_predictions(tmp_path, "bad", logits=np.zeros((2, 4, 3)), labels=np.zeros(5, dtype=int))


# ---------------------------------------------------------------------------- environment


def test_environment_info(tmp_path):
    info = environment.environment_info()
    for k in ("python", "platform", "torch", "torchvision", "numpy", "hostname", "git_commit", "git_dirty", "cpu", "cuda_device"):
        assert k in info
    assert info["numpy"] == np.__version__
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
    assert info["git_dirty"] in (None, True, False)
    records.write_json_atomic(tmp_path / "env.json", info)  # serialisable


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    import os

    records.write_record(tmp_path, make_record("a"))
    stale = tmp_path / ".a.json.abc123.tmp"          # what a SIGKILL in the middle of a write leaves
    fresh = tmp_path / ".a.json.def456.tmp"          # a concurrent writer's, still writing
    stale.write_text("{half")
    fresh.write_text("{half")
    old = time.time() - records.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    records.write_record(tmp_path, make_record("a"))
    assert not stale.exists() and fresh.exists()


def test_leaderboard_reads_several_folders_and_subfolders_and_names_running_records(tmp_path, capsys):
    from ensemble_bench.cli import main
    from ensemble_bench.runlock import run_lock

    a, b = tmp_path / "a", tmp_path / "b"
    records.write_record(a, make_record("s0", seed=0, acc=0.8))
    records.write_record(a / "sub", make_record("s1", seed=1, acc=0.9))       # a subfolder of a: found
    records.write_record(b, make_record("s2", seed=2, acc=1.0))               # another folder: pooled as a seed
    records.write_record(a / ".ckpt", make_record("hidden", seed=3, acc=0.0))  # hidden folders: never
    for rid, seed in (("live", 4), ("killed", 5)):
        rec = make_record(rid, seed=seed, status="running")
        for k in ("metrics", "cost", "training"):
            rec.pop(k)
        records.write_record(b, rec)
    csv = tmp_path / "lb.csv"
    with run_lock(b, "live") as mine:     # this process holds "live"; nobody holds "killed"
        assert mine
        assert main(["leaderboard", str(a), str(b), "-o", str(csv)]) == 0
    err = capsys.readouterr().err
    df = pd.read_csv(csv)
    assert len(df) == 1 and df["n_seeds"].iloc[0] == 3
    assert df["acc_mean"].iloc[0] == pytest.approx(0.9)
    assert "2 record(s) still 'running' are not in the table; 1 of them stopped" in err
    assert "killed" in err.split("stopped", 1)[1] and "live" not in err.split("stopped", 1)[1]
    # a folder named twice (or inside another one named) counts each record once
    pairs, problems = records.scan_records([a, a / "sub"], recursive=True)
    assert sorted(r["run_id"] for _, r in pairs) == ["s0", "s1"] and problems == []


def test_the_recursive_scan_never_enters_hidden_folders(tmp_path, monkeypatch):
    """Records in subfolders count; nothing inside .ckpt / .members / .submitit is listed or even entered
    (a run that finishes removes its .ckpt/<run_id> folder while another process scans)."""
    import os

    records.write_record(tmp_path, make_record("top"))
    (tmp_path / "sub").mkdir()
    records.write_record(tmp_path / "sub", make_record("deep"))
    (tmp_path / ".ckpt" / "top").mkdir(parents=True)
    (tmp_path / ".ckpt" / "top" / "state.json").write_text("{}")
    entered = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": entered.append(str(p)) or real_scandir(p))
    pairs, problems = records.scan_records(tmp_path, recursive=True)
    assert sorted(r["run_id"] for _, r in pairs) == ["deep", "top"] and problems == []
    assert not any(".ckpt" in p for p in entered), entered


def test_the_same_seed_of_one_row_twice_counts_once(tmp_path, capsys):
    """Two records of one row (same data, recipe, options, precision) with the same seed are one experiment
    under two run ids: counted once (the smaller run id), with one warning line naming both, in the
    leaderboard and in the report's configs alike; before, they pooled as n = 2 seeds."""
    from ensemble_bench.cli import main
    from ensemble_bench.report.model import group_sections

    recs = [make_record("r-b", seed=0, acc=0.5), make_record("r-a", seed=0, acc=0.9),
            make_record("r-c", seed=1, acc=0.7)]
    with pytest.warns(UserWarning, match="r-b is seed 0 of the same row as r-a"):
        df = leaderboard.leaderboard(recs)
    assert df.loc[0, "n_seeds"] == 2 and df.loc[0, "acc_mean"] == pytest.approx(0.8)
    assert df.loc[0, "run_ids"] == "r-a,r-c"
    with pytest.warns(UserWarning):
        (config,) = group_sections(recs)[0].configs
    assert sorted(r["run_id"] for r in config.rows) == ["r-a", "r-c"]
    for r in recs:
        records.write_record(tmp_path / "runs", r)
    assert main(["leaderboard", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ensemble-bench: warning: r-b is seed 0 of the same row as r-a (same data, recipe, options and "
                   "precision): counted once, as r-a"]


def test_a_runs_files_share_one_mode(tmp_path):
    """The weights beside a record are as readable as the record (safetensors alone creates them 0o600,
    which a shared results folder could not read)."""
    import stat

    import torch

    rec = records.write_record(tmp_path, make_record("r0"))
    weights = records.save_weights(tmp_path, "r0", torch.nn.Linear(2, 2))
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(rec.stat().st_mode)


def test_markdown_recipe_cells_name_departures_from_the_tables_common_recipe():
    """Three rows under one recipe and one under a paper's: the three show –, the fourth only what departs,
    and the line under the heading states the common values; a row whose latency and training ran on one
    device names it once in the devices column, another names both."""
    recs = [make_record(f"c{i}", method=m, options={}, seed=0) for i, m in enumerate(("single", "packed", "mimo"))]
    recs.append(make_record("p0", method="nfe", options={}, seed=0, latency_device="cpu: AMD EPYC"))
    for r in recs:
        r["config"]["effective_recipe"] = {"schedule": "cosine", "nesterov": False, "weight_decay": 5e-4}
    recs[3]["config"]["effective_recipe"] = {"schedule": "linear", "nesterov": True, "weight_decay": 5e-4}
    df = leaderboard.leaderboard(recs)
    md = formatting.format_markdown(df)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    head = [h.strip() for h in rows["method"].strip("|").split("|")]
    cells = {m: [c.strip() for c in rows[m].strip("|").split("|")] for m in ("single", "packed", "mimo", "nfe")}
    recipe, devices = head.index("recipe"), head.index("devices")
    assert [cells[m][recipe] for m in ("single", "packed", "mimo")] == ["–"] * 3
    assert cells["nfe"][recipe] == "schedule=linear, nesterov=True"
    assert "recipe: – = the table's most common values of the recipe fields that vary (schedule=cosine, " \
           "nesterov=False)" in md
    assert cells["single"][devices] == "NVIDIA H100"
    assert cells["nfe"][devices] == "latency: cpu: AMD EPYC; train: NVIDIA H100"
    # one recipe in the table: no recipe column, no line
    one = formatting.format_markdown(leaderboard.leaderboard(recs[:3]))
    header = next(line for line in one.splitlines() if line.startswith("| method"))
    assert "| recipe |" not in header and "recipe: –" not in one
    # recipes that differ only in a field no row's schedule reads (hand-made or old records): nothing to show
    for r, milestones in zip(recs[:2], ([0.3, 0.6], [0.5, 0.75])):
        r["config"]["effective_recipe"] = {"schedule": "cosine", "milestones": milestones}
    unused = formatting.format_markdown(leaderboard.leaderboard(recs[:2]))
    header = next(line for line in unused.splitlines() if line.startswith("| method"))
    assert "| recipe |" not in header and "recipe: –" not in unused


def test_reference_landed_table_lists_each_record_with_its_own_evidence():
    """results/reference/landed.py: one line per complete record in landing order, a record's own verdict with
    the stage still falling, the recipe as it departs from the folder's most common, the machine shortened."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("landed", Path(__file__).parents[1] / "results/reference/landed.py")
    landed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(landed)
    recs = [make_record(f"r{i}", method="single", options={}, seed=i, train_device="cpu: Intel(R) Xeon(R) Processor "
                        "@ 2.80GHz (1 threads)") for i in range(3)]
    for i, r in enumerate(recs):
        r["timings"]["finished"] = f"2026-12-0{3 - i}T10:00:00+00:00"          # landed in reverse order
        falling = [1.0 - 0.05 * k for k in range(10)] if i == 1 else [1.0] * 10
        r["training"]["stages"] = {"member0": {"curve": [{"epoch": k + 1, "val_nll": v} for k, v in enumerate(falling)]}}
    recs[2]["config"]["effective_recipe"] = {"schedule": "linear"}
    recs[2]["training"]["device"] = "cpu: AMD EPYC (1 threads) + cpu: Intel(R) Xeon(R) Processor (1 threads)"
    text = landed.table(recs)
    rows = [line for line in text.splitlines() if line.startswith("| 2026")]
    assert [r.split(" | ")[1] for r in rows] == ["`r2`", "`r1`", "`r0`"]
    assert "**no** (member0: -" in rows[1] and "over epochs 7-10" in rows[1] and rows[0].count("| yes |") == 1
    assert "| schedule=linear |" in rows[0] and rows[0].endswith("| AMD EPYC + Intel Xeon |")
    assert rows[2].endswith("| Intel Xeon @ 2.80GHz |")


def test_every_reference_phase_expands_with_this_code(tmp_path, shared_data, monkeypatch):
    """results/reference/make.sh goes through its phases for days: a spec this code cannot load would stop a lane
    part way. Every phase it names loads and expands; the wider backbone's (phases 6-7) train compiled, and the
    flag leaves their run ids alone (README, Pace: they were fixed before the pin that compiles them)."""
    import re

    from ensemble_bench import sweep

    ref = Path(__file__).parents[1] / "results" / "reference"
    phases = re.search(r'PHASES="([^"]*)"', (ref / "make.sh").read_text()).group(1).split()
    assert len(phases) == len(list(ref.glob("[0-9]*-*.toml")))
    (tmp_path / "cwd").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)     # the specs' data_dir, ../shared/data, from cwd/
    monkeypatch.chdir(tmp_path / "cwd")
    for phase in phases:
        text = (ref / f"{phase}.toml").read_text().replace('"results/reference/runs"', f'"{tmp_path / "runs"}"')
        spec = sweep.load_spec(write_text(tmp_path / f"{phase}.toml", text))
        runs = sweep.expand(spec)
        assert runs, phase
        wide = phase[0] in "67"
        assert all(r.compile == wide for r in runs), phase
        if wide:
            eager = sweep.load_spec(write_text(tmp_path / "eager.toml", text.replace("compile = true", "compile = false")))
            assert [r.run_id() for r in sweep.expand(eager)] == [r.run_id() for r in runs]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
