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


def _read_share(args: argparse.Namespace, processes) -> list[tuple[tuple[int, int], object]]:
    """This process's share of the input files (Accelerate's split of ``--input`` in its order), read and checked:
    ((file index, volume index in the file), volume) per volume."""
    from octsam.volumes.readers import read_volume
    from octsam.volumes.volume import parse_spacing

    spacing = parse_spacing(args.spacing)
    mine = processes.share(list(enumerate(args.input)))
    return [((i, k), volume) for i, path in mine for k, volume in enumerate(read_volume(path, spacing))]


def write_volumes_csv(path, rows: list[dict]) -> None:
    """``volumes.csv`` in one go, as ``append_volumes_csv`` row by row would leave it (one row per volume id and
    source, text cells made safe for spreadsheets)."""
    import csv

    from octsam.textsafe import csv_row as safe_csv_row

    unique = {(str(row.get("volume_id")), str(row.get("source"))): safe_csv_row(row) for row in rows}
    if not unique:
        return
    rows = list(unique.values())
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def segment_volumes(ctx, volumes: list) -> dict:
    """Segment this process's volumes (``ctx``: ``octsam.infer.run.InferenceRun``; ``volumes``: (order, volume))
    into the staging folder: one folder per eye (written by the writer pool), journalled with its ``volumes.csv``
    row when complete; returns this process's part of run.json."""
    from octsam.volumes.report import csv_row
    from octsam.volumes.segment import segment_volume, volume_folder_name, write_volume_folder

    args, segmenter, timings = ctx.args, ctx.segmenter, ctx.timings
    if segmenter.config.mode == "prompted":
        raise OctSamError("This adapter was trained in prompted mode; volumes are segmented in automatic mode only.")
    pending: list[tuple[tuple, object, Future]] = []
    scans = 0

    def drain(keep: int) -> None:
        while len(pending) > keep:
            order, result, future = pending.pop(0)
            t0 = time.perf_counter()
            folder = future.result()
            timings.wait_write_s += time.perf_counter() - t0
            row = csv_row(result.volume, result.measures)
            ctx.journal.add({"volume": volume_folder_name(result.volume), "order": list(order), "row": row})
            ctx.journal.sync()
            totals = ", ".join(f"{k} {v:.4f} mm³" for k, v in result.measures.volume_mm3.items())
            print(f"{result.volume.source}: {result.volume.n_bscans} B-scans -> {ctx.final / folder.name} ({totals})")

    timings.loop_start = time.perf_counter()
    try:
        for order, volume in volumes:
            t0 = time.perf_counter()
            result = segment_volume(segmenter, volume, return_probabilities=args.save_probabilities)
            seconds = time.perf_counter() - t0
            timings.predict_s += seconds
            timings.first_batch(seconds, volume.n_bscans, segmenter.compiled, args.quiet)
            scans += volume.n_bscans
            pending.append((order, result, ctx.writers.submit(write_volume_folder, result, ctx.tmp)))
            drain(keep=ctx.write_workers)  # bounded memory: a few eyes waiting for the writers
        drain(keep=0)
    except BaseException:
        for _, _, future in pending:
            future.cancel()
        ctx.journal.close()
        raise
    ctx.journal.close()
    timings.loop_end = time.perf_counter()
    return {
        **ctx.processes.record(),
        "device": str(segmenter.device),
        "inputs": scans,
        "segmented": scans,
        "failed": 0,
        "volumes": len(volumes),
        "timings": timings.record(scans),
    }
