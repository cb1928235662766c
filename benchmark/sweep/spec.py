"""A sweep's spec: the TOML tables checked (``parse_spec``), the [slurm] keys, and the grid expanded to
validated RunConfigs (``expand``). The spec format is in the package docstring (``ensemble_bench.sweep``)."""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ensemble_bench.config import NON_IDENTITY_FIELDS, RUN_FIELDS, RunConfig, canonical_json, load_toml
from ensemble_bench.resolve import make_run_config
from ensemble_bench.errors import UsageError

SPEC_KEYS = ("name", "grid", "options", "run", "slurm")
# the run fields a sweep requires to be spelled out (the RunConfig defaults are a CPU demo)
REQUIRED_RUN_KEYS = ("method", "backbone", "dataset")
# [slurm] keys: type, and what submitit calls it (None: an executor argument, not an sbatch setting)
SLURM_KEYS: dict[str, tuple[type, str | None]] = {
    "partition": (str, "partition"),
    "timeout_min": (int, "time"),
    "gpus_per_node": (int, "gpus_per_node"),
    "cpus_per_task": (int, "cpus_per_task"),
    "mem_gb": (float, "mem"),
    "array_parallelism": (int, "array_parallelism"),
    "additional_parameters": (dict, "additional_parameters"),
    "signal_delay_s": (int, "signal_delay_s"),
    "setup": (list, "setup"),
    "job_name": (str, "job_name"),
    "qos": (str, "qos"),
    "account": (str, "account"),
    "constraint": (str, "constraint"),
    "exclude": (str, "exclude"),
    "nodelist": (str, "nodelist"),
    "gres": (str, "gres"),
    "comment": (str, "comment"),
    "srun_args": (list, "srun_args"),
    "use_srun": (bool, "use_srun"),
    "tasks_per_node": (int, "ntasks_per_node"),   # DDP: one rank per task (ensemble_bench.distributed)
    "nodes": (int, "nodes"),
    "max_num_timeout": (int, None),   # how many time-limit requeues before a run gives up
    "python": (str, None),            # the python command on the nodes (default: this interpreter)
}
SLURM_DEFAULTS = {"timeout_min": 240, "cpus_per_task": 4, "array_parallelism": 256, "max_num_timeout": 3}


# ------------------------------------------------------------------------------------------ spec
@dataclass
class SweepSpec:
    path: str
    name: str
    grid: dict[str, list]
    options: dict[str, dict[str, list]]
    run: dict[str, Any]
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.grid["method"]) if "method" in self.grid else [self.run["method"]]

    @property
    def out(self) -> Path:
        """The results folder of every run of the sweep (absolute: jobs may start elsewhere)."""
        return Path(self.run.get("out", RUN_FIELDS["out"].default)).expanduser().absolute()


def _type_name(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
            list: "a list"}.get(v, getattr(v, "__name__", str(v)))


# Spec strings that reach the generated sbatch script or file names: a newline (or any other control
# character) in one of them would start a line of its own in the script (shlex.quote does not protect
# newlines), so they are refused. ``[slurm] setup`` is shell by design: its lines are written into the
# script as they are (whoever writes the spec runs those commands on the nodes), and is not checked.
SHELL_BY_DESIGN = ("setup",)


def _control_char(text: str) -> str | None:
    """The first control character (C0, DEL, C1; newline, carriage return, NUL, tab, ...) in ``text``."""
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o <= 0x9F or ch in "\u2028\u2029":
            return ch
    return None


def _check_text(where: str, field_name: str, value: Any) -> None:
    if isinstance(value, str):
        ch = _control_char(value)
        if ch is not None:
            raise UsageError(f"{where}: {field_name} contains a control character ({ch!r} at position "
                             f"{value.index(ch)}); newlines and other control characters are not allowed there "
                             f"(they would break the sbatch script)")


