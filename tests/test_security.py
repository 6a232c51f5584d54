"""Issue 22: nothing read from outside what the user named, nothing uploaded by accident, text from data escaped
where it lands, pickles and hostile headers refused with a message."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octsam.errors import OctSamError
from tests.test_volumes import write_retouch_case

SECRET = b"SECRET" * 4000  # 24000 bytes: enough for the 4 x 30 x 40 uint16 volume the header declares


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


def point_mhd(header: Path, target: str) -> None:
    text = header.read_text()
    lines = [
        f"ElementDataFile = {target}" if line.startswith("ElementDataFile") else line for line in text.splitlines()
    ]
    header.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ 1. readers
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_mhd_data_file_outside_its_folder_is_refused(tmp_path, how):
    from octsam.volumes.readers import read_annotated_volume, read_volume

    secret = secret_file(tmp_path)
    case = write_retouch_case(tmp_path / "cases" / "TRAIN001")
    (case / "oct.raw").unlink()
    if how == "dotdot":
        target = "../../secret.bin"
    elif how == "absolute":
        target = str(secret)
    else:
        (case / "oct.raw").symlink_to(secret)
        target = "oct.raw"
    point_mhd(case / "oct.mhd", target)
    for read in (read_volume, read_annotated_volume):
        with pytest.raises(OctSamError, match="outside its folder") as info:
            read(case)
        assert "oct.mhd" in str(info.value) and target in str(info.value)


def test_mhd_reference_outside_and_builder_refuses(tmp_path):
    from dataset_builder.__main__ import main
    from octsam.volumes.readers import read_annotated_volume

    (tmp_path / "secret.bin").write_bytes(bytes(4 * 30 * 40))  # zeros: valid labels, so only the check refuses it
    root = tmp_path / "RETOUCH"
    case = write_retouch_case(root / "Spectralis" / "TRAIN001")
    point_mhd(case / "reference.mhd", "../../../secret.bin")
    with pytest.raises(OctSamError, match=r"reference\.mhd.*outside its folder"):
        read_annotated_volume(case)
    out = tmp_path / "ds"
    assert main(["retouch", "--input", str(root), "--output", str(out)]) == 2
    assert not out.exists()


def test_mhd_list_pattern_and_hostile_sizes_are_refused(tmp_path):
    from octsam.volumes.readers import read_volume

    case = write_retouch_case(tmp_path / "c")
    header = (case / "oct.mhd").read_text()
    point_mhd(case / "oct.mhd", "LIST")
    with pytest.raises(OctSamError, match="several data files"):
        read_volume(case)
    (case / "oct.mhd").write_text(header.replace("DimSize = 40 30 4", "DimSize = 100000 100000 100000"))
    with pytest.raises(OctSamError, match="MAX_VOLUME_VOXELS"):
        read_volume(case)
    (case / "oct.mhd").write_text(header.replace("DimSize = 40 30 4", "DimSize = 40 30 400"))
    with pytest.raises(OctSamError, match="truncated"):
        read_volume(case)


def test_heyex_xml_image_reference_outside_is_refused(tmp_path):
    from octsam.volumes.readers import read_volume

    pytest.importorskip("eyepy")
    folder = tmp_path / "export"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "secret.png")
    (folder / "scan.xml").write_text(
        "<HEDX><BODY><Patient><Study><Series><Image><ImageData>"
        "<ExamURL>../secret.png</ExamURL></ImageData></Image></Series></Study></Patient></BODY></HEDX>"
    )
    for path in (folder, folder / "scan.xml"):
        with pytest.raises(OctSamError, match=r"scan\.xml.*\.\./secret\.png.*outside its folder"):
            read_volume(path)


def test_volume_folder_with_a_link_leading_out_is_refused(tmp_path):
    from octsam.volumes.readers import read_volume

    folder = tmp_path / "scan"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "secret.png")
    (folder / "2.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(OctSamError, match=r"2\.png.*outside its folder"):
        read_volume(folder, spacing="0.1,0.1,0.1")
    (folder / "2.png").unlink()
    (folder / "1b.png").symlink_to(folder / "1.png")  # a link inside the folder is fine
    assert read_volume(folder, spacing="0.1,0.1,0.1")[0].n_bscans == 3


def test_inference_input_folder_links_leading_out_are_refused(tmp_path):
    from octsam.infer.inputs import collect_inputs

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside / "secret.png")
    (folder / "sub" / "inner.png").symlink_to(folder / "a.png")
    assert sorted(s.name for s in collect_inputs([str(folder)])) == ["a"]  # a link inside: read once
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OctSamError, match=r"linked.*outside its folder"):
        collect_inputs([str(folder)])
    (folder / "linked").unlink()
    (folder / "s.png").symlink_to(outside / "secret.png")
    with pytest.raises(OctSamError, match=r"s\.png.*outside its folder"):
        collect_inputs([str(folder)])
    assert [s.name for s in collect_inputs([str(folder / "s.png")])] == ["s"]  # a file named by the user is read


def test_builder_folder_and_nnunet_links_leading_out_are_refused(tmp_path):
    from dataset_builder.__main__ import main

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 + i, np.uint8)).save(images / f"p{i}_s.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / f"p{i}_s.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(outside / "secret.png")
    (images / "p9_s.png").symlink_to(outside / "secret.png")
    (masks / "p9_s.png").symlink_to(masks / "p0_s.png")
    args = ["folder", "--images", str(images), "--masks", str(masks), "--labels", "background,fluid",
            "--output", str(tmp_path / "ds")]  # fmt: skip
    assert main(args) == 2 and not (tmp_path / "ds").exists()

    nn = tmp_path / "nn"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    (nn / "dataset.json").write_text('{"labels": {"background": 0, "fluid": 1}, "file_ending": ".png"}')
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 + i, np.uint8)).save(nn / "imagesTr" / f"c{i}_0000.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(nn / "labelsTr" / f"c{i}.png")
    (nn / "labelsTr" / "c9.png").symlink_to(outside / "secret.png")
    (nn / "imagesTr" / "c9_0000.png").symlink_to(nn / "imagesTr" / "c0_0000.png")
    assert main(["nnunet", "--input", str(nn), "--output", str(tmp_path / "ds2")]) == 2
    assert not (tmp_path / "ds2").exists()


def test_app_upload_of_an_mhd_alone_opens_no_server_file(tmp_path):
    from octsam.app.loading import open_uploads

    root = tmp_path / "uploads"
    (root / "other").mkdir(parents=True)
    secret = secret_file(root / "other")
    case = write_retouch_case(root / "h1")
    os.replace(case / "oct.raw", root / "h1" / "kept.raw")
    for target in (str(secret), "../other/secret.bin", "kept.raw"):
        point_mhd(case / "oct.mhd", target)
        got, volumes, problems = open_uploads([case / "oct.mhd"], root)
        assert got == [] and volumes == [] and len(problems) == 1, problems
        assert "oct.mhd" in problems[0] and str(root / "h1") not in problems[0]
    # a single-file MetaImage (data after the header) opens
    import SimpleITK as sitk

    single = root / "h2" / "one.mhd"
    single.parent.mkdir()
    image = sitk.GetImageFromArray(np.zeros((2, 8, 9), np.uint8))
    image.SetSpacing((0.01, 0.004, 0.1))
    sitk.WriteImage(image, str(single.with_suffix(".mha")))
    os.replace(single.with_suffix(".mha"), single)
    got, volumes, problems = open_uploads([single], root)
    assert problems == [] and len(got) == 2


# ------------------------------------------------------------------------------------------------ 3. text from data
HOSTILE = "<img src=x onerror=alert(1)>"
FORMULA = "=1+1"


def test_textsafe_helpers():
    from octsam.textsafe import csv_cell, csv_frame, html_text, markdown_text

    assert "<" not in markdown_text(HOSTILE) and "&lt;img" in markdown_text(HOSTILE)
    assert markdown_text("[x](javascript:alert(1))") == r"\[x\](javascript:alert(1))"
    assert markdown_text("a|b\nc") == r"a\|b c"
    assert html_text('<b a="1">') == "&lt;b a=&quot;1&quot;&gt;"
    for text in (FORMULA, "@SUM(A1)", "+1+2", "-2+3", "\tx", "\r=1", "=cmd|' /C calc'!A0"):
        assert csv_cell(text) == "'" + text
    for value in ("fluid", "-0.5", "+1e-3", "12", -0.5, 3, None, "'=1"):
        assert csv_cell(value) == value
    import pandas as pd

    frame = csv_frame(pd.DataFrame({"class_name": [FORMULA, "fluid"], "dice": [-0.5, 0.25], FORMULA: [1, 2]}))
    assert list(frame.columns) == ["class_name", "dice", "'" + FORMULA]
    assert frame["class_name"].tolist() == ["'" + FORMULA, "fluid"] and frame["dice"].tolist() == [-0.5, 0.25]


def _body(card: str) -> str:
    """The Markdown after the YAML metadata, without fenced code blocks (where HTML is shown as written)."""
    import re

    return re.sub(r"```.*?```", "", card.split("---", 2)[2], flags=re.S)


@pytest.mark.parametrize("architecture", ["sam", "unet"])
def test_model_card_escapes_label_names(architecture):
    from octsam.adapter import OctSamConfig
    from octsam.cards import render_adapter_card

    config = OctSamConfig(labels=["background", HOSTILE, "fluid"], architecture=architecture)
    metrics = {"per_class": {HOSTILE: {"dice_mean": 0.5}}, "mean_dice": 0.5, "mean_iou": 0.4}
    for card in (render_adapter_card(config), render_adapter_card(config, metrics, dataset="a<script>b")):
        body = _body(card)
        assert "<img" not in body and "<script" not in body and "&lt;img src=x onerror=alert(1)&gt;" in body


def test_dataset_card_escapes_label_names(tmp_path):
    from dataset_builder.__main__ import main

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16), 60 + i, np.uint8)).save(images / f"p{i}_s.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[2:6, 2:6] = 1
        Image.fromarray(mask).save(masks / f"p{i}_s.png")
    out = tmp_path / "ds"
    args = ["folder", "--images", str(images), "--masks", str(masks), "--labels", f"background,{HOSTILE}",
            "--patient-regex", r"^(p\d+)_", "--source", "<b>src</b>", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    body = _body((out / "README.md").read_text())
    assert "<img" not in body and "<b>" not in body and "&lt;img src=x" in body


def test_summary_csv_neutralises_formulas(tmp_path):
    import csv

    from octsam.infer.outputs import write_summary

    rows = [{"scan": "=cmd|' /C calc'!A0", "source": "@SUM(A1)", "height": 4, "width": 5, f"{FORMULA}_area_px": 3,
             f"{FORMULA}_components": 1, "status": "ok", "error": ""}]  # fmt: skip
    failures = [{"scan": "-x", "source": "+y", "error": "=HYPERLINK(1)"}]
    write_summary(tmp_path / "summary.csv", rows, failures, ["background", FORMULA], None)
    table = list(csv.reader((tmp_path / "summary.csv").open()))
    assert table[0][4] == f"'{FORMULA}_area_px"
    assert table[1][:5] == ["'=cmd|' /C calc'!A0", "'@SUM(A1)", "4", "5", "3"]
    assert table[2][:2] == ["'-x", "'+y"] and "'=HYPERLINK(1)" in table[2]
    assert not any(cell.startswith(("=", "+", "@")) for row in table for cell in row)


def test_evaluation_csvs_and_report_tables_escape_labels(tmp_path):
    import csv

    from octsam.evaluation.metrics import evaluate_predictions
    from octsam.evaluation.report import _class_table, _headline_table, write_results

    rng = np.random.default_rng(0)
    refs = [(rng.random((12, 12)) > 0.5).astype(np.uint8) for _ in range(4)]
    labels = ["background", HOSTILE]
    result = evaluate_predictions(refs, refs, ["background", FORMULA], patient_ids=list("aabb"), n_bootstrap=5)
    paths = write_results(result, tmp_path, "m")
    for kind in ("per_class", "detection", "confusion"):
        cells = [c for row in csv.reader(paths[kind].open()) for c in row]
        assert "'" + FORMULA in cells and FORMULA not in cells, kind
    md_result = evaluate_predictions(refs, refs, labels, patient_ids=list("aabb"), n_bootstrap=5)
    text = _class_table({"<b>method</b>": md_result}) + _headline_table({"<b>method</b>": md_result}, labels)
    assert "<img" not in text and "<b>" not in text and "&lt;img" in text


# ------------------------------------------------------------------------------------------------ 4. pickles
class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_base_or_adapter_weights_are_a_message(tmp_path, tiny_base):
    import pickle
    import shutil

    from octsam.adapter import check_adapter_folder
    from octsam.models.sam import load_base_sam

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    with pytest.raises(OctSamError, match=r"pytorch_model\.bin \(pickle format\)") as info:
        load_base_sam(str(base))
    assert "nothing in it ran" in str(info.value) and not (tmp_path / "PWNED").exists()

    from octsam.adapter import OctSamConfig

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    OctSamConfig(labels=["background", "fluid"]).to_json_file(adapter / "octsam_config.json")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    with pytest.raises(OctSamError, match=r"lacks adapter_model\.safetensors.*adapter_model\.bin \(pickle format\)"):
        check_adapter_folder(adapter)
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------ 5. hostile headers
NIFTI_BOMB = """
import gzip, sys
import nibabel, numpy as np
from pathlib import Path
folder = Path(sys.argv[1])
header = nibabel.Nifti1Image(np.zeros((4, 4, 1), np.uint8), np.eye(4)).header
header.set_data_shape((30000, 30000, 1))
raw = header.binaryblock + bytes(4 + 64)
(folder / "bomb.nii").write_bytes(raw)
(folder / "bomb.nii.gz").write_bytes(gzip.compress(raw))
from dataset_builder.nnunet import read_nifti
from octsam.errors import OctSamError
for name in ("bomb.nii", "bomb.nii.gz"):
    try:
        read_nifti(folder / name)
        print("READ", name)
    except OctSamError as err:
        print("REFUSED", name, "MAX_SCAN_PIXELS" in str(err))
