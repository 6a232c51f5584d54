"""OCT segmentation metric for Hugging Face ``evaluate``: a thin wrapper over ``octsam.evaluation.metrics``.

Load it offline from this folder: ``evaluate.load("/abs/path/to/metrics/oct_segmentation")``. The numbers come from
``octsam.evaluation.metrics.evaluate_predictions`` (one implementation), so ``octsam`` must be installed.
"""

import datasets
import evaluate
import numpy as np

from octsam.evaluation.metrics import IGNORE_INDEX, evaluate_predictions

_DESCRIPTION = """
Per-class segmentation metrics for retinal OCT B-scans, following the octsam evaluation protocol: Dice and IoU per
foreground class per B-scan (MONAI), averaged over B-scans, and the pooled-pixel values; the 95th-percentile
Hausdorff distance (pixels, and mm with a pixel spacing); biomarker areas and area errors (pixels, mm²); a B-scan
detection table per class; a pixel confusion matrix; and 95% percentile-bootstrap confidence intervals resampling
patients. Pixels labelled 255 in the reference are ignored. A class absent in both the reference and the prediction
of a B-scan is excluded from that class's mean (and is a true negative in the detection table); a class absent in
the reference but predicted scores Dice 0 / IoU 0. The headline means average foreground classes only;
`*_with_background` also averages the background class, only for comparison with publications that do so.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted class-index masks (H, W), values 0..num_labels-1.
    references (`List[ndarray]`): reference class-index masks (H, W), values 0..num_labels-1 or 255 (ignored).
    label_names (`List[str]`, optional): class names, index 0 = background. Default: background, class_1, ...
    num_labels (`int`, optional): number of classes including background, when `label_names` is not given.
    patient_ids (`List[str]`, optional): patient of each B-scan; the bootstrap resamples patients. Without them
        every B-scan is its own patient.
    scan_ids (`List[str]`, optional): names of the B-scans (for the per-image table).
    pixel_spacing_mm (`Tuple[float, float]` or a list of them, optional): (Y, X) pixel size in mm.
    n_bootstrap (`int`, default 1000), seed (`int`, default 0), confidence (`float`, default 0.95).
    ignore_index (`int`, default 255), detection_min_pixels (`int`, default 1).
Returns:
    A dict: `mean_iou`, `mean_dice`, `mean_iou_with_background`, `mean_dice_with_background`, each with a `*_ci`
    [low, high]; `labels`; `per_class` {name: {dice_mean, dice_ci_low, ..., iou_pooled, hd95_px_mean, ...}};
    `detection` {name: {tp, fp, tn, fn, sensitivity, specificity, precision}}; `confusion_matrix` (rows reference,
    columns prediction, pixel counts); `settings`. Undefined values are None.
Examples:
    >>> metric = evaluate.load("/path/to/octsam/metrics/oct_segmentation")
    >>> results = metric.compute(predictions=preds, references=masks, label_names=["background", "fluid"],
    ...                          patient_ids=patients)
    >>> results["mean_dice"], results["mean_dice_ci"]
"""

_CITATION = """
@software{octsam,
  title = {octsam: fine-tuning Segment Anything with LoRA for retinal OCT biomarker segmentation},
  year = {2025},
}
"""


class OctSegmentation(evaluate.Metric):
    """Dice, IoU, HD95, areas, detection and patient-bootstrap CIs for OCT B-scan segmentation."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                }
            ),
            reference_urls=["https://docs.monai.io/en/stable/metrics.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        label_names=None,
        num_labels=None,
        patient_ids=None,
        scan_ids=None,
        pixel_spacing_mm=None,
        n_bootstrap=1000,
        seed=0,
        confidence=0.95,
        ignore_index=IGNORE_INDEX,
        detection_min_pixels=1,
    ):
        if label_names is None:
            if num_labels is None:
                raise ValueError("give label_names (index 0 = background) or num_labels")
            label_names = ["background"] + [f"class_{i}" for i in range(1, int(num_labels))]
        elif num_labels is not None and int(num_labels) != len(label_names):
            raise ValueError(f"num_labels={num_labels} but {len(label_names)} label_names were given")
        result = evaluate_predictions(
            [np.asarray(p, dtype=np.uint8) for p in predictions],
            [np.asarray(r, dtype=np.uint8) for r in references],
            labels=list(label_names),
            patient_ids=patient_ids,
            scan_ids=scan_ids,
            pixel_spacing_mm=pixel_spacing_mm,
            n_bootstrap=n_bootstrap,
            seed=seed,
            ignore_index=ignore_index,
            confidence=confidence,
            detection_min_pixels=detection_min_pixels,
        )
        return result.to_dict()
