"""octsam.evaluation.metrics against hand-computed values, MONAI, the evaluate module, and bootstrap properties."""

import json
import math
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import get_confusion_matrix

from octsam.errors import OctSamError
from octsam.evaluation.metrics import (
    bootstrap_ci,
    confusion_counts,
    dice_from_stats,
    evaluate_predictions,
    iou_from_stats,
    segmentation_stats,
)
from octsam.evaluation.report import comparison_table, write_publication_csv, write_results

REPO = Path(__file__).resolve().parents[1]
LABELS = ["background", "a", "b"]


def _pair():
    """6 x 8 masks. Class a: truth 6 px, prediction 6 px, overlap 4. Class b: truth 3 px, 1 px predicted elsewhere."""
    ref = np.zeros((6, 8), np.uint8)
    ref[1:3, 1:4] = 1
    ref[4, 4:7] = 2
    pred = np.zeros_like(ref)
    pred[1:3, 2:5] = 1
    pred[0, 0] = 2
    return pred, ref


def _row(result, image_index, class_name):
    table = result.per_image
    return table[(table.image_index == image_index) & (table.class_name == class_name)].iloc[0]


def test_hand_computed_dice_iou_areas_and_mm2():
    pred, ref = _pair()
    result = evaluate_predictions([pred], [ref], LABELS, pixel_spacing_mm=(0.004, 0.012), n_bootstrap=10)
    a, b = _row(result, 0, "a"), _row(result, 0, "b")
    assert a.dice == pytest.approx(2 * 4 / (6 + 6))
    assert a.iou == pytest.approx(4 / 8)
    assert (a.area_true_px, a.area_pred_px, a.area_error_px) == (6, 6, 0)
    assert a.area_true_mm2 == pytest.approx(6 * 0.004 * 0.012)
    assert b.dice == 0.0 and b.iou == 0.0
    assert (b.area_true_px, b.area_pred_px, b.area_error_px) == (3, 1, -2)
    assert b.area_error_mm2 == pytest.approx(-2 * 0.004 * 0.012)
    # HD95 of class b: the predicted pixel (0, 0) to the truth row (4, 4..6): distances sqrt(32), sqrt(41), sqrt(52)
    # one way, sqrt(32) the other; MONAI takes the 95th percentile of each direction (linear) and the larger one.
    one_way = np.sqrt([32.0, 41.0, 52.0])
    assert b.hd95_px == pytest.approx(np.quantile(one_way, 0.95))
    assert a.hd95_px == pytest.approx(1.0)
    headline = result.headline
    assert headline["mean_dice"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert headline["mean_iou"] == pytest.approx((0.5 + 0.0) / 2)
    # background: truth 48 - 9 = 39 px, prediction 48 - 7 = 41 px, both background 48 - (9 + 7 - 4) = 36 px
    background_dice = 2 * 36 / (39 + 41)
    assert headline["mean_dice_with_background"] == pytest.approx((background_dice + 2 / 3 + 0.0) / 3)


def test_hd95_percentile_and_anisotropic_spacing():
    ref = np.zeros((12, 12), np.uint8)
    ref[0, 0] = 1
    pred = ref.copy()
    pred[0, 10] = 1  # distances pred->truth [0, 10]: 95th percentile 9.5 (max would be 10)
    vertical_ref = np.zeros((12, 12), np.uint8)
    vertical_ref[1:11, 2] = 1
    vertical_pred = np.zeros_like(vertical_ref)
    vertical_pred[1:11, 5] = 1  # 3 columns away: 3 px = 3 * X spacing
    horizontal_ref = vertical_ref.T.copy()
    horizontal_pred = vertical_pred.T.copy()  # 3 rows away: 3 * Y spacing
    result = evaluate_predictions(
        [pred, vertical_pred, horizontal_pred],
        [ref, vertical_ref, horizontal_ref],
        ["background", "x"],
        pixel_spacing_mm=(0.5, 2.0),
        n_bootstrap=10,
    )
    hd_px = result.per_image["hd95_px"].to_numpy()
    hd_mm = result.per_image["hd95_mm"].to_numpy()
    np.testing.assert_allclose(hd_px, [9.5, 3.0, 3.0])
    np.testing.assert_allclose(hd_mm, [9.5 * 2.0, 3.0 * 2.0, 3.0 * 0.5])


def test_empty_rule_and_detection_table():
    shape = (5, 5)
    present = np.zeros(shape, np.uint8)
    present[1:3, 1:3] = 1
    empty = np.zeros(shape, np.uint8)
    # image 0: TP (present, predicted), 1: FN (present, missed), 2: FP (absent, predicted), 3: TN (absent, absent)
    preds = [present, empty, present, empty]
    refs = [present, present, empty, empty]
    result = evaluate_predictions(preds, refs, ["background", "lesion"], n_bootstrap=10)
    dice = result.per_image["dice"].to_numpy()
    iou = result.per_image["iou"].to_numpy()
    np.testing.assert_array_equal(dice[:3], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(iou[:3], [1.0, 0.0, 0.0])
    assert math.isnan(dice[3]) and math.isnan(iou[3])
    assert result.per_class.loc[0, "dice_mean"] == pytest.approx(1 / 3)  # the TN B-scan is excluded
    assert result.per_class.loc[0, "dice_n_images"] == 3
    assert np.isnan(result.per_image["hd95_px"].to_numpy()[1:]).all()  # HD95 needs both masks non-empty
    assert result.per_class.loc[0, "hd95_px_n_images"] == 1
    det = result.detection.iloc[0]
    assert (det.tp, det.fp, det.fn, det.tn) == (1, 1, 1, 1)
    assert det.sensitivity == pytest.approx(0.5) and det.specificity == pytest.approx(0.5)
    # A class absent everywhere: undefined (NaN), not 0 and not 1.
    none = evaluate_predictions([empty], [empty], ["background", "lesion"], n_bootstrap=10)
    assert math.isnan(none.per_class.loc[0, "dice_mean"]) and math.isnan(none.headline["mean_dice"])


def test_ignore_label_counts_in_neither_prediction_nor_truth():
    ref = np.zeros((6, 6), np.uint8)
    ref[1:3, 1:3] = 1
    ref[4:, :] = 255
    pred = np.zeros_like(ref)
    pred[1:3, 1:3] = 1
    pred[4:, :] = 1  # all wrong if counted, but ignored
    result = evaluate_predictions([pred], [ref], ["background", "lesion"], n_bootstrap=10)
    row = _row(result, 0, "lesion")
    assert row.dice == 1.0 and row.iou == 1.0 and row.hd95_px == 0.0
    assert (row.area_true_px, row.area_pred_px) == (4, 4)
    assert result.confusion.sum() == 24 and result.confusion[0, 1] == 0
    stats = segmentation_stats(torch.from_numpy(pred)[None], torch.from_numpy(ref)[None], 2)
    assert stats.tolist() == [[[4, 0, 0]]]
    # an ignored pixel inside a region: predicted there or not makes no difference
    ref2 = ref.copy()
    ref2[1, 1] = 255
    for pred2 in (pred, np.where(ref2 == 255, 0, pred).astype(np.uint8)):
        out = evaluate_predictions([pred2], [ref2], ["background", "lesion"], n_bootstrap=10)
        assert _row(out, 0, "lesion").dice == 1.0


def test_pooled_values_differ_from_per_image_mean():
    pred1, ref1 = _pair()  # class a: tp 4, fp 2, fn 2
    ref2 = np.zeros((4, 4), np.uint8)
    ref2[0, :] = 1
    pred2 = np.zeros_like(ref2)
    pred2[0, 0] = 1  # class a: tp 1, fp 0, fn 3 (another image size)
    result = evaluate_predictions([pred1, pred2], [ref1, ref2], LABELS, n_bootstrap=10)
    a = result.per_class.set_index("class_name").loc["a"]
    assert a.dice_mean == pytest.approx((8 / 12 + 2 / 5) / 2)
    assert a.dice_pooled == pytest.approx(2 * 5 / (2 * 5 + 2 + 5))
    assert a.iou_pooled == pytest.approx(5 / (5 + 2 + 5))
    assert a.iou_mean == pytest.approx((4 / 8 + 1 / 4) / 2)


def test_confusion_matrix_and_stats_match_monai_and_brute_force():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 4, size=(3, 9, 11))
    refs = rng.integers(0, 4, size=(3, 9, 11))
    refs[:, 0, :] = 255
    counts = confusion_counts(torch.from_numpy(preds), torch.from_numpy(refs), 4)
    for b in range(3):
        valid = refs[b] != 255
        brute = np.zeros((4, 4), np.int64)
        np.add.at(brute, (refs[b][valid], preds[b][valid]), 1)
        np.testing.assert_array_equal(counts[b].numpy(), brute)
    # segmentation_stats (tp, fp, fn) equals MONAI's get_confusion_matrix on one-hot inputs with ignored pixels zeroed
    stats = segmentation_stats(torch.from_numpy(preds), torch.from_numpy(refs), 4)
    valid = torch.from_numpy(refs != 255)[:, None]
    one_hot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(np.where(refs != 255, x, 0)), 4)  # noqa: E731
    monai = get_confusion_matrix(
        (one_hot(preds).permute(0, 3, 1, 2) * valid).float(),
        (one_hot(refs).permute(0, 3, 1, 2) * valid).float(),
        include_background=False,
    )
    np.testing.assert_array_equal(stats.numpy(), monai[..., [0, 1, 3]].long().numpy())
    result = evaluate_predictions(list(preds), list(refs), ["bg", "x", "y", "z"], n_bootstrap=10)
    np.testing.assert_array_equal(result.confusion, counts.sum(0).numpy())
    np.testing.assert_allclose(dice_from_stats(stats).numpy(), result.per_class["dice_mean"].to_numpy())
    np.testing.assert_allclose(iou_from_stats(stats).numpy(), result.per_class["iou_mean"].to_numpy())


