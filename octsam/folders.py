"""Output folders that are never half-written, never shared by two runs, and leave no litter.

Every command that writes a folder (a dataset build, an inference run, an evaluation, an adapter, a checkpoint)
writes into a hidden staging sibling ``.NAME.tmp-PID-RANDOM`` and swaps it into place only when complete
(``atomic_folder``). A staging folder left by a killed process is removed by the next run that writes next to it,
never one whose process is still alive (``remove_stale_staging``). ``FolderLock`` gives one run at a time a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from octsam.errors import OctSamError

STAGING_TAGS = (".tmp-", ".partial-", ".old-")
LOCK_NAME = ".octsam.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _staging_pid(name: str) -> int | None:
    """The PID encoded in a staging folder name ``.NAME.tmp-PID-RANDOM`` (None if it is not one of ours)."""
    if not name.startswith("."):
        return None
    for tag in STAGING_TAGS:
        if tag in name:
            head = name.rsplit(tag, 1)[1].split("-", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def remove_stale_staging(parent: Path, name: str | None = None) -> list[Path]:
    """Remove staging folders in ``parent`` (for ``name``, or any) whose writing process is gone on this host."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if name is not None and not entry.name.startswith(f".{name}."):
            continue
        pid = _staging_pid(entry.name)
        if pid is None or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def staging_path(final: Path, tag: str = "tmp") -> Path:
    """A fresh hidden sibling of ``final`` named after this process (so a later run can tell it is stale)."""
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def swap_into_place(staged: Path, final: Path) -> None:
    """Move the complete ``staged`` folder to ``final``; an existing ``final`` is replaced only after the new one is
    complete, and restored if the move fails."""
    old = None
    if final.exists():
        old = staging_path(final, "old")
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp: write(tmp)``: ``out`` appears complete or not at all (an exception, Ctrl-C
    or a full disk leaves the old ``out`` as it was and removes the staging folder)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent, final.name)
    tmp = staging_path(final)
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FolderLock:
    """An exclusive lock on an output folder for one run: ``FolderLock(path, what="training")``.

    The lock is a file ``.octsam.lock`` beside the folder's contents (in its parent, named after it) created with
    ``O_EXCL`` and holding the owner's pid, host and command. A second run is refused with a message that names the
    first; a lock whose process is gone (same host) is stale and taken over.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder.with_name(f".{self.folder.name}{LOCK_NAME}")
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what, "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                same_host = owner.get("host") == socket.gethostname()
                if not owner or (same_host and not _pid_alive(int(owner.get("pid", -1)))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise OctSamError(
                    f"{self.folder} is in use by another octsam {owner.get('what', 'run')} (pid {owner.get('pid')} on "
                    f"{owner.get('host')}); wait for it to finish or choose another output folder. If that process "
                    f"is gone, delete {self.path}."
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise OctSamError(f"Could not lock {self.folder} (lock file {self.path} keeps reappearing).")

    def release(self) -> None:
        if self.held:
            if self._owner().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
