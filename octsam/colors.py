"""The one colour scheme of octsam: every class has one colour wherever it is drawn - inference overlays, the
evaluation figures and report, the eye report of a volume, the web app and the model cards.

Colours follow the label name (``class_colors``): drusen red, scar green, fluid blue in every dataset, as in the
original publication's masks; names without a fixed colour get Kelly's maximum-contrast colours. ``overlay`` blends
them over a B-scan. numpy and OpenCV only (no matplotlib): cards, app and inference import it without the evaluation
stack.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from octsam.data.contract import IGNORE_INDEX
from octsam.errors import OctSamError

# Colours by label name where the name is known (the AMD palette of the data contract: drusen red, scar green, fluid
# blue; the same for the other biomarkers octsam's users label), so a biomarker has one colour in every dataset.
NAMED_COLORS = {
    "background": (0, 0, 0),
    "drusen": (255, 0, 0),
    "scar": (0, 255, 0),
    "fluid": (0, 0, 255),
    "macular_hole": (255, 0, 0),
    "irf": (0, 0, 255),
    "intraretinal_fluid": (0, 0, 255),
    "srf": (0, 200, 255),
    "subretinal_fluid": (0, 200, 255),
    "ped": (255, 170, 0),
    "pigment_epithelial_detachment": (255, 170, 0),
    "hyperreflective_foci": (255, 0, 255),
    "hrf": (255, 0, 255),
    "erm": (255, 255, 0),
    "epiretinal_membrane": (255, 255, 0),
    "cnv": (0, 128, 0),
    "cnvm": (0, 128, 0),
    "ga": (150, 75, 0),
    "geographic_atrophy": (150, 75, 0),
}
# Kelly's colours of maximum contrast (white, black and grey left out), for label names not in NAMED_COLORS.
DISTINCT_COLORS = (
    (243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128), (0, 136, 86),
    (230, 143, 172), (0, 103, 165), (249, 147, 121), (96, 78, 151), (246, 166, 0), (179, 68, 108), (220, 211, 0),
    (136, 45, 23), (141, 182, 0), (101, 69, 34), (226, 88, 34), (43, 61, 38),
)  # fmt: skip
IGNORE_COLOR = (128, 128, 128)


def class_colors(labels: Sequence[str] | None, count: int | None = None) -> list[tuple[int, int, int]]:
    """RGB colour of each class: by name where the name is known (``NAMED_COLORS``), else the next of Kelly's
    maximum-contrast colours not too close to one already used. Without labels, classes take DISTINCT_COLORS in order
    after AMD's red, green, blue."""
    if labels is None:
        labels = ["background", "drusen", "scar", "fluid"] + [f"class {i}" for i in range(4, count or 4)]
    colors: list[tuple[int, int, int] | None] = [NAMED_COLORS.get(str(n).strip().lower()) for n in labels]
    colors[0] = (0, 0, 0)
    used = [c for c in colors if c is not None]
    spare = iter(DISTINCT_COLORS)
    for i, color in enumerate(colors):
        if color is not None:
            continue
        for candidate in spare:
            if all(sum((a - b) ** 2 for a, b in zip(candidate, u)) > 60**2 for u in used):
                break
        else:  # more classes than distinct colours: golden-ratio hues, reproducible
            r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
            candidate = (round(r * 255), round(g * 255), round(b * 255))
        colors[i] = candidate
        used.append(candidate)
    return colors  # type: ignore[return-value]


def class_color(index: int, labels: Sequence[str] | None = None) -> tuple[int, int, int]:
    """RGB colour of class ``index`` (see ``class_colors``); 255 (ignore) is grey."""
    index = int(index)
    if index == IGNORE_INDEX:
        return IGNORE_COLOR
    if index < 0:
        raise OctSamError(f"class index must be >= 0, got {index}")
    return (
        class_colors(labels, index + 1)[index]
        if labels is None or index < len(labels)
        else class_colors(None, index + 1)[index]
    )


def rgb01(index: int, labels: Sequence[str] | None = None) -> tuple[float, float, float]:
    """``class_color`` as matplotlib's 0..1 floats."""
    return tuple(c / 255.0 for c in class_color(index, labels))  # type: ignore[return-value]


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise OctSamError(f"image must be (H, W) grayscale or (H, W, 3) RGB, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.copy()
    image = image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating) and image.size and np.nanmax(image) <= 1.0:
        image = image * 255.0
    return np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str] | None = None,
    alpha: float = 0.45,
    outline: bool = True,
) -> np.ndarray:
    """Blend class colours of ``mask`` over ``image``; returns RGB uint8 (H, W, 3).

    Background (0) stays untouched, ignored pixels (255) are tinted grey, and with ``outline`` each region's
    border is drawn in full colour so that thin or small biomarkers stay visible.
    """
    rgb = as_rgb_uint8(image)
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise OctSamError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=1)) if mask.dtype == np.uint8 else np.unique(mask)
    classes = [int(c) for c in present if c != 0]
    if labels is not None:
        unknown = [c for c in classes if c >= len(labels) and c != IGNORE_INDEX]
        if unknown:
            raise OctSamError(f"mask holds class indices {unknown} but only {len(labels)} labels were given")
    # Only the pixels of each class are blended (the same float64 arithmetic per pixel as blending the whole image,
    # so the result is bit-identical, at a fraction of the cost: ~20 -> ~5 ms for a 768 x 496 B-scan).
    import cv2

    out = rgb.copy()
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # ndimage.binary_erosion's default structure
    for c in classes:
        region = mask == c
        color = np.array(class_color(c, labels), dtype=np.float64)
        blended = (1.0 - alpha) * rgb[region].astype(np.float64) + alpha * color
        out[region] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        if outline and c != IGNORE_INDEX:
            # pixels outside the image count as background (binary_erosion's border_value=0)
            inner = cv2.erode(region.view(np.uint8), cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
            out[region & ~inner.view(bool)] = np.array(class_color(c, labels), dtype=np.uint8)
    return out
