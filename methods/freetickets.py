"""FreeTickets (Liu et al., ICLR 2022; specs/freetickets.md): ensembles of dynamically sparse networks.

dst_ensemble   M independent dynamic sparse trainings (own initialisation, own ERK mask, own data
               order), each with the run's recipe; member k is the best-validation epoch of training k.
               ``--recipe paper``: the paper's single-model recipe, lr x0.1 at 50 % and 75 % (Liu et al.
               2022, appendix: WRN-28-10, 250 epochs).
edst_ensemble  one sparse run yields all M members: exploration for 0.6 x E epochs at the run's lr,
               constant, then M refinement windows of 0.4 x E epochs each (lr 0.1 x then 0.01 x the run's
               lr, halves of the window: stage recipes of the method itself, the same in both recipe
               modes and recorded per stage); every window after the first starts with a global exploration jump (a
               fraction q of every layer's live weights dropped and regrown by gradient). Regular topology
               updates continue everywhere. Member k is the best-validation epoch of window k; the run goes
               on from the last epoch of the window, with the optimiser's momentum (one continuous run,
               as in the paper: each stage starts from the previous stage's final optimiser state).

The sparse machinery (ERK masks, drop/grow, masks after every step) is methods/_lib/sparse.py.

Released-code behaviour kept as the defaults (each an option):
  * ``select_on="acc"``: a member is the epoch of best validation ACCURACY, as in the released code
    (``"nll"`` selects on validation NLL);
  * ``zero_momentum=False``: pruned and regrown weights keep their momentum buffers, as in the released
    code (``True`` zeroes them).

Cost, honestly:
  * params_nonzero / FLOPs come from the non-zero weights of each layer (ensemble_bench.cost): per-layer
    density x dense FLOPs of that layer, which with ERK is well above global density x dense FLOPs.
  * training FLOPs: the harness counts 3 x sparse forward FLOPs per sample seen; every topology update
    (and jump) additionally needs the dense weight gradient of one minibatch, instead of the sparse one:
    train_flops_extra = sum over updates of batch x (dense forward FLOPs - sparse forward FLOPs) per
    sample (the weight-gradient pass costs as many FLOPs as the forward of the same layer).
  * the weights are masked dense tensors: dense kernels give no speed-up, the measured latency and
    throughput are those of dense members (recorded as ``sparse_kernels: false``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ensemble_bench.api import EnsembleModel, FitContext, Method, StackedEnsemble
from ensemble_bench.methods._lib.sparse import DynamicSparsity
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register
from ensemble_bench.methods.single import member_seed

EXPLORE_RATIO = 0.6   # of the base epochs E (150 of 250 in the paper)
WINDOW_RATIO = 0.4    # of E per refinement window (100 of 250)
WINDOW_LR = (0.1, 0.01)   # x the run's lr, first and second half of a window

LATENCY_NOTE = ("masked weights run on dense kernels: latency and throughput are those of dense members; "
                "params_nonzero and FLOPs count only live weights")


@dataclass
class SparseEnsembleConfig:
    """The options DST and EDST ensembles share (the paper's defaults)."""

    num_members: int = 3
    density: float = 0.2
    death_rate: float = 0.5
    update_frequency: int = 1000
    select_on: str = "acc"          # member = best validation "acc" (released code) or "nll" epoch
    zero_momentum: bool = False     # zero the momentum of pruned / regrown weights (released code: no)

    def __post_init__(self):
        if self.num_members < 1:
            raise ValueError(f"num_members must be >= 1; got {self.num_members}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density}")
        if not 0.0 < self.death_rate < 1.0:
            raise ValueError(f"death_rate must be in (0, 1); got {self.death_rate}")
        if self.update_frequency < 1:
            raise ValueError(f"update_frequency must be >= 1 iterations; got {self.update_frequency}")
        if self.select_on not in ("acc", "nll"):
            raise ValueError(f"select_on must be 'acc' or 'nll'; got {self.select_on!r}")

    @property
    def select_metric(self) -> str:
        return f"val_{self.select_on}"


class SparseEnsemble(Method):
    """Deployed architecture of both: M sparse networks of density D, one ERK mask each (for EDST they
    come from one run)."""

    quickstart_options: ClassVar[dict] = {"num_members": 3, "update_frequency": 20}

    def build(self, ctx: FitContext) -> EnsembleModel:
        return StackedEnsemble([sparse_net(ctx, self.options, k)[0] for k in range(self.options.num_members)])


def mask_seed(ctx: FitContext, k: int) -> int:
    return stable_seed(ctx.seed, "erk-mask", k)


def sparse_net(ctx: FitContext, options, k: int) -> tuple[nn.Module, DynamicSparsity]:
    """Backbone k (member k's initialisation) with its ERK mask applied."""
    net = ctx.make_backbone(seed=member_seed(ctx, k))
    sparsity = DynamicSparsity(net, options.density, death_rate=options.death_rate,
                               update_frequency=options.update_frequency, seed=mask_seed(ctx, k),
                               zero_momentum=options.zero_momentum)
    return net, sparsity


def update_flops(ctx: FitContext, net: nn.Module, sparsity: DynamicSparsity, samples_per_step: float) -> float:
    """Extra training FLOPs of the topology updates of ``net``: per update, one minibatch's dense weight
    gradient instead of the sparse one = batch x (dense - sparse forward FLOPs per sample)."""
    from ensemble_bench.cost import count_flops

    n = sparsity.num_updates()
    if n == 0:
        return 0.0
    p = next(net.parameters())
    x = torch.zeros(1, ctx.in_channels, ctx.image_size, ctx.image_size, device=p.device)
    f = count_flops(net, x, density=sparsity.layer_density())
    return float(n * samples_per_step * (f["flops_dense"] - f["flops"]))


def _samples_per_step(trainer, stages: list[str]) -> float:
    steps = sum(trainer.stages[s].steps for s in stages if s in trainer.stages)
    seen = sum(trainer.stages[s].samples_seen for s in stages if s in trainer.stages)
    return seen / steps if steps else float(trainer.config.batch_size)


def _common_info(options, sparsity: DynamicSparsity) -> dict[str, Any]:
    return {"density": options.density, "density_distribution": "erk",
            "erk_layer_density": {k: round(v, 4) for k, v in sparsity.target_density.items()},
            "sparse_kernels": False, "latency_note": LATENCY_NOTE,
            "train_flops_extra_formula": "updates x batch x (dense - sparse forward FLOPs per sample)"}


@register("dst_ensemble")
class DSTEnsemble(SparseEnsemble):
    summary = "M independent dynamic sparse trainings (ERK masks, magnitude drop / gradient growth)"

    @dataclass
    class Config(SparseEnsembleConfig):
        pass

    @classmethod
    def paper_recipe(cls, run, backbone):
        """Liu et al. (ICLR 2022), appendix: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, lr x0.1 at 50 %
        and 75 % of training."""
        return run.replace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="multistep",
                           milestones=(0.5, 0.75), lr_decay=0.1, warmup_epochs=0.0)

    def fit(self, ctx: FitContext) -> EnsembleModel:
        members, extra, summaries = [], 0.0, []
        trainer = ctx.trainer
        for k in range(self.options.num_members):
            net, sparsity = sparse_net(ctx, self.options, k)
            stage = f"member{k}"
            with sparsity.attached():
                trainer.fit(net, stage=stage, seed=ctx.member_stage_seed(k), select="best_val",
                            select_metric=self.options.select_metric, after_step=sparsity.after_step,
                            stateful=[sparsity])
            extra += update_flops(ctx, net, sparsity, _samples_per_step(trainer, [stage]))
            summaries.append(sparsity.summary())
            members.append(net)
        ctx.info.update(_common_info(self.options, sparsity))
        ctx.info["members"] = summaries
        ctx.add_training_cost(flops=extra)
        ctx.info["update_flops"] = extra
        return StackedEnsemble(members)


