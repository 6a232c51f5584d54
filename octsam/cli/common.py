"""Parsing shared by the command lines (one definition of each option's meaning)."""

from __future__ import annotations

import math

from octsam.errors import OctSamError


def parse_pixel_spacing(text: str | None) -> tuple[float, float] | None:
    """``"Y,X"`` in mm per pixel -> (y, x)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise OctSamError(
            f"--pixel-spacing-mm {text!r}: give two positive numbers Y,X (mm per pixel), e.g. 0.0039,0.0116"
        )
    return values[0], values[1]
