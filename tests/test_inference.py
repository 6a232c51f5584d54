"""inference.py / octsam.infer.run: outputs at native size, prompts, merged == unmerged, odd inputs, every error."""

from __future__ import annotations

import csv
import json
import shutil
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import DUKE_DIR, TINY_LABELS
from PIL import Image

from octsam.adapter import ADAPTER_CONFIG_NAME, OctSamConfig
from octsam.cli.infer import main
from octsam.colors import overlay
from octsam.data.dataset import read_scan
from octsam.data.prompts import build_prompts, parse_box, parse_point
from octsam.errors import OctSamError
from octsam.infer.outputs import class_areas
from octsam.models.sam import OctSamModel
from octsam.segmenter import Prompt, Segmenter


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test reaches the network, and huggingface_hub runs in offline mode (its flag is read at import time, so
    setting HF_HUB_OFFLINE in the environment after ``import datasets`` would come too late)."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_adapter(base: str, folder: Path, mode: str = "automatic", seed: int = 0, labels=TINY_LABELS) -> Path:
    """A tiny adapter standing in for a trained one: LoRA B weights perturbed (so LoRA is not the identity) and the
    trained decoder's output layers scaled so that mask logits are O(1) rather than the random base's 1e-4."""
    config = OctSamConfig(labels=list(labels), base_model=base, mode=mode)
    model = OctSamModel.from_base(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name and name.endswith("weight"):
                if "output_hypernetworks_mlps" in name:
                    param.mul_(8)
                elif "upscale_conv2" in name:
                    param.mul_(10)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "auto")


@pytest.fixture(scope="module")
def prompted_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "prompted", mode="prompted", seed=1)


@pytest.fixture(scope="module")
def segmenter(adapter) -> Segmenter:
    return Segmenter.from_pretrained(adapter, device="cpu", batch_size=1)


