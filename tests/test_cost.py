"""ensemble_bench.cost: params, FLOPs (sparsity-aware, per sample, whole ensemble), latency and throughput.

No test asserts a timing: only structure and sanity."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ensemble_bench import cost
from ensemble_bench.api import EnsembleModel, StackedEnsemble


def tiny_net(cin=3, cout=8, hw=8, classes=5):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(cout * hw * hw, classes))


def tiny_flops(cin=3, cout=8, hw=8, classes=5, k=3):
    conv = 2 * k * k * cin * cout * hw * hw
    lin = 2 * (cout * hw * hw) * classes
    return conv, lin


def test_resnet18_params_and_macs():
    from ensemble_bench.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("resnet18", 10)
    p = cost.count_params(model)
    assert p["params"] == 11_173_962
    f = cost.count_flops(model, torch.randn(1, 3, 32, 32))
    assert f["macs"] == pytest.approx(0.5559e9, rel=0.005)
    assert f["macs"] == f["flops"] / 2 and f["flops"] == f["flops_dense"]   # dense model: density 1 everywhere
    assert f["flops_other"] == 0
    # leaves only: the per-layer breakdown sums to the total (no parent counted on top of its children)
    assert sum(v["flops_dense"] for v in f["per_layer"].values()) == f["flops_dense"]
    assert all(v["density"] == 1.0 for v in f["per_layer"].values())
    assert "stem.0" in f["per_layer"] and "head" in f["per_layer"] and "stages.0" not in f["per_layer"]


def test_hand_count_tiny_net_per_sample():
    torch.manual_seed(0)
    model = tiny_net()
    conv, lin = tiny_flops()
    one = cost.count_flops(model, torch.randn(1, 3, 8, 8))
    four = cost.count_flops(model, torch.randn(4, 3, 8, 8))
    for f in (one, four):
        assert f["flops"] == conv + lin and f["flops_dense"] == conv + lin
        assert f["macs"] == (conv + lin) / 2 and f["macs_dense"] == (conv + lin) / 2
        assert f["per_layer"]["0"] == {"flops_dense": conv, "density": 1.0, "flops": conv}
        assert f["per_layer"]["3"]["flops_dense"] == lin
        assert set(f["per_layer"]) == {"0", "3"}
    p = cost.count_params(model)
    assert p["params"] == 3 * 8 * 9 + 8 + 8 * 64 * 5 + 5


def _zero_75_percent(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        w = conv.weight.view(-1)
        n = w.numel()
        assert n % 4 == 0
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: 3 * n // 4]
        w[idx] = 0.0


def test_sparse_weights_count_density_times_dense():
    torch.manual_seed(0)
    model = tiny_net()
    conv, lin = tiny_flops()
    dense_params = cost.count_params(model)
    _zero_75_percent(model[0])
    f = cost.count_flops(model, torch.randn(2, 3, 8, 8))
    assert f["per_layer"]["0"]["density"] == 0.25
    assert f["per_layer"]["0"]["flops"] == 0.25 * conv
    assert f["per_layer"]["3"]["flops"] == lin and f["per_layer"]["3"]["density"] == 1.0
    assert f["flops"] == 0.25 * conv + lin and f["flops_dense"] == conv + lin
    p = cost.count_params(model)
    assert p["params"] == dense_params["params"]
    assert dense_params["params"] - p["params_nonzero"] == 3 * (3 * 8 * 9) // 4
    # an explicit density overrides the non-zero fraction, layer by layer
    f2 = cost.count_flops(model, torch.randn(1, 3, 8, 8), density={"0": 0.5, "3": 0.1})
    assert f2["flops"] == pytest.approx(0.5 * conv + 0.1 * lin)
    f3 = cost.count_flops(model, torch.randn(1, 3, 8, 8), density={"3": 0.1})
    assert f3["flops"] == pytest.approx(0.25 * conv + 0.1 * lin)     # unnamed layer: its non-zero fraction
    with pytest.raises(ValueError, match="not in the model"):
        cost.count_flops(model, torch.randn(1, 3, 8, 8), density={"nope": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cost.count_flops(model, torch.randn(1, 3, 8, 8), density={"0": 1.5})


def test_pruned_weights_via_torch_prune_count_as_sparse():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = tiny_net()
    conv, lin = tiny_flops()
    prune.l1_unstructured(model[0], "weight", amount=0.75)   # weight_orig stays dense, mask 75% zeros
    f = cost.count_flops(model, torch.randn(1, 3, 8, 8))
    assert f["per_layer"]["0"]["density"] == 0.25
    assert f["flops"] == 0.25 * conv + lin
    p = cost.count_params(model)
    assert p["params"] - p["params_nonzero"] == 3 * (3 * 8 * 9) // 4


class _Sparse(EnsembleModel):
    """Weights stay dense but the method declares a density (masks kept elsewhere)."""

    def __init__(self):
        super().__init__(1)
        self.net = tiny_net()

    def forward(self, x):
        return self.net(x).unsqueeze(0)

    def layer_density(self):
        return {"net.0": 0.2}


def test_layer_density_hook_is_honoured_and_explicit_density_wins():
    torch.manual_seed(0)
    model = _Sparse()
    conv, lin = tiny_flops()
    f = cost.count_flops(model, torch.randn(1, 3, 8, 8))
    assert f["per_layer"]["net.0"]["density"] == 0.2
    assert f["flops"] == pytest.approx(0.2 * conv + lin)
    f = cost.count_flops(model, torch.randn(1, 3, 8, 8), density={"net.0": 0.5})
    assert f["flops"] == pytest.approx(0.5 * conv + lin)


def test_grouped_conv_counts_a_quarter():
    x = torch.randn(1, 16, 8, 8)
    dense = cost.count_flops(nn.Conv2d(16, 16, 3, padding=1, bias=False), x)
    grouped = cost.count_flops(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), x)
    assert dense["flops"] == 2 * 9 * 16 * 16 * 64
    assert grouped["flops"] == dense["flops"] / 4
    assert grouped["per_layer"][""]["density"] == 1.0       # the root module itself is the only layer


def test_stacked_ensemble_counts_three_members():
    torch.manual_seed(0)
    one = tiny_net()
    ens = StackedEnsemble([tiny_net() for _ in range(3)])
    x = torch.randn(2, 3, 8, 8)
    f1, f3 = cost.count_flops(one, x), cost.count_flops(ens, x)
    assert f3["flops"] == 3 * f1["flops"] and f3["flops_dense"] == 3 * f1["flops_dense"]
    assert set(f3["per_layer"]) == {f"members.{i}.{j}" for i in range(3) for j in ("0", "3")}
    assert cost.count_params(ens)["params"] == 3 * cost.count_params(one)["params"]


class _FunctionalMatmul(nn.Module):
    """A parent forward with its own functional matmul (no weighted leaf runs it)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        h = self.proj(x)
        return h @ h.transpose(-1, -2)


