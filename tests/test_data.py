"""octsam.data.dataset: reading scans of any format and loading datasets (local folder, Hub snapshot, Hub repo id)."""

from __future__ import annotations

import json
import socket

import datasets
import numpy as np
import pytest
import tifffile
from PIL import Image

from octsam.data import dataset as octdata
from octsam.data.dataset import LABELS_FILE, labels_description, load_oct_dataset, read_scan, to_uint8
from octsam.errors import OctSamError


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Tests never reach the network, and datasets' cache stays in the test's folder."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def gray(h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- read_scan


def test_read_scan_8bit_png_bmp_exact(tmp_path):
    img = gray()
    for name in ("a.png", "a.bmp"):
        Image.fromarray(img).save(tmp_path / name)
        out = read_scan(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, img)


def test_read_scan_16bit_png_and_tiff_scaled_to_8bit(tmp_path):
    img16 = (gray().astype(np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    Image.fromarray(img16).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", img16)
    for name in ("a.png", "a.tif"):
        out = read_scan(tmp_path / name)
        assert out.dtype == np.uint8 and out.ndim == 2
        np.testing.assert_array_equal(out, gray())


def test_read_scan_12bit_tiff_uses_12bit_range(tmp_path):
    img12 = np.array([[0, 4095], [2048, 1000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tiff", img12)
    out = read_scan(tmp_path / "a.tiff")
    np.testing.assert_array_equal(out, np.rint(img12.astype(float) * 255 / 4095).astype(np.uint8))


def test_read_scan_float_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    np.testing.assert_array_equal(read_scan(tmp_path / "f.tif"), [[0, 128], [255, 64]])


def test_read_scan_rgb_jpeg_of_gray_scan_becomes_gray(tmp_path):
    img = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    Image.fromarray(np.stack([img] * 3, axis=2)).save(tmp_path / "a.jpg", quality=95)
    out = read_scan(tmp_path / "a.jpg")
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img).max() <= 6  # JPEG is lossy, but stays a gray (H, W) scan


def test_read_scan_true_colour_stays_rgb_and_alpha_is_dropped(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_scan(tmp_path / "c.png"), rgb)
    rgba = np.concatenate([np.stack([gray(20, 30)] * 3, 2), np.full((20, 30, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_scan(tmp_path / "g.png"), gray(20, 30))


def test_read_scan_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(OctSamError, match="bad.png"):
        read_scan(tmp_path / "bad.png")
    with pytest.raises(OctSamError, match="not found.*missing.png"):
        read_scan(tmp_path / "missing.png")
    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(OctSamError, match="vol.tif"):
        read_scan(tmp_path / "vol.tif")


def test_to_uint8_ranges():
    np.testing.assert_array_equal(to_uint8(np.array([0, 255], np.uint16)), [0, 255])  # 8-bit data in 16 bits
    np.testing.assert_array_equal(to_uint8(np.array([0, 65535], np.uint16)), [0, 255])
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 1.0])), [0, 255])  # other floats: min-max


# ------------------------------------------------------------------------------------------- loading


def small_dsd(splits=("train", "validation", "test")) -> datasets.DatasetDict:
    features = octdata.dataset_features()
    parts = {}
    for i, split in enumerate(splits):
        rows = {
            "image": [gray(16, 20, i)],
            "mask": [np.full((16, 20), i % 2, np.uint8)],
            "patient_id": [f"p{i}"],
            "scan_id": [f"p{i}_b0"],
            "disease": ["dme"],
            "source": ["test"],
        }
        parts[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(parts)


def test_load_local_folder_with_labels_file(tmp_path):
    small_dsd().save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / LABELS_FILE).write_text(json.dumps({"0": "background", "1": "fluid"}))
    dsd, labels = load_oct_dataset(tmp_path / "ds")
    assert labels == ["background", "fluid"]
    assert set(dsd) == {"train", "validation", "test"}
    np.testing.assert_array_equal(np.asarray(dsd["validation"][0]["image"]), gray(16, 20, 1))


def test_labels_fall_back_to_dataset_info_description(tmp_path):
    dsd = small_dsd()
    for ds in dsd.values():
        ds.info.description = labels_description(["background", "drusen", "scar"])
    dsd.save_to_disk(str(tmp_path / "ds"))
    assert load_oct_dataset(str(tmp_path / "ds"))[1] == ["background", "drusen", "scar"]


def test_load_errors(tmp_path):
    with pytest.raises(OctSamError, match="not found"):
        load_oct_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OctSamError, match="not a dataset folder"):
        load_oct_dataset(tmp_path / "empty")
    small_dsd(("train", "validation")).save_to_disk(str(tmp_path / "two"))
    (tmp_path / "two" / LABELS_FILE).write_text(json.dumps({"0": "background", "1": "fluid"}))
    with pytest.raises(OctSamError, match="lacks split.*test"):
        load_oct_dataset(tmp_path / "two")
    small_dsd()["train"].save_to_disk(str(tmp_path / "single"))
    with pytest.raises(OctSamError, match="single split"):
        load_oct_dataset(tmp_path / "single")
    small_dsd().save_to_disk(str(tmp_path / "nolabels"))
    with pytest.raises(OctSamError, match="no label names"):
        load_oct_dataset(tmp_path / "nolabels")
    (tmp_path / "nolabels" / LABELS_FILE).write_text(json.dumps({"0": "fluid", "1": "background"}))
    with pytest.raises(OctSamError, match="label 0 must be 'background'"):
        load_oct_dataset(tmp_path / "nolabels")


def _hub_snapshot(folder):
    """What push_to_hub leaves in a Hub dataset repo: parquet shards under data/ plus id2label.json."""
    (folder / "data").mkdir(parents=True)
    for split, ds in small_dsd().items():
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / LABELS_FILE).write_text(json.dumps({"0": "background", "1": "fluid"}))


def test_load_local_hub_snapshot(tmp_path):
    _hub_snapshot(tmp_path / "snap")
    dsd, labels = load_oct_dataset(tmp_path / "snap")
    assert labels == ["background", "fluid"] and dsd["test"].num_rows == 1
    np.testing.assert_array_equal(np.asarray(dsd["test"][0]["image"]), gray(16, 20, 2))


def test_load_hub_repo_id_offline(tmp_path, monkeypatch):
    _hub_snapshot(tmp_path / "snap")
    calls = {}
    real_load = datasets.load_dataset

    def fake_load_dataset(repo, revision=None, **kwargs):
        calls["load"] = (repo, revision)
        return real_load(str(tmp_path / "snap"))

    def fake_download(repo_id, filename, repo_type=None, revision=None, **kwargs):
        calls["download"] = (repo_id, filename, repo_type, revision)
        return str(tmp_path / "snap" / filename)

    monkeypatch.setattr(octdata.datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(octdata.huggingface_hub, "hf_hub_download", fake_download)
    dsd, labels = load_oct_dataset("someorg/oct-dme", revision="v1")
    assert calls["load"] == ("someorg/oct-dme", "v1")
    assert calls["download"] == ("someorg/oct-dme", LABELS_FILE, "dataset", "v1")
    assert labels == ["background", "fluid"] and dsd["train"].num_rows == 1


def test_hub_failure_is_a_clear_error(monkeypatch):
    def failing(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(octdata.datasets, "load_dataset", failing)
    with pytest.raises(OctSamError, match="cannot load Hub dataset 'org/missing'"):
        load_oct_dataset("org/missing")
