"""Deep ensembles (Lakshminarayanan et al., NeurIPS 2017; specs/deep_ensembles.md).

M members, each the backbone with its own initialisation and its own data order, trained with the
single-model recipe; no bagging. Two paths that train the same members:
  separate  M independent trainings, one after the other (works for every backbone, timm included)
  batched   the M members as one grouped network (width M, M groups everywhere, each member its own stem
            reading its own slot of an M-image input) trained in one loop; each slot is fed from the
            member's own loader, and the loss is the SUM of member losses, so every member gets exactly
            the gradient of its separate training (tests/test_deep_ensemble.py checks the weights match).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ensemble_bench.api import (EnsembleModel, FitContext, GroupedOutput, Method, SlotInputs, StackedEnsemble,
                           default_loss)
from ensemble_bench.layers import GroupedLayers, load_members_into_grouped
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register
from ensemble_bench.methods.single import member_seed


def batched_layers(m: int) -> GroupedLayers:
    return GroupedLayers(width=m, members=m, gamma=1, min_group_channels=None, stem_groups=m)


class MemberLoaders:
    """Loaders of members 1..M-1 running in lock-step with the trainer's loader (member 0), each with
    its own generator: own order, own augmentation. Checkpointed through the trainer's ``stateful``."""

    def __init__(self, trainer, seeds):
        self.trainer = trainer
        self.gens = [torch.Generator().manual_seed(stable_seed(s)) for s in seeds]
        self.iters = None

    def reset(self, *_):
        self.iters = None

    def next_batches(self):
        if self.iters is None:
            self.iters = [iter(self.trainer.loader("train", generator=g)) for g in self.gens]
        return [next(it) for it in self.iters]

    def state_dict(self):
        return {"gens": [g.get_state() for g in self.gens]}

    def load_state_dict(self, s):
        for g, st in zip(self.gens, s["gens"]):
            g.set_state(st)
        self.iters = None


@register("deep_ensemble")
class DeepEnsemble(Method):
    size_reference = True
    independent_members = True   # the separate path: member k is one plain stage (fit_member)
    summary = "M independently initialised and shuffled copies of the backbone"

    @dataclass
    class Config:
        num_members: int = 4
        batched: bool = False   # train the members as one grouped network (suite backbones only)

        def __post_init__(self):
            if self.num_members < 1:
                raise ValueError(f"num_members must be >= 1; got {self.num_members}")

    def _members(self, ctx: FitContext):
        return [ctx.make_backbone(seed=member_seed(ctx, k)) for k in range(self.options.num_members)]

    def build(self, ctx: FitContext) -> EnsembleModel:
        m = self.options.num_members
        if not self.options.batched:
            return StackedEnsemble(self._members(ctx))
        ctx.require_staged_backbone("batched=true builds the members as grouped layers; use batched=false")
        net = ctx.make_backbone(layers=batched_layers(m))
        load_members_into_grouped(net, self._members(ctx))
        return GroupedOutput(net, m, ctx.num_classes, input_repeat=m)

    def member_tasks(self) -> int:
        return 0 if self.options.batched else self.options.num_members

    @staticmethod
    def _fit_member(ctx: FitContext, k: int, member) -> None:
        ctx.trainer.fit(member, stage=f"member{k}", seed=ctx.member_stage_seed(k))

    def fit_member(self, ctx: FitContext, k: int) -> None:
        """Member k alone (a job of its own): the same initialisation, stage, data order and recipe as in
        ``fit``."""
        self._fit_member(ctx, k, ctx.make_backbone(seed=member_seed(ctx, k)))

    def fit(self, ctx: FitContext) -> EnsembleModel:
        model = self.build(ctx)
        m = self.options.num_members
        if not self.options.batched:
            for k, member in enumerate(model.members):
                self._fit_member(ctx, k, member)
            return model
        loaders = MemberLoaders(ctx.trainer, [ctx.member_stage_seed(k) for k in range(1, m)])

        def slots(x, y):
            others = loaders.next_batches()
            xs = torch.cat([x] + [o[0] for o in others], dim=1)
            ys = torch.stack([y] + [o[1] for o in others], dim=0)
            return xs, ys

        # validation every epoch: the members trained jointly, as the ensemble they form
        ctx.trainer.fit(SlotInputs(model), stage="batched", seed=ctx.member_stage_seed(0), batch_transform=slots,
                        loss_fn=default_loss, stateful=[loaders], on_epoch_end=loaders.reset, val_model=model)
        ctx.info["batched"] = True
        return model
