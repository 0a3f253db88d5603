"""Test-wide settings: measured runtimes and demo datasets go to a cache folder of this run
(``$ESLMATCH_CACHE`` when set), never the user's ``~/.cache``; subprocesses inherit it."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("ESLMATCH_CACHE", tempfile.mkdtemp(prefix="eslmatch-test-cache-"))
