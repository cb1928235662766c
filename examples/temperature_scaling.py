"""Temperature scaling: an example plugin, written only against the public API (``ensemble_bench``).

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017, section 4.2: one
scalar T > 0 divides the logits of a trained network; T is fitted by minimising the NLL on a held-out
validation set, so the predicted class, and with it the accuracy, never changes. It is the calibration
baseline every ensemble paper is measured against: an ensemble's better NLL or ECE is only worth its
extra cost if a single model with one fitted scalar does not already get there.

Run it (from the repository root; any path to this file works)::

    ensemble-bench run --plugin examples/temperature_scaling.py --method temperature_scaling \\
        --backbone cnn_small --dataset digits --epochs 15

Choices, each a decision of this file:
  * The network is the ``single`` model of the same seed: member 0's initialisation
    (``ctx.member_seed(0)``) and data order (``ctx.member_stage_seed(0)``), trained with the run's recipe
    in a stage named ``member0``. So the row differs from ``single`` only by T, and a run in a folder that
    already holds that single model reuses its trained weights instead of training again.
  * T is fitted on the run's validation split (the last ``val_fraction`` of the training set, never the
    test set), as in the paper. The paper minimises the NLL with respect to T; here the optimiser works on
    log T (so T stays positive) with L-BFGS in float64 from T = 1, the start the paper's released code
    uses too. The fitted T and the validation NLL before and after go into the record (``method.info``).
  * The deployed model holds T as a buffer: one extra scalar, no extra FLOPs worth counting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ensemble_bench import EnsembleModel, FitContext, Method, register
from ensemble_bench.errors import UsageError


class TemperatureScaled(EnsembleModel):
    """One network whose logits are divided by a fitted temperature: ``forward(x) -> [1, B, C]``."""

    def __init__(self, net: nn.Module):
        super().__init__(num_members=1)
        self.net = net
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) / self.temperature).unsqueeze(0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean NLL of ``softmax(logits / T)`` (L-BFGS on log T, float64)."""
    z = logits.double()
    y = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@register("temperature_scaling")
class TemperatureScaling(Method):
    summary = "the single model with one temperature fitted on the validation split (Guo et al. 2017)"

    @dataclass
    class Config:
        max_iter: int = 100     # L-BFGS iterations for T

    def build(self, ctx: FitContext) -> EnsembleModel:
        # build runs on the meta device before the run starts: a run with no validation split is refused
        # there, one line, before anything trains or is written
        if ctx.config.val_fraction <= 0:
            raise UsageError("temperature_scaling fits T on the validation split; this run has none "
                             "(val_fraction = 0): give --val-fraction > 0")
        return TemperatureScaled(ctx.make_backbone(seed=ctx.member_seed(0)))

    def fit(self, ctx: FitContext) -> EnsembleModel:
        model = self.build(ctx)
        ctx.trainer.fit(model.net, stage="member0", seed=ctx.member_stage_seed(0))
        val = ctx.data.val
        if val is None or len(val) == 0:   # val_fraction > 0 of a training set too small to leave an image
            raise UsageError("temperature_scaling fits T on the validation split; this run's is empty: give a "
                             "larger --val-fraction or more training images")
        logits = ctx.trainer.predict(model.net, val.x)[0]          # [N, C], float32, eval mode
        y = val.y.cpu()
        t = fit_temperature(logits, y, self.options.max_iter)
        model.temperature.fill_(t)
        before = float(nn.functional.cross_entropy(logits.double(), y))
        after = float(nn.functional.cross_entropy(logits.double() / t, y))
        ctx.info.update({"temperature": t, "val_nll_before": before, "val_nll_after": after})
        return model
