"""Turn what the user opens into ``Scan`` lists: uploaded images or volumes, a dataset split.

Uploads are read only when they lie inside the upload folder Gradio wrote them to (``allowed_root``); a path the
browser sends is never joined onto the file system. Volume files (vendor formats, DICOM) go through
``octsam.volumes.read_volume`` when that module is installed; otherwise every upload is read as a 2-D image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from octsam.app.session import Scan, VolumeInfo
from octsam.data.contract import IMAGE_SUFFIXES
from octsam.data.dataset import read_scan
from octsam.errors import OctSamError


def volume_support():
    """``octsam.volumes`` when it can be imported, else None (uploads are then 2-D images only)."""
    try:
        import octsam.volumes as volumes

        volumes.read_volume  # noqa: B018 - lazy attribute: fails here if the readers are missing
    except (ImportError, AttributeError):
        return None
    return volumes


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` resolved, when it lies inside ``root``; else OctSamError (no reading outside the upload folder)."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise OctSamError(f"{Path(path).name}: refused, the file is not in the app's upload folder.")
    return resolved


def read_upload(path: Path, uploaded: bool = False) -> tuple[list[Scan], list[VolumeInfo]]:
    """One uploaded file (``uploaded``: sent by a browser; else named by the operator): a B-scan image, or (with
    ``octsam.volumes``) a volume's B-scans. An uploaded MetaImage must hold its data (``ElementDataFile = LOCAL``):
    the path in its header is never opened."""
    volumes = volume_support()
    name = path.name
    if volumes is not None and path.suffix.lower() not in IMAGE_SUFFIXES and volumes.is_volume_input(path):
        if path.suffix.lower() == ".mhd" and uploaded:
            from octsam.volumes.readers import mhd_header

            target = mhd_header(path)["ElementDataFile"]
            if target.upper() != "LOCAL":  # an uploaded header must not open a file of the server's (issue 22)
                raise OctSamError(
                    f"{name}: its header names the data file {target!r}, which the app does not open; upload the "
                    "MetaImage as one file (ElementDataFile = LOCAL, e.g. written as .mha and renamed .mhd), or "
                    "start the app with --open on the case folder."
                )
        scans, infos = [], []
        for vol in volumes.read_volume(path):
            info = VolumeInfo(
                volume_id=vol.volume_id,
                first=len(scans),
                count=vol.n_bscans,
                localizer=vol.localizer,
                positions=vol.bscan_positions,
                bscan_spacing=vol.bscan_spacing,
            )
            infos.append(info)
            spacing = tuple(float(v) for v in vol.pixel_spacing)
            scans.extend(
                Scan(f"{vol.volume_id}_b{i:03d}", b, spacing, vol.volume_id, i) for i, b in enumerate(vol.bscans)
            )
        return scans, infos
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        kinds = ", ".join(IMAGE_SUFFIXES) + ("" if volumes is None else " or an OCT volume file")
        raise OctSamError(f"{name}: not an image this app reads (expected {kinds}).")
    image = read_scan(path)
    if image.ndim == 3 and image.shape[2] not in (3,):
        raise OctSamError(f"{name}: unexpected image shape {image.shape}.")
    return [Scan(name, image)], []


def open_uploads(paths: list, allowed_root: str | os.PathLike) -> tuple[list[Scan], list[VolumeInfo], list[str]]:
    """Every uploaded file (sorted by name); returns the scans, volumes and one problem line per bad file."""
    scans: list[Scan] = []
    infos: list[VolumeInfo] = []
    problems: list[str] = []
    files = sorted(
        (Path(p if isinstance(p, (str, os.PathLike)) else p.name) for p in paths or []), key=lambda p: p.name
    )
    for path in files:
        try:
            resolved = inside(path, allowed_root)
            new_scans, new_infos = read_upload(resolved, uploaded=True)
        except OctSamError as err:
            problems.append(str(err).replace(str(path.parent) + os.sep, ""))
            continue
        except Exception as err:  # a reader failing in an unforeseen way must not take the app down
            problems.append(f"{path.name}: cannot be read ({type(err).__name__}: {err})")
            continue
        for info in new_infos:
            info.first += len(scans)
        scans.extend(new_scans)
        infos.extend(new_infos)
    return scans, infos, problems


def open_local(paths: list[str | os.PathLike]) -> tuple[list[Scan], list[VolumeInfo]]:
    """B-scans named on the command line by the operator (files, folders of images, volumes): read at start, so a
    bad one stops the start with its message. Folders that are not volumes give their images, sorted by name."""
    scans: list[Scan] = []
    infos: list[VolumeInfo] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise OctSamError(f"--open {raw}: no such file or folder.")
        volumes = volume_support()
        if path.is_dir() and not (volumes is not None and volumes.is_volume_input(path)):
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise OctSamError(f"--open {raw}: the folder holds no {', '.join(IMAGE_SUFFIXES)} image.")
        else:
            files = [path]
        for file in files:
            new_scans, new_infos = read_upload(file)
            for info in new_infos:
                info.first += len(scans)
            scans.extend(new_scans)
            infos.extend(new_infos)
    return scans, infos


def dataset_scans(path: str, split: str, adapter_labels: list[str], limit: int | None = None) -> list[Scan]:
    """The B-scans of one split of an octsam dataset; the dataset's labels must match the adapter's."""
    from octsam.data import load_oct_dataset

    dsd, labels = load_oct_dataset(path)
    if split not in dsd:
        raise OctSamError(f"dataset {path} has no split {split!r}; it has {', '.join(dsd)}.")
    missing = [n for n in adapter_labels if n not in labels]
    if labels != adapter_labels:
        raise OctSamError(
            f"the adapter's labels ({', '.join(adapter_labels)}) do not match dataset {path} "
            f"({', '.join(labels)})" + (f"; the dataset lacks {', '.join(missing)}" if missing else "") + "."
        )
    ds = dsd[split]
    n = len(ds) if limit is None else min(limit, len(ds))
    scans = []
    for i in range(n):
        row = ds[i]
        image = np.asarray(row["image"])
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        scans.append(Scan(str(row.get("scan_id") or f"{split}-{i}"), np.ascontiguousarray(image.astype(np.uint8))))
    return scans
