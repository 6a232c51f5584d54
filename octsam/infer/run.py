"""Segment new B-scans with a trained adapter: masks, overlays, probabilities, biomarker areas (``inference.py``).

python inference.py --adapter ORG/NAME --input scans/ --output predictions/
python inference.py --adapter runs/amd/best_adapter --input "scans/**/*.tif" --output out --box fluid:120,80,300,160

Per B-scan (at its native size): ``masks/NAME.png`` (class ids), ``overlays/NAME.png`` (class colours, legend below),
and with ``--save-probabilities`` ``probabilities/NAME.npz`` (float16 (K+1, H, W), channel 0 background). For the
run: ``summary.csv`` (per class: area in pixels, in mm² with ``--pixel-spacing-mm``, 8-connected components) and
``run.json`` (adapter and revision, base model, device, dtype, timings, failures). Everything is written to a
temporary folder that replaces ``--output`` at the end, so an interrupted run leaves nothing half-written and an
existing output is only replaced with ``--overwrite``.

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
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from octsam.adapter import check_same_labels
from octsam.data.contract import parse_pixel_spacing
from octsam.data.prompts import PromptSpec, build_prompts, label_id, parse_box, parse_point, read_prompt_file
from octsam.errors import OctSamError
from octsam.folders import FolderLock
from octsam.infer.inputs import ScanInput, collect_inputs
from octsam.infer.outputs import _write_scan, _write_summary, commit_output, prepare_output
from octsam.segmenter import device_name, resolve_device
from octsam.speed import plan_speed

#: octsam.models.fast_attention.MODES, repeated so that ``--help`` needs no torch import (a test keeps them equal).


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


def _timings(timings, load_s, compile_s, done, loop_start, loop_end, first_done, first_scans, started) -> dict:
    """run.json's timings: model load, compilation (the first batch of a compiled run) and B-scans/s end to end,
    overall and in steady state (after the first batch), besides the work of each stage summed over its threads
    (read, write) and the main thread's waits for them."""
    loop_s = loop_end - loop_start
    steady_s = loop_end - first_done if first_done is not None else 0.0
    out = {"load_s": round(load_s, 3), "compile_s": None if compile_s is None else round(compile_s, 3)}
    out.update({k: round(v, 3) for k, v in timings.items()})
    out.update(
        {
            "segment_s": round(loop_s, 3),
            "total_s": round(time.perf_counter() - started, 3),
            "predict_s_per_scan": round(timings["predict_s"] / done, 4) if done else None,
            "read_s_per_scan": round(timings["read_s"] / done, 4) if done else None,
            "write_s_per_scan": round(timings["write_s"] / done, 4) if done else None,
            "read_cpu_s_per_scan": round(timings["read_cpu_s"] / done, 4) if done else None,
            "write_cpu_s_per_scan": round(timings["write_cpu_s"] / done, 4) if done else None,
            "scans_per_s": round(done / loop_s, 3) if done and loop_s > 0 else None,
            "steady_scans_per_s": round((done - first_scans) / steady_s, 3)
            if done > first_scans and steady_s > 0
            else None,
        }
    )
    return out


def start_writers(kind: str, workers: int, device_type: str) -> Executor:
    """The pool that writes masks, overlays and areas. ``auto``: processes when the model runs on a GPU (the main
    thread then only launches kernels and must not wait for the GIL held by numpy work in writer threads), threads
    on the CPU (where the model's own threads use every core and release the GIL in their kernels)."""
    if kind == "auto":
        kind = "process" if device_type == "cuda" else "thread"
    if kind == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="octsam-write")
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
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        for future in [pool.submit(os.getpid) for _ in range(workers)]:  # a fork pool starts all its processes
            future.result()
    finally:
        cv2.setNumThreads(previous)
    return pool


def write_one(out: Path, name: str, source: str, image, mask, probabilities, labels, spacing) -> tuple[dict, float]:
    """Write one B-scan's outputs (a writer thread or process); returns its summary row and (wall, CPU) seconds."""
    t, cpu = time.perf_counter(), time.thread_time()
    row = _write_scan(out, ScanInput(name, source, None), image, _Result(mask, probabilities), labels, spacing)
    return row, (time.perf_counter() - t, time.thread_time() - cpu)


