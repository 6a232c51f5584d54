"""Whole archives: one ``inference.py`` run shared by several processes, and a killed run resumed.

**Processes.** Under ``accelerate launch`` (or ``torchrun``; ``ACCELERATE_USE_CPU=true`` on a CPU) each process takes
its share of the inputs with Accelerate's ``PartialState.split_between_processes`` (contiguous shares of the inputs in
their sorted order, so every process computes the same split) and runs on its own device (``PartialState().device``).
The main process alone holds the output folder's lock and owns the staging folder; the others write their share into
that same folder after it exists (a barrier), and the main process writes ``summary.csv`` / ``volumes.csv`` /
``run.json`` from every process's journal and swaps the folder into place after the last barrier. Several machines
need ``--output`` on a filesystem all of them see.

**Resume.** The staging folder has a fixed name, ``.NAME.partial`` beside ``--output``, and a journal
(``.octsam-journal/``: one append-only JSON-lines file per process and attempt, flushed per B-scan and fsync'd per
batch) of the B-scans (or volumes) whose files are completely written, with their summary rows. A run that stops -
killed, Ctrl-C, a crash - keeps that folder when anything is done; ``--resume`` reads the journal, skips what is done
and does the rest (in as many processes as it is launched with), and the outputs equal an uninterrupted run's. A
run without ``--resume`` that finds such a folder stops and prints the command that resumes it and the one that
discards it (``--overwrite``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from octsam.errors import OctSamError
from octsam.folders import FolderLock, check_output_folder, remove_stale_staging, swap_into_place

JOURNAL_DIR = ".octsam-journal"
PARTIAL_TAG = ".partial"  # ".NAME.partial": not a PID-named staging folder, so no later run removes it as stale
#: arguments that do not change what a run writes: a resumed run may differ in these
NOT_OUTPUT_ARGUMENTS = {"resume", "overwrite", "quiet", "read_workers", "write_workers", "writer", "batch_size"}


# ------------------------------------------------------------------------------------------------ processes
class Processes:
    """This process's place in the run: index, count, device; collectives are no-ops in a one-process run (which
    never imports Accelerate's state)."""

    def __init__(self, device: str = "auto") -> None:
        self.state = None
        self.index, self.count, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # on the CPU (ACCELERATE_USE_CPU, as `accelerate launch --cpu` sets it, or --device cpu): gloo
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or device == "cpu"
            self.state = PartialState(cpu=cpu)
            self.index, self.count, self.device = self.state.process_index, self.state.num_processes, self.state.device

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def use_device(self, requested: str) -> str:
        """The device this process runs on: Accelerate's for this process (``cuda:LOCAL_RANK``) unless ``--device``
        asks for another kind."""
        if self.device is None or self.device.type == "cpu" or requested not in ("auto", self.device.type):
            return requested
        return str(self.device)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def all_gather(self, obj) -> list:
        """Every process's ``obj``, in process order, on every process."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def share(self, items: list) -> list:
        """This process's contiguous share of ``items`` (Accelerate's split: the first ``len % count`` get one more)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def agree(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` in every process; if it failed in any, raise that failure in all of them (so no process waits
        at a barrier for one that stopped). Returns this process's result."""
        result, error = None, None
        try:
            result = fn()
        except OctSamError as err:
            error = str(err)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - passed on to the other processes, then raised here too
            error = f"{type(err).__name__}: {err}"
            if self.state is None:
                raise
        errors = [e for e in self.all_gather(error) if e is not None]
        if errors:
            raise OctSamError(errors[0] if error is None or self.is_main else error)
        return result

    def broadcast(self, obj) -> object:
        """The main process's ``obj`` on every process."""
        return self.all_gather(obj if self.is_main else None)[0]

    def record(self) -> dict:
        return {"count": self.count, "index": self.index, "host": socket.gethostname(), "pid": os.getpid()}


# ------------------------------------------------------------------------------------------------ journal
class Journal:
    """This process's append-only record of finished work in the staging folder (one JSON object per line)."""

    def __init__(self, folder: Path, processes: Processes):
        self.folder = folder / JOURNAL_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{int(time.time() * 1000):013d}-{processes.index:04d}-{socket.gethostname()}-{os.getpid()}.jsonl"
        self.path = self.folder / name
        self._file = None
        self.written = 0

    def add(self, entry: dict) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()  # in the kernel: survives the process being killed
        self.written += 1

    def sync(self) -> None:
        """fsync (once per batch): survives the machine going down as well."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def read_journal(folder: Path) -> list[dict]:
    """Every entry of every journal file in ``folder`` (a staging folder), oldest file first; a line cut short by a
    kill is left out."""
    entries = []
    journal = folder / JOURNAL_DIR
    if not journal.is_dir():
        return entries
    for path in sorted(journal.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def latest_entries(entries: list[dict], key: str) -> dict[str, dict]:
    """The last entry per ``entry[key]`` (a B-scan tried again on resume: its newest outcome counts)."""
    latest: dict[str, dict] = {}
    for entry in entries:
        if key in entry:
            latest[entry[key]] = entry
    return latest


def finished(entries: list[dict]) -> int:
    """How many B-scans or volumes the journal ``entries`` hold as finished (written, not failed)."""
    return sum("row" in e for key in ("scan", "volume") for e in latest_entries(entries, key).values())


def count_lines(folder: Path, offsets: dict) -> int:
    """Lines added to the journal files of ``folder`` since the last call (``offsets`` keeps the positions)."""
    added = 0
    journal = folder / JOURNAL_DIR
    with contextlib.suppress(OSError):
        for path in journal.glob("*.jsonl"):
            with path.open("rb") as f:
                f.seek(offsets.get(path.name, 0))
                data = f.read()
            offsets[path.name] = offsets.get(path.name, 0) + len(data)
            added += data.count(b"\n")
    return added


# ------------------------------------------------------------------------------------------------ staging
def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_TAG}")


def _command(argv: list[str] | None, extra: str) -> str:
    """The command line of this run with ``extra`` added (for the messages that say how to resume or discard)."""
    words = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--overwrite")]
    program = "python inference.py" if Path(sys.argv[0]).name in ("inference.py", "-c", "") else Path(sys.argv[0]).name
    return " ".join([program, *map(shlex.quote, words), extra])


def _output_arguments(arguments: dict) -> dict:
    return {k: v for k, v in arguments.items() if k not in NOT_OUTPUT_ARGUMENTS and k != "argv"}


@contextlib.contextmanager
def run_folder(final: Path, args, processes: Processes, arguments: dict) -> Iterator[Path]:
    """The staging folder of a (possibly multi-process, possibly resumed) run: ``.NAME.partial``, created or taken
    up by the main process under the output folder's lock, used by all processes, swapped into place by the main
    process when every process is done. Kept when the run stops with work done (``--resume`` continues it)."""
    partial = partial_path(final)
    argv = getattr(args, "argv", None)
    with contextlib.ExitStack() as stack:

        def prepare() -> str:
            if not processes.is_main:
                return ""
            stack.enter_context(FolderLock(final, "inference"))
            key_path = partial / JOURNAL_DIR / "arguments.json"
            resume = getattr(args, "resume", False)
            done = finished(read_journal(partial)) if partial.exists() else 0
            if partial.exists() and not resume and (args.overwrite or not done):
                shutil.rmtree(partial)  # discarded on request, or nothing in it was finished
            elif partial.exists() and not resume:
                raise OctSamError(
                    f"An interrupted run into {final} left {done} finished B-scan(s)/volume(s) in {partial}. "
                    f"Resume it with:\n  {_command(argv, '--resume')}\nor discard it and start again with:\n  "
                    f"{_command(argv, '--overwrite')}"
                )
            if partial.exists() and key_path.is_file():
                before = _output_arguments(json.loads(key_path.read_text()))
                now = _output_arguments(arguments)
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                if changed:
                    raise OctSamError(
                        f"--resume: the interrupted run in {partial} was started with other options "
                        f"({', '.join('--' + k.replace('_', '-') for k in changed)}); resume it with the same "
                        f"options, or start again with --overwrite."
                    )
            check_output_folder(final, args.overwrite or (getattr(args, "resume", False) and partial.exists()))
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(final.parent, final.name)
            created = not partial.exists()
            try:
                (partial / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
                if not key_path.is_file():
                    key_path.write_text(json.dumps(arguments, indent=2, default=str) + "\n")
            except BaseException:  # e.g. a full disk: a folder this run just made holds nothing to resume
                if created:
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            return str(partial)

        processes.agree(prepare)
        try:
            yield partial
            processes.barrier()  # every process's share is written
            if processes.is_main:
                shutil.rmtree(partial / JOURNAL_DIR)
                remove_stale_staging(partial)  # staging folders of writers that were killed in an earlier attempt
                swap_into_place(partial, final)
            processes.barrier()
        except BaseException:
            if processes.is_main and partial.exists() and not finished(read_journal(partial)):
                shutil.rmtree(partial, ignore_errors=True)  # nothing done: nothing to resume, no litter
            elif processes.is_main and partial.exists():
                print(
                    f"the finished part of this run is kept in {partial}; resume it with:\n  "
                    f"{_command(argv, '--resume')}",
                    file=sys.stderr,
                )
            raise
