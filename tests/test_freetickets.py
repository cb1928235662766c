"""FreeTickets (dst_ensemble, edst_ensemble): cost accounting, EDST schedule and members, resume, real data."""
import json

import pytest
import torch
from torch import nn

import ensemble_bench.methods as methods
from ensemble_bench.api import StackedEnsemble
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.methods._lib.sparse import DynamicSparsity, erk_densities, maskable_layers
from conftest import Killed, ensemble_vs_members, fit_method, growing_val_nll, kill_at
from ensemble_bench.recipe import Recipe
from ensemble_bench.methods.freetickets import edst_stage_epochs, explore_recipe, window_recipe


def test_registered_with_paper_defaults_and_checked_options():
    from ensemble_bench.config import build_options
    from ensemble_bench.errors import UsageError

    dst, edst = methods.get("dst_ensemble"), methods.get("edst_ensemble")
    released = {"select_on": "acc", "zero_momentum": False}    # the released code's behaviour
    assert dst.option_defaults() == {"num_members": 3, "density": 0.2, "death_rate": 0.5, "update_frequency": 1000,
                                     **released}
    assert edst.option_defaults() == {"num_members": 3, "density": 0.2, "death_rate": 0.5,
                                      "update_frequency": 1000, **released, "jump": 0.8}
    for cls in (dst, edst):
        for bad in ({"density": 0.0}, {"density": 1.5}, {"death_rate": 1.0}, {"num_members": 0},
                    {"update_frequency": 0}, {"select_on": "loss"}):
            with pytest.raises(UsageError):
                build_options(cls.Config, bad, cls.name)
    with pytest.raises(UsageError):
        build_options(edst.Config, {"jump": 0.0}, "edst_ensemble")


# ------------------------------------------------------------------------------------------ cost
def test_sparse_flops_are_per_layer_density_times_a_hand_count():
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    # multiply-adds x 2 at an 8x8 input: conv1 8x8 out, conv2 and conv3 4x4 out
    hand = {"0": 2 * 8 * 3 * 9 * 64, "2": 2 * 16 * 8 * 9 * 16, "4": 2 * 32 * 16 * 9 * 16, "8": 2 * 32 * 10}
    members = [net(), net()]
    sps = [DynamicSparsity(m, 0.3, seed=k) for k, m in enumerate(members)]
    x = torch.randn(1, 3, 8, 8)
    want = 0.0
    for m, sp in zip(members, sps):
        dens = {k: int(mask.sum()) / mask.numel() for k, mask in sp.masks.items()}
        assert len(set(dens.values())) > 2                  # ERK: the layers differ
        f_member = sum(dens[k] * hand[k] for k in hand)
        assert count_flops(m, x)["flops"] == pytest.approx(f_member, rel=1e-9)
        assert count_flops(m, x)["flops_dense"] == pytest.approx(sum(hand.values()), rel=1e-9)
        # global density x dense FLOPs would be another (wrong) number
        assert abs(sp.global_density() * sum(hand.values()) - f_member) > 0.05 * f_member
        want += f_member
    ens = StackedEnsemble(members)
    assert count_flops(ens, x)["flops"] == pytest.approx(want, rel=1e-9)


def test_wrn28_10_member_at_erk_density_02():
    from ensemble_bench.runner import build_for_cost

    model = build_for_cost("dst_ensemble", "wrn28_10", 10, 3, 32, {"num_members": 1}, torch.device("cpu"))
    member = model.members[0]
    layers = maskable_layers(member)
    live = sum(int((w != 0).sum()) for w in layers.values())
    total = sum(w.numel() for w in layers.values())
    assert live == pytest.approx(7.29e6, rel=0.005)            # paper: about 7.29M non-zero weights
    assert live / total == pytest.approx(0.2, abs=1e-4)
    assert bool((member.stem.weight != 0).all()) and bool((member.head.weight != 0).all())   # dense by ERK
    p = count_params(model)
    assert p["params"] == pytest.approx(36.5e6, rel=0.005)
    assert p["params_nonzero"] - live < 0.03e6                 # the rest: norms and the head bias
    f = count_flops(model, torch.randn(1, 3, 32, 32))
    # paper: 1.78G of 5.24G dense MACs = 0.34 per member (not 0.2, the global density)
    assert f["macs_dense"] == pytest.approx(5.24e9, rel=0.005)
    assert f["macs"] == pytest.approx(1.78e9, rel=0.005)
    ratio = f["macs"] / f["macs_dense"]
    assert ratio == pytest.approx(0.34, abs=0.01)
    per_layer = sum(v["density"] * v["flops_dense"] for v in f["per_layer"].values()) + f["flops_other"]
    assert f["flops"] == pytest.approx(per_layer, rel=1e-9)


