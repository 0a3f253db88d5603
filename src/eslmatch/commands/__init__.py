"""Sub-commands of the ``eslmatch`` CLI, one module each (see :mod:`eslmatch.cli`)."""
