"""Annotated OCT volumes -> records for the writer: Duke ``.mat``, RETOUCH case folders, eyepy ``.eye`` files.

Every B-scan row keeps, beside the data contract's columns, ``volume_id``, ``bscan_index`` and the spacing
(``axial_mm``, ``lateral_mm``, ``bscan_spacing_mm``), so per-volume measures (mm³) can be computed from the dataset.
Splits stay by patient (the writer's rule). Volumes are read once to check them and find the classes per B-scan,
then again, one at a time, while the rows are written: only one volume is in memory at once.

- ``duke-mat``: a folder of Duke DME ``.mat`` files (``images``, ``manualFluid1``/``2``, ``manualLayers1``/``2``);
  labels background, fluid; only B-scans the chosen grader annotated (11 of 61 per volume in the public set) are
  written, A-scans outside the grader's traced layers are 255 (ignore). Patient = file name without extension.
- ``retouch``: a folder searched recursively for case folders with ``oct.mhd`` + ``reference.mhd``; labels
  background, IRF, SRF, PED; every B-scan. Patient = case folder name. Source = vendor folder (Cirrus, Spectralis,
  Topcon) where the path names it.
- ``volume``: eyepy ``.eye`` files (a file or a folder of them) with area (pixel) annotations.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from dataset_builder.folder import listing
from dataset_builder.writer import BuildResult, DatasetMeta, ScanRecord, build_dataset, check_output
from octsam.data import IGNORE_INDEX
from octsam.errors import OctSamError
from octsam.safepaths import check_link
from octsam.volumes.readers import read_annotated_volume
from octsam.volumes.volume import AnnotatedVolume, parse_spacing

logger = logging.getLogger("dataset_builder")

VOLUME_FEATURES = {
    "volume_id": datasets.Value("string"),
    "bscan_index": datasets.Value("int32"),
    "axial_mm": datasets.Value("float64"),
    "lateral_mm": datasets.Value("float64"),
    "bscan_spacing_mm": datasets.Value("float64"),
}

DUKE_CITATION = (
    "Chiu SJ, Allingham MJ, Mettu PS, Cousins SW, Izatt JA, Farsiu S. Kernel regression based segmentation of "
    "optical coherence tomography images with diabetic macular edema. Biomed Opt Express 6(4):1172-1194, 2015."
)
RETOUCH_CITATION = (
    "Bogunovic H, et al. RETOUCH: The Retinal OCT Fluid Detection and Segmentation Benchmark and Challenge. "
    "IEEE Trans Med Imaging 38(8):1858-1874, 2019."
)


def find_duke_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise OctSamError(f"Duke .mat input not found: {folder}")
    files = sorted(
        check_link(p, folder) for p in folder.iterdir() if p.suffix.lower() == ".mat" and not p.name.startswith(".")
    )
    if not files:
        raise OctSamError(f"no .mat files in {folder} (expected the Duke DME Subject_XX.mat files).")
    return files


def find_retouch_cases(folder: Path) -> list[Path]:
    if not folder.exists():
        raise OctSamError(f"RETOUCH input not found: {folder}")
    if folder.is_file():
        folder = folder.parent
    cases = sorted({Path(root) for root, _, files in os.walk(folder) if "oct.mhd" in files})
    for case in cases:  # the headers (and, checked by the reader, their data files) stay inside the folder named
        for name in ("oct.mhd", "reference.mhd"):
            check_link(case / name, folder)
    if not cases:
        raise OctSamError(f"no RETOUCH case folders (with oct.mhd) under {folder}.")
    unlabelled = [c for c in cases if not (c / "reference.mhd").is_file()]
    if unlabelled:
        raise OctSamError(
            f"{len(unlabelled)} case folder(s) under {folder} have oct.mhd but no reference.mhd (the labels): "
            f"{listing([str(c.relative_to(folder)) for c in unlabelled])}. Remove them or pass only the training set."
        )
    return cases


def find_eye_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise OctSamError(f"volume input not found: {folder}")
    files = sorted(check_link(p, folder) for p in folder.iterdir() if p.suffix.lower() == ".eye")
    if not files:
        raise OctSamError(f"no eyepy .eye files in {folder}.")
    return files


def _patient(name: str, regex: str | None) -> str:
    if regex is None:
        return name
    try:
        match = re.search(regex, name)
    except re.error as err:
        raise OctSamError(f"--patient-regex {regex!r} is not a valid regular expression: {err}") from err
    if match is None or not match.groups() or not match.group(1):
        raise OctSamError(f"--patient-regex {regex!r} finds no patient id (group 1) in {name!r}.")
    return match.group(1)


def volume_records(
    paths: Sequence[Path],
    reader: Callable[[Path], AnnotatedVolume],
    disease: str,
    source: Callable[[Path], str] | str,
    patient_regex: str | None = None,
    patient_of: Callable[[Path, AnnotatedVolume], str] | None = None,
) -> tuple[list[ScanRecord], list[str]]:
    """One record per annotated B-scan of every volume; all volumes must share one label set."""
    cached = functools.lru_cache(maxsize=1)(reader)
    records: list[ScanRecord] = []
    labels: list[str] | None = None
    volume_ids: dict[str, Path] = {}
    for path in paths:
        av = cached(path)
        if labels is None:
            labels = list(av.labels)
        elif av.labels != labels:
            raise OctSamError(f"{path} has labels {av.labels}, other volumes {labels}; build them separately.")
        vol = av.volume
        if vol.volume_id in volume_ids:
            raise OctSamError(f"volume id {vol.volume_id!r} of {path} repeats {volume_ids[vol.volume_id]}.")
        volume_ids[vol.volume_id] = path
        name = patient_of(path, av) if patient_of is not None else vol.patient_id or vol.volume_id
        patient = _patient(name, patient_regex)
        src = source(path) if callable(source) else source
        digits = max(3, len(str(vol.n_bscans - 1)))
        kept = 0
        for i, (mask, annotated) in enumerate(zip(av.masks, av.annotated)):
            if not annotated:
                continue
            kept += 1
            classes = frozenset(int(c) for c in np.unique(mask) if 0 < c < IGNORE_INDEX)
            records.append(
                ScanRecord(
                    scan_id=f"{vol.volume_id}_b{i:0{digits}d}",
                    patient_id=patient,
                    load=functools.partial(_load_bscan, cached, path, i),
                    disease=disease,
                    source=src,
                    classes=classes,
                    extra=(
                        ("volume_id", vol.volume_id),
                        ("bscan_index", i),
                        ("axial_mm", float(vol.pixel_spacing[0])),
                        ("lateral_mm", float(vol.pixel_spacing[1])),
                        ("bscan_spacing_mm", float(vol.bscan_spacing)),
                    ),
                )
            )
        if kept == 0:
            logger.warning("%s: no annotated B-scans; skipped", path)
    if not records:
        raise OctSamError("no annotated B-scans found in " + listing([str(p) for p in paths]) + ".")
    return records, labels or []


def _load_bscan(reader, path: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    av = reader(path)
    return av.volume.bscans[index], av.masks[index]


def _vendor(path: Path) -> str:
    for part in reversed(path.parts):
        if part.lower() in ("cirrus", "spectralis", "topcon"):
            return f"RETOUCH {part}"
    return "RETOUCH"


def _build(records, labels, output, meta: DatasetMeta, common: dict) -> BuildResult:
    return build_dataset(
        records,
        labels,
        output,
        meta,
        split=common.get("split", (0.7, 0.15, 0.15)),
        seed=common.get("seed", 0),
        split_file=common.get("split_file"),
        folds=common.get("folds"),
        overwrite=common.get("overwrite", False),
        push_to_hub=common.get("push_to_hub"),
        private=common.get("private", False),
        extra_features=VOLUME_FEATURES,
    )


def build_duke_mat(
    input: str | Path,
    output: str | Path | None,
    grader: int = 1,
    spacing=None,
    patient_regex: str | None = None,
    disease: str = "dme",
    source: str | None = None,
    license: str = "unknown",
    citation: str = DUKE_CITATION,
    command: str = "",
    **common,
) -> BuildResult:
    """Duke DME ``.mat`` files -> dataset (fluid of grader ``grader``; see the module docstring)."""
    if output is not None:
        check_output(Path(output).expanduser(), common.get("overwrite", False))
    override = parse_spacing(spacing)
    files = find_duke_files(Path(input).expanduser())
    src = source or f"Duke DME (grader {grader})"
    records, labels = volume_records(
        files, lambda p: read_annotated_volume(p, override, grader=grader), disease, src, patient_regex
    )
    meta = DatasetMeta(
        pretty_name=f"Duke DME OCT fluid (grader {grader})",
        description=(
            f"Spectralis OCT B-scans of diabetic macular edema with fluid masks of grader {grader} "
            "(manualFluid), built from the Duke .mat files; A-scans outside the grader's traced layers are 255 "
            "(ignore). Rows carry volume_id, bscan_index and the spacing in mm."
        ),
        source=src,
        license=license,
        citation=citation,
        command=command,
    )
    return _build(records, labels, output, meta, common)


def build_retouch(
    input: str | Path,
    output: str | Path | None,
    spacing=None,
    patient_regex: str | None = None,
    disease: str = "unknown",
    source: str | None = None,
    license: str = "unknown",
    citation: str = RETOUCH_CITATION,
    command: str = "",
    **common,
) -> BuildResult:
    """RETOUCH case folders (``oct.mhd`` + ``reference.mhd``) -> dataset with IRF / SRF / PED."""
    if output is not None:
        check_output(Path(output).expanduser(), common.get("overwrite", False))
    override = parse_spacing(spacing)
    cases = find_retouch_cases(Path(input).expanduser())
    records, labels = volume_records(
        cases,
        lambda p: read_annotated_volume(p, override),
        disease,
        source or _vendor,
        patient_regex,
        patient_of=lambda p, av: p.name,
    )
    meta = DatasetMeta(
        pretty_name="RETOUCH OCT fluid (IRF, SRF, PED)",
        description=(
            "OCT volumes of the RETOUCH challenge (Cirrus, Spectralis, Topcon) with intraretinal fluid (IRF), "
            "subretinal fluid (SRF) and pigment epithelial detachment (PED) labels, one row per B-scan with "
            "volume_id, bscan_index and the spacing in mm."
        ),
        source=source or "RETOUCH",
        license=license,
        citation=citation,
        command=command,
    )
    return _build(records, labels, output, meta, common)


def build_volume_files(
    input: str | Path,
    output: str | Path | None,
    spacing=None,
    patient_regex: str | None = None,
    disease: str = "unknown",
    source: str | None = None,
    license: str = "unknown",
    citation: str = "",
    command: str = "",
    **common,
) -> BuildResult:
    """eyepy ``.eye`` volumes with area annotations -> dataset (one class per annotation name)."""
    if output is not None:
        check_output(Path(output).expanduser(), common.get("overwrite", False))
    override = parse_spacing(spacing)
    files = find_eye_files(Path(input).expanduser())
    src = source or "eyepy volumes"
    records, labels = volume_records(files, lambda p: read_annotated_volume(p, override), disease, src, patient_regex)
    meta = DatasetMeta(
        pretty_name=f"OCT volumes: {disease} ({src})",
        description=f"OCT B-scans with {', '.join(labels[1:])} masks from annotated eyepy volumes.",
        source=src,
        license=license,
        citation=citation,
        command=command,
    )
    return _build(records, labels, output, meta, common)