class LastEpochState:
    """Holds the network's weights at the last epoch of a stage (the trainer loads the best-validation
    epoch at the end of a ``best_val`` stage; the EDST run goes on from the last). Checkpointed through
    the trainer's ``stateful``, so a stage that is already finished gives it back on resume."""

    def __init__(self, last_epoch: int):
        self.last_epoch = last_epoch
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if epoch == self.last_epoch:
            self.state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "state": self.state}

    def load_state_dict(self, s: dict) -> None:
        self.last_epoch, self.state = s["last_epoch"], s["state"]


def edst_stage_epochs(epochs: int, num_members: int) -> dict[str, int]:
    """Stage lengths from the base epochs E by the paper's ratios (150 + M x 100 for E = 250), >= 1 each."""
    out = {"explore": max(1, round(EXPLORE_RATIO * epochs))}
    for k in range(num_members):
        out[f"window{k}"] = max(1, round(WINDOW_RATIO * epochs))
    return out


def explore_recipe(run, epochs: int):
    """The exploration stage: the run's lr, constant (no warm-up), for ``epochs``."""
    return run.replace(epochs=epochs, schedule="constant", warmup_epochs=0.0)


def window_recipe(run, epochs: int):
    """A refinement window: 0.1 x the run's lr for the first half, 0.01 x for the second."""
    return run.replace(epochs=epochs, lr=run.lr * WINDOW_LR[0], schedule="multistep", milestones=(0.5,),
                       lr_decay=round(WINDOW_LR[1] / WINDOW_LR[0], 12), warmup_epochs=0.0)


