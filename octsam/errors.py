"""Errors a user can cause. The command lines print their message without a stack trace."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
"""Exit status of every octsam command line when the user's input is wrong (an :class:`OctSamError`)."""

_Main = TypeVar("_Main", bound=Callable[..., int])


class OctSamError(Exception):
    """A problem with the user's input (paths, data, config, adapter) with a message that names the fix."""


def is_disk_full(err: BaseException | None) -> bool:
    """True if ``err`` (or an exception it wraps) says the disk or quota is full, whatever library raised it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if any(
            s in text
            for s in ("No space left on device", "StorageFull", "Disk quota exceeded", "Not enough disk space")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(err: BaseException, where: str | os.PathLike | None = None) -> str:
    place = f" writing {where}" if where else ""
    return (
        f"the disk is full{place} ({err.__class__.__name__}: {str(err)[:200]}). Nothing half-written was kept: "
        "free some space (or choose a folder on another disk) and run the command again."
    )


def not_permitted(err: BaseException | None) -> OSError | None:
    """The OSError in ``err``'s chain that says a file or folder may not be written (read-only file system,
    permission denied), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return err
        err = err.__cause__ or err.__context__
    return None


def not_permitted_message(err: OSError) -> str:
    where = err.filename if err.filename is not None else "a file"
    why = "the file system is read-only" if err.errno == errno.EROFS else "permission denied"
    return (
        f"cannot write or read {where}: {why}. Nothing half-written was kept: choose a folder you may write "
        "(--output) or change its permissions, and run the command again."
    )


def cli_main(main: _Main) -> _Main:
    """Decorate a command line's ``main``: an :class:`OctSamError` that escapes it prints ``error: MESSAGE`` on
    stderr (no traceback) and ``main`` returns exit status 2, and so does a full disk (whatever library noticed it) or a
    read-only / not permitted file or folder; anything else (return value, other exceptions,
    ``SystemExit`` from argparse) passes through unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OctSamError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Exception as err:
            denied = not_permitted(err)
            if denied is not None:
                print(f"error: {not_permitted_message(denied)}", file=sys.stderr)
                return EXIT_USER_ERROR
            if not is_disk_full(err):
                raise
            print(f"error: {disk_full_message(err)}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper  # type: ignore[return-value]
