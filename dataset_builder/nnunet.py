"""An nnU-Net raw dataset (v1 or v2 ``dataset.json``, ``imagesTr``/``labelsTr``, optional ``imagesTs``/``labelsTs``)
with 2D PNG/TIFF/BMP/JPEG or single-slice NIfTI files -> records for the writer.

Cases pair as nnU-Net pairs them: ``labelsTr/CASE{ending}`` with ``imagesTr/CASE_0000{ending}``. Only one input
channel is supported (OCT is gray). A v2 ``ignore`` label becomes the ignore index 255. Labelled test cases
(``labelsTs``) join the pool that is split by patient; unlabelled ones are skipped.

NIfTI files are read as nnU-Net's 2D converters write them: array axes (x, y, 1) with x = image column, so the
B-scan is the transposed first slice.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset_builder.folder import check_pairs, index_mask, listing, patient_ids, read_mask
from dataset_builder.writer import BuildResult, DatasetMeta, ScanRecord, build_dataset, check_output
from octsam.data.contract import MAX_SCAN_PIXELS, check_scan_size, too_large_message
from octsam.data.dataset import IGNORE_INDEX, IMAGE_SUFFIXES, read_scan, to_uint8
from octsam.errors import OctSamError
from octsam.folders import require_utf8_name
from octsam.safepaths import check_link

logger = logging.getLogger("dataset_builder")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES


def read_dataset_json(folder: Path) -> tuple[list[str], dict[int, int], str | None, str]:
    """Label names, a value remap (ignore -> 255), the file ending (if given) and a name from ``dataset.json``."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise OctSamError(f"{folder} is not an nnU-Net raw dataset: {path} is missing.")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OctSamError(f"cannot read {path}: {err}") from err
    table = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(table, dict) or not table:
        raise OctSamError(f'{path} has no \'labels\' object (e.g. {{"background": 0, "fluid": 1}}).')
    remap: dict[int, int] = {}
    if all(str(k).isdigit() for k in table):  # v1: {"0": "background", "1": "fluid"}
        by_index = {int(k): str(v) for k, v in table.items()}
    else:  # v2: {"background": 0, "fluid": 1, "ignore": 2}
        by_index = {}
        for name, value in table.items():
            if not isinstance(value, int):
                raise OctSamError(
                    f"{path}: label {name!r} is {value!r}; region-based labels (lists) are not supported."
                )
            if name == "ignore":
                remap[value] = IGNORE_INDEX
            else:
                by_index[value] = name
    indices = sorted(by_index)
    if indices != list(range(len(indices))):
        raise OctSamError(f"{path}: label values must be 0..K-1 without gaps, got {indices}.")
    labels = [by_index[i] for i in indices]
    if labels[0] != "background":
        logger.warning("%s: label 0 is %r; it is stored as 'background' (octsam's name for class 0).", path, labels[0])
        labels[0] = "background"
    ending = info.get("file_ending")
    name = str(info.get("name") or folder.name)
    return labels, remap, ending, name


def read_nifti(path: Path) -> np.ndarray:
    """A single-slice NIfTI as a 2D array (rows, columns)."""
    import nibabel

    try:
        image = nibabel.load(str(path))  # reads the header only
        shape = tuple(int(v) for v in image.header.get_data_shape())
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise OctSamError(f"cannot read NIfTI file {path}: {err}") from err
    check_nifti_header(path, shape, image.header.get_data_dtype().itemsize, image.header.get("vox_offset", 0))
    try:
        array = np.asarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise OctSamError(f"cannot read NIfTI file {path}: {err}") from err
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise OctSamError(f"{path} has shape {array.shape}: only 2D (single-slice) NIfTI B-scans are supported.")
    return array.T


def check_nifti_header(path: Path, shape: tuple[int, ...], itemsize: int, offset) -> None:
    """Refuse, from the header and before any data are read, a NIfTI larger than a B-scan may be (``MAX_SCAN_PIXELS``)
    or one whose uncompressed file is shorter than its header declares."""
    pixels = 1
    for v in shape:
        pixels *= max(int(v), 0)
    if pixels > MAX_SCAN_PIXELS:
        width, height = (shape + (1, 1))[:2]
        raise OctSamError(
            too_large_message(path, width, height)
            + f" (NIfTI header shape {' x '.join(str(v) for v in shape)}; a B-scan is one 2D slice)"
        )
    if len(shape) >= 2:
        check_scan_size(path, int(shape[0]), int(shape[1]))  # an extreme aspect ratio (MAX_SCAN_ASPECT)
    if not path.name.lower().endswith(".gz"):
        needed = int(float(offset or 0)) + pixels * itemsize
        if path.stat().st_size < needed:
            raise OctSamError(
                f"{path}: the NIfTI header declares {' x '.join(str(v) for v in shape)} voxels ({needed} bytes with "
                f"the header) but the file holds {path.stat().st_size} bytes; it is truncated or corrupt."
            )


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _read_image(path: Path) -> np.ndarray:
    return to_uint8(read_nifti(path)) if _is_nifti(path) else read_scan(path)


def _read_label(path: Path, num_labels: int, remap: dict[int, int]) -> np.ndarray:
    if _is_nifti(path):
        array = read_nifti(path)
        if remap:
            array = array.copy()
            for old, new in remap.items():
                array[array == old] = new
        return index_mask(array, num_labels, path)
    if remap:
        from octsam.data.dataset import open_image

        with open_image(path) as im:
            array = np.asarray(im).copy()
        for old, new in remap.items():
            array[array == old] = new
        return index_mask(array, num_labels, path)
    return read_mask(path, num_labels)


