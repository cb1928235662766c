import math

import pytest
import torch

from ensemble_bench.errors import TrainingDiverged
from ensemble_bench.train import lr_factor
from conftest import Killed, fit_method, kill_at


def test_cosine_with_warmup():
    assert lr_factor("cosine", 0.0, 10, warmup=2) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor("cosine", 1.0, 10, warmup=2) == pytest.approx(0.5)
    assert lr_factor("cosine", 2.0, 10, warmup=2) == pytest.approx(1.0)
    assert lr_factor("cosine", 6.0, 10, warmup=2) == pytest.approx(0.5)
    assert lr_factor("cosine", 10.0, 10, warmup=2) == pytest.approx(0.0, abs=1e-12)


def test_multistep_and_linear_and_constant():
    assert lr_factor("multistep", 4.9, 10, milestones=(0.5, 0.75), decay=0.1) == 1.0
    assert lr_factor("multistep", 5.0, 10, milestones=(0.5, 0.75), decay=0.1) == pytest.approx(0.1)
    assert lr_factor("multistep", 8.0, 10, milestones=(0.5, 0.75), decay=0.1) == pytest.approx(0.01)
    # NFE / FreeTickets style: constant to 50%, linear to 0.01 at 90%, then 0.01
    assert lr_factor("linear", 4.0, 10) == 1.0
    assert lr_factor("linear", 7.0, 10) == pytest.approx(1 - 0.99 * 0.5)
    assert lr_factor("linear", 9.0, 10) == pytest.approx(0.01)
    assert lr_factor("linear", 9.9, 10) == pytest.approx(0.01)
    assert lr_factor("constant", 3.3, 10) == 1.0
    with pytest.raises(ValueError):
        lr_factor("bogus", 1, 10)


def test_nan_loss_stops_with_clear_error(digits):
    with pytest.raises(TrainingDiverged, match="diverged"):
        fit_method("single", digits, epochs=2, lr=1e12)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_mid_stage_gives_identical_weights(digits, tmp_path):
    """A stage killed after epoch 2 of 4 and resumed ends with exactly the weights of an uninterrupted run."""
    ref, _, _ = fit_method("single", digits, epochs=4, ckpt_dir=tmp_path / "ref")
    with kill_at("member0", 2), pytest.raises(Killed):
        fit_method("single", digits, epochs=4, ckpt_dir=tmp_path / "run")
    # epoch 2 raised inside on_epoch_end, before its checkpoint: the checkpoint holds epoch 1
    state = torch.load(tmp_path / "run" / "member0.pt", weights_only=False)
    assert len(state["result"]["history"]) == 1 and not state["done"]
    resumed, trainer, _ = fit_method("single", digits, epochs=4, ckpt_dir=tmp_path / "run")
    assert trainer.stages["member0"].resumed_from_epoch == 1
    a, b = _state(ref), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_resumed_on_another_machine_names_both_devices(digits, tmp_path, monkeypatch):
    """A stage killed after epoch 1 of 4 and resumed on another machine: its segments say which epochs
    trained where, and the record's training device names both, so its train_s (their sum) is never read
    as one machine's time; a run that stayed on one machine keeps that machine's plain name."""
    import ensemble_bench.cost as cost
    from ensemble_bench.columns import device_kind

    here = cost.device_name("cpu")
    _, ref, _ = fit_method("single", digits, epochs=4)
    assert ref.stages["member0"].segments == [{"from_epoch": 0, "device": here, "precision": "fp32"}]
    assert ref.training_device() == here and ref.summary()["device_epochs"] == {here: 4}
    assert ref.summary()["stages"]["member0"]["segments"] == ref.stages["member0"].segments
    with kill_at("member0", 2), pytest.raises(Killed):
        fit_method("single", digits, epochs=4, ckpt_dir=tmp_path)
    monkeypatch.setattr(cost, "device_name", lambda device: "cpu: Another CPU (1 threads)")
    _, tr, _ = fit_method("single", digits, epochs=4, ckpt_dir=tmp_path)
    assert [(s["from_epoch"], s["device"]) for s in tr.stages["member0"].segments] == \
        [(0, here), (1, "cpu: Another CPU (1 threads)")]
    assert tr.summary()["device_epochs"] == {here: 1, "cpu: Another CPU (1 threads)": 3}
    assert tr.training_device() == f"{here} + cpu: Another CPU (1 threads)"
    assert tr.training_precision() == "fp32"
    # the device kind of a joined name: one kind, or "mixed" (a CUDA run resumed on a CPU)
    assert device_kind(tr.training_device()) == "cpu" and device_kind(f"{here} + NVIDIA H100") == "mixed"
    tr.stages["member0"].segments[1]["precision"] = "bf16"
    assert tr.training_precision() == "fp32 + bf16"      # a group key of its own: never pooled with either


def test_finished_stage_is_not_trained_again(digits, tmp_path):
    m1, t1, _ = fit_method("deep_ensemble", digits, epochs=1, options={"num_members": 2}, ckpt_dir=tmp_path)
    m2, t2, _ = fit_method("deep_ensemble", digits, epochs=1, options={"num_members": 2}, ckpt_dir=tmp_path)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert all(s.train_s == t1.stages[k].train_s for k, s in t2.stages.items())


