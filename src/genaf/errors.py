"""Typed errors raised by the genaf API.

The Python API raises these; only the command line turns them into a one-line message and
exit code 2.  Every message names what is wrong and, where possible, what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GenafError(Exception):
    """Base class of every error genaf raises on purpose."""


class SpecError(GenafError, ValueError):
    """An encoder, dataset, method or attack specification is unknown or malformed."""


class CheckpointError(GenafError):
    """A checkpoint or weight file is missing, unreadable, unsafe or does not match."""


class DataError(GenafError):
    """A dataset is missing, malformed or inconsistent."""


class ConfigError(GenafError, ValueError):
    """An option or config value is out of range or unknown."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> SpecError:
    """Build the standard 'unknown X' error listing the valid choices."""
    choices = sorted(choices)
    return SpecError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose one of: {', '.join(choices)}")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name (some exceptions,
    e.g. torch's on a 0-byte file, carry an empty message)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
