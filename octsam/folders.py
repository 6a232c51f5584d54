"""Output folders that are never half-written, never shared by two runs, and leave no litter.

Every command that writes a folder (a dataset build, an inference run, an evaluation, an adapter, a checkpoint)
writes into a hidden staging sibling ``.NAME.tmp-PID-RANDOM`` and swaps it into place only when complete:
``atomic_folder`` is the one helper for that (with ``lock=`` it also holds the folder's ``FolderLock``, with
``overwrite=`` it first refuses a non-empty folder, ``check_output_folder``); the staging names all come from
``staging_path``. A staging folder left by a killed process is removed by the next run that writes next to it,
never one whose process is still alive (``remove_stale_staging``); the old folder of a swap killed between its two
renames is put back rather than removed. ``FolderLock`` gives one run at a time a folder (a kill -9 frees it).
``sigterm_as_interrupt`` makes SIGTERM run the same clean-up as Ctrl-C; ``printable``/``require_utf8_name`` keep file
names that are not UTF-8 out of CSV, JSON, Arrow tables and cards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from octsam.errors import OctSamError, disk_full_message, is_disk_full  # noqa: F401 (re-exported)

STAGING_TAGS = (".tmp-", ".partial-", ".old-", ".del-")
#: ``.old-``: the complete previous output of a swap (put back if the swap was cut between its renames);
#: ``.del-``: a folder the user asked to replace (``--overwrite``), never put back; the others: half-written.
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
        if ".old-" in entry.name:
            # A swap killed between its two renames: the old folder is the only copy; put it back.
            final = parent / entry.name[1:].rsplit(".old-", 1)[0]
            if not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(entry, final)
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


def recover(final: str | os.PathLike) -> Path:
    """Put back the old ``final`` of a swap cut between its two renames and remove dead runs' staging folders.

    Every command calls this (through ``check_output_folder`` / ``atomic_folder``) before it looks at its output, so a
    restored old output is seen - and refused without ``--overwrite`` - rather than replaced by the next run."""
    final = Path(final).expanduser()
    with contextlib.suppress(OSError):  # a read-only parent: nothing of ours can be there to recover
        remove_stale_staging(final.parent, final.name)
    return final


def check_output_folder(final: str | os.PathLike, overwrite: bool, option: str = "--output") -> Path:
    """Refuse an output that is a file, or a non-empty folder without ``--overwrite`` (the message names ``option``);
    an old output left aside by a killed swap is put back first (``recover``)."""
    final = recover(final)
    if final.exists() and not final.is_dir():
        raise OctSamError(f"{option} {final} is a file; give a folder.")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OctSamError(
            f"Output folder {final} is not empty; choose another {option} or pass --overwrite to replace it."
        )
    return final


@contextlib.contextmanager
def atomic_folder(
    final: str | os.PathLike, *, lock: str | None = None, overwrite: bool | None = None, option: str = "--output"
) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp: write(tmp)``: ``out`` appears complete or not at all (an exception, Ctrl-C
    or a full disk leaves the old ``out`` as it was and removes the staging folder).

    The one way octsam stages an output folder. ``lock="inference"`` (what runs) holds ``FolderLock(out)`` for the
    whole block, so a second run is refused; ``overwrite`` (a command's ``--overwrite``) first checks ``out`` with
    ``check_output_folder`` under that lock; None skips the check (a folder the command itself owns, such as an
    adapter inside a run folder or a volume inside an output)."""
    final = Path(final).expanduser()
    with contextlib.ExitStack() as stack:
        if lock is not None:
            stack.enter_context(FolderLock(final, lock))
        final.parent.mkdir(parents=True, exist_ok=True)
        recover(final)  # before the check: a restored old output must be refused, not replaced
        if overwrite is not None:
            check_output_folder(final, overwrite, option)
        tmp = staging_path(final)
        tmp.mkdir()
        try:
            yield tmp
            swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def move_aside_and_empty(folder: Path) -> None:
    """Replace ``folder`` by an empty one (``--overwrite``): the old content is moved aside with one rename (a new run
    never mixes with it) and then deleted; a crash in between leaves a hidden ``.NAME.del-PID-*`` that
    ``remove_stale_staging`` removes - never puts back: the user asked for it to go, and a later
    ``--resume-from-checkpoint latest`` must not find the old run."""
    aside = staging_path(folder, "del")
    os.replace(folder, aside)
    folder.mkdir()
    shutil.rmtree(aside, ignore_errors=True)


class FolderLock:
    """An exclusive lock on an output folder for one run: ``FolderLock(path, what="training")``.

    The lock is a file ``.NAME.octsam.lock`` beside the folder (in its parent, named after it) holding the owner's
    pid, host and what it runs. Where the platform has ``fcntl`` the file is also ``flock``-ed while held: the kernel
    drops that lock when the owner dies (even by kill -9), so a lock file left by a crash is stale by construction and
    taken over, and two runs can never both hold it. Elsewhere the file is created with ``O_EXCL`` and a lock whose
    process is gone (same host) is taken over. A second run is refused with a message that names the first.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder.with_name(f".{self.folder.name}{LOCK_NAME}")
        self.held = False
        self.took_over: dict | None = None
        self._fd: int | None = None

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _record(self) -> bytes:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what, "since": time.time()}
        return json.dumps(record).encode()

    def _refuse(self, owner: dict) -> OctSamError:
        return OctSamError(
            f"{self.folder} is in use by another octsam {owner.get('what', 'run')} (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}); wait for it to finish or choose another output folder. If that process "
            f"is gone, delete {self.path}."
        )

    def _acquire_flock(self) -> None:
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse(self._owner()) from None
            try:
                linked = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                linked = False
            if not linked:  # the previous owner removed the file between our open and flock: try again
                os.close(fd)
                continue
            previous = self._owner()
            if previous.get("pid") is not None:
                self.took_over = previous  # left by a process that died without releasing it
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd = fd
            return
        raise OctSamError(f"Could not lock {self.folder} (lock file {self.path} keeps disappearing).")

    def _acquire_exclusive(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                same_host = owner.get("host") == socket.gethostname()
                if not owner or (same_host and not _pid_alive(int(owner.get("pid", -1)))):
                    self.took_over = owner
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise self._refuse(owner) from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(self._record())
            return
        raise OctSamError(f"Could not lock {self.folder} (lock file {self.path} keeps reappearing).")

    def acquire(self) -> FolderLock:
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl  # noqa: F401
        except ImportError:
            self._acquire_exclusive()
        else:
            self._acquire_flock()
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)  # unlink while still flock-ed: a waiting opener re-checks the inode
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt``, so clean-up code runs as for Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------ names
def printable(path: str | os.PathLike) -> str:
    """A path as text that can always be printed or written as UTF-8 (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_name(path: str | os.PathLike) -> bool:
    """True if the path's bytes are valid UTF-8 (a name that can go into CSV, JSON, Arrow and model cards)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def require_utf8_name(path: str | os.PathLike) -> None:
    """Refuse a path whose name is not valid UTF-8, naming it (ids, cards, CSV and Arrow tables need text)."""
    if not is_utf8_name(path):
        raise OctSamError(
            f"{printable(path)}: the file name is not valid UTF-8 (undecodable bytes shown as \\xNN); rename it "
            "(e.g. with `convmv -f latin1 -t utf8`) and run again."
        )
