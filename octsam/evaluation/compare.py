"""Compare methods on one split: zero-shot SAM, fine-tuned SAM + LoRA adapters and the U-Net baseline.

python -m octsam.cli.evaluate --adapter outputs/amd/best_adapter --dataset data/amd --split test --output results/amd
python -m octsam.cli.evaluate --adapter LoRA=outputs/amd/best_adapter --adapter U-Net=outputs/amd_unet/best_adapter \\
    --method zero-shot --dataset data/amd --output results/amd

``run_comparison`` is the one function behind the command (and the demo): it evaluates every method on the same
B-scans with ``octsam.evaluation.predict`` (metrics from ``octsam.evaluation.metrics``) and writes into ``--output``

- ``sam_lora_performance.csv``: the original publication's format ``Method,Mean_IoU,Mean_Dice`` (foreground classes only);
- ``sam_lora_performance_with_background.csv``: the same shape, background averaged in (publication-compatible only);
- ``comparison.csv``: per method the headline means with 95% CIs and the with-background means, labelled;
- ``per_class.csv``: every method x foreground class (Dice, IoU, HD95, pooled values, areas, CIs);
- per method ``{method}_per_class.csv``, ``_per_image.csv``, ``_detection.csv``, ``_confusion.csv``,
  ``_summary.json`` (``octsam.evaluation.metrics.write_results``);
- figures: ``metric_bars.png``, ``qualitative_grid.png`` (best, median, worst B-scan), ``confusion_{method}.png``,
  ``training_curves_{method}.png`` (when a training history is given or found next to the adapter);
- ``report.md`` tying them together, and ``comparison.json`` (what ``run_comparison`` returns).

The output folder is written to a temporary sibling and moved into place at the end, so a failed run leaves no
half-written results; an existing non-empty folder is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octsam.bases import base_of, get_base
from octsam.errors import OctSamError
from octsam.evaluation.report import (
    PUBLICATION_CSV,
    PUBLICATION_CSV_WITH_BACKGROUND,
    _class_table,
    _headline_table,
    _report,
    ci_note,
)
from octsam.folders import atomic_folder, check_output_folder
from octsam.textsafe import csv_frame

logger = logging.getLogger("octsam")

ZERO_SHOT = "zero-shot"


def default_method_name(config) -> str:
    """Seed-style row names: 'U-Net' for the baseline, 'LoRA' for SAM adapters (prompted ones say so)."""
    name = base_of(config).method_name
    return f"{name} (prompted, GT boxes)" if config.mode == "prompted" else name


def training_history(adapter: str | os.PathLike) -> list[dict] | None:
    """The per-epoch history of the run that wrote ``RUN/best_adapter`` (from ``RUN/checkpoints/*/trainer_state``)."""
    from octsam.runs import run_history

    folder = Path(adapter)
    return run_history(folder.parent) if folder.is_dir() else None


def _slug(name: str) -> str:
    from octsam.evaluation.report import _slug as metrics_slug

    return metrics_slug(name)


class _LazyColumn(Sequence):
    """``split[i][column]`` as uint8 arrays on demand (the qualitative grid needs only a few B-scans)."""

    def __init__(self, split, column: str):
        self.split, self.column = split, column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index):
        from octsam.data.samples import to_uint8_image

        value = self.split[int(index)][self.column]
        return to_uint8_image(value) if self.column == "image" else np.asarray(value, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ the comparison
def run_comparison(
    dataset: str,
    adapters: Mapping[str, str] | None = None,
    zero_shot_base: str | None = None,
    output_dir: str | os.PathLike = "results/comparison",
    split: str = "test",
    pixel_spacing_mm: tuple[float, float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    training_histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    dataset_revision: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    overwrite: bool = False,
    verbose: bool = True,
    figure_dpi: int = 150,
    rank_by: str | None = None,
    tta: str = "none",
    zero_shot_input_mode: str = "resize",
) -> dict[str, Any]:
    """Evaluate every method on the same ``split`` of ``dataset`` and write tables, figures and ``report.md``.

    The public entry of ``octsam-evaluate`` (and the demo): its keyword options are the command's options, one each,
    with the command's defaults; inside, they become one ``Comparison`` dataclass.

    ``adapters`` maps a method name (the row name in the tables, e.g. "LoRA", "U-Net") to an adapter folder or Hub
    repo, or to a list of them (an ensemble: probabilities averaged); ``tta`` ``flip`` adds the mirrored B-scan to
    every adapter's prediction; ``zero_shot_input_mode`` ``native`` decodes each zero-shot box in a native window; SAM adapters trained in automatic mode run without prompts, prompted-mode ones with one ground-truth box per
    class instance. ``zero_shot_base`` (a SAM base id or folder) adds the zero-shot row: that base with no adapter, the
    same boxes, prompted as the base was trained (``octsam.protocol.zero_shot_rule``). ``training_histories`` maps method names to per-epoch dicts
    (the training loop's ``history``); histories found next to ``RUN/best_adapter`` folders are used otherwise.
    ``rank_by`` names the method whose per-image Dice picks the best, median and worst B-scans of the qualitative
    grid (default: the first automatic-mode SAM adapter, else the first adapter). ``figure_dpi`` sets the
    resolution of every PNG. Returns the JSON-able summary also written to
    ``comparison.json`` (headline and per-class metrics with CIs per method, file and figure names, the CI note and
    the printed table) and, with ``verbose``, prints the comparison table.
    """
    from octsam.adapter import check_adapter_folder, check_same_labels, resolve_adapter
    from octsam.data.dataset import load_oct_dataset

    adapters = dict(adapters or {})
    if not adapters and zero_shot_base is None:
        raise OctSamError("Nothing to evaluate: give at least one adapter (--adapter) or the zero-shot baseline.")
    if ZERO_SHOT in adapters:
        raise OctSamError(f"The method name {ZERO_SHOT!r} is reserved for the zero-shot baseline; rename the adapter.")
    final = check_output_folder(output_dir, overwrite)  # before any work; again under the lock

    dataset_dict, labels = load_oct_dataset(dataset, revision=dataset_revision)
    if split not in dataset_dict or len(dataset_dict[split]) == 0:
        raise OctSamError(
            f"Dataset {dataset} has no (or an empty) {split!r} split; its splits are {sorted(dataset_dict)}."
        )
    data = dataset_dict[split]

    # Check every adapter before spending time on any of them.
    methods: list[tuple[str, str, Any]] = []  # (method name, kind, adapter folder or base id)
    given = dict(training_histories or {})
    histories: dict[str, list] = {}
    renamed: dict[str, str] = {}
    if zero_shot_base is not None:
        methods.append((ZERO_SHOT, "zero-shot", zero_shot_base))
    for name, adapter in adapters.items():
        members = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]  # several: an ensemble
        folders = [resolve_adapter(str(member)) for member in members]
        configs = [check_adapter_folder(member_folder) for member_folder in folders]
        for member, config in zip(members, configs):
            check_same_labels(config.labels, labels, str(member), str(dataset))
        if len(configs) > 1:
            from octsam.segmenter import check_ensemble

            check_ensemble(configs)
        config = configs[0]
        folder = folders[0]
        history = given.get(name) or (training_history(folder) if len(folders) == 1 else None)
        if config.mode == "prompted" and "prompt" not in name.lower():
            renamed[name] = name = f"{name} (prompted, GT boxes)"
        if any(name == m[0] for m in methods):
            raise OctSamError(f"Two methods are called {name!r}; name them with --adapter NAME=DIR.")
        source = str(folder) if len(folders) == 1 else [str(f) for f in folders]
        methods.append((name, config.architecture if config.mode == "automatic" else "prompted", source))
        if history:
            histories[name] = list(history)

    rank_by = renamed.get(rank_by, rank_by) if rank_by is not None else _default_rank_by(methods)
    if rank_by not in [m[0] for m in methods]:
        raise OctSamError(f"rank_by={rank_by!r} is not one of the methods {[m[0] for m in methods]}.")

    comparison = Comparison(
        methods, data, labels, str(dataset), split, pixel_spacing_mm, n_bootstrap, seed, histories, device,
        batch_size, figure_dpi, rank_by, tta, zero_shot_input_mode,
    )  # fmt: skip
    from octsam.evaluation.predict import across_processes
    from octsam.infer.archive import Processes

    if not Processes(device).is_main:
        # another process of an accelerate launch: it predicts its share of every method's B-scans; the main
        # process gathers them, computes every metric once and writes the folder
        with across_processes():
            _evaluate_methods(comparison, None)
        return {}
    with atomic_folder(final, lock="evaluation", overwrite=overwrite) as tmp, across_processes():
        summary = _evaluate_and_write(comparison, tmp)
    summary["output_dir"] = str(final)
    if verbose:
        print(summary["text_table"])
        print(f"\n{summary['ci_note']}\nResults, figures and report: {final / 'report.md'}")
    return summary


@dataclass
class Comparison:
    """One comparison, checked and ready to run: the methods (name, kind, adapter folder or base id) on ``data``
    (the split), and how to evaluate and draw them."""

    methods: list[tuple[str, str, Any]]
    data: Any  # the datasets split
    labels: list[str]
    dataset: str
    split: str
    spacing: tuple[float, float] | None
    n_bootstrap: int
    seed: int
    histories: dict[str, list]
    device: str
    batch_size: int
    dpi: int
    rank_by: str
    tta: str = "none"  # test-time augmentation of the adapters (octsam.segmenter.TTA_MODES)
    zero_shot_input_mode: str = "resize"  # the zero-shot row: the resized B-scan or native windows around each box


def _evaluate_and_write(comparison: Comparison, out: Path) -> dict[str, Any]:
    """Evaluate every method and write its tables, the comparison tables, figures, comparison.json and report.md."""
    from octsam.evaluation.metrics import PUBLICATION_COLUMNS

    results, seconds = _evaluate_methods(comparison, out)
    files = _write_tables(comparison, results, out)
    figures = _draw_figures(comparison, results, out)
    settings = next(iter(results.values())).settings
    n_patients, n_images = int(settings["n_patients"]), int(settings["n_images"])
    text_table = _headline_table(results, comparison.labels)
    summary: dict[str, Any] = {
        "dataset": comparison.dataset,
        "split": comparison.split,
        "labels": list(comparison.labels),
        "n_images": n_images,
        "n_patients": n_patients,
        "n_bootstrap": comparison.n_bootstrap,
        "seed": comparison.seed,
        "pixel_spacing_mm": list(comparison.spacing) if comparison.spacing else None,
        "headline_classes": settings.get("headline_classes"),
        "methods": {},
        "files": files,
        "figures": figures,
        "ci_note": ci_note(n_patients, n_images, comparison.n_bootstrap),
        "text_table": text_table,
        "publication_columns": list(PUBLICATION_COLUMNS),
    }
    for (name, kind, source), result in zip(comparison.methods, results.values()):
        entry = result.to_dict()
        entry.update(kind=kind, source=str(source), seconds=seconds[name])
        summary["methods"][name] = entry
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["qualitative_grid_ranked_by"] = comparison.rank_by
    report = _report(summary, comparison.methods, text_table, _class_table(results), figures, comparison.histories)
    (out / "report.md").write_text(report)
    return summary


def _evaluate_methods(comparison: Comparison, out: Path | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Every method on the same B-scans; each method's own tables written as soon as it is done."""
    from octsam.evaluation.predict import evaluate_model, evaluate_zero_shot
    from octsam.evaluation.report import write_results

    c = comparison
    kwargs = dict(pixel_spacing_mm=c.spacing, n_bootstrap=c.n_bootstrap, seed=c.seed)
    results, seconds = {}, {}
    for name, kind, source in c.methods:
        logger.info(f"evaluating {name} on {len(c.data)} B-scans of the {c.split} split")
        start = time.perf_counter()
        if kind == "zero-shot":
            result = evaluate_zero_shot(source, c.data, c.labels, None, device=c.device, batch_size=c.batch_size,
                                        input_mode=c.zero_shot_input_mode, **kwargs)  # fmt: skip
        else:
            result = evaluate_model(source, c.data, c.labels, None, method=name, device=c.device,
                                    batch_size=c.batch_size, tta=c.tta, **kwargs)  # fmt: skip
        seconds[name] = round(time.perf_counter() - start, 2)
        if out is None:  # a process that only predicts (see run_comparison)
            continue
        write_results(result, out, name)
        results[name] = result
    return results, seconds


def _write_tables(comparison: Comparison, results: dict[str, Any], out: Path) -> dict[str, str]:
    """The publication-format CSVs (SAM methods present), comparison.csv and per_class.csv; their file names."""
    import pandas as pd

    from octsam.evaluation.report import comparison_table, write_publication_csv

    files: dict[str, str] = {}
    if any(
        _adapts_a_base(kind) for _, kind, _ in comparison.methods
    ):  # the publication's SAM table; a U-Net alone has none
        publication_rows = {n: (r.headline["mean_iou"], r.headline["mean_dice"]) for n, r in results.items()}
        files["publication_csv"] = write_publication_csv(publication_rows, out / PUBLICATION_CSV).name
        publication_bg = {n: (r.headline["mean_iou_with_background"], r.headline["mean_dice_with_background"])
                   for n, r in results.items()}  # fmt: skip
        files["publication_csv_with_background"] = write_publication_csv(
            publication_bg, out / PUBLICATION_CSV_WITH_BACKGROUND
        ).name
    table = comparison_table(results)
    csv_frame(table).to_csv(out / "comparison.csv", index=False, float_format="%.6g")
    files["comparison_csv"] = "comparison.csv"
    per_class = pd.concat([r.per_class.assign(method=n) for n, r in results.items()], ignore_index=True)
    per_class = per_class[["method", *[c for c in per_class.columns if c != "method"]]]
    csv_frame(per_class).to_csv(out / "per_class.csv", index=False, float_format="%.6g")
    files["per_class_csv"] = "per_class.csv"
    return files


def _draw_figures(comparison: Comparison, results: dict[str, Any], out: Path) -> dict[str, str]:
    """Metric bars, the qualitative grid, a confusion matrix per method and training curves; their file names."""
    from octsam.evaluation.plots import (
        plot_confusion_matrix,
        plot_metric_bars,
        plot_qualitative_grid,
        plot_training_curves,
    )

    c = comparison
    figures: dict[str, str] = {}
    figures["metric_bars"] = plot_metric_bars(
        results,
        out / "metric_bars.png",
        title=f"IoU and Dice per class, {c.split} split\n(error bars: 95% CI, bootstrap over patients)",
        dpi=c.dpi,
    ).name
    figures["qualitative_grid"] = plot_qualitative_grid(
        _LazyColumn(c.data, "image"),
        _LazyColumn(c.data, "mask"),
        {n: r.predictions for n, r in results.items()},
        c.labels,
        out / "qualitative_grid.png",
        scores={n: r.image_scores("dice") for n, r in results.items()},
        rank_by=c.rank_by,
        scan_ids=[str(s) for s in c.data["scan_id"]],
        dpi=c.dpi,
    ).name
    for name, result in results.items():
        figures[f"confusion {name}"] = plot_confusion_matrix(
            result.confusion, c.labels, out / f"confusion_{_slug(name)}.png",
            title=f"{name}: pixel confusion on {c.split} (row-normalised)", dpi=c.dpi,
        ).name  # fmt: skip
    for name, history in c.histories.items():
        figures[f"training curves {name}"] = plot_training_curves(
            history, out / f"training_curves_{_slug(name)}.png", class_names=c.labels, dpi=c.dpi
        ).name
    return figures


def _default_rank_by(methods) -> str:
    fine_tuned = [n for n, kind, _ in methods if kind != "zero-shot"]
    adapters = (n for n, kind, _ in methods if kind not in (ZERO_SHOT, "prompted") and _adapts_a_base(kind))
    return next(adapters, fine_tuned[0] if fine_tuned else methods[0][0])


def _adapts_a_base(kind: str) -> bool:
    """Zero-shot, prompted and automatic adapters of a base model (LoRA), not a model of its own (the U-Net):
    ``kind`` is a method's kind, an architecture name for an automatic model (its registry record)."""
    return kind in (ZERO_SHOT, "prompted") or get_base(kind).peft_adapter
