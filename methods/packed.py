"""Packed-Ensembles, PE-(alpha, M, gamma) (Laurent et al., ICLR 2023; specs/packed_ensembles.md).

M small members packed side by side in ONE network of grouped convolutions, so one forward pass runs
them all:
  * every hidden channel count C becomes alpha * C (all members together, padded to divide by the groups);
  * the stem is an ordinary conv from the image (groups = 1): every member sees the same image, so it is
    M independent stems side by side;
  * the first conv of a residual block uses M groups, every other conv and the projection shortcut
    M * gamma groups, with the reference 64-channel rule lowering gamma (down to 1) where a group would
    get fewer than ``min_group_channels`` input channels or the channels do not divide;
  * the head is a grouped linear (M groups) to M * num_classes outputs, read as member logits [M, B, C].
``ensemble_bench.layers.GroupedLayers`` implements those layers for every suite backbone (the StagedNets);
this file picks the configuration, records the effective gamma of every conv, and trains.

Training: the targets are repeated for every member and ONE cross-entropy is averaged over all member
outputs (so the total gradient is that of a single model's loss, and the learning rate is the single
model's, never x M). Members are combined by averaging probabilities, as everywhere in the suite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ensemble_bench.api import EnsembleModel, FitContext, GroupedOutput, Method, member_cross_entropy
from ensemble_bench.layers import GroupedLayers
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register



class _TrackedGroupedLayers(GroupedLayers):
    """GroupedLayers that also remembers which module each ``effective_gamma`` entry built, so the
    record can name the layer (build order is not module order: some backbones build the stem last)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.built: list[nn.Module] = []

    def conv(self, *args: Any, **kw: Any) -> nn.Module:
        mod = super().conv(*args, **kw)
        self.built.append(mod)
        return mod


def effective_gamma_table(net: nn.Module, layers: _TrackedGroupedLayers) -> list[dict[str, Any]]:
    """One entry per conv, in module order: name, role, channels, groups and effective gamma."""
    names = {id(m): n for n, m in net.named_modules()}
    rows = []
    for mod, entry in zip(layers.built, layers.effective_gamma):
        rows.append({"layer": names.get(id(mod), "?"), **entry})
    order = {n: i for i, (n, _) in enumerate(net.named_modules())}
    return sorted(rows, key=lambda r: order.get(r["layer"], len(order)))


def packed_loss(model: nn.Module, x, y):
    """Targets repeated for every member; one cross-entropy averaged over all M x B member outputs."""
    return member_cross_entropy(model(x), y, "mean")


@register("packed")
class PackedEnsembles(Method):
    staged_backbone = "rebuilds every conv and linear layer as grouped layers"
    summary = "PE-(alpha, M, gamma): M members packed in one network of grouped convs (suite backbones)"

    @dataclass
    class Config:
        alpha: float = 2.0            # width factor of every hidden layer (all members together)
        num_estimators: int = 4       # M
        gamma: int = 1                # extra groups inside each member (the reference configs now use 2)
        min_group_channels: int = 64  # reference rule: lower gamma where a group gets fewer input channels; 0 = off

        def __post_init__(self):
            if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                                     and self.alpha > 0):
                raise ValueError(f"alpha must be a finite number > 0; got {self.alpha!r}")
            for name in ("num_estimators", "gamma"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
            if isinstance(self.min_group_channels, bool) or not isinstance(self.min_group_channels, int) \
                    or self.min_group_channels < 0:
                raise ValueError(f"min_group_channels must be an integer >= 0; got {self.min_group_channels!r}")

    @classmethod
    def paper_recipe(cls, run, backbone):
        """Laurent et al. (ICLR 2023), appendix / the released configs, scaled to the run's epochs:
        ResNet-18 on CIFAR: SGD lr 0.05, momentum 0.9, wd 5e-4, lr x0.1 at 1/3 and 2/3 of training
        (75 epochs there); ResNet-50 and WRN-28-10 (and every other backbone here): lr 0.1, Nesterov,
        wd 5e-4, lr x0.2 at 30 %, 60 % and 80 % (200 epochs there)."""
        if backbone == "resnet18":
            return run.replace(lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="multistep",
                               milestones=(1 / 3, 2 / 3), lr_decay=0.1, warmup_epochs=0.0)
        return run.replace(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="multistep",
                           milestones=(0.3, 0.6, 0.8), lr_decay=0.2, warmup_epochs=0.0)

    def layers(self) -> _TrackedGroupedLayers:
        o = self.options
        return _TrackedGroupedLayers(width=o.alpha, members=o.num_estimators, gamma=o.gamma,
                                     min_group_channels=o.min_group_channels or None, stem_groups=1)

    def build(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        ctx.require_staged_backbone(self.staged_backbone)
        L = self.layers()
        net = ctx.make_backbone(layers=L, seed=stable_seed(ctx.seed, "packed"))
        table = effective_gamma_table(net, L)
        ctx.info["effective_gamma"] = table
        ctx.info["gamma_lowered_layers"] = [r["layer"] for r in table
                                            if r["gamma"] is not None and r["role"] != "block_in" and r["gamma"] < o.gamma]
        ctx.info["width_channels"] = [L.channels(c) for c in net.stage_channels]
        return GroupedOutput(net, o.num_estimators, ctx.num_classes)

    def fit(self, ctx: FitContext) -> EnsembleModel:
        model = self.build(ctx)
        ctx.trainer.fit(model, stage="packed", loss_fn=packed_loss, seed=("packed", ctx.seed))
        return model
