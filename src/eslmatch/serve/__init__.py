"""A small local web server for searching a gallery index with text (``eslmatch serve``).

:func:`create_app` builds the FastAPI application around an opened index and a model;
:func:`load_app` opens both from disk. See ``docs/serve.md``. The names are imported on first
use: :mod:`eslmatch.serve.limits` (what the command line checks first) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

if TYPE_CHECKING:
    from .app import create_app, load_app
    from .limits import ServeConfig

__getattr__ = lazy_attributes(__name__, {"ServeConfig": ".limits", "create_app": ".app", "load_app": ".app"})

__all__ = ["ServeConfig", "create_app", "load_app"]