class _Result(NamedTuple):
    mask: object
    probabilities: object


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns the number of B-scans that failed."""
    import torch
    from tqdm.auto import tqdm

    from octsam import __version__
    from octsam.adapter import resolve_adapter
    from octsam.export.runtime import load_segmenter

    started = time.perf_counter()
    if args.batch_size is not None and args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    for name in ("read_workers", "write_workers"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise OctSamError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    spacing = parse_pixel_spacing(args.pixel_spacing_mm)
    cli_specs = [parse_box(b) for b in args.box] + [parse_point(p) for p in args.point]
    prompt_file = read_prompt_file(args.prompts) if args.prompts else {}
    lock = FolderLock(Path(args.output).expanduser(), "inference").acquire()  # one run per --output
    try:
        final, tmp = prepare_output(args.output, args.overwrite)
    except BaseException:
        lock.release()
        raise
    stack = ExitStack()  # the writer pool, shut down however the run ends
    try:
        scans = collect_inputs(args.input, args.dataset, args.split, args.dataset_revision, exclude=[final, tmp])
        file_specs, unmatched = _file_prompts(prompt_file, scans)
        for key in unmatched:
            print(f"warning: --prompts key {key!r} matches no input B-scan", file=sys.stderr)
        prompted = bool(cli_specs or prompt_file)

        device_type = resolve_device(args.device).type
        if device_type == "cuda":
            # The reader threads decode and resize in parallel with each other; OpenCV's own thread pool on top of
            # them only oversubscribes the cores that the writers and the main thread need.
            import cv2

            cv2.setNumThreads(1)
        write_workers = getattr(args, "write_workers", None) or default_write_workers()
        # The writer pool starts first: worker processes are forked before the model is loaded (no CUDA context,
        # no torch threads yet), so they hold no copy of either.
        writers = start_writers(getattr(args, "writer", "auto"), write_workers, device_type)
        stack.callback(writers.shutdown, wait=True, cancel_futures=True)

        t0 = time.perf_counter()
        engine = getattr(args, "engine", "torch")  # an ONNX folder is found by octsam.export.runtime
        folder = resolve_adapter(args.adapter, revision=args.revision) if engine == "torch" else Path(args.adapter)
        plan = plan_speed(
            device_type,
            "infer",
            fast_attention=not args.no_fast_attention,
            attention_mode=args.attention_mode,
            compile=args.compile,
            num_scans=len(scans),
        )
        segmenter = load_segmenter(
            engine,
            folder,
            revision=args.revision,
            device=args.device,
            merge=not args.no_merge,
            base_model=args.base_model,
            fast_attention=plan.attention or False,
            compile=plan.compile,
            precision=getattr(args, "precision", "auto"),
        )
        load_s = time.perf_counter() - t0
        batch_size = args.batch_size or (16 if segmenter.device.type == "cuda" else 1)
        segmenter.batch_size = batch_size
        labels = segmenter.labels
        for scan in scans:  # a dataset's B-scans (the first of each dataset suffices; the check is cheap)
            if scan.dataset_labels is not None:
                check_same_labels(labels, scan.dataset_labels, args.adapter, scan.source.rsplit(":", 1)[0])
        for spec in cli_specs + [s for specs in prompt_file.values() for s in specs]:
            label_id(spec.label, labels)  # a bad class name stops the run before any work
        if segmenter.config.mode == "prompted" and not prompted:
            raise OctSamError(
                f"Adapter {args.adapter} was trained in prompted mode: give prompts with --box CLASS:x1,y1,x2,y2, "
                "--point CLASS:x,y or --prompts FILE.json."
            )
        if not args.quiet and segmenter.compiled:
            print(f"torch.compile: on ({plan.why}); the first batch compiles", file=sys.stderr)

        def load(scan: ScanInput):
            """Read, decode and resize one B-scan (a reader thread); an error is returned, not raised."""
            t, cpu = time.perf_counter(), time.thread_time()
            try:
                image = scan.read()
                prompts = None
                if prompted:
                    specs = cli_specs + file_specs.get(scan.name, [])
                    prompts = build_prompts(specs, labels, image.shape[:2], scan.source)
                item = (scan, image, prompts, segmenter.prepare(image)), None
            except Exception as err:  # noqa: BLE001 - any unreadable B-scan is reported and skipped
                message = str(err) if isinstance(err, OctSamError) else f"{type(err).__name__}: {err}"
                item = None, {"scan": scan.name, "source": scan.source, "error": message}
            return item, (time.perf_counter() - t, time.thread_time() - cpu)

        read_workers = getattr(args, "read_workers", None) or default_read_workers()
        failures = []
        rows_pending: list = []  # futures of written rows, in scan order
        drained = 0  # rows_pending[:drained] are known to be written
        no_prompts = 0
        timings = {"read_s": 0.0, "predict_s": 0.0, "write_s": 0.0, "wait_read_s": 0.0, "wait_write_s": 0.0}
        timings.update(read_cpu_s=0.0, write_cpu_s=0.0)
        compile_s = None
        first_batch_done = None
        first_batch_scans = 0
        bar = tqdm(total=len(scans), unit="scan", desc="segmenting", disable=args.quiet)
        loop_start = time.perf_counter()
        with ThreadPoolExecutor(read_workers, thread_name_prefix="octsam-read") as readers:
            try:
                loaded = _prefetch(readers, load, scans, ahead=2 * batch_size + read_workers)
                for batch in _batches(scans, batch_size):
                    t0 = time.perf_counter()
                    ready = []
                    for _ in batch:
                        (item, error), (seconds, cpu_seconds) = next(loaded)
                        timings["read_s"] += seconds
                        timings["read_cpu_s"] += cpu_seconds
                        if error is not None:
                            failures.append(error)
                            bar.update(1)
                            continue
                        if prompted:
                            no_prompts += not (cli_specs + file_specs.get(item[0].name, []))
                        ready.append(item)
                    timings["wait_read_s"] += time.perf_counter() - t0
                    if not ready:
                        continue
                    t0 = time.perf_counter()
                    results = _predict(segmenter, ready, prompted, args.save_probabilities, failures)
                    seconds = time.perf_counter() - t0
                    timings["predict_s"] += seconds
                    if first_batch_done is None:
                        first_batch_done, first_batch_scans = time.perf_counter(), len(ready)
                        if segmenter.compiled:
                            compile_s = seconds
                            if not args.quiet:
                                print(
                                    f"torch.compile: first batch took {seconds:.1f} s (compilation)", file=sys.stderr
                                )
                    t0 = time.perf_counter()
                    for (scan, image, _, _), result in zip(ready, results):
                        if result is not None:
                            rows_pending.append(
                                writers.submit(
                                    write_one,
                                    tmp,
                                    scan.name,
                                    scan.source,
                                    image,
                                    result.mask,
                                    result.probabilities,
                                    labels,
                                    spacing,
                                )  # fmt: skip
                            )
                        bar.update(1)
                    # bounded memory: at most a few batches of B-scans waiting for the writers
                    while len(rows_pending) - drained > 4 * batch_size + write_workers:
                        rows_pending[drained].result()
                        drained += 1
                    timings["wait_write_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                rows = []
                for future in rows_pending:
                    row, (seconds, cpu_seconds) = future.result()
                    rows.append(row)
                    timings["write_s"] += seconds
                    timings["write_cpu_s"] += cpu_seconds
                timings["wait_write_s"] += time.perf_counter() - t0
            except BaseException:
                for future in rows_pending:
                    future.cancel()
                raise
        loop_end = time.perf_counter()
        bar.close()
        writers.shutdown(wait=True)

        t0 = time.perf_counter()
        _write_summary(tmp / "summary.csv", rows, failures, labels, spacing)
        timings["write_s"] += time.perf_counter() - t0
        done = len(rows)
        record = {
            "adapter": args.adapter,
            "adapter_revision": args.revision,
            "engine": engine,
            "adapter_folder": str(folder),
            "adapter_commit": folder.name if folder.parent.name == "snapshots" else None,
            "base_model": segmenter.config.base_model,
            "base_model_revision": segmenter.config.base_model_revision,
            "labels": labels,
            "mode": "prompted" if prompted else "automatic",
            "merged": None if segmenter.config.architecture == "unet" else not args.no_merge,
            "attention": None
            if segmenter.config.architecture == "unet"
            else "transformers"
            if args.no_fast_attention
            else f"octsam fast ({args.attention_mode})",
            "compiled": segmenter.compiled,
            "compile_reason": plan.why,
            "device": str(segmenter.device),
            "device_name": device_name(segmenter.device),
            "dtype": str(segmenter.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "read_workers": read_workers,
            "write_workers": write_workers,
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "inputs": len(scans),
            "segmented": done,
            "failed": len(failures),
            "failures": failures,
            "scans_without_prompts": no_prompts if prompted else None,
            "unmatched_prompt_keys": unmatched,
            "timings": _timings(
                timings, load_s, compile_s, done, loop_start, loop_end, first_batch_done, first_batch_scans, started
            ),
            "octsam_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "arguments": {k: v for k, v in vars(args).items()},
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        commit_output(tmp, final)
    except BaseException:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    stack.close()
    if prompted and no_prompts:
        print(f"warning: {no_prompts} B-scan(s) had no prompt; their masks are empty.", file=sys.stderr)
    print(f"segmented {done} of {len(scans)} B-scan(s) into {final}", file=sys.stderr)
    for failure in failures:
        print(f"failed: {failure['source']}: {failure['error']}", file=sys.stderr)
    return len(failures)


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
