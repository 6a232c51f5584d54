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
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from octsam.cli.common import parse_pixel_spacing
from octsam.data.prompts import PromptSpec, build_prompts, label_id, parse_box, parse_point, read_prompt_file
from octsam.errors import OctSamError
from octsam.folders import FolderLock
from octsam.infer.inputs import ScanInput, collect_inputs
from octsam.infer.outputs import _write_scan, _write_summary, commit_output, prepare_output
from octsam.segmenter import device_name

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


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns the number of B-scans that failed."""
    import torch
    from tqdm.auto import tqdm

    from octsam import __version__
    from octsam.adapter import resolve_adapter
    from octsam.segmenter import Segmenter

    started = time.perf_counter()
    if args.batch_size is not None and args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    spacing = parse_pixel_spacing(args.pixel_spacing_mm)
    cli_specs = [parse_box(b) for b in args.box] + [parse_point(p) for p in args.point]
    prompt_file = read_prompt_file(args.prompts) if args.prompts else {}
    lock = FolderLock(Path(args.output).expanduser(), "inference").acquire()  # one run per --output
    try:
        final, tmp = prepare_output(args.output, args.overwrite)
    except BaseException:
        lock.release()
        raise
    try:
        scans = collect_inputs(args.input, args.dataset, args.split, args.dataset_revision, exclude=[final, tmp])
        file_specs, unmatched = _file_prompts(prompt_file, scans)
        for key in unmatched:
            print(f"warning: --prompts key {key!r} matches no input B-scan", file=sys.stderr)
        prompted = bool(cli_specs or prompt_file)

        t0 = time.perf_counter()
        folder = resolve_adapter(args.adapter, revision=args.revision)
        segmenter = Segmenter.from_pretrained(
            folder,
            revision=args.revision,
            device=args.device,
            merge=not args.no_merge,
            base_model=args.base_model,
            fast_attention=False if args.no_fast_attention else args.attention_mode,
            compile=args.compile,
        )
        load_s = time.perf_counter() - t0
        batch_size = args.batch_size or (16 if segmenter.device.type == "cuda" else 1)
        segmenter.batch_size = batch_size
        labels = segmenter.labels
        for spec in cli_specs + [s for specs in prompt_file.values() for s in specs]:
            label_id(spec.label, labels)  # a bad class name stops the run before any work
        if segmenter.config.mode == "prompted" and not prompted:
            raise OctSamError(
                f"Adapter {args.adapter} was trained in prompted mode: give prompts with --box CLASS:x1,y1,x2,y2, "
                "--point CLASS:x,y or --prompts FILE.json."
            )

        rows, failures = [], []
        no_prompts = 0
        timings = {"read_s": 0.0, "predict_s": 0.0, "write_s": 0.0}
        bar = tqdm(total=len(scans), unit="scan", desc="segmenting", disable=args.quiet)
        for batch in _batches(scans, batch_size):
            t0 = time.perf_counter()
            ready = []
            for scan in batch:
                try:
                    image = scan.read()
                    prompts = None
                    if prompted:
                        specs = cli_specs + file_specs.get(scan.name, [])
                        no_prompts += not specs
                        prompts = build_prompts(specs, labels, image.shape[:2], scan.source)
                    ready.append((scan, image, prompts))
                except Exception as err:  # noqa: BLE001 - any unreadable B-scan is reported and skipped
                    message = str(err) if isinstance(err, OctSamError) else f"{type(err).__name__}: {err}"
                    failures.append({"scan": scan.name, "source": scan.source, "error": message})
                    bar.update(1)
            timings["read_s"] += time.perf_counter() - t0
            if not ready:
                continue
            t0 = time.perf_counter()
            results = _predict(segmenter, ready, prompted, args.save_probabilities, failures)
            timings["predict_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for (scan, image, _), result in zip(ready, results):
                if result is not None:
                    rows.append(_write_scan(tmp, scan, image, result, labels, spacing))
                bar.update(1)
            timings["write_s"] += time.perf_counter() - t0
        bar.close()

        t0 = time.perf_counter()
        _write_summary(tmp / "summary.csv", rows, failures, labels, spacing)
        timings["write_s"] += time.perf_counter() - t0
        done = len(rows)
        record = {
            "adapter": args.adapter,
            "adapter_revision": args.revision,
            "adapter_folder": str(folder),
            "adapter_commit": folder.name if folder.parent.name == "snapshots" else None,
            "base_model": segmenter.config.base_model,
            "base_model_revision": segmenter.config.base_model_revision,
            "labels": labels,
            "mode": "prompted" if prompted else "automatic",
            "merged": not args.no_merge,
            "attention": "transformers" if args.no_fast_attention else f"octsam fast ({args.attention_mode})",
            "compiled": args.compile,
            "device": str(segmenter.device),
            "device_name": device_name(segmenter.device),
            "dtype": str(segmenter.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "inputs": len(scans),
            "segmented": done,
            "failed": len(failures),
            "failures": failures,
            "scans_without_prompts": no_prompts if prompted else None,
            "unmatched_prompt_keys": unmatched,
            "timings": {
                "load_s": round(load_s, 3),
                **{k: round(v, 3) for k, v in timings.items()},
                "total_s": round(time.perf_counter() - started, 3),
                "predict_s_per_scan": round(timings["predict_s"] / done, 4) if done else None,
                "scans_per_s": round(done / timings["predict_s"], 3) if done and timings["predict_s"] else None,
            },
            "octsam_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "arguments": {k: v for k, v in vars(args).items()},
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    if prompted and no_prompts:
        print(f"warning: {no_prompts} B-scan(s) had no prompt; their masks are empty.", file=sys.stderr)
    print(f"segmented {done} of {len(scans)} B-scan(s) into {final}", file=sys.stderr)
    for failure in failures:
        print(f"failed: {failure['source']}: {failure['error']}", file=sys.stderr)
    return len(failures)


def _predict(segmenter, ready: list, prompted: bool, probabilities: bool, failures: list) -> list:
    """Segment a batch; if the batch fails, retry each B-scan alone so that one bad scan does not sink the rest."""
    images = [image for _, image, _ in ready]
    prompts = [p for _, _, p in ready] if prompted else None
    try:
        return segmenter(images, prompts=prompts, return_probabilities=probabilities)
    except (OctSamError, RuntimeError, ValueError) as batch_error:
        if len(ready) == 1:
            scan = ready[0][0]
            failures.append({"scan": scan.name, "source": scan.source, "error": str(batch_error)})
            return [None]
    results = []
    for item in ready:
        results.extend(_predict(segmenter, [item], prompted, probabilities, failures))
    return results
