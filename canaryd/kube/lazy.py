"""Import kubernetes_asyncio without importing all of it.

Importing any part of kubernetes_asyncio (``kubernetes_asyncio.config``, ``...client.api_client``) runs
the package ``__init__``s first, and those import every generated API class and all ~800 models:
about 30 MB of a 90 MB daemon, none of which canaryd uses (its calls send and read plain JSON).
``install()`` puts lazy stand-ins for those ``__init__``s in ``sys.modules`` before anything else
imports the library: each stand-in knows, from its ``__init__``'s own ``from X import Y`` lines, which
submodule defines which name, and imports that submodule when the name is first used
(``client.V1Lease`` imports ``client.models.v1_lease`` only). Every name stays where it was, so code
written against the library (the Lease elector, the CLI's typed calls, tests) works unchanged.

Must not: change behaviour. If the library is already imported, or an ``__init__`` holds anything
but those imports and constants (a future release), the real package is imported as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from typing import Any

# The package __init__s that import everything, outermost first.
PACKAGES = (
    "kubernetes_asyncio",
    "kubernetes_asyncio.client",
    "kubernetes_asyncio.client.api",
    "kubernetes_asyncio.client.models",
)
_FROM = re.compile(r"from ([\w.]+) import (\w+)(?: as (\w+))?")
_IMPORT_AS = re.compile(r"import ([\w.]+) as (\w+)")
_CONST = re.compile(r"(__\w+__) = \"([^\"]*)\"")
_SKIP = re.compile(r"from __future__ import .*|#.*|")


class Unexpected(ValueError):
    """An ``__init__`` line this module does not know how to make lazy."""


def parse(source: str) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """``(name -> (module, attribute or None for the module itself), constants)`` of a package ``__init__``."""
    names: dict[str, tuple[str, str | None]] = {}
    consts: dict[str, str] = {}
    lines = iter(source.splitlines())
    for raw in lines:
        line = raw.strip()
        if line.startswith('"""'):  # a docstring: skip to its end
            _skip_to(lines, line[3:], '"""')
            continue
        if line.startswith("__all__ = ["):  # the names listed are the ones imported
            _skip_to(lines, line, "]")
            continue
        if m := _FROM.fullmatch(line):
            if m.group(1) != "__future__":
                names[m.group(3) or m.group(2)] = (m.group(1), m.group(2))
        elif m := _IMPORT_AS.fullmatch(line):
            names[m.group(2)] = (m.group(1), None)
        elif m := _CONST.fullmatch(line):
            consts[m.group(1)] = m.group(2)
        elif not _SKIP.fullmatch(line):
            raise Unexpected(line)
    return names, consts


def _skip_to(lines: Iterator[str], line: str, end: str) -> None:
    while not line.rstrip().endswith(end):
        line = next(lines, end)


def _stand_in(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        raise Unexpected(f"{name} is not a package")
    with open(spec.origin, encoding="utf-8") as f:
        names, consts = parse(f.read())
    mod = importlib.util.module_from_spec(spec)  # __path__, __spec__, __file__; the __init__ is not run
    mod.__dict__.update(consts)
    mod.__all__ = list(names)  # type: ignore[attr-defined]

    def __getattr__(attr: str) -> Any:
        try:
            module, obj = names[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None
        found = importlib.import_module(module)
        value = found if obj is None else getattr(found, obj)
        setattr(mod, attr, value)
        return value

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    mod.__dir__ = lambda: sorted({*mod.__dict__, *names})  # type: ignore[method-assign]
    return mod


def install() -> bool:
    """Put the stand-ins in place (once, before the library is imported); False if the real package is used."""
    if PACKAGES[0] in sys.modules:
        return isinstance(sys.modules[PACKAGES[0]].__dict__.get("__getattr__"), types.FunctionType)
    made: list[str] = []
    try:
        for name in PACKAGES:
            mod = _stand_in(name)
            sys.modules[name] = mod
            made.append(name)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, mod)
    except (Unexpected, OSError, ImportError):
        for name in made:  # leave nothing half-done: the normal import runs instead
            del sys.modules[name]
        return False
    return True