# VmHWM: this process's own peak (ru_maxrss would carry over the forking test process's peak across exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_MB", int(hwm.split()[1]) / 1024)
"""


def test_tiny_nifti_with_a_huge_header_is_refused_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", NIFTI_BOMB, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300).stdout  # fmt: skip
    assert "REFUSED bomb.nii True" in out and "REFUSED bomb.nii.gz True" in out, out
    peak = float(out.split("PEAK_MB")[1])
    assert peak < 1024, f"peak {peak:.0f} MB"  # was 3.6 GB (nibabel allocated the declared 900 megapixels)


def test_dicom_and_vol_headers_declaring_huge_volumes_are_refused(tmp_path):
    import struct

    import pydicom

    from octsam.volumes.readers import read_volume
    from tests.test_volumes import write_oct_dicom

    path = write_oct_dicom(tmp_path / "a.dcm", np.zeros((2, 8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 1000, 60000, 60000
    ds.save_as(path)
    with pytest.raises(OctSamError, match=r"a\.dcm.*MAX_VOLUME_VOXELS"):
        read_volume(path)

    vol = tmp_path / "eye.vol"  # a HEYEX VOL header declaring 5000 B-scans of 60000 x 60000, and nothing else
    vol.write_bytes(b"HSF-OCT-103 " + struct.pack("<3I", 60000, 5000, 60000) + bytes(4096))
    with pytest.raises(OctSamError, match=r"eye\.vol.*5000 B-scans of 60000 x 60000"):
        read_volume(vol)


def test_files_under_skips_hidden_entries_and_refuses_links_leading_out(tmp_path):
    from octsam.safepaths import files_under

    root = tmp_path / "in"
    (root / ".git").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "a" / "x.png").write_text("x")
    (root / ".git" / "out").symlink_to(tmp_path)  # hidden: not listed, not refused
    (root / ".hidden.png").symlink_to(tmp_path / "nowhere.png")
    assert [p.relative_to(root).as_posix() for p in files_under(root)] == ["a/x.png"]
    (root / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OctSamError, match="outside its folder"):
        list(files_under(root))