def test_cost_command_builds_erk_members_without_training(capsys):
    from ensemble_bench.backbones import build_backbone
    from ensemble_bench.cli import main

    for method, members in (("dst_ensemble", 3), ("edst_ensemble", 2)):
        argv = ["cost", "--method", method, "--backbone", "cnn_small", "--num-classes", "10"]
        if members != 3:
            argv += ["--set", f"num_members={members}"]
        assert main(argv) == 0
        res = json.loads(capsys.readouterr().out)
        ref = build_backbone("cnn_small", 10, 3)
        dens = erk_densities({k: tuple(w.shape) for k, w in maskable_layers(ref).items()}, 0.2)
        live = sum(round(dens[k] * w.numel()) for k, w in maskable_layers(ref).items())
        masked = {id(w) for w in maskable_layers(ref).values()}
        other = sum(int((p != 0).sum()) for p in ref.parameters() if id(p) not in masked)  # BN bias is 0
        assert res["num_members"] == members
        assert res["params"] == members * sum(p.numel() for p in ref.parameters())
        assert res["params_nonzero"] == members * (live + other)
        assert 0.2 < res["flops"] / res["flops_dense"] < 0.6


# ------------------------------------------------------------------------------------------ EDST
def test_edst_stage_lengths_and_window_lr():
    assert edst_stage_epochs(250, 3) == {"explore": 150, "window0": 100, "window1": 100, "window2": 100}
    assert edst_stage_epochs(15, 2) == {"explore": 9, "window0": 6, "window1": 6}
    assert edst_stage_epochs(1, 2) == {"explore": 1, "window0": 1, "window1": 1}
    run = Recipe(epochs=250, lr=0.1, schedule="cosine", warmup_epochs=5)
    w = window_recipe(run, 100)
    assert w.epochs == 100 and w.warmup_epochs == 0
    assert w.lr_at(0.0) == pytest.approx(0.01) and w.lr_at(49.99) == pytest.approx(0.01)
    assert w.lr_at(50.0) == pytest.approx(0.001) and w.lr_at(99.9) == pytest.approx(0.001)
    e = explore_recipe(run, 150)
    assert e.lr_at(0.0) == e.lr_at(149.9) == pytest.approx(0.1)


# digits: 11 iterations per epoch; every 10th is an update, so no update falls on an epoch's last step (a
# best-epoch snapshot taken right after an update holds its grown weights at exactly 0, a lower density)
EDST_DIGITS = {"num_members": 3, "update_frequency": 10}


def test_edst_one_run_gives_distinct_best_val_members(digits):
    model, trainer, ctx = fit_method("edst_ensemble", digits, epochs=5, lr=0.05, options=EDST_DIGITS)
    stages = trainer.stages
    assert list(stages) == ["explore", "window0", "window1", "window2"]
    assert [s.epochs for s in stages.values()] == [3, 2, 2, 2]
    # learning rates: the run's lr while exploring, then 0.1x / 0.01x in the halves of every window
    assert [h["lr"] for h in stages["explore"].history] == pytest.approx([0.05] * 3)
    for k in range(3):
        assert [h["lr"] for h in stages[f"window{k}"].history] == pytest.approx([0.005, 0.0005])
    # a jump at the first step of every window after the first; regular updates go on in the windows
    steps = [stages[s].steps for s in stages]
    info = ctx.info
    assert info["sparsity"]["jump_steps"] == [sum(steps[:2]) + 1, sum(steps[:3]) + 1]
    assert all(0.4 < c <= 0.8 for c in info["sparsity"]["jump_changed"])
    assert all(info["updates_per_stage"][f"window{k}"] >= 2 for k in range(3))
    # M distinct sparse members, member k = the best-validation epoch of window k
    x = (digits.test.x[:64].float() / 255 - 0.3) / 0.4
    outs = model.eval()(x)
    assert outs.shape == (3, 64, 10)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(outs[a], outs[b], atol=1e-3)
    for k, m in enumerate(model.members):
        live = [(w != 0) for w in maskable_layers(m).values()]
        assert sum(int(t.sum()) for t in live) / sum(t.numel() for t in live) == pytest.approx(0.2, abs=0.01)
        # selected on validation accuracy, as the released code does
        assert stages[f"window{k}"].select_metric == "val_acc"
        assert trainer.val_metrics(m)["val_acc"] == pytest.approx(stages[f"window{k}"].best_val, abs=1e-9)
        assert stages[f"window{k}"].best_val == max(e["val_acc"] for e in stages[f"window{k}"].history)
    masks = [torch.cat([(w != 0).flatten() for w in maskable_layers(m).values()]) for m in model.members]
    assert (masks[0] != masks[1]).float().mean() > 0.05 and (masks[1] != masks[2]).float().mean() > 0.05
    assert info["sparse_kernels"] is False
    # training FLOPs extra: every update and jump reads one minibatch's dense weight gradient
    n_events = sum(1 for s in range(1, sum(steps) + 1) if s % 10 == 0 and s not in info["sparsity"]["jump_steps"]) + 2
    batch = sum(s.samples_seen for s in stages.values()) / sum(steps)
    f = count_flops(model.members[0], x[:1])
    assert ctx.extra_train_flops == pytest.approx(n_events * batch * (f["flops_dense"] - f["flops"]), rel=0.02)


