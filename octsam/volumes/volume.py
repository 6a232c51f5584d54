"""``OctVolume``: the one volume type inside octsam, whatever file it came from.

Conventions (all readers follow them):

- ``bscans``: uint8 (H, W) arrays in acquisition order, all of one size. Row = axial depth, column = A-scan.
- ``pixel_spacing`` = (axial, lateral) in mm per pixel; ``bscan_spacing`` = distance between neighbouring B-scans
  in mm.
- ``localizer``: optional SLO / fundus / NIR image (uint8, (h, w) or (h, w, 3)); ``bscan_positions`` (N, 2, 2): for
  every B-scan its start and end point (x, y) in *localizer pixel* coordinates (column, row), so A-scan ``j`` of
  B-scan ``i`` lies at ``start + (end - start) * j / (W - 1)``.
- ``layers``: optional layer height maps from the file, name -> (N, W) float array of row positions (NaN = none);
  used to find the fovea (thinnest retina between ILM and BM/RPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from octsam.errors import OctSamError

SPACING_HELP = (
    "pass the spacing in mm as --spacing AXIAL,LATERAL,BSCAN (e.g. --spacing 0.0039,0.0114,0.12 for a "
    "Spectralis 20x20 degree, 49-line volume; read it from the device's scan protocol)"
)


def parse_spacing(text: str | tuple | list | None) -> tuple[float, float, float] | None:
    """``"0.0039,0.0114,0.12"`` (or a 3-tuple) -> (axial, lateral, bscan) mm; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError) as err:
        raise OctSamError(f"--spacing must be three numbers AXIAL,LATERAL,BSCAN in mm, got {text!r}") from err
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise OctSamError(f"--spacing must be three positive numbers AXIAL,LATERAL,BSCAN in mm, got {text!r}")
    return values[0], values[1], values[2]


@dataclass
class OctVolume:
    """An OCT volume: ordered B-scans with their geometry and what the file says about the eye."""

    bscans: list[np.ndarray]
    pixel_spacing: tuple[float, float]  # (axial, lateral) mm per pixel
    bscan_spacing: float  # mm between neighbouring B-scans
    source: str  # the file (or folder) it was read from
    volume_id: str
    patient_id: str | None = None
    laterality: str | None = None  # "OD" (right) / "OS" (left) / None
    device: str | None = None
    scan_date: str | None = None  # ISO 8601 date or date-time
    localizer: np.ndarray | None = None
    localizer_spacing: tuple[float, float] | None = None  # (row, column) mm per localizer pixel
    bscan_positions: np.ndarray | None = None  # (N, 2, 2) start/end (x, y) in localizer pixels
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    spacing_source: str = "file"  # where the spacing came from: "file", "--spacing", or a dataset's documentation

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_bscans(self) -> int:
        return len(self.bscans)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_bscans, height, width)."""
        return (len(self.bscans), *self.bscans[0].shape[:2])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(axial, lateral, bscan) mm: the order of ``--spacing``."""
        return (self.pixel_spacing[0], self.pixel_spacing[1], self.bscan_spacing)

    def array(self) -> np.ndarray:
        """The B-scans stacked as one (N, H, W) uint8 array."""
        return np.stack(self.bscans)

    def validate(self) -> None:
        """Raise OctSamError (naming ``source``) when the volume breaks the conventions above."""
        where = self.source
        if not self.bscans:
            raise OctSamError(f"{where}: the volume holds no B-scans.")
        sizes = {}
        for i, b in enumerate(self.bscans):
            if not isinstance(b, np.ndarray) or b.dtype != np.uint8 or b.ndim != 2:
                raise OctSamError(
                    f"{where}: B-scan {i} must be a 2-D uint8 array, got "
                    f"{getattr(b, 'dtype', type(b).__name__)} {getattr(b, 'shape', '')}."
                )
            sizes.setdefault(b.shape, []).append(i)
        if len(sizes) > 1:
            listing = "; ".join(
                f"{w}x{h} (width x height): B-scan(s) {', '.join(map(str, idx[:8]))}{' ...' if len(idx) > 8 else ''}"
                for (h, w), idx in sizes.items()
            )
            raise OctSamError(f"{where}: B-scans of one volume must all have one size, found {listing}.")
        values = [*self.pixel_spacing, self.bscan_spacing]
        if len(self.pixel_spacing) != 2 or not all(
            isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v > 0 for v in values
        ):
            raise OctSamError(
                f"{where}: spacing must be positive mm values, got axial/lateral {tuple(self.pixel_spacing)} and "
                f"B-scan {self.bscan_spacing}; {SPACING_HELP}."
            )
        if self.bscan_positions is not None:
            pos = np.asarray(self.bscan_positions, dtype=np.float64)
            if pos.shape != (len(self.bscans), 2, 2) or not np.isfinite(pos).all():
                raise OctSamError(
                    f"{where}: B-scan positions must be ({len(self.bscans)}, 2, 2) finite values, got {pos.shape}."
                )
            self.bscan_positions = pos
        if self.localizer is not None:
            loc = np.asarray(self.localizer)
            if loc.dtype != np.uint8 or loc.ndim not in (2, 3):
                raise OctSamError(f"{where}: localizer must be a uint8 image, got {loc.dtype} {loc.shape}.")
        if self.laterality not in (None, "OD", "OS"):
            raise OctSamError(f"{where}: laterality must be OD, OS or unknown, got {self.laterality!r}.")


def normalise_laterality(value) -> str | None:
    """'R', 'OD', 'right' -> 'OD'; 'L', 'OS', 'left' -> 'OS'; anything else -> None."""
    text = str(value or "").strip().strip("\x00").upper()
    if text in ("OD", "R", "RIGHT", "RE"):
        return "OD"
    if text in ("OS", "L", "LEFT", "LE"):
        return "OS"
    return None


@dataclass
class AnnotatedVolume:
    """A volume with its reference masks: for dataset building and per-volume evaluation.

    ``masks``: uint8 (H, W) per B-scan, 0 = background, 1..K = ``labels[1:]``, 255 = ignore (not annotated).
    ``annotated``: which B-scans carry an annotation at all (Duke: 11 of 61); the others have all-255 masks.
    """

    volume: OctVolume
    masks: list[np.ndarray]
    labels: list[str]
    annotated: list[bool]

    def __post_init__(self) -> None:
        where = self.volume.source
        if len(self.masks) != self.volume.n_bscans or len(self.annotated) != self.volume.n_bscans:
            raise OctSamError(
                f"{where}: {len(self.masks)} masks for {self.volume.n_bscans} B-scans; every B-scan needs one."
            )
        for i, (b, m) in enumerate(zip(self.volume.bscans, self.masks)):
            if m.shape != b.shape or m.dtype != np.uint8:
                raise OctSamError(f"{where}: mask {i} is {m.dtype} {m.shape}, the B-scan is {b.shape}.")
