"""ensemble-bench: the harness shared by every method (data, backbones, trainer, metrics, cost, results).

The public API, what a plugin (your own method, backbone or dataset in one file) imports::

    from ensemble_bench import Method, FitContext, EnsembleModel, StackedEnsemble, register

    @register("my_method")
    class MyMethod(Method):
        ...

Everything here is loaded on first use, so ``import ensemble_bench`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "Method": ("ensemble_bench.api", "Method"),
    "FitContext": ("ensemble_bench.api", "FitContext"),
    "EnsembleModel": ("ensemble_bench.api", "EnsembleModel"),
    "StackedEnsemble": ("ensemble_bench.api", "StackedEnsemble"),
    "GroupedOutput": ("ensemble_bench.api", "GroupedOutput"),
    "SlotInputs": ("ensemble_bench.api", "SlotInputs"),
    "member_cross_entropy": ("ensemble_bench.api", "member_cross_entropy"),
    "default_loss": ("ensemble_bench.api", "default_loss"),
    "register": ("ensemble_bench.methods", "register"),
    "register_backbone": ("ensemble_bench.backbones", "register_backbone"),
    "StagedNet": ("ensemble_bench.backbones", "StagedNet"),
    "Layers": ("ensemble_bench.layers", "Layers"),
    "register_dataset": ("ensemble_bench.userdata", "register_dataset"),
    "Recipe": ("ensemble_bench.recipe", "Recipe"),
    "stable_seed": ("ensemble_bench.train", "stable_seed"),
    "Stage": ("ensemble_bench.train", "Stage"),
    "UsageError": ("ensemble_bench.errors", "UsageError"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'ensemble_bench' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
