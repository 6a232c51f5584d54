"""Segment new B-scans with a trained adapter: masks, overlays, probabilities, biomarker areas (``inference.py``).

python inference.py --adapter ORG/NAME --input scans/ --output predictions/
python inference.py --adapter runs/amd/best_adapter --input "scans/**/*.tif" --output out --box fluid:120,80,300,160

Per B-scan (at its native size): ``masks/NAME.png`` (class ids), ``overlays/NAME.png`` (class colours, legend below),
and with ``--save-probabilities`` ``probabilities/NAME.npz`` (float16 (K+1, H, W), channel 0 background). For the
run: ``summary.csv`` (per class: area in pixels, in mm² with ``--pixel-spacing-mm``, 8-connected components) and
``run.json`` (adapter and revision, base model, device, dtype, timings per stage, cores used, failures, progress).
Everything is written to a staging folder (``.NAME.partial``, with a journal of finished B-scans) that replaces
``--output`` at the end, so an interrupted run leaves nothing half-written, an existing output is only replaced
with ``--overwrite``, and ``--resume`` continues a stopped run. Under ``accelerate launch`` each process segments its
share of the inputs (``octsam.infer.archive``).

Prompts (boxes and points in native pixel coordinates; CLASS is a label name or id): ``--box CLASS:x1,y1,x2,y2``
and ``--point CLASS:x,y[:neg]`` apply to every input B-scan; ``--prompts FILE.json`` gives them per B-scan::

    {"scan1.png": [{"class": "fluid", "box": [120, 80, 300, 160], "points": [[200, 120], [150, 90, 0]]}]}

Each box is one object; a point joins the box of its class that contains it, and the other points of a class form
one more object. Keys match an input's output name, file name or stem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from octsam.adapter import check_same_labels
from octsam.data.contract import parse_pixel_spacing
from octsam.data.prompts import PromptSpec, build_prompts, label_id, parse_box, parse_point, read_prompt_file
from octsam.errors import OctSamError
from octsam.infer.archive import Journal, Processes, count_lines, latest_entries, read_journal, run_folder
from octsam.infer.inputs import ScanInput, collect_inputs
from octsam.infer.outputs import OutputSettings, ScanOutput, write_scan, write_summary
from octsam.infer.pools import WorkerThreads, stop_pool, writer_process_init
from octsam.segmenter import device_name, resolve_device
from octsam.speed import SpeedPlan, plan_speed


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompting:
    """The run's prompts: ``--box``/``--point`` for every B-scan plus ``--prompts FILE.json`` per B-scan."""

    cli_specs: list[PromptSpec]
    file: dict[str, list[PromptSpec]]  # as read from --prompts (keys as written)
    per_scan: dict[str, list[PromptSpec]] = field(default_factory=dict)  # the file's prompts by output name
    unmatched: list[str] = field(default_factory=list)  # file keys that match no input B-scan

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Prompting:
        cli_specs = [parse_box(b) for b in args.box] + [parse_point(p) for p in args.point]
        return cls(cli_specs, read_prompt_file(args.prompts) if args.prompts else {})

    @property
    def active(self) -> bool:
        return bool(self.cli_specs or self.file)

    def all_specs(self) -> list[PromptSpec]:
        return self.cli_specs + [s for specs in self.file.values() for s in specs]

    def for_scan(self, name: str) -> list[PromptSpec]:
        return self.cli_specs + self.per_scan.get(name, [])

    def match(self, scans: list[ScanInput], warn: bool = True) -> None:
        """Match the prompt file's keys to scans (output name, file name with suffix, or stem); warn of the rest."""
        self.per_scan, self.unmatched = _file_prompts(self.file, scans)
        for key in self.unmatched if warn else []:
            print(f"warning: --prompts key {key!r} matches no input B-scan", file=sys.stderr)


def _file_prompts(prompt_file: dict[str, list[PromptSpec]], scans: list[ScanInput]) -> tuple[dict, list[str]]:
    """Match the prompt file's keys to scans (output name, file name with suffix, or stem); return unmatched keys."""
    by_key: dict[str, str] = {}
    for scan in scans:
        for key in (scan.name, Path(scan.source).name, Path(scan.source).stem, scan.source):
            by_key.setdefault(key, scan.name)
    matched: dict[str, list[PromptSpec]] = {}
    unmatched = []
    for key, specs in prompt_file.items():
        name = by_key.get(key)
        if name is None:
            unmatched.append(key)
        else:
            matched.setdefault(name, []).extend(specs)
    return matched, unmatched


