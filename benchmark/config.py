"""RunConfig: everything that defines one run, TOML loading, option parsing and the stable run id."""
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

from benchmark.errors import UsageError

SCHEDULES = ("cosine", "multistep", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")

# Fields that say where things live or how a run is executed, not what is computed: they do not enter
# the run id, so the same experiment keeps its id whatever folder or machine it is written from.
NON_IDENTITY_FIELDS = ("out", "data_dir", "download", "device", "progress", "save_predictions",
                       "compile", "latency_runs")


@dataclass
class RunConfig:
    method: str = ""             # a registered method name (validated by resolve)
    backbone: str = "cnn_small"
    dataset: str = "digits"
    epochs: int = 10
    seed: int = 0
    # the shared training recipe (every method gets the same one; a method may adjust what its paper
    # prescribes through its own options, and the record shows the resolved values)
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
    compile: bool = False
    latency_runs: int = 50

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.validate()

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0; got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise UsageError(f"milestones are fractions of the epochs in (0, 1); got {list(self.milestones)}")
        if self.latency_runs < 1:
            raise UsageError(f"latency_runs must be >= 1; got {self.latency_runs}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in NON_IDENTITY_FIELDS:
            d.pop(k, None)
        return d

    def run_id(self) -> str:
        return run_id_of(self.identity())

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


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
        if tp is str:
            return str(value)
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
            raise UsageError(f"unknown option {k!r} for method {method!r}; valid options: {listed}")
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


def make_run_config(values: dict[str, Any]) -> RunConfig:
    """RunConfig from loose values (CLI strings or TOML types). Method options are resolved with the
    method's defaults, so a run id does not depend on whether a default was typed out."""
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k not in RUN_FIELDS:
            raise UsageError(f"unknown run setting {k!r}; valid settings: {', '.join(RUN_FIELDS)}")
        if v is None:
            continue
        kwargs[k] = v if k == "options" else coerce(v, hints[k], k)
    cfg = RunConfig(**kwargs)
    return resolve(cfg)


def resolve(cfg: RunConfig) -> RunConfig:
    """Check method/backbone/dataset names and fill the method's option defaults."""
    import methods
    from benchmark import backbones, data

    method_cls = methods.get(cfg.method)
    backbones.check_name(cfg.backbone)
    data.check_name(cfg.dataset)
    opts = build_options(method_cls.Config, dict(cfg.options or {}), cfg.method)
    cfg.options = options_dict(opts)
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot parse {p}: {e}") from None


def run_config_from_toml(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    doc = load_toml(path)
    values = {k: v for k, v in doc.items() if k != "options"}
    if "options" in doc and not isinstance(doc["options"], dict):
        raise UsageError(f"{path}: [options] must be a table")
    values["options"] = dict(doc.get("options", {}))
    for k, v in (overrides or {}).items():
        if k == "options":
            values["options"].update(v)
        else:
            values[k] = v
    return make_run_config(values)
