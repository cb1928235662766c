"""The method registry.

Built-in methods are the modules of this folder; a user's own methods come from plugins (``--plugin
file.py`` or ``package.module``, a ``plugins = [...]`` key in run and sweep TOML files, or an installed
package's entry point in the group ``ensemble_bench.plugins``; see ``ensemble_bench.plugins``). Either way a
method is one class with ``@register("name")`` on an ``ensemble_bench.Method`` subclass.

Loading never stops at a broken file: a built-in module or entry point that raises on import is kept in
``load_errors()`` with its error (``list`` prints them, an unknown-name error mentions them), and every other
method still loads. A name registered twice by different code is an error that names both sources.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from ensemble_bench.api import Method
from ensemble_bench.registry import Registry, error_line

REGISTRY = Registry("method")
_state = "new"                         # "new" -> "loading" -> "loaded"
_errors: dict[str, str] = {}           # module or entry point -> "ErrorType: message"


def register(name: str):
    """Class decorator: ``@register("my_method")`` on a ``Method`` subclass."""
    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{getattr(cls, '__name__', cls)!r} must subclass ensemble_bench.Method")
        for f in dataclasses.fields(cls.Config):   # a run without --set builds the method from its defaults
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"method {name!r}: option {f.name!r} of {cls.__name__}.Config has no default "
                                f"(every option needs one)")
        REGISTRY.add(name, cls)   # first, so that a name taken twice is named as such
        missing = [f for f in ("build", "fit") if getattr(cls, f) is getattr(Method, f)]
        if cls.independent_members and cls.fit_member is Method.fit_member:
            missing.append("fit_member (independent_members = True)")
        if missing:
            REGISTRY.remove(name)
            raise TypeError(f"method {name!r}: {cls.__name__} does not define {' or '.join(missing)} "
                            f"(a method implements build, the architecture, and fit, its training)")
        cls.name = name
        return cls
    return deco


def _load_all() -> None:
    """Import every built-in method module, then the installed plugins' entry points (once)."""
    global _state
    if _state != "new":          # "loading": a module that asks for the registry while it is being built
        return
    _state = "loading"
    try:
        for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if mod.name.startswith("_"):
                continue
            try:
                importlib.import_module(f"{__name__}.{mod.name}")
            except Exception as e:   # noqa: BLE001 - reported by `list` and by unknown-name errors
                _errors[f"{__name__}.{mod.name}"] = error_line(e)
        from ensemble_bench import plugins

        _errors.update(plugins.load_entry_points())
    finally:
        _state = "loaded"


def load_errors() -> dict[str, str]:
    """Method sources that failed to import: ``{module or entry point: "ErrorType: message"}``."""
    _load_all()
    return dict(_errors)


def get(name: str) -> type[Method]:
    _load_all()
    hint = ""
    if name not in REGISTRY and _errors:
        hint = "; these failed to import: " + "; ".join(f"{k}: {v}" for k, v in _errors.items())
    return REGISTRY.get(name, hint)


def names() -> list[str]:
    _load_all()
    return REGISTRY.names()


def source(name: str) -> str:
    _load_all()
    return REGISTRY.source(name)
