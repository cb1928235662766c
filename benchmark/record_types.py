"""The result record as types: one definition the runner writes and every reader reads.

A record file (layout in :mod:`ensemble_bench.records`) is a :class:`RunRecord`: the run's identity
(``schema_version``, ``run_id``, ``status``), the configuration as stored (``config``, a plain dict:
``RunConfig.to_dict()``), and typed sections :class:`MethodInfo`, :class:`Metrics`, :class:`Cost` and
:class:`Training`. ``data``, ``code``, ``env`` and ``timings`` stay plain dicts; ``error`` is a string or
None. Each section types the keys that readers rely on; every other key (an older or newer writer's, a
method's) is kept in the section's ``extra`` mapping, and the order of the keys as read is kept too, so
``RunRecord.from_dict(d).to_dict() == d`` exactly, key order included.

:meth:`RunRecord.from_dict` validates: a missing or mistyped field is one :class:`RecordError` line
naming the file, the field and the type expected. A record marked complete must have what the leaderboard
needs: its ``config`` and ``metrics`` with the numbers ``acc`` and ``nll`` (the fields declared
``required`` below); a running or failed record needs only its identity. To add a record field: declare
it on its section here (with its kind), and the runner sets it.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

SCHEMA_VERSION = 1
STATUSES = ("complete", "failed", "running")
_BAD_RUN_ID = re.compile(r"[/\\\x00]")


class RecordError(ValueError):
    """A file is not a readable result record (or a results directory is missing)."""


def check_record(rec: Any, where: str) -> dict:
    """The identity of a record (any status): schema_version, run_id, status. Returns ``rec``."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: not a result record (top level is {type(rec).__name__}, not an object)")
    missing = [k for k in ("schema_version", "run_id", "status") if k not in rec]
    if missing:
        raise RecordError(f"{where}: not a result record (missing {', '.join(missing)})")
    version = rec["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecordError(f"{where}: bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"{where}: schema_version {version} is newer than this code understands ({SCHEMA_VERSION}); update ensemble-bench"
        )
    run_id = rec["run_id"]
    if not isinstance(run_id, str) or not run_id or run_id.startswith(".") or _BAD_RUN_ID.search(run_id):
        raise RecordError(f"{where}: bad run_id {run_id!r} (must be a non-empty file name without / or leading .)")
    if rec["status"] not in STATUSES:
        raise RecordError(f"{where}: bad status {rec['status']!r} (expected one of {', '.join(STATUSES)})")
    return rec


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# the kinds of a typed field: (test, what the message says is expected). Numbers are any real number but a
# bool (ints stay ints, so a record round-trips exactly); numpy scalars count, they are written as numbers.
_KINDS: dict[str, tuple[Any, str]] = {
    "number": (_real, "a number"),
    # metrics with a range: a hand-edited or foreign record with acc = 5.0 (a percentage?) is refused, not
    # ranked. NaN passes, as for any number (a metric that could not be computed).
    "fraction": (lambda v: _real(v) and (v != v or 0 <= v <= 1), "a number in [0, 1]"),   # v != v: NaN
    "nonneg": (lambda v: _real(v) and (v != v or v >= 0), "a number >= 0"),   # (math.isnan fails on huge ints)
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, Mapping), "an object"),
}


def _f(kind: Any, *, required: bool = False) -> Any:
    """A typed field (None: absent). ``kind``: a key of _KINDS or a section class; ``required``: a complete
    record must have it (not None)."""
    return field(default=None, metadata={"kind": kind, "required": required})


