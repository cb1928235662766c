"""MIMO (methods/mimo.py, specs/mimo.md): the slot batches (rho, batch repetition), the summed loss, test-time
tiling, the b x training cost in the record, real data."""
import json
import math

import pytest
import torch
from torch import nn

import ensemble_bench.methods as methods
from ensemble_bench.config import build_options
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import build_for_cost
from conftest import ensemble_vs_members, fit_method, half_resolution
from ensemble_bench.methods.mimo import SlotBatches, SlotInputs, mimo_loss


def id_batch(n, c=2):
    """n examples whose pixels all equal their index (so a slot's image says which example it holds) and
    labels that are a fixed function of the index."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, c, 3, 3).contiguous()
    return x, (torch.arange(n) * 7) % 10


def slot_ids(xs, m, c=2):
    """[M, rows] example index held by every slot of every row (checks every pixel of the slot agrees)."""
    slots = xs.view(xs.shape[0], m, c, 3, 3)
    ids = slots[:, :, 0, 0, 0]
    assert torch.equal(slots, ids.view(*ids.shape, 1, 1, 1).expand_as(slots))
    return ids.T.long()


def agreement(ids):
    """Fraction of rows where slot j holds the same example as slot 0, for every j >= 1."""
    return [(ids[j] == ids[0]).float().mean().item() for j in range(1, ids.shape[0])]


# ------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("m,b", [(3, 4), (2, 1), (4, 2)])
def test_every_example_appears_b_times_in_every_slot_with_its_label(m, b):
    n = 96
    sb = SlotBatches(m, b, 0.0, seed=0)
    x, y = id_batch(n)
    xs, ys = sb(x, y)
    assert xs.shape == (n * b, m * 2, 3, 3) and ys.shape == (m, n * b)
    ids = slot_ids(xs, m)
    for k in range(m):
        assert torch.equal(torch.bincount(ids[k], minlength=n), torch.full((n,), b))
        assert torch.equal(ys[k], y[ids[k]])            # each slot's targets are its own examples' labels


def test_rho_0_slots_hold_independent_examples():
    """rho = 0 (the CIFAR setting): two slots agree only by chance, about 1/B of the rows."""
    n, b, m = 128, 4, 3
    sb = SlotBatches(m, b, 0.0, seed=1)
    agree = []
    for _ in range(20):
        agree += agreement(slot_ids(sb(*id_batch(n))[0], m))
    chance = 1.0 / n
    assert sum(agree) / len(agree) == pytest.approx(chance, abs=0.006)
    assert max(agree) < 0.05
    # and the slots are not a fixed pairing either: slot 1's partner of an example changes between steps
    a, c = slot_ids(sb(*id_batch(n))[0], m), slot_ids(sb(*id_batch(n))[0], m)
    assert not torch.equal(a, c)


def test_rho_1_every_slot_sees_the_same_example():
    sb = SlotBatches(3, 4, 1.0, seed=2)
    ids = slot_ids(sb(*id_batch(64))[0], 3)
    assert agreement(ids) == [1.0, 1.0]


@pytest.mark.parametrize("rho", [0.25, 0.6])
def test_rho_is_the_fraction_of_rows_with_a_shared_input(rho):
    n, b, m = 100, 4, 3
    sb = SlotBatches(m, b, rho, seed=3)
    agree = []
    for _ in range(10):
        ids = slot_ids(sb(*id_batch(n))[0], m)
        agree += agreement(ids)
        for k in range(m):
            assert torch.equal(torch.bincount(ids[k], minlength=n), torch.full((n,), b))
    expected = rho + (1 - rho) / n
    assert sum(agree) / len(agree) == pytest.approx(expected, abs=0.03)


def test_slot_batches_are_reproducible_and_resumable():
    x, y = id_batch(50)
    a = SlotBatches(3, 2, 0.0, seed=5)
    a(x, y)
    state = a.state_dict()
    nxt = a(x, y)[0]
    b = SlotBatches(3, 2, 0.0, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b(x, y)[0], nxt)
    assert torch.equal(SlotBatches(3, 2, 0.0, seed=5)(x, y)[0], SlotBatches(3, 2, 0.0, seed=5)(x, y)[0])


# --------------------------------------------------------------------------------- model, loss, options
def mimo_model(backbone="cnn_small", m=3, num_classes=10, in_channels=3, image_size=8):
    return build_for_cost("mimo", backbone, num_classes, in_channels, image_size, {"num_estimators": m},
                          torch.device("cpu"))


def first_conv(model):
    return next(mod for mod in model.modules() if isinstance(mod, nn.Conv2d))


def test_architecture_has_m_input_slots_and_m_heads():
    model = mimo_model(m=3)
    assert first_conv(model).in_channels == 9 and model.net.head.out_features == 30
    single = build_for_cost("single", "cnn_small", 10, 3, 8, {}, torch.device("cpu"))
    extra = count_params(model)["params"] - count_params(single)["params"]
    assert 0 < extra < 0.05 * count_params(single)["params"]     # a wider first conv and head only


@pytest.mark.parametrize("backbone", ["cnn_small", "resnet20", "timm:resnet18"])
def test_at_test_time_every_slot_sees_the_same_image(backbone):
    torch.manual_seed(0)
    model = mimo_model(backbone, m=3, image_size=16).eval()
    seen = []
    handle = first_conv(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    handle.remove()
    assert out.shape == (3, 4, 10)
    slots = seen[0].view(4, 3, 3, 16, 16)
    for k in range(3):
        assert torch.equal(slots[:, k], x)
    # different images in the slots give different member outputs: the slots are really separate inputs
    with torch.no_grad():
        mixed = model.forward_raw(torch.cat([x, x.flip(0), x], dim=1))
    assert not torch.allclose(mixed[1], out[1])


def test_loss_is_the_sum_of_member_cross_entropies_on_own_labels():
    torch.manual_seed(0)
    model = mimo_model(m=3)
    xs = torch.randn(6, 9, 8, 8)
    ys = torch.randint(0, 10, (3, 6))
    logits = model.forward_raw(xs)
    ref = sum(nn.functional.cross_entropy(logits[k], ys[k]) for k in range(3))
    assert mimo_loss(SlotInputs(model), xs, ys).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("opts", [{"rho": -0.1}, {"rho": 1.5}, {"rho": "nan"}, {"num_estimators": 0},
                                  {"batch_repeat": 0}, {"batch_repeat": 2.5}, {"weight_decay": 6e-4}])
def test_bad_options_are_rejected(opts):
    with pytest.raises(UsageError, match="mimo"):
        build_options(methods.get("mimo").Config, opts, "mimo")


def test_defaults():
    d = methods.get("mimo").option_defaults()
    assert d == {"num_estimators": 3, "rho": 0.0, "batch_repeat": 4}   # the optimiser is the recipe's


def test_paper_recipe_is_the_published_one_scaled_to_the_run():
    from ensemble_bench.recipe import Recipe

    run = Recipe(epochs=250)
    paper = methods.get("mimo").effective_recipe(run, "paper", "wrn28_10")
    assert methods.get("mimo").effective_recipe(run, "shared", "wrn28_10") == run
    # the reference's L2 term 3e-4 * sum(w^2) on all weights == SGD weight_decay 6e-4 (gradient 2 * 3e-4 * w)
    assert paper.weight_decay == pytest.approx(2 * 3e-4)
    assert paper.nesterov and paper.schedule == "multistep" and paper.lr_decay == 0.2
    assert paper.milestones == (0.4, 0.8, 0.9) and paper.warmup_epochs == pytest.approx(1.0)
    assert methods.get("mimo").effective_recipe(Recipe(epochs=25), "paper", "x").warmup_epochs == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ training, record
@pytest.mark.parametrize("mode,wd", [("shared", 5e-4), ("paper", 6e-4)])
def test_fit_trains_on_slot_batches_with_the_recipe_weight_decay(digits, monkeypatch, mode, wd):
    from ensemble_bench.train import Trainer

    calls = []
    orig = Trainer.fit

    def spy(self, model, **kw):
        calls.append(kw)
        return orig(self, model, **kw)

    monkeypatch.setattr(Trainer, "fit", spy)
    model, trainer, ctx = fit_method("mimo", digits, epochs=1, recipe=mode,
                                     options={"num_estimators": 2, "batch_repeat": 3})
    assert len(calls) == 1 and trainer.stages["mimo"].recipe["weight_decay"] == wd
    assert isinstance(calls[0]["batch_transform"], SlotBatches) and calls[0]["batch_transform"].rho == 0.0
    st = trainer.stages["mimo"]
    assert st.samples_seen == 3 * len(digits.train)               # b x the unique examples
    assert ctx.info["unique_samples_seen"] == len(digits.train)
    # FLOPs per training row == the deployed forward of one image (the tiling is free)
    x1 = torch.zeros(1, 1, 8, 8)
    assert st.flops_per_sample == pytest.approx(count_flops(model, x1)["flops"], rel=1e-6)
    assert model(x1).shape == (2, 1, 10)


def test_lr_is_the_run_lr_for_the_unique_batch(digits):
    """The lr goes with the unique batch (the spec: 0.1 for 128 unique examples), never x b or x M."""
    _, trainer, _ = fit_method("mimo", digits, epochs=1, schedule="constant", lr=0.07,
                               options={"num_estimators": 3, "batch_repeat": 4})
    st = trainer.stages["mimo"]
    assert [h["lr"] for h in st.history] == [0.07]
    assert st.steps == -(-len(digits.train) // 128)                 # one step per unique batch of 128


def test_cli_run_writes_a_complete_record_with_the_b_x_cost(tmp_path, capsys):
    from ensemble_bench.cli import main

    out = tmp_path / "runs"
    code = main(["run", "--method", "mimo", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2",
                 "--no-progress", "--device", "cpu", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0
    rid = json.loads(stdout)["run_id"]
    rec = json.loads((out / f"{rid}.json").read_text())
    assert rec["status"] == "complete"
    assert rec["method"]["num_members"] == 3 and rec["method"]["combine"] == "probs"
    assert rec["config"]["options"] == {"num_estimators": 3, "rho": 0.0, "batch_repeat": 4}
    assert rec["config"]["effective_recipe"]["weight_decay"] == 5e-4          # the shared recipe
    for k in ("acc", "nll", "ece", "brier", "disagreement"):
        assert math.isfinite(rec["metrics"][k]), k
    tr = rec["training"]
    n_train = rec["data"]["n_train"]
    assert tr["epochs_run"] == {"mimo": 2}
    assert tr["samples_seen"] == 2 * 4 * n_train                  # b = 4 rows per unique example
    assert rec["method"]["info"]["unique_samples_seen"] == 2 * n_train
    assert tr["train_flops"] == pytest.approx(3 * rec["cost"]["flops"] * 2 * 4 * n_train, rel=0.01)
    p = count_params(mimo_model(in_channels=1))["params"]
    assert rec["cost"]["params"] == p


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_real_data_ensemble_beats_its_members_and_rho_1_does_not(cifar10_small):
    """MIMO (M=2, b=2) on real CIFAR-10 (3,000 training images at 16x16, 4 epochs). With independent slots
    (rho=0) the members differ and the ensemble beats them; the same budget with rho=1 (every slot the same
    image: multi-head training, the spec's 'inverted rho' trap) gives near-identical members."""
    data = half_resolution(cifar10_small)
    gaps = {}
    for rho in (0.0, 1.0):
        model, trainer, _ = fit_method("mimo", data, epochs=4, batch_size=64,
                                       options={"num_estimators": 2, "batch_repeat": 2, "rho": rho})
        ens, mean_member, acc = ensemble_vs_members(model, trainer)
        print(f"mimo rho={rho} cifar10_small 16x16: ensemble NLL {ens:.4f}, mean member NLL {mean_member:.4f}, "
              f"acc {acc:.4f}")
        gaps[rho] = mean_member - ens
        assert acc > 0.25
    assert gaps[0.0] > 0.008
    assert gaps[1.0] < 0.004 and gaps[0.0] > 3 * gaps[1.0]
