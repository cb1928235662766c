"""MC dropout (methods/mc_dropout.py): where the dropout goes, M seeded test-time passes (reproducible, passes
differ, another seed differs, chunking does not matter), batch norm in eval mode, cost of M passes, training
on digits."""
import json

import pytest
import torch

import ensemble_bench.methods as methods
from ensemble_bench.api import FitContext
from ensemble_bench.backbones import build_backbone
from ensemble_bench.config import RunConfig, build_options
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import build_for_cost
from conftest import fit_method, subsample
from ensemble_bench.methods.mc_dropout import InputDropoutConv2d, MCDropout

MC = methods.get("mc_dropout")


def build(backbone="cnn_small", seed=0, **options):
    ctx = FitContext(config=RunConfig(method="mc_dropout", backbone=backbone, seed=seed), num_classes=10,
                     in_channels=3, image_size=8, device=torch.device("cpu"))
    return MC(MC.Config(**options)).build(ctx).eval(), ctx


def test_defaults_are_the_reference_ones_and_bad_options_are_refused():
    assert MC.option_defaults() == {"dropout_rate": 0.1, "num_estimators": 30}
    for bad in ({"dropout_rate": 1.0}, {"dropout_rate": -0.1}, {"dropout_rate": "nan"}, {"num_estimators": 0},
                {"num_estimators": 2.5}):
        with pytest.raises(UsageError, match="mc_dropout"):
            build_options(MC.Config, bad, "mc_dropout")
    with pytest.raises(UsageError, match="mc_dropout .*timm"):
        build_for_cost("mc_dropout", "timm:resnet18", 10, 3, 32, {}, torch.device("cpu"))


@pytest.mark.parametrize("backbone,where", [
    ("resnet20", ["stages.0.0.conv2", "stages.0.1.conv2", "stages.0.2.conv2", "stages.1.0.conv2"]),
    ("resnet50", ["stages.0.0.conv3", "stages.0.1.conv3", "stages.0.2.conv3", "stages.1.0.conv3"]),
    ("wrn16_2", ["stages.0.0.dropout", "stages.0.1.dropout", "stages.1.0.dropout", "stages.1.1.dropout"]),
    ("cnn_small", ["stages.0.0.conv", "stages.1.0.conv", "stages.2.0.conv"]),
])
def test_one_dropout_per_block_on_the_residual_branch_and_no_new_parameter(backbone, where):
    model, ctx = build(backbone)
    names = ctx.info["dropout_layers"]
    assert names[:len(where)] == where and len(names) == model.net.num_blocks
    mods = dict(model.net.named_modules())
    for n in names:
        assert isinstance(mods[n], (MCDropout, InputDropoutConv2d)), n
        assert "shortcut" not in n
    drops = [m for m in model.net.modules() if isinstance(m, MCDropout)]
    assert len(drops) == len(names) and all(d.p == 0.1 for d in drops)
    plain = build_backbone(backbone, 10, 3)
    assert list(model.net.state_dict()) == list(plain.state_dict())            # same names: nothing added
    assert count_params(model)["params"] == count_params(plain)["params"]
    json.dumps(ctx.info)


def test_the_network_is_the_single_model_and_dropout_acts_only_in_training_or_the_passes():
    model, ctx = build("resnet20", seed=2, num_estimators=3)
    single = methods.get("single")(None).build(ctx).members[0].eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), single(x))          # eval, outside the passes: deterministic
        model.net.train()
        assert not torch.allclose(model.net(x), model.net(x))        # training: dropout on
        model.net.eval()


