"""The converters' error type and their shared command-line error handling."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class ConversionError(ValueError):
    """Bad input to a conversion (missing file or tensor, wrong shape, bad layout); the message
    names the offending item. Raised before any expensive work where possible."""


def run_cli(convert: Callable[..., Any], *args: Any, done: str | Callable[[Any], str],
            catch: tuple[type[Exception], ...] = (), warn: bool = False) -> int:
    """Run ``convert(*args)`` for a command line; returns the exit status.

    A :class:`ConversionError` (or one of ``catch``) prints ``error: <message>`` on stderr and
    returns 2. Otherwise the notes ``convert`` returned (when it returns a list of str) are
    printed one a line (on stderr as ``warning: <note>`` when ``warn``), then ``done`` (called
    with the result when it is callable), and returns 0."""
    try:
        result = convert(*args)
    except (ConversionError, *catch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in result if isinstance(result, list) else ():
        if warn:
            print(f"warning: {note}", file=sys.stderr)
        else:
            print(note)
    print(done(result) if callable(done) else done)
    return 0