def test_flops_outside_weighted_modules_count_dense_and_nested_weights_not_twice():
    torch.manual_seed(0)
    model = _FunctionalMatmul()
    with torch.no_grad():
        model.proj.weight.view(-1)[:8] = 0.0        # density 0.5
    x = torch.randn(1, 3, 4)
    f = cost.count_flops(model, x)
    lin = 2 * 3 * 4 * 4
    mm = 2 * 3 * 3 * 4
    assert f["flops_dense"] == lin + mm
    assert f["flops_other"] == mm
    assert f["flops"] == 0.5 * lin + mm

    class WithOwnWeight(nn.Module):   # a weighted module that also holds a weighted child
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))
            self.child = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.child(x @ self.weight.t())

    f = cost.count_flops(WithOwnWeight(), torch.randn(1, 3, 4))
    assert f["per_layer"][""]["flops_dense"] == lin and f["per_layer"]["child"]["flops_dense"] == lin
    assert f["per_layer"][""]["density"] == 0.0 and f["flops"] == lin and f["flops_dense"] == 2 * lin


def test_modes_are_restored_and_forward_runs_without_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    model.train()
    model[1].eval()                                 # a deliberately frozen norm inside a training model
    stats = model[1].running_mean.clone()
    cost.count_flops(model, torch.randn(2, 3, 8, 8))
    assert model.training and not model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, stats)
    model.eval()
    cost.count_flops(model, torch.randn(1, 3, 8, 8))
    assert not model.training


