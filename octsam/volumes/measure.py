"""Per-volume biomarker measures from per-B-scan index masks: mm³, 3-D lesion counts, en-face maps, ETDRS sectors.

Rules (what every number means):

- **Volume** of class k in mm³ = sum over B-scans of (pixels of class k x axial x lateral spacing, i.e. the area in
  mm² on that B-scan) x B-scan spacing. Each B-scan stands for the slab of retina half-way to its neighbours (the
  usual rule for raster OCT, as in RETOUCH's absolute volume difference). Ignore pixels (255) count for nothing.
- **Lesions**: connected components of class k in the (B-scan, row, column) stack with full 3-D connectivity
  (26 neighbours): a lesion seen on neighbouring B-scans at overlapping or touching positions is one lesion.
- **En-face map** of class k: for every A-scan, the axial thickness in mm of class k (pixel count x axial spacing),
  a (n_bscans, width) grid; resampled onto the localizer (SLO / fundus) when the file gives B-scan positions.
- **ETDRS grid** (1, 3, 6 mm diameters) centred on the fovea: volume in mm³ of class k in the centre disc and the
  inner and outer rings' four quadrants, plus how much of each sector the scan covered. The fovea is the thinnest
  retina (ILM to BM/RPE layer lines, when the file carries them for most A-scans), else the volume centre;
  ``fovea_method`` says which. Quadrants are superior / inferior (up / down on the localizer) and nasal / temporal
  from the laterality (OD: nasal is to the right on the fundus image); without laterality they are named
  right / left. Without B-scan positions, B-scan 0 is taken as the top (superior) row: ``orientation`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from octsam.errors import OctSamError

ETDRS_DIAMETERS_MM = (1.0, 3.0, 6.0)
QUADRANTS = ("superior", "right", "inferior", "left")


@dataclass
class VolumeMeasures:
    labels: list[str]
    volume_mm3: dict[str, float]
    lesions: dict[str, int]
    enface: dict[str, np.ndarray] = field(repr=False)  # name -> (N, W) thickness mm
    enface_localizer: dict[str, np.ndarray] | None = field(default=None, repr=False)  # name -> localizer grid, NaN out
    etdrs_mm3: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> sector -> mm³
    etdrs_coverage: dict[str, float] = field(default_factory=dict)  # sector -> fraction of its area scanned
    fovea: tuple[float, float] = (0.0, 0.0)  # (B-scan index, A-scan index)
    fovea_method: str = ""
    orientation: str = ""

    def to_dict(self) -> dict:
        """JSON-ready summary (no arrays)."""
        return {
            "labels": list(self.labels),
            "volume_mm3": {k: round(v, 6) for k, v in self.volume_mm3.items()},
            "lesions": dict(self.lesions),
            "etdrs_mm3": {k: {s: round(v, 6) for s, v in d.items()} for k, d in self.etdrs_mm3.items()},
            "etdrs_coverage": {s: round(v, 4) for s, v in self.etdrs_coverage.items()},
            "fovea": {"bscan": round(self.fovea[0], 2), "ascan": round(self.fovea[1], 2), "method": self.fovea_method},
            "orientation": self.orientation,
            "rule": "volume = sum over B-scans of class area (mm²) x B-scan spacing (mm); lesions: 26-connected in 3-D",
        }


def _stack(masks) -> np.ndarray:
    stack = np.stack([np.asarray(m) for m in masks]) if not isinstance(masks, np.ndarray) else masks
    if stack.ndim != 3:
        raise OctSamError(f"masks must be a list of (H, W) arrays, got shape {stack.shape}")
    return stack


def biomarker_volumes(masks, pixel_spacing: tuple[float, float], bscan_spacing: float, labels: list[str]) -> dict:
    """Class name -> volume in mm³ = sum over B-scans of area (pixels x axial x lateral mm²) x B-scan spacing (mm)."""
    stack = _stack(masks)
    voxel = float(pixel_spacing[0]) * float(pixel_spacing[1]) * float(bscan_spacing)
    counts = np.bincount(stack.ravel(), minlength=256)
    return {name: float(counts[k]) * voxel for k, name in enumerate(labels) if k > 0}


def count_lesions(masks, labels: list[str]) -> dict[str, int]:
    """Class name -> number of 3-D connected components (26-connectivity, across neighbouring B-scans)."""
    stack = _stack(masks)
    structure = ndimage.generate_binary_structure(3, 3)
    return {name: int(ndimage.label(stack == k, structure=structure)[1]) for k, name in enumerate(labels) if k > 0}


def enface_thickness(masks, axial_spacing: float, labels: list[str]) -> dict[str, np.ndarray]:
    """Class name -> (n_bscans, width) map of the class's axial thickness in mm per A-scan."""
    stack = _stack(masks)
    return {
        name: (stack == k).sum(axis=1).astype(np.float64) * axial_spacing for k, name in enumerate(labels) if k > 0
    }


