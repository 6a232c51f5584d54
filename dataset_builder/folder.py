"""A folder of B-scans plus a folder of masks (paired by file-name stem) -> records for the writer.

Masks are class-index images by default (0 = background, 1..K, 255 = ignore) or colour-coded with a palette.
Every pair is checked before anything is written (pairing, readability, sizes, mask values or colours); all
problems found are reported together, each naming its files.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from dataset_builder.palettes import Palette, colors_to_index, load_palette
from dataset_builder.writer import BuildResult, DatasetMeta, ScanRecord, build_dataset, check_output
from octsam.data.dataset import IGNORE_INDEX, IMAGE_SUFFIXES, open_image, read_scan
from octsam.errors import OctSamError
from octsam.folders import require_utf8_name
from octsam.safepaths import check_link

logger = logging.getLogger("dataset_builder")

MAX_LISTED = 15


def listing(items: Sequence[object], limit: int = MAX_LISTED) -> str:
    """``a, b, c ... and 12 more``."""
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def list_images(folder: Path, what: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image files in ``folder`` (not recursive, hidden files skipped) by name stem."""
    if not folder.is_dir():
        raise OctSamError(f"{what} folder not found: {folder}")
    found: dict[str, Path] = {}
    clashes = []
    require_utf8_name(folder)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = next((s for s in suffixes if path.name.lower().endswith(s)), None)
        if suffix is None:
            continue
        require_utf8_name(path)
        check_link(path, folder)  # a symbolic link must not lead out of the folder the user named
        stem = path.name[: -len(suffix)]
        if stem in found:
            clashes.append(f"{found[stem].name} / {path.name}")
        found[stem] = path
    if clashes:
        raise OctSamError(f"{what} folder {folder} has several files with the same name stem: {listing(clashes)}.")
    return found


