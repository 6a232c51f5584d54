"""Errors a user can cause. The command lines print their message without a stack trace."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
"""Exit status of every octsam command line when the user's input is wrong (an :class:`OctSamError`)."""

_Main = TypeVar("_Main", bound=Callable[..., int])


class OctSamError(Exception):
    """A problem with the user's input (paths, data, config, adapter) with a message that names the fix."""


def cli_main(main: _Main) -> _Main:
    """Decorate a command line's ``main``: an :class:`OctSamError` that escapes it prints ``error: MESSAGE`` on
    stderr (no traceback) and ``main`` returns exit status 2; anything else (return value, other exceptions,
    ``SystemExit`` from argparse) passes through unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OctSamError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper  # type: ignore[return-value]