def _affine_from_positions(positions: np.ndarray, width: int) -> np.ndarray | None:
    """3 x 2 matrix M with [i, j, 1] @ M = (x, y) localizer pixels, fitted to every B-scan's start and end point."""
    n = positions.shape[0]
    if n < 2 or width < 2:
        return None
    rows, targets = [], []
    for i in range(n):
        rows += [[i, 0.0, 1.0], [i, width - 1.0, 1.0]]
        targets += [positions[i, 0], positions[i, 1]]
    matrix, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    if abs(np.linalg.det(matrix[:2])) < 1e-12:
        return None
    return matrix


def enface_to_localizer(enface: np.ndarray, positions: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """Resample an (N, W) en-face map onto a localizer of ``shape`` (h, w) by the B-scan positions (nearest
    A-scan); pixels the scan does not cover are NaN. ``None`` when the positions do not span an area."""
    n, width = enface.shape
    matrix = _affine_from_positions(np.asarray(positions, dtype=np.float64), width)
    if matrix is None:
        return None
    h, w = shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1) - matrix[2]
    ij = np.linalg.solve(matrix[:2].T, xy.T).T  # (i, j) per localizer pixel
    i = np.rint(ij[:, 0]).astype(np.int64)
    j = np.rint(ij[:, 1]).astype(np.int64)
    inside = (i >= 0) & (i < n) & (j >= 0) & (j < width)
    out = np.full(h * w, np.nan)
    out[inside] = enface[i[inside], j[inside]]
    return out.reshape(h, w)