def test_dice_from_stats_empty_rule():
    stats = torch.tensor([[[4, 2, 2]], [[0, 0, 0]], [[0, 3, 0]]])  # overlap, absent in both, predicted only
    assert dice_from_stats(stats).tolist() == pytest.approx([(8 / 12 + 0.0) / 2])
    assert math.isnan(dice_from_stats(torch.zeros(2, 1, 3, dtype=torch.long))[0])


def _synthetic(n_patients, scans_per_patient=3, seed=0, size=16):
    """Noisy predictions of random blobs; patient-level quality varies, so B-scans of a patient are correlated."""
    rng = np.random.default_rng(seed)
    preds, refs, patients = [], [], []
    for p in range(n_patients):
        noise = rng.uniform(0.0, 0.35)
        for _ in range(scans_per_patient):
            ref = np.zeros((size, size), np.uint8)
            y, x = rng.integers(2, size - 8, 2)
            ref[y : y + 6, x : x + 6] = 1
            pred = ref.copy()
            flip = rng.random(ref.shape) < noise
            pred[flip] = 1 - pred[flip]
            preds.append(pred)
            refs.append(ref)
            patients.append(f"patient{p:03d}")
    return preds, refs, patients


def test_bootstrap_ci_contains_point_estimate_and_is_reproducible():
    preds, refs, patients = _synthetic(8)
    kwargs = {"patient_ids": patients, "n_bootstrap": 500, "seed": 3}
    result = evaluate_predictions(preds, refs, ["background", "lesion"], **kwargs)
    row = result.per_class.iloc[0]
    for key in ("dice", "iou", "hd95_px", "dice_pooled", "iou_pooled", "area_abs_error_px"):
        point = row[key] if key.endswith("pooled") else row[f"{key}_mean"]
        assert row[f"{key}_ci_low"] <= point <= row[f"{key}_ci_high"], key
        assert row[f"{key}_ci_low"] < row[f"{key}_ci_high"], key
    for key, (low, high) in result.headline_ci.items():
        assert low <= result.headline[key] <= high, key
    again = evaluate_predictions(preds, refs, ["background", "lesion"], **kwargs)
    pd.testing.assert_frame_equal(result.per_class, again.per_class)
    assert result.settings["n_patients"] == 8 and result.settings["bootstrap_unit"] == "patient"


