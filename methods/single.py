"""The single-model baseline (specs/deep_ensembles.md): the backbone trained once, M = 1."""
from __future__ import annotations

from dataclasses import dataclass

from ensemble_bench.api import EnsembleModel, FitContext, Method, StackedEnsemble
from ensemble_bench.methods import register


def member_seed(ctx: FitContext, k: int) -> int:
    """Initialisation seed of member k; member 0 is the single model of the same seed."""
    return ctx.member_seed(k)


@register("single")
class Single(Method):
    size_reference = True
    independent_members = True   # its one member, member 0 of every deep ensemble of the same seed
    summary = "the backbone trained once with cross-entropy (M = 1)"

    @dataclass
    class Config:
        pass

    def build(self, ctx: FitContext) -> EnsembleModel:
        return StackedEnsemble([ctx.make_backbone(seed=member_seed(ctx, 0))])

    def member_tasks(self) -> int:
        return 1

    def fit_member(self, ctx: FitContext, k: int) -> None:
        ctx.trainer.fit(ctx.make_backbone(seed=member_seed(ctx, 0)), stage="member0", seed=ctx.member_stage_seed(0))

    def fit(self, ctx: FitContext) -> EnsembleModel:
        model = self.build(ctx)
        ctx.trainer.fit(model.members[0], stage="member0", seed=ctx.member_stage_seed(0))
        return model
