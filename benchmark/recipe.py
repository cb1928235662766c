"""The training recipe: every setting that reaches the optimiser, as one value.

A run has ONE effective recipe, derived before training from the run's settings and its recipe mode:

  shared (default)  every method trains with the run's recipe (lr, batch, schedule, momentum, ...): a
                    leaderboard row differs from another only by the method.
  paper             each method trains with the recipe its paper published, declared in its method file
                    (``Method.paper_recipe``) with the citation and scaled to the run's epochs; a method
                    whose paper used the backbone's standard recipe declares nothing and trains as under
                    ``shared`` (then both modes are the same experiment, with the same run id).

The run id and the leaderboard's group key are derived from the effective recipe, never from the mode's
name, so two runs are seeds of one row only if they trained with the same recipe.

A method made of several stages (EDST's exploration and refinement windows, a bridge's curve and bridge
networks, snapshot cycles) derives each stage's recipe from the effective one with ``Recipe.replace``,
inside its own file, as part of the method; the trainer records every stage's recipe as trained and the
record lists the stages whose recipe differs from the run's.

Schedules (the lr multiplier at fractional epoch t of a stage of E epochs, after ``warmup_epochs`` of
linear warm-up):
  cosine         cosine from 1 to 0 over the epochs after warm-up
  multistep      x ``lr_decay`` at each of ``milestones`` (fractions of E)
  linear         NFE's curve: 1 until 50 %, linear to 0.01 at 90 %, then 0.01
  constant       1
  cyclic_cosine  ``cycles`` equal cosine cycles, each restarting at 1 (snapshot ensembles)
``milestones`` and ``lr_decay`` are read by multistep only and ``cycles`` by cyclic_cosine only: under
another schedule a Recipe holds their defaults whatever it was given (``UNUSED_UNLESS``), so the same
training never gets two run ids.

``label_smoothing`` and ``mixup_alpha`` are part of the recipe so a record says when a stage used them;
the suite's shared recipe uses neither (a method stage that mixes its inputs, like the bridge networks',
sets ``mixup_alpha`` on its stage recipe).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ensemble_bench.errors import UsageError

RECIPE_MODES = ("shared", "paper")
SCHEDULES = ("cosine", "multistep", "linear", "constant", "cyclic_cosine")
FLOAT32_MAX = 3.4028234663852886e38   # the largest float32: an lr above it overflows in the optimiser


# metadata of the recipe fields the leaderboard keeps as numeric columns of their own (group keys); the
# other fields share its "recipe" column (ensemble_bench.columns.RECIPE_FIELDS)
OWN_COLUMN = {"own_column": True}


@dataclass(frozen=True)
class Recipe:
    epochs: int = field(default=10, metadata=OWN_COLUMN)
    batch_size: int = field(default=128, metadata=OWN_COLUMN)
    lr: float = field(default=0.1, metadata=OWN_COLUMN)
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    cycles: int = 1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    weight_decay_on: str = "all"     # which parameters the decay applies to ("all": conv, linear, norm, bias)
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        self.validate()
        # A setting the schedule never reads takes its default, so one training has one recipe (and one
        # run id, one group key, one stage-share key): `--milestones 0.3,0.6` under cosine is the cosine
        # run. Defaults are what every record made before this rule holds, so their ids are unchanged.
        for name, used_by in UNUSED_UNLESS.items():
            if self.schedule != used_by:
                object.__setattr__(self, name, _DEFAULTS[name])

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise UsageError(msg)

        if isinstance(self.epochs, bool) or int(self.epochs) != self.epochs or self.epochs < 1:
            bad(f"epochs must be >= 1 (an integer); got {self.epochs}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            bad(f"batch_size must be >= 1 (an integer); got {self.batch_size}")
        for name in ("lr", "warmup_epochs", "lr_decay", "momentum", "weight_decay", "label_smoothing",
                     "mixup_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number; got {v!r}")
        if not 0 < self.lr <= FLOAT32_MAX:
            bad(f"lr must be > 0 and a float32 number (<= 3.4e38); got {self.lr}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            bad(f"warmup_epochs must be in [0, epochs={self.epochs}); got {self.warmup_epochs}")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or any(
                b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            bad(f"milestones are increasing fractions of the epochs in (0, 1); got {list(self.milestones)}")
        if not 0.0 < self.lr_decay <= 1.0:
            bad(f"lr_decay must be in (0, 1]; got {self.lr_decay}")
        if isinstance(self.cycles, bool) or int(self.cycles) != self.cycles or not 1 <= self.cycles <= self.epochs:
            bad(f"cycles must be an integer in [1, epochs={self.epochs}]; got {self.cycles}")
        if not 0.0 <= self.momentum < 1.0:
            bad(f"momentum must be in [0, 1); got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            bad("nesterov needs momentum > 0")
        if not 0.0 <= self.weight_decay < 1.0:
            bad(f"weight_decay must be in [0, 1); got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            bad(f"mixup_alpha must be >= 0; got {self.mixup_alpha}")

    # ------------------------------------------------------------------------------------ values
    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "milestones" else v) for k, v in d.items() if k in names})

    def lr_factor(self, t: float) -> float:
        """Multiplier of ``lr`` at fractional epoch ``t`` (0 <= t <= epochs) of this stage."""
        return lr_factor(self.schedule, t, self.epochs, self.warmup_epochs, self.milestones, self.lr_decay,
                         self.cycles)

    def lr_at(self, t: float) -> float:
        return self.lr * self.lr_factor(t)


def lr_factor(schedule: str, t: float, epochs: float, warmup: float = 0.0,
              milestones: tuple[float, ...] = (0.5, 0.75), decay: float = 0.1, cycles: int = 1) -> float:
    """Learning-rate multiplier at fractional epoch ``t`` of ``epochs`` (see the module docstring)."""
    if warmup > 0 and t < warmup:
        return (t + 1e-12) / warmup
    if schedule == "cosine":
        span = max(epochs - warmup, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(t - warmup, 0.0) / span, 1.0)))
    if schedule == "cyclic_cosine":
        cycle = epochs / cycles
        within = min(t, epochs - 1e-9) % cycle
        return 0.5 * (1.0 + math.cos(math.pi * within / cycle))
    if schedule == "multistep":
        return decay ** sum(t >= m * epochs for m in milestones)
    if schedule == "linear":
        f = t / epochs
        if f < 0.5:
            return 1.0
        if f < 0.9:
            return 1.0 - 0.99 * (f - 0.5) / 0.4
        return 0.01
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def is_cycle_end(before: float, lr: float, after: float) -> bool:
    """Whether an epoch whose last step ran at ``lr`` ends a learning-rate cycle: the rate fell into it and
    rises after it (a restart, as in a cyclic cosine schedule). A warm-up (rising from the start), a step
    decay (falls, then stays) and a schedule that decays to its end have none."""
    return before > lr < after


def cycle_ends(lrs: "list[float] | tuple[float, ...]") -> list[int]:
    """The indices of the epochs that end a learning-rate cycle (``is_cycle_end``) in a per-epoch list of
    the rate at each epoch's last step (a learning curve's ``lr``); the last epoch is never one."""
    return [i for i in range(1, len(lrs) - 1) if is_cycle_end(lrs[i - 1], lrs[i], lrs[i + 1])]


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
# The settings only one schedule reads (see lr_factor): under any other they are set to their defaults.
UNUSED_UNLESS = {"milestones": "multistep", "lr_decay": "multistep", "cycles": "cyclic_cosine"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Recipe)}
def ignored_settings(settings: Any) -> list[str]:
    """For a run's settings (a RunConfig, or anything with its recipe fields as attributes), one line per
    setting given a value that its schedule never reads (``--milestones 0.3`` under cosine): the recipe holds
    the default instead (same training, same run id), and the user is told rather than left to think it
    acted."""
    schedule = getattr(settings, "schedule", None)
    out = []
    for name, used_by in UNUSED_UNLESS.items():
        value = getattr(settings, name, None)
        if value is None or schedule == used_by:
            continue
        norm = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value
        if norm != _DEFAULTS[name]:
            shown = ",".join(f"{v:g}" for v in norm) if isinstance(norm, tuple) else value
            out.append(f"{name}={shown} is read only by schedule {used_by!r}; this run's schedule is "
                       f"{schedule!r}, so it is ignored")
    return out


OWN_COLUMN_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.metadata.get("own_column"))


def differences(recipe: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``recipe`` whose value differs from ``reference`` ({} when equal)."""
    return {k: v for k, v in recipe.items() if reference.get(k) != v}
