"""Loading OCT datasets (local folder or Hugging Face Hub) and reading scan files of any common format.

The dataset contract (README, "Build a dataset"): a ``DatasetDict`` with splits train/validation/test and columns image, mask,
patient_id, scan_id, disease, source. Label names travel with the data in three places, written by
``dataset_builder``:

1. ``id2label.json`` (``{"0": "background", "1": "fluid"}``) in the dataset folder and in the Hub dataset repo;
2. the ``description`` of every split's ``DatasetInfo`` (a line ``octsam-id2label: {...}``) in a local folder;
3. the dataset card (``README.md``), for people.

``load_oct_dataset`` reads (1) and falls back to (2).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
from PIL import Image, UnidentifiedImageError

from octsam.data.contract import (
    COLUMNS,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    LABELS_FILE,
    LABELS_MARKER,
    SPLITS,
    check_scan_size,
    too_large_message,
)
from octsam.errors import OctSamError

__all__ = ["COLUMNS", "IGNORE_INDEX", "IMAGE_SUFFIXES", "LABELS_FILE", "LABELS_MARKER", "SPLITS"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dataset_features() -> datasets.Features:
    """The ``datasets.Features`` of the data contract."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "patient_id": datasets.Value("string"),
            "scan_id": datasets.Value("string"),
            "disease": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )


# ----------------------------------------------------------------------------------------------- labels


def labels_to_id2label(labels: list[str]) -> dict[str, str]:
    """``["background", "fluid"]`` -> ``{"0": "background", "1": "fluid"}`` (the transformers convention)."""
    return {str(i): name for i, name in enumerate(labels)}


def id2label_to_labels(id2label: dict, where: str) -> list[str]:
    """Inverse of ``labels_to_id2label``; checks that the indices are 0..K-1 and that 0 is background."""
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (AttributeError, TypeError, ValueError) as err:
        raise OctSamError(f"{where}: label map must look like {{'0': 'background', '1': 'fluid'}} ({err})") from err
    if [i for i, _ in items] != list(range(len(items))) or not items:
        raise OctSamError(f"{where}: label indices must be 0..K-1 without gaps, got {[i for i, _ in items]}")
    labels = [name for _, name in items]
    if labels[0] != "background":
        raise OctSamError(f"{where}: label 0 must be 'background', got {labels[0]!r}")
    return labels


def labels_description(labels: list[str]) -> str:
    """The ``DatasetInfo.description`` text that records the label names."""
    names = ", ".join(f"{i} {name}" for i, name in enumerate(labels))
    return f"OCT B-scan segmentation dataset (octsam). Mask classes: {names}.\n{LABELS_MARKER} " + json.dumps(
        labels_to_id2label(labels)
    )


def _labels_from_description(description: str | None) -> list[str] | None:
    for line in (description or "").splitlines():
        if line.startswith(LABELS_MARKER):
            return id2label_to_labels(json.loads(line[len(LABELS_MARKER) :]), "dataset info description")
    return None


def _read_labels_file(path: Path) -> list[str]:
    try:
        id2label = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OctSamError(f"cannot read label names from {path}: {err}") from err
    return id2label_to_labels(id2label, str(path))


# ---------------------------------------------------------------------------------------------- loading


def load_oct_dataset(
    path_or_repo: str | os.PathLike, revision: str | None = None
) -> tuple[datasets.DatasetDict, list[str]]:
    """Load an OCT dataset and its label names (index 0 = "background").

    ``path_or_repo`` is a folder written by ``python -m dataset_builder`` (``DatasetDict.save_to_disk``), a local
    copy of a Hub dataset repo (parquet files + ``id2label.json``), or a Hub dataset repo id ``org/name`` loaded
    with ``datasets.load_dataset`` at ``revision`` (branch, tag or commit; ignored for local folders). A path that
    exists locally always wins over a Hub id of the same spelling.
    """
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.exists():
        dsd, labels = _load_local(path)
        where = str(path)
    elif _REPO_ID.match(text) and not text.startswith((".", "~")):
        dsd, labels = _load_hub(text, revision)
        where = f"Hub dataset {text}"
    else:
        raise OctSamError(
            f"dataset folder not found: {path}. Build one with `python -m dataset_builder ... --output {path}` "
            "or pass a Hub dataset id like org/name."
        )
    _check_contract(dsd, where)
    return dsd, labels