def cell_coordinates_mm(volume) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y) in mm of every en-face cell (B-scan i, A-scan j), y growing downwards, and the orientation used."""
    n, _, width = volume.shape
    if volume.bscan_positions is not None and volume.localizer_spacing is not None:
        pos = volume.bscan_positions
        t = np.linspace(0.0, 1.0, width)[None, :]
        x = pos[:, 0, 0:1] + (pos[:, 1, 0:1] - pos[:, 0, 0:1]) * t
        y = pos[:, 0, 1:2] + (pos[:, 1, 1:2] - pos[:, 0, 1:2]) * t
        sy, sx = volume.localizer_spacing
        return x * sx, y * sy, "B-scan positions on the localizer (up = superior)"
    lateral, bscan = volume.pixel_spacing[1], volume.bscan_spacing
    jj, ii = np.meshgrid(np.arange(width) * lateral, np.arange(n) * bscan)
    return jj, ii, "no B-scan positions: B-scan 0 taken as the superior edge, A-scan 0 as the left edge"


def find_fovea(volume, min_coverage: float = 0.5) -> tuple[tuple[float, float], str]:
    """((B-scan, A-scan), method): the thinnest retina when ILM and BM/RPE lines cover >= ``min_coverage`` of the
    A-scans (search restricted to the central half of the scan, smoothed over ~0.3 mm), else the volume centre."""
    n, _, width = volume.shape
    centre = ((n - 1) / 2.0, (width - 1) / 2.0)
    top = volume.layers.get("ILM")
    bottom = next((volume.layers[k] for k in ("BM", "RPE") if k in volume.layers), None)
    if top is None or bottom is None or n < 3:
        return centre, "volume centre (no ILM/BM layer lines in the file)"
    thickness = (bottom - top) * volume.pixel_spacing[0]
    valid = np.isfinite(thickness) & (thickness > 0)
    if valid.mean() < min_coverage:
        return centre, f"volume centre (layer lines cover only {valid.mean():.0%} of the A-scans)"
    sigma = (max(0.3 / volume.bscan_spacing, 0.5), max(0.3 / volume.pixel_spacing[1], 0.5))
    filled = np.where(valid, thickness, 0.0)
    weight = ndimage.gaussian_filter(valid.astype(np.float64), sigma)
    smooth = ndimage.gaussian_filter(filled, sigma) / np.maximum(weight, 1e-9)
    smooth[weight < 0.2] = np.inf
    window = np.full_like(smooth, np.inf)
    i0, i1 = int(n * 0.25), max(int(math.ceil(n * 0.75)), int(n * 0.25) + 1)
    j0, j1 = int(width * 0.25), max(int(math.ceil(width * 0.75)), int(width * 0.25) + 1)
    window[i0:i1, j0:j1] = smooth[i0:i1, j0:j1]
    if not np.isfinite(window).any():
        return centre, "volume centre (no valid retina thickness near the centre)"
    i, j = np.unravel_index(int(np.argmin(window)), window.shape)
    return (float(i), float(j)), "thinnest retina (ILM to BM/RPE layer lines from the file)"


def _sector_names(laterality: str | None) -> dict[str, str]:
    if laterality == "OD":
        return {"right": "nasal", "left": "temporal", "superior": "superior", "inferior": "inferior"}
    if laterality == "OS":
        return {"right": "temporal", "left": "nasal", "superior": "superior", "inferior": "inferior"}
    return {q: q for q in QUADRANTS}


def etdrs_sectors(volume, fovea: tuple[float, float]) -> tuple[np.ndarray, list[str], dict[str, float], str]:
    """Sector index (N, W) per en-face cell (-1 outside the 6 mm grid), sector names, covered fraction per sector."""
    x, y, orientation = cell_coordinates_mm(volume)
    fi, fj = fovea
    n, width = x.shape
    i0, j0 = int(round(fi)), int(round(fj))
    fx, fy = (
        x[min(max(i0, 0), n - 1), min(max(j0, 0), width - 1)],
        y[min(max(i0, 0), n - 1), min(max(j0, 0), width - 1)],
    )
    dx, dy = x - fx, y - fy
    r = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(-dy, dx))  # up = +90
    quadrant = np.select(
        [(angle >= 45) & (angle < 135), (angle >= -45) & (angle < 45), (angle >= -135) & (angle < -45)],
        [0, 1, 2],
        default=3,
    )
    names_map = _sector_names(volume.laterality)
    names = ["centre"] + [f"inner_{names_map[q]}" for q in QUADRANTS] + [f"outer_{names_map[q]}" for q in QUADRANTS]
    r1, r2, r3 = (d / 2 for d in ETDRS_DIAMETERS_MM)
    sector = np.full(r.shape, -1, dtype=np.int64)
    sector[r < r1] = 0
    inner = (r >= r1) & (r < r2)
    outer = (r >= r2) & (r < r3)
    sector[inner] = 1 + quadrant[inner]
    sector[outer] = 5 + quadrant[outer]
    cell_area = volume.pixel_spacing[1] * volume.bscan_spacing
    areas = [math.pi * r1**2] + [math.pi * (r2**2 - r1**2) / 4] * 4 + [math.pi * (r3**2 - r2**2) / 4] * 4
    coverage = {
        name: min(1.0, float((sector == k).sum()) * cell_area / area)
        for k, (name, area) in enumerate(zip(names, areas))
    }
    return sector, names, coverage, orientation


def measure_volume(masks, volume, labels: list[str]) -> VolumeMeasures:
    """All measures of one volume from its per-B-scan index masks (see the module docstring for the rules)."""
    stack = _stack(masks)
    if stack.shape != volume.shape:
        raise OctSamError(f"{volume.source}: masks have shape {stack.shape}, the volume {volume.shape} (N, H, W).")
    volumes = biomarker_volumes(stack, volume.pixel_spacing, volume.bscan_spacing, labels)
    lesions = count_lesions(stack, labels)
    enface = enface_thickness(stack, volume.pixel_spacing[0], labels)
    on_localizer = None
    if volume.localizer is not None and volume.bscan_positions is not None:
        on_localizer = {}
        for name, grid in enface.items():
            resampled = enface_to_localizer(grid, volume.bscan_positions, volume.localizer.shape[:2])
            if resampled is None:
                on_localizer = None
                break
            on_localizer[name] = resampled
    fovea, method = find_fovea(volume)
    sector, names, coverage, orientation = etdrs_sectors(volume, fovea)
    cell_area = volume.pixel_spacing[1] * volume.bscan_spacing
    etdrs = {
        name: {s: float(grid[sector == k].sum() * cell_area) for k, s in enumerate(names)}
        for name, grid in enface.items()
    }
    return VolumeMeasures(
        labels=list(labels),
        volume_mm3=volumes,
        lesions=lesions,
        enface=enface,
        enface_localizer=on_localizer,
        etdrs_mm3=etdrs,
        etdrs_coverage=coverage,
        fovea=fovea,
        fovea_method=method,
        orientation=orientation,
    )


# ------------------------------------------------------------------------------------------------ evaluation


def volume_errors(predicted: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    """Class name -> predicted minus true volume in mm³ (signed; its absolute value is RETOUCH's AVD)."""
    return {name: float(predicted.get(name, 0.0)) - float(value) for name, value in truth.items()}


def pearson(a, b) -> float:
    """Pearson correlation; NaN for fewer than 2 pairs or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def volume_agreement(predicted: list[dict[str, float]], truth: list[dict[str, float]], labels: list[str]) -> dict:
    """Per class over eyes: n, mean absolute and mean signed volume error (mm³) and the Pearson r of predicted vs
    true volume. ``predicted[e]`` / ``truth[e]``: class name -> mm³ of eye ``e``."""
    if len(predicted) != len(truth):
        raise OctSamError(f"{len(predicted)} predicted volumes but {len(truth)} true ones; pair them per eye.")
    out = {}
    for name in labels[1:]:
        p = np.array([float(d.get(name, 0.0)) for d in predicted])
        t = np.array([float(d.get(name, 0.0)) for d in truth])
        err = p - t
        out[name] = {
            "n": int(len(p)),
            "mean_abs_error_mm3": float(np.abs(err).mean()) if len(p) else float("nan"),
            "mean_error_mm3": float(err.mean()) if len(p) else float("nan"),
            "pearson_r": pearson(p, t),
        }
    return out
