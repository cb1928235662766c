"""One small registry object per extension point (methods, backbones, datasets).

A name maps to one object and the source it came from (module and file). Registering a name twice with a
different object is an error that names both sources; asking for an unknown name is one line with the
closest names. Nothing is imported here: whoever owns an extension point decides when its built-ins load.
"""
from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any, Callable, Iterator

from ensemble_bench.errors import UsageError


def source_of(obj: Any) -> str:
    """``module (file)`` of a class or function, for messages and records."""
    module = getattr(obj, "__module__", None) or "?"
    try:
        path = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        path = getattr(sys.modules.get(module), "__file__", None)
    return f"{module} ({path})" if path else module


def did_you_mean(name: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def error_line(e: BaseException) -> str:
    """An exception as one line (``Type: first line of the message``), for import failures."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class Registry:
    """``name -> object`` for one kind of extension (``kind`` is used in messages: "method")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._sources: dict[str, str] = {}

    def add(self, name: str, obj: Any, source: str | None = None) -> Any:
        if not isinstance(name, str) or not name or name != name.strip() or any(ord(c) < 32 for c in name):
            raise UsageError(f"{self.kind} name must be a non-empty string without spaces at its ends or "
                             f"control characters, not {name!r}")
        source = source or source_of(obj)
        if name in self._items and self._items[name] is not obj:
            # the same source registering the same thing again (a module imported twice) replaces it;
            # anything else taking a name is an error that names both sources
            old = self._items[name]
            if self._sources[name] != source or getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", None):
                raise UsageError(f"{self.kind} {name!r} is registered twice: by {self._sources[name]} and by "
                                 f"{source}")
        self._items[name] = obj
        self._sources[name] = source
        return obj

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: ``@registry.register("name")``."""
        def deco(obj: Any) -> Any:
            return self.add(name, obj)
        return deco

    def get(self, name: str, hint: str = "") -> Any:
        if name not in self._items:
            raise UsageError(f"unknown {self.kind} {name!r}{did_you_mean(str(name), self.names())}; choose from "
                             f"{', '.join(self.names()) or '(none)'}{hint}")
        return self._items[name]

    def remove(self, name: str) -> bool:
        """Forget ``name`` (tests); whether it was registered."""
        self._sources.pop(name, None)
        return self._items.pop(name, None) is not None

    def source(self, name: str) -> str:
        return self._sources[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
