"""The converters' error type and their shared command-line error handling."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tulu3.config import UserError


class ConversionError(UserError):
    """Bad input to a conversion (missing file or tensor, wrong shape, bad layout); the message
    names the offending item. Raised before any expensive work where possible."""


def parse_json(text: str, where: str | Path) -> Any:
    """``json.loads`` whose error names the file (a truncated or corrupt checkpoint JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{where}: corrupt JSON ({err.msg} at line {err.lineno}); the "
                              "checkpoint is damaged: use another one or re-export it") from None


def read_json(path: str | Path) -> Any:
    """The JSON object in ``path`` (see :func:`parse_json`)."""
    return parse_json(Path(path).read_text(encoding="utf-8"), path)


LOW_SPACE_BYTES = 64 << 20
"""Free space under which a failed write is blamed on a full disk (torch's writers report a
full disk as "unexpected pos" or a short write, never ENOSPC)."""


def disk_full_error(folder: str | Path, err: BaseException) -> UserError | None:
    """A "no space left on <folder>" error when ``err`` (a failed write under ``folder``) came
    from a full disk: ENOSPC in its chain, or less than LOW_SPACE_BYTES left; else None."""
    chain: BaseException | None = err
    full = False
    while chain is not None and not full:
        full = isinstance(chain, OSError) and chain.errno == errno.ENOSPC
        chain = chain.__cause__ or chain.__context__
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(existing).free < LOW_SPACE_BYTES
    if not full:
        return None
    return UserError(f"no space left on {folder} ({type(err).__name__} while writing): free "
                     "space or move train.run_dir, then rerun (train.resume=auto resumes)")


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
