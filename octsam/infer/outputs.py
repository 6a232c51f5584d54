"""What a segmentation run writes per B-scan: mask PNGs, overlays with a legend, probabilities, and ``summary.csv``
(the run stages its output folder with ``octsam.folders.atomic_folder``)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError
from octsam.infer.overlay import overlay_with_legend
from octsam.textsafe import csv_cell, csv_row

PNG_LEVEL = 1  # zlib level of written PNGs


# ------------------------------------------------------------------------------------------------ outputs
def class_areas(mask: np.ndarray, num_labels: int) -> tuple[list[int], list[int]]:
    """Pixels and 8-connected components of each foreground class 1..K of an index mask."""
    import cv2

    areas, components = [], []
    for k in range(1, num_labels):
        region = (mask == k).astype(np.uint8)
        areas.append(int(region.sum()))
        components.append(int(cv2.connectedComponents(region, connectivity=8)[0] - 1) if areas[-1] else 0)
    return areas, components


def _save_png(path: Path, array: np.ndarray) -> None:
    """PNG through OpenCV at zlib level 1 (the same pixels as PIL's default level 6 at a quarter of the time, and
    for noisy B-scans no bigger; benchmarks/RESULTS.md). RGB arrays are written as RGB."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = array[..., ::-1] if array.ndim == 3 else array  # OpenCV writes BGR
    ok, data = cv2.imencode(".png", np.ascontiguousarray(pixels), [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise OctSamError(f"could not encode {path.name} as PNG")
    path.write_bytes(data.tobytes())


@dataclass
class ScanOutput:
    """One segmented B-scan on its way to a writer: what ``write_scan`` needs, nothing more (picklable)."""

    name: str  # output name (masks/NAME.png)
    source: str  # where it came from (file path or dataset:split:index)
    image: np.ndarray  # the B-scan at native size (uint8, (H, W) or (H, W, 3))
    mask: np.ndarray  # (H, W) uint8 class ids
    probabilities: np.ndarray | None = None  # (K+1, H, W) float16, with --save-probabilities


@dataclass(frozen=True)
class OutputSettings:
    """What every written B-scan of a run shares."""

    folder: Path  # the run's staging folder
    labels: list[str]
    spacing: tuple[float, float] | None = None  # pixel size (y, x) in mm, for areas in mm²


def write_probabilities(path: Path, probabilities: np.ndarray, labels: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, probabilities=probabilities, labels=np.array(labels))


def write_scan(settings: OutputSettings, scan: ScanOutput) -> dict:
    """Write a B-scan's mask, overlay and (if any) probabilities; returns its ``summary.csv`` row."""
    out, labels, spacing, mask = settings.folder, settings.labels, settings.spacing, scan.mask
    _save_png(out / "masks" / f"{scan.name}.png", mask)
    _save_png(out / "overlays" / f"{scan.name}.png", overlay_with_legend(scan.image, mask, labels))
    if scan.probabilities is not None:
        write_probabilities(out / "probabilities" / f"{scan.name}.npz", scan.probabilities, labels)
    areas, components = class_areas(mask, len(labels))
    row = {"scan": scan.name, "source": scan.source, "height": mask.shape[0], "width": mask.shape[1]}
    for name, area, count in zip(labels[1:], areas, components):
        row[f"{name}_area_px"] = area
        if spacing is not None:
            row[f"{name}_area_mm2"] = round(area * spacing[0] * spacing[1], 6)
        row[f"{name}_components"] = count
    row["status"] = "ok"
    row["error"] = ""
    return row


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: "Image 2" before "Image 10" (case-insensitive otherwise)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def write_summary(path: Path, rows: list[dict], failures: list[dict], labels: list[str], spacing) -> None:
    """One row per segmented B-scan in natural order of its name, then one per failed B-scan (same order)."""
    rows = sorted(rows, key=lambda r: natural_key(r["scan"]))
    failures = sorted(failures, key=lambda f: natural_key(f["scan"]))
    columns = ["scan", "source", "height", "width"]
    for name in labels[1:]:
        columns += [f"{name}_area_px"] + ([f"{name}_area_mm2"] if spacing else []) + [f"{name}_components"]
    columns += ["status", "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[csv_cell(c) for c in columns], restval="")
        writer.writeheader()
        writer.writerows(csv_row(r) for r in rows)  # text from data never starts a spreadsheet formula
        for failure in failures:
            writer.writerow(
                csv_row(
                    {
                        "scan": failure["scan"],
                        "source": failure["source"],
                        "status": "failed",
                        "error": failure["error"],
                    }
                )
            )