def test_bootstrap_ci_shrinks_with_more_patients():
    few = evaluate_predictions(*_synthetic(4, seed=1)[:2], ["background", "lesion"], _synthetic(4, seed=1)[2])
    many = evaluate_predictions(*_synthetic(40, seed=1)[:2], ["background", "lesion"], _synthetic(40, seed=1)[2])
    width = lambda r: r.per_class.loc[0, "dice_ci_high"] - r.per_class.loc[0, "dice_ci_low"]  # noqa: E731
    assert width(many) < 0.6 * width(few)
    # bootstrap_ci on plain per-image values: same property, and resampling is by patient, not by image
    pattern = np.array([0.5, 0.6, 0.7, 0.8, 0.9])  # the same spread of patient quality in both cohorts
    values = np.repeat(np.tile(pattern, 10), 4) + np.tile([-0.01, 0.0, 0.0, 0.01], 50)  # 4 B-scans per patient
    patients = np.repeat(np.arange(50), 4).astype(str)
    low5, high5 = bootstrap_ci(values[:20], patients[:20], seed=0)
    low50, high50 = bootstrap_ci(values, patients, seed=0)
    assert high50 - low50 < 0.5 * (high5 - low5)
    by_image_low, by_image_high = bootstrap_ci(values, np.arange(200).astype(str), seed=0)
    assert by_image_high - by_image_low < high50 - low50  # ignoring the patient clusters would overstate precision