def scan(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 10, (h, w)).clip(0, 255)
    image[h // 4 : h // 2, w // 5 : w // 2] = 220
    image[h // 2 :, w // 2 :] = 140
    return image.astype(np.uint8)


def read_summary(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ model paths
def test_merged_equals_unmerged_and_lora_matters(adapter):
    """Merging LoRA into the base weights changes no logit by more than 1e-5 (automatic and prompted paths)."""
    images = [scan(40, 48, seed=i) for i in range(3)]
    prompts = [[Prompt(1, box=(5, 5, 30, 25)), Prompt(2, points=[(40, 30, 1), (10, 10, 0)])] for _ in images]
    unmerged = Segmenter.from_pretrained(adapter, device="cpu", merge=False)
    merged = Segmenter.from_pretrained(adapter, device="cpu", merge=True)
    from peft import PeftModel

    assert isinstance(unmerged.model.sam, PeftModel) and not isinstance(merged.model.sam, PeftModel)
    for p in (None, prompts):
        a, b = unmerged.class_logits(images, p), merged.class_logits(images, p)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert a.abs().max() > 0.1  # logits large enough for the 1e-5 tolerance to mean something
    with torch.no_grad():
        for name, param in unmerged.model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    assert (unmerged.class_logits(images) - merged.class_logits(images)).abs().max() > 1e-3  # LoRA matters


def test_prompt_parsing_and_grouping():
    assert parse_box("fluid:1,2,30.5,40").box == (1.0, 2.0, 30.5, 40.0)
    assert parse_point("2:5,6:neg").points == [(5.0, 6.0, 0)]
    assert parse_point("drusen:5,6").points == [(5.0, 6.0, 1)]
    specs = [parse_box("drusen:2,3,30,20"), parse_point("drusen:10,10:neg"), parse_point("2:40,30")]
    prompts = build_prompts(specs, TINY_LABELS, (40, 48), "x")
    assert prompts == [Prompt(1, box=(2, 3, 30, 20), points=[(10, 10, 0)]), Prompt(2, points=[(40, 30, 1)])]
    for bad in ("fluid:1,2,3", "1,2,3,4", "fluid:5,5,1,1", "fluid:a,b,c,d"):
        with pytest.raises(OctSamError, match="--box"):
            parse_box(bad)
    with pytest.raises(OctSamError, match="not a class of this adapter"):
        build_prompts([parse_box("scar:1,1,5,5")], TINY_LABELS, (40, 48), "x")
    with pytest.raises(OctSamError, match="outside the 48x40"):
        build_prompts([parse_box("fluid:1,1,50,5")], TINY_LABELS, (40, 48), "x")


# ------------------------------------------------------------------------------------------------ CLI outputs
def test_cli_odd_inputs_native_size_outputs_and_failures(adapter, segmenter, tmp_path, capsys):
    """16-bit TIFF, RGB JPEG, tiny, very wide and nested B-scans come back at native size; a broken file is
    reported and skipped, the rest written, and the exit code says a B-scan failed."""
    src = tmp_path / "scans"
    (src / "sub").mkdir(parents=True)
    tifffile.imwrite(src / "deep.tif", (scan(40, 48, 1).astype(np.uint16) * 257))
    rgb = np.stack([scan(36, 50, 2), scan(36, 50, 3), np.full((36, 50), 90, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(src / "colour.jpg", quality=95)
    Image.fromarray(scan(5, 7, 4)).save(src / "tiny.png")
    Image.fromarray(scan(16, 600, 5)).save(src / "wide.png")
    Image.fromarray(scan(40, 48, 6)).save(src / "sub" / "nested.bmp")
    (src / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"

    code, err = run_cli(
        [
            "--adapter",
            adapter,
            "--input",
            src,
            "--output",
            out,
            "--save-probabilities",
            "--batch-size",
            "3",
            "--pixel-spacing-mm",
            "0.0039,0.0114",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    assert "broken.png" in err and "1 B-scan(s) could not be segmented" in err and "Traceback" not in err

    names = {
        "deep": "deep.tif",
        "colour": "colour.jpg",
        "tiny": "tiny.png",
        "wide": "wide.png",
        "sub/nested": "sub/nested.bmp",
    }
    rows = {r["scan"]: r for r in read_summary(out / "summary.csv")}
    assert rows["broken"]["status"] == "failed" and "broken.png" in rows["broken"]["source"]
    run = json.loads((out / "run.json").read_text())
    assert run["failed"] == 1 and run["segmented"] == 5 and run["dtype"] == "float32" and run["merged"]
    assert run["adapter"] == str(adapter) and run["device"] == "cpu" and run["timings"]["predict_s"] > 0
    assert read_scan(src / "colour.jpg").ndim == 3  # a true colour input really went through the RGB path
    for name, file in names.items():
        image = read_scan(src / file)
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and mask.max() < len(TINY_LABELS)
        assert np.array_equal(mask, segmenter([image])[0].mask)  # the CLI wraps the Python API
        drawn = np.asarray(Image.open(out / "overlays" / f"{name}.png").convert("RGB"))
        assert drawn.shape[0] > mask.shape[0] and drawn.shape[1] >= mask.shape[1]  # legend strip below
        assert np.array_equal(drawn[: mask.shape[0], : mask.shape[1]], overlay(image, mask, TINY_LABELS))
        probs = np.load(out / "probabilities" / f"{name}.npz")
        assert probs["probabilities"].shape == (3, *mask.shape) and probs["probabilities"].dtype == np.float16
        assert list(probs["labels"]) == TINY_LABELS
        np.testing.assert_allclose(probs["probabilities"].astype(np.float32).sum(0), 1.0, atol=5e-3)
        row = rows[name]
        assert (int(row["height"]), int(row["width"])) == mask.shape and row["status"] == "ok"
        for k, label in enumerate(TINY_LABELS[1:], start=1):
            area = int((mask == k).sum())
            assert int(row[f"{label}_area_px"]) == area
            assert float(row[f"{label}_area_mm2"]) == pytest.approx(area * 0.0039 * 0.0114, abs=1e-6)
            n = cv2.connectedComponents((mask == k).astype(np.uint8), connectivity=8)[0] - 1
            assert int(row[f"{label}_components"]) == n
    assert set(np.unique(np.asarray(Image.open(out / "masks" / "deep.png")))) >= {1, 2}  # both classes drawn


def test_cli_prompted_matches_python_api(adapter, segmenter, tmp_path, capsys):
    """--box/--point (class by name or id) and a --prompts file give the masks of the same Prompt objects."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"scan{i}.png")
        Image.fromarray(scan(40, 48, 10 + i)).save(paths[-1])
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps({"scan1.png": [{"class": "fluid", "box": [20, 18, 46, 38]}]}))
    out = tmp_path / "out"
    code, err = run_cli(
        [
            "--adapter",
            adapter,
            "--input",
            *paths,
            "--output",
            out,
            "--box",
            "drusen:2,3,30,20",
            "--point",
            "1:10,10:neg",
            "--point",
            "fluid:40,30",
            "--prompts",
            prompt_file,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    common = [Prompt(1, box=(2, 3, 30, 20), points=[(10, 10, 0)]), Prompt(2, points=[(40, 30, 1)])]
    # scan1's file box contains the fluid point, so the point joins that box (one object, not two).
    expected = [
        common,
        [Prompt(1, box=(2, 3, 30, 20), points=[(10, 10, 0)]), Prompt(2, box=(20, 18, 46, 38), points=[(40, 30, 1)])],
    ]
    for path, prompts in zip(paths, expected):
        want = segmenter([path], prompts=[prompts])[0].mask
        got = np.asarray(Image.open(out / "masks" / f"{path.stem}.png"))
        assert np.array_equal(got, want)
    run = json.loads((out / "run.json").read_text())
    assert run["mode"] == "prompted" and run["scans_without_prompts"] == 0
    # The box outside an image fails that B-scan only (a larger B-scan that holds both boxes is segmented).
    Image.fromarray(scan(50, 60, 12)).save(tmp_path / "large.png")
    code, err = run_cli(
        [
            "--adapter",
            adapter,
            "--input",
            *paths,
            tmp_path / "large.png",
            "--output",
            tmp_path / "o2",
            "--box",
            "fluid:0,0,47,39",
            "--box",
            "1:0,0,48,41",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1 and "outside the 48x40 B-scan" in err and "2 B-scan(s) could not be segmented" in err
    assert [r["scan"] for r in read_summary(tmp_path / "o2" / "summary.csv") if r["status"] == "ok"] == ["large"]


def test_cli_dataset_inputs(adapter, shape_dataset, tmp_path, capsys):
    code, err = run_cli(
        ["--adapter", adapter, "--dataset", shape_dataset, "--split", "test", "--output", tmp_path / "a", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "a" / "masks").iterdir()) == [f"test-{i}.png" for i in range(4)]
    code, err = run_cli(
        [
            "--adapter",
            adapter,
            "--input",
            shape_dataset,
            "--split",
            "validation",
            "--output",
            tmp_path / "b",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(read_summary(tmp_path / "b" / "summary.csv")) == 4


def test_cli_output_folder_is_never_overwritten_without_flag(adapter, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(scan(40, 48)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--adapter", adapter, "--input", image, "--output", out, "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, err = run_cli(["--adapter", adapter, "--input", image, "--output", out, "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlays", "run.json", "summary.csv"]
    # A run that fails part-way leaves neither a half-written output nor its temporary folder.
    code, _ = run_cli(["--adapter", tmp_path / "nope", "--input", image, "--output", tmp_path / "o3"], capsys)
    assert code == 2 and not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _edited_adapter(adapter: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    data = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    data.update(changes)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "other-project-adapter"}, "is not an octsam adapter"),
        ({"format_version": 99}, "newer octsam"),
        ({"surprise": 1}, "another octsam version"),
        ({"base_model": "no-such-org/no-such-sam"}, "hf download no-such-org/no-such-sam|huggingface-cli download"),
    ],
)
def test_cli_refuses_bad_adapters_with_reason(adapter, tmp_path, capsys, changes, message):
    image = tmp_path / "a.png"
    Image.fromarray(scan(40, 48)).save(image)
    folder = _edited_adapter(adapter, tmp_path, **changes)
    code, err = run_cli(["--adapter", folder, "--input", image, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    assert any(m in err for m in message.split("|")), err
    assert not (tmp_path / "out").exists()


def test_cli_user_errors_exit_2_without_traceback(adapter, prompted_adapter, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(scan(40, 48)).save(image)
    no_config = tmp_path / "peft_only"
    shutil.copytree(adapter, no_config)
    (no_config / ADAPTER_CONFIG_NAME).unlink()
    cases = [
        (["--adapter", no_config, "--input", image], "no octsam_config.json"),
        (["--adapter", "no-such-org/no-such-adapter", "--input", image], "hf download no-such-org/no-such-adapter"),
        (["--adapter", prompted_adapter, "--input", image], "trained in prompted mode"),
        (["--adapter", adapter, "--input", image, "--box", "scar:1,1,5,5"], "1 drusen"),
        (["--adapter", adapter, "--input", image, "--box", "drusen:1,1,5"], "expected 4 comma-separated"),
        (["--adapter", adapter, "--input", tmp_path / "missing.png"], "does not exist"),
        (["--adapter", adapter, "--input", str(tmp_path / "*.tif")], "matches no image files"),
        (["--adapter", adapter, "--input", image, "--pixel-spacing-mm", "0.01"], "--pixel-spacing-mm"),
        (["--adapter", adapter, "--input", image, "--prompts", tmp_path / "none.json"], "does not exist"),
    ]
    for i, (args, message) in enumerate(cases):
        code, err = run_cli([*args, "--output", tmp_path / f"out{i}", "--quiet"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / f"out{i}").exists()


def test_cli_on_real_duke_bscans(adapter, tmp_path, capsys):
    """The CLI on a folder of real Duke DME B-scans: masks, overlays and a summary whose areas match the masks."""
    images = DUKE_DIR / "images"
    if not images.is_dir():
        pytest.skip(f"Duke DME B-scans not found at {images}")
    files = sorted(images.glob("*.png"))[::22]  # 5 B-scans from different patients keep the test fast
    folder = tmp_path / "duke"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    out = tmp_path / "pred"
    code, err = run_cli(["--adapter", adapter, "--input", folder, "--output", out, "--quiet"], capsys)
    assert code == 0, err
    rows = read_summary(out / "summary.csv")
    assert [r["scan"] for r in rows] == [f.stem for f in files]
    for row, f in zip(rows, files):
        image = read_scan(f)
        mask = np.asarray(Image.open(out / "masks" / f"{f.stem}.png"))
        assert mask.shape == image.shape == (496, 768)
        areas, components = class_areas(mask, len(TINY_LABELS))
        assert [int(row[f"{n}_area_px"]) for n in TINY_LABELS[1:]] == areas
        assert [int(row[f"{n}_components"]) for n in TINY_LABELS[1:]] == components
        assert sum(areas) + int((mask == 0).sum()) == mask.size
        drawn = np.asarray(Image.open(out / "overlays" / f"{f.stem}.png").convert("RGB"))
        assert np.array_equal(drawn[:496, :768], overlay(image, mask, TINY_LABELS))


def test_attention_paths_and_compiled_encoder_agree(adapter):
    """transformers' attention, the fast path (auto and fold) and the inductor-compiled, weight-frozen encoder
    give the same logits."""
    from octsam.models.fast_attention import fast_attention_mode

    images = [scan(40, 48, seed=i) for i in range(2)]
    plain = Segmenter.from_pretrained(adapter, device="cpu", fast_attention=False)
    assert fast_attention_mode(plain.model) is None
    reference = plain.class_logits(images)
    assert reference.abs().max() > 0.1
    for mode in (True, "fold"):
        segmenter = Segmenter.from_pretrained(adapter, device="cpu", fast_attention=mode)
        assert fast_attention_mode(segmenter.model) == ("auto" if mode is True else mode)
        assert torch.allclose(segmenter.class_logits(images), reference, atol=1e-5, rtol=0)
    torch._dynamo.reset()
    compiled = Segmenter.from_pretrained(adapter, device="cpu", compile=True)
    assert compiled.model.core.vision_encoder._compiled_call_impl is not None
    keys = set(compiled.model.state_dict())
    assert torch.allclose(compiled.class_logits(images), reference, atol=1e-4, rtol=0)
    assert set(compiled.model.state_dict()) == keys  # compiled in place: no _orig_mod keys


def test_cli_attention_flags_give_the_same_masks(adapter, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(scan(40, 48, seed=i)).save(folder / f"s{i}.png")
    runs = {
        "default": ([], "octsam fast (auto)", False),
        "transformers": (["--no-fast-attention"], "transformers", False),
        "fold": (["--attention-mode", "fold"], "octsam fast (fold)", False),
        "compiled": (["--compile"], "octsam fast (auto)", True),
    }
    masks = {}
    torch._dynamo.reset()
    for name, (flags, attention, compiled) in runs.items():
        out = tmp_path / name
        code, err = run_cli(["--adapter", adapter, "--input", folder, "--output", out, "--quiet", *flags], capsys)
        assert code == 0, err
        masks[name] = [np.array(Image.open(out / "masks" / f"s{i}.png")) for i in range(2)]
        record = json.loads((out / "run.json").read_text())
        assert (record["attention"], record["compiled"]) == (attention, compiled)
    for name in runs:
        for a, b in zip(masks["default"], masks[name]):
            np.testing.assert_array_equal(a, b)


def test_inference_speed_benchmark_smoke(tiny_base, capsys):
    """benchmarks/inference_speed.py runs transformers' default and octsam's path side by side (no speed asserted):
    same masks, one table row per setting."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inference_speed.py"
    spec = importlib.util.spec_from_file_location("inference_speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--base", tiny_base, "--devices", "cpu", "--settings", "transformers,octsam", "--scans", "2"]
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 2 and "transformers default" in rows[0] and "octsam default" in rows[1]
    assert all("| 100.000 % |" in row for row in rows)  # the fast merged path gives the default's masks
    with pytest.raises(SystemExit):
        bench.main(["--settings", "nonsense"])


def test_cli_dataset_with_other_labels_is_refused(adapter, tmp_path, capsys):
    """inference.py --dataset refuses an adapter whose labels differ from the dataset's, as evaluate does."""
    from conftest import write_shape_dataset

    other = write_shape_dataset(tmp_path / "other")
    labels_file = Path(other) / "id2label.json"
    labels_file.write_text(json.dumps({"0": "background", "1": "scar", "2": "fluid"}))
    code, err = run_cli(["--adapter", adapter, "--dataset", other, "--output", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and "same label set" in err and "scar" in err and not (tmp_path / "o").exists()


def test_cli_on_volumes_writes_eye_reports(adapter, tmp_path, capsys):
    """inference.py on a DICOM OCT volume and on a folder of B-scans with --spacing: masks per B-scan, one folder
    per eye with its report, and volumes.csv; Segmenter.segment_volume gives the same masks."""
    from test_volumes import write_oct_dicom

    from octsam.volumes import read_volume

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 40, 48)).astype(np.uint8)
    dicom = write_oct_dicom(tmp_path / "eye.dcm", frames)
    folder = tmp_path / "bscans"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"b{i:02d}.png")
    out = tmp_path / "out"
    code, err = run_cli(["--adapter", adapter, "--input", dicom, "--output", out, "--quiet"], capsys)
    assert code == 0, err
    rows = (out / "volumes.csv").read_text().splitlines()
    assert len(rows) == 2 and "fluid" in rows[0]
    (eye,) = [p for p in out.iterdir() if p.is_dir()]
    assert (eye / "report.png").is_file() and (eye / "report.json").is_file()
    masks = sorted((eye / "masks").iterdir())
    assert len(masks) == 3
    expected = Segmenter.from_pretrained(adapter, device="cpu").segment_volume(read_volume(dicom)[0])
    assert np.array_equal(np.asarray(Image.open(masks[1])), expected.masks[1])
    code, err = run_cli(
        ["--adapter", adapter, "--input", folder, "--spacing", "0.0039,0.0117,0.05", "--output", tmp_path / "f"],
        capsys,
    )
    assert code == 0, err and (tmp_path / "f" / "volumes.csv").is_file()
    code, err = run_cli(
        ["--adapter", adapter, "--input", folder, "--output", tmp_path / "g", "--spacing", "0,1"], capsys
    )
    assert code == 2 and "spacing" in err.lower() and not (tmp_path / "g").exists()


def test_cli_on_volumes_honours_the_model_flags(adapter, tmp_path, capsys, monkeypatch):
    """Volumes go through the same run as B-scans: --batch-size, --save-probabilities, --precision and the speed
    plan reach the model, the writers write each eye, and run.json records them as for B-scans."""
    from test_volumes import write_oct_dicom

    from octsam.segmenter import Segmenter as Loaded

    calls = []
    original = Loaded.__call__

    def spy(self, images, *args, **kwargs):
        calls.append((self.batch_size, len(images), kwargs.get("return_probabilities")))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Loaded, "__call__", spy)
    frames = np.random.default_rng(1).integers(0, 255, (5, 40, 48)).astype(np.uint8)
    dicom = write_oct_dicom(tmp_path / "eye.dcm", frames)
    out = tmp_path / "out"
    argv = ["--adapter", adapter, "--input", dicom, "--output", out, "--quiet", "--batch-size", "2"]
    code, err = run_cli([*argv, "--save-probabilities", "--precision", "fp32", "--no-compile"], capsys)
    assert code == 0, err
    assert calls == [(2, 5, True)]
    (eye,) = [p for p in out.iterdir() if p.is_dir()]
    probabilities = sorted((eye / "probabilities").iterdir())
    assert len(probabilities) == 5
    with np.load(probabilities[0]) as saved:
        assert saved["probabilities"].shape == (3, 40, 48) and list(saved["labels"]) == [
            "background",
            "drusen",
            "fluid",
        ]
    record = json.loads((out / "run.json").read_text())
    assert record["batch_size"] == 2 and record["dtype"] == "float32" and record["compiled"] is False
    assert record["volumes"] == [str(dicom)] and record["segmented"] == 5 and record["adapter_folder"]
    # the same eye without --save-probabilities, written by a writer process: the same masks, no probabilities
    masks = {p.name: np.asarray(Image.open(p)) for p in (eye / "masks").iterdir()}
    code, err = run_cli([*argv, "--overwrite", "--writer", "process", "--write-workers", "1"], capsys)
    assert code == 0, err
    assert not (eye / "probabilities").exists() and (eye / "report.png").is_file()
    assert all(np.array_equal(np.asarray(Image.open(eye / "masks" / name)), mask) for name, mask in masks.items())


def _overlay_reference(image, mask, labels, alpha=0.45):
    """``overlay`` as it was written first (whole-image float64 blend, scipy erosion), the yardstick of the fast one."""
    from scipy import ndimage

    from octsam.colors import class_color

    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.astype(np.float64)
    for c in [int(c) for c in np.unique(mask) if c != 0]:
        region = mask == c
        color = np.array(class_color(c, labels), dtype=np.float64)
        out[region] = (1.0 - alpha) * out[region] + alpha * color
        if c != 255:
            out[region & ~ndimage.binary_erosion(region)] = color
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_overlay_is_bit_identical_to_the_whole_image_blend():
    """The overlay blends only class pixels and erodes with OpenCV: the same pixels as the original, borders at the
    image edge and ignored (255) pixels included."""
    rng = np.random.default_rng(7)
    for shape in [(37, 53), (5, 7), (64, 64, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = rng.choice([0, 0, 1, 2, 3, 255], size=shape[:2]).astype(np.uint8)
        mask[: shape[0] // 2, : shape[1] // 2] = 1  # a block touching the image edge
        np.testing.assert_array_equal(
            overlay(image, mask, ["bg", "a", "b", "c"]), _overlay_reference(image, mask, ["bg", "a", "b", "c"])
        )


def test_parallel_writers_are_deterministic_and_summary_is_natural(adapter, tmp_path, capsys):
    """Three readers and three writer processes write the same files as one reader and one writer thread;
    summary.csv lists B-scans in natural order (Image 1, Image 2, Image 10); run.json reports each stage's time."""
    src = tmp_path / "scans"
    src.mkdir()
    for i in (10, 1, 2, 11, 3):
        Image.fromarray(scan(24, 30, seed=i)).save(src / f"Image {i}.png")
    outputs = {}
    for workers, kind in (("1", "thread"), ("3", "process")):
        out = tmp_path / f"out{workers}"
        flags = ["--read-workers", workers, "--write-workers", workers, "--writer", kind, "--batch-size", "2"]
        code, err = run_cli(["--adapter", adapter, "--input", src, "--output", out, "--quiet", *flags], capsys)
        assert code == 0, err
        outputs[workers] = out
    names = [r["scan"] for r in read_summary(outputs["3"] / "summary.csv")]
    assert names == ["Image 1", "Image 2", "Image 3", "Image 10", "Image 11"]
    for sub in ("masks", "overlays"):
        for f in sorted((outputs["1"] / sub).iterdir()):
            assert f.read_bytes() == (outputs["3"] / sub / f.name).read_bytes(), f
    assert (outputs["1"] / "summary.csv").read_text() == (outputs["3"] / "summary.csv").read_text()
    timings = json.loads((outputs["3"] / "run.json").read_text())["timings"]
    for key in ("read_s_per_scan", "predict_s_per_scan", "write_s_per_scan", "scans_per_s", "steady_scans_per_s"):
        assert timings[key] > 0, timings
    assert timings["compile_s"] is None  # CPU, 5 B-scans: not compiled


def test_short_batch_of_a_compiled_segmenter_is_padded(adapter):
    """A compiled encoder is specialised to its batch size: the last, short batch is padded (same logits)."""
    images = [scan(40, 48, seed=i) for i in range(3)]
    plain = Segmenter.from_pretrained(adapter, device="cpu", batch_size=4)
    reference = plain.class_logits(images)
    seen = []
    encoder = plain.model.core.vision_encoder
    hook = encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    plain.compiled = True  # as after compile_encoder(), without compiling
    try:
        padded = plain.class_logits(images)
    finally:
        hook.remove()
    assert seen == [4] and padded.shape[0] == 3
    assert torch.allclose(padded, reference, atol=1e-5, rtol=0)


def test_evaluate_cli_on_annotated_volumes(tiny_base, tmp_path, capsys):
    """octsam-evaluate --volumes: per eye predicted vs true fluid mm³ and their error, over eyes Pearson r."""
    from test_volumes import write_duke_mat

    from octsam.cli.evaluate import main as evaluate_main

    fluid_adapter = make_adapter(tiny_base, tmp_path / "fluid", labels=["background", "fluid"])
    files = [write_duke_mat(tmp_path / f"Subject_0{i}.mat")[0] for i in (1, 2)]
    code = evaluate_main(
        ["--adapter", str(fluid_adapter), "--volumes", *map(str, files), "--spacing", "0.0039,0.0117,0.12",
         "--output", str(tmp_path / "ev"), "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((tmp_path / "ev" / "volumes.json").read_text())
    assert len(result["eyes"]) == 2 and result["eyes"][0]["annotated_bscans"] == 2
    assert result["eyes"][0]["true_mm3"]["fluid"] > 0 and "pearson_r" in result["agreement"]["fluid"]
    assert "mean absolute volume error" in out.out
    rows = (tmp_path / "ev" / "volumes_eval.csv").read_text().splitlines()
    assert rows[0].startswith("volume_id,class") and len(rows) == 3


def test_writer_processes_run_one_opencv_thread_each():
    """Writer processes use one OpenCV thread each: the pool is the parallelism (12 writers with 16 OpenCV threads
    each oversubscribed the 16-core GPU machine). OpenCV's pool is used here first: setting the thread count inside
    a forked child then deadlocked (CI hung for 90 minutes), so the count is inherited instead; this process keeps
    its own."""
    import cv2

    from octsam.infer.run import start_writers

    before = cv2.getNumThreads()
    image = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    cv2.GaussianBlur(image, (31, 31), 5)  # OpenCV's thread pool is running in this process now
    pool = start_writers("process", 2, "cuda")
    try:
        assert {pool.submit(cv2.getNumThreads).result(timeout=60) for _ in range(4)} == {1}
    finally:
        pool.shutdown(wait=True)
    assert cv2.getNumThreads() == before


def test_precision_bf16_on_the_cpu_is_recorded_and_close_to_fp32(adapter, tmp_path, capsys):
    """--precision bf16 runs the model under bf16 autocast on the CPU too (run.json says so); its logits stay close
    to fp32's; an unknown precision is refused by name."""
    from octsam.segmenter import resolve_precision

    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(scan(24, 30, seed=3)).save(src / "a.png")
    out = tmp_path / "out"
    code, err = run_cli(
        ["--adapter", adapter, "--input", src, "--output", out, "--quiet", "--precision", "bf16"], capsys
    )
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["dtype"] == "bfloat16" and (out / "masks" / "a.png").is_file()
    images = [scan(40, 48, seed=i) for i in range(2)]
    fp32 = Segmenter.from_pretrained(adapter, device="cpu", precision="fp32").class_logits(images)
    bf16 = Segmenter.from_pretrained(adapter, device="cpu", precision="bf16").class_logits(images)
    assert bf16.dtype == torch.float32  # logits come back in fp32 either way
    assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max() + 1e-3
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(OctSamError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_cli_fold_ensemble_and_flip_tta_match_the_python_api(adapter, tiny_base, tmp_path, capsys):
    second = make_adapter(tiny_base, tmp_path / "second", seed=1)
    image = scan(40, 56, seed=3)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code, _ = run_cli(["--adapter", str(adapter), "--adapter", str(second), "--tta", "flip", "--input",
                       str(tmp_path / "a.png"), "--output", str(out), "--no-fast-attention"], capsys)  # fmt: skip
    assert code == 0
    expected = Segmenter.from_pretrained([adapter, second], device="cpu", fast_attention=False, tta="flip")([image])
    written = np.asarray(Image.open(out / "masks" / "a.png"))
    assert (written == expected[0].mask).all()
    record = json.loads((out / "run.json").read_text())
    assert record["ensemble"] == [str(adapter), str(second)] and record["tta"] == "flip"
    single = Segmenter.from_pretrained(adapter, device="cpu", fast_attention=False)([image])[0].mask
    assert record["adapter"] == f"{adapter} + {second}" and single.shape == written.shape


def test_cli_output_that_is_or_holds_the_input_is_refused_naming_both(adapter, tmp_path, capsys):
    """--output equal to --input, or a folder that holds it, is refused by name (not "No input B-scans"), and with
    --overwrite the inputs are never touched; an --output inside the --input folder is fine (it is skipped)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(scan(40, 48)).save(scans / "a.png")
    cases = [
        (["--input", scans, "--output", scans], "is --input"),
        (["--input", scans / "a.png", "--output", scans], "contains --input"),
        (["--input", str(scans / "*.png"), "--output", scans], "is --input"),
        (["--input", scans, "--output", tmp_path], "contains --input"),
    ]
    for args, message in cases:
        for extra in ([], ["--overwrite"]):
            code, err = run_cli(["--adapter", adapter, *args, *extra, "--quiet"], capsys)
            assert code == 2 and message in err and "--output" in err and "Traceback" not in err, (args, err)
            assert "No input B-scans" not in err and "not empty" not in err, err
            assert sorted(p.name for p in scans.iterdir()) == ["a.png"]
    code, err = run_cli(["--adapter", adapter, "--input", scans, "--output", scans / "out", "--quiet"], capsys)
    assert code == 0, err
    assert len(read_summary(scans / "out" / "summary.csv")) == 1


@pytest.mark.parametrize("shape", [(10, 100_000), (100_000, 10)])
def test_cli_extreme_aspect_scan_is_refused_and_leaves_no_output(adapter, tmp_path, capsys, shape):
    """A 100000 x 10 or 10 x 100000 "B-scan" is refused from its header by name (octsam's MAX_SCAN_ASPECT); a run in
    which no B-scan could be segmented leaves no output folder (nor its staging folder) and exits 2; beside a good
    B-scan it is one listed failure (exit 1)."""
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.fromarray(np.zeros(shape, np.uint8)).save(strip)
    out = tmp_path / "out"
    code, err = run_cli(["--adapter", adapter, "--input", strip, "--output", out, "--quiet"], capsys)
    assert code == 2 and "strip.png" in err and "MAX_SCAN_ASPECT" in err and "Traceback" not in err, err
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    # an existing output is kept as it was, even with --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--adapter", adapter, "--input", strip, "--output", out, "--overwrite", "--quiet"], capsys)
    assert code == 2 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    Image.fromarray(scan(40, 48)).save(tmp_path / "in" / "good.png")
    code, err = run_cli(
        ["--adapter", adapter, "--input", tmp_path / "in", "--output", tmp_path / "o2", "--quiet"], capsys
    )
    assert code == 1 and "MAX_SCAN_ASPECT" in err
    assert [r["scan"] for r in read_summary(tmp_path / "o2" / "summary.csv") if r["status"] == "ok"] == ["good"]


def test_cli_extreme_aspect_scan_in_a_dataset_is_refused(adapter, tmp_path, capsys):
    """A dataset's 10 x 100000 image is refused like a file's (MAX_SCAN_ASPECT), leaving no output folder."""
    import datasets

    def split(shape):
        rows = {
            "image": [Image.fromarray(np.zeros(shape, np.uint8))],
            "mask": [Image.fromarray(np.zeros(shape, np.uint8))],
        }
        rows |= {k: ["x"] for k in ("patient_id", "scan_id", "disease", "source")}
        features = {"image": datasets.Image(), "mask": datasets.Image()}
        features |= {k: datasets.Value("string") for k in ("patient_id", "scan_id", "disease", "source")}
        return datasets.Dataset.from_dict(rows, features=datasets.Features(features))

    data = tmp_path / "data"
    splits = {"train": split((40, 48)), "validation": split((40, 48)), "test": split((10, 100_000))}
    datasets.DatasetDict(splits).save_to_disk(str(data))
    (data / "id2label.json").write_text(json.dumps(dict(enumerate(TINY_LABELS))))
    code, err = run_cli(["--adapter", adapter, "--dataset", data, "--output", tmp_path / "out", "--quiet"], capsys)
    assert code == 2 and "MAX_SCAN_ASPECT" in err and "test[0]" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
