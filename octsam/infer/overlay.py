"""The overlay PNG of a segmented B-scan: class colours over the image, the class legend in a white strip below.

Drawn with numpy and PIL, not matplotlib: the legend strip depends only on the labels and the canvas width, so it
is drawn once per run and reused (one B-scan's overlay took 51 ms through a matplotlib figure, 31 ms of it the
legend; benchmarks/RESULTS.md). The look is matplotlib's legend as ``octsam.evaluation.plots.add_legend`` draws it
here before (9 pt DejaVu Sans at 100 dpi, colour patches with a thin black edge, entries filled column by column).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from octsam.colors import class_color, overlay

LEGEND_FONT_PX = 12.5  # 9 pt at 100 dpi, as the matplotlib legend had
_ROW_PITCH = 20  # px between legend rows
_PATCH = (16, 12)  # patch outline width, height (px)
_LEFT = 6  # first patch's left edge
_TEXT_GAP = 10  # patch right edge to text
_COLUMN_GAP = 13  # text end to the next column's patch
_lock = threading.Lock()


def legend_geometry(width: int, labels: list[str]) -> tuple[int, int, int]:
    """(canvas width, columns, strip height) for a B-scan ``width`` px wide: the strip holds the legend of
    ``labels[1:]``; the canvas is widened only when a narrow B-scan cannot hold one entry."""
    names = labels[1:]
    entry_px = 34 + 7 * max(len(n) for n in names)
    canvas_w = max(width, entry_px)
    ncol = max(1, min(len(names), canvas_w // entry_px))
    rows = -(-len(names) // ncol)
    return canvas_w, ncol, 10 + 18 * rows


@lru_cache(maxsize=1)
def _font():
    from pathlib import Path

    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), LEGEND_FONT_PX)
    except OSError:  # pragma: no cover - matplotlib ships the font
        return ImageFont.load_default(LEGEND_FONT_PX)


@lru_cache(maxsize=16)
def legend_strip(labels: tuple[str, ...], canvas_w: int, ncol: int, strip_h: int) -> np.ndarray:
    """The white legend strip (strip_h, canvas_w, 3) uint8 for ``labels[1:]``, drawn once per geometry."""
    from PIL import Image, ImageDraw

    with _lock:  # FreeType rendering is not shared across threads
        font = _font()
        strip = Image.new("RGB", (canvas_w, strip_h), "white")
        draw = ImageDraw.Draw(strip)
        entries = [(i, name) for i, name in enumerate(labels) if i >= 1]
        columns = [c for c in np.array_split(np.arange(len(entries)), ncol) if len(c)]
        rows = max(len(c) for c in columns)
        x = _LEFT
        for column in columns:
            widest = 0.0
            for r, e in enumerate(column):
                index, name = entries[int(e)]
                bottom = strip_h - 9 - _ROW_PITCH * (rows - 1 - r)  # last filled row of the patch
                top = bottom - _PATCH[1] + 3
                draw.rectangle(
                    (x, top - 1, x + _PATCH[0] - 1, bottom + 1), fill=class_color(index, list(labels)), outline="black"
                )
                text_x = x + _PATCH[0] + _TEXT_GAP - 1
                draw.text((text_x, bottom), str(name), fill="black", font=font, anchor="ls")
                widest = max(widest, draw.textlength(str(name), font=font))
            x = int(round(x + _PATCH[0] + _TEXT_GAP + widest + _COLUMN_GAP))
        return np.asarray(strip).copy()


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, labels: list[str]) -> np.ndarray:
    """``octsam.colors.overlay`` at native size with the class legend in a white strip below (RGB uint8).

    The top-left H x W pixels are exactly the overlay; the canvas is widened (white) only when the legend needs
    more room than a narrow B-scan gives.
    """
    blended = overlay(image, mask, labels)
    height, width = blended.shape[:2]
    canvas_w, ncol, strip_h = legend_geometry(width, list(labels))
    out = np.empty((height + strip_h, canvas_w, 3), np.uint8)
    out[:height, :width] = blended
    if canvas_w > width:
        out[:height, width:] = 255
    out[height:] = legend_strip(tuple(labels), canvas_w, ncol, strip_h)
    return out
