"""Backbones, all written once against a ``Layers`` factory and built as a ``StagedNet``.

``StagedNet`` = stem -> stages (each a sequence of blocks) -> final (norm/act or identity) -> global
average pool -> head. Methods that cut a network at a block (bridges) or branch it at a stage boundary
(NFE) rely on that structure; timm models are plain ``nn.Module``s and support only the methods that
treat the backbone as a black box.

Names (``ensemble-bench list``):
  resnet18, resnet50       CIFAR stem (3x3 conv, no max-pool), BasicBlock / Bottleneck
  resnet20/32/56[xK]       the CIFAR ResNets of He et al. (16-32-64 channels, 3 stages), widened K times
  wrn<depth>_<width>       pre-activation Wide ResNet (wrn28_10: 36.5M params)
  cnn_small                three conv blocks, for CPU demos
  timm:<name>              any timm model (random init; in_chans and num_classes set by the suite)
  <plugin name>            a user's backbone (``register_backbone``); staged only if it says so

A *staged* backbone is a ``StagedNet`` built from the ``Layers`` factory it is given: every suite family
is; timm models are not. Methods that rebuild layers or cut the network (``Method.staged_backbone``)
accept only staged backbones, checked by name before anything is built (``is_staged_name``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ensemble_bench.errors import UsageError
from ensemble_bench.layers import Layers
from ensemble_bench.registry import Registry


class StagedNet(nn.Module):
    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], final: nn.Module, head: nn.Module,
                 feature_channels: list[int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.final = final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.stage_channels = feature_channels   # base (unwidened) output channels of every stage

    @property
    def num_blocks(self) -> int:
        return sum(len(s) for s in self.stages)

    def blocks(self) -> list[nn.Module]:
        return [b for s in self.stages for b in s]

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.final(h)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.forward_head(h)

    def forward_until(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Feature map after the stem and the first ``num_blocks`` blocks."""
        h = self.stem(x)
        for b in self.blocks()[:num_blocks]:
            h = b(h)
        return h

    def forward_from(self, h: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Logits from the feature map after ``num_blocks`` blocks."""
        for b in self.blocks()[num_blocks:]:
            h = b(h)
        return self.forward_head(h)


# ------------------------------------------------------------------------------------------ blocks
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, L: Layers, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = L.conv(cin, planes, 3, stride, role="block_in")
        self.bn1 = L.norm(planes)
        self.conv2 = L.conv(planes, planes, 3, 1, role="hidden")
        self.bn2 = L.norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(L.conv(cin, planes, 1, stride, padding=0, role="shortcut"), L.norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, L: Layers, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = L.conv(cin, planes, 1, padding=0, role="block_in")
        self.bn1 = L.norm(planes)
        self.conv2 = L.conv(planes, planes, 3, stride, role="hidden")
        self.bn2 = L.norm(planes)
        self.conv3 = L.conv(planes, cout, 1, padding=0, role="hidden")
        self.bn3 = L.norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(L.conv(cin, cout, 1, stride, padding=0, role="shortcut"), L.norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class WideBasic(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, L: Layers, cin: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = L.norm(cin)
        self.conv1 = L.conv(cin, planes, 3, stride, role="block_in")   # stride on the first conv, as in the
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()   # official WRN (5.24G MACs)
        self.bn2 = L.norm(planes)
        self.conv2 = L.conv(planes, planes, 3, 1, role="hidden")
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(L.conv(cin, planes, 1, stride, padding=0, role="shortcut"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(self.dropout(out))))
        return out + self.shortcut(x)


class ConvBlock(nn.Module):
    def __init__(self, L: Layers, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = L.conv(cin, cout, 3, stride, role="block_in")
        self.bn = L.norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _stem(L: Layers, in_channels: int, cout: int) -> nn.Module:
    return nn.Sequential(L.conv(in_channels, cout, 3, 1, role="stem"), L.norm(cout), nn.ReLU(inplace=True))


def _stages(L: Layers, block, cin: int, widths: list[int], counts: list[int], strides: list[int], **kw):
    stages = []
    for w, n, s in zip(widths, counts, strides):
        blocks = []
        for i in range(n):
            blocks.append(block(L, cin, w, s if i == 0 else 1, **kw))
            cin = w * getattr(block, "expansion", 1)
        stages.append(blocks)
    return stages, cin


# ------------------------------------------------------------------------------------- factories
def resnet_imagenet_style(block, counts, num_classes, in_channels, L):
    widths = [64, 128, 256, 512]
    stages, cout = _stages(L, block, 64, widths, counts, [1, 2, 2, 2])
    return StagedNet(_stem(L, in_channels, 64), stages, nn.Identity(), L.head(cout, num_classes),
                     [w * block.expansion for w in widths])


def cifar_resnet(depth: int, width: int, num_classes: int, in_channels: int, L: Layers) -> StagedNet:
    if (depth - 2) % 6:
        raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...); got {depth}")
    n = (depth - 2) // 6
    widths = [16 * width, 32 * width, 64 * width]
    stages, cout = _stages(L, BasicBlock, widths[0], widths, [n] * 3, [1, 2, 2])
    return StagedNet(_stem(L, in_channels, widths[0]), stages, nn.Identity(), L.head(cout, num_classes), widths)


def wide_resnet(depth: int, width: int, num_classes: int, in_channels: int, L: Layers, dropout: float = 0.0) -> StagedNet:
    if (depth - 4) % 6:
        raise UsageError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...); got {depth}")
    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    stem = L.conv(in_channels, 16, 3, 1, role="stem")
    stages, cout = _stages(L, WideBasic, 16, widths, [n] * 3, [1, 2, 2], dropout=dropout)
    final = nn.Sequential(L.norm(cout), nn.ReLU(inplace=True))
    return StagedNet(stem, stages, final, L.head(cout, num_classes), widths)


def cnn_small(num_classes: int, in_channels: int, L: Layers) -> StagedNet:
    widths = [32, 64, 128]
    stages = [[ConvBlock(L, 32, 32, 1)], [ConvBlock(L, 32, 64, 2)], [ConvBlock(L, 64, 128, 2)]]
    return StagedNet(_stem(L, in_channels, 32), stages, nn.Identity(), L.head(128, num_classes), widths)


FIXED = {
    "resnet18": lambda c, i, L: resnet_imagenet_style(BasicBlock, [2, 2, 2, 2], c, i, L),
    "resnet50": lambda c, i, L: resnet_imagenet_style(Bottleneck, [3, 4, 6, 3], c, i, L),
    "cnn_small": cnn_small,
}
_CIFAR_RE = re.compile(r"^resnet(\d+)(?:x(\d+))?$")
_WRN_RE = re.compile(r"^wrn(\d+)_(\d+)$")
EXAMPLES = ["resnet8", "resnet20", "resnet32", "resnet56", "resnet<6n+2>[x<width>]", "resnet18", "resnet50",
            "wrn28_10", "wrn<depth>_<width>", "cnn_small", "timm:<name>"]


@dataclass(frozen=True)
class PluginBackbone:
    """A user's backbone: ``factory(num_classes, in_channels, layers) -> nn.Module``. ``staged``: it
    returns a ``StagedNet`` built from the ``layers`` factory it is given (then every method accepts it)."""

    factory: Callable[..., nn.Module]
    staged: bool = False
    summary: str = ""


PLUGINS = Registry("backbone")


def register_backbone(name: str, *, staged: bool = False, summary: str = ""):
    """Decorator for a plugin's backbone factory ``fn(num_classes, in_channels, layers) -> nn.Module``.

    ``staged=False`` (a plain module, like a timm model): methods that treat the backbone as a black box
    use it, ``layers`` is always the plain factory. ``staged=True``: the factory builds a ``StagedNet``
    from ``layers`` (as every suite backbone does), so grouped, rank-1 and staged methods work too."""
    if check_name_builtin(name):
        raise UsageError(f"backbone {name!r} is a suite backbone name; a plugin backbone needs another name")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        PLUGINS.add(name, PluginBackbone(fn, bool(staged), summary or (fn.__doc__ or "").strip().split("\n")[0]),
                    source=f"{fn.__module__} ({getattr(fn, '__code__', None) and fn.__code__.co_filename})")
        return fn
    return deco


def check_name_builtin(name: str) -> bool:
    """True when ``name`` is a suite backbone (a family name with valid numbers, or ``timm:<model>``)."""
    if name in FIXED or (name.startswith("timm:") and name[5:]):
        return True
    m = _CIFAR_RE.match(name)
    if m and int(m.group(1)) not in (18, 50) and (int(m.group(1)) - 2) % 6 == 0 \
            and (m.group(2) is None or int(m.group(2)) >= 1):
        return True
    m = _WRN_RE.match(name)
    return bool(m and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(2)) >= 1)


def canonical_name(name: str) -> str:
    """The one spelling of a suite family name: ``resnet08`` and ``resnet8x1`` are ``resnet8``, ``wrn028_010``
    is ``wrn28_10``; any other name is returned as given. The run id holds this spelling, so the same
    network never gets two ids (``resolve`` applies it before anything else reads the name)."""
    if name in PLUGINS:
        return name
    m = _CIFAR_RE.match(name)
    if m and int(m.group(1)) not in (18, 50):
        width = int(m.group(2) or 1)
        return f"resnet{int(m.group(1))}" + (f"x{width}" if width != 1 else "")
    m = _WRN_RE.match(name)
    if m:
        return f"wrn{int(m.group(1))}_{int(m.group(2))}"
    return name


def is_staged_name(name: str) -> bool:
    """Whether the backbone of this (valid) name is a ``StagedNet`` built from its ``Layers`` factory."""
    if name in PLUGINS:
        return PLUGINS.get(name).staged
    return not name.startswith("timm:")


def staged_names() -> list[str]:
    return [n for n in EXAMPLES if not n.startswith("timm")] + [n for n in PLUGINS.names() if PLUGINS.get(n).staged]


def check_name(name: str) -> None:
    if name in PLUGINS or check_name_builtin(name):
        return
    if name == "timm:":
        raise UsageError("timm backbone needs a model name: timm:<name> (e.g. timm:resnet18)")
    raise UsageError(f"unknown backbone {name!r}; choose from {', '.join(EXAMPLES + PLUGINS.names())}")


def build_backbone(name: str, num_classes: int, in_channels: int = 3, layers: Layers | None = None) -> nn.Module:
    check_name(name)
    L = layers or Layers()
    if name in PLUGINS:
        spec = PLUGINS.get(name)
        if not spec.staged and layers is not None and type(layers) is not Layers:
            raise UsageError(f"backbone {name!r} is not staged (register_backbone(staged=False)) and cannot be "
                             f"rebuilt with another layer factory; staged backbones: {', '.join(staged_names())}")
        net = spec.factory(num_classes, in_channels, L if spec.staged else Layers())
        if spec.staged and not isinstance(net, StagedNet):
            raise UsageError(f"backbone {name!r} is registered as staged but its factory returned a "
                             f"{type(net).__name__}, not a StagedNet ({PLUGINS.source(name)})")
        if not isinstance(net, nn.Module):
            raise UsageError(f"backbone {name!r}: the factory returned {type(net).__name__}, not an nn.Module")
        return net
    if name.startswith("timm:"):
        if layers is not None and type(layers) is not Layers:
            raise UsageError(f"backbone {name!r} is a timm model and cannot be rebuilt with grouped layers; "
                             f"use one of {', '.join(n for n in EXAMPLES if not n.startswith('timm'))}")
        import timm

        try:
            return timm.create_model(name[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except Exception as e:   # unknown name, offline hub download, bad arguments: one line
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UsageError(f"timm cannot build {name[5:]!r}: {first}") from None
    if name in FIXED:
        return FIXED[name](num_classes, in_channels, L)
    m = _CIFAR_RE.match(name)
    if m:
        return cifar_resnet(int(m.group(1)), int(m.group(2) or 1), num_classes, in_channels, L)
    m = _WRN_RE.match(name)
    return wide_resnet(int(m.group(1)), int(m.group(2)), num_classes, in_channels, L)


def is_staged(model: nn.Module) -> bool:
    return isinstance(model, StagedNet)
