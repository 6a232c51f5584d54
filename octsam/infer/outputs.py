"""What a segmentation run writes: mask PNGs, overlays with a legend, probabilities, ``summary.csv``, in an output
folder that is swapped into place only when complete."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError
from octsam.folders import remove_stale_staging, staging_path, swap_into_place
from octsam.infer.inputs import ScanInput
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


def prepare_output(output: str, overwrite: bool) -> tuple[Path, Path]:
    """Check ``--output`` and make the temporary folder the run writes into (renamed to ``output`` at the end)."""
    final = Path(output).expanduser()
    if final.exists() and not final.is_dir():
        raise OctSamError(f"--output {final} is a file; give a folder.")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OctSamError(
            f"Output folder {final} is not empty; choose another --output or pass --overwrite to replace it."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent, final.name)
    tmp = staging_path(final)
    tmp.mkdir()
    return final, tmp


def commit_output(tmp: Path, final: Path) -> None:
    """Move the finished temporary folder to ``final`` (replacing an old one, which --overwrite allowed)."""
    swap_into_place(tmp, final)


def _write_scan(out: Path, scan: ScanInput, image: np.ndarray, result, labels: list[str], spacing) -> dict:
    mask = result.mask
    _save_png(out / "masks" / f"{scan.name}.png", mask)
    _save_png(out / "overlays" / f"{scan.name}.png", overlay_with_legend(image, mask, labels))
    if result.probabilities is not None:
        path = out / "probabilities" / f"{scan.name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, probabilities=result.probabilities, labels=np.array(labels))
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


def _write_summary(path: Path, rows: list[dict], failures: list[dict], labels: list[str], spacing) -> None:
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