def pair_files(images: dict[str, Path], masks: dict[str, Path], images_dir: Path, masks_dir: Path) -> list[str]:
    """The common stems; any image without mask or mask without image is an error listing them all."""
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) in {images_dir} without a mask: {listing([images[s].name for s in no_mask])}"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) in {masks_dir} without an image: {listing([masks[s].name for s in no_image])}"
        )
    if problems:
        raise OctSamError(
            "; ".join(problems) + ". Images and masks pair by file name without extension (scan1.png <-> scan1.png "
            "or scan1.tif); add or remove the files listed."
        )
    if not images:
        raise OctSamError(f"no images found in {images_dir} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return sorted(images)


def patient_ids(stems: Sequence[str], regex: str | None) -> dict[str, str]:
    """Patient id per stem: the first group of ``regex`` (searched in the stem), or the stem itself."""
    if regex is None:
        logger.warning(
            "no --patient-regex: every file is its own patient. B-scans of one eye are near-duplicates, so if "
            "several files come from one patient pass e.g. --patient-regex '^(\\w+?)_' to keep them in one split."
        )
        return {s: s for s in stems}
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise OctSamError(f"--patient-regex {regex!r} is not a valid regular expression: {err}") from err
    if pattern.groups < 1:
        raise OctSamError(
            f"--patient-regex {regex!r} needs a group, e.g. 'duke_s(\\d+)_': its first group is the patient id."
        )
    ids, unmatched = {}, []
    for stem in stems:
        match = pattern.search(stem)
        if match is None or not match.group(1):
            unmatched.append(stem)
        else:
            ids[stem] = match.group(1)
    if unmatched:
        raise OctSamError(
            f"--patient-regex {regex!r} matches no patient id in {len(unmatched)} file(s): {listing(unmatched)}."
        )
    return ids


def read_mask(path: Path, num_labels: int, palette: Palette | None = None) -> np.ndarray:
    """A mask file as a uint8 class-index array; colour masks go through ``palette``."""
    try:
        with open_image(path) as im:
            if palette is not None:
                return colors_to_index(np.asarray(im.convert("RGB")), palette, path)
            array = np.asarray(im if im.mode not in ("RGBA", "LA", "PA") else im.convert(im.mode[:-1] or "L"))
            mode = im.mode
    except OctSamError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise OctSamError(f"cannot read mask file {path}: {err}") from err
    return index_mask(array, num_labels, path, colour_hint=mode)


def index_mask(array: np.ndarray, num_labels: int, path: Path | str, colour_hint: str = "") -> np.ndarray:
    """Check an index-mask array (values 0..K-1 or 255) and return it as uint8 (H, W)."""
    array = np.asarray(array)
    if array.ndim == 3:
        if array.shape[2] >= 3 and not (
            np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
        ):
            raise OctSamError(
                f"mask {path} is a colour image ({colour_hint or 'RGB'}): pass --palette amd|macular_hole|PALETTE.json "
                "to map its colours to classes, or save index masks (one gray value per class)."
            )
        array = array[..., 0]
    if array.ndim != 2:
        raise OctSamError(f"mask {path}: expected a 2D image, got shape {array.shape}.")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise OctSamError(f"mask {path} holds non-integer values; masks must hold class indices.")
    values = np.unique(array)
    bad = [v for v in values.tolist() if not (0 <= v < num_labels or v == IGNORE_INDEX)]
    if bad:
        raise OctSamError(
            f"mask {path} has value(s) {listing([int(v) for v in bad], 10)} but there are {num_labels} labels "
            f"(0..{num_labels - 1}, 255 = ignore). Pass every class name with --labels, or fix the mask."
        )
    return array.astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header where possible."""
    try:
        with open_image(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return read_scan(path).shape[:2]  # e.g. a TIFF only tifffile reads; raises OctSamError if unreadable


def _load_pair(image: Path, mask: Path, num_labels: int, palette: Palette | None) -> tuple[np.ndarray, np.ndarray]:
    return read_scan(image), read_mask(mask, num_labels, palette)


def check_pairs(
    pairs: Sequence[tuple[str, Path, Path]], num_labels: int, mask_reader, size_of=image_size
) -> dict[str, frozenset[int]]:
    """Read every mask and image header; raise one OctSamError listing all problems. Returns classes per stem."""
    problems: dict[str, list[str]] = {}
    classes: dict[str, frozenset[int]] = {}
    for stem, image, mask in pairs:
        try:
            shape = size_of(image)
        except OctSamError as err:
            problems.setdefault("unreadable image(s)", []).append(str(err))
            shape = None
        try:
            array = mask_reader(mask)
        except OctSamError as err:
            problems.setdefault("bad mask(s)", []).append(str(err))
            continue
        if shape is not None and tuple(shape) != array.shape:
            problems.setdefault("size mismatch(es)", []).append(
                f"{image} is {shape[1]}x{shape[0]} but {mask} is {array.shape[1]}x{array.shape[0]} (width x height)"
            )
        present = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
        classes[stem] = frozenset(int(c) for c in present if 0 < c < num_labels)
    if problems:
        parts = [
            f"{len(v)} {k}:\n  "
            + "\n  ".join(v[:MAX_LISTED])
            + (f"\n  ... and {len(v) - MAX_LISTED} more" if len(v) > MAX_LISTED else "")
            for k, v in problems.items()
        ]
        raise OctSamError("the input has problems; nothing was written.\n" + "\n".join(parts))
    return classes


def resolve_labels(labels: Sequence[str] | str | None, palette: Palette | None) -> list[str]:
    """Label names from --labels and/or the palette; index 0 must be background."""
    if isinstance(labels, str):
        text = labels
        labels = [x.strip() for x in text.split(",")]
        if any(not name for name in labels):  # a dropped blank name would shift every later label's mask value
            raise OctSamError(
                f"--labels {text!r}: label names must not be blank (mask value {labels.index('')} has none); "
                "e.g. --labels background,fluid"
            )
    if palette is not None:
        if labels and list(labels) != list(palette.labels):
            raise OctSamError(
                f"--labels {','.join(labels)} disagrees with palette {palette.name} ({','.join(palette.labels)}); drop --labels."
            )
        return list(palette.labels)
    if not labels:
        raise OctSamError("pass the class names of the index masks, e.g. --labels background,fluid (value 0 first).")
    if labels[0] != "background":
        raise OctSamError(f"--labels must start with background (mask value 0), got {','.join(labels)}.")
    if len(set(labels)) != len(labels):
        raise OctSamError(f"--labels has a repeated name: {','.join(labels)}.")
    if len(labels) > 255:
        raise OctSamError("at most 255 labels fit in an 8-bit mask (255 = ignore).")
    return list(labels)


def folder_records(
    images_dir: str | Path,
    masks_dir: str | Path,
    labels: Sequence[str] | str | None = None,
    palette: str | None = None,
    patient_regex: str | None = None,
    disease: str = "unknown",
    source: str | None = None,
) -> tuple[list[ScanRecord], list[str]]:
    """Pair, check and describe the files; returns the records and the label names."""
    images_dir, masks_dir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
    pal = load_palette(palette) if palette else None
    names = resolve_labels(labels, pal)
    images = list_images(images_dir, "images")
    masks = list_images(masks_dir, "masks")
    stems = pair_files(images, masks, images_dir, masks_dir)
    patients = patient_ids(stems, patient_regex)
    pairs = [(s, images[s], masks[s]) for s in stems]
    classes = check_pairs(pairs, len(names), functools.partial(read_mask, num_labels=len(names), palette=pal))
    source = source or images_dir.resolve().parent.name or str(images_dir)
    records = [
        ScanRecord(
            scan_id=stem,
            patient_id=patients[stem],
            load=functools.partial(_load_pair, image, mask, len(names), pal),
            disease=disease,
            source=source,
            classes=classes[stem],
        )
        for stem, image, mask in pairs
    ]
    return records, names


def build_folder(
    images: str | Path,
    masks: str | Path,
    output: str | Path | None,
    labels: Sequence[str] | str | None = None,
    palette: str | None = None,
    patient_regex: str | None = None,
    disease: str = "unknown",
    source: str | None = None,
    *,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
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
    """Build a dataset from an images folder and a masks folder (see the module docstring)."""
    out = Path(output).expanduser() if output is not None else None
    if out is not None:  # fail before reading thousands of files (build_dataset checks again before writing)
        check_output(out, overwrite)
    records, names = folder_records(images, masks, labels, palette, patient_regex, disease, source)
    src = records[0].source
    meta = DatasetMeta(
        pretty_name=f"OCT B-scans: {disease} ({src})",
        description=f"Retinal OCT B-scans with {', '.join(names[1:])} masks, built from a folder of images and masks.",
        source=src,
        license=license,
        citation=citation,
        command=command,
    )
    return build_dataset(
        records,
        names,
        output,
        meta,
        split=split,
        seed=seed,
        split_file=split_file,
        folds=folds,
        overwrite=overwrite,
        push_to_hub=push_to_hub,
        private=private,
    )
