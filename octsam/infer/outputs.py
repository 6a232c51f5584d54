"""What a segmentation run writes: mask PNGs, overlays with a legend, probabilities, ``summary.csv``, in an output
folder that is swapped into place only when complete."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError
from octsam.folders import remove_stale_staging, staging_path, swap_into_place
from octsam.infer.inputs import ScanInput

LEGEND_FONT_PT = 9


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


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, labels: list[str]) -> np.ndarray:
    """``octsam.evaluation.plots.overlay`` at native size with the class legend in a white strip below (RGB uint8).

    The top-left H x W pixels are exactly the overlay; the canvas is widened only when the legend needs more room
    than a narrow B-scan gives.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from octsam.evaluation.plots import add_legend, overlay

    blended = overlay(image, mask, labels)
    height, width = blended.shape[:2]
    names = labels[1:]
    entry_px = 34 + 7 * max(len(n) for n in names)
    canvas_w = max(width, entry_px)
    ncol = max(1, min(len(names), canvas_w // entry_px))
    rows = -(-len(names) // ncol)
    strip = 10 + 18 * rows
    canvas_h = height + strip
    dpi = 100
    # Only the legend strip is drawn by matplotlib; the overlay is pasted above it as is (no resampled float copies
    # of a large B-scan: the canvas is uint8, allocated once).
    fig = Figure(figsize=(canvas_w / dpi, strip / dpi), dpi=dpi, facecolor="white")
    add_legend(
        fig,
        labels,
        loc="lower left",
        bbox_to_anchor=(0, 0),
        ncol=ncol,
        fontsize=LEGEND_FONT_PT,
        handlelength=1.2,
        handleheight=0.9,
        borderaxespad=0.3,
        columnspacing=1.0,
        borderpad=0.2,
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((canvas_h, canvas_w, 3), 255, np.uint8)
    out[:height, :width] = blended
    rows, cols = min(strip, legend.shape[0]), min(canvas_w, legend.shape[1])
    out[height : height + rows, :cols] = legend[:rows, :cols]
    return out


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False)


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


def _write_summary(path: Path, rows: list[dict], failures: list[dict], labels: list[str], spacing) -> None:
    columns = ["scan", "source", "height", "width"]
    for name in labels[1:]:
        columns += [f"{name}_area_px"] + ([f"{name}_area_mm2"] if spacing else []) + [f"{name}_components"]
    columns += ["status", "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        for failure in failures:
            writer.writerow(
                {"scan": failure["scan"], "source": failure["source"], "status": "failed", "error": failure["error"]}
            )
