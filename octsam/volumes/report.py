"""One-page eye report (PNG), its JSON, and ``volumes.csv`` (one row per volume)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError
from octsam.textsafe import csv_row as safe_csv_row
from octsam.volumes.measure import ETDRS_DIAMETERS_MM, VolumeMeasures


def label_colours(labels: list[str]) -> list[tuple[float, float, float]]:
    """An RGB colour (0..1) per foreground class: ``octsam.colors``, the colour each class has in every output."""
    from octsam.colors import rgb01

    return [rgb01(k, labels) for k in range(1, len(labels))]


def report_dict(volume, measures: VolumeMeasures) -> dict:
    """What the report says, JSON-ready."""
    return {
        "volume_id": volume.volume_id,
        "patient_id": volume.patient_id,
        "source": volume.source,
        "laterality": volume.laterality,
        "scan_date": volume.scan_date,
        "device": volume.device,
        "shape": {"bscans": volume.shape[0], "height": volume.shape[1], "width": volume.shape[2]},
        "spacing_mm": {
            "axial": volume.pixel_spacing[0],
            "lateral": volume.pixel_spacing[1],
            "bscan": volume.bscan_spacing,
            "source": volume.spacing_source,
        },
        **measures.to_dict(),
    }


def csv_row(volume, measures: VolumeMeasures) -> dict:
    row = {
        "volume_id": volume.volume_id,
        "patient_id": volume.patient_id or "",
        "source": volume.source,
        "laterality": volume.laterality or "",
        "scan_date": volume.scan_date or "",
        "device": volume.device or "",
        "n_bscans": volume.shape[0],
        "height": volume.shape[1],
        "width": volume.shape[2],
        "axial_mm": volume.pixel_spacing[0],
        "lateral_mm": volume.pixel_spacing[1],
        "bscan_spacing_mm": volume.bscan_spacing,
        "spacing_source": volume.spacing_source,
        "fovea_method": measures.fovea_method,
    }
    for name in measures.labels[1:]:
        row[f"{name}_mm3"] = f"{measures.volume_mm3[name]:.6f}"
        row[f"{name}_lesions"] = measures.lesions[name]
        row[f"{name}_central_mm3"] = f"{measures.etdrs_mm3[name]['centre']:.6f}"
    return row


def append_volumes_csv(csv_path: str | os.PathLike, row: dict) -> Path:
    """Add ``row`` to ``csv_path`` (header written when new), replacing the file atomically.

    A row of the same ``volume_id`` and ``source`` (the same volume run again) is replaced, not repeated. An existing
    file with other columns (e.g. another label set) is an error: write to another output folder.
    """
    path = Path(csv_path)
    row = safe_csv_row(row)  # text from data (volume ids, sources, label names) never starts a spreadsheet formula
    columns = list(row)
    rows: list[dict] = []
    if path.exists():
        reader = csv.DictReader(io.StringIO(path.read_text()))
        header = reader.fieldnames or []
        if header and header != columns:
            raise OctSamError(
                f"{path} has columns {', '.join(header)}, this volume's row has {', '.join(columns)} (another label "
                "set?); write to another output folder."
            )
        key = (str(row.get("volume_id")), str(row.get("source")))
        rows = [r for r in reader if (r.get("volume_id"), r.get("source")) != key]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + [row])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)
    return path


def _fovea_xy(volume, measures: VolumeMeasures) -> tuple[float, float] | None:
    """The fovea in localizer pixels (x, y), when the B-scan positions allow it."""
    if volume.bscan_positions is None:
        return None
    i, j = measures.fovea
    pos = volume.bscan_positions[int(round(i))]
    t = j / max(volume.shape[2] - 1, 1)
    return tuple(pos[0] + (pos[1] - pos[0]) * t)


def render_report(volume, masks, measures: VolumeMeasures, path: str | os.PathLike) -> Path:
    """Write the one-page eye report PNG: header, an en-face map per biomarker with the ETDRS grid, the B-scan
    through the fovea with the masks overlaid, and a table of mm³, lesion counts and ETDRS values.

    Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: writer threads may draw
    several eyes at once, and the global backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = measures.labels[1:]
    k = max(len(names), 2)  # one biomarker: its map on the left, a summary on the right
    fig = Figure(figsize=(max(11.0, 3.6 * k), 9.0), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, k, height_ratios=[1.2, 0.75, 0.45], hspace=0.3, wspace=0.25, top=0.9, bottom=0.03)
    fig.suptitle(_report_title(volume), fontsize=10, y=0.985)
    for c, name in enumerate(names):
        _draw_enface(fig, fig.add_subplot(grid[0, c]), volume, measures, name)
    if len(names) < 2:
        _draw_summary(fig.add_subplot(grid[0, 1]), volume, measures)
    _draw_fovea_bscan(fig.add_subplot(grid[1, :]), volume, masks, measures)
    _draw_table(fig.add_subplot(grid[2, :]), measures)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _report_title(volume) -> str:
    eye = {"OD": "right eye (OD)", "OS": "left eye (OS)"}.get(volume.laterality or "", "eye: unknown")
    title = f"{volume.volume_id}  |  patient {volume.patient_id or 'unknown'}  |  {eye}  |  {volume.scan_date or 'date unknown'}"
    subtitle = (
        f"{volume.device or 'device unknown'}; {volume.shape[0]} B-scans of {volume.shape[2]} x {volume.shape[1]} px; "
        f"spacing axial {volume.pixel_spacing[0] * 1000:.2f} µm, lateral {volume.pixel_spacing[1] * 1000:.2f} µm, "
        f"B-scan {volume.bscan_spacing * 1000:.1f} µm ({volume.spacing_source})"
    )
    return title + "\n" + subtitle


