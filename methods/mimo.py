"""MIMO: multi-input multi-output (Havasi et al., ICLR 2021; specs/mimo.md).

One network with M input slots (the M images of a tuple concatenated along channels: the first conv takes
in_channels * M) and M heads (num_classes * M logits, read as member logits [M, B, C]). Trained with
independent examples in the slots, the network holds M independent subnetworks that cost one pass.

Training batches (``SlotBatches``): the unique batch of B examples is repeated b times (B*b rows); each
slot gets its own shuffle of that list, except a fraction rho of the rows where every slot shares slot
0's shuffle (rho = 0: independent slots, the CIFAR setting; rho = 1: every slot sees the same image,
i.e. multi-head training). Every example appears exactly b times in every slot. The loss is the SUM over
members of each member's cross-entropy on its own labels, averaged over the rows. A step therefore
processes B*b rows; the trainer counts them (``samples_seen``), so the b x training cost is recorded.

Prediction: the same image in every slot (``GroupedOutput(input_repeat=M)``); the harness averages member
probabilities. Works for every backbone, timm included (the suite passes in_chans and num_classes).

Recipe. ``--recipe shared`` (default): the run's recipe; the learning rate is for ``batch_size`` unique
examples (as the paper's base lr 0.1 is for 128 unique examples), and batch repetition, part of the
method, is an option in both modes. ``--recipe paper`` (``paper_recipe``; Havasi et al. 2021, appendix
and the uncertainty-baselines CIFAR script): SGD with Nesterov momentum 0.9, 1 warm-up epoch of 250
(scaled: E/250 epochs), lr x0.2 at 40 %, 80 % and 90 % of training, and weight decay 6e-4: the reference
adds ``l2 * sum(w**2)`` with l2 = 3e-4 to the loss for all weights (conv, dense, batch-norm, bias); the
gradient of that is ``2 * l2 * w``, i.e. 6e-4 in SGD's ``weight_decay`` convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ensemble_bench.api import EnsembleModel, FitContext, GroupedOutput, Method, SlotInputs, member_cross_entropy
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register


class SlotBatches:
    """The MIMO batch construction, as a ``batch_transform(x, y) -> (x_slots, y_slots)``.

    x [B, C, H, W], y [B]  ->  x_slots [B*b, M*C, H, W] (slot m = channels m*C:(m+1)*C), y_slots [M, B*b].
    Has its own generator, checkpointed through the trainer's ``stateful`` list."""

    def __init__(self, num_slots: int, batch_repeat: int, rho: float, seed: Any):
        self.m, self.b, self.rho = int(num_slots), int(batch_repeat), float(rho)
        self.gen = torch.Generator().manual_seed(stable_seed(seed))

    def indices(self, n: int) -> torch.Tensor:
        """[M, n*b] row indices into the unique batch of n examples."""
        rows = n * self.b
        main = torch.arange(n).repeat(self.b)[torch.randperm(rows, generator=self.gen)]   # slot 0
        n_indep = int(rows * (1.0 - self.rho))        # rows where every slot has its own shuffle
        slots = [main]
        for _ in range(1, self.m):
            own = main.clone()
            own[:n_indep] = main[:n_indep][torch.randperm(n_indep, generator=self.gen)]
            slots.append(own)
        return torch.stack(slots)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        idx = self.indices(x.shape[0]).to(x.device)
        xs = torch.cat([x[idx[k]] for k in range(self.m)], dim=1)
        return xs, y[idx]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])


def mimo_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's cross-entropy on its own labels (y [M, B*b])."""
    return member_cross_entropy(net(x), y, "sum")


@register("mimo")
class MIMO(Method):
    summary = "one network, M input slots and M heads, trained on independent examples per slot"
    train_note = "a training step runs batch_repeat rows per unique example: an epoch costs b x a single model's"

    @dataclass
    class Config:
        num_estimators: int = 3      # M (the published CIFAR tables use 3; ImageNet 2)
        rho: float = 0.0             # input repetition: fraction of rows where all slots share the input
        batch_repeat: int = 4        # b: each example appears b times per slot in a step

        def __post_init__(self):
            for name in ("num_estimators", "batch_repeat"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
            if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0.0 <= self.rho <= 1.0:
                raise ValueError(f"rho must be in [0, 1]; got {self.rho!r}")

    @classmethod
    def paper_recipe(cls, run, backbone):
        return run.replace(nesterov=True, schedule="multistep", milestones=(0.4, 0.8, 0.9), lr_decay=0.2,
                           warmup_epochs=run.epochs / 250, weight_decay=6e-4)

    def build(self, ctx: FitContext) -> EnsembleModel:
        m = self.options.num_estimators
        net = ctx.make_backbone(num_classes=ctx.num_classes * m, in_channels=ctx.in_channels * m,
                                seed=stable_seed(ctx.seed, "mimo"))
        return GroupedOutput(net, m, ctx.num_classes, input_repeat=m)

    def fit(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        model = self.build(ctx)
        slots = SlotBatches(o.num_estimators, o.batch_repeat, o.rho, ("mimo-slots", ctx.seed))
        res = ctx.trainer.fit(SlotInputs(model), stage="mimo", loss_fn=mimo_loss, batch_transform=slots,
                              stateful=[slots], seed=("mimo", ctx.seed), val_model=model)
        ctx.info.update(batch_repeat=o.batch_repeat, rows_per_step=ctx.config.batch_size * o.batch_repeat,
                        samples_seen=res.samples_seen, unique_samples_seen=res.samples_seen // o.batch_repeat)
        return model
