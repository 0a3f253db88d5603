"""Lazy package attributes (PEP 562): ``import eslmatch`` and the CLI's argument checks stay
free of torch, which costs seconds to import; a name is imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving ``name`` as ``where[name]`` (a module relative to
    ``package``, e.g. ``".factory"``) on first access, then caching it in the package."""

    def __getattr__(name: str) -> object:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
