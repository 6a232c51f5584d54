"""dataset_builder: each source, round trips, patient-level splits, synthetic realism and determinism, bad inputs,
atomic output, the command line and push_to_hub (offline)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import cv2
import datasets
import huggingface_hub
import nibabel
import numpy as np
import pytest
import tifffile
from PIL import Image

from dataset_builder.__main__ import main
from dataset_builder.folder import build_folder
from dataset_builder.nnunet import build_nnunet
from dataset_builder.palettes import PRESETS, load_palette
from dataset_builder.splits import load_split_file, split_patients
from dataset_builder.synthetic import LABELS, build_synthetic, make_patient, render_scan
from octsam.data.dataset import SPLITS, load_oct_dataset
from octsam.errors import OctSamError

DUKE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_dme_fluid"
SIZE = 96  # small synthetic B-scans keep the tests fast


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Tests never reach the network, and datasets' cache stays in the test's folder."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def arrays(dsd: datasets.DatasetDict, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    return {
        row["scan_id"]: (np.asarray(row["image"]), np.asarray(row["mask"]), row["patient_id"]) for row in dsd[split]
    }


def patients_by_split(dsd: datasets.DatasetDict) -> dict[str, set[str]]:
    return {s: set(dsd[s]["patient_id"]) for s in SPLITS}


def assert_patient_level(dsd: datasets.DatasetDict) -> None:
    by = patients_by_split(dsd)
    assert all(by[s] for s in SPLITS)
    assert (
        not (by["train"] & by["validation"]) and not (by["train"] & by["test"]) and not (by["validation"] & by["test"])
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name) if folder.exists() else []


# -------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_seed_dependent():
    a_img, a_mask = render_scan("amd", 7, 3, 1, 4, SIZE)
    b_img, b_mask = render_scan("amd", 7, 3, 1, 4, SIZE)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    c_img, _ = render_scan("amd", 8, 3, 1, 4, SIZE)
    assert not np.array_equal(a_img, c_img)


def test_synthetic_build_is_deterministic(tmp_path):
    r1 = build_synthetic("macular_hole", 5, 2, seed=3, output=tmp_path / "a", size=SIZE)
    r2 = build_synthetic("macular_hole", 5, 2, seed=3, output=tmp_path / "b", size=SIZE)
    assert r1.assignment == r2.assignment and r1.table == r2.table
    d1, labels = load_oct_dataset(tmp_path / "a")
    d2, _ = load_oct_dataset(tmp_path / "b")
    assert labels == LABELS["macular_hole"]
    for split in SPLITS:
        a, b = arrays(d1, split), arrays(d2, split)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key][0], b[key][0])
            np.testing.assert_array_equal(a[key][1], b[key][1])


def _region_vs_ring(img: np.ndarray, region: np.ndarray, width: int = 3) -> tuple[float, float]:
    ring = cv2.dilate(region.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool) & ~region
    return float(img[region].mean()), float(img[ring].mean())


def test_synthetic_masks_match_what_is_drawn():
    """Fluid and holes are dark, scar is bright against their surroundings; drusen lift the bright RPE."""
    found = {"fluid": 0, "scar": 0, "drusen": 0, "macular_hole": 0}
    with_scar = [i for i in range(40) if 2 in make_patient("amd", 1, i, 3, (264, 256)).classes][:3]
    for patient in sorted(set(range(5)) | set(with_scar)):
        for scan in range(3):
            img, mask = render_scan("amd", 1, patient, scan, 3, 256)
            img = img.astype(np.float64)
            if (mask == 3).sum() > 40:
                inside, ring = _region_vs_ring(img, mask == 3)
                assert inside < ring - 15, (patient, scan, inside, ring)
                found["fluid"] += 1
            if (mask == 2).sum() > 40:
                inside, ring = _region_vs_ring(img, mask == 2)
                assert inside > ring + 10, (patient, scan, inside, ring)
                found["scar"] += 1
            if (mask == 1).sum() > 40:  # the band just above each drusen is the (bright) elevated RPE
                above = np.zeros_like(mask, dtype=bool)
                above[:-4] = (mask[4:] == 1) & (mask[:-4] != 1)
                assert img[above].mean() > img[mask == 1].mean() + 10
                found["drusen"] += 1
            hole_img, hole = render_scan("macular_hole", 1, patient, scan, 3, 256)
            if (hole == 1).sum() > 40:
                inside, ring = _region_vs_ring(hole_img.astype(np.float64), hole == 1)
                assert inside < ring - 15
                found["macular_hole"] += 1
    assert all(n >= 2 for n in found.values()), found


def test_synthetic_patient_classes_are_in_its_scans_and_scans_resemble_each_other():
    def blur(a):
        return cv2.GaussianBlur(a.astype(np.float32), (0, 0), 3).ravel()

    firsts, same = [], []
    for patient in range(6):
        planned = make_patient("amd", 2, patient, 3, (132, 128)).classes
        scans = [render_scan("amd", 2, patient, j, 3, 128) for j in range(3)]
        present = set(np.unique(np.concatenate([m.ravel() for _, m in scans])).tolist()) - {0}
        assert present == set(planned)
        firsts.append(blur(scans[0][0]))
        same += [np.corrcoef(firsts[-1], blur(img))[0, 1] for img, _ in scans[1:]]
    other = [np.corrcoef(a, b)[0, 1] for i, a in enumerate(firsts) for b in firsts[i + 1 :]]
    assert min(same) > np.mean(other)


def test_synthetic_vendor_sizes_vary_by_default():
    sizes = {(make_patient("amd", 0, i, 2).height, make_patient("amd", 0, i, 2).width) for i in range(30)}
    assert len(sizes) >= 3 and (496, 512) in sizes
    img, mask = render_scan("amd", 0, 0, 0, 2)
    assert img.shape == mask.shape == (make_patient("amd", 0, 0, 2).height, make_patient("amd", 0, 0, 2).width)


def test_synthetic_every_biomarker_in_every_split(tmp_path):
    build_synthetic("amd", 14, 2, seed=0, output=tmp_path / "amd", size=SIZE)
    dsd, labels = load_oct_dataset(tmp_path / "amd")
    assert labels == ["background", "drusen", "scar", "fluid"]
    assert_patient_level(dsd)
    for split in SPLITS:
        present = set()
        for _, mask, _ in arrays(dsd, split).values():
            present |= set(np.unique(mask).tolist())
        assert {1, 2, 3} <= present, (split, present)


# ----------------------------------------------------------------------------------------------- splits


def test_split_patients_covers_classes_and_is_deterministic():
    classes = {f"p{i:02d}": ({1} if i % 2 else set()) | ({2} if i in (3, 7, 11) else set()) for i in range(20)}
    a = split_patients(classes, (0.7, 0.15, 0.15), seed=5)
    assert a == split_patients(classes, (0.7, 0.15, 0.15), seed=5)
    assert sorted(a.values()).count("train") == 14
    for split in SPLITS:
        assert {1, 2} <= set().union(*(classes[p] for p in a if a[p] == split))


def test_split_needs_three_patients():
    with pytest.raises(OctSamError, match="split would be empty"):
        split_patients({"a": {1}, "b": {1}})


def test_split_file_errors(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"train": ["a"], "validation": ["b"], "test": []}))
    with pytest.raises(OctSamError, match="test.*would be empty"):
        load_split_file(f, ["a", "b"])
    f.write_text(json.dumps({"train": ["a", "b"], "validation": ["b"], "test": ["c"]}))
    with pytest.raises(OctSamError, match="patient b is in both"):
        load_split_file(f, ["a", "b", "c"])
    f.write_text(json.dumps({"train": ["a"], "validation": ["b"], "test": ["c"]}))
    with pytest.raises(OctSamError, match="does not assign patient.*d"):
        load_split_file(f, ["a", "b", "c", "d"])


# ----------------------------------------------------------------------------------------------- folder


def write_folder(root: Path, n_patients: int = 4, scans: int = 2, disease: str = "amd", colour: bool = False):
    """Synthetic B-scans written as files: images/pXX_bYY.png, masks/pXX_bYY.png (index or colour)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    palette = np.array(list(PRESETS[disease].values()), dtype=np.uint8)
    truth = {}
    for p in range(n_patients):
        for b in range(scans):
            img, mask = render_scan(disease, 11, p, b, scans, 64)
            name = f"p{p:02d}_b{b:02d}"
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            Image.fromarray(palette[mask] if colour else mask).save(root / "masks" / f"{name}.png")
            truth[name] = (img, mask)
    return truth