def test_input_errors_name_the_scan():
    pred, ref = _pair()
    with pytest.raises(OctSamError, match="scan_b"):
        evaluate_predictions([pred, pred[:, :4]], [ref, ref], LABELS, scan_ids=["scan_a", "scan_b"])
    with pytest.raises(OctSamError, match="outside 0..2"):
        evaluate_predictions([pred + 3], [ref], LABELS)
    bad = ref.copy()
    bad[0, 0] = 7
    with pytest.raises(OctSamError, match="reference holds values"):
        evaluate_predictions([pred], [bad], LABELS)
    with pytest.raises(OctSamError, match="patient_ids"):
        evaluate_predictions([pred], [ref], LABELS, patient_ids=["p1", "p2"])
    with pytest.raises(OctSamError, match="pixel_spacing_mm"):
        evaluate_predictions([pred], [ref], LABELS, pixel_spacing_mm=(0.0, 1.0))


def test_write_results_and_publication_csv(tmp_path):
    preds, refs, patients = _synthetic(3)
    result = evaluate_predictions(preds, refs, ["background", "fluid"], patient_ids=patients, n_bootstrap=50)
    paths = write_results(result, tmp_path / "out", "SAM + LoRA")
    assert {p.name for p in paths.values()} == {
        "sam_lora_per_class.csv",
        "sam_lora_per_image.csv",
        "sam_lora_detection.csv",
        "sam_lora_confusion.csv",
        "sam_lora_summary.json",
    }
    per_class = pd.read_csv(paths["per_class"])
    assert {"dice_mean", "dice_ci_low", "dice_ci_high", "dice_pooled", "hd95_px_mean"} <= set(per_class.columns)
    assert len(pd.read_csv(paths["per_image"])) == len(preds)
    summary = json.loads(paths["summary"].read_text())
    assert summary["mean_dice"] == pytest.approx(result.headline["mean_dice"])
    assert "publication-compatible" in summary["note"]
    table = comparison_table({"LoRA": result})
    assert "mean_dice_with_background_seed_compatible" in table.columns
    publication_csv = write_publication_csv(
        {"Zero-shot SAM": (0.27571, 0.28869), "SAM + LoRA": (0.86294, 0.9096)}, tmp_path / "s.csv"
    )
    assert (
        publication_csv.read_text()
        == "Method,Mean_IoU,Mean_Dice\nZero-shot SAM,0.2757,0.2887\nSAM + LoRA,0.8629,0.9096\n"
    )


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