def _draw_enface(fig, ax, volume, measures: VolumeMeasures, name: str) -> None:
    """One biomarker's thickness map (on the localizer where the file places the B-scans) with the ETDRS circles."""
    from matplotlib.patches import Circle

    on_localizer = measures.enface_localizer is not None and volume.localizer_spacing is not None
    if on_localizer:
        ax.imshow(volume.localizer, cmap="gray")
        data = measures.enface_localizer[name]
        shown = np.ma.masked_where(~np.isfinite(data) | (data <= 0), data * 1000)
        image = ax.imshow(shown, cmap="magma", alpha=0.8)
        centre, scale = _fovea_xy(volume, measures), 1.0 / volume.localizer_spacing[1]
        ax.set_xlabel("localizer pixels")
    else:
        data = measures.enface[name]
        n, w = data.shape
        lat, step = volume.pixel_spacing[1], volume.bscan_spacing
        extent = (-lat / 2, (w - 0.5) * lat, (n - 0.5) * step, -step / 2)  # cell centres at i * step, j * lat
        image = ax.imshow(data * 1000, cmap="magma", extent=extent, aspect="equal", interpolation="nearest")
        fi, fj = measures.fovea
        centre, scale = (fj * volume.pixel_spacing[1], fi * volume.bscan_spacing), 1.0
        ax.set_xlabel("mm (en-face, B-scan 0 at top)")
    if centre is not None:
        for d in ETDRS_DIAMETERS_MM:
            ax.add_patch(Circle(centre, d / 2 * scale, fill=False, color="cyan", lw=0.8))
        ax.plot(*centre, "+", color="cyan", ms=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="thickness µm")
    ax.set_title(f"{name}: {measures.volume_mm3[name]:.4f} mm³, {measures.lesions[name]} lesion(s)", fontsize=9)


def _draw_summary(ax, volume, measures: VolumeMeasures) -> None:
    """The text panel beside a single biomarker's map."""
    ax.axis("off")
    lines = [
        f"{name}: {measures.volume_mm3[name]:.4f} mm³ in {measures.lesions[name]} lesion(s)"
        for name in measures.labels[1:]
    ]
    lines += [
        "",
        f"fovea: B-scan {measures.fovea[0]:.0f}, A-scan {measures.fovea[1]:.0f}",
        f"({measures.fovea_method})",
        f"spacing from: {volume.spacing_source}",
        f"source: {Path(volume.source).name}",
    ]
    ax.text(0.0, 0.9, "\n".join(lines), va="top", fontsize=9, wrap=True)


def _draw_fovea_bscan(ax, volume, masks, measures: VolumeMeasures) -> None:
    """The B-scan through the fovea with the masks overlaid in the classes' colours (``octsam.colors``)."""
    from matplotlib.patches import Rectangle

    labels = measures.labels
    colours = label_colours(labels)
    i = int(round(measures.fovea[0]))
    bscan = volume.bscans[i]
    overlay = np.repeat(bscan[..., None], 3, axis=2).astype(np.float64) / 255.0
    mask = np.asarray(masks[i])
    for k, colour in enumerate(colours, start=1):
        sel = mask == k
        overlay[sel] = 0.45 * overlay[sel] + 0.55 * np.array(colour)
    ax.imshow(overlay, aspect="auto")
    ax.set_title(f"B-scan {i} of {volume.shape[0]} (through the fovea: {measures.fovea_method})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours]
    if handles:
        ax.legend(handles, labels[1:], loc="upper right", fontsize=8, framealpha=0.7)


def _draw_table(ax, measures: VolumeMeasures) -> None:
    """mm³, lesions and ETDRS sectors per biomarker, and how much of each sector the scan covers."""
    names = measures.labels[1:]
    ax.axis("off")
    sectors = list(next(iter(measures.etdrs_mm3.values())).keys()) if measures.etdrs_mm3 else []
    header = ["biomarker", "volume mm³", "lesions"] + [s.replace("_", "\n") for s in sectors]
    rows = [
        [name, f"{measures.volume_mm3[name]:.4f}", str(measures.lesions[name])]
        + [f"{measures.etdrs_mm3[name][s]:.4f}" for s in sectors]
        for name in names
    ]
    rows.append(["scan covers", "", ""] + [f"{measures.etdrs_coverage.get(s, 0):.0%}" for s in sectors])
    table = ax.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 1.6)
    ax.set_title(
        "ETDRS sectors (mm³ within 1 / 3 / 6 mm circles around the fovea); volume = sum of B-scan areas x B-scan "
        f"spacing; lesions 3-D connected\nfovea: {measures.fovea_method}; orientation: {measures.orientation}",
        fontsize=8,
    )


def write_report(volume, masks, measures: VolumeMeasures, folder: str | os.PathLike) -> tuple[Path, Path]:
    """``report.png`` and ``report.json`` in ``folder``."""
    folder = Path(folder)
    png = render_report(volume, masks, measures, folder / "report.png")
    js = folder / "report.json"
    js.write_text(json.dumps(report_dict(volume, measures), indent=2) + "\n")
    return png, js
