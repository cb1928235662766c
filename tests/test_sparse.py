"""methods/_lib/sparse.py: ERK densities, masks, drop/grow updates, jumps, masks after every step, state."""
import math

import pytest
import torch
from torch import nn

from ensemble_bench.methods._lib.sparse import DynamicSparsity, erk_densities, maskable_layers


def small_net():
    """conv 3->16 3x3 (432 w), conv 16->64 3x3 stride 2 (9216), conv 64->64 3x3 (36864), linear 64->10 (640),
    with biases and a norm that must stay dense."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


SHAPES = {"0": (16, 3, 3, 3), "3": (64, 16, 3, 3), "5": (64, 64, 3, 3), "9": (10, 64)}
NUMEL = {k: math.prod(s) for k, s in SHAPES.items()}


def test_erk_closed_form_when_no_layer_saturates():
    # eps = D * N / sum_l sum(shape_l); density_l = eps * sum(shape_l) / prod(shape_l)
    d = 0.01
    n = sum(NUMEL.values())
    eps = d * n / sum(sum(s) for s in SHAPES.values())
    got = erk_densities(SHAPES, d)
    for k, s in SHAPES.items():
        assert got[k] == pytest.approx(eps * sum(s) / NUMEL[k], rel=1e-12)
        assert got[k] < 1
    assert sum(got[k] * NUMEL[k] for k in SHAPES) == pytest.approx(d * n)


def test_erk_layers_above_one_become_dense_and_eps_is_resolved():
    d = 0.2
    n = sum(NUMEL.values())
    got = erk_densities(SHAPES, d)
    # by hand: the first eps (0.2 * 47152 / 319 = 29.6) puts the first conv (25/432 -> 1.7) and the linear
    # (74/640 -> 3.4) above 1; they become dense and eps is solved again for the two middle convs
    assert got["0"] == 1.0 and got["9"] == 1.0
    eps = (d * n - NUMEL["0"] - NUMEL["9"]) / (sum(SHAPES["3"]) + sum(SHAPES["5"]))
    assert got["3"] == pytest.approx(eps * sum(SHAPES["3"]) / NUMEL["3"], rel=1e-12)
    assert got["5"] == pytest.approx(eps * sum(SHAPES["5"]) / NUMEL["5"], rel=1e-12)
    assert sum(got[k] * NUMEL[k] for k in SHAPES) == pytest.approx(d * n)
    # ERK: the layer with more connections per (in + out) is sparser
    assert got["5"] < got["3"] < 1.0
    assert erk_densities(SHAPES, 1.0) == {k: 1.0 for k in SHAPES}
    with pytest.raises(ValueError):
        erk_densities(SHAPES, 0.0)


def test_masks_cover_every_conv_and_linear_but_no_bias_or_norm():
    from ensemble_bench.backbones import build_backbone

    net = build_backbone("resnet20", 10)          # has 1x1 projection shortcuts
    names = set(maskable_layers(net))
    assert "stem.0" in names and "head" in names
    assert any("shortcut" in k for k in names)
    convs = {k for k, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert names == convs
    sp = DynamicSparsity(net, 0.2, seed=1)
    assert sp.global_density() == pytest.approx(0.2, abs=2e-4)
    for k, w in maskable_layers(net).items():
        assert int((w != 0).sum()) == int(sp.masks[k].sum())          # pruned weights are exactly 0
        assert int(sp.masks[k].sum()) == round(sp.target_density[k] * w.numel())
    for name, mod in net.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert bool((mod.weight != 0).all())
    assert bool((net.head.bias != 0).all())


def test_kept_positions_are_uniformly_random():
    torch.manual_seed(0)
    a = nn.Linear(400, 300)
    b = nn.Linear(400, 300)
    b.load_state_dict(a.state_dict())
    ma = DynamicSparsity(a, 0.1, seed=1).masks[""]
    mb = DynamicSparsity(b, 0.1, seed=2).masks[""]
    assert not torch.equal(ma, mb)
    overlap = (ma & mb).sum().item() / ma.sum().item()
    assert overlap == pytest.approx(0.1, abs=0.02)           # independent random positions
    d = ma.float().mean().item()
    assert ma.float().mean(1).std().item() < 3 * math.sqrt(d * (1 - d) / 400)   # no row structure
    assert ma.float().mean(0).std().item() < 3 * math.sqrt(d * (1 - d) / 300)   # no column structure


def _distinct(shape, gen):
    n = math.prod(shape)
    return ((torch.randperm(n, generator=gen).float() + 1) / n * torch.where(
        torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).view(shape)


def _expected_update(w, g, mask, rate):
    """Independent re-computation with sorting and Python sets."""
    wf, gf, mf = w.flatten().tolist(), g.flatten().tolist(), mask.flatten().tolist()
    active = [i for i, m in enumerate(mf) if m]
    k = math.ceil(rate * len(active))
    dropped = set(sorted(active, key=lambda i: abs(wf[i]))[:k])
    candidates = [i for i in range(len(mf)) if not mf[i] or i in dropped]
    grown = set(sorted(candidates, key=lambda i: -abs(gf[i]))[:k])
    return (set(active) - dropped) | grown, grown, k


@pytest.mark.parametrize("zero_momentum", [True, False])
def test_drop_smallest_grow_largest_gradient_grown_at_zero_with_zero_momentum(zero_momentum):
    """Grown weights start at 0; their momentum is zeroed only with ``zero_momentum`` (the released
    FreeTickets code keeps the buffers: the default)."""
    net = small_net()
    sp = DynamicSparsity(net, 0.3, death_rate=0.5, seed=0, zero_momentum=zero_momentum)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    with sp.attached():
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()                         # creates momentum buffers, masks re-applied
        for name, w in sp.layers.items():  # distinct magnitudes and gradients: no ties
            with torch.no_grad():
                w.copy_(_distinct(w.shape, gen) * sp.masks[name])
            w.grad = _distinct(w.shape, gen)
            opt.state[w]["momentum_buffer"] = torch.randn(w.shape, generator=gen) * sp.masks[name]
        before = {k: (w.detach().clone(), w.grad.clone(), sp.masks[k].clone()) for k, w in sp.layers.items()}
        bufs = {k: opt.state[w]["momentum_buffer"].clone() for k, w in sp.layers.items()}
        counts = sp.active_counts()
        event = sp.update(0.5)
    assert sp.active_counts() == counts
    sparse_layers = [k for k, (_, _, m) in before.items() if not bool(m.all())]
    assert sparse_layers == ["3", "5"] and set(event["per_layer"]) == set(sparse_layers)
    for name, (w0, g0, m0) in before.items():
        w = sp.layers[name].detach()
        if name not in sparse_layers:      # dense layers have nothing to explore
            assert torch.equal(sp.masks[name], m0) and torch.equal(w, w0)
            continue
        want_active, grown, k = _expected_update(w0, g0, m0, 0.5)
        got_active = set(torch.nonzero(sp.masks[name].flatten()).flatten().tolist())
        assert got_active == want_active
        assert k == math.ceil(0.5 * int(m0.sum()))
        wf, w0f = w.flatten().tolist(), w0.flatten().tolist()
        buf = opt.state[sp.layers[name]]["momentum_buffer"].flatten().tolist()
        assert all(wf[i] == 0 for i in grown)                               # grown start at exactly 0
        if zero_momentum:
            assert all(buf[i] == 0 for i in grown)
        else:                                                               # buffers untouched
            assert buf == bufs[name].flatten().tolist()
        kept = want_active - grown
        assert all(wf[i] == w0f[i] for i in kept)                           # survivors untouched
        assert sum(v != 0 for v in wf) == len(kept)                         # dropped are exactly 0
        moved = len(set(torch.nonzero(m0.flatten()).flatten().tolist()) - got_active) / int(m0.sum())
        assert event["per_layer"][name] == pytest.approx(moved)


def _digits_trainer(bundle, **run):
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.train import Trainer

    cfg = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 2,
                           "progress": False, "lr": 0.05, **run})
    return Trainer(bundle, cfg, "cpu", log=lambda s: None), cfg


def test_pruned_weights_zero_after_every_step_and_growth_sees_the_dense_gradient(digits):
    from ensemble_bench.backbones import build_backbone

    trainer, _ = _digits_trainer(digits)
    torch.manual_seed(0)
    net = build_backbone("cnn_small", 10, 1)
    sp = DynamicSparsity(net, 0.2, death_rate=0.5, update_frequency=5, seed=0, zero_momentum=True)
    captured = {}
    for name, w in sp.layers.items():     # the gradient autograd computes, before anything touches it
        w.register_hook(lambda g, name=name: captured.__setitem__(name, g.detach().clone()))

    checked = {"steps": 0, "updates": 0}
    orig_update = sp.update

    def spy_update(rate, kind="update"):
        for name, w in sp.layers.items():
            # the gradient the growth reads is the whole minibatch gradient, pruned positions included
            assert torch.equal(w.grad, captured[name]), name
            if not bool(sp.masks[name].all()):
                assert bool((w.grad[~sp.masks[name]] != 0).any()), name
        checked["updates"] += 1
        return orig_update(rate, kind)

    sp.update = spy_update

    def after(model, step):
        sp.after_step(model, step)
        opt = sp._optimizer
        for name, w in sp.layers.items():
            off = ~sp.masks[name]
            assert bool((w[off] == 0).all()), (name, step)
            buf = opt.state[w].get("momentum_buffer")
            assert buf is not None and bool((buf[off] == 0).all()), (name, step)
            assert int(sp.masks[name].sum()) == round(sp.target_density[name] * w.numel())
        checked["steps"] += 1

    with sp.attached():
        res = trainer.fit(net, stage="s", epochs=2, after_step=after, stateful=[sp])
    assert checked["steps"] == res.steps and checked["updates"] == res.steps // 5 > 0
    assert sp.num_updates("update") == res.steps // 5
    assert sp.summary()["mean_update_changed"] > 0.1        # the topology really moves
    with pytest.raises(RuntimeError, match="attached"):    # outside `attached`, nothing would mask
        sp.after_step(net, 1)


def test_momentum_would_resurrect_pruned_weights_without_the_masks():
    """Control for the test above: without the post-step masks a pruned weight moves off zero."""
    net = small_net()
    sp = DynamicSparsity(net, 0.2, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    off = ~sp.masks["5"]
    assert bool((net[5].weight[off] != 0).any())


def test_global_jump_replaces_about_q_of_every_sparse_layer():
    torch.manual_seed(0)
    net = small_net()
    sp = DynamicSparsity(net, 0.2, death_rate=0.5, update_frequency=1000, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with sp.attached():
        for step in range(3):
            if step == 2:
                sp.schedule_jump(0.8)
            opt.zero_grad()
            net(torch.randn(8, 3, 8, 8)).pow(2).mean().backward()
            opt.step()
            sp.after_step(net, step + 1)
    jumps = [e for e in sp.events if e["kind"] == "jump"]
    assert len(jumps) == 1 and jumps[0]["step"] == 3 and sp.pending_jump is None
    for name, moved in jumps[0]["per_layer"].items():
        d = sp.masks[name].float().mean().item()
        # q of the live weights are dropped; a dropped one is regrown only when its gradient ranks among
        # the largest of all candidates (about q d / (1 - (1 - q) d) of them by chance)
        chance = 0.8 * d / (1 - 0.2 * d)
        assert 0.8 * (1 - 2 * chance) - 0.05 < moved <= 0.8 + 1e-9, (name, moved)
    with pytest.raises(ValueError):
        sp.schedule_jump(0.0)


def test_state_dict_round_trip_restores_masks_and_counters():
    a, b = small_net(), small_net()
    sa = DynamicSparsity(a, 0.2, seed=0)
    sb = DynamicSparsity(b, 0.2, seed=99)
    sa.steps, sa.pending_jump = 17, 0.8
    sa.events.append({"step": 10, "kind": "update", "rate": 0.5, "changed": 0.4})
    assert any(not torch.equal(sa.masks[k], sb.masks[k]) for k in sa.masks)
    sb.load_state_dict(sa.state_dict())
    for k in sa.masks:
        assert torch.equal(sa.masks[k], sb.masks[k])
        assert bool((sb.layers[k][~sb.masks[k]] == 0).all())
    assert (sb.steps, sb.pending_jump, sb.events) == (17, 0.8, sa.events)
    with pytest.raises(ValueError):
        DynamicSparsity(nn.Sequential(nn.Linear(3, 4)), 0.5).load_state_dict(sa.state_dict())
