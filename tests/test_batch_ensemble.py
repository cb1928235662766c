"""BatchEnsemble (methods/batch_ensemble.py): members differ only by their rank-1 factors, the member weight is
W o (s r^T), the parameter count, the released initialisation, the fast-weight learning rate and weight
decay, training on digits."""
import json
import math

import pytest
import torch
from torch import nn

import ensemble_bench.methods as methods
from ensemble_bench.api import FitContext
from ensemble_bench.backbones import build_backbone
from ensemble_bench.config import RunConfig, build_options
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import build_for_cost
from conftest import fit_method, subsample
from ensemble_bench.methods.batch_ensemble import BatchEnsembleConv2d, be_layers, init_fast_weights, parameter_groups

BE = methods.get("batch_ensemble")


def build(backbone="cnn_small", seed=0, in_channels=3, **options):
    ctx = FitContext(config=RunConfig(method="batch_ensemble", backbone=backbone, seed=seed), num_classes=10,
                     in_channels=in_channels, image_size=8, device=torch.device("cpu"))
    return BE(BE.Config(**options)).build(ctx).eval(), ctx


def test_defaults_are_the_released_ones_and_bad_options_are_refused():
    assert BE.option_defaults() == {"num_members": 4, "random_sign_init": -0.5, "fast_weight_lr_multiplier": 0.5}
    for bad in ({"num_members": 0}, {"num_members": 1.5}, {"random_sign_init": 1.5}, {"random_sign_init": "nan"},
                {"fast_weight_lr_multiplier": 0}, {"fast_weight_lr_multiplier": -1.0}):
        with pytest.raises(UsageError, match="batch_ensemble"):
            build_options(BE.Config, bad, "batch_ensemble")