def _typed(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def _expected(kind: Any) -> str:
    return _KINDS[kind][1] if isinstance(kind, str) else kind.EXPECTED


def _tname(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string"}.get(type(v), type(v).__name__)


@dataclass(frozen=True, kw_only=True)
class Section:
    """A typed part of a record: typed fields (None = absent), ``extra`` (every other key, as read) and the
    order of the keys as read (``keys``; empty for a section built in code: declared order, extras last)."""

    extra: dict = field(default_factory=dict, repr=False)
    keys: tuple = field(default=(), repr=False, compare=False)

    ALWAYS: ClassVar[tuple[str, ...]] = ()        # written even when None (a section built in code)
    EXTRA_AFTER: ClassVar[str | None] = None      # built in code: the extra keys go after this field
    EXPECTED: ClassVar[str] = "an object"         # what a message says the section must be

    @classmethod
    def from_dict(cls, d: Any, where: str = "record", *, complete: bool = False, path: str = ""):
        """Validate ``d`` (a section of a record in ``where``) and type it. ``complete``: the required
        fields must be there. Raises :class:`RecordError` (one line)."""
        name = path or "record"
        if not isinstance(d, Mapping):
            raise RecordError(f"{where}: {name} must be an object, not {_tname(d)}")
        kw: dict[str, Any] = {}
        for f in _typed(cls):
            dotted = f"{path}.{f.name}" if path else f.name
            kind, v = f.metadata["kind"], d.get(f.name)
            if v is None:
                if complete and f.metadata["required"]:
                    raise RecordError(f"{where}: marked complete but has no {dotted} ({_expected(kind)})"
                                      + (": not a finished result" if f.name in ("acc", "nll", "metrics") else ""))
                if f.name in d:
                    kw[f.name] = None
                continue
            if isinstance(kind, str):
                ok, expected = _KINDS[kind]
                if not ok(v):
                    raise RecordError(f"{where}: {dotted} must be {expected}, not {_tname(v)} {_short(v)}")
                if complete and f.metadata["required"] and _real(v) and v != v:   # acc, nll: the result itself
                    raise RecordError(f"{where}: marked complete but its {dotted} is NaN: not a finished result")
                kw[f.name] = v
            else:
                kw[f.name] = kind.from_dict(v, where, complete=complete, path=dotted)
        names = {f.name for f in _typed(cls)}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))

    def _default_keys(self) -> list[str]:
        keys = [f.name for f in _typed(type(self)) if getattr(self, f.name) is not None or f.name in self.ALWAYS]
        at = keys.index(self.EXTRA_AFTER) + 1 if self.EXTRA_AFTER in keys else len(keys)
        return keys[:at] + [k for k in self.extra if k not in keys] + keys[at:]

    def to_dict(self) -> dict:
        """The section as the dict it was read from (or as the runner writes it), key order included."""
        typed = {f.name for f in _typed(type(self))}
        out: dict[str, Any] = {}
        for k in self.keys or self._default_keys():
            if k in typed:
                out[k] = _plain(getattr(self, k))
            elif k in self.extra:
                out[k] = self.extra[k]
        for k in self._default_keys():   # set after reading (dataclasses.replace): appended
            if k not in out and (k not in typed or getattr(self, k) is not None):
                out[k] = _plain(getattr(self, k)) if k in typed else self.extra[k]
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """A key of the section as in the dict (typed or extra); ``default`` when absent or None."""
        v = getattr(self, key) if key in {f.name for f in _typed(type(self))} else self.extra.get(key)
        return default if v is None else v


def _plain(v: Any) -> Any:
    return v.to_dict() if isinstance(v, Section) else v


def _short(v: Any) -> str:
    s = repr(v)
    return f"({s})" if len(s) <= 40 else f"({s[:39]}…)"


@dataclass(frozen=True, kw_only=True)
class MethodInfo(Section):
    """``method``: the method as run. ``options`` resolved with defaults; ``size_reference``: its members are
    independent full copies of the backbone (its records form the deep-ensemble size curve)."""

    name: str | None = _f("str")
    options: dict | None = _f("dict")
    size_reference: bool | None = _f("bool")
    combine: str | None = _f("str")
    num_members: int | None = _f("int")
    info: dict | None = _f("dict")


@dataclass(frozen=True, kw_only=True)
class Metrics(Section):
    """``metrics``: test-set metrics of the ensemble (``ood``: {set: {score: {auroc, ...}}}, ``shift``: the
    corrupted-set evaluation), other keys in ``extra``. A complete record has ``acc`` and ``nll``."""

    EXPECTED: ClassVar[str] = "an object with the numbers acc, nll"

    acc: float | None = _f("fraction", required=True)
    nll: float | None = _f("nonneg", required=True)
    brier: float | None = _f("nonneg")
    ece: float | None = _f("fraction")
    member_acc: float | None = _f("fraction")
    disagreement: float | None = _f("fraction")
    nll_ts: float | None = _f("nonneg")
    ece_ts: float | None = _f("fraction")
    temperature: float | None = _f("nonneg")
    aurc: float | None = _f("fraction")
    acc_at_95: float | None = _f("fraction")
    ece_adaptive: float | None = _f("fraction")
    ood: dict | None = _f("dict")
    shift: dict | None = _f("dict")

    @classmethod
    def from_dict(cls, d: Any, where: str = "record", *, complete: bool = False, path: str = ""):
        """As Section.from_dict, and the numbers inside ``ood`` and ``shift`` are held to the same ranges as
        the top-level metrics: the leaderboard averages them too (an AUROC of 35.97, a percentage, would
        be ranked; a string one would blank its row)."""
        m = super().from_dict(d, where, complete=complete, path=path)
        at = f"{path}." if path else ""
        if m.ood is not None:     # {set: {score: {auroc, aupr_in, aupr_out, fpr95}}}
            for set_name, by_score in _entries(m.ood, where, f"{at}ood"):
                for score, values in _entries(by_score, where, set_name):
                    _check_values(values, where, score, OOD_KINDS)
        if m.shift is not None:   # shift.evaluate_shift: summaries of {metric: value} cells
            s = m.shift
            _check_values(s, where, f"{at}shift", {"temperature": "nonneg"})
            cells = [(f"{at}shift.mean", s.get("mean"))] if s.get("mean") is not None else []
            for part in ("by_corruption", "by_severity"):
                if s.get(part) is not None:
                    cells += _entries(s[part], where, f"{at}shift.{part}")
            if s.get("per_corruption") is not None:
                for name, by_severity in _entries(s["per_corruption"], where, f"{at}shift.per_corruption"):
                    cells += _entries(by_severity, where, name)
            for name, values in cells:
                _check_values(values, where, name, _CELL_KINDS)
        return m