# ------------------------------------------------------------------------------------------------ workers
def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_read_workers() -> int:
    """Reader threads: up to 4 (decoding and resizing a 768 x 496 PNG costs ~7 ms of mostly GIL-free CPU, so 4
    threads feed > 500 B-scans/s)."""
    return max(1, min(4, _cpus()))


def default_write_workers() -> int:
    """Writers: the CPUs left after the readers and the main thread, up to 16 (writing one B-scan costs ~40 ms of
    CPU, so 200 B-scans/s need about 8-10 of them)."""
    return max(1, min(16, _cpus() - 4))


def _prefetch(pool: Executor, fn: Callable, items: list, ahead: int) -> Iterator:
    """``fn(item)`` for each item, computed up to ``ahead`` items in advance in ``pool``, yielded in order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def start_writers(kind: str, workers: int, device_type: str) -> Executor:
    """The pool that writes masks, overlays and areas. ``auto``: processes when the model runs on a GPU (the main
    thread then only launches kernels and must not wait for the GIL held by numpy work in writer threads), threads
    on the CPU (where the model's own threads use every core and release the GIL in their kernels)."""
    if kind == "auto":
        kind = "process" if device_type == "cuda" else "thread"
    if kind == "thread":
        return WorkerThreads(workers, "octsam-write")  # daemons: a hung write never holds up a stop
    if kind != "process":
        raise OctSamError(f"--writer must be auto, thread or process, got {kind!r}.")
    import multiprocessing

    import cv2

    # fork: the children need no imports of their own (spawn would re-import the calling script and torch);
    # started now, before the model and any CUDA context exist. Each writer runs one OpenCV thread: the pool is the
    # parallelism, and 12 writers x 16 OpenCV threads on 16 cores starved the readers and the main thread on the H200
    # machine (benchmarks/RESULTS.md, version 4). The setting is made in this process around the fork and inherited:
    # calling cv2.setNumThreads in a forked child deadlocks once the parent has used OpenCV's thread pool (it waits
    # on a condition variable whose threads were not copied). The writers run no torch code.
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=writer_process_init,
            initargs=(os.getpid(),),  # the writers end with this process, even after kill -9
        )
        for future in [pool.submit(os.getpid) for _ in range(workers)]:  # a fork pool starts all its processes
            future.result()
    finally:
        cv2.setNumThreads(previous)
    return pool


def write_one(settings: OutputSettings, scan: ScanOutput) -> tuple[dict, tuple[float, float]]:
    """Write one B-scan's outputs (a writer thread or process); returns its summary row and (wall, CPU) seconds."""
    t, cpu = time.perf_counter(), time.thread_time()
    row = write_scan(settings, scan)
    return row, (time.perf_counter() - t, time.thread_time() - cpu)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------------------ timings
