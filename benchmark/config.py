"""RunConfig: everything that defines one run, its fields' coercion, TOML reading and the stable run id.

Plain data: nothing here imports a registry or loads data. Making a checked run from user input
(names, option defaults, effective recipe, data identity) is :mod:`ensemble_bench.resolve`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ensemble_bench.errors import UsageError
from ensemble_bench.registry import did_you_mean
from ensemble_bench.recipe import RECIPE_FIELDS as _RECIPE_FIELDS

DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1
MAX_EPOCHS = 100_000   # per stage; far beyond any published recipe (a typo guard, not a budget)
MAX_LATENCY_RUNS = 100_000   # timed batch-1 forwards; a typo guard (the spec asks for 50)

# Fields that say where things live or how a run is executed, not what is computed: they do not enter
# the run id, so the same experiment keeps its id whatever folder or machine it is written from.
NON_IDENTITY_FIELDS = ("out", "data_dir", "download", "device", "progress", "save_predictions",
                       "keep_weights", "reuse_stages", "compile", "latency_runs", "shift", "plugins",
                       "members_parallel")
# Derived by ``resolve`` (never typed by a user): the effective recipe as trained and the identity of the
# data actually loaded. Both are in the run id and the record.
DERIVED_FIELDS = ("effective_recipe", "data_id")
# What a run is, besides its recipe and settings: the leaderboard's own row keys (and the seed).
EXPERIMENT_FIELDS = ("method", "options", "backbone", "dataset", "seed")


@dataclass
class RunConfig:
    method: str = ""             # a registered method name (validated by resolve)
    backbone: str = "cnn_small"
    dataset: str = "digits"
    epochs: int = 10
    seed: int = 0
    # the run's training recipe (benchmark/recipe.py): under recipe="shared" every method trains with it;
    # under recipe="paper" each method with its published one (its method file declares it)
    recipe: str = "shared"
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of the epochs, for schedule=multistep
    lr_decay: float = 0.1                           # multiplicative step of schedule=multistep
    val_fraction: float = 0.1
    bf16: bool = True            # autocast on CUDA only
    channels_last: bool = True   # on CUDA only
    options: dict[str, Any] = field(default_factory=dict)
    # execution (not part of the run id)
    out: str = "results/runs"
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    progress: bool = True
    save_predictions: bool = True
    keep_weights: bool = True    # the final weights beside the record (<run_id>.weights.safetensors)
    reuse_stages: bool = True    # load a plain stage another run of this folder trained identically (train.py)
    # train the members of a method with independent members (Method.independent_members) as separate jobs
    # (local processes, or a Slurm array whose dependent task assembles): the same record, in less wall time
    members_parallel: bool = False
    compile: bool = False
    latency_runs: int = 50
    # a corrupted test set (ensemble_bench.shift.SHIFT_SETS: "cifar10c", "cifar100c") evaluated after training, read
    # from the data folder; it adds evaluations and changes nothing that is trained, so it is not in the run id
    shift: str | None = None
    # the user's code to import first (ensemble_bench.plugins): .py files (kept as absolute paths, so a
    # sweep's jobs import the same files) or module names. Where a method comes from is in the record's
    # `code` (with a hash of its file), not in the run id: moving a plugin file keeps its runs.
    plugins: tuple[str, ...] = ()
    # derived by resolve() (see DERIVED_FIELDS)
    effective_recipe: dict[str, Any] | None = None
    data_id: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from ensemble_bench.plugins import normalise

        self.milestones = tuple(float(m) for m in self.milestones)
        if isinstance(self.plugins, str):
            self.plugins = (self.plugins,)
        self.plugins = tuple(dict.fromkeys(normalise(p) for p in self.plugins))
        self.validate()

    def validate(self) -> None:
        from ensemble_bench.recipe import RECIPE_MODES

        if self.recipe not in RECIPE_MODES:
            raise UsageError(f"unknown recipe mode {self.recipe!r}; choose from {', '.join(RECIPE_MODES)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be in [0, 2**63 - 1]; got {self.seed}")
        if self.epochs > MAX_EPOCHS:
            raise UsageError(f"epochs must be <= {MAX_EPOCHS:,}; got {self.epochs}")
        self.run_recipe()   # every recipe value and combination (ensemble_bench.recipe.Recipe.validate)
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if not 1 <= self.latency_runs <= MAX_LATENCY_RUNS:
            raise UsageError(f"latency_runs must be in [1, {MAX_LATENCY_RUNS:,}]; got {self.latency_runs}")
        if not str(self.out).strip():
            raise UsageError("out must name a folder for the records; got an empty string")
        if self.shift is not None:
            check_shift(self.shift, self.dataset)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["plugins"] = list(self.plugins)
        return d

    def run_recipe(self):
        """The run's own recipe (before the mode): a ``ensemble_bench.recipe.Recipe``."""
        from ensemble_bench.recipe import Recipe

        return Recipe(**{k: getattr(self, k) for k in RUN_RECIPE_FIELDS})

    def identity(self) -> dict[str, Any]:
        """What the run id is a hash of: the experiment (method, options, backbone, data as loaded, the
        effective recipe, seed, ...), not where or how it is executed, nor how its recipe was spelled."""
        if self.effective_recipe is None or self.data_id is None:
            from ensemble_bench.resolve import resolve   # the registries and the data sit above this module

            resolve(self)
        d = self.to_dict()
        for k in (*NON_IDENTITY_FIELDS, *RUN_RECIPE_FIELDS, "recipe"):
            d.pop(k, None)
        from ensemble_bench.data import identity_name

        d["dataset"] = identity_name(self.dataset, self.data_id)   # a dataset TOML: its name, not its path
        return d

    def run_id(self) -> str:
        return run_id_of(self.identity())

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes``; the derived fields are derived again when next needed."""
        changes.setdefault("effective_recipe", None)
        changes.setdefault("data_id", None)
        return dataclasses.replace(self, **changes)


# The run's recipe settings (the RunConfig fields that are ``Recipe`` fields) and its mode enter the run id
# only through the effective recipe derived from them (``effective_recipe``): two runs that train with the
# same recipe are the same experiment whatever mode or spelling produced it.
RUN_RECIPE_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name in _RECIPE_FIELDS)
# The run settings that change what is computed besides the recipe (val_fraction, bf16, ...): every other
# field in the run id. The leaderboard keeps them in its "recipe" column (ensemble_bench.columns).
RUN_SETTING_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name not in (
    *EXPERIMENT_FIELDS, "recipe", *RUN_RECIPE_FIELDS, *NON_IDENTITY_FIELDS, *DERIVED_FIELDS))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: identical for dicts that differ only in key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def run_id_of(identity: dict[str, Any]) -> str:
    """Stable across processes and Python versions: sha256 of canonical JSON (floats print the same)."""
    digest = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
    return f"{identity.get('method', 'run')}-{digest[:16]}"


# ---------------------------------------------------------------------------------------- values
def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a CLI string (or TOML value) to the field's type; one clear error line otherwise."""
    tp = _strip_optional(tp)
    if isinstance(tp, str):  # postponed annotation
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(tp.split("|")[0].strip(), str)
    origin = typing.get_origin(tp)
    try:
        if value is None:
            return None
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError
            return v
        if tp is str:   # a TOML number or list where a name or path belongs (out = 5): refused, not str()-ed
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin in (tuple, list):
            (inner, *_) = typing.get_args(tp) or (str,)
            items = value if isinstance(value, (list, tuple)) else [s for s in str(value).split(",") if s.strip()]
            return tuple(coerce(v, inner, name) for v in items)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pretty = getattr(tp, "__name__", str(tp))
        raise UsageError(f"bad value for {name}: {value!r} is not a valid {pretty}") from None
    return value


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value; got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UsageError(f"--set expects key=value; got {item!r}")
        if k in out and out[k] != v:   # which one was meant? (the same value twice is harmless)
            raise UsageError(f"--set {k} is given twice ({k}={out[k]} and {k}={v}): keep one")
        out[k] = v
    return out