# the OOD metrics of a score against a set (metrics.ood_metrics): areas and rates, all in [0, 1]
OOD_KINDS = {"auroc": "fraction", "aupr_in": "fraction", "aupr_out": "fraction", "fpr95": "fraction"}
# a shift cell holds top-level metric keys (metrics.SHIFT_KEYS): each has its top-level kind
_CELL_KINDS = {f.name: f.metadata["kind"] for f in _typed(Metrics) if f.metadata["kind"] in ("fraction", "nonneg")}


def _entries(d: Any, where: str, dotted: str) -> list[tuple[str, Any]]:
    """(dotted name, value) of each entry of the object ``d`` (named ``dotted``); RecordError if no object."""
    if not isinstance(d, Mapping):
        raise RecordError(f"{where}: {dotted} must be an object, not {_tname(d)} {_short(d)}")
    return [(f"{dotted}.{k}", v) for k, v in d.items()]


def _check_values(d: Any, where: str, dotted: str, kinds: dict[str, str]) -> None:
    """Each key of ``kinds`` in the object ``d`` is of its kind, as a typed field is (None: absent; NaN
    passes, a metric that could not be computed); other keys are kept as read."""
    for name, v in _entries(d, where, dotted):
        kind = kinds.get(name[len(dotted) + 1:])
        if kind is not None and v is not None and not _KINDS[kind][0](v):
            raise RecordError(f"{where}: {name} must be {_KINDS[kind][1]}, not {_tname(v)} {_short(v)}")


@dataclass(frozen=True, kw_only=True)
class Cost(Section):
    """``cost``: size, compute and timing of the trained ensemble; each timing names its device."""

    params: float | None = _f("nonneg")
    params_nonzero: float | None = _f("nonneg")
    flops: float | None = _f("nonneg")
    macs: float | None = _f("nonneg")
    flops_dense: float | None = _f("nonneg")
    latency_ms: float | None = _f("nonneg")
    latency_ms_p10: float | None = _f("nonneg")
    latency_ms_p90: float | None = _f("nonneg")
    throughput: float | None = _f("nonneg")
    peak_mem_mb: float | None = _f("nonneg")
    device: str | None = _f("str")
    latency_device: str | None = _f("str")
    throughput_device: str | None = _f("str")


@dataclass(frozen=True, kw_only=True)
class Training(Section):
    """``training``: the stages as trained (``stages``: {name: {curve, recipe_changes, converges, ...}}) and
    the totals: ``train_s`` on ``device``, ``train_flops``, ``samples_seen``, ``epochs_run`` per stage, and the
    ``precision`` it trained in ("bf16" or "fp32"; records before 2026-12-04 leave it out). A run whose epochs
    trained on more than one device or precision (resumed elsewhere, a stage reused from another machine)
    names each, " + "-joined; ``device_epochs`` counts its epochs per device (each stage's ``segments`` say
    which; records before 2026-12-05 leave both out). ``compiled``: some epochs trained under torch.compile
    (``--compile``, CUDA or a CPU with a C++ compiler; records before 2026-12-05 leave it out)."""

    train_s: float | None = _f("nonneg")
    train_flops: float | None = _f("nonneg")
    samples_seen: float | None = _f("nonneg")
    epochs_run: dict | None = _f("dict")
    stages: dict | None = _f("dict")
    device: str | None = _f("str")
    precision: str | None = _f("str")
    device_epochs: dict | None = _f("dict")
    compiled: bool | None = _f("bool")


@dataclass(frozen=True, kw_only=True)
class RunRecord(Section):
    """One run's record (``<run_id>.json``). Keys other than these (``weights``, ``traceback``,
    ``evaluations``, a newer writer's) are kept in ``extra``."""

    schema_version: int = _f("int")
    run_id: str | None = _f("str")
    status: str | None = _f("str")
    config: dict | None = _f("dict", required=True)
    method: MethodInfo | None = _f(MethodInfo)
    data: dict | None = _f("dict")
    code: dict | None = _f("dict")
    env: dict | None = _f("dict")
    timings: dict | None = _f("dict")
    error: str | None = _f("str")
    metrics: Metrics | None = _f(Metrics, required=True)
    cost: Cost | None = _f(Cost)
    training: Training | None = _f(Training)

    ALWAYS: ClassVar[tuple[str, ...]] = ("error",)
    EXTRA_AFTER: ClassVar[str | None] = "error"   # the runner's order: identity ... error, weights, results

    def __post_init__(self) -> None:
        if self.schema_version is None:
            object.__setattr__(self, "schema_version", SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, d: Any, where: str = "record", *, complete: bool | None = None, path: str = "",
                  identity: bool = True) -> RunRecord:
        """Validate and type a record. ``complete`` (default: whether its status is "complete"): require what
        a finished result has (config; metrics with acc and nll). ``identity``: check schema_version, run_id
        and status (False: a hand-made dict without them is typed as it is, e.g. by flatten_record)."""
        if identity:
            check_record(d, where)
        if complete is None:
            complete = isinstance(d, Mapping) and d.get("status") == "complete"
        return super().from_dict(d, where, complete=complete, path=path)

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"
