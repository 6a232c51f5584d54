"""Colour-coded masks: palettes (presets or JSON) and colour -> class index conversion."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octsam.data.dataset import IGNORE_INDEX
from octsam.errors import OctSamError

# The original publication's mask colours (the AMD palette of the data contract).
PRESETS: dict[str, dict[str, tuple[int, int, int]]] = {
    "amd": {"background": (0, 0, 0), "drusen": (255, 0, 0), "scar": (0, 255, 0), "fluid": (0, 0, 255)},
    "macular_hole": {"background": (0, 0, 0), "macular_hole": (255, 0, 0)},
}
IGNORE_KEY = "_ignore"


@dataclass(frozen=True)
class Palette:
    """Label names in class-index order, their RGB colours, and colours that mean "ignore" (index 255)."""

    name: str
    labels: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore: tuple[tuple[int, int, int], ...] = ()

    def describe(self) -> str:
        parts = [f"{n} {c}" for n, c in zip(self.labels, self.colors)] + [f"ignore {c}" for c in self.ignore]
        return ", ".join(parts)


def load_palette(spec: str) -> Palette:
    """A preset name (``amd``, ``macular_hole``) or a JSON file ``{"background": [0,0,0], "fluid": [0,0,255]}``.

    Keys are label names in class-index order (the first must be background); an optional key ``"_ignore"``
    holds one colour or a list of colours that become the ignore index 255.
    """
    if spec in PRESETS:
        table = PRESETS[spec]
        return Palette(spec, tuple(table), tuple(table.values()))
    path = Path(spec)
    if not path.is_file():
        raise OctSamError(
            f"--palette {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file. "
            'A palette file looks like {"background": [0, 0, 0], "fluid": [0, 0, 255]}.'
        )
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OctSamError(f"cannot read palette file {path}: {err}") from err
    if not isinstance(table, dict) or not table:
        raise OctSamError(f"palette file {path} must be a JSON object of label name -> [R, G, B].")
    ignore_spec = table.pop(IGNORE_KEY, [])
    if ignore_spec and not isinstance(ignore_spec[0], list):
        ignore_spec = [ignore_spec]
    labels = tuple(table)
    colors = tuple(_rgb(v, f"{path}: colour of {k!r}") for k, v in table.items())
    ignore = tuple(_rgb(v, f"{path}: {IGNORE_KEY} colour") for v in ignore_spec)
    if labels[0] != "background":
        raise OctSamError(f"palette file {path}: the first label must be 'background', got {labels[0]!r}.")
    if len(set(colors + ignore)) != len(colors) + len(ignore):
        raise OctSamError(f"palette file {path}: two labels share a colour.")
    return Palette(str(path), labels, colors, ignore)


def _rgb(value: object, where: str) -> tuple[int, int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(c, int) for c in value)):
        raise OctSamError(f"{where} must be [R, G, B] with integers 0..255, got {value!r}.")
    if not all(0 <= c <= 255 for c in value):
        raise OctSamError(f"{where} must be [R, G, B] with integers 0..255, got {value!r}.")
    return (int(value[0]), int(value[1]), int(value[2]))


def colors_to_index(rgb: np.ndarray, palette: Palette, path: str | Path) -> np.ndarray:
    """Map an (H, W, 3) colour mask to an (H, W) uint8 class-index mask; unknown colours raise OctSamError."""
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    codes = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    out = np.full(codes.shape, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(codes.shape, dtype=bool)
    for index, (r, g, b) in enumerate(palette.colors):
        hit = codes == ((r << 16) | (g << 8) | b)
        out[hit] = index
        known |= hit
    for r, g, b in palette.ignore:
        known |= codes == ((r << 16) | (g << 8) | b)
    if not known.all():
        values, counts = np.unique(codes[~known], return_counts=True)
        order = np.argsort(-counts)[:5]
        found = ", ".join(
            f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) in {c} pixels" for v, c in zip(values[order], counts[order])
        )
        more = f" and {len(values) - len(order)} more colours" if len(values) > len(order) else ""
        raise OctSamError(
            f"mask {path}: colour(s) not in palette {palette.name}: {found}{more}. Palette: {palette.describe()}. "
            "Fix the mask (e.g. save it without anti-aliasing or JPEG compression) or pass a --palette JSON "
            f"that lists these colours (use key {IGNORE_KEY!r} for colours to ignore)."
        )
    return out