def test_passes_differ_same_seed_same_output_other_seed_other_output():
    model, ctx = build("resnet20", num_estimators=5)
    assert ctx.info["mask_seed"] == model.mask_seed and ctx.info["num_passes"] == 5
    x = torch.randn(6, 3, 8, 8)
    bn = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        a = model(x)
        torch.manual_seed(1234)                                        # the global RNG plays no part
        b = model(x)
    assert a.shape == (5, 6, 10)
    assert torch.equal(a, b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn.items())   # batch norm: eval, untouched
    for i in range(5):
        for j in range(i):
            assert (a[i] - a[j]).abs().max() > 1e-4, (i, j)
    assert (a[:, 0] - a[:, 1]).abs().max() > 1e-4                      # rows get their own masks
    with torch.no_grad():
        deterministic = model.net(x)
    assert (a - deterministic).abs().max() > 1e-4
    model.rows_per_chunk = 6                                           # one pass per chunk: same output
    with torch.no_grad():
        assert torch.equal(model(x), a)
    model.mask_seed += 1
    with torch.no_grad():
        c = model(x)
    assert (c - a).abs().max() > 1e-4
    again, _ = build("resnet20", num_estimators=5)                     # rebuilt from the same run seed
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), a, rtol=0, atol=0)
    other, _ = build("resnet20", seed=1, num_estimators=5)
    assert other.mask_seed != again.mask_seed


def test_rate_zero_passes_are_the_deterministic_network():
    model, _ = build("cnn_small", dropout_rate=0.0, num_estimators=3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, det = model(x), model.net(x)
    for k in range(3):                       # (a batch of 3 x 2 rows: equal up to float summation order)
        torch.testing.assert_close(out[k], det, rtol=1e-5, atol=1e-6)


def test_cost_is_m_passes(capsys):
    from ensemble_bench.cli import main

    plain = build_backbone("resnet20", 10, 3).eval()
    single = count_flops(plain, torch.randn(1, 3, 32, 32))["flops"]
    assert main(["cost", "--method", "mc_dropout", "--backbone", "resnet20", "--num-classes", "10",
                 "--set", "num_estimators=7"]) == 0
    res = json.loads(capsys.readouterr()[0])
    assert res["num_members"] == 7 and res["flops"] == pytest.approx(7 * single, rel=1e-6)
    assert res["params"] == count_params(plain)["params"]


def test_training_on_digits_and_rate_zero_is_the_single_model(digits):
    bundle = subsample(digits, 800, 300)
    model, trainer, ctx = fit_method("mc_dropout", bundle, epochs=3, lr=0.1, schedule="constant",
                                     options={"num_estimators": 8})
    st = trainer.stages["mc_dropout"]
    assert st.samples_seen == 3 * 800 and st.flops_per_sample is not None
    losses = [h["loss"] for h in st.history]
    logits = trainer.predict(model, bundle.test.x)
    assert logits.shape == (8, 300, 10)
    acc = (logits.softmax(-1).mean(0).argmax(-1) == bundle.test.y).float().mean().item()
    assert losses[0] > losses[-1] and acc > 0.5, (losses, acc)
    assert torch.equal(trainer.predict(model, bundle.test.x), logits)       # reproducible predictions
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    assert ctx.info["mask_seed"] == model.mask_seed
    # dropout 0: the same training as the single model (same init, same data order)
    small = subsample(digits, 300, 100)
    zero, _, _ = fit_method("mc_dropout", small, epochs=1, options={"dropout_rate": 0.0, "num_estimators": 2})
    single, _, _ = fit_method("single", small, epochs=1)
    for (k, v), w in zip(zero.net.state_dict().items(), single.members[0].state_dict().values()):
        assert torch.equal(v, w), k


def test_paper_recipe_is_the_reference_script_scaled_to_the_run():
    from ensemble_bench.recipe import Recipe

    r = MC.paper_recipe(Recipe(epochs=200, batch_size=128), "wrn28_10")
    assert (r.lr, r.nesterov, r.weight_decay, r.schedule) == (0.05, True, 6e-4, "multistep")
    assert (r.milestones, r.lr_decay, r.warmup_epochs) == ((0.3, 0.6, 0.8), 0.2, 1.0)
