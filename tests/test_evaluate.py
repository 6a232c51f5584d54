"""octsam.evaluation.compare: the comparison command end to end (tiny SAM + LoRA, tiny U-Net, zero-shot), prompts, errors."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LABELS
from PIL import Image

from octsam.adapter import OctSamConfig
from octsam.cli.evaluate import main, parse_adapter_arg
from octsam.cli.train import main as train_main
from octsam.data.contract import parse_pixel_spacing as parse_spacing
from octsam.errors import OctSamError
from octsam.evaluation.compare import ci_note, run_comparison
from octsam.evaluation.predict import ground_truth_prompts
from octsam.models.sam import OctSamModel


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def train(dataset: str, out: Path, *extra: str) -> Path:
    args = [
        "--dataset", dataset, "--output_dir", str(out), "--num_workers", "0", "--report_to", "none",
        "--effective_batch_size", "4", "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
        "--early_stopping_patience", "0", "--evaluate_test", "false", "--augment", "false", "--lora_dropout", "0",
        "--learning_rate", "1e-2", *extra,
    ]  # fmt: skip
    assert train_main(args) == 0
    return out / "best_adapter"


@pytest.fixture(scope="module")
def runs(shape_dataset, tiny_base, tmp_path_factory) -> dict[str, Path]:
    """A tiny SAM adapter (automatic mode) and a tiny U-Net, each trained for 2 epochs through octsam.training.main,
    and an untrained prompted-mode adapter (only its evaluation path matters here)."""
    root = tmp_path_factory.mktemp("runs")
    prompted = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base, mode="prompted"))
    return {
        "sam": train(shape_dataset, root / "sam", "--base_model", tiny_base),
        "prompted": prompted.save_pretrained(root / "prompted" / "best_adapter"),
        "unet": train(
            shape_dataset,
            root / "unet",
            "--model",
            "unet",
            "--unet_image_size",
            "32",
            "--unet_channels",
            "4",
            "8",
            "16",
        ),  # fmt: skip
    }


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_png(path: Path, min_size: int = 80) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    image = np.asarray(Image.open(path).convert("L"))
    assert min(image.shape) >= min_size and image.std() > 5, path  # a drawn figure, not a blank canvas


def test_ground_truth_prompts_one_exact_box_per_instance():
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:8] = 1  # class 1, first component: x 3..7, y 2..4
    mask[10:16, 20:23] = 1  # class 1, second component: x 20..22, y 10..15
    mask[12, 5] = 2  # class 2: a single pixel
    mask[0, 29] = 255  # ignored pixels never become prompts
    prompts = ground_truth_prompts(mask, num_labels=3)
    found = sorted((p.label, p.box) for p in prompts)
    assert found == [(1, (3.0, 2.0, 7.0, 4.0)), (1, (20.0, 10.0, 22.0, 15.0)), (2, (5.0, 12.0, 5.0, 12.0))]
    assert all(p.points == [] for p in prompts)  # boxes only, no points
    assert ground_truth_prompts(np.zeros((8, 8), np.uint8), 3) == []


def test_cli_compares_zero_shot_lora_prompted_and_unet(runs, shape_dataset, tmp_path, capsys):
    out = tmp_path / "results"
    argv = [
        "--adapter", str(runs["sam"]), "--adapter", f"LoRA boxes={runs['prompted']}", "--adapter", str(runs["unet"]),
        "--method", "zero-shot", "--dataset", shape_dataset, "--split", "test", "--output", str(out),
        "--pixel-spacing-mm", "0.004,0.012", "--n-bootstrap", "50", "--device", "cpu", "--dpi", "60",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    methods = ["zero-shot", "LoRA", "LoRA boxes (prompted, GT boxes)", "U-Net"]

    seed = rows(out / "sam_lora_performance.csv")
    assert list(seed[0]) == ["Method", "Mean_IoU", "Mean_Dice"]
    assert [r["Method"] for r in seed] == methods
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["methods"]["zero-shot"]["kind"] == "zero-shot"
    assert summary["methods"]["LoRA boxes (prompted, GT boxes)"]["kind"] == "prompted"
    for r in seed:  # the seed CSV holds the foreground headline, rounded to 4 decimals
        assert float(r["Mean_Dice"]) == pytest.approx(summary["methods"][r["Method"]]["mean_dice"], abs=6e-5)
    with_bg = rows(out / "sam_lora_performance_with_background.csv")
    for r in with_bg:
        expected = summary["methods"][r["Method"]]["mean_dice_with_background"]
        assert float(r["Mean_Dice"]) == pytest.approx(expected, abs=6e-5)
    comparison = rows(out / "comparison.csv")
    assert "mean_dice_with_background_seed_compatible" in comparison[0]

    per_class = rows(out / "per_class.csv")
    assert {(r["method"], r["class_name"]) for r in per_class} == {(m, c) for m in methods for c in TINY_LABELS[1:]}
    for r in per_class:
        if r["dice_mean"]:
            assert float(r["dice_ci_low"]) <= float(r["dice_mean"]) + 1e-9 <= float(r["dice_ci_high"]) + 2e-9
        assert r["area_abs_error_mm2_mean"] != ""  # --pixel-spacing-mm reached the metrics
    for slug in ("zero-shot", "lora", "u-net"):
        assert (out / f"{slug}_per_image.csv").is_file() and (out / f"{slug}_detection.csv").is_file()
        assert_png(out / f"confusion_{slug}.png")
    assert_png(out / "metric_bars.png")
    assert_png(out / "qualitative_grid.png")
    # Histories are found next to RUN/best_adapter, so the command draws the training curves too.
    assert_png(out / "training_curves_lora.png")
    assert_png(out / "training_curves_u-net.png")
    assert not (out / "training_curves_lora_boxes_prompted_gt_boxes.png").exists()  # never trained: no history

    report = (out / "report.md").read_text()
    for method in methods:
        assert method in report and method in printed
    for figure in ("metric_bars.png", "qualitative_grid.png", "confusion_u-net.png", "training_curves_lora.png"):
        assert f"]({figure})" in report
    assert "bootstrap" in report and "publication-compatible" in report
    from octsam.protocol import protocol_text

    assert protocol_text(True) in report  # the tiny base is a SAM ViT: best of 3 masks
    assert summary["methods"]["zero-shot"]["settings"]["zero_shot_multimask"] is True
    assert not list(tmp_path.glob(".results.tmp-*"))


def test_cli_ensemble_tta_and_native_zero_shot(runs, shape_dataset, tiny_base, tmp_path, capsys):
    """One NAME given twice is an ensemble (same Dice as the Python ensemble); --tta and the native zero-shot
    reach the evaluation."""
    from octsam.evaluation.predict import evaluate_model

    out = tmp_path / "ens"
    argv = [
        "--adapter", f"Ens={runs['sam']}", "--adapter", f"Ens={runs['unet']}", "--tta", "flip", "--method",
        "zero-shot", "--zero-shot-input-mode", "native", "--base-model", tiny_base, "--dataset",
        shape_dataset, "--output", str(out), "--n-bootstrap", "20", "--device", "cpu", "--dpi", "40",
    ]  # fmt: skip
    # a U-Net and a SAM adapter do not share their input: refused with the reason
    assert main(argv) == 2 and "ensemble" in capsys.readouterr().err
    argv[3] = f"Ens={runs['sam']}"
    assert main(argv) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["methods"]["Ens"]["source"] == str([str(runs["sam"]), str(runs["sam"])])
    from datasets import load_from_disk

    split = load_from_disk(shape_dataset)["test"]
    expected = evaluate_model(str(runs["sam"]), split, TINY_LABELS, None, device="cpu", tta="flip", n_bootstrap=20)
    assert summary["methods"]["Ens"]["mean_dice"] == pytest.approx(expected.headline["mean_dice"], abs=1e-6)


def test_unet_baseline_trains_and_evaluates_through_the_same_command(runs, shape_dataset, tmp_path):
    config = json.loads((runs["unet"] / "octsam_config.json").read_text())
    assert config["architecture"] == "unet"
    out = tmp_path / "unet_only"
    summary = run_comparison(shape_dataset, {"U-Net": str(runs["unet"])}, output_dir=out, n_bootstrap=20,
                             device="cpu", verbose=False, figure_dpi=50)  # fmt: skip
    assert list(summary["methods"]) == ["U-Net"]
    dice = summary["methods"]["U-Net"]["mean_dice"]
    assert 0.0 <= dice <= 1.0
    assert summary["n_images"] == 4 and summary["n_patients"] == 2
    assert "only draw 3 different patient sets" in summary["ci_note"]


def test_errors_name_the_fix(runs, shape_dataset, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert main(["--adapter", str(runs["unet"]), "--dataset", shape_dataset, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "keep me"

    # An adapter trained for other labels than the dataset's.
    other = tmp_path / "other_labels"
    other.mkdir()
    for f in runs["unet"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "octsam_config.json").read_text())
    config["labels"] = ["background", "fluid"]
    (other / "octsam_config.json").write_text(json.dumps(config))
    assert main(["--adapter", str(other), "--dataset", shape_dataset, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "['background', 'fluid']" in err and "same label set" in err
    assert not (tmp_path / "x").exists()

    with pytest.raises(OctSamError, match="no \\(or an empty\\) 'dev' split"):
        run_comparison(shape_dataset, {"U-Net": str(runs["unet"])}, output_dir=tmp_path / "y", split="dev")
    with pytest.raises(OctSamError, match="Nothing to evaluate"):
        run_comparison(shape_dataset, {}, output_dir=tmp_path / "z")
    assert main(["--method", "zero-shot", "--dataset", shape_dataset, "--output", str(tmp_path / "w")]) == 2
    assert "--base-model" in capsys.readouterr().err
    with pytest.raises(OctSamError, match="Y,X"):
        parse_spacing("0.01")


def test_argument_helpers():
    assert parse_adapter_arg("U-Net=runs/unet/best_adapter") == ("U-Net", "runs/unet/best_adapter")
    assert parse_adapter_arg("org/repo") == (None, "org/repo")
    assert parse_spacing("0.0039,0.0116") == (0.0039, 0.0116)
    assert "only draw 3 different" in ci_note(2, 22, 1000)
    assert "only draw" not in ci_note(40, 400, 1000)


def test_the_protocol_is_one_text_true_per_base():
    """octsam.protocol is what report.md, the cards and the README say; the zero-shot sentence follows the base."""
    from conftest import REPO_ROOT

    from octsam import cards
    from octsam.evaluation.report import _protocol
    from octsam.protocol import HEADLINE_RULE, protocol_text, same_text, zero_shot_rule

    sam = {"methods": {"zero-shot": {"settings": {"zero_shot_multimask": True}}}}
    lite = {"methods": {"zero-shot": {"settings": {"zero_shot_multimask": False}}}}
    assert "best of SAM's 3 masks" in _protocol(sam, {"zero-shot": "zero-shot", "LoRA": "sam"})
    lite_text = _protocol(lite, {"zero-shot": "zero-shot"})
    assert "one mask per box" in lite_text and "3 masks" not in lite_text
    assert "Zero-shot" not in _protocol({"methods": {}}, {"U-Net": "unet"})
    assert HEADLINE_RULE in cards.PROTOCOL and "Zero-shot" not in cards.PROTOCOL
    readme = (REPO_ROOT / "README.md").read_text()
    assert same_text(protocol_text(), protocol_text()) and " ".join(protocol_text().split()) in " ".join(
        readme.split()
    )
    assert zero_shot_rule(None).count("3 masks") == 1
