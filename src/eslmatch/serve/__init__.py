"""A small local web server for searching a gallery index with text (``eslmatch serve``).

:func:`create_app` builds the FastAPI application around an opened index and a model;
:func:`load_app` opens both from disk. See ``docs/serve.md``.
"""

from __future__ import annotations

from .app import ServeConfig, create_app, load_app

__all__ = ["ServeConfig", "create_app", "load_app"]
