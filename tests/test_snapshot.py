"""Snapshot ensembles (methods/snapshot.py): one training with M cosine cycles, the members are exactly the
weights at the cycle ends, the lr restarts at every cycle start, a killed run keeps its earlier snapshots,
E >= M, cost."""
import json
import math

import pytest
import torch

import ensemble_bench.train as train_mod
import ensemble_bench.methods as methods
from ensemble_bench.backbones import build_backbone
from ensemble_bench.config import build_options
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.errors import UsageError
from ensemble_bench.recipe import Recipe, cycle_ends
from conftest import Killed, fit_method, kill_at, subsample
from ensemble_bench.methods.snapshot import snapshot_steps, step_time

SN = methods.get("snapshot")


def test_defaults_and_bad_options():
    assert SN.option_defaults() == {"num_snapshots": 5}
    for bad in ({"num_snapshots": 0}, {"num_snapshots": 2.5}, {"num_snapshots": True}):
        with pytest.raises(UsageError, match="snapshot"):
            build_options(SN.Config, bad, "snapshot")


@pytest.mark.parametrize("epochs,cycles,spe,expected", [(6, 3, 10, [20, 40, 60]), (4, 4, 3, [3, 6, 9, 12]),
                                                         (10, 4, 4, [10, 20, 30, 40]), (5, 2, 3, [8, 15]),
                                                         (7, 3, 5, None), (200, 5, 391, None)])
def test_snapshot_steps_are_the_last_step_of_each_cycle(epochs, cycles, spe, expected):
    r = Recipe(epochs=epochs, schedule="cyclic_cosine", cycles=cycles)
    steps = snapshot_steps(r, spe)
    if expected is not None:
        assert steps == expected
    assert len(steps) == cycles and steps[-1] == epochs * spe
    lr = [r.lr_factor(step_time(j, spe)) for j in range(epochs * spe)]     # as the trainer schedules step j
    for j in range(1, epochs * spe):
        if j in steps:       # the step after a snapshot starts a new cycle: the lr restarts
            assert lr[j] > lr[j - 1] and lr[j] > 0.5 and lr[j - 1] < 0.5, (j, lr[j - 1], lr[j])
        else:                # inside a cycle the lr only anneals
            assert lr[j] <= lr[j - 1], j


@pytest.fixture
def epoch_spy(monkeypatch):
    """{stage: [(epoch, state_dict at its end)]} of every Trainer.fit, recorded by an on_epoch_end spy (after
    the stage's own hook, i.e. the weights the epoch's checkpoint holds); and the lr of every optimiser step."""
    states, lrs = {}, []
    orig_fit, orig_step = train_mod.Trainer.fit, torch.optim.SGD.step

    def fit(self, model, **kw):
        inner = kw.get("on_epoch_end")

        def hook(m, e):
            if inner is not None:
                inner(m, e)
            states.setdefault(kw.get("stage"), []).append(
                (e, {k: v.detach().clone() for k, v in m.state_dict().items()}))
        kw["on_epoch_end"] = hook
        return orig_fit(self, model, **kw)

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "fit", fit)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return states, lrs


def test_members_are_the_weights_at_the_cycle_ends_and_the_lr_restarts(digits, epoch_spy):
    states, lrs = epoch_spy
    bundle = subsample(digits, 300, 200)
    model, trainer, ctx = fit_method("snapshot", bundle, epochs=4, lr=0.1, options={"num_snapshots": 2})
    spe = math.ceil(300 / 128)
    assert list(trainer.stages) == ["snapshot"] and len(states["snapshot"]) == 4
    by_epoch = dict(states["snapshot"])
    assert model.num_members == 2 and ctx.info["snapshot_epochs"] == [2.0, 4.0]
    for member, epoch in zip(model.members, (2, 4)):
        for k, v in member.state_dict().items():
            assert torch.equal(v, by_epoch[epoch][k]), (epoch, k)
    assert not torch.equal(model.members[0].head.weight, model.members[1].head.weight)
    # the lr: one cosine per cycle, restarting at the initial lr at the first step of every cycle
    assert len(lrs) == 4 * spe
    assert lrs[0] == lrs[2 * spe] == pytest.approx(0.1)
    assert lrs[2 * spe - 1] < 0.01 and lrs[-1] < 0.01
    assert all(lrs[j] <= lrs[j - 1] for j in range(1, 4 * spe) if j != 2 * spe)
    # the cyclic schedule is the stage's recorded recipe; the training cost is one model's
    summary = trainer.summary()
    assert summary["stages"]["snapshot"]["recipe_changes"] == {"schedule": "cyclic_cosine", "cycles": 2}
    assert summary["samples_seen"] == 4 * 300
    logits = trainer.predict(model, bundle.test.x)
    acc = (logits.softmax(-1).mean(0).argmax(-1) == bundle.test.y).float().mean().item()
    assert acc > 0.3, acc


RESUME_OPTS = {"num_snapshots": 2}


@pytest.fixture(scope="module")
def resume_reference(digits, tmp_path_factory):
    bundle = subsample(digits, 300, 100)
    ref, trainer, ctx = fit_method("snapshot", bundle, epochs=5, lr=0.1, options=RESUME_OPTS,
                                   ckpt_dir=tmp_path_factory.mktemp("ref"))
    return bundle, ref, ctx, trainer.stages["snapshot"].history


