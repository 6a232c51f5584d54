"""Worker pools of an inference run that a stop (Ctrl-C, SIGTERM, an error) never waits on for long (issue 22).

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the pool is shut down *and again when the
interpreter exits* (its threads are not daemons), so one hung write - a stalled network disk, a slow hook - kept a
stopped ``inference.py`` alive until the write ended, however the stop was asked for. :class:`WorkerThreads` is the
same pool with daemon threads that nothing joins at exit, and :func:`stop_pool` stops either kind of pool: work not
yet started is cancelled, work under way gets ``grace`` seconds, then threads are left to end with the process and
writer processes are killed. What an abandoned write leaves is not in the run's journal, so ``--resume`` writes
that B-scan again and a discarded staging folder takes it with it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor

#: Seconds a stopped run waits for the reads and writes under way (a B-scan's write takes ~40 ms of CPU; a stop must
#: not wait for one that hangs).
STOP_GRACE_S = 2.0
#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


class WorkerThreads(Executor):
    """A fixed pool of daemon threads (the ``Executor`` interface). ``shutdown(wait=True)`` waits for the work as
    ``ThreadPoolExecutor``'s does; the threads never hold up the end of the process. As a context manager it
    waits on a normal exit and calls :func:`stop_pool` when an exception leaves the block."""

    def __init__(self, workers: int, name: str = "octsam-worker"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(err)
            del future, fn, args, kwargs  # no reference to a finished B-scan while waiting for the next

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> bool:
        """Accept no more work; with ``cancel_futures`` cancel what has not started; with ``wait`` wait until the
        threads are done (at most ``timeout`` seconds). Returns whether every thread has ended."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item[0].cancel()
                for _ in self._threads:
                    self._queue.put(None)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in self._threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            stop_pool(self)
        return False


def stop_pool(pool: Executor, grace: float = STOP_GRACE_S) -> None:
    """Stop a pool after an interrupt or an error, within about ``grace`` seconds: work not yet started is
    cancelled, work under way may finish within ``grace``; then the threads of a :class:`WorkerThreads` are left
    (daemons, they end with the process) and the processes of a ``ProcessPoolExecutor`` are killed, so that none
    outlives the run."""
    if isinstance(pool, WorkerThreads):
        pool.shutdown(wait=True, cancel_futures=True, timeout=grace)
        return
    if isinstance(pool, ProcessPoolExecutor):
        processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
        pool.shutdown(wait=False, cancel_futures=True)  # idle workers are told to end; busy ones end their task
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(5)
        return
    pool.shutdown(wait=True, cancel_futures=True)


def writer_process_init(parent: int | None = None) -> None:
    """In each writer process: Ctrl-C in a terminal (SIGINT to the whole process group) is for the main process to
    handle - it stops the run and ends the writers - and SIGTERM ends a writer quietly rather than with the main
    process's handler (inherited by the fork) raising KeyboardInterrupt inside it. With ``parent`` (the pid of the
    process that made the pool), the writer also ends when that process does: see :func:`die_with_parent`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent is not None:
        die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, even by kill -9. A forked writer holds its own copy of the write end of
    the pipe it reads its work from, so it never sees end-of-file: after a kill -9 of the main process the writers
    were adopted by init and stayed blocked for good (or until a hung write ended), holding the pipes of whoever
    started the run (issue 22). Linux: the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``; nothing
    of the abandoned B-scan is in the journal, so ``--resume`` writes it again); then a check that the parent had not
    already gone before the request. Elsewhere (macOS) a daemon thread polls the parent pid once a second.
    ``PR_SET_PDEATHSIG`` follows the parent *thread* that forked the writer: a pool must be made by the thread that
    uses it (an inference run makes and stops its pool inside one ``with`` block)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:  # CDLL(None): the C library already loaded (find_library would start ldconfig from the child)
            armed = ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request (or before this check)
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="octsam-parent-watch", daemon=True).start()
