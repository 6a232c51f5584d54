"""The B-scans to segment: files, folders, globs and dataset splits, each with a unique output name."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octsam.data.contract import IMAGE_SUFFIXES, check_scan_size
from octsam.errors import OctSamError
from octsam.folders import is_utf8_name, printable
from octsam.safepaths import files_under


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class ScanInput:
    """One B-scan to segment: a unique output name (posix, no suffix), where it came from, and how to read it."""

    name: str
    source: str
    read: Callable[[], np.ndarray]
    dataset_labels: list[str] | None = None  # the label names of the dataset it came from, if any


def safe_output_name(name: str, fallback: str) -> str:
    """An output name (posix, no suffix) that stays inside the output folder: no ``..``, ``.`` or empty parts, no
    absolute root, no hidden parts, text that UTF-8 can store (undecodable bytes become ``_xNN``)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace").replace("\\x", "_x").replace("\\", "/")
    parts = [re.sub(r"[\x00-\x1f<>:\"|?*]", "_", part) for part in text.split("/")]
    parts = [part.lstrip(".") for part in parts if part not in ("", ".", "..")]
    parts = [part for part in parts if part]
    return "/".join(parts) or fallback


def _unreadable_name(path: Path) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        raise OctSamError(
            f"{printable(path)}: the file name is not valid UTF-8 (undecodable bytes shown as \\xNN); skipped - "
            "rename it (e.g. with `convmv -f latin1 -t utf8`) to segment it."
        )

    return read


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


def _file_reader(path: Path) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from octsam.data.dataset import read_scan

        return read_scan(path)

    return read


def _dataset_inputs(name: str, split: str, revision: str | None) -> list[ScanInput]:
    from octsam.data.dataset import load_oct_dataset
    from octsam.data.dataset import to_uint8 as data_to_uint8

    dataset, labels = load_oct_dataset(name, revision=revision)
    if split not in dataset:
        raise OctSamError(
            f"Dataset {name} has no split {split!r} (it has {', '.join(dataset)}); pick one with --split."
        )
    rows = dataset[split]
    scan_ids = rows["scan_id"]

    def reader(index: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            image = np.asarray(rows[index]["image"])
            check_scan_size(f"{name}:{split}[{index}]", image.shape[1], image.shape[0])  # as read_scan does
            return data_to_uint8(image)

        return read

    return [
        ScanInput(
            re.sub(r"[^\w.\-]+", "_", str(scan_id)) or f"scan_{i:05d}", f"{name}:{split}[{i}]", reader(i), labels
        )
        for i, scan_id in enumerate(scan_ids)
    ]


def _is_dataset_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _under(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == f or f in resolved.parents for f in folders)


def collect_inputs(
    inputs: list[str],
    dataset: str | None = None,
    split: str = "test",
    dataset_revision: str | None = None,
    exclude: list[Path] | None = None,
) -> list[ScanInput]:
    """Expand files, folders (recursive), globs and a dataset into B-scans with unique output names.

    A folder holding a ``datasets`` DatasetDict (``dataset_dict.json``) is read as a dataset (``split``); files under
    ``exclude`` (the output folder) are skipped. A path that does not exist stops the run. One function because
    each input kind (file, folder, glob, dataset) is a short branch of the same loop over ``inputs``.
    """
    exclude = [p.resolve() for p in exclude or []]
    found: list[tuple[str, str, Callable[[], np.ndarray] | None]] = []
    seen: set[Path] = set()

    def add_file(path: Path, name: str) -> None:
        resolved = path.resolve()
        if resolved in seen or _under(path, exclude):
            return
        seen.add(resolved)
        found.append((name, str(path), None, None))

    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            if _is_dataset_folder(path):
                found.extend(
                    (s.name, s.source, s.read, s.dataset_labels)
                    for s in _dataset_inputs(str(path), split, dataset_revision)
                )
                continue
            files = sorted(
                p
                for p in files_under(path)  # refuses a symbolic link that leads out of the folder
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise OctSamError(f"Input folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
            for p in files:
                add_file(p, p.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            add_file(path, path.stem)
        elif _has_magic(text):
            parts = Path(text).expanduser().parts
            root = Path(*parts[: next(i for i, part in enumerate(parts) if _has_magic(part))] or ["."])
            matches = sorted(Path(m) for m in glob.glob(str(Path(text).expanduser()), recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise OctSamError(f"--input {text!r} matches no image files ({'/'.join(IMAGE_SUFFIXES)}).")
            root = Path(os.path.normpath(root))
            for m in matches:
                clean = Path(os.path.normpath(m))  # "a/*/../../x/f.png" -> "x/f.png": no ".." in output names
                add_file(
                    m, clean.relative_to(root).with_suffix("").as_posix() if clean.is_relative_to(root) else m.stem
                )
        else:
            raise OctSamError(
                f"Input {text} does not exist. Give image files, folders or globs with --input, or a dataset folder "
                "or Hub dataset id with --dataset."
            )
    if dataset:
        found.extend(
            (s.name, s.source, s.read, s.dataset_labels) for s in _dataset_inputs(dataset, split, dataset_revision)
        )
    if not found:
        raise OctSamError("No input B-scans: give --input files/folders/globs or --dataset.")

    scans, used = [], set()
    for i, (name, source, read, dataset_labels) in enumerate(found):
        if read is None:
            read = _file_reader(Path(source)) if is_utf8_name(source) else _unreadable_name(Path(source))
        name = safe_output_name(name, f"scan_{i:05d}")
        unique, n = name, 1
        while unique.lower() in used:
            n += 1
            unique = f"{name}-{n}"
        used.add(unique.lower())
        scans.append(ScanInput(unique, printable(source), read, dataset_labels))
    return scans
