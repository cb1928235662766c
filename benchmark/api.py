"""The one contract between the harness and the methods.

A method is a registered class with a dataclass of hyper-parameters (``Config``) and one job: given a
``FitContext`` (data, backbone factory, the shared Trainer), return a trained ``EnsembleModel`` whose
``forward(x)`` gives member logits ``[M, B, C]``. ``build`` returns the same architecture untrained, so
``ensemble-bench cost`` can measure a method without training it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

COMBINE_RULES = ("probs", "logits")


class EnsembleModel(nn.Module):
    """Base class of every trained method: ``forward(x) -> [M, B, C]`` member logits.

    Attributes the harness reads (never a method name):
      num_members  M
      combine      how members are combined: "probs" (the suite's rule) or "logits" (declared by methods
                   whose paper averages logits; the metrics and the record follow it)
    Hooks:
      layer_density()  {qualified module name: live-weight fraction} for FLOPs of sparse methods; the
                   default counts the non-zero entries of each conv/linear weight, which is exact for any
                   method that keeps pruned weights at exactly zero.
    """

    combine: str = "probs"

    def __init__(self, num_members: int):
        super().__init__()
        self.num_members = int(num_members)

    def layer_density(self) -> dict[str, float] | None:
        return None


class StackedEnsemble(EnsembleModel):
    """Members that each map x -> [B, C], run one after the other and stacked to [M, B, C]."""

    def __init__(self, members: list[nn.Module]):
        super().__init__(len(members))
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0)


class GroupedOutput(EnsembleModel):
    """One network whose output [B, M*C] holds M members side by side (grouped head): -> [M, B, C].

    ``input_repeat`` > 1 tiles the input M times along channels (networks whose first layer takes one
    image per member, e.g. a batched deep ensemble or MIMO at test time)."""

    def __init__(self, net: nn.Module, num_members: int, num_classes: int, input_repeat: int = 1):
        super().__init__(num_members)
        self.net = net
        self.num_classes = num_classes
        self.input_repeat = input_repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_repeat > 1:
            x = x.repeat(1, self.input_repeat, 1, 1)
        return self.forward_raw(x)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The network on an already-built input (e.g. M different images in the M input slots)."""
        out = self.net(x)
        b = out.shape[0]
        return out.view(b, self.num_members, self.num_classes).transpose(0, 1)


class SlotInputs(nn.Module):
    """The training view of a ``GroupedOutput`` whose input holds one image per member slot (M-slot
    batches of a batched deep ensemble or MIMO): ``forward`` takes the slot input as it is, no tiling.
    Training through it also lets the trainer count the FLOPs of one training row, which equal those of
    the deployed forward (the test-time tiling is free)."""

    def __init__(self, model: GroupedOutput):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_raw(x)


@dataclass
class FitContext:
    """What a method gets. ``data`` and ``trainer`` are None when only the architecture is wanted
    (``build`` for the ``cost`` command)."""

    config: Any                       # ensemble_bench.config.RunConfig
    num_classes: int
    in_channels: int
    image_size: int
    device: torch.device
    data: Any = None                  # ensemble_bench.data.DataBundle
    trainer: Any = None               # ensemble_bench.train.Trainer
    info: dict[str, Any] = field(default_factory=dict)   # method-specific facts for the record (method.info)
    # training work outside ``trainer.fit`` (``add_training_cost``), added to the record's totals
    extra_train_flops: float = 0.0
    extra_train_s: float = 0.0

    @property
    def backbone_name(self) -> str:
        return self.config.backbone

    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def recipe(self):
        """The run's effective recipe (``ensemble_bench.recipe.Recipe``): what every stage starts from."""
        from ensemble_bench.recipe import Recipe

        if getattr(self.config, "effective_recipe", None):
            return Recipe.from_dict(self.config.effective_recipe)
        return self.config.run_recipe()

    def add_training_cost(self, *, flops: float = 0.0, seconds: float = 0.0) -> None:
        """Training work the trainer does not see (mask updates, a search, batch-norm passes, a
        calibration fit): ``flops`` join the record's ``train_flops``, ``seconds`` its ``train_s`` (and
        ``train_s_extra``). Calls add up."""
        self.extra_train_flops += float(flops)
        self.extra_train_s += float(seconds)

    def member_seed(self, k: int) -> int:
        """Initialisation seed of member k of this run's seed; member 0 is the ``single`` model of the same
        seed, so every method that trains independent full members shares them (DE-2 inside DE-4, a
        bridge's base models, DST members)."""
        from ensemble_bench.train import stable_seed

        return stable_seed(self.seed, "member", k)

    def member_stage_seed(self, k: int) -> tuple:
        """Data-order seed of member k's training stage (the ``seed`` argument of ``Trainer.fit``)."""
        return ("member", self.seed, k)

    def require_staged_backbone(self, why: str) -> None:
        """For a choice that needs a staged backbone only under some options (e.g. a batched layout)."""
        require_staged(getattr(self.config, "method", "this method"), self.backbone_name, why)

    def make_backbone(self, *, num_classes: int | None = None, in_channels: int | None = None,
                      layers: Any = None, seed: int | None = None) -> nn.Module:
        """A fresh backbone of the run. ``seed`` makes its initialisation reproducible."""
        from ensemble_bench.backbones import build_backbone

        if seed is not None:
            torch.manual_seed(seed)
        return build_backbone(self.config.backbone, num_classes=num_classes or self.num_classes,
                              in_channels=in_channels or self.in_channels, layers=layers)