def test_timm_backbone_is_a_one_line_usage_error():
    with pytest.raises(UsageError, match="batch_ensemble .*timm model.*resnet18") as e:
        build_for_cost("batch_ensemble", "timm:resnet18", 10, 3, 32, {}, torch.device("cpu"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backbone", ["cnn_small", "resnet20", "wrn10_2"])
def test_members_differ_only_by_their_rank1_factors(backbone):
    model, _ = build(backbone)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 3, 10)
        assert (out[0] - out[1]).abs().max() > 1e-4            # the random fast weights make them differ
        for _, layer in be_layers(model.net):
            layer.r.fill_(1.0)
            layer.s.fill_(1.0)
        same = model(x)
    for k in range(1, 4):
        torch.testing.assert_close(same[k], same[0], rtol=0, atol=1e-6)
    # the shared weights are ONE tensor per layer, of the plain layer's shape
    plain = build_backbone(backbone, 10, 3)
    shapes = [m.weight.shape for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [(layer.conv if isinstance(layer, BatchEnsembleConv2d) else layer.linear).weight.shape
            for _, layer in be_layers(model.net)] == shapes
    assert all(layer.r.shape[0] == 4 and layer.s.shape[0] == 4 for _, layer in be_layers(model.net))


def test_with_unit_fast_weights_the_network_is_the_single_model_of_the_seed():
    """The slow weights are drawn exactly as the single model's initialisation (same seed, same draws)."""
    model, ctx = build("resnet20", seed=3)
    single = methods.get("single")(None).build(ctx).members[0].eval()
    with torch.no_grad():
        for _, layer in be_layers(model.net):
            layer.r.fill_(1.0)
            layer.s.fill_(1.0)
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(model(x)[2], single(x) - single.head.bias, rtol=1e-5, atol=1e-5)


def test_member_k_is_the_plain_network_with_weights_w_times_s_r_transposed():
    """Member k's logits equal the plain backbone whose every conv/linear weight is W o (s_k r_k^T) and whose
    head bias is member k's bias (batch norm shared)."""
    torch.manual_seed(0)
    model, _ = build("resnet20")
    with torch.no_grad():
        for _, layer in be_layers(model.net):
            if layer.bias is not None:
                layer.bias.normal_()
        for m in model.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(3, 3, 8, 8)
        out = model(x)
        for k in range(4):
            plain = build_backbone("resnet20", 10, 3).eval()
            be_state = model.net.state_dict()
            st = {}
            for name, mod in plain.named_modules():
                if isinstance(mod, nn.Conv2d):
                    w = be_state[f"{name}.conv.weight"]
                    r, s = be_state[f"{name}.r"][k], be_state[f"{name}.s"][k]
                    st[f"{name}.weight"] = w * s.view(-1, 1, 1, 1) * r.view(1, -1, 1, 1)
                elif isinstance(mod, nn.Linear):
                    w = be_state[f"{name}.linear.weight"]
                    r, s = be_state[f"{name}.r"][k], be_state[f"{name}.s"][k]
                    st[f"{name}.weight"] = w * s.view(-1, 1) * r.view(1, -1)
                    st[f"{name}.bias"] = be_state[f"{name}.bias"][k]
                elif isinstance(mod, nn.BatchNorm2d):
                    for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                        st[f"{name}.{b}"] = be_state[f"{name}.{b}"]
            plain.load_state_dict(st)
            torch.testing.assert_close(out[k], plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["cnn_small", "resnet20", "resnet18"])
def test_parameter_count_against_an_independent_count(backbone):
    """shared weights (the plain network without its head bias) + M*(in+out) per conv/linear + per-member
    biases (the head's: M*C)."""
    m = 4
    plain = build_backbone(backbone, 10, 3)
    expected = count_params(plain)["params"] - plain.head.bias.numel()
    for mod in plain.modules():
        if isinstance(mod, nn.Conv2d):
            expected += m * (mod.in_channels + mod.out_channels)
        elif isinstance(mod, nn.Linear):
            expected += m * (mod.in_features + mod.out_features) + m * mod.out_features
    model = build_for_cost("batch_ensemble", backbone, 10, 3, 8, {}, torch.device("cpu"))
    assert count_params(model)["params"] == expected
    g = parameter_groups(model.net)
    assert sum(p.numel() for p in g["member_biases"]) == m * 10
    x = torch.randn(1, 3, 8, 8)
    assert count_flops(model, x)["flops"] == pytest.approx(m * count_flops(plain.eval(), x)["flops"], rel=1e-6)


def test_fast_weight_initialisation_follows_random_sign_init():
    model, _ = build("resnet20")                                # default -0.5: N(1, 0.5^2)
    vals = torch.cat([torch.cat([l.r.flatten(), l.s.flatten()]) for _, l in be_layers(model.net)])
    assert vals.numel() > 5000
    assert vals.mean().item() == pytest.approx(1.0, abs=0.03) and vals.std().item() == pytest.approx(0.5, abs=0.03)
    assert all(float(l.bias.detach().abs().max()) == 0.0 for _, l in be_layers(model.net) if l.bias is not None)
    signs, _ = build("resnet20", random_sign_init=0.75)         # > 0: +1 with probability 0.75, else -1
    vals = torch.cat([torch.cat([l.r.flatten(), l.s.flatten()]) for _, l in be_layers(signs.net)])
    assert set(vals.unique().tolist()) == {-1.0, 1.0}
    assert (vals == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    ones, _ = build("resnet20", random_sign_init=0.0)
    assert all(bool((l.r == 1).all() and (l.s == 1).all()) for _, l in be_layers(ones.net))
    again, _ = build("resnet20")
    init_fast_weights(again.net, -0.5, 123)                       # its own generator: reproducible
    other, _ = build("resnet20")
    init_fast_weights(other.net, -0.5, 123)
    assert all(torch.equal(a.r, b.r) for (_, a), (_, b) in zip(be_layers(again.net), be_layers(other.net)))


def test_training_on_digits_lr_scale_weight_decay_and_batch(digits, monkeypatch):
    bundle = subsample(digits, 400, 300)
    seen = []
    orig = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append({g.get("name"): (g["lr"], g["weight_decay"]) for g in self.param_groups})
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    model, trainer, ctx = fit_method("batch_ensemble", bundle, epochs=3, schedule="constant", lr=0.1)
    st = trainer.stages["batch_ensemble"]
    assert st.steps == 3 * math.ceil(400 / 128) == len(seen)    # the single model's steps per epoch
    assert st.samples_seen == 3 * 400                            # unique images; each step runs 4 x 128 rows
    assert seen[0] == {"slow": (0.1, 5e-4), "fast_weights": (0.05, 0.0), "member_biases": (0.05, 5e-4)}
    groups = st.recipe["param_groups"]
    assert [g["name"] for g in groups] == ["slow", "fast_weights", "member_biases"]
    assert groups[1] == {"name": "fast_weights", "lr_scale": 0.5, "weight_decay": 0.0}
    assert ctx.info["rows_per_step"] == 4 * 128 and ctx.info["batch_ensemble_layers"] == 5
    json.dumps(ctx.info)
    logits = trainer.predict(model, bundle.test.x)
    y = bundle.test.y.cpu()
    acc = (logits.softmax(-1).mean(0).argmax(-1) == y).float().mean().item()
    losses = [h["loss"] for h in st.history]
    assert losses[0] > losses[1] > losses[2] and acc > 0.4, (losses, acc)     # chance: 0.1
    assert (logits[0].argmax(-1) != logits[1].argmax(-1)).any() or (logits[0] - logits[1]).abs().max() > 1e-3


def test_paper_recipe_is_the_released_script_scaled_to_the_run():
    from ensemble_bench.recipe import Recipe

    r = BE.paper_recipe(Recipe(epochs=250, batch_size=128), "wrn28_10")
    assert (r.lr, r.momentum, r.nesterov, r.weight_decay) == (0.1, 0.9, True, 6e-4)
    assert (r.schedule, r.milestones, r.lr_decay, r.warmup_epochs) == ("multistep", (0.4, 0.8, 0.9), 0.2, 1.0)
    assert BE.paper_recipe(Recipe(epochs=50, batch_size=64), "resnet18").lr == pytest.approx(0.05)


def test_cli_cost_and_list(capsys):
    from ensemble_bench.cli import main

    assert main(["cost", "--method", "batch_ensemble", "--backbone", "resnet20", "--num-classes", "10"]) == 0
    res = json.loads(capsys.readouterr()[0])
    plain = build_backbone("resnet20", 10, 3).eval()
    assert res["num_members"] == 4
    assert res["flops"] == pytest.approx(4 * count_flops(plain, torch.randn(1, 3, 32, 32))["flops"], rel=1e-6)
    assert main(["list"]) == 0
    listed = capsys.readouterr()[0]
    assert "batch_ensemble  num_members=4, random_sign_init=-0.5, fast_weight_lr_multiplier=0.5" in listed