def _refuse_empty_splits(path: Path) -> None:
    """A split saved without rows has no data file, and ``load_from_disk`` fails on it with "list index out of range":
    name the split instead."""
    for state in sorted(path.glob("*/state.json")):
        try:
            files = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
        except (OSError, ValueError, AttributeError):
            continue  # load_from_disk reports a damaged folder
        if files == []:
            raise OctSamError(
                f"Dataset {path} has an empty {state.parent.name!r} split (no B-scans); train, validation and test "
                "each need at least one patient: rebuild it with dataset_builder (more patients, or other "
                "--split-fractions)."
            )


def _load_local(path: Path) -> tuple[datasets.DatasetDict, list[str]]:
    if not path.is_dir():
        raise OctSamError(f"{path} is a file, not a dataset folder; pass the folder written by dataset_builder.")
    if (path / "dataset_dict.json").is_file():
        _refuse_empty_splits(path)
        try:
            dsd = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any failure here means a damaged folder
            raise OctSamError(f"cannot load the dataset in {path}: {err}. Rebuild it with dataset_builder.") from err
    elif (path / "state.json").is_file():
        raise OctSamError(
            f"{path} holds a single split (Dataset.save_to_disk), not a DatasetDict with train/validation/test; "
            "build it with `python -m dataset_builder`."
        )
    elif any(path.glob("data/*.parquet")) or any(path.glob("*.parquet")):
        try:
            dsd = datasets.load_dataset(str(path))
        except Exception as err:  # noqa: BLE001
            raise OctSamError(f"cannot load the parquet dataset in {path}: {err}") from err
    else:
        raise OctSamError(
            f"{path} is not a dataset folder (no dataset_dict.json or parquet files). "
            f"Build one with `python -m dataset_builder ... --output {path}`."
        )
    if not isinstance(dsd, datasets.DatasetDict):
        raise OctSamError(f"{path} does not hold a DatasetDict with splits {', '.join(SPLITS)}.")
    labels_file = path / LABELS_FILE
    if labels_file.is_file():
        labels = _read_labels_file(labels_file)
    else:
        labels = next((found for ds in dsd.values() if (found := _labels_from_description(ds.info.description))), None)
        if labels is None:
            raise OctSamError(
                f"no label names found for {path}: expected {LABELS_FILE} in the folder "
                "(write it as {'0': 'background', '1': 'fluid', ...}) or rebuild with dataset_builder."
            )
    return dsd, labels


def _load_hub(repo_id: str, revision: str | None) -> tuple[datasets.DatasetDict, list[str]]:
    try:
        dsd = datasets.load_dataset(repo_id, revision=revision)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors all get the same advice
        raise OctSamError(
            f"cannot load Hub dataset {repo_id!r} (revision {revision or 'main'}; no local folder of that name "
            f"either): {err}. Check the name, log in with `hf auth login` for a private repo, or pass a local "
            "dataset folder."
        ) from err
    try:
        labels_path = huggingface_hub.hf_hub_download(repo_id, LABELS_FILE, repo_type="dataset", revision=revision)
    except Exception as err:  # noqa: BLE001
        raise OctSamError(
            f"Hub dataset {repo_id!r} has no readable {LABELS_FILE} ({err}); upload it with the label names, "
            "e.g. push the dataset with `python -m dataset_builder ... --push-to-hub`."
        ) from err
    if not isinstance(dsd, datasets.DatasetDict):
        raise OctSamError(f"Hub dataset {repo_id!r} does not hold splits {', '.join(SPLITS)}.")
    return dsd, _read_labels_file(Path(labels_path))


def _check_contract(dsd: datasets.DatasetDict, where: str) -> None:
    missing = [s for s in SPLITS if s not in dsd]
    if missing:
        raise OctSamError(
            f"{where} lacks split(s) {', '.join(missing)} (has {', '.join(dsd) or 'none'}); "
            "rebuild it with dataset_builder, which always writes train, validation and test."
        )
    for split in SPLITS:
        lacking = [c for c in COLUMNS if c not in dsd[split].column_names]
        if lacking:
            raise OctSamError(f"{where}: split {split} lacks column(s) {', '.join(lacking)}; rebuild it.")