def test_folder_round_trip_identical_pixels_and_labels(tmp_path):
    truth = write_folder(tmp_path / "raw")
    result = build_folder(
        tmp_path / "raw" / "images",
        tmp_path / "raw" / "masks",
        tmp_path / "out",
        labels="background,drusen,scar,fluid",
        patient_regex=r"^(p\d+)_",
        disease="amd",
        source="unit-test",
        seed=1,
    )
    dsd, labels = load_oct_dataset(tmp_path / "out")
    assert labels == ["background", "drusen", "scar", "fluid"] == result.labels
    assert_patient_level(dsd)
    seen = {}
    for split in SPLITS:
        seen.update(arrays(dsd, split))
        assert set(dsd[split]["disease"]) == {"amd"} and set(dsd[split]["source"]) == {"unit-test"}
    assert seen.keys() == truth.keys()
    for name, (img, mask, patient) in seen.items():
        np.testing.assert_array_equal(img, truth[name][0])
        np.testing.assert_array_equal(mask, truth[name][1])
        assert patient == name[:3]
    total = sum(s["pixels"]["fluid"] for s in result.summaries.values())
    assert total == sum(int((m == 3).sum()) for _, m in truth.values())
    assert json.loads((tmp_path / "out" / "splits.json").read_text())["test"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 3 | fluid |" in card and "unit-test" in card and "task_categories" in card


def test_folder_colour_masks_with_preset_and_json_palette(tmp_path):
    truth = write_folder(tmp_path / "raw", n_patients=3, scans=1, disease="amd", colour=True)
    build_folder(
        tmp_path / "raw" / "images",
        tmp_path / "raw" / "masks",
        tmp_path / "out",
        palette="amd",
        patient_regex=r"^(p\d+)_",
    )
    dsd, labels = load_oct_dataset(tmp_path / "out")
    assert labels == ["background", "drusen", "scar", "fluid"]
    for split in SPLITS:
        for name, (_, mask, _) in arrays(dsd, split).items():
            np.testing.assert_array_equal(mask, truth[name][1])
    pal = tmp_path / "pal.json"
    pal.write_text(json.dumps({"background": [0, 0, 0], "lesion": [255, 0, 0], "_ignore": [0, 255, 0]}))
    loaded = load_palette(str(pal))
    assert loaded.labels == ("background", "lesion") and loaded.ignore == ((0, 255, 0),)


def test_folder_mixed_formats_pair_by_stem(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for i, ext in enumerate(["png", "tif", "bmp", "jpg"]):
        img = np.full((24, 32), 40 * (i + 1), np.uint8)
        mask = (rng.random((24, 32)) > 0.7).astype(np.uint8)
        if ext == "tif":
            tifffile.imwrite(tmp_path / "images" / f"s{i}.tif", img.astype(np.uint16) * 257)
        else:
            Image.fromarray(img).save(tmp_path / "images" / f"s{i}.{ext}")
        Image.fromarray(mask).save(tmp_path / "masks" / f"s{i}.png")
        expected[f"s{i}"] = (img, mask)
    build_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", labels=["background", "fluid"])
    dsd, _ = load_oct_dataset(tmp_path / "out")
    rows = {k: v for s in SPLITS for k, v in arrays(dsd, s).items()}
    assert rows.keys() == expected.keys()
    for name, (img, mask, patient) in rows.items():
        assert patient == name  # no regex: one patient per file
        assert np.abs(img.astype(int) - expected[name][0]).max() <= 2  # JPEG is lossy, others exact
        np.testing.assert_array_equal(mask, expected[name][1])


def _folder_error(tmp_path, **kwargs) -> str:
    with pytest.raises(OctSamError) as info:
        build_folder(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    return str(info.value)


def test_bad_input_unpaired_files_are_listed(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    (tmp_path / "raw" / "masks" / "p00_b00.png").rename(tmp_path / "raw" / "masks" / "orphan.png")
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid")
    assert "without a mask: p00_b00.png" in msg and "without an image: orphan.png" in msg


def test_bad_input_size_mismatch(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "raw" / "masks" / "p01_b00.png")
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid")
    assert "size mismatch" in msg and "p01_b00.png is 12x10" in msg


def test_bad_input_colour_not_in_palette(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1, colour=True)
    m = np.zeros((64, 66, 3), np.uint8)
    m[:2, :3] = (255, 128, 0)
    Image.fromarray(m).save(tmp_path / "raw" / "masks" / "p02_b00.png")
    msg = _folder_error(tmp_path, palette="amd")
    assert "p02_b00.png" in msg and "(255, 128, 0) in 6 pixels" in msg


def test_bad_input_mask_value_above_label_count(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    m = np.zeros((64, 66), np.uint8)
    m[0, 0] = 7
    Image.fromarray(m).save(tmp_path / "raw" / "masks" / "p00_b00.png")
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid")
    assert "p00_b00.png has value(s) 7" in msg and "4 labels" in msg


def test_bad_input_unreadable_files(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    (tmp_path / "raw" / "images" / "p01_b00.png").write_bytes(b"garbage")
    (tmp_path / "raw" / "masks" / "p02_b00.png").write_bytes(b"garbage")
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid")
    assert "images/p01_b00.png" in msg and "masks/p02_b00.png" in msg


def test_bad_input_truncated_image_found_while_writing_leaves_nothing(tmp_path):
    """A file whose header reads but whose pixels do not fails during streaming; no half-written output remains."""
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    path = tmp_path / "raw" / "images" / "p01_b00.png"
    path.write_bytes(path.read_bytes()[:200])
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid")
    assert "p01_b00.png" in msg


def test_bad_input_split_would_be_empty(tmp_path):
    write_folder(tmp_path / "raw", n_patients=2, scans=2)
    msg = _folder_error(tmp_path, labels="background,drusen,scar,fluid", patient_regex=r"^(p\d+)_")
    assert "split would be empty" in msg


def test_output_exists_needs_overwrite_and_split_file_is_used(tmp_path):
    write_folder(tmp_path / "raw", n_patients=3, scans=1)
    kwargs = dict(labels="background,drusen,scar,fluid", patient_regex=r"^(p\d+)_")
    build_folder(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", tmp_path / "out", **kwargs)
    with pytest.raises(OctSamError, match="already exists.*--overwrite"):
        build_folder(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", tmp_path / "out", **kwargs)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["p02"], "validation": ["p00"], "test": ["p01"]}))
    build_folder(
        tmp_path / "raw" / "images",
        tmp_path / "raw" / "masks",
        tmp_path / "out",
        overwrite=True,
        split_file=split_file,
        **kwargs,
    )
    dsd, _ = load_oct_dataset(tmp_path / "out")
    assert patients_by_split(dsd) == {"train": {"p02"}, "validation": {"p00"}, "test": {"p01"}}
    assert not leftovers(tmp_path)
    (tmp_path / "notadataset").mkdir()
    (tmp_path / "notadataset" / "precious.txt").write_text("keep me")
    with pytest.raises(OctSamError, match="refusing to overwrite"):
        build_folder(
            tmp_path / "raw" / "images", tmp_path / "raw" / "masks", tmp_path / "notadataset", overwrite=True, **kwargs
        )
    assert (tmp_path / "notadataset" / "precious.txt").exists()


# ----------------------------------------------------------------------------------------------- nnunet


def test_nnunet_v2_png_with_ignore_label_and_test_cases(tmp_path):
    root = tmp_path / "Dataset501_OCT"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "OCT"},
                "labels": {"background": 0, "hole": 1, "ignore": 2},
                "numTraining": 4,
                "file_ending": ".png",
            }
        )
    )
    truth = {}
    for i in range(4):
        img, mask = render_scan("macular_hole", 0, i, 0, 1, 64)
        mask = mask.copy()
        mask[:2, :] = 2  # an ignore band
        sub = "Ts" if i == 3 else "Tr"
        Image.fromarray(img).save(root / f"images{sub}" / f"oct_{i:03d}_0000.png")
        Image.fromarray(mask).save(root / f"labels{sub}" / f"oct_{i:03d}.png")
        truth[f"oct_{i:03d}"] = (img, np.where(mask == 2, 255, mask))
    build_nnunet(root, tmp_path / "out", disease="macular_hole")
    dsd, labels = load_oct_dataset(tmp_path / "out")
    assert labels == ["background", "hole"]
    rows = {k: v for s in SPLITS for k, v in arrays(dsd, s).items()}
    assert rows.keys() == truth.keys()
    for name, (img, mask, _) in rows.items():
        np.testing.assert_array_equal(img, truth[name][0])
        np.testing.assert_array_equal(mask, truth[name][1])


def test_nnunet_v1_nifti_single_slice(tmp_path):
    root = tmp_path / "Task500_OCT"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps({"modality": {"0": "OCT"}, "labels": {"0": "background", "1": "fluid"}})
    )
    truth = {}
    for i in range(3):
        img = np.random.default_rng(i).integers(0, 256, (20, 30), dtype=np.uint8)
        mask = (img > 200).astype(np.uint8)
        # nnU-Net's 2D converters store (x, y, 1) with x = column
        nibabel.save(
            nibabel.Nifti1Image(img.T[..., None].astype(np.float32), np.eye(4)),
            root / "imagesTr" / f"c{i}_0000.nii.gz",
        )
        nibabel.save(nibabel.Nifti1Image(mask.T[..., None], np.eye(4)), root / "labelsTr" / f"c{i}.nii.gz")
        truth[f"c{i}"] = (img, mask)
    build_nnunet(root, tmp_path / "out", disease="dme")
    dsd, labels = load_oct_dataset(tmp_path / "out")
    assert labels == ["background", "fluid"]
    rows = {k: v for s in SPLITS for k, v in arrays(dsd, s).items()}
    for name, (img, mask, _) in rows.items():
        np.testing.assert_array_equal(img, truth[name][0])
        np.testing.assert_array_equal(mask, truth[name][1])


def test_nnunet_bad_inputs(tmp_path):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    with pytest.raises(OctSamError, match="dataset.json is missing"):
        build_nnunet(root, tmp_path / "out")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "fluid": 1}, "file_ending": ".png"}))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "imagesTr" / "a_0000.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "imagesTr" / "a_0001.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labelsTr" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labelsTr" / "b.png")
    with pytest.raises(OctSamError, match="more than one input channel"):
        build_nnunet(root, tmp_path / "out")
    (root / "imagesTr" / "a_0001.png").unlink()
    with pytest.raises(OctSamError, match="without an image.*b"):
        build_nnunet(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ cli and hub


def test_cli_success_and_clear_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synthetic", "--disease", "amd", "--num-patients", "4", "--scans-per-patient", "1", "--size", "80x64"]
    assert main(argv + ["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| split" in printed and "fluid px" in printed and "wrote" in printed
    dsd, _ = load_oct_dataset(out)
    assert np.asarray(dsd["train"][0]["image"]).shape == (64, 80)
    assert main(argv + ["--output", str(out)]) == 0  # the same command again: its complete output is kept
    assert "already built by this same command" in capsys.readouterr().out
    assert main(argv + ["--output", str(out), "--seed", "5"]) == 2  # another command: refused
    err = capsys.readouterr().err
    assert err.startswith("error: output") and "Traceback" not in err
    assert (
        main(
            [
                "folder",
                "--images",
                str(tmp_path / "nope"),
                "--masks",
                str(tmp_path),
                "--labels",
                "background,x",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "images folder not found" in capsys.readouterr().err


def test_push_to_hub_offline(tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, repo_type, private)

    def create_commit(self, repo_id, operations, commit_message=None, repo_type=None, **kwargs):
        calls["commit"] = {op.path_in_repo: Path(op.path_or_fileobj).read_text() for op in operations}

    def push_to_hub(self, repo_id, private=None, token=None, **kwargs):
        calls["push"] = (repo_id, private, sorted(self))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push_to_hub)
    result = build_synthetic("amd", 4, 1, seed=0, output=None, size=64, push_to_hub="myorg/oct-amd", private=True)
    assert result.output is None and result.repo_id == "myorg/oct-amd"
    assert calls["create_repo"] == ("myorg/oct-amd", "dataset", True)
    assert calls["push"] == ("myorg/oct-amd", True, ["test", "train", "validation"])
    card = calls["commit"]["README.md"]
    assert "license: cc0-1.0" in card and "| 2 | scar |" in card and 'load_oct_dataset("myorg/oct-amd")' in card
    assert json.loads(calls["commit"]["id2label.json"]) == {
        "0": "background",
        "1": "drusen",
        "2": "scar",
        "3": "fluid",
    }


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DUKE.is_dir(), reason=f"real Duke DME data not found at {DUKE}")
def test_duke_dme_builds_with_patient_level_split(tmp_path):
    result = build_folder(
        DUKE / "images",
        DUKE / "masks",
        tmp_path / "duke",
        labels="background,fluid",
        patient_regex=r"duke_s(\d+)_",
        disease="dme",
        source="Duke DME (Chiu et al. 2015)",
    )
    dsd, labels = load_oct_dataset(tmp_path / "duke")
    assert labels == ["background", "fluid"]
    assert_patient_level(dsd)
    assert sum(dsd[s].num_rows for s in SPLITS) == 110
    assert sum(len(p) for p in patients_by_split(dsd).values()) == 10
    assert sum(s["pixels"]["fluid"] for s in result.summaries.values()) == 346_152  # as in the data's README
    assert all(s["pixels"]["fluid"] > 0 for s in result.summaries.values())
    row = dsd["test"][0]
    np.testing.assert_array_equal(
        np.asarray(row["image"]), np.asarray(Image.open(DUKE / "images" / f"{row['scan_id']}.png"))
    )
    np.testing.assert_array_equal(
        np.asarray(row["mask"]), np.asarray(Image.open(DUKE / "masks" / f"{row['scan_id']}.png"))
    )


def test_kfold_cross_validation_tests_every_patient_once(tmp_path, capsys):
    """--folds K builds K datasets: each patient in exactly one test fold, validation is the next fold (never a test
    patient of the same fold), folds.json records the folds; --fold k builds one."""
    from dataset_builder.splits import fold_split, kfold_patients

    classes = {f"p{i}": ({1} if i % 3 else {1, 2}) for i in range(7)}
    fold_of = kfold_patients(classes, 3, seed=1, patient_scans={p: 2 for p in classes})
    assert sorted(fold_of) == sorted(classes) and sorted(set(fold_of.values())) == [0, 1, 2]
    assert (
        max(list(fold_of.values()).count(f) for f in range(3)) - min(list(fold_of.values()).count(f) for f in range(3))
        <= 1
    )
    for fold in range(3):
        split = fold_split(fold_of, fold, 3)
        assert {p for p, s in split.items() if s == "test"} == {p for p, f in fold_of.items() if f == fold}
        assert {p for p, s in split.items() if s == "validation"} == {
            p for p, f in fold_of.items() if f == (fold + 1) % 3
        }
    with pytest.raises(OctSamError, match="at least 3 patients"):
        kfold_patients({"a": {1}, "b": {1}}, 3)

    out = tmp_path / "cv"
    args = ["synthetic", "--disease", "amd", "--num-patients", "6", "--scans-per-patient", "1", "--size", "64x64"]
    assert main([*args, "--output", str(out), "--folds", "3"]) == 0
    folds = json.loads((out / "folds.json").read_text())["test_fold_of_patient"]
    tested = []
    for fold in range(3):
        dataset, _ = load_oct_dataset(out / f"fold-{fold}")
        test_patients = set(dataset["test"]["patient_id"])
        assert test_patients == {p for p, f in folds.items() if f == fold}
        assert not test_patients & (set(dataset["train"]["patient_id"]) | set(dataset["validation"]["patient_id"]))
        tested += sorted(test_patients)
    assert sorted(tested) == sorted(folds) and len(tested) == 6
    assert main([*args, "--output", str(tmp_path / "one"), "--folds", "3", "--fold", "1"]) == 0
    assert set(load_oct_dataset(tmp_path / "one")[0]["test"]["patient_id"]) == {p for p, f in folds.items() if f == 1}
    assert main([*args, "--output", str(tmp_path / "x"), "--fold", "1"]) == 2
    assert "--fold k needs --folds K" in capsys.readouterr().err
