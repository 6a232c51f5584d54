"""The written results of an evaluation: per-class / per-image / detection CSVs, the publication-format CSV, the
comparison table, and ``report.md`` with the protocol and the confidence-interval note written once."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from octsam.errors import OctSamError
from octsam.evaluation.metrics import PUBLICATION_COLUMNS, EvaluationResult
from octsam.protocol import CI_RULE, HEADLINE_RULE, protocol_text
from octsam.textsafe import csv_frame, markdown_text

PUBLICATION_CSV = "sam_lora_performance.csv"


PUBLICATION_CSV_WITH_BACKGROUND = "sam_lora_performance_with_background.csv"


def _slug(method_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", method_name.strip()).strip("_").lower()
    if not slug:
        raise OctSamError(f"method_name {method_name!r} has no usable characters; use e.g. 'lora' or 'zero-shot'")
    return slug


def comparison_table(results: Mapping[str, EvaluationResult]) -> pd.DataFrame:
    """One row per method: headline means with CIs, and the publication-compatible means that include background."""
    rows = []
    for method, result in results.items():
        row: dict[str, Any] = {"method": method}
        for key in ("mean_iou", "mean_dice"):
            row[key] = result.headline[key]
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = result.headline_ci.get(key, (np.nan, np.nan))
        for key in ("mean_iou", "mean_dice"):
            row[f"{key}_with_background_seed_compatible"] = result.headline[f"{key}_with_background"]
        row["n_images"] = result.settings.get("n_images")
        row["n_patients"] = result.settings.get("n_patients")
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(result: EvaluationResult, output_dir: str | Path, method_name: str) -> dict[str, Path]:
    """Write ``{method}_per_class.csv`` (with CIs), per-image, detection, confusion CSVs and ``{method}_summary.json``.

    Returns the written paths by kind. Several methods can share one ``output_dir``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    slug = _slug(method_name)
    paths = {
        "per_class": output_dir / f"{slug}_per_class.csv",
        "per_image": output_dir / f"{slug}_per_image.csv",
        "detection": output_dir / f"{slug}_detection.csv",
        "confusion": output_dir / f"{slug}_confusion.csv",
        "summary": output_dir / f"{slug}_summary.json",
    }
    csv_frame(result.per_class).to_csv(paths["per_class"], index=False, float_format="%.6g")
    csv_frame(result.per_image).to_csv(paths["per_image"], index=False, float_format="%.6g")
    csv_frame(result.detection).to_csv(paths["detection"], index=False, float_format="%.6g")
    confusion = pd.DataFrame(result.confusion, index=result.labels, columns=result.labels)
    confusion.index.name = "truth \\ prediction"
    csv_frame(confusion).to_csv(paths["confusion"])
    summary = {"method": method_name, **result.to_dict()}
    summary["note"] = (
        "mean_iou / mean_dice average per-image values over B-scans, then over foreground classes; "
        "*_with_background also averages the background class (publication-compatible only, not the headline). "
        "A class absent in both truth and prediction of a B-scan is excluded from that class's mean. "
        f"CIs: {result.settings.get('confidence', 0.95):.0%} percentile bootstrap over "
        f"{result.settings.get('bootstrap_unit', 'patient')}s."
    )
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def write_publication_csv(rows: Mapping[str, tuple[float, float]], path: str | Path) -> Path:
    """Write ``Method,Mean_IoU,Mean_Dice`` (the seed's ``sam_lora_performance.csv`` format), 4 decimals."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [(method, float(iou), float(dice)) for method, (iou, dice) in rows.items()], columns=list(PUBLICATION_COLUMNS)
    )
    csv_frame(table).to_csv(path, index=False, float_format="%.4f")
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ci(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f} [n/a]"  # CI_RULE: scored on B-scans of fewer than two patients
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns (readable as plain text too)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _distinct_resamples(n_patients: int) -> int:
    """How many different patient multisets a bootstrap of ``n_patients`` can draw: C(2n - 1, n)."""
    return math.comb(2 * n_patients - 1, n_patients) if n_patients > 0 else 0


def ci_note(n_patients: int, n_images: int, n_bootstrap: int) -> str:
    """What the confidence intervals mean for this split (and when they cannot be trusted)."""
    note = (
        f"95% CIs are percentile intervals of {n_bootstrap} bootstrap resamples of the {n_patients} test patients "
        f"({n_images} B-scans; all B-scans of a patient are drawn together, since B-scans of one eye are not "
        "independent)."
    )
    if n_patients < 5:
        note += (
            f" With {n_patients} patient{'s' if n_patients != 1 else ''} the bootstrap can only draw {_distinct_resamples(n_patients)} different "
            "patient sets, so the interval is little more than the range of the per-patient means: it understates "
            "the uncertainty about new patients and should not be read as a real 95% interval."
        )
    elif n_patients < 20:
        note += f" With {n_patients} patients the intervals are wide and approximate; more test patients narrow them."
    return note


def _headline_table(results, labels) -> str:
    header = ["Method", "Mean IoU [95% CI]", "Mean Dice [95% CI]"]
    header += [f"Dice {markdown_text(name)} [95% CI]" for name in labels[1:]]
    header += ["IoU / Dice incl. background (publication-compatible)", "B-scans / patients"]
    rows = []
    for name, r in results.items():
        row = [markdown_text(name)]
        for key in ("mean_iou", "mean_dice"):
            row.append(_fmt_ci(r.headline[key], *r.headline_ci.get(key, (np.nan, np.nan))))
        for _, c in r.per_class.iterrows():
            row.append(_fmt_ci(c["dice_mean"], c["dice_ci_low"], c["dice_ci_high"]))
        row.append(f"{_fmt(r.headline['mean_iou_with_background'])} / {_fmt(r.headline['mean_dice_with_background'])}")
        row.append(f"{r.settings['n_images']} / {r.settings['n_patients']}")
        rows.append(row)
    return markdown_table(header, rows)


def _class_table(results) -> str:
    with_mm = any("hd95_mm_mean" in r.per_class for r in results.values())
    header = ["Class", "Method", "Dice [95% CI]", "IoU [95% CI]", "pooled Dice", "HD95 px", "abs. area error px"]
    header += ["HD95 mm", "abs. area error mm²"] if with_mm else []
    header += ["detection sens / spec"]
    rows = []
    names = list(next(iter(results.values())).per_class["class_name"])
    for class_name in names:
        for method, r in results.items():
            c = r.per_class.set_index("class_name").loc[class_name]
            d = r.detection.set_index("class_name").loc[class_name]
            row = [
                markdown_text(class_name), markdown_text(method), _fmt_ci(c["dice_mean"], c["dice_ci_low"], c["dice_ci_high"]),
                _fmt_ci(c["iou_mean"], c["iou_ci_low"], c["iou_ci_high"]), _fmt(c["dice_pooled"]),
                _fmt(c["hd95_px_mean"], 1), _fmt(c["area_abs_error_px_mean"], 0),
            ]  # fmt: skip
            if with_mm:
                row += [
                    _fmt(c.get("hd95_mm_mean", float("nan")), 3),
                    _fmt(c.get("area_abs_error_mm2_mean", float("nan")), 4),
                ]
            rows.append(row + [f"{_fmt(d['sensitivity'], 2)} / {_fmt(d['specificity'], 2)}"])
    return markdown_table(header, rows)


def _protocol(summary, kinds: dict[str, str]) -> str:
    """``octsam.protocol``'s paragraph for this comparison: the zero-shot sentence only with a zero-shot row, and for
    its base (best of 3 masks or one mask per box, as recorded by ``evaluate_zero_shot``)."""
    zero_shot = [name for name, kind in kinds.items() if kind == "zero-shot"]
    multimask = None
    if zero_shot:
        multimask = summary["methods"][zero_shot[0]].get("settings", {}).get("zero_shot_multimask")
    return protocol_text(multimask, zero_shot=bool(zero_shot))


METHOD_DESCRIPTIONS = {
    "zero-shot": "the base with no adapter, ground-truth boxes",
    "sam": "SAM + LoRA adapter, automatic mode",
    "prompted": "SAM + LoRA adapter, prompted mode with ground-truth boxes",
    "unet": "MONAI U-Net baseline",
}


def _report(summary, methods, text_table, class_table, figures, histories) -> str:
    """report.md: protocol, results, per class, intervals, figures and files of one comparison."""
    kinds = {name: kind for name, kind, _ in methods}
    lines = [
        f"# Evaluation on `{summary['dataset']}` ({summary['split']} split)",
        "",
        f"Protocol: every method segments the same {summary['n_images']} B-scans of {summary['n_patients']} test "
        f"patients. {_protocol(summary, kinds)} Fine-tuned SAM adapters run in the mode they were trained for "
        "(automatic: no prompts; prompted: one ground-truth box per class instance), and the U-Net baseline is "
        "trained through the same train.py, data, splits, loss and metrics.",
        "",
        HEADLINE_RULE
        + f" Here: {', '.join(markdown_text(c) for c in summary.get('headline_classes') or []) or 'none'}.",
        "",
        *_results_section(summary, kinds, text_table),
        *_per_class_section(summary, kinds, class_table),
        "## Confidence intervals",
        "",
        CI_RULE + " " + summary["ci_note"],
        "",
        *_figures_section(summary, figures, histories),
        *_files_section(summary),
    ]
    return "\n".join(lines)


def _results_section(summary, kinds: dict[str, str], text_table: str) -> list[str]:
    methods = "; ".join(
        f"**{markdown_text(name)}**: {METHOD_DESCRIPTIONS.get(kinds[name], kinds[name])} "
        f"(`{summary['methods'][name]['source']}`)"
        for name in summary["methods"]
    )
    return [
        "## Results",
        "",
        text_table,
        "",
        "The publication-compatible columns average the background class in as well; they are shown only to compare with "
        "figures published that way (the original publication's) and are not the headline.",
        "",
        f"Methods: {methods}.",
        "",
    ]


def _per_class_section(summary, kinds: dict[str, str], class_table: str) -> list[str]:
    notes = (
        "HD95: 95th-percentile Hausdorff distance in pixels, over B-scans where the class is in both truth and "
        "prediction. Detection: B-scans where the class is present (sensitivity) or absent (specificity) in the truth "
        "and the prediction agrees."
    )
    if "zero-shot" in kinds.values():
        notes += (
            " Zero-shot detection is not a test of detection: it is given one true box per lesion, so it only "
            "prompts where the class is present and its sensitivity is near 1 by construction."
        )
    if summary.get("pixel_spacing_mm"):
        notes += f" Pixel spacing {summary['pixel_spacing_mm']} mm (Y, X): HD95 in mm and areas in mm² as given."
    else:
        notes += " No pixel spacing was given: distances and areas are in pixels."
    return ["## Per class", "", class_table, "", notes, ""]


def _figures_section(summary, figures, histories) -> list[str]:
    lines = [
        "## Figures",
        "",
        "Per-class IoU and Dice with 95% CIs:",
        "",
        f"![metric bars]({figures['metric_bars']})",
        "",
        "Best, median and worst B-scan (ranked by the per-image Dice of "
        f"{summary['qualitative_grid_ranked_by']}), ground truth and every method's mask, in the fixed class colours:",
        "",
        f"![qualitative grid]({figures['qualitative_grid']})",
        "",
        "Pixel confusion matrices (rows: ground truth, columns: prediction):",
        "",
        *[f"![confusion {name}]({figures[f'confusion {name}']})" for name in summary["methods"]],
        "",
    ]
    if histories:
        lines += ["Training curves:", ""]
        lines += [f"![training curves {name}]({figures[f'training curves {name}']})" for name in histories]
        lines.append("")
    return lines


def _files_section(summary) -> list[str]:
    publication = [
        f"- `{PUBLICATION_CSV}`: `Method,Mean_IoU,Mean_Dice` (the original publication's format), foreground "
        "classes only;",
        f"- `{PUBLICATION_CSV_WITH_BACKGROUND}`: the same with background averaged in (publication-compatible, "
        "not the headline);",
    ]
    return [
        "## Files",
        "",
        *(publication if "publication_csv" in summary["files"] else []),
        "- `comparison.csv`, `per_class.csv`: all methods with CIs; `METHOD_per_image.csv`, `METHOD_detection.csv`, "
        "`METHOD_confusion.csv`, `METHOD_summary.json` per method; `comparison.json`: everything above.",
        "",
    ]