@pytest.mark.parametrize("kill_epoch", [3, 4])
def test_a_killed_run_resumes_with_its_earlier_snapshots(resume_reference, tmp_path, kill_epoch):
    """E = 5, M = 2 and 3 steps an epoch: cycles of 2.5 epochs, so the first snapshot is taken in the middle
    of epoch 3 (after step 8). Killed at the end of epoch 3 (before its checkpoint) the run resumes after
    epoch 2 and takes that snapshot again; killed at the end of epoch 4 it resumes after epoch 3 with the
    snapshot from the checkpoint (loaded with weights_only=True)."""
    bundle, ref, ref_ctx, ref_curve = resume_reference
    opts = RESUME_OPTS
    assert ref_ctx.info["snapshot_steps"] == [8, 15]
    with kill_at("snapshot", kill_epoch), pytest.raises(Killed):
        fit_method("snapshot", bundle, epochs=5, lr=0.1, options=opts, ckpt_dir=tmp_path / "run")
    resumed, trainer, _ = fit_method("snapshot", bundle, epochs=5, lr=0.1, options=opts, ckpt_dir=tmp_path / "run")
    assert trainer.stages["snapshot"].resumed_from_epoch == kill_epoch - 1
    for a, b in zip(ref.members, resumed.members):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    # the curve too, with its paired standard errors against the last cycle end (kept in the checkpoint)
    timeless = [[{k: v for k, v in e.items() if k not in ("epoch_s", "val_s")} for e in c]
                for c in (ref_curve, trainer.stages["snapshot"].history)]
    assert timeless[0] == timeless[1]
    assert [e.get("diff_from_epoch") for e in ref_curve] == [None, None, 2, 2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
def test_a_killed_cuda_run_resumes_its_curve(resume_reference, tmp_path):
    """On CUDA the checkpoint loads onto the GPU; the last cycle end's per-image NLL (validation losses are on
    the CPU) must come back to the CPU, or the first epoch after the resume fails."""
    bundle, _, _, ref_curve = resume_reference
    with kill_at("snapshot", 4), pytest.raises(Killed):
        fit_method("snapshot", bundle, epochs=5, lr=0.1, options=RESUME_OPTS, ckpt_dir=tmp_path, device="cuda")
    _, trainer, _ = fit_method("snapshot", bundle, epochs=5, lr=0.1, options=RESUME_OPTS, ckpt_dir=tmp_path,
                               device="cuda")
    curve = trainer.stages["snapshot"].history
    assert trainer.stages["snapshot"].resumed_from_epoch == 3
    assert [e.get("diff_from_epoch") for e in curve] == [None, None, 2, 2, 2]
    assert all(e["val_nll_diff_se"] > 0 for e in curve[2:])


def test_the_curve_keeps_the_standard_errors_the_convergence_rule_reads(digits):
    """Every validated epoch records its NLL's standard error over the validation images; every epoch after
    a learning-rate cycle end (recipe.cycle_ends on the curve's lr: where the rule looks) records the paired
    standard error of its NLL's change since that end, recomputed here from the snapshots' own losses."""
    bundle = subsample(digits, 300, 100)
    model, trainer, _ = fit_method("snapshot", bundle, epochs=6, lr=0.1, options={"num_snapshots": 3})
    curve = trainer.stages["snapshot"].history
    ends = cycle_ends([e["lr"] for e in curve])
    assert ends == [1, 3]                                   # epochs 2 and 4 end the first two cycles
    assert all(e["val_nll_se"] > 0 for e in curve)
    assert [e.get("diff_from_epoch") for e in curve] == [None, None, 2, 2, 4, 4]
    members = model.members                                  # the weights at epochs 2, 4 and 6
    losses = []
    for m in members:
        z = trainer.predict(m, bundle.val.x)[0].double()
        losses.append(-torch.log_softmax(z, -1).gather(1, bundle.val.y.long()[:, None]).squeeze(1))
    d = losses[2] - losses[1]
    assert curve[5]["val_nll_diff_se"] == pytest.approx(float(d.std() / math.sqrt(d.numel())), rel=1e-6)
    assert curve[5]["val_nll_se"] == pytest.approx(float(losses[2].std() / math.sqrt(d.numel())), rel=1e-6)
    assert curve[3]["val_nll"] == pytest.approx(float(losses[1].mean()), rel=1e-6)


def test_fewer_epochs_than_cycles_is_one_line_and_nothing_written(tmp_path, capsys, monkeypatch):
    from ensemble_bench.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "--method", "snapshot", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2",
                 "--set", "num_snapshots=3", "--out", "runs", "--no-progress"])
    err = capsys.readouterr()[1].strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "epochs (2) must be >= num_snapshots (3)" in err[0]
    assert not (tmp_path / "runs").exists()


def test_cost_is_m_copies_of_the_backbone(capsys):
    from ensemble_bench.cli import main

    plain = build_backbone("resnet20", 10, 3).eval()
    assert main(["cost", "--method", "snapshot", "--backbone", "resnet20", "--num-classes", "10"]) == 0
    res = json.loads(capsys.readouterr()[0])
    assert res["num_members"] == 5 and res["params"] == 5 * count_params(plain)["params"]
    assert res["flops"] == pytest.approx(5 * count_flops(plain, torch.randn(1, 3, 32, 32))["flops"], rel=1e-6)


def test_paper_recipe_is_the_released_code():
    r = SN.paper_recipe(Recipe(epochs=200), "resnet20")
    assert (r.lr, r.momentum, r.nesterov, r.weight_decay, r.batch_size) == (0.2, 0.9, True, 1e-4, 64)
    assert r.schedule == "cosine"      # the cycles are the method's own, applied by fit in both modes