def build_options(config_cls: type, values: dict[str, Any], method: str) -> Any:
    """Instantiate a method's Config dataclass from user values, with one-line errors."""
    hints = typing.get_type_hints(config_cls)
    valid = [f.name for f in fields(config_cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in valid:
            listed = ", ".join(valid) if valid else "(none)"
            raise UsageError(f"unknown option {k!r} for method {method!r}{did_you_mean(k, valid)}; "
                             f"valid options: {listed}")
        kwargs[k] = coerce(v, hints[k], f"{method}.{k}")
    try:
        return config_cls(**kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad options for method {method!r}: {e}") from None


def options_dict(opts: Any) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------- run config
RUN_FIELDS = {f.name: f for f in fields(RunConfig)}
USER_FIELDS = [k for k in RUN_FIELDS if k not in DERIVED_FIELDS]



def check_shift(name: Any, dataset: str) -> None:
    """A shift set's name is known and is the corrupted test set of ``dataset`` (no file is read)."""
    from ensemble_bench.shift import SHIFT_SETS

    if not isinstance(name, str) or name not in SHIFT_SETS:
        raise UsageError(f"unknown shift set {name!r}; choose from {', '.join(SHIFT_SETS)}")
    clean = SHIFT_SETS[name][2]
    if dataset != clean:
        raise UsageError(f"shift set {name} is the corrupted {clean} test set; a run on {dataset!r} cannot be "
                         f"evaluated on it (use --dataset {clean}, or leave out --shift)")


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"config file {p} is a folder, not a TOML file")
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot parse {p}: {e}") from None
