"""``inference.py`` on OCT volumes (vendor files, DICOM, Duke .mat, RETOUCH .mhd, or a folder of B-scans with
``--spacing``): per-B-scan masks plus, per eye, biomarker volumes in mm³, 3-D lesion counts, en-face maps, the ETDRS
grid and a one-page report, and one row per volume in ``volumes.csv`` (see ``octsam.volumes``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from octsam.errors import OctSamError
from octsam.folders import FolderLock, atomic_folder


def wants_volumes(args: argparse.Namespace) -> bool:
    """True when the run is about volumes: ``--spacing`` was given or an input is a volume file."""
    if getattr(args, "spacing", None):
        return True
    from octsam.volumes.readers import is_volume_input

    return any(is_volume_input(path) for path in args.input)


def run_volumes(args: argparse.Namespace) -> int:
    """Segment every volume of ``args.input`` into ``args.output`` (all or nothing); returns 0."""
    from octsam.export.runtime import load_segmenter
    from octsam.volumes.readers import read_volume
    from octsam.volumes.segment import check_unique_folders, write_volume_outputs
    from octsam.volumes.volume import parse_spacing

    if args.dataset:
        raise OctSamError("--dataset and volume inputs cannot be mixed; run them separately.")
    if not args.input:
        raise OctSamError("--spacing was given but no --input volume or B-scan folder.")
    final = Path(args.output).expanduser()
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not args.overwrite:
        raise OctSamError(f"Output folder {final} is not empty; choose another --output or pass --overwrite.")
    spacing = parse_spacing(args.spacing)
    started = time.perf_counter()
    volumes = [v for path in args.input for v in read_volume(path, spacing)]  # every file checked before any work
    check_unique_folders(volumes)
    segmenter = load_segmenter(
        getattr(args, "engine", "torch"),
        args.adapter,
        revision=args.revision,
        device=args.device,
        merge=not args.no_merge,
        base_model=args.base_model,
        fast_attention=False if args.no_fast_attention else args.attention_mode,
    )
    if segmenter.config.mode == "prompted":
        raise OctSamError("This adapter was trained in prompted mode; volumes are segmented in automatic mode only.")
    with FolderLock(final, "inference"), atomic_folder(final) as tmp:
        for volume in volumes:
            result = segmenter.segment_volume(volume)
            folder = write_volume_outputs(result, tmp)
            totals = ", ".join(f"{k} {v:.4f} mm³" for k, v in result.measures.volume_mm3.items())
            print(f"{volume.source}: {volume.n_bscans} B-scans -> {final / folder.name} ({totals})")
        (tmp / "run.json").write_text(
            json.dumps(
                {
                    "adapter": str(args.adapter),
                    "labels": segmenter.labels,
                    "volumes": [volume.source for volume in volumes],
                    "spacing_mm": list(spacing) if spacing else None,
                    "seconds": round(time.perf_counter() - started, 2),
                },
                indent=2,
            )
            + "\n"
        )
    print(f"wrote {len(volumes)} volume(s) to {final} (volumes.csv, one folder per eye)")
    return 0
