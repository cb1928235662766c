"""Packed-Ensembles (methods/packed.py, specs/packed_ensembles.md): the published parameter and MAC counts,
member independence inside the grouped network, the loss and learning rate, the record, real data."""
import json
import math

import pytest
import torch
from torch import nn

import ensemble_bench.methods as methods
from ensemble_bench.backbones import build_backbone
from ensemble_bench.config import build_options
from ensemble_bench.cost import count_flops, count_params
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import build_for_cost
from conftest import ensemble_vs_members, fit_method, half_resolution
from ensemble_bench.methods.packed import PackedEnsembles, packed_loss


def pe(backbone, alpha, m, gamma, num_classes=10, in_channels=3, image_size=32, **extra):
    return build_for_cost("packed", backbone, num_classes, in_channels, image_size,
                          {"alpha": alpha, "num_estimators": m, "gamma": gamma, **extra}, torch.device("cpu"))


def params_and_macs(model, in_channels=3, image_size=32):
    x = torch.randn(1, in_channels, image_size, image_size)
    return count_params(model)["params"], count_flops(model, x)["macs_dense"]


# ----------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("backbone,cfg,params_m,macs_g", [
    ("resnet18", (2, 4, 1), 11.19, 0.557),
    ("resnet18", (2, 4, 2), 8.18, 0.481),
    ("resnet50", (2, 4, 2), 14.55, 1.004),
])
def test_published_parameter_and_mac_counts(backbone, cfg, params_m, macs_g):
    """specs/packed_ensembles.md sanity table (CIFAR-10, whole ensemble, one image)."""
    p, macs = params_and_macs(pe(backbone, *cfg))
    assert p / 1e6 == pytest.approx(params_m, rel=5e-3), p
    assert macs / 1e9 == pytest.approx(macs_g, rel=5e-3), macs


def test_pe_111_is_the_plain_backbone():
    plain = build_backbone("resnet18", 10, 3)
    p0, m0 = params_and_macs(plain)
    p1, m1 = params_and_macs(pe("resnet18", 1, 1, 1))
    assert (p1, m1) == (p0, m0)
    assert p0 / 1e6 == pytest.approx(11.17, rel=5e-3) and m0 / 1e9 == pytest.approx(0.555, rel=5e-3)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet20", "cnn_small"])
def test_pe_111_computes_the_plain_backbone(backbone):
    """Not only the counts: PE-(1,1,1) with the plain network's weights gives the plain network's logits."""
    plain = build_backbone(backbone, 10, 3).eval()
    packed = pe(backbone, 1, 1, 1).eval()
    ps, qs = plain.state_dict(), packed.state_dict()
    assert [v.numel() for v in ps.values()] == [v.numel() for v in qs.values()]   # the head: a 1x1 grouped conv
    packed.load_state_dict({k: v.reshape(q.shape) for (k, q), v in zip(qs.items(), ps.values())})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed(x)[0], plain(x))