def test_best_val_selection_keeps_the_best_epoch(digits):
    import ensemble_bench.methods as methods
    from ensemble_bench.api import FitContext
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.train import Trainer

    cfg = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 4, "progress": False})
    tr = Trainer(digits, cfg, "cpu", log=lambda s: None)
    ctx = FitContext(cfg, 10, 1, 8, torch.device("cpu"), digits, tr)
    model = methods.get("single")().build(ctx).members[0]
    vals = iter([3.0, 1.0, 2.0, 5.0])
    snapshots = []

    def val_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(vals)

    res = tr.fit(model, stage="s", epochs=4, select="best_val", val_fn=val_fn)
    assert res.best_epoch == 2 and res.best_val == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_training_cost_is_recorded(digits):
    _, trainer, _ = fit_method("single", digits, epochs=2)
    s = trainer.summary()
    assert s["epochs_run"] == {"member0": 2}
    assert s["samples_seen"] == 2 * len(digits.train)
    assert s["train_flops"] is not None and s["train_flops"] > 0
    st = trainer.stages["member0"]
    assert math.isclose(s["train_flops"], 3 * st.flops_per_sample * st.samples_seen)


def test_killed_run_resumes_to_the_same_record(tmp_path):
    """runner.execute killed mid-way (an interrupt in epoch 3 of 4: the record says "running", the
    checkpoint holds epoch 2) and started again gives the record of an uninterrupted run: same run id,
    same metrics and predictions, the same epochs run; the checkpoints are gone afterwards."""
    import json

    from ensemble_bench import predictions, records
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.runner import execute

    def cfg(out):
        return make_run_config({"method": "deep_ensemble", "backbone": "cnn_small", "dataset": "digits",
                                "epochs": 4, "seed": 3, "lr": 0.05, "out": str(out), "device": "cpu",
                                "progress": False, "latency_runs": 2, "options": {"num_members": 2}})

    ref = execute(cfg(tmp_path / "ref"), log=lambda s: None)
    out = tmp_path / "run"
    with kill_at("member1", 3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        execute(cfg(out), log=lambda s: None)
    assert records.record_status(out, ref["run_id"]) == "running"
    killed_started = records.read_record(out / f"{ref['run_id']}.json")["timings"]["started"]
    assert (out / ".ckpt" / ref["run_id"] / "member1.pt").is_file()
    lines: list[str] = []
    rec = execute(cfg(out), log=lines.append)
    assert any("[member0] already trained" in ln for ln in lines)
    assert any("[member1] resuming after epoch 2/4" in ln for ln in lines)
    assert rec["run_id"] == ref["run_id"] and rec["status"] == "complete"
    assert json.dumps(rec["metrics"], sort_keys=True) == json.dumps(ref["metrics"], sort_keys=True)
    assert rec["training"]["epochs_run"] == ref["training"]["epochs_run"] == {"member0": 4, "member1": 4}
    assert rec["training"]["samples_seen"] == ref["training"]["samples_seen"]
    # its timings are the last process's, and say so: when the first started, how many processes it took
    assert "processes" not in ref["timings"] and "first_started" not in ref["timings"]
    assert rec["timings"]["processes"] == 2 and rec["timings"]["first_started"] == killed_started
    assert rec["training"]["device"] == ref["training"]["device"]     # the same machine: its plain name
    assert [s["from_epoch"] for s in rec["training"]["stages"]["member1"]["segments"]] == [0, 2]
    a = predictions.load_predictions(tmp_path / "ref", ref["run_id"])
    b = predictions.load_predictions(out, rec["run_id"])
    assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in ("logits", "labels"))
    assert not (out / ".ckpt" / ref["run_id"]).exists()
    # the resumed stage is in the stage store too (as the uninterrupted one is), for other runs to reuse
    assert len(list((out / ".members").glob("*.pt"))) == len(list((tmp_path / "ref" / ".members").glob("*.pt"))) == 2


def test_optimizer_from_carries_the_momentum_across_stages(digits, monkeypatch):
    """A stage started with optimizer_from= takes the momentum buffers the stage finished just before ended
    with (and keeps its own lr / weight decay); without it a stage starts from zero momentum."""
    import copy

    from ensemble_bench.backbones import build_backbone
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.train import Trainer

    cfg = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 1,
                           "progress": False})
    trainer = Trainer(digits, cfg, "cpu", log=lambda s: None)
    net = build_backbone("cnn_small", 10, 1)
    seen = []      # momentum buffers just before each optimiser step
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(([None if "momentum_buffer" not in self.state[p] else self.state[p]["momentum_buffer"].clone()
                      for p in self.param_groups[0]["params"]], self.param_groups[0]["weight_decay"]))
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    trainer.fit(net, stage="a")
    end_a = copy.deepcopy(trainer._last_opt[1]["state"])
    n_a = trainer.stages["a"].steps
    trainer.fit(net, stage="b", optimizer_from="a", recipe=trainer.recipe.replace(weight_decay=1e-3))
    trainer.fit(net, stage="c")
    bufs, wd = seen[n_a]
    assert wd == 1e-3
    assert len(end_a) == len(bufs) and all(torch.equal(end_a[i]["momentum_buffer"], b) for i, b in enumerate(bufs))
    assert all(b is None for b in seen[n_a + trainer.stages["b"].steps][0])          # c: fresh optimiser
    with pytest.raises(ValueError, match="not the stage this trainer finished last"):
        trainer.fit(net, stage="d", optimizer_from="a")            # "c" finished after it


def test_validation_nll_is_bitwise_the_metric(digits):
    """The epoch's val_nll is the mean of the per-image losses the convergence rule pairs, and exactly (to
    the bit) the test metric ``metrics.nll`` of the same logits, under either combine rule."""
    from ensemble_bench.metrics import nll

    model, trainer, _ = fit_method("deep_ensemble", digits, epochs=1, options={"num_members": 2})
    logits, y = trainer.predict(model, digits.val.x), digits.val.y
    for combine in ("probs", "logits"):
        model.combine = combine
        got, losses = trainer._validate(model)
        assert got["val_nll"] == nll(logits, y, combine=combine)
        assert losses.shape == (len(y),) and float(losses.mean()) == got["val_nll"]