def test_latency_and_throughput_structure():
    torch.manual_seed(0)
    model = tiny_net().train()
    lat = cost.measure_latency(model, torch.randn(1, 3, 8, 8), "cpu", runs=7, warmup=2)
    assert set(lat) == {"latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_runs", "latency_device"}
    assert lat["latency_ms"] > 0 and lat["latency_runs"] == 7
    assert lat["latency_ms_p10"] <= lat["latency_ms"] <= lat["latency_ms_p90"]
    assert lat["latency_device"].startswith("cpu: ") and "threads)" in lat["latency_device"]
    thr = cost.measure_throughput(model, torch.randn(1, 3, 8, 8), "cpu", batch_size=16, runs=3, warmup=1)
    assert thr["throughput"] > 0 and math.isfinite(thr["throughput"]) and thr["throughput_batch"] == 16
    assert thr["throughput_device"] == lat["latency_device"]
    assert thr["peak_mem_mb"] is None or thr["peak_mem_mb"] >= 0
    assert model.training                           # restored after timing in eval mode
    with pytest.raises(ValueError):
        cost.measure_latency(model, torch.randn(1, 3, 8, 8), "cpu", runs=0)


def test_device_name():
    assert cost.device_name("cpu").startswith("cpu: ")
    assert cost.device_name(torch.device("cpu")) == cost.device_name("cpu")
    if torch.cuda.is_available():
        assert cost.device_name("cuda") == torch.cuda.get_device_name(0)


def test_measure_all_in_one_dict():
    torch.manual_seed(0)
    ens = StackedEnsemble([tiny_net() for _ in range(2)])
    conv, lin = tiny_flops()
    res = cost.measure(ens, (3, 8, 8), "cpu", latency_runs=5, throughput_batch=8, bf16=True, channels_last=True)
    for k in ("params", "params_nonzero", "flops", "flops_dense", "macs", "macs_dense", "per_layer",
              "latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_runs", "latency_device",
              "throughput", "throughput_batch", "throughput_device", "peak_mem_mb", "device", "precision"):
        assert k in res, k
    assert res["flops"] == 2 * (conv + lin) and res["latency_runs"] == 5 and res["throughput_batch"] == 8
    assert res["precision"] == "fp32"              # bf16 applies on CUDA only
    assert res["device"] == res["latency_device"]
    quick = cost.measure(ens, (3, 8, 8), "cpu", latency=False, density={"members.0.0": 0.5})
    assert "latency_ms" not in quick and "throughput" not in quick
    assert quick["flops"] == pytest.approx(2 * (conv + lin) - 0.5 * conv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_on_cuda():
    torch.manual_seed(0)
    ens = StackedEnsemble([tiny_net() for _ in range(2)]).cuda()
    res = cost.measure(ens, (3, 8, 8), "cuda", latency_runs=5, throughput_batch=32, bf16=True, channels_last=True)
    assert res["precision"] == "bf16" and res["latency_ms"] > 0 and res["throughput"] > 0
    assert res["peak_mem_mb"] > 0 and res["latency_device"] == torch.cuda.get_device_name(0)
    assert res["latency_ms_p10"] <= res["latency_ms"] <= res["latency_ms_p90"]
    graphed = cost.measure_latency(ens, torch.randn(1, 3, 8, 8), "cuda", runs=5, bf16=True, cuda_graph=True)
    assert graphed["latency_ms"] > 0 and graphed["latency_runs"] == 5


def test_cuda_graph_latency_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        cost.measure_latency(tiny_net(), torch.randn(1, 3, 8, 8), "cpu", runs=1, cuda_graph=True)
