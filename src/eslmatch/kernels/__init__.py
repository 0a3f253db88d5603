"""Fused building blocks of the scoring engine (see :mod:`eslmatch.scoring`)."""