# ---------------------------------------------------------------------------------------------- reading


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an image array of any bit depth to uint8.

    uint8 stays as it is. Unsigned/signed integers whose values fit in 0..255 are kept; values up to 4095 are
    treated as 12-bit data (x * 255 / 4095); larger ones as 16-bit (x * 255 / 65535). Floats in [0, 1] are scaled
    by 255, floats in [0, 255] are rounded; any other float range is min-max scaled to 0..255.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return array.astype(np.uint8)
        if lo >= 0:
            top = 4095.0 if hi <= 4095 else float(np.iinfo(array.dtype).max if array.dtype.itemsize <= 2 else hi)
            return np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        array = array.astype(np.float64)
    array = array.astype(np.float64)
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        scaled = array * 255.0
    elif lo >= 0.0 and hi <= 255.0:  # 8-bit data stored as float (e.g. NIfTI)
        scaled = array
    else:
        scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _gray_if_equal(rgb: np.ndarray, tolerance: int = 2) -> np.ndarray:
    """An RGB array whose channels agree within ``tolerance`` (a gray scan saved as RGB/JPEG) -> (H, W)."""
    channels = rgb.astype(np.int16)
    spread = channels.max(axis=2) - channels.min(axis=2)
    if int(spread.max(initial=0)) <= tolerance:
        return np.rint(channels.mean(axis=2)).astype(np.uint8)
    return rgb


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``PIL.Image.open`` that refuses an image above ``MAX_SCAN_PIXELS`` or ``MAX_SCAN_ASPECT`` from its header (before decoding), with
    one message whether Pillow's own decompression-bomb guard or ours noticed it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise OctSamError(too_large_message(path)) from None
    with im:
        check_scan_size(path, *im.size)
        yield im


def read_scan(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP B-scan of any bit depth as uint8: (H, W) grayscale, (H, W, 3) only for colour.

    Alpha is dropped, palette images are expanded, RGB images whose channels are equal within 2 grey levels
    (a gray scan stored as RGB or JPEG) become grayscale, and 12/16-bit or float data is scaled by ``to_uint8``.
    """
    path = Path(path)
    if not path.is_file():
        raise OctSamError(f"image file not found: {path}")
    try:
        with open_image(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise OctSamError(
                    f"{path} holds {im.n_frames} frames (a volume?); export one B-scan per file and build again."
                )
            array = _pil_to_array(im)
    except OctSamError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        array = _read_with_tifffile(path, err)
    array = to_uint8(array)
    if array.ndim == 3:
        if array.shape[2] == 1:
            array = array[..., 0]
        elif array.shape[2] >= 3:
            array = _gray_if_equal(array[..., :3])
        else:
            array = array[..., 0]  # gray + alpha
    if array.ndim not in (2, 3):
        raise OctSamError(f"{path}: expected a 2D image, got an array of shape {array.shape}.")
    return np.ascontiguousarray(array)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("LA", "La"):
        im = im.convert("L")
    elif im.mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif im.mode == "1":
        im = im.convert("L")
    array = np.asarray(im)
    if im.mode.startswith("I;16") and array.dtype != np.uint16:
        array = array.astype(np.uint16)
    return array


def _read_with_tifffile(path: Path, err: Exception) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                check_scan_size(path, int(shape[1]), int(shape[0]))
            array = tifffile.imread(path)
            if array.ndim == 3 and array.shape[0] > 1 and array.shape[-1] not in (3, 4):
                raise OctSamError(f"{path} holds {array.shape[0]} pages (a volume?); export one B-scan per file.")
            return np.squeeze(array) if array.ndim > 2 and 1 in array.shape[:1] else array
        except OctSamError:
            raise
        except Exception:  # noqa: BLE001 - fall through to the common message
            pass
    raise OctSamError(f"cannot read image file {path}: {err}. Check that it is a valid PNG/JPEG/TIFF/BMP.") from err


def class_pixel_counts(split: datasets.Dataset, num_labels: int) -> np.ndarray:
    """Pixels per class (0..K) over the masks of ``split`` (ignore pixels not counted)."""
    counts = np.zeros(num_labels, dtype=np.int64)
    for mask in split.select_columns(["mask"]):
        values = np.asarray(mask["mask"]).ravel()
        counts += np.bincount(values[values < num_labels], minlength=num_labels)[:num_labels]
    return counts


def absent_classes(split: datasets.Dataset, labels: list[str]) -> list[str]:
    """Names of the foreground classes with no pixel in ``split`` (a model cannot learn them from it)."""
    counts = class_pixel_counts(split, len(labels))
    return [name for name, count in zip(labels[1:], counts[1:]) if count == 0]
