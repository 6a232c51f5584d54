"""The data contract's constants, defined once (no heavy imports: every layer may use them).

A dataset is a ``datasets.DatasetDict`` with the splits below and these columns; masks hold 0 for background, 1..K for
the biomarkers and ``IGNORE_INDEX`` for pixels that no loss or metric counts. Label names travel with the data in
``LABELS_FILE`` (and the dataset card / info description, after ``LABELS_MARKER``).
"""

import math

from octsam.errors import OctSamError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
COLUMNS: tuple[str, ...] = ("image", "mask", "patient_id", "scan_id", "disease", "source")
LABELS_FILE = "id2label.json"
LABELS_MARKER = "octsam-id2label:"
IGNORE_INDEX = 255
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: The largest B-scan octsam reads (width x height), in pixels: 2**25 = 33.5 megapixels, e.g. 8192 x 4096 - about ten
#: times the widest clinical OCT B-scans. Reading is refused above it (from the file's header, before any pixel is
#: decoded), so a corrupt or hostile header (a "decompression bomb") ends with one message in every command, and the
#: peak memory of segmenting one B-scan stays bounded (see README "Reliability").
MAX_SCAN_PIXELS = 2**25

#: The most elongated B-scan octsam reads: the longer side at most 64 times the shorter (either way round), about
#: ten times the widest clinical B-scans (a 1536 x 496 Spectralis scan is 3.1 : 1). A longer strip is no B-scan (a
#: corrupt header, a line profile, a volume stored as one image): resized into the model's square input it keeps
#: under one pixel across, so it is refused from the header like an oversized image, before any output is made.
MAX_SCAN_ASPECT = 64

#: The largest OCT volume octsam reads, in voxels (B-scans x height x width): 2**30, e.g. 256 B-scans of 2048 x 2048 -
#: over ten times a Cirrus 1024 x 512 x 128 cube. Volume readers refuse a larger size from the header before reading
#: any data (each B-scan must also stay within ``MAX_SCAN_PIXELS``).
MAX_VOLUME_VOXELS = 2**30


def too_large_message(source: object, width: int | None = None, height: int | None = None) -> str:
    size = f"{width} x {height} = {width * height / 1e6:.1f} megapixels" if width and height else "too large"
    return (
        f"{source}: image is {size}, more than octsam's limit of {MAX_SCAN_PIXELS / 1e6:.1f} megapixels per B-scan "
        "(octsam.data.contract.MAX_SCAN_PIXELS); crop or downscale it, or check that the file is not corrupt."
    )


def check_scan_size(source: object, width: int, height: int) -> None:
    """Refuse a B-scan of ``width`` x ``height`` (from its header) above ``MAX_SCAN_PIXELS`` or ``MAX_SCAN_ASPECT``."""
    if width * height > MAX_SCAN_PIXELS:
        raise OctSamError(too_large_message(source, width, height))
    if width < 1 or height < 1 or max(width, height) > MAX_SCAN_ASPECT * min(width, height):
        ratio = max(width, height) / max(1, min(width, height))
        across = "high" if width > height else "wide"
        raise OctSamError(
            f"{source}: image is {width} x {height} pixels, {ratio:.0f} times longer than it is {across}, more than"
            f" octsam's limit of {MAX_SCAN_ASPECT} : 1 per B-scan (octsam.data.contract.MAX_SCAN_ASPECT); "
            "it is not a B-scan - check that the file is not corrupt, or crop it into B-scans."
        )


def volume_too_large_message(source: object, shape: tuple[int, ...]) -> str:
    size = " x ".join(str(int(v)) for v in shape)
    return (
        f"{source}: the header declares a volume of {size} voxels, more than octsam's limit of "
        f"{MAX_VOLUME_VOXELS / 1e9:.2f} billion voxels per volume (octsam.data.contract.MAX_VOLUME_VOXELS) or "
        f"{MAX_SCAN_PIXELS / 1e6:.1f} megapixels per B-scan; the file is corrupt or not an OCT volume."
    )


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
