"""Layer factories: backbones are written once against ``Layers`` and become width- and groups-aware.

The plain factory builds the ordinary network. ``GroupedLayers`` builds M members packed side by side
in one network of grouped convolutions (Packed-Ensembles; with width M, gamma 1 and grouped stem it is
exactly M independent networks: the batched deep ensemble).

Roles a backbone gives each layer:
  stem      the first conv on the image (``cin`` are image channels, never widened)
  block_in  the first conv of a residual block (Packed-Ensembles: no extra gamma sub-groups)
  hidden    any other conv inside a block
  shortcut  a projection shortcut
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROLES = ("stem", "block_in", "hidden", "shortcut")


def _same_padding(k: int) -> int:
    return k // 2


class Layers:
    """Plain layers: the backbone as published."""

    grouped = False

    def channels(self, c: int) -> int:
        return c

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int | None = None,
             bias: bool = False, role: str = "hidden") -> nn.Module:
        if role not in ROLES:
            raise ValueError(f"unknown layer role {role!r}")
        cin_actual = cin if role == "stem" else self.channels(cin)
        return nn.Conv2d(cin_actual, self.channels(cout), kernel_size, stride,
                         _same_padding(kernel_size) if padding is None else padding, bias=bias)

    def norm(self, c: int) -> nn.Module:
        return nn.BatchNorm2d(self.channels(c))

    def head(self, cin: int, num_classes: int) -> nn.Module:
        return nn.Linear(self.channels(cin), num_classes)


class GroupedLinear(nn.Module):
    """A linear layer of ``groups`` independent blocks (a 1x1 grouped conv on the feature vector)."""

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"features {in_features}->{out_features} do not divide into {groups} groups")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.conv = nn.Conv1d(in_features, out_features, 1, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(-1)).squeeze(-1)


class GroupedLayers(Layers):
    """M members side by side in grouped layers.

    width          every hidden channel count C becomes ceil(width * C), rounded up to divide by the
                   layer's groups (Packed-Ensembles' alpha; M for a batched deep ensemble)
    members        M; block_in convs use M groups, hidden and shortcut convs M * gamma
    gamma          extra groups inside each member
    min_group_channels  lower gamma (down to 1) for a layer whose groups would have fewer input
                   channels than this (the reference Packed-Ensembles rule, 64), or where the channels do
                   not divide; None switches the rule off
    stem_groups    1: one ordinary conv from the image (every member sees the same image); M: the input
                   holds M images on channels and each member has its own stem
    The effective gamma of every conv is kept in ``self.effective_gamma`` (in build order) so a method
    can record it.
    """

    grouped = True

    def __init__(self, width: float, members: int, gamma: int = 1, min_group_channels: int | None = 64,
                 stem_groups: int = 1):
        if members < 1 or gamma < 1:
            raise ValueError("members and gamma must be >= 1")
        if stem_groups not in (1, members):
            raise ValueError("stem_groups must be 1 or members")
        self.width, self.members, self.gamma = width, members, gamma
        self.min_group_channels = min_group_channels
        self.stem_groups = stem_groups
        self.effective_gamma: list[dict[str, Any]] = []

    def channels(self, c: int) -> int:
        # hidden channels are shared by all members: divisible by M (and by M*gamma where possible)
        n = math.ceil(self.width * c)
        return n + (-n) % self.members

    def _gamma_for(self, cin: int, cout: int) -> int:
        g = self.gamma
        while g > 1 and (cin % (self.members * g) or cout % (self.members * g)
                         or (self.min_group_channels is not None and cin // (self.members * g) < self.min_group_channels)):
            g -= 1
        return g

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int | None = None,
             bias: bool = False, role: str = "hidden") -> nn.Module:
        if role not in ROLES:
            raise ValueError(f"unknown layer role {role!r}")
        pad = _same_padding(kernel_size) if padding is None else padding
        cout_a = self.channels(cout)
        if role == "stem":
            groups = self.stem_groups
            cin_a = cin * self.stem_groups
            g_eff = None
        else:
            cin_a = self.channels(cin)
            g_eff = 1 if role == "block_in" else self._gamma_for(cin_a, cout_a)
            groups = self.members * g_eff
        self.effective_gamma.append({"role": role, "in": cin_a, "out": cout_a, "groups": groups, "gamma": g_eff})
        return nn.Conv2d(cin_a, cout_a, kernel_size, stride, pad, groups=groups, bias=bias)

    def head(self, cin: int, num_classes: int) -> nn.Module:
        return GroupedLinear(self.channels(cin), self.members * num_classes, groups=self.members)


# ------------------------------------------------------------------- grouped <-> member weights
def _leaves_with_state(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules()
            if not list(m.children()) and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))]


def _member_slice(t: torch.Tensor, m: int, members: int, like: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t
    n = t.shape[0] // members
    part = t[m * n:(m + 1) * n]
    return part.reshape(like.shape)


def load_members_into_grouped(grouped: nn.Module, members: list[nn.Module]) -> None:
    """Copy M plain networks into a grouped network of the same backbone built with
    ``GroupedLayers(width=M, members=M, gamma=1, stem_groups=M, min_group_channels=None)``."""
    g_leaves = _leaves_with_state(grouped)
    m_leaves = [_leaves_with_state(m) for m in members]
    if any(len(ls) != len(g_leaves) for ls in m_leaves):
        raise ValueError("grouped network and members do not have the same structure")
    M = len(members)
    with torch.no_grad():
        for i, g in enumerate(g_leaves):
            for name, t in list(g.named_parameters(recurse=False)) + list(g.named_buffers(recurse=False)):
                parts = []
                for ls in m_leaves:
                    src = dict(list(ls[i].named_parameters(recurse=False)) + list(ls[i].named_buffers(recurse=False)))[name]
                    parts.append(src)
                if t.dim() == 0:
                    t.copy_(parts[0])
                else:
                    t.copy_(torch.cat([p.reshape(t.shape[0] // M, *t.shape[1:]) for p in parts], dim=0))


def copy_grouped_into_members(grouped: nn.Module, members: list[nn.Module]) -> None:
    """The inverse of ``load_members_into_grouped``: write each member's slice into ``members``."""
    g_leaves = _leaves_with_state(grouped)
    M = len(members)
    with torch.no_grad():
        for mi, member in enumerate(members):
            for g, leaf in zip(g_leaves, _leaves_with_state(member)):
                src = dict(list(g.named_parameters(recurse=False)) + list(g.named_buffers(recurse=False)))
                for name, t in list(leaf.named_parameters(recurse=False)) + list(leaf.named_buffers(recurse=False)):
                    t.copy_(_member_slice(src[name], mi, M, t))