def _check_slurm(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [slurm] must be a table")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k not in SLURM_KEYS:
            raise UsageError(f"{where}: unknown [slurm] key {k!r}; valid keys: {', '.join(SLURM_KEYS)}")
        tp = SLURM_KEYS[k][0]
        ok = isinstance(v, tp) and not (tp is int and isinstance(v, bool))
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise UsageError(f"{where}: [slurm] {k} must be {_type_name(tp)}; got {v!r}")
        if k in ("setup", "srun_args") and not all(isinstance(s, str) for s in v):
            raise UsageError(f"{where}: [slurm] {k} must be a list of strings; got {v!r}")
        if k == "additional_parameters":
            bad = [kk for kk, vv in v.items() if not isinstance(vv, (str, int, float, bool))]
            if bad:
                raise UsageError(f"{where}: [slurm] additional_parameters.{bad[0]} must be a string, number or boolean")
        if k in ("timeout_min", "cpus_per_task", "array_parallelism", "tasks_per_node", "nodes") and v < 1:
            raise UsageError(f"{where}: [slurm] {k} must be >= 1; got {v}")
        if k in ("gpus_per_node", "signal_delay_s", "max_num_timeout") and v < 0:
            raise UsageError(f"{where}: [slurm] {k} must be >= 0; got {v}")
        if k == "mem_gb" and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{where}: [slurm] mem_gb must be a finite number > 0; got {v}")
        if k not in SHELL_BY_DESIGN:
            if isinstance(v, str):
                _check_text(where, f"[slurm] {k}", v)
            elif isinstance(v, list):
                for i, item in enumerate(v):
                    _check_text(where, f"[slurm] {k}[{i}]", item)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    _check_text(where, f"[slurm] {k} key {kk!r}", kk)
                    _check_text(where, f"[slurm] {k}.{kk}", vv)
        out[k] = v
    return out


def parse_spec(doc: dict[str, Any], where: str = "sweep spec") -> SweepSpec:
    """Check a spec's structure (one-line :class:`UsageError`); names and values of each run are checked
    when the runs are made (:func:`expand`)."""
    unknown = [k for k in doc if k not in SPEC_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} at the top level; valid: {', '.join(SPEC_KEYS)}")
    for k in ("grid", "options", "run", "slurm"):
        if k in doc and not isinstance(doc[k], dict):
            raise UsageError(f"{where}: [{k}] must be a table")
    name = doc.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: name must be a non-empty string")
    _check_text(where, "name", name)
    grid = dict(doc.get("grid", {}))
    run = dict(doc.get("run", {}))
    if not grid:
        raise UsageError(f"{where}: [grid] is missing or empty; a sweep needs at least one list, e.g. seed = [0, 1, 2]")
    for k, v in grid.items():
        if k == "options":
            raise UsageError(f"{where}: method options go in [options.<method>] tables, not in [grid]")
        if k not in RUN_FIELDS:
            raise UsageError(f"{where}: unknown [grid] key {k!r}; valid run settings: {', '.join(RUN_FIELDS)}")
        if k in NON_IDENTITY_FIELDS:
            raise UsageError(f"{where}: [grid] {k} does not change what a run computes (it is not part of the "
                             f"run id); set it in [run]")
        if not isinstance(v, list):
            raise UsageError(f"{where}: [grid] {k} must be a list (the values to sweep); got {v!r}; write [{_toml(v)}] for one value")
        if not v:
            raise UsageError(f"{where}: [grid] {k} is an empty list")
    for k in run:
        if k == "options":
            raise UsageError(f"{where}: method options go in [options.<method>] tables, not in [run]")
        if k not in RUN_FIELDS:
            raise UsageError(f"{where}: unknown [run] key {k!r}; valid run settings: {', '.join(RUN_FIELDS)}")
        if k in grid:
            raise UsageError(f"{where}: {k} is set in both [grid] and [run]; keep one")
    for k in ("out", "data_dir"):   # folder names: they reach the sbatch script (submitit's log paths)
        _check_text(where, f"[run] {k}", run.get(k))
    for k in REQUIRED_RUN_KEYS:
        if k not in grid and k not in run:
            raise UsageError(f"{where}: say which {k} to run: {k} = [...] in [grid] (or {k} = ... in [run])")
    if not isinstance(run.get("method", ""), str):
        raise UsageError(f"{where}: [run] method must be a string")
    methods_in_sweep = list(grid["method"]) if "method" in grid else [run["method"]]
    options: dict[str, dict[str, list]] = {}
    for method, table in doc.get("options", {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"{where}: [options.{method}] must be a table of option = [values]")
        if method not in methods_in_sweep:
            raise UsageError(f"{where}: [options.{method}] is for method {method!r}, which this sweep does not run "
                             f"(methods: {', '.join(map(str, methods_in_sweep))})")
        for k, v in table.items():
            if not isinstance(v, list):
                raise UsageError(f"{where}: [options.{method}] {k} must be a list (the values to sweep); got {v!r}; "
                                 f"write [{_toml(v)}] for one value")
            if not v:
                raise UsageError(f"{where}: [options.{method}] {k} is an empty list")
        options[method] = dict(table)
    slurm = _check_slurm(where, doc.get("slurm", {}))
    return SweepSpec(path=where, name=name, grid=grid, options=options, run=run, slurm=slurm)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def load_spec(path: str | os.PathLike) -> SweepSpec:
    return parse_spec(load_toml(path), str(path))


def _product(table: dict[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(table)
    for values in itertools.product(*(table[k] for k in keys)):
        yield dict(zip(keys, values))


def expand(spec: SweepSpec) -> list[RunConfig]:
    """Every run of the sweep, in grid order, each validated by :func:`make_run_config` (names of methods,
    backbones, datasets and options; values) and by the method's build (a method / backbone combination
    the method refuses fails the whole sweep before anything is submitted). Runs that resolve to the same run id appear once. ``out``
    and ``data_dir`` are made absolute (relative to the current directory), which leaves run ids alone."""
    from ensemble_bench.runner import check_buildable, make_method

    from ensemble_bench import distributed

    ranks = int(spec.slurm.get("tasks_per_node", 1)) * int(spec.slurm.get("nodes", 1))
    runs: list[RunConfig] = []
    seen: set[str] = set()
    buildable: set[str] = set()   # (method, backbone, dataset, options) already built: seeds etc. share it
    fixed = dict(spec.run)
    fixed["out"] = str(spec.out)
    if fixed.get("data_dir"):
        fixed["data_dir"] = str(Path(fixed["data_dir"]).expanduser().absolute())
    for point in _product(spec.grid):
        method = point.get("method", fixed.get("method"))
        for opts in _product(spec.options.get(method, {})):
            values = {**fixed, **point, "options": opts}
            try:
                with distributed.assume_world_size(ranks):   # [slurm] tasks_per_node x nodes: DDP ranks
                    cfg = make_run_config(values)
                arch = canonical_json([cfg.method, cfg.backbone, cfg.dataset, cfg.options])
                if arch not in buildable:
                    check_buildable(make_method(cfg), cfg)
                    buildable.add(arch)
            except UsageError as e:
                shown = ", ".join(f"{k}={v}" for k, v in {**point, **opts}.items())
                raise UsageError(f"{spec.path}: run ({shown}): {e}") from None
            rid = cfg.run_id()
            if rid not in seen:
                seen.add(rid)
                runs.append(cfg)
    return runs
