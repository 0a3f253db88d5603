"""Every option of every sub-command says what it does and what happens when it is not given."""

from __future__ import annotations

import argparse
import re

from eslmatch.cli import build_parser

# Words that state what an option does when it is absent (or that it is a flag: off unless given).
_DEFAULT_WORDS = re.compile(r"default|unless|not given|without it|one of|instead of|required with", re.I)
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


def sub_parsers(parser: argparse.ArgumentParser, prefix: str = "eslmatch"):
    """``(name, parser)`` of the parser and every sub-command below it, depth first."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from sub_parsers(sub, f"{prefix} {name}")


def undocumented() -> list[str]:
    bad = []
    for name, parser in sub_parsers(build_parser()):
        # options of a required "one of" group need no default: one of them is always given
        chosen = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            label = "/".join(action.option_strings) or action.dest
            text = action.help or ""
            if not text.strip() or text == argparse.SUPPRESS:
                bad.append(f"{name} {label}: no help")
                continue
            positional = not action.option_strings
            if positional or isinstance(action, _FLAG_ACTIONS):
                continue  # a positional is always given; a plain flag is off unless given
            if action.required or id(action) in chosen:
                continue
            if not _DEFAULT_WORDS.search(text) and "%(default)" not in text:
                bad.append(f"{name} {label}: help does not say its default ({text!r})")
    return bad


def test_every_option_has_help_stating_its_default():
    bad = undocumented()
    assert not bad, f"{len(bad)} option(s):\n" + "\n".join(bad)


def test_the_walk_reaches_nested_sub_commands():
    names = [name for name, _ in sub_parsers(build_parser())]
    assert "eslmatch search" in names and "eslmatch demo" in names
    assert any(n.startswith("eslmatch index ") for n in names), names  # index build / add / ...
