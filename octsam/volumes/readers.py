"""Read OCT volumes from device exports and research data sets into ``OctVolume``.

``read_volume(path, spacing=None)`` dispatches on the suffix (and on the DICOM preamble for files without one):

| input | library | spacing from |
| --- | --- | --- |
| Heidelberg HEYEX ``.vol`` | eyepy ``HeVolReader`` | the file header |
| Heidelberg ``.e2e`` (every series) | eyepy ``HeE2eReader`` | the file |
| Heidelberg HEYEX XML export (``.xml`` + images) | eyepy ``HeXmlReader`` | the XML |
| eyepy's own ``.eye`` | eyepy ``EyeVolume.load`` | the file |
| Topcon ``.fda`` | eyepy ``import_topcon_fda`` (oct-converter) | the file |
| Zeiss Cirrus ``.img`` | oct-converter ``IMG`` | not stored: ``--spacing`` |
| DICOM Ophthalmic Tomography (multi-frame) | pydicom | PixelSpacing / SliceThickness (functional groups) |
| Duke ``.mat`` (``images`` H x W x N) | scipy.io.loadmat | the data set's paper (see ``DUKE_SPACING``) |
| RETOUCH ``.mhd``/``.raw`` (or its case folder) | SimpleITK | the MetaImage header |
| a folder of ordered B-scan images | Pillow/tifffile (``octsam.data.read_scan``) | ``--spacing`` |

``spacing`` = (axial, lateral, bscan) mm overrides whatever the file says. Every failure is an ``OctSamError`` that
names the file. ``read_annotated_volume`` also returns the reference masks (Duke fluid, RETOUCH IRF/SRF/PED, eyepy
pixel annotations).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np

from octsam.data.contract import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    MAX_SCAN_PIXELS,
    MAX_VOLUME_VOXELS,
    volume_too_large_message,
)
from octsam.data.dataset import read_scan, to_uint8
from octsam.errors import OctSamError
from octsam.safepaths import check_link, contained
from octsam.volumes.volume import SPACING_HELP, AnnotatedVolume, OctVolume, normalise_laterality, parse_spacing

logger = logging.getLogger("octsam.volumes")

OCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
VOLUME_SUFFIXES = (".vol", ".e2e", ".xml", ".eye", ".fda", ".img", ".dcm", ".dicom", ".mat", ".mhd")
RETOUCH_LABELS = ["background", "IRF", "SRF", "PED"]  # reference.mhd values 1, 2, 3
DUKE_LABELS = ["background", "fluid"]
# Duke .mat files carry no spacing. Values as eyepy's importers use them: DME (Chiu et al., BOE 2015, Spectralis,
# 61 B-scans): averages of the paper's ranges; AMD (Farsiu et al., Ophthalmology 2013, Bioptigen).
DUKE_SPACING = {
    "dme": ((0.00387, 0.01133, 0.123), "Duke DME data set (Chiu et al. 2015), averages as in eyepy"),
    "amd": ((0.0045, 0.0067, 0.067), "Duke AMD data set (Farsiu et al. 2013), as in eyepy"),
}
_SERIES_TAIL = re.compile(r"[^\w.-]+")


# ------------------------------------------------------------------------------------------------ dispatch


def read_volume(path: str | os.PathLike, spacing=None) -> list[OctVolume]:
    """Every OCT volume in ``path`` (an E2E file may hold several; the others hold one).

    ``spacing``: (axial, lateral, bscan) mm or ``"A,L,B"``; required where the file has none (folder of images,
    Zeiss ``.img``, DICOM without spacing attributes).
    """
    path = Path(path).expanduser()
    override = parse_spacing(spacing)
    if not path.exists():
        raise OctSamError(f"volume not found: {path}")
    kind = volume_kind(path)
    reader = _READERS[kind]
    volumes = reader(path, override)
    if not volumes:
        raise OctSamError(f"{path}: no OCT volume found in the file.")
    return volumes


def volume_kind(path: Path) -> str:
    """Which reader handles ``path``: vol, e2e, xml, eye, fda, img, dicom, mat, mhd, retouch or folder."""
    if path.is_dir():
        if (path / "oct.mhd").is_file():
            return "retouch"
        if any(p.suffix.lower() == ".xml" for p in path.iterdir()):
            return "xml"
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return "dicom"
    if suffix in VOLUME_SUFFIXES:
        return suffix[1:]
    if _has_dicom_preamble(path):
        return "dicom"
    if suffix in IMAGE_SUFFIXES:
        raise OctSamError(
            f"{path} is a single image, not a volume; pass the folder of its B-scans with --spacing, or segment it "
            "as a B-scan."
        )
    raise OctSamError(
        f"{path}: unknown volume format {suffix or '(no suffix)'}; expected one of {', '.join(VOLUME_SUFFIXES)}, "
        "a DICOM file or a folder of B-scans."
    )


def is_volume_input(path: str | os.PathLike) -> bool:
    """True when ``path`` should go through ``read_volume`` rather than the 2-D image readers."""
    path = Path(path)
    if path.is_dir():
        return (path / "oct.mhd").is_file()
    return path.suffix.lower() in VOLUME_SUFFIXES or (
        path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES and _has_dicom_preamble(path)
    )


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _apply_spacing(volume_kwargs: dict, override, path: Path, found: tuple | None, found_source: str) -> None:
    """Put the spacing into ``volume_kwargs``: the override, else what was found, else an error asking for it."""
    if override is not None:
        axial, lateral, bscan = override
        source = "--spacing"
    elif found is not None and all(v is not None and np.isfinite(v) and v > 0 for v in found):
        axial, lateral, bscan = (float(v) for v in found)
        source = found_source
    else:
        raise OctSamError(f"{path} does not say how far apart its pixels and B-scans are: {SPACING_HELP}.")
    volume_kwargs.update(pixel_spacing=(axial, lateral), bscan_spacing=bscan, spacing_source=source)


def _uint8_stack(data: np.ndarray) -> list[np.ndarray]:
    """(N, H, W) of any type -> list of uint8 B-scans, scaled jointly (one intensity mapping per volume)."""
    data = np.asarray(data)
    if data.dtype != np.uint8:
        data = to_uint8(data)
    return [np.ascontiguousarray(b) for b in data]


def _iso(value) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return str(value)


# ----------------------------------------------------------------------------------------------- eyepy


def _import_eyepy(path: Path):
    try:
        import eyepy  # noqa: F401
    except ImportError as err:
        raise OctSamError(f"reading {path} needs eyepy: pip install -c constraints.txt 'eyepy>=0.21' ({err})") from err


MM_PER_DEGREE = 0.2896  # eyepy's MEDIUM_EYE_LENGTH_UM_PER_DEG (Heidelberg's medium eye), for E2E angles
E2E_SPACING_SOURCE = (
    "E2E: axial from the file; lateral and B-scan spacing from the scan angles x 289.6 µm/degree (eyepy's "
    "provisional medium-eye constant; pass --spacing for exact values)"
)


def _degree_spacing(meta, width: int, n: int) -> tuple[float, float, float] | None:
    """(axial, lateral, bscan) mm of an E2E series whose eyepy meta is in pixels: the B-scans' axial ``scale_y``
    (mm) and their start/end angles in degrees x ``MM_PER_DEGREE``."""
    try:
        bm = meta["bscan_meta"]
        if str(bm[0].get("pos_unit", "")) != "°":
            return None
        axial = float(bm[0]["scale_y"])
        angle = abs(float(bm[0]["end_pos"][0]) - float(bm[0]["start_pos"][0]))
        columns = int(bm[0].get("imgSizeWidth", width) or width)
        lateral = angle / columns * MM_PER_DEGREE
        if n > 1:
            first, last = np.asarray(bm[0]["start_pos"], float), np.asarray(bm[-1]["start_pos"], float)
            bscan = float(np.hypot(*(last - first))) / (n - 1) * MM_PER_DEGREE
        else:
            bscan = float("nan")
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    values = (axial, lateral, bscan)
    return values if all(np.isfinite(v) and v > 0 for v in values) else None


def _from_eyepy(ev, path: Path, override, volume_id: str, device: str, patient_id: str | None = None) -> OctVolume:
    """An eyepy ``EyeVolume`` -> ``OctVolume`` (uint8 B-scans, mm spacing, localizer and positions in pixels)."""
    meta = ev.meta
    data = ev.data
    if np.issubdtype(data.dtype, np.floating):
        data = np.nan_to_num(data)
        data = data * 255.0 if np.nanmax(data, initial=0) <= 1.0 else data
    bscans = _uint8_stack(np.clip(data, 0, 255).astype(np.uint8) if data.dtype != np.uint8 else data)
    unit = str(meta.get("scale_unit", "")).lower()
    found, source = None, "file"
    if unit == "mm":
        found = (meta["scale_y"], meta["scale_x"], meta["scale_z"])
    elif unit in ("µm", "um"):
        found = (meta["scale_y"] / 1000, meta["scale_x"] / 1000, meta["scale_z"] / 1000)
    else:
        found = _degree_spacing(meta, bscans[0].shape[1], len(bscans))
        source = E2E_SPACING_SOURCE
    kwargs: dict = {}
    _apply_spacing(kwargs, override, path, found, source)
    localizer = positions = loc_spacing = None
    if ev.localizer is not None and "bscan_meta" in meta:
        loc = ev.localizer
        localizer = _localizer_uint8(loc.data)
        lmeta = loc.meta
        lunit = str(lmeta.get("scale_unit", ""))
        sx, sy = float(lmeta["scale_x"]), float(lmeta["scale_y"])
        offset = 15.0 if lunit == "°" else 0.0  # eyepy: positions in degrees have their origin at the centre
        try:
            pos = np.array(
                [[b["start_pos"], b["end_pos"]] for b in meta["bscan_meta"]], dtype=np.float64
            )  # (N, 2, 2) x, y
            pos_unit = str(meta["bscan_meta"][0].get("pos_unit", "mm"))
            if pos_unit.lower() != "pixel":
                pos = (pos + offset) / np.array([sx, sy])
            positions = pos if pos.shape == (len(bscans), 2, 2) and np.isfinite(pos).all() else None
        except (KeyError, TypeError, ValueError):
            positions = None
        if lunit.lower() == "mm" and sx > 0 and sy > 0:
            loc_spacing = (sy, sx)
        elif lunit == "°" and sx > 0 and sy > 0:
            loc_spacing = (sy * MM_PER_DEGREE, sx * MM_PER_DEGREE)
    layers = {}
    for name, layer in getattr(ev, "layers", {}).items():
        heights = np.asarray(layer.data, dtype=np.float64)
        if heights.shape == (len(bscans), bscans[0].shape[1]) and np.isfinite(heights).any():
            layers[name] = heights
    exam = meta.get("visit_date") or meta.get("exam_time")
    return OctVolume(
        bscans=bscans,
        source=str(path),
        volume_id=volume_id,
        patient_id=patient_id,
        laterality=normalise_laterality(meta.get("laterality")),
        device=device,
        scan_date=_iso(exam),
        localizer=localizer,
        localizer_spacing=loc_spacing,
        bscan_positions=positions,
        layers=layers,
        **kwargs,
    )


def _localizer_uint8(image) -> np.ndarray | None:
    if image is None:
        return None
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(np.nan_to_num(image.astype(np.float64)))
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] > 3:
        image = image[..., :3]
    return np.ascontiguousarray(image)


def _bad_file(path: Path, what: str, err: BaseException, vendor: bool = True) -> OctSamError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if vendor:
        return OctSamError(
            f"cannot read {path} as {what}: the file is truncated, encrypted or not such an export ({detail}). "
            "Export it again from the device software, unencrypted."
        )
    return OctSamError(f"cannot read {path} as {what}: the file is truncated or not such a file ({detail}).")


def check_volume_size(path: Path, n: int, height: int, width: int, what: str = "") -> None:
    """Refuse (from a header, before reading data) a volume above ``MAX_VOLUME_VOXELS`` or a B-scan (or localiser)
    above ``MAX_SCAN_PIXELS``."""
    if n < 0 or height < 0 or width < 0 or n * height * width > MAX_VOLUME_VOXELS or height * width > MAX_SCAN_PIXELS:
        raise OctSamError(volume_too_large_message(f"{path}{what}", (n, height, width)))


def _check_vol_header(path: Path) -> None:
    """The HEYEX VOL header's sizes (little-endian uint32 after the 12-byte version: SizeX, NumBScans, SizeZ, ...,
    SizeXSlo, SizeYSlo), checked before eyepy parses the file."""
    import struct

    with open(path, "rb") as f:
        head = f.read(56)
    if len(head) < 56:
        return  # too short to be a VOL file: eyepy's parser names the problem
    size_x, n_bscans, size_y = struct.unpack_from("<3I", head, 12)
    slo_x, slo_y = struct.unpack_from("<2I", head, 48)
    try:
        check_volume_size(path, n_bscans, size_y, size_x)
        check_volume_size(path, 1, slo_y, slo_x, " (localiser)")
    except OctSamError as err:  # a hostile or damaged header: refused before eyepy allocates anything
        detail = f"its header declares {n_bscans} B-scans of {size_x} x {size_y} and a {slo_x} x {slo_y} localiser"
        raise _bad_file(path, "a Heidelberg HEYEX VOL file", ValueError(f"{detail}, above octsam's limits")) from err


def _read_vol(path: Path, override) -> list[OctVolume]:
    _import_eyepy(path)
    from eyepy.io.he.vol_reader import HeVolReader

    _check_vol_header(path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = HeVolReader(path)
            header = reader.parsed_file
            pattern = int(header.scan_pattern)
            if pattern in (1, 2, 5):
                raise OctSamError(
                    f"{path} holds a {'line' if pattern == 1 else 'circle' if pattern == 2 else 'radial'} scan "
                    f"(HEYEX scan pattern {pattern}), not a raster volume; export a volume scan."
                )
            ev = reader.volume
    except OctSamError:
        raise
    except Exception as err:  # noqa: BLE001 - construct raises many types for a damaged file
        raise _bad_file(path, "a Heidelberg HEYEX VOL file", err) from err
    patient = str(header.patient_id).strip("\x00 ")
    patient = None if patient in ("", "unknown") else patient
    return [_from_eyepy(ev, path, override, path.stem, "Heidelberg Spectralis (HEYEX VOL)", patient)]


def _read_e2e(path: Path, override) -> list[OctVolume]:
    _import_eyepy(path)
    from eyepy.io.he import HeE2eReader

    volumes, skipped = [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with HeE2eReader(path) as reader:
                for series in reader.series:
                    try:
                        ev = series.get_volume()
                    except Exception as err:  # noqa: BLE001 - e.g. circle or radial scans
                        skipped.append(f"series {series.id} ({str(err)[:80]})")
                        continue
                    patient = None
                    if series.patient is not None:
                        patient = str(getattr(series.patient, "id", "")) or None
                    name = _SERIES_TAIL.sub("_", f"{path.stem}_series{series.id}")
                    volumes.append((ev, name, patient))
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a Heidelberg E2E file", err) from err
    if skipped:
        logger.warning("%s: skipped %s (not raster volumes)", path, "; ".join(skipped))
    if not volumes:
        raise OctSamError(
            f"{path}: no series in this E2E file is an OCT raster volume"
            + (f" (skipped {'; '.join(skipped)})" if skipped else "")
            + "."
        )
    return [_from_eyepy(ev, path, override, name, "Heidelberg Spectralis (E2E)", pid) for ev, name, pid in volumes]


def _check_xml_references(path: Path) -> None:
    """Every image a HEYEX XML export names (``ExamURL``, read by eyepy as the part after the last backslash, joined
    onto the XML's folder) must lie inside that folder."""
    from xml.etree import ElementTree

    xml = path if path.is_file() else next(iter(sorted(path.glob("*.xml"))), None)
    if xml is None:
        return
    try:
        root = ElementTree.parse(xml).getroot()
    except (ElementTree.ParseError, OSError) as err:
        raise _bad_file(xml, "a Heidelberg HEYEX XML export", err) from err
    for element in root.iter("ExamURL"):
        name = (element.text or "").split("\\")[-1]
        if name:
            contained(name, xml.parent, xml)


def _read_xml(path: Path, override) -> list[OctVolume]:
    _import_eyepy(path)
    from eyepy.io.he import HeXmlReader

    _check_xml_references(path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = HeXmlReader(path).volume
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a Heidelberg HEYEX XML export", err) from err
    stem = path.stem if path.is_file() else path.name
    return [_from_eyepy(ev, path, override, stem, "Heidelberg Spectralis (HEYEX XML)")]


def _load_eye(path: Path):
    _import_eyepy(path)
    from eyepy import EyeVolume

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return EyeVolume.load(path)
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "an eyepy .eye file", err, vendor=False) from err


def _read_eye(path: Path, override) -> list[OctVolume]:
    ev = _load_eye(path)
    return [_from_eyepy(ev, path, override, path.stem, "eyepy .eye", None)]


def _import_oct_converter(path: Path, what: str):
    try:
        import oct_converter.readers as readers
    except ImportError as err:
        raise OctSamError(
            f"reading {what} file {path} needs oct-converter: pip install --no-deps -c constraints.txt "
            f"oct-converter h5py natsort ({err})"
        ) from err
    return readers


def _read_fda(path: Path, override) -> list[OctVolume]:
    _import_oct_converter(path, "Topcon .fda")
    _import_eyepy(path)
    from eyepy.io import import_topcon_fda

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = import_topcon_fda(path)
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a Topcon FDA file", err) from err
    return [_from_eyepy(ev, path, override, path.stem, "Topcon (FDA)")]


CIRRUS_LAYOUTS = ((512, 128), (200, 200))  # (A-scans per B-scan, B-scans) of Cirrus macular cubes, 1024 deep


def _read_img(path: Path, override) -> list[OctVolume]:
    readers = _import_oct_converter(path, "Zeiss .img")
    size = path.stat().st_size
    layout = next((cols for cols, n in CIRRUS_LAYOUTS if size == 1024 * cols * n), None)
    if layout is None:
        layout = next((cols for cols, _ in CIRRUS_LAYOUTS if size and size % (1024 * cols) == 0), None)
    if layout is None:
        raise OctSamError(
            f"{path} ({size} bytes) is not a Zeiss Cirrus .img cube: its size is no multiple of 1024 x 512 or "
            "1024 x 200 bytes (truncated or another format)."
        )
    if override is None:
        raise OctSamError(f"{path}: Zeiss .img files do not store the spacing; {SPACING_HELP}.")
    try:
        oct_volume = readers.IMG(path).read_oct_volume(rows=1024, cols=layout)
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a Zeiss Cirrus IMG file", err) from err
    data = np.stack([np.asarray(b) for b in oct_volume.volume])
    kwargs: dict = {}
    _apply_spacing(kwargs, override, path, None, "")
    meta = getattr(oct_volume, "metadata", {}) or {}
    return [
        OctVolume(
            bscans=_uint8_stack(data),
            source=str(path),
            volume_id=path.stem,
            patient_id=meta.get("patient_id"),
            laterality=normalise_laterality(meta.get("laterality")),
            device="Zeiss Cirrus (IMG)",
            scan_date=_iso(meta.get("acquisition_date")),
            **kwargs,
        )
    ]


# ----------------------------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path, override) -> list[OctVolume]:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as err:
        raise OctSamError(f"reading DICOM {path} needs pydicom: pip install -c constraints.txt pydicom") from err
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise OctSamError(f"{path} is not a DICOM file ({err}).") from err
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a DICOM file", err) from err
    sop = str(getattr(ds, "SOPClassUID", "") or "")
    if sop != OCT_SOP_CLASS:
        name = getattr(getattr(ds, "SOPClassUID", None), "name", "") or "unknown"
        modality = getattr(ds, "Modality", "?")
        raise OctSamError(
            f"{path} is a DICOM {name} (SOP class {sop or 'missing'}, modality {modality}), not an OCT volume: "
            f"octsam reads Ophthalmic Tomography Image Storage ({OCT_SOP_CLASS})."
        )
    try:
        declared = (int(getattr(ds, "NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        declared = None  # no image attributes: pydicom's pixel decoding names what is missing
    if declared is not None:
        check_volume_size(path, *declared)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - missing pixel data, unsupported compression, truncated frames
        raise OctSamError(
            f"cannot decode the pixel data of DICOM {path}: {str(err)[:200]}. If it is compressed (JPEG 2000 etc.), "
            "install a pydicom pixel handler (pylibjpeg or GDCM) or export it uncompressed."
        ) from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim == 4:  # colour frames: OCT should be monochrome, keep luminance
        pixels = pixels.mean(axis=-1)
    if pixels.shape[0] != frames:
        raise OctSamError(f"{path}: NumberOfFrames is {frames} but the pixel data holds {pixels.shape[0]} frames.")
    axial, lateral, bscan = _dicom_spacing(ds)
    kwargs: dict = {}
    _apply_spacing(kwargs, override, path, (axial, lateral, bscan), "file")
    laterality = normalise_laterality(getattr(ds, "ImageLaterality", None) or getattr(ds, "Laterality", None))
    device = " ".join(str(getattr(ds, k, "") or "") for k in ("Manufacturer", "ManufacturerModelName")).strip()
    date = (
        getattr(ds, "AcquisitionDateTime", None)
        or getattr(ds, "ContentDate", None)
        or getattr(ds, "StudyDate", None)
        or getattr(ds, "SeriesDate", None)
    )
    series = getattr(ds, "SeriesNumber", None)
    return [
        OctVolume(
            bscans=_uint8_stack(pixels),
            source=str(path),
            volume_id=path.stem if series in (None, "") else f"{path.stem}_series{series}",
            patient_id=str(getattr(ds, "PatientID", "") or "") or None,
            laterality=laterality,
            device=(device or "unknown") + " (DICOM OCT)",
            scan_date=_dicom_date(date),
            **kwargs,
        )
    ]


def _dicom_date(value) -> str | None:
    text = str(value or "")
    if len(text) >= 8 and text[:8].isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}"
    return text or None


def _dicom_spacing(ds) -> tuple[float | None, float | None, float | None]:
    """(axial, lateral, bscan) mm from the shared functional groups, else the first frame's, else the top level.

    ``PixelSpacing`` is (row spacing, column spacing) = (axial, lateral) for a B-scan frame; the distance between
    B-scans is ``SliceThickness`` (or ``SpacingBetweenSlices``) in the same Pixel Measures.
    """
    candidates = []
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = getattr(ds, seq_name, None)
        if seq:
            measures = getattr(seq[0], "PixelMeasuresSequence", None)
            if measures:
                candidates.append(measures[0])
    candidates.append(ds)
    axial = lateral = bscan = None
    for item in candidates:
        spacing = getattr(item, "PixelSpacing", None)
        if axial is None and spacing is not None and len(spacing) == 2:
            axial, lateral = float(spacing[0]), float(spacing[1])
        for key in ("SliceThickness", "SpacingBetweenSlices"):
            value = getattr(item, key, None)
            if bscan is None and value not in (None, ""):
                bscan = float(value)
    return axial, lateral, bscan


# ----------------------------------------------------------------------------------------------- Duke .mat


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as err:  # MATLAB v7.3 (HDF5)
        raise OctSamError(
            f"{path} is a MATLAB v7.3 (HDF5) file; save it as v7 (save(..., '-v7')) to read it here ({err})."
        ) from err
    except Exception as err:  # noqa: BLE001
        raise _bad_file(path, "a MATLAB .mat file", err, vendor=False) from err


def _duke_volume(path: Path, mat: dict, override) -> OctVolume:
    if "images" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise OctSamError(f"{path}: no 'images' array (H x W x N) as in the Duke data sets; variables: {keys}.")
    images = np.asarray(mat["images"])
    if images.ndim != 3:
        raise OctSamError(f"{path}: 'images' must be H x W x N (B-scans last), got shape {images.shape}.")
    data = np.moveaxis(images, -1, 0)
    kind = "dme" if any(k.startswith("manualFluid") for k in mat) else "amd" if "layerMaps" in mat else None
    found, source = DUKE_SPACING[kind] if kind is not None else (None, "")
    kwargs: dict = {}
    _apply_spacing(kwargs, override, path, found, source)
    return OctVolume(
        bscans=_uint8_stack(np.nan_to_num(data.astype(np.float64)) if data.dtype.kind == "f" else data),
        source=str(path),
        volume_id=path.stem,
        patient_id=path.stem,
        device="Heidelberg Spectralis (Duke .mat)" if kind == "dme" else "Duke .mat",
        layers=_duke_layers(mat, data.shape),
        **kwargs,
    )


def _duke_layers(mat: dict, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """ILM and BM height maps (N, W) from ``manualLayers1`` (8 x W x N, rows 0 = ILM, 7 = BM), where present."""
    layers = mat.get("manualLayers1")
    if layers is None or np.asarray(layers).ndim != 3:
        return {}
    layers = np.moveaxis(np.asarray(layers, dtype=np.float64), -1, 1)  # (8, N, W)
    if layers.shape[1:] != (shape[0], shape[2]):
        return {}
    return {"ILM": layers[0], "BM": layers[-1]}


def _read_mat(path: Path, override) -> list[OctVolume]:
    return [_duke_volume(path, _loadmat(path), override)]


def _duke_masks(path: Path, mat: dict, volume: OctVolume, grader: int) -> tuple[list[np.ndarray], list[bool]]:
    key = f"manualFluid{grader}"
    if key not in mat:
        keys = ", ".join(k for k in mat if k.startswith(("manual", "automatic"))) or "none"
        raise OctSamError(f"{path}: no {key!r} annotation (grader {grader}); annotation variables: {keys}.")
    fluid = np.moveaxis(np.asarray(mat[key], dtype=np.float64), -1, 0)
    n, h, w = volume.shape
    if fluid.shape != (n, h, w):
        raise OctSamError(f"{path}: {key} has shape {fluid.shape[::-1]} but images are {(h, w, n)} (H x W x N).")
    layers = mat.get(f"manualLayers{grader}")
    if layers is not None:
        layers = np.moveaxis(np.asarray(layers, dtype=np.float64), -1, 1)  # (L, N, W)
        if layers.shape[1:] != (n, w):
            layers = None
    masks, annotated = [], []
    for i in range(n):
        sl = fluid[i]
        finite = np.isfinite(sl)
        ok = bool(finite.any())
        if layers is not None:
            columns = np.isfinite(layers[:, i]).any(axis=0)  # A-scans the grader traced
            ok = ok and bool(columns.any())
        else:
            columns = np.ones(w, dtype=bool)
        mask = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        if ok:
            mask[:, columns] = 0
            mask[(np.nan_to_num(sl) > 0) & finite & columns[None, :]] = 1
        masks.append(mask)
        annotated.append(ok)
    return masks, annotated


# ----------------------------------------------------------------------------------------------- RETOUCH .mhd


MHD_HEADER_BYTES = 1 << 16  # a MetaImage header is a few hundred bytes; more is not a header
_MHD_TYPES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_FLOAT": 4, "MET_ULONG": 8, "MET_LONG": 8, "MET_DOUBLE": 8}  # fmt: skip


def mhd_header(path: Path) -> dict[str, str]:
    """The ``Key = Value`` lines of a MetaImage header (up to ``ElementDataFile``, which ends it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MHD_HEADER_BYTES + 1)
    except OSError as err:
        raise OctSamError(f"cannot read MetaImage header {path}: {err}") from err
    header: dict[str, str] = {}
    for line in raw.decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return header
    if len(raw) > MHD_HEADER_BYTES:
        raise OctSamError(f"{path}: no MetaImage header (no ElementDataFile in its first {MHD_HEADER_BYTES} bytes).")
    if "ElementDataFile" not in header:
        raise OctSamError(f"{path}: the MetaImage header has no ElementDataFile line; not a complete .mhd header.")
    return header


def mhd_data_file(path: Path) -> Path | None:
    """The data file a MetaImage header names, resolved (None for ``LOCAL``: the data follow the header). A file
    outside the header's folder (``..``, an absolute path, a link leading out), a file list or a file pattern is
    refused, and so is a size above octsam's limits (checked from the header, before any data are read)."""
    header = mhd_header(path)
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 for d in dims):
        raise OctSamError(
            f"{path}: the MetaImage header's DimSize {header.get('DimSize', '(missing)')!r} is not a size."
        )
    voxels = 1
    for d in dims:
        voxels *= d
    if voxels > MAX_VOLUME_VOXELS or dims[0] * (dims[1] if len(dims) > 1 else 1) > MAX_SCAN_PIXELS:
        raise OctSamError(volume_too_large_message(path, tuple(reversed(dims))))
    name = header["ElementDataFile"]
    if name.upper() == "LOCAL":
        return None
    if not name.upper().startswith("LIST"):
        data = contained(name, path.parent, path)  # also a pattern's path part: refused if it leads out
    if name.upper().startswith("LIST") or "%" in name or " " in name.strip():
        raise OctSamError(
            f"{path}: ElementDataFile {name!r} names several data files (a list or a pattern); octsam reads a "
            "MetaImage with one data file (.raw) beside its header."
        )
    compressed = header.get("CompressedData", "False").strip().lower() == "true"
    channels = header.get("ElementNumberOfChannels", "1")
    channels = int(channels) if channels.isdigit() else 1
    item = _MHD_TYPES.get(header.get("ElementType", ""), 1)
    if data.is_file() and not compressed and data.stat().st_size < voxels * item * channels:
        raise OctSamError(
            f"{path}: its data file {data.name} holds {data.stat().st_size} bytes, fewer than the "
            f"{voxels * item * channels} the header declares (DimSize {header['DimSize']}); the file is truncated."
        )
    return data


def _sitk_read(path: Path):
    mhd_data_file(path)
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise OctSamError(f"reading {path} needs SimpleITK: pip install -c constraints.txt SimpleITK") from err
    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("MetaImageIO")  # the checked header decides, not content sniffing (NRRD names files too)
        reader.SetFileName(str(path))
        image = reader.Execute()
        return image, sitk.GetArrayFromImage(image)
    except Exception as err:  # noqa: BLE001 - missing .raw, short .raw, bad header
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = next(
            (line for line in reversed(lines) if "ERROR" in line or "rror" in line), lines[-1] if lines else ""
        )
        detail = detail.split("ERROR:", 1)[-1].strip()
        raise OctSamError(
            f"cannot read MetaImage {path}: {detail[:200]}. Check that the .mhd header and its .raw data file are both "
            "there and complete."
        ) from err


def _mhd_paths(path: Path) -> tuple[Path, Path | None, str]:
    """(image .mhd, reference .mhd or None, case name) for an .mhd file or a RETOUCH case folder."""
    if path.is_dir():
        image = path / "oct.mhd"
        ref = path / "reference.mhd"
        return image, ref if ref.is_file() else None, path.name
    ref = path.with_name("reference.mhd") if path.name == "oct.mhd" else None
    name = path.parent.name if path.name == "oct.mhd" else path.stem
    return path, ref if ref is not None and ref.is_file() else None, name


def _read_mhd(path: Path, override) -> list[OctVolume]:
    image_path, _, name = _mhd_paths(path)
    image, array = _sitk_read(image_path)
    if array.ndim != 3:
        raise OctSamError(f"{image_path}: expected a 3-D OCT volume, got an image of shape {array.shape}.")
    sx, sy, sz = (float(v) for v in image.GetSpacing())  # x = lateral, y = axial, z = B-scans
    found = (sy, sx, sz) if not all(v == 1.0 for v in (sx, sy, sz)) else None  # 1,1,1 = ITK default: unknown
    kwargs: dict = {}
    _apply_spacing(kwargs, override, image_path, found, "file")
    vendor = next((v for v in ("Cirrus", "Spectralis", "Topcon") if v.lower() in str(image_path).lower()), None)
    return [
        OctVolume(
            bscans=_uint8_stack(array),
            source=str(image_path),
            volume_id=name,
            patient_id=name,
            device=f"{vendor} (RETOUCH .mhd)" if vendor else "MetaImage .mhd",
            **kwargs,
        )
    ]


# ----------------------------------------------------------------------------------------------- folder


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _read_folder(path: Path, override) -> list[OctVolume]:
    files = sorted(
        (
            check_link(p, path)
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise OctSamError(f"no B-scan images in {path} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    if override is None:
        raise OctSamError(f"{path}: a folder of B-scan images does not say its spacing; {SPACING_HELP}.")
    bscans = []
    for f in files:
        array = read_scan(f)
        if array.ndim == 3:
            array = np.rint(array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        bscans.append(array)
    shapes = {}
    for f, b in zip(files, bscans):
        shapes.setdefault(b.shape, []).append(f.name)
    if len(shapes) > 1:
        listing = "; ".join(
            f"{w}x{h}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for (h, w), names in shapes.items()
        )
        raise OctSamError(f"{path}: the B-scans of one volume must have one size (width x height), found {listing}.")
    kwargs: dict = {}
    _apply_spacing(kwargs, override, path, None, "")
    return [OctVolume(bscans=bscans, source=str(path), volume_id=path.name, device="image folder", **kwargs)]


_READERS = {
    "vol": _read_vol,
    "e2e": _read_e2e,
    "xml": _read_xml,
    "eye": _read_eye,
    "fda": _read_fda,
    "img": _read_img,
    "dicom": _read_dicom,
    "mat": _read_mat,
    "mhd": _read_mhd,
    "retouch": _read_mhd,
    "folder": _read_folder,
}


# ----------------------------------------------------------------------------------------------- annotated


def read_annotated_volume(path: str | os.PathLike, spacing=None, grader: int = 1) -> AnnotatedVolume:
    """A volume and its reference masks, for dataset building and per-volume evaluation.

    - Duke ``.mat``: fluid from ``manualFluid{grader}`` (1 or 2; instance ids -> class 1 ``fluid``). B-scans without
      that grader's annotation (NaN) are all-ignore (255) and ``annotated`` False; within annotated B-scans, A-scans
      outside the grader's traced layers are ignore too. Layers are not offered as classes.
    - RETOUCH case folder (``oct.mhd`` + ``reference.mhd``) or ``oct.mhd``: labels IRF = 1, SRF = 2, PED = 3.
    - eyepy ``.eye`` (and any eyepy volume with pixel annotations): one class per annotation, in name order; where
      annotations overlap the later name wins.
    """
    path = Path(path).expanduser()
    override = parse_spacing(spacing)
    if not path.exists():
        raise OctSamError(f"annotated volume not found: {path}")
    kind = volume_kind(path)
    if kind == "mat":
        if grader not in (1, 2):
            raise OctSamError(f"--grader must be 1 or 2, got {grader}.")
        mat = _loadmat(path)
        volume = _duke_volume(path, mat, override)
        masks, annotated = _duke_masks(path, mat, volume, grader)
        return AnnotatedVolume(volume, masks, list(DUKE_LABELS), annotated)
    if kind in ("mhd", "retouch"):
        (volume,) = _read_mhd(path, override)
        _, ref_path, _ = _mhd_paths(path)
        if ref_path is None:
            raise OctSamError(f"{path}: no reference.mhd beside oct.mhd (RETOUCH labels); nothing to build from.")
        _, ref = _sitk_read(ref_path)
        if ref.shape != volume.shape:
            raise OctSamError(f"{ref_path}: labels have shape {ref.shape}, the volume {volume.shape} (N, H, W).")
        bad = np.setdiff1d(np.unique(ref), np.arange(len(RETOUCH_LABELS)))
        if bad.size:
            raise OctSamError(f"{ref_path}: label values {bad[:10].tolist()} are not RETOUCH's 0-3 (IRF, SRF, PED).")
        masks = [np.ascontiguousarray(m.astype(np.uint8)) for m in ref]
        return AnnotatedVolume(volume, masks, list(RETOUCH_LABELS), [True] * volume.n_bscans)
    if kind in ("eye", "vol", "e2e", "xml", "fda"):
        if kind == "eye":
            ev = _load_eye(path)
            volume = _from_eyepy(ev, path, override, path.stem, "eyepy .eye")
        else:
            raise OctSamError(
                f"{path}: {kind.upper()} exports carry layer lines, not area annotations; annotate the volume in "
                "eyepy/eyelab and save it as .eye, or use a Duke .mat / RETOUCH source."
            )
        maps = {name: np.asarray(m.data, dtype=bool) for name, m in sorted(ev.volume_maps.items())}
        if not maps:
            raise OctSamError(f"{path}: the volume has no area (pixel) annotations to build masks from.")
        labels = ["background", *maps]
        masks = np.zeros(volume.shape, dtype=np.uint8)
        for k, (name, m) in enumerate(maps.items(), start=1):
            if m.shape != volume.shape:
                raise OctSamError(f"{path}: annotation {name!r} has shape {m.shape}, the volume {volume.shape}.")
            masks[m] = k
        return AnnotatedVolume(volume, list(masks), labels, [True] * volume.n_bscans)
    raise OctSamError(
        f"{path}: no annotations can be read from a {kind} input; annotated sources are Duke .mat, RETOUCH "
        "(oct.mhd + reference.mhd) and eyepy .eye files."
    )