def test_evaluate_module_equals_library(tmp_path, no_network):
    import evaluate

    preds, refs, patients = _synthetic(4, size=12)
    preds[0] = np.where(refs[0] == 1, 2, preds[0]).astype(np.uint8)  # a third class, confused with class 1
    refs[1][0, :] = 255
    kwargs = {"patient_ids": patients, "pixel_spacing_mm": (0.0039, 0.0114), "n_bootstrap": 200, "seed": 7}
    labels = ["background", "fluid", "drusen"]
    metric = evaluate.load(str(REPO / "metrics" / "oct_segmentation"), cache_dir=str(tmp_path))
    from_module = metric.compute(predictions=preds, references=refs, label_names=labels, **kwargs)
    from_library = evaluate_predictions(preds, refs, labels, **kwargs).to_dict()
    assert from_module == from_library
    assert from_module["per_class"]["fluid"]["dice_mean"] is not None
    # add_batch + compute gives the same numbers
    metric = evaluate.load(str(REPO / "metrics" / "oct_segmentation"), cache_dir=str(tmp_path))
    for i in range(0, len(preds), 5):
        metric.add_batch(predictions=preds[i : i + 5], references=refs[i : i + 5])
    assert metric.compute(label_names=labels, **kwargs) == from_library


def test_headline_averages_the_classes_in_the_truth_and_single_patient_classes_get_no_interval():
    """A class no reference holds does not enter the headline even when a method predicts a few pixels of it (all
    methods average the same classes), and a class scored on one patient's B-scans has no interval."""
    labels = ["background", "a", "b", "c"]
    ref = [np.zeros((8, 8), np.uint8) for _ in range(4)]
    for r in ref:
        r[:4, :4] = 1
    ref[0][6:, 6:] = 2  # class b only in patient p0
    clean = [r.copy() for r in ref]
    noisy = [r.copy() for r in ref]
    noisy[1][7, 0] = 3  # a few false-positive pixels of class c, which no reference holds
    patients = ["p0", "p1", "p2", "p3"]
    a = evaluate_predictions(clean, ref, labels, patient_ids=patients, n_bootstrap=50)
    b = evaluate_predictions(noisy, ref, labels, patient_ids=patients, n_bootstrap=50)
    assert a.settings["headline_classes"] == b.settings["headline_classes"] == ["a", "b"]
    assert a.headline["mean_dice"] == pytest.approx(1.0) and b.headline["mean_dice"] == pytest.approx(1.0)
    row = b.per_class.set_index("class_name")
    assert row.loc["b", "dice_n_patients"] == 1 and np.isnan(row.loc["b", "dice_ci_low"])
    assert np.isfinite(row.loc["a", "dice_ci_low"]) and row.loc["c", "area_pred_px_mean"] > 0


def test_validation_mean_divides_by_the_classes_in_the_validation_truth():
    """A class absent from the validation truth never enters val_mean_dice, predicted or not."""
    import torch

    from octsam.evaluation.metrics import mean_dice_over_present, segmentation_stats

    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[:, :3, :3] = 1
    pred = target.clone()
    stats_without = segmentation_stats(pred, target, 3)
    pred[0, 5, 5] = 2  # a false positive of class 2, absent from the truth
    stats_with = segmentation_stats(pred, target, 3)
    assert torch.isnan(dice_from_stats(stats_without)[1]) and dice_from_stats(stats_with)[1] == 0  # flips 0 / nan
    assert mean_dice_over_present(stats_without) == mean_dice_over_present(stats_with) == pytest.approx(1.0)