def require_staged(method: str, backbone: str, why: str) -> None:
    from ensemble_bench import backbones
    from ensemble_bench.errors import UsageError

    if not backbones.is_staged_name(backbone):
        kind = "a timm model" if backbone.startswith("timm:") else "a plain (not staged) plugin backbone"
        raise UsageError(f"{method} needs a staged backbone ({why}); {backbone!r} is {kind}: use one of "
                         f"{', '.join(backbones.staged_names())}")


class Method:
    """Base class of a method. Subclasses set ``Config`` (a dataclass with the paper's defaults),
    implement ``build`` (architecture only) and ``fit`` (train and return the EnsembleModel)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # True when the members are independent, full copies of the backbone trained with the single-model
    # recipe: records of such a method at sizes 1..M form the deep-ensemble size curve that the
    # deep-ensemble-equivalent size (DEE) of every other method is read from.
    size_reference: ClassVar[bool] = False
    # options the quickstart (a few epochs on 8x8 digits) uses instead of the defaults, where the paper's
    # value only makes sense at its own scale (e.g. FreeTickets' update frequency in steps)
    quickstart_options: ClassVar[dict] = {}
    # Non-empty when the method only works on a *staged* backbone (a StagedNet built from the suite's
    # layer factory: every suite backbone, a plugin registered with staged=True; not timm models): why,
    # in a few words. Checked by name before any data is loaded or anything is built (``check_backbone``).
    staged_backbone: ClassVar[str] = ""
    # How one training step of the method differs from a plain forward/backward of its deployed model,
    # when it does (benchmarks/throughput.py prints it beside the measured training throughput).
    train_note: ClassVar[str] = ""
    # True when (some of) the method's members are independent trainings that ``fit_member(ctx, k)`` trains
    # one at a time exactly as ``fit`` trains them (same stage name, seed, recipe, selection): they can then
    # run as separate jobs (``run --members-parallel``, a sweep's ``members_parallel``), and ``fit``, run
    # after them, finds each finished (its checkpoint or the stage store) instead of training it again.
    independent_members: ClassVar[bool] = False

    @dataclass
    class Config:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Config()

    def build(self, ctx: FitContext) -> EnsembleModel:
        raise NotImplementedError

    def fit(self, ctx: FitContext) -> EnsembleModel:
        raise NotImplementedError

    def member_tasks(self) -> int:
        """How many members ``fit_member`` trains apart with these options (0: the method trains as one job)."""
        return 0

    def fit_member(self, ctx: FitContext, k: int) -> None:
        """Train member ``k`` alone, exactly as ``fit`` trains it (``independent_members`` methods)."""
        raise NotImplementedError

    @classmethod
    def paper_recipe(cls, run, backbone: str):
        """The recipe of the method's paper for ``backbone``, scaled to ``run.epochs`` (a
        ``ensemble_bench.recipe.Recipe``), or None when the paper used the backbone's standard single-model
        recipe (then ``--recipe paper`` trains exactly as ``shared``). Override with the citation."""
        return None

    @classmethod
    def effective_recipe(cls, run, mode: str, backbone: str):
        """The recipe this method trains with under ``mode`` ("shared": the run's own)."""
        if mode == "paper":
            return cls.paper_recipe(run, backbone) or run
        return run

    @classmethod
    def check_backbone(cls, backbone: str) -> None:
        """One ``UsageError`` line when this method cannot use ``backbone`` (see ``staged_backbone``)."""
        if cls.staged_backbone:
            require_staged(cls.name, backbone, cls.staged_backbone)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(cls.Config)}


def member_cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduce_members: str = "sum") -> torch.Tensor:
    """Cross-entropy of member logits [M, B, C] against labels [B] (shared) or [M, B] (per member),
    averaged over the batch and summed (default; keeps each member's gradient unscaled) or averaged over
    members."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    m, b, c = logits.shape
    if y.dim() == 1:
        y = y.unsqueeze(0).expand(m, b)
    per_member = nn.functional.cross_entropy(logits.reshape(m * b, c).float(), y.reshape(m * b),
                                             reduction="none").view(m, b).mean(dim=1)
    return per_member.sum() if reduce_members == "sum" else per_member.mean()


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return member_cross_entropy(model(x), y, "sum")