def _image_size(path: Path) -> tuple[int, int]:
    return _read_image(path).shape[:2]


def _split_name(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    suffix = next((s for s in SUFFIXES if lower.endswith(s)), None)
    return (name[: -len(suffix)], suffix) if suffix else None


def _cases(folder: Path, images: str, labels: str, ending: str | None) -> list[tuple[str, Path, Path]]:
    """(case, image, label) for one of the Tr/Ts pairs of folders; unpaired files are an error."""
    label_dir, image_dir = folder / labels, folder / images
    found_labels: dict[str, Path] = {}
    require_utf8_name(folder)
    for path in sorted(label_dir.iterdir()):
        require_utf8_name(path)
        parts = _split_name(path.name)
        if parts and not path.name.startswith(".") and (ending is None or parts[1] == ending.lower()):
            found_labels[parts[0]] = check_link(path, folder)
    found_images: dict[str, Path] = {}
    extra_channels = []
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        require_utf8_name(path)
        parts = _split_name(path.name)
        if not parts or path.name.startswith(".") or (ending is not None and parts[1] != ending.lower()):
            continue
        check_link(path, folder)
        stem = parts[0]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            if stem[-4:] == "0000":
                found_images[stem[:-5]] = path
            else:
                extra_channels.append(path.name)
        else:
            found_images.setdefault(stem, path)  # tolerate files without the _0000 channel suffix
    if extra_channels:
        raise OctSamError(
            f"{image_dir} has more than one input channel ({listing(extra_channels)}); octsam supports one gray "
            "channel per B-scan (CASE_0000)."
        )
    no_image = sorted(set(found_labels) - set(found_images))
    no_label = sorted(set(found_images) - set(found_labels))
    problems = []
    if no_image:
        problems.append(
            f"{len(no_image)} label(s) in {label_dir} without an image {images}/CASE_0000: {listing(no_image)}"
        )
    if no_label:
        problems.append(f"{len(no_label)} image(s) in {image_dir} without a label: {listing(no_label)}")
    if problems:
        raise OctSamError("; ".join(problems) + ". Add or remove the cases listed.")
    return [(case, found_images[case], found_labels[case]) for case in sorted(found_labels)]


def nnunet_records(
    input_dir: str | Path, patient_regex: str | None = None, disease: str = "unknown", source: str | None = None
) -> tuple[list[ScanRecord], list[str]]:
    """Read ``dataset.json``, pair the cases, check them; returns the records and label names."""
    folder = Path(input_dir).expanduser()
    if not folder.is_dir():
        raise OctSamError(f"nnU-Net dataset folder not found: {folder}")
    labels, remap, ending, name = read_dataset_json(folder)
    if not (folder / "labelsTr").is_dir():
        raise OctSamError(f"{folder} has no labelsTr folder; an nnU-Net raw dataset needs imagesTr/ and labelsTr/.")
    cases = _cases(folder, "imagesTr", "labelsTr", ending)
    if (folder / "labelsTs").is_dir():
        test_cases = _cases(folder, "imagesTs", "labelsTs", ending)
        clash = sorted({c for c, _, _ in cases} & {c for c, _, _ in test_cases})
        if clash:
            raise OctSamError(f"cases in both labelsTr and labelsTs of {folder}: {listing(clash)}")
        cases += test_cases
    elif (folder / "imagesTs").is_dir() and any((folder / "imagesTs").iterdir()):
        logger.warning("%s/imagesTs has no labelsTs: its unlabelled cases are skipped.", folder)
    if not cases:
        raise OctSamError(f"no cases found in {folder}/labelsTr.")
    num = len(labels)
    classes = check_pairs(cases, num, functools.partial(_read_label, num_labels=num, remap=remap), _image_size)
    patients = patient_ids([c for c, _, _ in cases], patient_regex)
    source = source or name
    records = [
        ScanRecord(
            scan_id=case,
            patient_id=patients[case],
            load=functools.partial(_load_case, image, label, num, remap),
            disease=disease,
            source=source,
            classes=classes[case],
        )
        for case, image, label in cases
    ]
    return records, labels


def _load_case(image: Path, label: Path, num_labels: int, remap: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return _read_image(image), _read_label(label, num_labels, remap)


def build_nnunet(
    input_dir: str | Path,
    output: str | Path | None,
    patient_regex: str | None = None,
    disease: str = "unknown",
    source: str | None = None,
    *,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    split_file: str | Path | None = None,
    folds: tuple[int, int] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    license: str = "unknown",
    citation: str = "",
    command: str = "",
) -> BuildResult:
    """Build a dataset from an nnU-Net raw dataset folder (see the module docstring)."""
    out = Path(output).expanduser() if output is not None else None
    if out is not None:  # fail before reading thousands of files (build_dataset checks again before writing)
        check_output(out, overwrite)
    records, labels = nnunet_records(input_dir, patient_regex, disease, source)
    meta = DatasetMeta(
        pretty_name=f"OCT B-scans: {disease} ({records[0].source})",
        description=f"Retinal OCT B-scans with {', '.join(labels[1:])} masks, converted from an nnU-Net raw dataset.",
        source=records[0].source,
        license=license,
        citation=citation,
        command=command,
    )
    return build_dataset(
        records,
        labels,
        output,
        meta,
        split=tuple(split),
        seed=seed,
        split_file=split_file,
        folds=folds,
        overwrite=overwrite,
        push_to_hub=push_to_hub,
        private=private,
    )
