"""From loose settings to a checked, resolved :class:`~ensemble_bench.config.RunConfig`.

:mod:`ensemble_bench.config` is plain data (the run's fields, their coercion and the run id); this module
is where a configuration meets the registries and the data: method, backbone and dataset names are
checked (plugins loaded first), the method's option defaults filled in, the effective recipe derived and
the data identified (``data_id``). Everything that makes a run from user input goes through
:func:`make_run_config` or :func:`run_config_from_toml`.
"""
from __future__ import annotations

import typing
import warnings
from pathlib import Path
from typing import Any

from ensemble_bench.config import (
    DERIVED_FIELDS,
    RUN_FIELDS,
    USER_FIELDS,
    RunConfig,
    build_options,
    check_shift,
    coerce,
    load_toml,
    options_dict,
)
from ensemble_bench.errors import UsageError
from ensemble_bench.registry import did_you_mean


def make_run_config(values: dict[str, Any]) -> RunConfig:
    """RunConfig from loose values (CLI strings or TOML types). Method options are resolved with the
    method's defaults, so a run id does not depend on whether a default was typed out."""
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k not in RUN_FIELDS or k in DERIVED_FIELDS:
            if k in DERIVED_FIELDS:   # a record's config read back: derived again from the settings
                continue
            raise UsageError(f"unknown run setting {k!r}{did_you_mean(k, USER_FIELDS)}; "
                             f"valid settings: {', '.join(USER_FIELDS)}")
        if v is None:
            continue
        kwargs[k] = v if k == "options" else coerce(v, hints[k], k)
    cfg = RunConfig(**kwargs)
    return resolve(cfg)


def resolve(cfg: RunConfig) -> RunConfig:
    """Check method/backbone/dataset names, fill the method's option defaults, derive the effective
    recipe (the run's recipe under its mode) and identify the data (loading it: a missing or bad data
    file is bad input here, before anything is written)."""
    import ensemble_bench.methods as methods
    from ensemble_bench import backbones, data, plugins

    plugins.load_all(cfg.plugins)       # the user's methods, backbones and datasets register themselves
    method_cls = methods.get(cfg.method)
    cfg.backbone = backbones.canonical_name(cfg.backbone)   # resnet08 is resnet8: one spelling, one run id
    backbones.check_name(cfg.backbone)
    method_cls.check_backbone(cfg.backbone)   # e.g. a staged-only method on a timm model: one line, here
    cfg.dataset = data.check_name(cfg.dataset)   # a dataset TOML: its absolute path (data.check_name says why)
    opts = build_options(method_cls.Config, dict(cfg.options or {}), cfg.method)
    cfg.options = options_dict(opts)
    cfg.effective_recipe = method_cls.effective_recipe(cfg.run_recipe(), cfg.recipe, cfg.backbone).to_dict()
    from ensemble_bench.distributed import recipe_fields

    cfg.effective_recipe.update(recipe_fields())   # data-parallel ranks: the world size (nothing on one process)
    cfg.data_id = data.identity(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    check_batch_fits(cfg)
    load_shift(cfg)   # a missing or bad shift set is bad input here too (a sweep refuses it before submitting)
    return cfg


def check_batch_fits(cfg: RunConfig) -> None:
    """A batch larger than the training split: every epoch is one step on the whole split (the record
    holds both numbers, so the run is what it says), which changes what the learning rate means; a
    warning, not a refusal, so a small dataset still runs with the shared recipe's batch."""
    from ensemble_bench import data

    batch = int((cfg.effective_recipe or {}).get("batch_size") or cfg.batch_size)
    n_train = int((cfg.data_id or {}).get("n_train") or 0)
    if n_train and batch > n_train:
        warnings.warn(f"batch_size {batch} is larger than the training split of "
                      f"{data.identity_name(cfg.dataset, cfg.data_id)} ({n_train:,} images after the "
                      f"{cfg.val_fraction:g} validation fraction): every epoch is one full-batch step", stacklevel=2)


def shift_data_dir(data_dir: Any) -> Path:
    """The folder a shift set is read from: the run's data folder (default as for the clean data)."""
    from ensemble_bench import data

    return Path(data_dir) if data_dir is not None else data.default_data_dir()


def load_shift(cfg: "RunConfig"):
    """The run's shift set (ensemble_bench.shift.ShiftSet), loaded and checked (one UsageError line), or None."""
    if cfg.shift is None:
        return None
    from ensemble_bench.shift import load_shift_set

    check_shift(cfg.shift, cfg.dataset)
    return load_shift_set(cfg.shift, shift_data_dir(cfg.data_dir))


def run_config_from_toml(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    doc = load_toml(path)
    derived = [k for k in doc if k in DERIVED_FIELDS]
    if derived:
        raise UsageError(f"{path}: {', '.join(derived)} is derived by the suite, not a setting")
    values = {k: v for k, v in doc.items() if k != "options"}
    if "options" in doc and not isinstance(doc["options"], dict):
        raise UsageError(f"{path}: [options] must be a table")
    values["options"] = dict(doc.get("options", {}))
    for k, v in (overrides or {}).items():
        if k == "options":
            values["options"].update(v)
        elif k == "plugins":   # --plugin adds to the file's plugins
            have = values.get("plugins") or []
            values["plugins"] = [*([have] if isinstance(have, str) else have), *v]
        else:
            values[k] = v
    return make_run_config(values)
