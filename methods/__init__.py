"""The method registry: every module in this package registers its methods on import.

A new method is one file here with ``@register("name")`` on a ``ensemble_bench.api.Method`` subclass."""
from __future__ import annotations

import importlib
import pkgutil

from ensemble_bench.api import Method
from ensemble_bench.errors import UsageError

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method {name!r} is registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} must subclass ensemble_bench.api.Method")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