@dataclass
class Timings:
    """run.json's timings: model load, compilation (the first batch of a compiled run) and B-scans/s end to end,
    overall and in steady state (after the first batch), besides the work of each stage summed over its threads
    (read, write) and the main thread's waits for them."""

    started: float
    load_s: float = 0.0
    compile_s: float | None = None
    read_s: float = 0.0
    decode_s: float = 0.0
    prepare_s: float = 0.0
    predict_s: float = 0.0
    write_s: float = 0.0
    wait_read_s: float = 0.0
    wait_write_s: float = 0.0
    read_cpu_s: float = 0.0
    write_cpu_s: float = 0.0
    loop_start: float = 0.0
    loop_end: float = 0.0
    first_done: float | None = None
    first_scans: int = 0

    def add_read(self, seconds: tuple) -> None:
        self.read_s += seconds[0]
        self.read_cpu_s += seconds[1]
        if len(seconds) > 2:  # (wall, CPU, decode, resize) of a B-scan file
            self.decode_s += seconds[2]
            self.prepare_s += seconds[3]

    def add_write(self, seconds: tuple[float, float]) -> None:
        self.write_s += seconds[0]
        self.write_cpu_s += seconds[1]

    def first_batch(self, seconds: float, scans: int, compiled: bool, quiet: bool) -> None:
        if self.first_done is not None:
            return
        self.first_done, self.first_scans = time.perf_counter(), scans
        if compiled:
            self.compile_s = seconds
            if not quiet:
                print(f"torch.compile: first batch took {seconds:.1f} s (compilation)", file=sys.stderr)

    def record(self, done: int) -> dict:
        loop_s = self.loop_end - self.loop_start
        steady_s = self.loop_end - self.first_done if self.first_done is not None else 0.0
        out = {
            "load_s": round(self.load_s, 3),
            "compile_s": None if self.compile_s is None else round(self.compile_s, 3),
        }
        stages = (
            "read_s",
            "decode_s",
            "prepare_s",
            "predict_s",
            "write_s",
            "wait_read_s",
            "wait_write_s",
            "read_cpu_s",
            "write_cpu_s",
        )
        out.update({k: round(getattr(self, k), 3) for k in stages})

        def per_scan(seconds: float) -> float | None:
            return round(seconds / done, 4) if done else None

        out.update(
            {
                "segment_s": round(loop_s, 3),
                "total_s": round(time.perf_counter() - self.started, 3),
                "predict_s_per_scan": per_scan(self.predict_s),
                "read_s_per_scan": per_scan(self.read_s),
                "decode_s_per_scan": per_scan(self.decode_s),
                "prepare_s_per_scan": per_scan(self.prepare_s),
                "write_s_per_scan": per_scan(self.write_s),
                "read_cpu_s_per_scan": per_scan(self.read_cpu_s),
                "write_cpu_s_per_scan": per_scan(self.write_cpu_s),
                "scans_per_s": round(done / loop_s, 3) if done and loop_s > 0 else None,
                "steady_scans_per_s": round((done - self.first_scans) / steady_s, 3)
                if done > self.first_scans and steady_s > 0
                else None,
            }
        )
        out.update(cpu_use(time.perf_counter() - self.started))
        return out