def test_64_channel_rule_is_applied_and_recorded():
    """PE-(2,4,2) ResNet-18: each of 4*2 = 8 groups needs >= 64 input channels, so gamma drops to 1 for the
    convs reading the first two stages' 128 / 256 widened channels and stays 2 where they read 512 or 1024;
    without the rule the count differs."""
    from ensemble_bench.api import FitContext
    from ensemble_bench.config import RunConfig

    ctx = FitContext(config=RunConfig(method="packed", backbone="resnet18"), num_classes=10, in_channels=3,
                     image_size=32, device=torch.device("cpu"))
    model = PackedEnsembles(PackedEnsembles.Config(alpha=2, num_estimators=4, gamma=2)).build(ctx)
    table = ctx.info["effective_gamma"]
    modules = dict(model.net.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert [r["layer"] for r in table] == convs       # every conv, named, in module order
    for r in table:
        conv = modules[r["layer"]]
        assert conv.groups == r["groups"] and conv.in_channels == r["in"] and conv.out_channels == r["out"]
        if r["role"] == "stem":
            assert r["groups"] == 1
        elif r["role"] == "block_in":
            assert r["gamma"] == 1 and r["groups"] == 4
        else:   # hidden and shortcut convs: 8 groups only where each gets >= 64 input channels
            assert r["gamma"] == (2 if r["in"] // 8 >= 64 else 1), r
    hidden = [r for r in table if r["role"] in ("hidden", "shortcut")]
    lowered = [r["layer"] for r in hidden if r["in"] < 512]
    assert ctx.info["gamma_lowered_layers"] == lowered
    assert any(n.startswith("stages.0.") for n in lowered) and len(lowered) < len(hidden)
    json.dumps(ctx.info)                               # goes into the record as is
    p_rule, _ = params_and_macs(model)
    p_norule, _ = params_and_macs(pe("resnet18", 2, 4, 2, min_group_channels=0))
    assert abs(p_norule / 1e6 - 8.18) > 0.005 * 8.18   # forgetting the rule misses the published count


def test_other_suite_backbones_build_with_member_logits():
    x = torch.randn(2, 3, 16, 16)
    for name in ("resnet20", "resnet32x2", "wrn16_2", "cnn_small"):
        model = pe(name, 2, 3, 2, image_size=16)
        assert model(x).shape == (3, 2, 10), name
        assert model.num_members == 3


def test_cli_cost_and_list(capsys):
    from ensemble_bench.cli import main

    assert main(["cost", "--method", "packed", "--backbone", "resnet18", "--num-classes", "10"]) == 0
    res = json.loads(capsys.readouterr()[0])
    assert res["num_members"] == 4 and res["params"] / 1e6 == pytest.approx(11.19, rel=5e-3)
    assert res["macs_dense"] / 1e9 == pytest.approx(0.557, rel=5e-3)
    assert main(["list"]) == 0
    out = capsys.readouterr()[0]
    assert "packed          alpha=2.0, num_estimators=4, gamma=1" in out
    assert "mimo            num_estimators=3, rho=0.0, batch_repeat=4" in out


def test_timm_backbone_is_a_clear_usage_error():
    with pytest.raises(UsageError, match="packed needs a staged backbone.*resnet18.*cnn_small"):
        pe("timm:resnet18", 2, 4, 1)


@pytest.mark.parametrize("opts", [{"alpha": 0}, {"alpha": -1.0}, {"alpha": "nan"}, {"num_estimators": 0},
                                  {"gamma": 0}, {"num_estimators": 1.5}, {"min_group_channels": -1}])
def test_bad_options_are_rejected(opts):
    with pytest.raises(UsageError, match="packed"):
        build_options(methods.get("packed").Config, opts, "packed")


def test_defaults_are_the_reference_ones():
    assert methods.get("packed").option_defaults() == {"alpha": 2.0, "num_estimators": 4, "gamma": 1,
                                                       "min_group_channels": 64}


# ------------------------------------------------------------------------------------ independence
def member_rows(t: torch.Tensor, k: int, m: int) -> slice:
    n = t.shape[0] // m
    return slice(k * n, (k + 1) * n)


def independence_violations(model, x, m):
    """Perturb member k's slice of every parameter and buffer: only member k's logits may move; the gradient
    of member k's loss may touch only member k's slices. Returns a list of violations (empty = independent)."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dim() > 0 and t.shape[0] % m:
            bad.append(f"{name}: {t.shape[0]} rows do not split into {m} members")
    model.eval()
    with torch.no_grad():
        base = model(x)
    for k in range(m):
        orig = {n: t.detach().clone() for n, t in model.state_dict().items()}
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for n, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and t.dim() > 0:
                    s = member_rows(t, k, m)
                    if n.endswith("running_var"):
                        t[s] *= 2.0
                    else:
                        t[s] += 0.5 * torch.randn(t[s].shape, generator=gen) * (t[s].abs().mean() + 0.1)
            out = model(x)
        model.load_state_dict(orig)
        for j in range(m):
            moved = (out[j] - base[j]).abs().max().item()
            if j != k and moved > 1e-5:
                bad.append(f"perturbing member {k} moved member {j}'s logits by {moved:.3g}")
            if j == k and moved < 1e-3:
                bad.append(f"perturbing member {k} did not move its own logits")
    model.train()
    y = torch.randint(0, out.shape[-1], (x.shape[0],))
    for k in range(m):
        model.zero_grad()
        nn.functional.cross_entropy(model(x)[k], y).backward()
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            s = member_rows(p, k, m)
            outside = p.grad.clone()
            outside[s] = 0
            if outside.abs().max().item() != 0.0:
                bad.append(f"member {k}'s loss has a gradient on {n} outside its slice")
            if p.grad[s].abs().max().item() == 0.0:
                bad.append(f"member {k}'s loss has no gradient on its slice of {n}")
    return bad


@pytest.mark.parametrize("backbone,cfg", [("cnn_small", (2, 4, 1)), ("resnet20", (2, 2, 2)), ("wrn10_2", (2, 2, 2))])
def test_members_are_independent(backbone, cfg):
    torch.manual_seed(0)
    # min_group_channels=0 keeps gamma sub-groups in these small nets, so sub-groups are exercised too
    model = pe(backbone, *cfg, image_size=8, min_group_channels=0)
    if cfg[2] > 1:   # gamma sub-groups are really there
        assert any(c.groups == cfg[1] * cfg[2] for c in model.modules() if isinstance(c, nn.Conv2d))
    bad = independence_violations(model, torch.randn(6, 3, 8, 8), cfg[1])
    assert not bad, bad[:5]


def test_independence_check_catches_a_shared_layer():
    """Control: the same check flags a packed network whose head is shared (a dense layer over all
    members' features) -- the 'shared trunk' trap of the spec."""
    torch.manual_seed(0)
    model = pe("cnn_small", 2, 4, 1, image_size=8)
    feats = model.net.head.in_features
    model.net.head = nn.Linear(feats, 4 * 10)
    bad = independence_violations(model, torch.randn(6, 3, 8, 8), 4)
    assert any("moved member" in b for b in bad) and any("outside its slice" in b for b in bad)


# ------------------------------------------------------------------------------------ loss, training
def test_loss_is_one_cross_entropy_over_all_member_outputs():
    torch.manual_seed(0)
    model = pe("cnn_small", 2, 4, 1, image_size=8)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 10, (5,))
    logits = model(x)                                       # [M, B, C]
    ref = nn.functional.cross_entropy(logits.reshape(4 * 5, 10), y.repeat(4))   # targets repeated per member
    assert packed_loss(model, x, y).item() == pytest.approx(ref.item(), rel=1e-6)
    summed = sum(nn.functional.cross_entropy(logits[k], y) for k in range(4))
    assert packed_loss(model, x, y).item() == pytest.approx(summed.item() / 4, rel=1e-6)


def test_fit_uses_the_single_model_lr_and_records_gamma(digits):
    model, trainer, ctx = fit_method("packed", digits, epochs=1, schedule="constant", lr=0.07,
                                     options={"gamma": 2, "num_estimators": 2})
    assert [h["lr"] for h in trainer.stages["packed"].history] == [0.07]     # not x M
    assert trainer.stages["packed"].samples_seen == len(digits.train)
    assert model(digits.test.x[:3].float()).shape == (2, 3, 10)
    assert ctx.info["effective_gamma"] and ctx.info["effective_gamma"][0]["layer"] == "stem.0"
    # cnn_small has only a stem and block-input convs: no gamma sub-groups anywhere
    assert all(r["gamma"] in (None, 1) for r in ctx.info["effective_gamma"])


def test_cli_run_writes_a_complete_record(tmp_path, capsys):
    from ensemble_bench.cli import main

    out = tmp_path / "runs"
    code = main(["run", "--method", "packed", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2",
                 "--no-progress", "--device", "cpu", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0
    rid = json.loads(stdout)["run_id"]
    rec = json.loads((out / f"{rid}.json").read_text())
    assert rec["status"] == "complete"
    assert rec["method"]["num_members"] == 4 and rec["method"]["combine"] == "probs"
    assert rec["config"]["options"] == {"alpha": 2.0, "num_estimators": 4, "gamma": 1, "min_group_channels": 64}
    for k in ("acc", "nll", "ece", "brier", "disagreement"):
        assert math.isfinite(rec["metrics"][k]), k
    assert rec["metrics"]["acc"] > 0.3
    built = pe("cnn_small", 2, 4, 1, in_channels=1, image_size=8)
    p, macs = params_and_macs(built, 1, 8)
    assert rec["cost"]["params"] == p and rec["cost"]["macs_dense"] == pytest.approx(macs)
    info = rec["method"]["info"]
    assert len(info["effective_gamma"]) == 4 and {r["role"] for r in info["effective_gamma"]} == {"stem", "block_in"}
    tr = rec["training"]
    assert tr["epochs_run"] == {"packed": 2} and tr["samples_seen"] == 2 * rec["data"]["n_train"]
    assert tr["train_flops"] == pytest.approx(3 * rec["cost"]["flops"] * tr["samples_seen"], rel=0.01)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_real_data_ensemble_beats_its_members(cifar10_small):
    """PE-(2,4,1) on real CIFAR-10 (3,000 training images at 16x16, 5 epochs). Identical members would give
    ensemble NLL == mean member NLL; independent members give a clear gap (measured ~0.015)."""
    model, trainer, _ = fit_method("packed", half_resolution(cifar10_small), epochs=5, batch_size=64)
    ens, mean_member, acc = ensemble_vs_members(model, trainer)
    print(f"packed cifar10_small 16x16: ensemble NLL {ens:.4f}, mean member NLL {mean_member:.4f}, acc {acc:.4f}")
    assert ens < mean_member - 0.008
    assert acc > 0.3
