"""OCT volumes: every reader on files written by the formats' own libraries, every bad input, the measures on
masks with known answers, the eye report and outputs, and the dataset_builder volume sources end to end."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path

import numpy as np
import pytest

from octsam.errors import OctSamError
from octsam.volumes import measure
from octsam.volumes.readers import OCT_SOP_CLASS, read_annotated_volume, read_volume
from octsam.volumes.segment import result_from_masks, segment_volume, write_volume_outputs
from octsam.volumes.volume import OctVolume, parse_spacing

# ----------------------------------------------------------------------------------------------- writers


@pytest.fixture
def vol_writer(monkeypatch):
    """Write a HEYEX VOL file with eyepy's own VOL format definition (``vol_format.build``).

    eyepy 0.21.0's ``HeVolWriter`` cannot write a file: it passes datetimes where its date adapters expect ISO
    strings, writes ``num_seg = len(bscan.layers)`` (0: the dict is lazy) but always 17 layer rows, and its 64-bit
    exam-time adapter returns a float. We build the same struct it would, with ISO dates, 17 layers, and the exam
    time adapter patched to round to an integer.
    """
    from eyepy.core.utils import to_vol_intensity
    from eyepy.io import utils as eu
    from eyepy.io.he.vol_reader import vol_format

    original = type(eu.IntDate)._encode
    monkeypatch.setattr(
        type(eu.IntDate), "_encode", lambda self, obj, ctx, path: int(round(original(self, obj, ctx, path)))
    )

    def write(path: Path, data: np.ndarray, *, pattern=3, ilm=None, bm=None, scale=(0.0039, 0.012, 0.1)) -> Path:
        n, h, w = data.shape
        when = datetime.datetime(2024, 5, 6, 10, 30).isoformat()
        rng = np.random.default_rng(3)
        layers = np.full((17, w), 3.0e38, np.float32)
        bscans = []
        for i in range(n):
            seg = layers.copy()
            if ilm is not None:
                seg[0], seg[1] = ilm[i], bm[i]
            bscans.append(
                dict(
                    bscan_hdr_size=256 + 17 * 4 * w,
                    start_x=0.5,
                    start_y=1.0 + scale[2] * i,
                    end_x=0.5 + scale[1] * (w - 1),
                    end_y=1.0 + scale[2] * i,
                    num_seg=17,
                    quality=20.0,
                    shift=0,
                    iv_transformation=[0] * 6,
                    layer_segmentations=seg,
                    data=to_vol_intensity(data[i]),
                )
            )
        raw = vol_format.build(
            dict(
                size_x=w, size_y=h, n_bscans=n, scale_x=scale[1], scale_y=scale[0], distance=scale[2],
                size_x_slo=64, size_y_slo=64, scale_x_slo=0.03, scale_y_slo=0.03, field_size_slo=30, scan_focus=0.0,
                scan_position="OD", exam_time=when, scan_pattern=pattern, id="1234", reference_id="", pid=7,
                patient_id="P007", dob="1950-01-01T00:00:00", vid=0, visit_id="V1", visit_date=when, grid_type=0,
                grid_offset=0, grid_type1=0, grid_offset1=0, prog_id="",
                localizer=rng.integers(0, 255, (64, 64)).astype(np.uint8), bscans=bscans,
            )
        )  # fmt: skip
        path.write_bytes(raw)
        return path

    return write


def write_oct_dicom(path: Path, frames: np.ndarray, *, sop=OCT_SOP_CLASS, spacing="shared", preamble=True) -> Path:
    """A multi-frame Ophthalmic Tomography DICOM with pydicom (spacing in shared / per-frame groups or none)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OPT" if sop == OCT_SOP_CLASS else "CT"
    ds.PatientID, ds.SeriesNumber = "PAT42", 3
    ds.Manufacturer, ds.ManufacturerModelName = "Acme", "OCT-1"
    ds.ImageLaterality = "L"
    ds.AcquisitionDateTime = "20230102101500"
    n, h, w = frames.shape
    ds.NumberOfFrames, ds.Rows, ds.Columns = n, h, w
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.astype(np.uint8).tobytes()

    def measures():
        item = Dataset()
        item.PixelSpacing = [0.0039, 0.0117]
        item.SliceThickness = 0.047
        group = Dataset()
        group.PixelMeasuresSequence = Sequence([item])
        return group

    if spacing == "shared":
        ds.SharedFunctionalGroupsSequence = Sequence([measures()])
    elif spacing == "per-frame":
        ds.PerFrameFunctionalGroupsSequence = Sequence([measures() for _ in range(n)])
    ds.save_as(path, enforce_file_format=True) if preamble else ds.save_as(path)
    return path


