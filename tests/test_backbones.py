import pytest
import torch

from ensemble_bench.backbones import StagedNet, build_backbone, check_name
from ensemble_bench.errors import UsageError


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_173_962),      # CIFAR ResNet-18, 10 classes
    ("resnet50", 23_520_842),      # CIFAR ResNet-50 (Packed-Ensembles table: 23.52M)
    ("wrn28_10", 36_479_194),      # WRN-28-10 (36.5M)
])
def test_published_parameter_counts(name, expected):
    assert n_params(build_backbone(name, 10)) == expected


def test_cifar_resnets_depth_and_width():
    r20, r32, r32x2 = (build_backbone(n, 10) for n in ("resnet20", "resnet32", "resnet32x2"))
    assert [len(s) for s in r20.stages] == [3, 3, 3]
    assert r32.num_blocks == 15
    assert r32x2.stem[0].out_channels == 32 and r32x2.head.in_features == 128
    # ResNet-20 with projection shortcuts: 0.27M parameters
    assert 0.26e6 < n_params(r20) < 0.28e6


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn16_2", "cnn_small"])
def test_forward_shapes_and_staged_structure(name):
    m = build_backbone(name, 7, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    assert isinstance(m, StagedNet)
    assert m(x).shape == (2, 7)
    assert m.num_blocks == sum(len(s) for s in m.stages) == len(m.blocks())


def test_forward_until_from_compose_exactly():
    m = build_backbone("resnet20", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    for k in (0, 4, 9):
        assert torch.allclose(m.forward_from(m.forward_until(x, k), k), m(x), atol=1e-5)


def test_wrn28_10_macs_match_the_paper():
    from ensemble_bench.cost import count_flops
    macs = count_flops(build_backbone("wrn28_10", 10), torch.randn(1, 3, 32, 32))["macs"]
    assert abs(macs / 5.24e9 - 1) < 0.005, macs


def test_timm_backbone_by_name():
    m = build_backbone("timm:resnet18", 5, in_channels=6)
    assert m(torch.randn(2, 6, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("bad", ["resnet19", "wrn27_10", "vgg16", "timm:", "resnet32x0"])
def test_unknown_backbones_name_the_choices(bad):
    with pytest.raises(UsageError, match="choose from|timm"):
        check_name(bad)


@pytest.mark.parametrize("name", ["resnet8", "resnet20x2", "resnet18", "resnet50", "wrn16_2", "wrn28_10", "cnn_small"])
def test_suite_backbones_take_any_channels_and_image_size(name):
    """The pre-run forward check (runner.check_forward) skips the suite's own backbones on this ground: built
    from the data's channel count, they take 1 or 3 channels and any image size from 8x8 up (adaptive pooling)."""
    for channels in (1, 3):
        with torch.device("meta"):
            m = build_backbone(name, 7, in_channels=channels).eval()
        for size in (8, 13, 32, 64):
            with torch.no_grad():
                assert m(torch.zeros(2, channels, size, size, device="meta")).shape == (2, 7), (channels, size)
