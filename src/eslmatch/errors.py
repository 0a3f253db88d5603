"""Exceptions with messages meant for users.

Anything raised as an :class:`EslmatchError` is printed by the CLI as one line, without a
traceback, and makes it exit non-zero. Its kind is its type, never its wording: a caller
(the server's status table, a script) tells :class:`NotFound` from :class:`Conflict`,
:class:`Unavailable` and :class:`InvalidInput` with ``except`` / ``isinstance``.
"""

from __future__ import annotations


class EslmatchError(ValueError):
    """A problem with the user's input (file, checkpoint, tensor shape, configuration)."""


class InvalidInput(EslmatchError):
    """A value, file or request that breaks a rule (a bad filter, metadata of the wrong type)."""


class NotFound(EslmatchError):
    """What the caller named is not there (an item id, a collection)."""


class Conflict(EslmatchError):
    """The request clashes with what is stored (an id the gallery holds, with ``on_duplicate="error"``)."""


class Unavailable(EslmatchError):
    """A service or lock needed now is not available: the same request may succeed later."""


class CheckpointError(EslmatchError):
    """A checkpoint that cannot be loaded safely or does not match the model."""


class InputError(InvalidInput):
    """Tensors handed to the model that break its contract (shape, lengths, dtype)."""


class BusyError(Unavailable):
    """Another writer holds what this write needs (a gallery's writer lock): try again later."""


def with_article(word: str) -> str:
    """``word`` with its indefinite article, for messages: ``"an int"``, ``"a str"``, ``"an 'esl' model"``
    (by the first letter, after any quote)."""
    return f"{'an' if word.lstrip(chr(39) + chr(34))[:1].lower() in 'aeiou' else 'a'} {word}"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun`` agreeing, for messages: ``"1 item"``, ``"12,000 items"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class JobFailed(EslmatchError):
    """A stage failed on at least one rank; every rank raises this.

    Attributes:
        reported: the message was already printed (by rank 0, through the extractor's
            ``log``), so the command line exits 1 without printing it again.
    """

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported
