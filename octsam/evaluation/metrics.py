"""Segmentation metrics for OCT B-scans: MONAI Dice/IoU/HD95, areas, detection, patient-bootstrap CIs.

The protocol (its text, which report.md, the model cards and the README use, is written once in ``octsam.protocol``):

- Dice and IoU per foreground class per B-scan, averaged over B-scans, plus the pooled-pixel (global) value.
- Ignore label 255: those pixels count neither in the prediction nor in the truth.
- Empty rule: a class absent in both truth and prediction of a B-scan is excluded from that class's per-image mean
  (NaN) and counted as a true negative in the detection table; absent in truth but predicted gives Dice 0 / IoU 0.
- The headline averages foreground classes only; a publication-compatible mean that includes background is reported
  beside it and labelled as such.
- 95% confidence intervals: percentile bootstrap resampling patients (all B-scans of a patient together).

Two entry points: ``segmentation_stats`` + ``dice_from_stats`` (cheap torch counts for a training validation loop,
gatherable with ``accelerator.gather_for_metrics``) and ``evaluate_predictions`` (everything, for a test split).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

from octsam.data.contract import IGNORE_INDEX
from octsam.errors import OctSamError
from octsam.protocol import CI_RULE, HEADLINE_RULE  # noqa: F401 (re-exported: report and callers use them)

HEADLINE_KEYS = ("mean_iou", "mean_dice", "mean_iou_with_background", "mean_dice_with_background")
PUBLICATION_COLUMNS = ("Method", "Mean_IoU", "Mean_Dice")

__all__ = [
    "IGNORE_INDEX",
    "EvaluationResult",
    "bootstrap_ci",
    "confusion_counts",
    "dice_from_stats",
    "evaluate_predictions",
    "iou_from_stats",
    "patient_bootstrap_weights",
    "segmentation_stats",
]


# ----------------------------------------------------------------------------------------------------------------
# Counting (fast, torch, batch-wise)
# ----------------------------------------------------------------------------------------------------------------


def confusion_counts(
    pred: torch.Tensor, target: torch.Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-image pixel confusion matrices ``[B, C, C]`` (rows truth, columns prediction), ignored pixels dropped.

    ``pred`` and ``target`` are integer class maps ``[B, H, W]`` (or ``[H, W]``); ``num_labels`` = C includes
    background. Written with one ``bincount`` because MONAI's ``get_confusion_matrix`` needs one-hot float inputs
    (C times the memory) and gives binary per-class counts only, not the class-to-class matrix.
    """
    if pred.shape != target.shape:
        raise OctSamError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    batch, n = pred.shape[0], num_labels
    # Ignored truth pixels go to an extra row C that is dropped afterwards. Codes t * C + p fit in uint8 for up to
    # 15 labels, which is what makes this fast on the CPU; predictions must already be class indices 0..C-1.
    code_dtype = torch.uint8 if (n + 1) * n <= 256 else torch.int32
    target = torch.where(target == ignore_index, n, target).to(code_dtype).reshape(batch, -1)
    codes = target * n + pred.to(code_dtype).reshape(batch, -1)
    counts = torch.stack([torch.bincount(codes[b], minlength=(n + 1) * n) for b in range(batch)])
    return counts.reshape(batch, n + 1, n)[:, :n, :]


def segmentation_stats(
    pred: torch.Tensor, target: torch.Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-image, per-foreground-class pixel counts ``[B, K, 3]`` = (tp, fp, fn), K = ``num_labels - 1``.

    Cheap enough to call on every validation batch; the result is an int64 tensor on ``pred``'s device that
    ``accelerator.gather_for_metrics`` can gather. Feed the concatenated counts to ``dice_from_stats``.
    """
    cm = confusion_counts(pred, target, num_labels, ignore_index)
    tp = torch.diagonal(cm, dim1=1, dim2=2)
    fp = cm.sum(dim=1) - tp
    fn = cm.sum(dim=2) - tp
    return torch.stack([tp, fp, fn], dim=-1)[:, 1:, :]


def _stats_to_monai(stats: torch.Tensor) -> torch.Tensor:
    """(tp, fp, fn) -> MONAI's (tp, fp, tn, fn) layout; tn is not needed by Dice or IoU and is set to 0."""
    tp, fp, fn = stats.double().unbind(-1)
    return torch.stack([tp, fp, torch.zeros_like(tp), fn], dim=-1)


def _per_image_from_stats(stats: torch.Tensor, metric: str) -> torch.Tensor:
    # MONAI returns NaN where the denominator is 0, i.e. exactly when the class is absent in truth and prediction.
    return compute_confusion_matrix_metric(metric, _stats_to_monai(stats))


def dice_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Per-class mean of per-image Dice ``[K]`` from ``segmentation_stats`` counts ``[N, K, 3]`` (empty rule)."""
    return torch.nanmean(_per_image_from_stats(stats, "f1 score"), dim=0)


def mean_dice_over_present(stats: torch.Tensor) -> float:
    """Mean of the per-class Dice over the classes present in the truth of ``stats`` (``segmentation_stats``
    counts): a fixed divisor, whatever classes a model predicts (0.0 when the truth has no foreground)."""
    dice = dice_from_stats(stats)
    present = (stats[..., 0] + stats[..., 2]).sum(0) > 0
    return float(dice[present].mean()) if present.any() else 0.0


def iou_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Per-class mean of per-image IoU ``[K]`` from ``segmentation_stats`` counts ``[N, K, 3]`` (empty rule)."""
    return torch.nanmean(_per_image_from_stats(stats, "threat score"), dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Patient bootstrap
# ----------------------------------------------------------------------------------------------------------------


def patient_bootstrap_weights(
    patient_ids: Sequence[str], n_bootstrap: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Resample patients with replacement: returns (group index per image ``[N]``, counts ``[n_bootstrap, P]``).

    Replicate b contains each B-scan of patient p ``counts[b, p]`` times (a multinomial draw of P patients).
    """
    if n_bootstrap < 1:
        raise OctSamError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    _, groups = np.unique(np.asarray(patient_ids, dtype=object).astype(str), return_inverse=True)
    n_patients = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_bootstrap)
    return groups, counts.astype(np.float64)


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros((n_groups, *values.shape[1:]), dtype=np.float64)
    np.add.at(out, groups, values)
    return out


def _bootstrap_nanmean(values: np.ndarray, groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Bootstrap replicates ``[n_bootstrap, ...]`` of the NaN-skipping mean over images of ``values [N, ...]``."""
    finite = np.isfinite(values)
    sums = _group_sums(np.where(finite, values, 0.0), groups, counts.shape[1])
    nums = _group_sums(finite.astype(np.float64), groups, counts.shape[1])
    top = np.tensordot(counts, sums, axes=(1, 0))
    bottom = np.tensordot(counts, nums, axes=(1, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def _percentile_ci(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, skipping replicates where the statistic is undefined (class not sampled)."""
    alpha = (1.0 - confidence) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the CI is NaN, which is what we want
        low = np.nanquantile(replicates, alpha, axis=0)
        high = np.nanquantile(replicates, 1.0 - alpha, axis=0)
    return low, high


def bootstrap_ci(
    values: np.ndarray,
    patient_ids: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CI of the NaN-skipping per-image mean of ``values [N, ...]``, resampling patients."""
    values = np.asarray(values, dtype=np.float64)
    groups, counts = patient_bootstrap_weights(patient_ids, n_bootstrap, seed)
    return _percentile_ci(_bootstrap_nanmean(values, groups, counts), confidence)


# ----------------------------------------------------------------------------------------------------------------
# Full evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Everything ``evaluate_predictions`` measured. Class index 0 is background; rows cover classes 1..K."""

    labels: list[str]
    per_image: pd.DataFrame  # one row per (B-scan, foreground class)
    per_class: pd.DataFrame  # one row per foreground class: per-image means, pooled values, CIs, areas
    detection: pd.DataFrame  # one row per foreground class: B-scan-level presence TP/FP/FN/TN
    confusion: np.ndarray  # (K+1, K+1) pixel counts, rows truth, columns prediction, ignored pixels excluded
    headline: dict[str, float]  # HEADLINE_KEYS; "*_with_background" is the publication-compatible figure
    headline_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def image_scores(self, metric: str = "dice") -> np.ndarray:
        """Mean over foreground classes of ``metric`` per B-scan ``[N]`` (NaN where no class was scored)."""
        table = self.per_image.pivot(index="image_index", columns="class_index", values=metric)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(table.to_numpy(dtype=np.float64), axis=1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able summary: headline, CIs, per-class and detection tables, confusion matrix, settings."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            if isinstance(value, (np.integer,)):
                return int(value)
            if isinstance(value, (np.floating, float)):
                return None if not np.isfinite(value) else float(value)
            if isinstance(value, np.bool_):
                return bool(value)
            return value

        out: dict[str, Any] = dict(self.headline)
        for key, (low, high) in self.headline_ci.items():
            out[f"{key}_ci"] = [low, high]
        out["labels"] = list(self.labels)
        out["per_class"] = self.per_class.set_index("class_name").to_dict(orient="index")
        out["detection"] = self.detection.set_index("class_name").to_dict(orient="index")
        out["confusion_matrix"] = self.confusion.tolist()
        out["settings"] = dict(self.settings)
        return clean(out)


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(name) for name in labels]
    if len(labels) < 2:
        raise OctSamError(f"labels must list background (index 0) and at least one class, got {labels}")
    if len(labels) > IGNORE_INDEX:
        raise OctSamError(f"at most {IGNORE_INDEX} labels are supported (255 is the ignore label), got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise OctSamError(f"label names must be unique, got {labels}")
    return labels


def _check_pair(pred: Any, ref: Any, num_labels: int, name: str, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.ndim != 2 or ref.ndim != 2:
        raise OctSamError(
            f"{name}: prediction and reference must be 2-D class-index masks (H, W), "
            f"got shapes {pred.shape} and {ref.shape}"
        )
    if pred.shape != ref.shape:
        raise OctSamError(f"{name}: prediction shape {pred.shape} differs from reference shape {ref.shape}")
    for what, arr in (("prediction", pred), ("reference", ref)):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
            raise OctSamError(f"{name}: {what} must hold integer class indices, got dtype {arr.dtype}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_labels):
        raise OctSamError(
            f"{name}: prediction holds values outside 0..{num_labels - 1} ({num_labels} labels); "
            "predictions must be class indices"
        )
    bad = (ref < 0) | ((ref >= num_labels) & (ref != ignore_index))
    if bad.any():
        raise OctSamError(
            f"{name}: reference holds values {sorted(np.unique(ref[bad]).tolist())[:5]} outside 0..{num_labels - 1} "
            f"and the ignore label {ignore_index}; check the label list"
        )
    return pred.astype(np.int64), ref.astype(np.int64)


def _check_spacing(pixel_spacing_mm: Any, n_images: int) -> list[tuple[float, float]] | None:
    if pixel_spacing_mm is None:
        return None
    arr = np.asarray(pixel_spacing_mm, dtype=np.float64)
    if arr.shape == (2,):
        arr = np.broadcast_to(arr, (n_images, 2))
    if arr.shape != (n_images, 2) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise OctSamError(
            f"pixel_spacing_mm must be positive (Y, X) in mm, one pair or one pair per image ({n_images}), "
            f"got {pixel_spacing_mm!r}"
        )
    return [(float(y), float(x)) for y, x in arr]


def _spacing_setting(spacings: list[tuple[float, float]] | None) -> list | None:
    if not spacings:
        return None
    return list(spacings[0]) if len(set(spacings)) == 1 else [list(s) for s in spacings]


def _one_hot(mask: np.ndarray, valid: np.ndarray, num_labels: int) -> torch.Tensor:
    """[1, C, H, W] float64 one-hot with ignored pixels zero in every channel (removed from pred and truth)."""
    index = torch.from_numpy(np.where(valid, mask, 0))
    onehot = torch.nn.functional.one_hot(index, num_labels).permute(2, 0, 1).double()
    return (onehot * torch.from_numpy(valid).double())[None]


def _image_metrics(
    pred: np.ndarray, ref: np.ndarray, num_labels: int, ignore_index: int, spacing: tuple[float, float] | None
) -> dict[str, np.ndarray]:
    """MONAI per-class Dice, IoU, HD95 (px and mm) for one B-scan, with the empty rule applied."""
    valid = ref != ignore_index
    pred_oh = _one_hot(pred, valid, num_labels)
    ref_oh = _one_hot(ref, valid, num_labels)
    dice = compute_dice(pred_oh, ref_oh, include_background=True, ignore_empty=False)[0].double().numpy()
    iou = compute_iou(pred_oh, ref_oh, include_background=True, ignore_empty=False)[0].double().numpy()
    area_true = ref_oh.sum(dim=(0, 2, 3)).double().numpy()
    area_pred = pred_oh.sum(dim=(0, 2, 3)).double().numpy()
    # MONAI with ignore_empty=False scores "absent in both" as 1; the protocol excludes it instead.
    both_empty = (area_true == 0) & (area_pred == 0)
    dice[both_empty] = np.nan
    iou[both_empty] = np.nan
    # HD95 is defined only when both masks are non-empty (otherwise MONAI gives inf/NaN); the detection table
    # reports the B-scans where one side is empty.
    hd_px = np.full(num_labels, np.nan)
    hd_mm = np.full(num_labels, np.nan)
    both = np.flatnonzero((area_true > 0) & (area_pred > 0))
    both = both[both > 0]
    if both.size:
        sel = torch.from_numpy(both)
        yp, yt = pred_oh[:, sel], ref_oh[:, sel]
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated argument inside get_mask_edges
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95)
            hd_px[both] = hd[0].double().numpy()
            if spacing is not None:
                hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing)
                hd_mm[both] = hd[0].double().numpy()
    return {
        "dice": dice,
        "iou": iou,
        "hd95_px": hd_px,
        "hd95_mm": hd_mm,
        "area_true": area_true,
        "area_pred": area_pred,
    }


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """One intra-op thread for the per-B-scan work: the tensors are small, and on a busy CPU extra threads made
    MONAI's per-image metrics about 10x slower (measured on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_predictions(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    labels: Sequence[str],
    patient_ids: Sequence[str] | None = None,
    scan_ids: Sequence[str] | None = None,
    pixel_spacing_mm: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    confidence: float = 0.95,
    detection_min_pixels: int = 1,
) -> EvaluationResult:
    """Score class-index masks against references per the evaluation protocol (module docstring).

    ``labels`` are the class names with index 0 = background. ``patient_ids`` drive the bootstrap (without them
    every B-scan is its own patient, which makes CIs too narrow when B-scans of one eye are correlated).
    ``pixel_spacing_mm`` is (Y, X) in mm, one pair for all images or one per image; it adds HD95 in mm and areas
    in mm². A class counts as present in a B-scan (detection table) from ``detection_min_pixels`` pixels.
    Headline means average the per-class means over the classes present in the reference masks (``HEADLINE_RULE``):
    every method scored on the same references averages the same classes. A class no reference holds is still
    listed per class (its false-positive area shows there) but enters no headline. A class scored on B-scans of
    fewer than two patients gets no interval (``CI_RULE``).
    """
    labels = _check_labels(labels)
    n_images = len(predictions)
    if n_images == 0:
        raise OctSamError("evaluate_predictions: no predictions given")
    if len(references) != n_images:
        raise OctSamError(f"got {n_images} predictions but {len(references)} references; give one per B-scan")
    scan_ids = [str(s) for s in scan_ids] if scan_ids is not None else [f"image_{i:05d}" for i in range(n_images)]
    given_patients = patient_ids is not None
    patient_ids = [str(p) for p in patient_ids] if given_patients else list(scan_ids)
    for what, seq in (("patient_ids", patient_ids), ("scan_ids", scan_ids)):
        if len(seq) != n_images:
            raise OctSamError(f"{what} has {len(seq)} entries for {n_images} predictions; give one per B-scan")
    if not 0.0 < confidence < 1.0:
        raise OctSamError(f"confidence must be in (0, 1), got {confidence}")
    spacings = _check_spacing(pixel_spacing_mm, n_images)

    scored = _score_images(predictions, references, labels, scan_ids, ignore_index, spacings)
    boot = _Bootstrap.over(patient_ids, n_bootstrap, seed, confidence)
    rows, replicates = _class_rows(scored, boot, spacings)
    per_class = pd.DataFrame({"class_index": np.arange(1, len(labels)), "class_name": labels[1:]})
    for key, values in rows.items():
        per_class[key] = values[1:]
    per_class["n_images"] = n_images
    per_class["n_patients"] = boot.n_patients
    headline, headline_ci, headline_classes = _headline(rows, replicates, scored.per["area_true"], labels, boot)
    present_true = scored.per["area_true"] >= detection_min_pixels
    present_pred = scored.per["area_pred"] >= detection_min_pixels
    settings = {
        "n_images": n_images,
        "n_patients": boot.n_patients,
        "bootstrap_unit": "patient" if given_patients else "image (no patient ids given)",
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "confidence": confidence,
        "ignore_index": ignore_index,
        "pixel_spacing_mm": _spacing_setting(spacings),
        "detection_min_pixels": detection_min_pixels,
        "headline_classes": headline_classes,
        "headline_rule": HEADLINE_RULE,
        "ci_rule": CI_RULE,
    }
    return EvaluationResult(
        labels=labels,
        per_image=_per_image_table(scored.per, labels, scan_ids, patient_ids, spacings, present_true, present_pred),
        per_class=per_class,
        detection=_detection_table(present_true, present_pred, labels, n_images),
        confusion=scored.confusion.numpy(),
        headline=headline,
        headline_ci=headline_ci,
        settings=settings,
    )


@dataclass
class _Scored:
    """Per-B-scan results: ``per[field]`` (N, K+1) arrays, the summed pixel confusion, MONAI's (tp, fp, tn, fn)
    per B-scan and class (N, K+1, 4) for pooling."""

    per: dict[str, np.ndarray]
    confusion: torch.Tensor
    image_cm: np.ndarray


def _score_images(predictions, references, labels, scan_ids, ignore_index, spacings) -> _Scored:
    num_labels, n_images = len(labels), len(predictions)
    fields = ("dice", "iou", "hd95_px", "hd95_mm", "area_true", "area_pred")
    per: dict[str, np.ndarray] = {k: np.empty((n_images, num_labels)) for k in fields}
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)
    image_cm = np.empty((n_images, num_labels, 4))
    with _single_torch_thread():
        for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
            name = f"B-scan {scan_ids[i]!r} (index {i})"
            pred, ref = _check_pair(pred, ref, num_labels, name, ignore_index)
            values = _image_metrics(pred, ref, num_labels, ignore_index, spacings[i] if spacings else None)
            for key in fields:
                per[key][i] = values[key]
            cm = confusion_counts(torch.from_numpy(pred), torch.from_numpy(ref), num_labels, ignore_index)[0]
            confusion += cm
            tp = torch.diagonal(cm)
            fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
            image_cm[i] = torch.stack([tp, fp, cm.sum() - tp - fp - fn, fn], dim=-1).numpy()
    return _Scored(per, confusion, image_cm)


@dataclass
class _Bootstrap:
    """Patient-bootstrap resampling of one evaluation (``patient_bootstrap_weights``) and its interval level."""

    groups: np.ndarray
    counts: np.ndarray
    patient_index: np.ndarray  # each B-scan's patient as an integer
    confidence: float

    @classmethod
    def over(cls, patient_ids: list[str], n_bootstrap: int, seed: int, confidence: float) -> _Bootstrap:
        groups, counts = patient_bootstrap_weights(patient_ids, n_bootstrap, seed)
        patient_index = np.unique(np.asarray(patient_ids), return_inverse=True)[1]
        return cls(groups, counts, patient_index, confidence)

    @property
    def n_patients(self) -> int:
        return self.counts.shape[1]

    def point_and_ci(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-class mean over B-scans (NaN-aware), its interval and the bootstrap replicates."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            point = np.nanmean(values, axis=0)
        reps = _bootstrap_nanmean(values, self.groups, self.counts)
        low, high = _percentile_ci(reps, self.confidence)
        return point, low, high, reps


def _class_rows(scored: _Scored, boot: _Bootstrap, spacings) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The per-class columns (over all K+1 classes) and the bootstrap replicates of each per-image metric."""
    per, num_labels = scored.per, scored.per["dice"].shape[1]
    rows: dict[str, np.ndarray] = {}
    replicates: dict[str, np.ndarray] = {}
    metric_arrays = {"dice": per["dice"], "iou": per["iou"], "hd95_px": per["hd95_px"]}
    if spacings:
        metric_arrays["hd95_mm"] = per["hd95_mm"]
    for key, values in metric_arrays.items():
        point, low, high, reps = boot.point_and_ci(values)
        rows[f"{key}_mean"], rows[f"{key}_ci_low"], rows[f"{key}_ci_high"] = point, low, high
        replicates[key] = reps
        rows[f"{key}_n_images"] = np.isfinite(values).sum(axis=0)
        rows[f"{key}_n_patients"] = np.array(
            [len(np.unique(boot.patient_index[np.isfinite(values[:, c])])) for c in range(num_labels)]
        )
        few = rows[f"{key}_n_patients"] < 2  # CI_RULE: an interval needs B-scans of at least two patients
        rows[f"{key}_ci_low"][few] = np.nan
        rows[f"{key}_ci_high"][few] = np.nan
    rows.update(_pooled_rows(scored.image_cm, boot))
    rows.update(_area_rows(per, boot, spacings))
    return rows, replicates


def _pooled_rows(image_cm: np.ndarray, boot: _Bootstrap) -> dict[str, np.ndarray]:
    """Pooled-pixel values: sum the counts over B-scans (bootstrap: over resampled patients), then MONAI's formula."""
    rows = {}
    pooled_counts = torch.from_numpy(image_cm.sum(axis=0))
    group_sums = _group_sums(image_cm, boot.groups, boot.n_patients)
    boot_counts = torch.from_numpy(np.tensordot(boot.counts, group_sums, axes=(1, 0)))
    for key, monai_name in (("dice", "f1 score"), ("iou", "threat score")):
        rows[f"{key}_pooled"] = compute_confusion_matrix_metric(monai_name, pooled_counts).numpy()
        reps = compute_confusion_matrix_metric(monai_name, boot_counts).numpy()
        rows[f"{key}_pooled_ci_low"], rows[f"{key}_pooled_ci_high"] = _percentile_ci(reps, boot.confidence)
    return rows


def _area_rows(per: dict[str, np.ndarray], boot: _Bootstrap, spacings) -> dict[str, np.ndarray]:
    """Mean areas per class and their errors, in pixels and (with a spacing) in mm²."""
    area_error = per["area_pred"] - per["area_true"]
    rows = {
        "area_true_px_mean": per["area_true"].mean(axis=0),
        "area_pred_px_mean": per["area_pred"].mean(axis=0),
        "area_error_px_mean": area_error.mean(axis=0),
    }
    point, low, high, _ = boot.point_and_ci(np.abs(area_error))
    rows.update(area_abs_error_px_mean=point, area_abs_error_px_ci_low=low, area_abs_error_px_ci_high=high)
    if spacings:
        scale = np.array([y * x for y, x in spacings])[:, None]
        scaled_error = area_error * scale
        rows["area_true_mm2_mean"] = (per["area_true"] * scale).mean(axis=0)
        rows["area_pred_mm2_mean"] = (per["area_pred"] * scale).mean(axis=0)
        rows["area_error_mm2_mean"] = scaled_error.mean(axis=0)
        point, low, high, _ = boot.point_and_ci(np.abs(scaled_error))
        rows.update(area_abs_error_mm2_mean=point, area_abs_error_mm2_ci_low=low, area_abs_error_mm2_ci_high=high)
    return rows


def _headline(rows, replicates, area_true: np.ndarray, labels: list[str], boot: _Bootstrap):
    """Mean over classes of per-class per-image means (foreground only; publication-compatible with background),
    over the classes some reference holds (``HEADLINE_RULE``), with intervals (``CI_RULE``)."""
    num_labels = len(labels)
    headline: dict[str, float] = {}
    headline_ci: dict[str, tuple[float, float]] = {}
    in_truth = (area_true > 0).any(axis=0)
    in_truth[0] = True
    headline_classes = [labels[c] for c in range(1, num_labels) if in_truth[c]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for metric in ("iou", "dice"):
            for suffix, first in (("", 1), ("_with_background", 0)):
                cls = [c for c in range(first, num_labels) if in_truth[c]]
                key = f"mean_{metric}{suffix}"
                headline[key] = float(np.nanmean(rows[f"{metric}_mean"][cls])) if cls else float("nan")
                low, high = _percentile_ci(np.nanmean(replicates[metric][:, cls], axis=1), boot.confidence)
                if boot.n_patients < 2:  # CI_RULE
                    low = high = float("nan")
                headline_ci[key] = (float(low), float(high))
    return headline, headline_ci, headline_classes


def _detection_table(present_true, present_pred, labels: list[str], n_images: int) -> pd.DataFrame:
    """B-scan-level presence in truth vs prediction, scored with MONAI's confusion-matrix metrics."""
    fg = slice(1, len(labels))
    det = np.stack(
        [
            (present_true & present_pred).sum(0),
            (~present_true & present_pred).sum(0),
            (~present_true & ~present_pred).sum(0),
            (present_true & ~present_pred).sum(0),
        ],
        axis=-1,
    ).astype(np.float64)
    det_t = torch.from_numpy(det)
    detection = pd.DataFrame({"class_index": np.arange(1, len(labels)), "class_name": labels[1:]})
    for j, name in enumerate(("tp", "fp", "tn", "fn")):
        detection[name] = det[fg, j].astype(np.int64)
    for name in ("sensitivity", "specificity", "precision"):
        detection[name] = compute_confusion_matrix_metric(name, det_t).numpy()[fg]
    detection["n_images"] = n_images
    return detection


def _per_image_table(per, labels, scan_ids, patient_ids, spacings, present_true, present_pred) -> pd.DataFrame:
    """One row per B-scan and foreground class."""
    num_labels, n_images = len(labels), per["dice"].shape[0]
    fg, n_fg = slice(1, num_labels), num_labels - 1
    per_image = pd.DataFrame(
        {
            "image_index": np.repeat(np.arange(n_images), n_fg),
            "scan_id": np.repeat(np.asarray(scan_ids, dtype=object), n_fg),
            "patient_id": np.repeat(np.asarray(patient_ids, dtype=object), n_fg),
            "class_index": np.tile(np.arange(1, num_labels), n_images),
            "class_name": np.tile(np.asarray(labels[1:], dtype=object), n_images),
        }
    )
    for key in ("dice", "iou", "hd95_px"):
        per_image[key] = per[key][:, fg].reshape(-1)
    if spacings:
        per_image["hd95_mm"] = per["hd95_mm"][:, fg].reshape(-1)
    per_image["area_true_px"] = per["area_true"][:, fg].reshape(-1).astype(np.int64)
    per_image["area_pred_px"] = per["area_pred"][:, fg].reshape(-1).astype(np.int64)
    per_image["area_error_px"] = per_image["area_pred_px"] - per_image["area_true_px"]
    if spacings:
        scale = np.repeat(np.array([y * x for y, x in spacings]), n_fg)
        per_image["area_true_mm2"] = per_image["area_true_px"] * scale
        per_image["area_pred_mm2"] = per_image["area_pred_px"] * scale
        per_image["area_error_mm2"] = per_image["area_error_px"] * scale
    per_image["present_true"] = present_true[:, fg].reshape(-1)
    per_image["present_pred"] = present_pred[:, fg].reshape(-1)
    return per_image


# ----------------------------------------------------------------------------------------------------------------
# Writing results
# ----------------------------------------------------------------------------------------------------------------