@register("edst_ensemble")
class EDSTEnsemble(SparseEnsemble):
    summary = "one dynamic sparse run: exploration, then M refinement windows separated by global jumps"

    @dataclass
    class Config(SparseEnsembleConfig):
        jump: float = 0.8      # q: fraction of every layer's live weights replaced at each window start

        def __post_init__(self):
            super().__post_init__()
            if not 0.0 < self.jump <= 1.0:
                raise ValueError(f"jump must be in (0, 1]; got {self.jump}")

    def fit(self, ctx: FitContext) -> EnsembleModel:
        opts = self.options
        trainer = ctx.trainer
        epochs = edst_stage_epochs(ctx.epochs, opts.num_members)
        net, sparsity = sparse_net(ctx, opts, 0)
        members: list[nn.Module] = []
        with sparsity.attached():
            trainer.fit(net, stage="explore", recipe=explore_recipe(ctx.recipe, epochs["explore"]),
                        seed=("edst", ctx.seed, "explore"), select="last", converges=False,
                        after_step=sparsity.after_step, stateful=[sparsity])
            for k in range(opts.num_members):
                stage = f"window{k}"
                if k > 0:
                    # applied after the window's first optimiser step, with that minibatch's gradient;
                    # a resumed window gets the pending flag back from its checkpoint (already consumed)
                    sparsity.schedule_jump(opts.jump)
                last = LastEpochState(epochs[stage])
                # one run: each window goes on with the momentum the previous stage ended with
                trainer.fit(net, stage=stage, recipe=window_recipe(ctx.recipe, epochs[stage]),
                            seed=("edst", ctx.seed, stage), select="best_val",
                            select_metric=opts.select_metric,
                            after_step=sparsity.after_step, stateful=[sparsity, last],
                            on_epoch_end=last.on_epoch_end,
                            optimizer_from="explore" if k == 0 else f"window{k - 1}")
                members.append(copy.deepcopy(net))        # best-validation epoch of window k
                if last.state is not None:
                    net.load_state_dict(last.state)       # the run goes on from the window's last epoch
        extra = update_flops(ctx, net, sparsity, _samples_per_step(trainer, list(epochs)))
        # iterations of each stage and the topology updates that fell in it (updates go on in the windows)
        stage_steps = {s: trainer.stages[s].steps for s in epochs}
        updates_per_stage, start = {}, 0
        for s, n in stage_steps.items():
            updates_per_stage[s] = sum(1 for e in sparsity.events
                                       if e["kind"] == "update" and start < e["step"] <= start + n)
            start += n
        ctx.info.update(_common_info(opts, sparsity))
        ctx.info.update({"stage_epochs": epochs, "total_epochs": sum(epochs.values()), "jump": opts.jump,
                         "stage_steps": stage_steps, "updates_per_stage": updates_per_stage,
                         "sparsity": sparsity.summary(), "update_flops": extra})
        ctx.add_training_cost(flops=extra)
        return StackedEnsemble(members)
