"""The user's own code: methods, backbones and datasets that register themselves when imported.

A plugin is
  - a Python file (``--plugin path/to/my_method.py``; in a TOML file too, relative to the current folder), imported
    under a private module name, or
  - an importable module (``--plugin mypackage.methods``), or
  - an installed package that declares an entry point in the group ``ensemble_bench.plugins``
    (``[project.entry-points."ensemble_bench.plugins"] mine = "mypackage.methods"``): loaded with the
    built-in methods, no flag needed.

Its code uses the public API only (``from ensemble_bench import Method, register, ...``). A plugin that
fails to import is one line (``UsageError``: exit code 2 from the CLI) naming the plugin and the error; an
entry point that fails is reported by ``list`` and the other methods still load. The built-in methods are
loaded before any plugin, so a plugin that takes a built-in's name is refused with both sources.

Configs carry plugins as normalised specs (absolute file paths or module names), so a sweep's Slurm and
local jobs import the same code as the process that submitted them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterable

from ensemble_bench.errors import UsageError
from ensemble_bench.registry import error_line

ENTRY_POINT_GROUP = "ensemble_bench.plugins"
_loaded: dict[str, dict[str, Any]] = {}        # normalised spec -> {"spec", "module", "file", "sha256"}


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def normalise(spec: str, base: str | Path | None = None) -> str:
    """A file spec as an absolute path (relative ones against ``base``, else the current folder); a module
    name as it is. Checks only the form, not that the plugin imports."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"plugin must be a .py file or a module name, not {spec!r}")
    spec = spec.strip()
    if is_file_spec(spec):
        p = Path(spec).expanduser()
        if not p.is_absolute():
            p = Path(base or Path.cwd()) / p
        p = p.resolve()
        if not p.is_file():
            raise UsageError(f"plugin file not found: {spec}" + (f" (looked for {p})" if str(p) != spec else ""))
        return str(p)
    if not all(part.isidentifier() for part in spec.split(".")):
        raise UsageError(f"plugin {spec!r} is neither a .py file nor a module name (package.module)")
    return spec


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load(spec: str, base: str | Path | None = None) -> dict[str, Any]:
    """Import one plugin (once per process) and return what was imported: spec, module, file, sha256."""
    from ensemble_bench import methods

    methods.names()               # built-ins first: a plugin that reuses a built-in name is refused
    key = normalise(spec, base)
    if key in _loaded:
        return _loaded[key]
    try:
        if is_file_spec(key):
            path = Path(key)
            name = f"ensemble_bench_plugin_{path.stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise UsageError(f"plugin {spec}: not an importable Python file")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(key)
    except UsageError as e:
        raise UsageError(f"plugin {spec}: {e}") from None
    except SystemExit as e:   # sys.exit() in the user's module: not this program's exit code
        raise UsageError(f"plugin {spec} called sys.exit({e.code!r}) while it was imported") from None
    except Exception as e:   # noqa: BLE001 - the user's code: one line with its error, no traceback
        raise UsageError(f"plugin {spec} failed to import: {error_line(e)}") from None
    file = getattr(module, "__file__", None)
    info = {"spec": key, "module": module.__name__, "file": file,
            "sha256": file_sha256(file) if file and Path(file).is_file() else None}
    _loaded[key] = info
    return info


def load_all(specs: Iterable[str] | None, base: str | Path | None = None) -> list[dict[str, Any]]:
    return [load(s, base) for s in (specs or ())]


def loaded() -> list[dict[str, Any]]:
    """The plugins this process imported (in order)."""
    return list(_loaded.values())


def load_entry_points() -> dict[str, str]:
    """Import every installed plugin of the entry-point group; ``{entry point: error}`` for those that fail."""
    from importlib.metadata import entry_points

    errors: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:   # noqa: BLE001 - reported, the rest still loads
            errors[f"entry point {ep.name} = {ep.value}"] = error_line(e)
    return errors