def cpu_use(wall_s: float) -> dict:
    """The CPUs this process may use and how many it kept busy on average over ``wall_s`` (its own threads plus
    its finished children, e.g. writer processes), to tell a CPU-bound run from a GPU-bound one."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {
        "cpus_available": _cpus(),
        "cpu_s": round(cpu_s, 3),
        "cores_used": round(cpu_s / wall_s, 2) if wall_s > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class InferenceRun:
    """What one run of ``inference.py`` shares between its steps (B-scan files, a dataset split or OCT volumes)."""

    args: argparse.Namespace
    final: Path
    tmp: Path
    timings: Timings
    writers: Executor
    write_workers: int
    folder: Path  # the adapter folder, resolved once (a Hub id is downloaded here)
    plan: SpeedPlan
    segmenter: object  # octsam.segmenter.Segmenter
    batch_size: int
    processes: Processes = field(default_factory=Processes)
    journal: Journal | None = None  # this process's record of finished work (octsam.infer.archive)

    @property
    def labels(self) -> list[str]:
        return self.segmenter.labels


def check_arguments(args: argparse.Namespace) -> None:
    """Counts that must be positive, before anything is read or loaded."""
    if args.batch_size is not None and args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    for name in ("read_workers", "write_workers"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise OctSamError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")


def _input_root(text: str) -> Path | None:
    """The file or folder that an --input names (for a glob: the folder above its first wildcard), or None."""
    import glob

    parts = Path(text).expanduser().parts
    if any(glob.has_magic(part) for part in parts):
        parts = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    path = Path(*parts) if parts else Path(".")
    return path if path.exists() else None


def check_output_outside_inputs(args: argparse.Namespace) -> None:
    """--output must not be an --input (or --dataset) folder or file, nor a folder that holds one: the run would
    skip the inputs as its own output ("No input B-scans") or, with --overwrite, replace them."""
    final = Path(args.output).expanduser().resolve()
    named = [("--input", text) for text in getattr(args, "input", None) or []]
    if getattr(args, "dataset", None):
        named.append(("--dataset", args.dataset))
    for option, text in named:
        root = _input_root(text)
        if root is None:
            continue
        root = root.resolve()
        if root == final or final in root.parents:
            how = "is" if root == final else "contains"
            raise OctSamError(
                f"--output {args.output} {how} {option} {text}: the output folder is replaced as a whole, so it "
                f"cannot hold the B-scans it is made from. Choose an --output outside {option}, e.g. "
                f"--output {final.parent / (final.name + '-predictions')}."
            )


def load_segmenter(args: argparse.Namespace, device_type: str, num_scans: int, device: str | None = None):
    """Resolve the adapter once and load it with the speed plan of this device and run size (``device``: this
    process's device, default ``args.device``); returns (adapter folder, plan, segmenter, seconds)."""
    from octsam.adapter import resolve_adapter
    from octsam.export.runtime import load_segmenter as load_engine

    t0 = time.perf_counter()
    engine = getattr(args, "engine", "torch")  # an ONNX folder (or Hub repo with onnx/) is found by the runtime
    names = getattr(args, "adapters", None) or [args.adapter]
    if engine == "torch":
        folders = [resolve_adapter(name, revision=args.revision) for name in names]
    else:
        folders = [Path(name) for name in names]
    folder = folders[0]
    plan = plan_speed(
        device_type,
        "infer",
        fast_attention=not args.no_fast_attention,
        attention_mode=args.attention_mode,
        compile=args.compile,
        num_scans=num_scans,
    )
    segmenter = load_engine(
        engine,
        folders if len(folders) > 1 else folder,
        revision=args.revision,
        device=device or args.device,
        merge=not args.no_merge,
        base_model=args.base_model,
        fast_attention=plan.attention or False,
        compile=plan.compile,
        precision=getattr(args, "precision", "auto"),
        tta=getattr(args, "tta", "none"),
    )
    segmenter.batch_size = args.batch_size or (16 if segmenter.device.type == "cuda" else 1)
    if not args.quiet and segmenter.compiled:
        print(f"torch.compile: on ({plan.why}); the first batch compiles", file=sys.stderr)
    return folder, plan, segmenter, time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    """Segment every input (B-scan files, a dataset split, or OCT volumes); returns the number of B-scans that
    failed. The output folder is locked, staged (``.NAME.partial``, with a journal of finished work that
    ``--resume`` continues from) and swapped into place when complete. Under ``accelerate launch`` every process
    segments its share of the inputs into the same staging folder (``octsam.infer.archive``)."""
    from octsam.infer.volumes import check_volume_arguments, wants_volumes

    started = time.perf_counter()
    check_arguments(args)
    check_output_outside_inputs(args)
    processes = Processes(args.device)
    volumes = wants_volumes(args)
    if volumes:
        check_volume_arguments(args)
    spacing = None if volumes else parse_pixel_spacing(args.pixel_spacing_mm)
    prompting = Prompting.from_args(args)
    final = Path(args.output).expanduser()
    if getattr(args, "resume", False) and not partial_exists(final) and (final / "run.json").is_file():
        if processes.is_main:
            print(f"--resume: {final} is complete (run.json); nothing to do.", file=sys.stderr)
        return 0
    arguments = {k: v for k, v in vars(args).items() if k != "argv"}
    with run_folder(final, args, processes, arguments) as tmp:
        entries = read_journal(tmp)  # the work of earlier attempts (every process reads the same)
        if volumes:
            outcome = _segment_volume_share(args, processes, final, tmp, started, entries)
        else:
            inputs = processes.agree(
                lambda: collect_inputs(
                    args.input, args.dataset, args.split, args.dataset_revision, exclude=[final, tmp]
                )
            )
            prompting.match(inputs, warn=processes.is_main)
            done = {name for name, entry in latest_entries(entries, "scan").items() if "row" in entry}
            todo = [(index, scan) for index, scan in enumerate(inputs) if scan.name not in done]
            processes.barrier()  # every process has read the journal before any writes to it
            mine = processes.share(todo)
            with _ModelAndWriters(args, final, tmp, started, len(mine), processes) as ctx:
                processes.agree(lambda: _check_scans(ctx, inputs, prompting))
                share = _segment_scans(ctx, mine, prompting, spacing, len(inputs), len(inputs) - len(todo))
                outcome = _finish_scans(ctx, inputs, share, prompting, spacing, len(inputs) - len(todo))
                processes.agree(lambda: _refuse_if_none_segmented(outcome, final) if processes.is_main else None)
    if not processes.is_main:
        return 0  # the main process reports the run (and its exit status says whether B-scans failed)
    if volumes:
        print(f"wrote {outcome} volume(s) to {final} (volumes.csv, one folder per eye)")
        return 0
    _print_outcome(outcome, final, prompting)
    return len(outcome.failures)


def _refuse_if_none_segmented(outcome: ScanOutcome, final: Path, shown: int = 5) -> None:
    """A run in which every B-scan failed (unreadable, too large, not a B-scan, prompts outside it) is refused as a
    whole: no output folder is made (its staging folder is removed), exit status 2, the reasons in the message."""
    if outcome.rows or not outcome.failures:
        return
    lines = [
        f"  {f['error']}" if str(f["error"]).startswith(f["source"]) else f"  {f['source']}: {f['error']}"
        for f in outcome.failures[:shown]
    ]
    if len(outcome.failures) > shown:
        lines.append(f"  ... and {len(outcome.failures) - shown} more")
    raise OctSamError(
        f"none of the {len(outcome.failures)} input B-scan(s) could be segmented, so nothing was written to "
        f"{final}:\n" + "\n".join(lines)
    )


def _segment_volume_share(args, processes, final, tmp, started: float, entries: list[dict]) -> int:
    """The volume half of ``run``: every process reads its share of the files, checks (with the
    others) that no two volumes share a folder, segments the volumes that no earlier attempt finished and journals
    each; the main process then writes ``volumes.csv`` (input order) and ``run.json``. Returns the volumes."""
    from octsam.infer.archive import latest_entries, read_journal
    from octsam.infer.volumes import _read_share, segment_volumes, write_volumes_csv
    from octsam.volumes.segment import VOLUMES_CSV, volume_folder_name
    from octsam.volumes.volume import parse_spacing

    share = processes.agree(lambda: _read_share(args, processes))
    listed = [(order, volume_folder_name(v), v.source, v.n_bscans) for order, v in share]
    every = sorted(item for part in processes.all_gather(listed) for item in part)

    def unique() -> None:
        seen: dict[str, str] = {}
        for _, name, source, _ in every:
            if name in seen:
                raise OctSamError(f"two volumes would be written to {name}/: {seen[name]} and {source}; rename one.")
            seen[name] = source

    processes.agree(unique)
    done = {name for name, entry in latest_entries(entries, "volume").items() if "row" in entry}
    todo = [(order, volume) for order, volume in share if volume_folder_name(volume) not in done]
    processes.barrier()  # every process has read the journal before any writes to it
    with _ModelAndWriters(args, final, tmp, started, sum(v.n_bscans for _, v in todo), processes) as ctx:
        record = segment_volumes(ctx, todo)
        parts = processes.all_gather(record)
        if processes.is_main:
            names = {name for _, name, _, _ in every}
            latest = latest_entries(read_journal(tmp), "volume")
            rows = sorted((tuple(e["order"]), e["row"]) for name, e in latest.items() if name in names)
            write_volumes_csv(tmp / VOLUMES_CSV, [row for _, row in rows])
            total = sum(n for *_, n in every)
            before = sum(n for _, name, _, n in every if name in done)
            record = run_record(ctx)
            record.update(
                {
                    "volumes": [source for _, _, source, _ in every],
                    "spacing_mm": list(parse_spacing(args.spacing)) if args.spacing else None,
                    "inputs": total,
                    "segmented": total,
                    "seconds": round(time.perf_counter() - ctx.timings.started, 2),
                    "timings": ctx.timings.record(parts[0]["segmented"]),
                    "processes": parts,
                    "progress": progress_record(total, before, parts, ctx.timings),
                }
            )
            write_run_record(tmp, record)
    return len(every)


def partial_exists(final: Path) -> bool:
    from octsam.infer.archive import partial_path

    return partial_path(final).exists()


class _ModelAndWriters:
    """The writer pool (started before the model is loaded, so forked writers hold no copy of it) and the model;
    the pool is shut down however the run ends."""

    def __init__(self, args, final: Path, tmp: Path, started: float, num_scans: int, processes: Processes):
        self.args, self.final, self.tmp, self.started, self.num_scans = args, final, tmp, started, num_scans
        self.processes = processes

    def __enter__(self) -> InferenceRun:
        args = self.args
        device = self.processes.use_device(args.device)
        device_type = resolve_device(device).type
        if device_type == "cuda":
            # The reader threads decode and resize in parallel with each other; OpenCV's own thread pool on top of
            # them only oversubscribes the cores that the writers and the main thread need.
            import cv2

            cv2.setNumThreads(1)
        write_workers = getattr(args, "write_workers", None) or default_write_workers()
        self.writers = start_writers(getattr(args, "writer", "auto"), write_workers, device_type)
        try:
            folder, plan, segmenter, load_s = load_segmenter(args, device_type, self.num_scans, device)
        except BaseException:
            stop_pool(self.writers)
            raise
        timings = Timings(started=self.started, load_s=load_s)
        return InferenceRun(
            args, self.final, self.tmp, timings, self.writers, write_workers, folder, plan, segmenter,
            segmenter.batch_size, self.processes, Journal(self.tmp, self.processes),
        )  # fmt: skip

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.writers.shutdown(wait=True)
        else:  # Ctrl-C, SIGTERM or an error: cancel what waits, give what runs STOP_GRACE_S, end the rest
            stop_pool(self.writers)


@dataclass
class ScanOutcome:
    rows: list[dict]
    failures: list[dict]
    inputs: int
    no_prompts: int
    record: dict = field(default_factory=dict)  # this process's part of run.json (timings, device, share)


def _check_scans(ctx: InferenceRun, scans: list[ScanInput], prompting: Prompting) -> None:
    """Labels of dataset inputs, prompt class names and the adapter's mode: checked before any work."""
    labels, args = ctx.labels, ctx.args
    for scan in scans:  # a dataset's B-scans (the first of each dataset suffices; the check is cheap)
        if scan.dataset_labels is not None:
            check_same_labels(labels, scan.dataset_labels, args.adapter, scan.source.rsplit(":", 1)[0])
    for spec in prompting.all_specs():
        label_id(spec.label, labels)  # a bad class name stops the run before any work
    if ctx.segmenter.config.mode == "prompted" and not prompting.active:
        raise OctSamError(
            f"Adapter {args.adapter} was trained in prompted mode: give prompts with --box CLASS:x1,y1,x2,y2, "
            "--point CLASS:x,y or --prompts FILE.json."
        )


def _segment_scans(
    ctx: InferenceRun,
    todo: list[tuple[int, ScanInput]],
    prompting: Prompting,
    spacing,
    total: int | None = None,
    done_before: int = 0,
) -> ScanOutcome:
    """Read (reader threads), predict (this thread, in batches) and write (the writer pool) this process's B-scans
    (``todo``: (input index, scan)); every finished or failed B-scan goes into the journal as soon as its files
    are written. One function because the three stages share one bounded pipeline (prefetch, batches, pending
    writes) whose order is the whole point."""
    args, segmenter, timings, journal = ctx.args, ctx.segmenter, ctx.timings, ctx.journal
    prompted, labels = prompting.active, ctx.labels
    index_of = {scan.name: index for index, scan in todo}
    scans = [scan for _, scan in todo]

    def load(scan: ScanInput):
        """Read, decode and resize one B-scan (a reader thread); an error is returned, not raised."""
        t, cpu = time.perf_counter(), time.thread_time()
        decode_s = prepare_s = 0.0
        try:
            image = scan.read()
            decode_s = time.perf_counter() - t
            prompts = None
            if prompted:
                prompts = build_prompts(prompting.for_scan(scan.name), labels, image.shape[:2], scan.source)
            t1 = time.perf_counter()
            item = (scan, image, prompts, segmenter.prepare(image)), None
            prepare_s = time.perf_counter() - t1
        except Exception as err:  # noqa: BLE001 - any unreadable B-scan is reported and skipped
            message = str(err) if isinstance(err, OctSamError) else f"{type(err).__name__}: {err}"
            item = None, {"scan": scan.name, "source": scan.source, "error": message}
        return item, (time.perf_counter() - t, time.thread_time() - cpu, decode_s, prepare_s)

    def fail(failure: dict) -> None:
        outcome.failures.append(failure)
        journal.add({"scan": failure["scan"], "index": index_of[failure["scan"]], "failure": failure})

    def written(future: Future) -> None:
        row, seconds = future.result()
        outcome.rows.append(row)
        timings.add_write(seconds)
        no_prompt = row["scan"] in no_prompt_names
        journal.add({"scan": row["scan"], "index": index_of[row["scan"]], "row": row, "no_prompt": no_prompt})

    settings = OutputSettings(ctx.tmp, labels, spacing)
    read_workers = getattr(args, "read_workers", None) or default_read_workers()
    outcome = ScanOutcome([], [], len(scans), 0)
    no_prompt_names = set()
    pending: list[Future] = []  # futures of written rows, in scan order
    drained = 0  # pending[:drained] are written and in the journal
    bar = _progress(ctx, total, done_before, args.quiet)
    timings.loop_start = time.perf_counter()
    with WorkerThreads(read_workers, "octsam-read") as readers:  # a stop waits at most STOP_GRACE_S for them
        try:
            loaded = _prefetch(readers, load, scans, ahead=2 * ctx.batch_size + read_workers)
            for batch in _batches(scans, ctx.batch_size):
                t0 = time.perf_counter()
                ready = []
                for _ in batch:
                    (item, error), seconds = next(loaded)
                    timings.add_read(seconds)
                    if error is not None:
                        fail(error)
                        bar.update()
                        continue
                    if prompted and not prompting.for_scan(item[0].name):
                        outcome.no_prompts += 1
                        no_prompt_names.add(item[0].name)
                    ready.append(item)
                timings.wait_read_s += time.perf_counter() - t0
                if not ready:
                    journal.sync()
                    continue
                t0 = time.perf_counter()
                failures: list[dict] = []
                results = _predict(segmenter, ready, prompted, args.save_probabilities, failures)
                for failure in failures:
                    fail(failure)
                seconds = time.perf_counter() - t0
                timings.predict_s += seconds
                timings.first_batch(seconds, len(ready), segmenter.compiled, args.quiet)
                t0 = time.perf_counter()
                for (scan, image, _, _), result in zip(ready, results):
                    if result is not None:
                        out = ScanOutput(scan.name, scan.source, image, result.mask, result.probabilities)
                        pending.append(ctx.writers.submit(write_one, settings, out))
                    bar.update()
                # bounded memory: at most a few batches of B-scans waiting for the writers; what is written
                # goes into the journal in scan order
                while drained < len(pending) and (
                    len(pending) - drained > 4 * ctx.batch_size + ctx.write_workers or pending[drained].done()
                ):
                    written(pending[drained])
                    drained += 1
                journal.sync()
                timings.wait_write_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for future in pending[drained:]:
                written(future)
                bar.update()
            drained = len(pending)
            journal.close()
            timings.wait_write_s += time.perf_counter() - t0
        except BaseException:
            for future in pending:
                future.cancel()
            journal.close()
            raise
    timings.loop_end = time.perf_counter()
    bar.close()
    ctx.writers.shutdown(wait=True)
    outcome.record = {
        **ctx.processes.record(),
        "device": str(segmenter.device),
        "inputs": len(scans),
        "segmented": len(outcome.rows),
        "failed": len(outcome.failures),
        "read_workers": read_workers,
        "timings": timings.record(len(outcome.rows)),
    }
    return outcome


def _finish_scans(
    ctx: InferenceRun, inputs: list[ScanInput], share: ScanOutcome, prompting: Prompting, spacing, done_before: int
) -> ScanOutcome:
    """After every process's share: the main process writes ``summary.csv`` and ``run.json`` from the journal of
    every process and attempt (the newest outcome of each input B-scan); returns the whole run's outcome."""
    processes = ctx.processes
    parts = processes.all_gather(share.record)  # also the barrier: every process's journal is complete
    if not processes.is_main:
        return share
    names = {scan.name for scan in inputs}
    latest = [e for name, e in latest_entries(read_journal(ctx.tmp), "scan").items() if name in names]
    latest.sort(key=lambda e: e["index"])
    outcome = ScanOutcome(
        [e["row"] for e in latest if "row" in e],
        [e["failure"] for e in latest if "failure" in e],
        len(inputs),
        sum(bool(e.get("no_prompt")) for e in latest if "row" in e),
    )
    t0 = time.perf_counter()
    write_summary(ctx.tmp / "summary.csv", outcome.rows, outcome.failures, ctx.labels, spacing)
    ctx.timings.write_s += time.perf_counter() - t0
    record = _scan_record(ctx, outcome, prompting, spacing, share.record["read_workers"])
    record["timings"] = ctx.timings.record(len(share.rows))
    record["processes"] = parts
    record["progress"] = progress_record(len(inputs), done_before, parts, ctx.timings)
    write_run_record(ctx.tmp, record)
    return outcome


def progress_record(total: int, done_before: int, parts: list[dict], timings: Timings) -> dict:
    """run.json's progress block: what this attempt did on top of earlier (resumed) ones, over all processes."""
    this_run = sum(part["segmented"] + part["failed"] for part in parts)
    seconds = timings.loop_end - timings.loop_start
    return {
        "total": total,
        "done": done_before + this_run,
        "done_before_resume": done_before,
        "this_run": this_run,
        "processes": len(parts),
        "seconds": round(seconds, 3),
        "scans_per_s": round(this_run / seconds, 3) if this_run and seconds > 0 else None,
    }


def _scan_record(ctx: InferenceRun, outcome: ScanOutcome, prompting: Prompting, spacing, read_workers: int) -> dict:
    """run.json of a B-scan run: ``run_record`` plus the inputs, failures, prompts and timings."""
    record = run_record(ctx)
    record.update(
        {
            "mode": "prompted" if prompting.active else "automatic",
            "read_workers": read_workers,
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "inputs": outcome.inputs,
            "segmented": len(outcome.rows),
            "failed": len(outcome.failures),
            "failures": outcome.failures,
            "scans_without_prompts": outcome.no_prompts if prompting.active else None,
            "unmatched_prompt_keys": prompting.unmatched,
            "timings": ctx.timings.record(len(outcome.rows)),
        }
    )
    return record


class _Progress:
    """The main process's progress bar over the whole run (done / total, B-scans/s, time left): it counts the lines
    that every process adds to its journal (read at most once a second), on top of what earlier attempts did."""

    def __init__(self, ctx: InferenceRun, total: int, done_before: int, quiet: bool):
        from tqdm.auto import tqdm

        self.folder, self.offsets, self.last = ctx.tmp, {}, 0.0
        count_lines(self.folder, self.offsets)  # earlier attempts: already in done_before
        self.bar = tqdm(total=total, initial=done_before, unit="scan", desc="segmenting", disable=quiet)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last > 1.0:
            self.last = now
            self.bar.update(count_lines(self.folder, self.offsets))

    def close(self) -> None:
        self.update(force=True)
        self.bar.close()


class _NoBar:
    def update(self, force: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(ctx: InferenceRun, total: int, done_before: int, quiet: bool):
    """A bar in the main process only."""
    return _Progress(ctx, total, done_before, quiet) if ctx.processes.is_main else _NoBar()


def run_record(ctx: InferenceRun) -> dict:
    """What every run.json says: the adapter, the model as it ran, the software and the arguments."""
    import torch

    from octsam import __version__

    args, segmenter, folder = ctx.args, ctx.segmenter, ctx.folder
    return {
        "adapter": args.adapter,
        "adapter_revision": args.revision,
        "engine": getattr(args, "engine", "torch"),
        "adapter_folder": str(folder),
        "ensemble": list(getattr(args, "adapters", [])) if len(getattr(args, "adapters", [])) > 1 else None,
        "tta": getattr(args, "tta", "none"),
        "adapter_commit": folder.name if folder.parent.name == "snapshots" else None,
        "base_model": segmenter.config.base_model,
        "base_model_revision": segmenter.config.base_model_revision,
        "labels": ctx.labels,
        "mode": "automatic",
        "merged": None if not segmenter.base.peft_adapter else not args.no_merge,
        "attention": None
        if not segmenter.base.fast_attention
        else "transformers"
        if args.no_fast_attention
        else f"octsam fast ({args.attention_mode})",
        "compiled": segmenter.compiled,
        "compile_reason": ctx.plan.why,
        "device": str(segmenter.device),
        "device_name": device_name(segmenter.device),
        "dtype": str(segmenter.dtype).replace("torch.", ""),
        "batch_size": ctx.batch_size,
        "write_workers": ctx.write_workers,
        "octsam_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in vars(args).items() if k != "argv"},
    }


def write_run_record(folder: Path, record: dict) -> None:
    (folder / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def _print_outcome(outcome: ScanOutcome, final: Path, prompting: Prompting) -> None:
    if prompting.active and outcome.no_prompts:
        print(f"warning: {outcome.no_prompts} B-scan(s) had no prompt; their masks are empty.", file=sys.stderr)
    print(f"segmented {len(outcome.rows)} of {outcome.inputs} B-scan(s) into {final}", file=sys.stderr)
    for failure in outcome.failures:
        print(f"failed: {failure['source']}: {failure['error']}", file=sys.stderr)


def _predict(segmenter, ready: list, prompted: bool, probabilities: bool, failures: list) -> list:
    """Segment a batch; if the batch fails, retry each B-scan alone so that one bad scan does not sink the rest."""
    images = [image for _, image, _, _ in ready]
    prompts = [p for _, _, p, _ in ready] if prompted else None
    prepared = [x for _, _, _, x in ready]
    try:
        return segmenter(images, prompts=prompts, return_probabilities=probabilities, prepared=prepared)
    except (OctSamError, RuntimeError, ValueError) as batch_error:
        if len(ready) == 1:
            scan = ready[0][0]
            failures.append({"scan": scan.name, "source": scan.source, "error": str(batch_error)})
            return [None]
    results = []
    for item in ready:
        results.extend(_predict(segmenter, [item], prompted, probabilities, failures))
    return results