def test_edst_killed_in_a_window_resumes_to_the_same_members(digits, tmp_path):
    ref, _, _ = fit_method("edst_ensemble", digits, epochs=5, lr=0.05, options=EDST_DIGITS, ckpt_dir=tmp_path / "ref")
    with kill_at("window1", 2), pytest.raises(Killed):
        fit_method("edst_ensemble", digits, epochs=5, lr=0.05, options=EDST_DIGITS, ckpt_dir=tmp_path / "run")
    resumed, trainer, ctx = fit_method("edst_ensemble", digits, epochs=5, lr=0.05, options=EDST_DIGITS,
                                       ckpt_dir=tmp_path / "run")
    assert trainer.stages["window1"].resumed_from_epoch == 1
    assert ctx.info["sparsity"]["jumps"] == 2
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# ------------------------------------------------------------------------------------------ DST
def test_dst_members_are_independent_sparse_trainings(digits):
    model, trainer, ctx = fit_method("dst_ensemble", digits, epochs=3, lr=0.05,
                                     options={"num_members": 2, "update_frequency": 5})
    assert list(trainer.stages) == ["member0", "member1"]
    masks = []
    for k, m in enumerate(model.members):
        live = torch.cat([(w != 0).flatten() for w in maskable_layers(m).values()])
        assert live.float().mean().item() == pytest.approx(0.2, abs=0.01)
        masks.append(live)
        st = trainer.stages[f"member{k}"]
        assert trainer.val_metrics(m)["val_acc"] == pytest.approx(st.best_val, abs=1e-9)   # best-validation epoch
        assert ctx.info["members"][k]["updates"] == st.steps // 5 > 0
    assert (masks[0] != masks[1]).float().mean() > 0.1
    assert ctx.extra_train_flops > 0 and ctx.info["sparse_kernels"] is False


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
@pytest.mark.parametrize("method,epochs,gap", [("dst_ensemble", 2, 0.01), ("edst_ensemble", 3, 0.003)])
def test_real_data_ensemble_beats_its_members(cifar10_small, method, epochs, gap):
    model, trainer, ctx = fit_method(method, cifar10_small, epochs=epochs, options={"update_frequency": 8})
    ens, mean_member, acc = ensemble_vs_members(model, trainer)
    print(f"{method}: ensemble NLL {ens:.4f}, mean member NLL {mean_member:.4f}, acc {acc:.3f}")
    assert ens < mean_member - gap            # equal only for identical members (Jensen): diversity
    assert acc > 0.25                         # chance is 0.1
    n_updates = ctx.info["sparsity"]["updates"] if method == "edst_ensemble" else sum(
        m["updates"] for m in ctx.info["members"])
    assert n_updates > 0


def test_dst_finished_member_resumes_to_its_best_epoch(digits, tmp_path, monkeypatch):
    """A killed DST run reloads a finished member exactly: its best-validation weights, not those weights
    under the masks of the member's last epoch (topology updates after the best epoch moved them)."""
    def run(ckpt):
        # the best epoch of every member is its first; the topology updates of the later epochs (every
        # 5 steps) change the masks after it
        growing_val_nll(monkeypatch)
        return fit_method("dst_ensemble", digits, epochs=3, lr=0.05, ckpt_dir=ckpt,
                          options={"num_members": 2, "update_frequency": 5})

    ref, ref_trainer, _ = run(tmp_path / "ref")
    assert ref_trainer.stages["member0"].best_epoch == 1
    with kill_at("member1", 1), pytest.raises(Killed):
        run(tmp_path / "run")
    resumed, trainer, _ = run(tmp_path / "run")
    assert trainer.stages["member0"].steps > 5 * 2          # updates fell after the best epoch
    for k, v in ref.members[0].state_dict().items():
        assert torch.equal(v, resumed.members[0].state_dict()[k]), k
    live = torch.cat([(w != 0).flatten() for w in maskable_layers(resumed.members[0]).values()])
    assert live.float().mean().item() == pytest.approx(0.2, abs=0.01)


def test_edst_windows_go_on_with_the_previous_stage_momentum(digits, monkeypatch):
    import ensemble_bench.train as train_mod

    calls = {}
    orig = train_mod.Trainer.fit

    def spy(self, model, **kw):
        calls[kw["stage"]] = kw.get("optimizer_from")
        return orig(self, model, **kw)

    monkeypatch.setattr(train_mod.Trainer, "fit", spy)
    fit_method("edst_ensemble", digits, epochs=5, lr=0.05, options=EDST_DIGITS)
    assert calls == {"explore": None, "window0": "explore", "window1": "window0", "window2": "window1"}