def write_duke_mat(path: Path, n=6, h=40, w=50, annotated=(1, 3), with_layers=True) -> tuple[Path, dict]:
    """A .mat with the Duke DME layout: images H x W x N, manualFluid1/2 H x W x N (NaN where not annotated,
    instance ids > 0 for fluid), manualLayers1/2 8 x W x N (NaN outside the traced A-scans)."""
    import scipy.io

    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (h, w, n)).astype(np.uint8)
    fluid1 = np.full((h, w, n), np.nan)
    fluid2 = np.full((h, w, n), np.nan)
    layers = np.full((8, w, n), np.nan)
    for i in annotated:
        fluid1[..., i] = 0
        fluid1[10:15, 20:30, i] = 1  # instance 1
        fluid1[20:22, 5:8, i] = 2  # instance 2, partly outside the traced A-scans (columns >= 6)
        fluid2[..., i] = 0
        fluid2[10:12, 20:25, i] = 5
        layers[:, 6 : w - 4, i] = np.linspace(5, 35, 8)[:, None]
    data = {"images": images, "manualFluid1": fluid1, "manualFluid2": fluid2}
    if with_layers:
        data.update(manualLayers1=layers, manualLayers2=layers)
    scipy.io.savemat(path, data)
    return path, data


def write_retouch_case(folder: Path, n=4, h=30, w=40, spacing=(0.0117, 0.0039, 0.047), labels=True) -> Path:
    """A RETOUCH case folder with SimpleITK: oct.mhd/.raw (uint16) and reference.mhd/.raw (0..3)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.integers(0, 4000, (n, h, w)).astype(np.uint16))
    image.SetSpacing(spacing)  # x = lateral, y = axial, z = B-scans
    sitk.WriteImage(image, str(folder / "oct.mhd"))
    if labels:
        ref = np.zeros((n, h, w), np.uint8)
        ref[1, 5:10, 5:10] = 1
        ref[2, 12:14, 20:30] = 2
        ref[3, 20:25, 10:12] = 3
        ref_image = sitk.GetImageFromArray(ref)
        ref_image.SetSpacing(spacing)
        sitk.WriteImage(ref_image, str(folder / "reference.mhd"))
    return folder


def volume(n=5, h=20, w=30, spacing=(0.01, 0.02, 0.1), **kwargs) -> OctVolume:
    return OctVolume(
        bscans=[np.zeros((h, w), np.uint8) for _ in range(n)],
        pixel_spacing=spacing[:2],
        bscan_spacing=spacing[2],
        source="synthetic.vol",
        volume_id="v1",
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------- readers


def test_heyex_vol_round_trip(tmp_path, vol_writer):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (5, 32, 24)).astype(np.uint8)
    ilm = np.full((5, 24), 5.0)
    bm = np.full((5, 24), 25.0)
    bm[2, 12] = 15.0  # thinnest retina at B-scan 2, A-scan 12
    path = vol_writer(tmp_path / "eye.vol", data, ilm=ilm, bm=bm)
    (vol,) = read_volume(path)
    assert np.array_equal(vol.array(), data)
    assert vol.spacing == pytest.approx((0.0039, 0.012, 0.1))
    assert (vol.laterality, vol.patient_id, vol.spacing_source) == ("OD", "P007", "file")
    assert vol.scan_date.startswith("2024-05-06")
    assert vol.localizer.shape == (64, 64) and vol.localizer_spacing == pytest.approx((0.03, 0.03))
    assert vol.bscan_positions[0, 0] == pytest.approx((0.5 / 0.03, 1.0 / 0.03))
    assert set(vol.layers) >= {"ILM", "BM"}
    fovea, method = measure.find_fovea(vol)
    assert "thinnest" in method and fovea[0] in (1.0, 2.0, 3.0)
    # the spacing argument overrides the header
    (vol2,) = read_volume(path, spacing="0.004,0.01,0.2")
    assert vol2.spacing == (0.004, 0.01, 0.2) and vol2.spacing_source == "--spacing"


def test_vol_truncated_garbage_and_radial(tmp_path, vol_writer):
    data = np.zeros((3, 16, 12), np.uint8)
    path = vol_writer(tmp_path / "eye.vol", data)
    truncated = tmp_path / "truncated.vol"
    truncated.write_bytes(path.read_bytes()[:3000])
    garbage = tmp_path / "garbage.vol"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    for bad in (truncated, garbage):
        with pytest.raises(OctSamError, match=str(bad.name)) as err:
            read_volume(bad)
        assert "truncated, encrypted" in str(err.value)  # a vendor file: advice to re-export
    radial = vol_writer(tmp_path / "radial.vol", data, pattern=5)
    with pytest.raises(OctSamError, match="radial scan"):
        read_volume(radial)


@pytest.mark.parametrize("suffix", [".e2e", ".fda", ".dcm", ".mat", ".eye"])
def test_garbage_vendor_files_name_the_file(tmp_path, suffix):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(OctSamError, match=f"scan{suffix}"):
        read_volume(path)


def test_e2e_with_several_series_returns_all_named_by_series(tmp_path, monkeypatch):
    """No E2E writer exists: eyepy's reader is replaced by one with two raster series and a circle scan, to check that
    octsam takes every volume, names it by series and skips what is not a volume."""
    from eyepy import EyeVolume
    from eyepy.io import he

    def series(i, fail=False, degrees=False):
        def get_volume():
            if fail:
                raise ValueError("scan pattern 2 (circle)")
            ev = EyeVolume(np.full((3, 10, 12), 0.5, np.float32))
            if degrees:  # as eyepy's E2E reader: meta in pixels, B-scan positions in degrees, axial scale_y in mm
                for k, b in enumerate(ev.meta["bscan_meta"]):
                    b.update(start_pos=(-10.0, -5.0 + k), end_pos=(10.0, -5.0 + k), pos_unit="°", scale_y=0.0039)
                    b["imgSizeWidth"] = 12
            return ev

        return types.SimpleNamespace(id=i, patient=types.SimpleNamespace(id=9), get_volume=get_volume)

    class FakeReader:
        def __init__(self, path):
            self.series = [series(4), series(5, fail=True), series(7)]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(he, "HeE2eReader", FakeReader)
    path = tmp_path / "visit.e2e"
    path.write_bytes(b"x")
    # eyepy's default meta is in pixels: no spacing -> asks for it
    with pytest.raises(OctSamError, match="--spacing AXIAL,LATERAL,BSCAN"):
        read_volume(path)
    vols = read_volume(path, spacing=(0.004, 0.011, 0.12))
    assert [v.volume_id for v in vols] == ["visit_series4", "visit_series7"]
    assert all(v.shape == (3, 10, 12) and v.patient_id == "9" for v in vols)
    monkeypatch.setattr(FakeReader, "__init__", lambda self, path: setattr(self, "series", [series(2, degrees=True)]))
    (vol,) = read_volume(path)  # spacing from the angles, flagged as approximate
    assert vol.spacing == pytest.approx((0.0039, 20 / 12 * 0.2896, 0.2896)) and "289.6" in vol.spacing_source


@pytest.mark.parametrize("where", ["shared", "per-frame"])
def test_dicom_oct_multiframe(tmp_path, where):
    frames = np.random.default_rng(2).integers(0, 255, (4, 24, 32)).astype(np.uint8)
    path = write_oct_dicom(tmp_path / "oct.dcm", frames, spacing=where)
    (vol,) = read_volume(path)
    assert np.array_equal(vol.array(), frames)
    assert vol.spacing == pytest.approx((0.0039, 0.0117, 0.047))
    assert (vol.laterality, vol.patient_id, vol.scan_date) == ("OS", "PAT42", "2023-01-02")
    assert vol.device == "Acme OCT-1 (DICOM OCT)" and vol.volume_id == "oct_series3"
    # no suffix: found by the DICOM preamble
    plain = tmp_path / "IM000001"
    plain.write_bytes(path.read_bytes())
    assert read_volume(plain)[0].shape == (4, 24, 32)


def test_dicom_not_oct_and_without_spacing(tmp_path):
    frames = np.zeros((2, 8, 8), np.uint8)
    ct = write_oct_dicom(tmp_path / "ct.dcm", frames, sop="1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(OctSamError, match=r"ct\.dcm is a DICOM CT Image Storage .*not an OCT volume"):
        read_volume(ct)
    bare = write_oct_dicom(tmp_path / "bare.dcm", frames, spacing=None)
    with pytest.raises(OctSamError, match=r"bare\.dcm does not say .*--spacing AXIAL,LATERAL,BSCAN"):
        read_volume(bare)
    assert read_volume(bare, spacing="0.004,0.012,0.05")[0].spacing == (0.004, 0.012, 0.05)
    truncated = tmp_path / "truncated.dcm"
    good = write_oct_dicom(tmp_path / "good.dcm", np.ones((3, 16, 16), np.uint8))
    truncated.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(OctSamError, match=r"truncated\.dcm"):
        read_volume(truncated)


def test_duke_mat_volume_and_annotations(tmp_path):
    path, data = write_duke_mat(tmp_path / "Subject_03.mat")
    (vol,) = read_volume(path)
    assert vol.shape == (6, 40, 50) and np.array_equal(vol.array(), np.moveaxis(data["images"], -1, 0))
    assert vol.spacing == pytest.approx((0.00387, 0.01133, 0.123)) and "Chiu" in vol.spacing_source
    av = read_annotated_volume(path)
    assert av.labels == ["background", "fluid"] and av.annotated == [False, True, False, True, False, False]
    m = av.masks[1]
    assert (av.masks[0] == 255).all()  # not annotated: ignore
    assert (m[:, :6] == 255).all() and (m[:, -4:] == 255).all()  # outside the traced A-scans: ignore
    assert (m[10:15, 20:30] == 1).all() and (m[20:22, 6:8] == 1).all() and m[20, 5] == 255
    assert int((m == 1).sum()) == 50 + 4
    assert int((read_annotated_volume(path, grader=2).masks[1] == 1).sum()) == 10
    bad = tmp_path / "other.mat"
    import scipy.io

    scipy.io.savemat(bad, {"vol": np.zeros((3, 3, 3))})
    with pytest.raises(OctSamError, match=r"other\.mat: no 'images'"):
        read_volume(bad)
    with pytest.raises(OctSamError, match="manualFluid1"):
        scipy.io.savemat(bad, {"images": np.zeros((3, 3, 3), np.uint8)})
        read_annotated_volume(bad, spacing="0.1,0.1,0.1")
    with pytest.raises(OctSamError, match="--spacing"):  # images only: no known data set spacing
        read_volume(bad)


def test_retouch_mhd(tmp_path):
    case = write_retouch_case(tmp_path / "Spectralis" / "TRAIN001")
    (vol,) = read_volume(case)
    assert vol.shape == (4, 30, 40) and vol.spacing == pytest.approx((0.0039, 0.0117, 0.047))
    assert vol.device.startswith("Spectralis") and vol.volume_id == "TRAIN001"
    assert read_volume(case / "oct.mhd")[0].shape == (4, 30, 40)
    av = read_annotated_volume(case)
    assert av.labels == ["background", "IRF", "SRF", "PED"]
    assert [int((m == k).sum()) for k, m in zip((1, 2, 3), av.masks[1:])] == [25, 20, 10]
    (case / "oct.raw").write_bytes((case / "oct.raw").read_bytes()[:1000])
    with pytest.raises(OctSamError, match=r"oct\.mhd"):
        read_volume(case)
    (case / "oct.raw").unlink()
    with pytest.raises(OctSamError, match=r"oct\.mhd"):
        read_volume(case)


def test_folder_of_bscans(tmp_path):
    from PIL import Image

    folder = tmp_path / "scan"
    folder.mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        Image.fromarray(np.full((20, 30), i, np.uint8)).save(folder / f"b{i}.png")
    with pytest.raises(OctSamError, match="--spacing AXIAL,LATERAL,BSCAN"):
        read_volume(folder)
    (vol,) = read_volume(folder, spacing="0.0039,0.0114,0.24")
    assert [int(b[0, 0]) for b in vol.bscans] == [1, 2, 10] and vol.spacing_source == "--spacing"
    Image.fromarray(np.zeros((22, 30), np.uint8)).save(folder / "b11.png")
    with pytest.raises(OctSamError, match=r"one size .*30x22: b11\.png"):
        read_volume(folder, spacing="0.0039,0.0114,0.24")


def test_zeiss_img_needs_spacing_and_whole_cube(tmp_path):
    pytest.importorskip("oct_converter")
    path = tmp_path / "P123_Macular Cube 200x200_1-2-2020_10-10-10_OD_sn1_cube_z.img"
    path.write_bytes(np.arange(1024 * 200 * 3, dtype=np.uint64).astype(np.uint8).tobytes())
    with pytest.raises(OctSamError, match="do not store the spacing"):
        read_volume(path)
    (vol,) = read_volume(path, spacing="0.00195,0.03,0.03")
    assert vol.shape == (3, 1024, 200) and vol.laterality == "OD" and vol.patient_id == "P123"
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 1000)
    with pytest.raises(OctSamError, match=r"short\.img .*not a Zeiss Cirrus"):
        read_volume(short)


def test_eyepy_eye_with_area_annotations(tmp_path):
    from eyepy import EyeBscanMeta, EyeVolume, EyeVolumeMeta

    n, h, w = 3, 16, 20
    meta = EyeVolumeMeta(
        scale_x=0.012,
        scale_y=0.004,
        scale_z=0.1,
        scale_unit="mm",
        bscan_meta=[
            EyeBscanMeta(start_pos=(0, 0.1 * i), end_pos=(0.012 * (w - 1), 0.1 * i), pos_unit="mm") for i in range(n)
        ],
    )
    ev = EyeVolume(np.random.default_rng(0).integers(0, 255, (n, h, w)).astype(np.uint8), meta=meta)
    irf = np.zeros((n, h, w), bool)
    irf[1, 2:5, 3:9] = True
    ev.add_pixel_annotation(irf, name="IRF")
    path = tmp_path / "annotated.eye"
    ev.save(path)
    av = read_annotated_volume(path)
    assert av.labels == ["background", "IRF"] and int((av.masks[1] == 1).sum()) == 18
    assert av.volume.spacing == pytest.approx((0.004, 0.012, 0.1))


def test_volume_validation_and_spacing_parsing():
    with pytest.raises(OctSamError, match=r"synthetic\.vol: B-scans of one volume must all have one size"):
        OctVolume([np.zeros((4, 5), np.uint8), np.zeros((4, 6), np.uint8)], (0.1, 0.1), 0.1, "synthetic.vol", "v")
    with pytest.raises(OctSamError, match=r"synthetic\.vol: spacing must be positive"):
        volume(spacing=(0.01, 0.0, 0.1))
    with pytest.raises(OctSamError, match="three positive numbers"):
        parse_spacing("0.1,0.2")


def test_single_image_and_unknown_suffix(tmp_path):
    from PIL import Image

    png = tmp_path / "one.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    with pytest.raises(OctSamError, match=r"one\.png is a single image"):
        read_volume(png)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(OctSamError, match=r"notes\.txt: unknown volume format"):
        read_volume(other)
    with pytest.raises(OctSamError, match="volume not found"):
        read_volume(tmp_path / "missing.vol")


# ----------------------------------------------------------------------------------------------- measures


def test_box_volume_lesions_and_enface():
    vol = volume(n=5, h=20, w=30, spacing=(0.01, 0.02, 0.1))
    masks = np.zeros(vol.shape, np.uint8)
    masks[1:4, 5:9, 10:20] = 1  # 3 B-scans x 4 rows x 10 columns
    masks[0, 0:2, 0:2] = 2  # lesion A of class 2 on B-scan 0 ...
    masks[1, 1:3, 1:3] = 2  # ... continued on B-scan 1 (overlapping): one lesion
    masks[4, 15:17, 25:28] = 2  # a separate lesion
    masks[2, 0, 0] = 255  # ignore counts for nothing
    labels = ["background", "fluid", "ped"]
    v = measure.biomarker_volumes(masks, vol.pixel_spacing, vol.bscan_spacing, labels)
    assert v["fluid"] == pytest.approx(3 * 4 * 10 * 0.01 * 0.02 * 0.1)  # 0.0024 mm³
    assert v["ped"] == pytest.approx((4 + 4 + 6) * 0.01 * 0.02 * 0.1)
    assert measure.count_lesions(masks, labels) == {"fluid": 1, "ped": 2}
    enface = measure.enface_thickness(masks, 0.01, labels)
    assert enface["fluid"].shape == (5, 30) and enface["fluid"][2, 15] == pytest.approx(0.04)
    assert enface["fluid"][0].sum() == 0
    m = measure.measure_volume(list(masks), vol, labels)
    assert sum(m.etdrs_mm3["fluid"].values()) == pytest.approx(v["fluid"])  # the whole box lies within 6 mm
    assert "volume centre" in m.fovea_method and m.fovea == (2.0, 14.5)


def test_lesions_on_non_neighbouring_bscans_are_separate():
    masks = np.zeros((3, 10, 10), np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[2, 2:4, 2:4] = 1
    assert measure.count_lesions(masks, ["background", "x"]) == {"x": 2}
    masks[1, 4, 4] = 1  # touches both diagonally: 26-connectivity joins them
    assert measure.count_lesions(masks, ["background", "x"]) == {"x": 1}


def test_etdrs_centre_and_laterality():
    # 61 B-scans 0.1 mm apart, 61 A-scans 0.1 mm apart: a 6 x 6 mm square grid with the centre at (30, 30)
    vol = volume(n=61, h=10, w=61, spacing=(0.01, 0.1, 0.1), laterality="OD")
    masks = np.zeros(vol.shape, np.uint8)
    masks[30, 0:5, 30] = 1  # 0.05 mm thick at the centre
    masks[30, 0:2, 40] = 1  # 1 mm to the right of the centre: inner ring, nasal for OD
    m = measure.measure_volume(list(masks), vol, ["background", "fluid"])
    cell = 0.1 * 0.1
    assert m.etdrs_mm3["fluid"]["centre"] == pytest.approx(0.05 * cell)
    assert m.etdrs_mm3["fluid"]["inner_nasal"] == pytest.approx(0.02 * cell)
    assert m.etdrs_coverage["centre"] == pytest.approx(1.0, abs=0.15)  # lattice points in a 0.5 mm disc
    os_vol = volume(n=61, h=10, w=61, spacing=(0.01, 0.1, 0.1), laterality="OS")
    m_os = measure.measure_volume(list(masks), os_vol, ["background", "fluid"])
    assert m_os.etdrs_mm3["fluid"]["inner_temporal"] == pytest.approx(0.02 * cell)


def test_enface_on_localizer_and_agreement():
    n, w = 4, 10
    enface = np.arange(n * w, dtype=float).reshape(n, w)
    positions = np.array([[[10, 20 + 2 * i], [19, 20 + 2 * i]] for i in range(n)], float)  # 1 px per A-scan
    grid = measure.enface_to_localizer(enface, positions, (40, 40))
    assert grid[20, 10] == 0 and grid[26, 19] == enface[3, 9] and np.isnan(grid[0, 0])
    agree = measure.volume_agreement(
        [{"fluid": 1.0}, {"fluid": 2.1}, {"fluid": 2.9}],
        [{"fluid": 1.0}, {"fluid": 2.0}, {"fluid": 3.0}],
        ["background", "fluid"],
    )
    assert agree["fluid"]["n"] == 3 and agree["fluid"]["mean_abs_error_mm3"] == pytest.approx(0.2 / 3)
    assert agree["fluid"]["pearson_r"] > 0.99
    assert measure.volume_errors({"fluid": 1.5}, {"fluid": 1.0}) == {"fluid": 0.5}
    assert np.isnan(measure.pearson([1.0], [2.0]))


# ----------------------------------------------------------------------------------------------- outputs


class ThresholdSegmenter:
    """Stands in for ``octsam.segmenter.Segmenter``: called on a list of uint8 arrays, returns objects with .mask."""

    labels = ["background", "fluid"]

    def __call__(self, arrays):
        return [types.SimpleNamespace(mask=(a > 200).astype(np.uint8)) for a in arrays]


def test_segment_volume_writes_masks_report_and_csv(tmp_path, vol_writer):
    data = np.full((5, 32, 24), 50, np.uint8)
    data[1:3, 10:14, 8:16] = 250
    ilm, bm = np.full((5, 24), 5.0), np.full((5, 24), 25.0)
    (vol,) = read_volume(vol_writer(tmp_path / "eye.vol", data, ilm=ilm, bm=bm))
    result = segment_volume(ThresholdSegmenter(), vol)
    assert result.measures.volume_mm3["fluid"] == pytest.approx(2 * 4 * 8 * 0.0039 * 0.012 * 0.1)
    assert result.measures.lesions == {"fluid": 1}
    assert result.measures.enface_localizer is not None
    out = tmp_path / "out"
    folder = write_volume_outputs(result, out)
    assert sorted(p.name for p in (folder / "masks").iterdir())[:2] == ["bscan_000.png", "bscan_001.png"]
    assert (folder / "report.png").stat().st_size > 10_000 and (folder / "enface" / "fluid.npy").is_file()
    report = json.loads((folder / "report.json").read_text())
    assert report["laterality"] == "OD" and report["volume_mm3"]["fluid"] == pytest.approx(0.00029952, abs=1e-6)
    # a second volume adds a row; a failure leaves neither a folder nor a row behind
    result.volume.volume_id = "second"
    write_volume_outputs(result, out)
    rows = (out / "volumes.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("volume_id,patient_id") and "fluid_mm3" in rows[0]
    write_volume_outputs(result, out)  # the same volume again replaces its row
    assert (out / "volumes.csv").read_text().splitlines() == rows
    result.volume.volume_id = "third"
    import octsam.volumes.segment as seg

    def broken(*args, **kwargs):
        raise OctSamError("disk full")

    orig = seg.write_report
    seg.write_report = broken
    try:
        with pytest.raises(OctSamError, match="disk full"):
            write_volume_outputs(result, out)
    finally:
        seg.write_report = orig
    assert sorted(p.name for p in out.iterdir()) == ["eye", "second", "volumes.csv"]
    assert len((out / "volumes.csv").read_text().splitlines()) == 3
    # reference masks go through the same measures (per-volume evaluation)
    truth = result_from_masks(vol, result.masks, ["background", "fluid"])
    assert measure.volume_errors(result.measures.volume_mm3, truth.measures.volume_mm3) == {"fluid": 0.0}


# ----------------------------------------------------------------------------------------------- dataset_builder


def test_dataset_builder_duke_mat_and_retouch(tmp_path):
    from dataset_builder.__main__ import main
    from octsam.data import load_oct_dataset

    duke = tmp_path / "duke"
    duke.mkdir()
    for s in range(1, 5):
        write_duke_mat(duke / f"Subject_{s:02d}.mat", n=4, h=24, w=30, annotated=(0, 2))
    out = tmp_path / "duke_ds"
    assert main(["duke-mat", "--input", str(duke), "--output", str(out), "--split", "0.5,0.25,0.25"]) == 0
    dsd, labels = load_oct_dataset(out)
    assert labels == ["background", "fluid"]
    rows = [r for split in dsd.values() for r in split.remove_columns(["image"]).to_list()]
    assert len(rows) == 8 and {r["bscan_index"] for r in rows} == {0, 2}
    assert all(r["disease"] == "dme" and r["axial_mm"] == pytest.approx(0.00387) for r in rows)
    assert {r["volume_id"] for r in rows} == {f"Subject_{s:02d}" for s in range(1, 5)}
    for split in dsd.values():  # by patient: a volume never spans two splits
        assert all(r["patient_id"] == r["volume_id"] for r in split.remove_columns(["image", "mask"]).to_list())
    assert np.asarray(dsd["train"][0]["mask"]).max() == 255  # untraced A-scans stay ignore

    retouch = tmp_path / "RETOUCH"
    for i, vendor in enumerate(("Cirrus", "Spectralis", "Topcon")):
        write_retouch_case(retouch / vendor / f"TRAIN00{i}")
    out2 = tmp_path / "retouch_ds"
    assert main(["retouch", "--input", str(retouch), "--output", str(out2), "--split", "0.34,0.33,0.33"]) == 0
    dsd2, labels2 = load_oct_dataset(out2)
    assert labels2 == ["background", "IRF", "SRF", "PED"]
    assert sum(len(s) for s in dsd2.values()) == 12
    assert {r["source"] for s in dsd2.values() for r in s.remove_columns(["image", "mask"]).to_list()} == {
        "RETOUCH Cirrus",
        "RETOUCH Spectralis",
        "RETOUCH Topcon",
    }
    # bad input: a case without labels; nothing written
    write_retouch_case(retouch / "Test" / "TEST001", labels=False)
    out3 = tmp_path / "bad_ds"
    assert main(["retouch", "--input", str(retouch), "--output", str(out3)]) == 2
    assert not out3.exists()


def test_volume_outputs_and_evaluate_volumes(tmp_path):
    """What inference.py writes per eye, from the pieces it uses (octsam.infer.volumes), and evaluate_volumes."""
    from octsam.volumes.segment import check_unique_folders, evaluate_volumes

    frames = np.full((4, 24, 32), 40, np.uint8)
    frames[1:3, 5:9, 10:20] = 230
    dcm = write_oct_dicom(tmp_path / "oct.dcm", frames)
    (volume,) = read_volume(dcm)
    folder = write_volume_outputs(segment_volume(ThresholdSegmenter(), volume), tmp_path / "out")
    report = json.loads((folder / "report.json").read_text())
    assert report["volume_mm3"]["fluid"] == pytest.approx(80 * 0.0039 * 0.0117 * 0.047, abs=1e-6)
    assert "volume centre" in report["fovea"]["method"] and (folder / "report.png").is_file()  # no localizer
    with pytest.raises(OctSamError, match="two volumes would be written"):
        check_unique_folders([volume, *read_volume(dcm)])

    paths = [write_duke_mat(tmp_path / f"Subject_0{s}.mat", annotated=(1, 2))[0] for s in (1, 2, 3)]

    class Perfect:
        labels = ["background", "fluid"]

        def __call__(self, arrays):  # fluid where grader 1 drew it: the fixture puts it at the same place
            out = []
            for a in arrays:
                m = np.zeros(a.shape, np.uint8)
                m[10:15, 20:30] = 1
                m[20:22, 5:8] = 1
                out.append(types.SimpleNamespace(mask=m))
            return out

    result = evaluate_volumes(Perfect(), paths)
    assert [e["annotated_bscans"] for e in result["eyes"]] == [2, 2, 2]
    assert result["agreement"]["fluid"]["mean_abs_error_mm3"] == pytest.approx(0.0)
    assert result["eyes"][0]["true_mm3"]["fluid"] == pytest.approx(2 * 54 * 0.00387 * 0.01133 * 0.123)
