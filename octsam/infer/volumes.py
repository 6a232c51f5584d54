"""``inference.py`` on OCT volumes (vendor files, DICOM, Duke .mat, RETOUCH .mhd, or a folder of B-scans with
``--spacing``): per-B-scan masks plus, per eye, biomarker volumes in mm³, 3-D lesion counts, en-face maps, the ETDRS
grid and a one-page report, and one row per volume in ``volumes.csv`` (see ``octsam.volumes``).

Volumes go through the same run as B-scan files (``octsam.infer.run.run``): one locked, staged output folder, one
adapter resolution and speed plan, and every model flag (``--batch-size``, ``--precision``, ``--compile``,
``--save-probabilities``, attention, merging) as for B-scans; each eye's folder is written by the writer pool
(``--write-workers``, ``--writer``). Volumes are read up front, each file checked before anything is segmented, so
``--read-workers`` does not apply."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import Future

from octsam.errors import OctSamError


def wants_volumes(args: argparse.Namespace) -> bool:
    """True when the run is about volumes: ``--spacing`` was given or an input is a volume file."""
    if getattr(args, "spacing", None):
        return True
    from octsam.volumes.readers import is_volume_input

    return any(is_volume_input(path) for path in args.input)


def check_volume_arguments(args: argparse.Namespace) -> None:
    if args.dataset:
        raise OctSamError("--dataset and volume inputs cannot be mixed; run them separately.")
    if not args.input:
        raise OctSamError("--spacing was given but no --input volume or B-scan folder.")


def read_volumes(args: argparse.Namespace) -> list:
    """Every volume of ``args.input`` (an E2E file may hold several), all read and checked before any work."""
    from octsam.volumes.readers import read_volume
    from octsam.volumes.segment import check_unique_folders
    from octsam.volumes.volume import parse_spacing

    spacing = parse_spacing(args.spacing)
    volumes = [v for path in args.input for v in read_volume(path, spacing)]
    check_unique_folders(volumes)
    return volumes


def segment_volumes(ctx, volumes: list) -> dict:
    """Segment every volume with the run's model (``ctx``: ``octsam.infer.run.InferenceRun``) into its staging
    folder: one folder per eye (written by the writer pool) and ``volumes.csv`` rows in input order; returns what
    run.json says of the volumes (the run writes it)."""
    from octsam.volumes.report import append_volumes_csv, csv_row
    from octsam.volumes.segment import VOLUMES_CSV, segment_volume, write_volume_folder
    from octsam.volumes.volume import parse_spacing

    args, segmenter, timings = ctx.args, ctx.segmenter, ctx.timings
    if segmenter.config.mode == "prompted":
        raise OctSamError("This adapter was trained in prompted mode; volumes are segmented in automatic mode only.")
    pending: list[tuple[object, Future]] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            result, future = pending.pop(0)
            t0 = time.perf_counter()
            folder = future.result()
            timings.wait_write_s += time.perf_counter() - t0
            append_volumes_csv(ctx.tmp / VOLUMES_CSV, csv_row(result.volume, result.measures))
            totals = ", ".join(f"{k} {v:.4f} mm³" for k, v in result.measures.volume_mm3.items())
            print(f"{result.volume.source}: {result.volume.n_bscans} B-scans -> {ctx.final / folder.name} ({totals})")

    timings.loop_start = time.perf_counter()
    try:
        for volume in volumes:
            t0 = time.perf_counter()
            result = segment_volume(segmenter, volume, return_probabilities=args.save_probabilities)
            seconds = time.perf_counter() - t0
            timings.predict_s += seconds
            timings.first_batch(seconds, volume.n_bscans, segmenter.compiled, args.quiet)
            pending.append((result, ctx.writers.submit(write_volume_folder, result, ctx.tmp)))
            drain(keep=ctx.write_workers)  # bounded memory: a few eyes waiting for the writers
        drain(keep=0)
    except BaseException:
        for _, future in pending:
            future.cancel()
        raise
    timings.loop_end = time.perf_counter()
    return {
        "volumes": [volume.source for volume in volumes],
        "spacing_mm": list(parse_spacing(args.spacing)) if args.spacing else None,
        "inputs": sum(volume.n_bscans for volume in volumes),
        "segmented": sum(volume.n_bscans for volume in volumes),
        "seconds": round(time.perf_counter() - timings.started, 2),
        "timings": timings.record(sum(volume.n_bscans for volume in volumes)),
    }
