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
from octsam.folders import FolderLock, atomic_folder

logger = logging.getLogger("octsam")

ZERO_SHOT = "zero-shot"


def default_method_name(config) -> str:
    """Seed-style row names: 'U-Net' for the baseline, 'LoRA' for SAM adapters (prompted ones say so)."""
    name = base_of(config).method_name
    return f"{name} (prompted, GT boxes)" if config.mode == "prompted" else name


def training_history(adapter: str | os.PathLike) -> list[dict] | None:
    """The per-epoch history of the run that wrote ``RUN/best_adapter`` (from ``RUN/checkpoints/*/trainer_state``)."""
    folder = Path(adapter)
    states = sorted((folder.parent / "checkpoints").glob("epoch-[0-9][0-9][0-9][0-9]/trainer_state.json"))
    if not folder.is_dir() or not states:
        return None
    try:
        return json.loads(states[-1].read_text()).get("history") or None
    except (OSError, json.JSONDecodeError):
        return None


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
) -> dict[str, Any]:
    """Evaluate every method on the same ``split`` of ``dataset`` and write tables, figures and ``report.md``.

    ``adapters`` maps a method name (the row name in the tables, e.g. "LoRA", "U-Net") to an adapter folder or Hub
    repo; SAM adapters trained in automatic mode run without prompts, prompted-mode ones with one ground-truth box per
    class instance. ``zero_shot_base`` (a SAM base id or folder) adds the zero-shot row: that base with no adapter, the
    same boxes, best of SAM's 3 masks by predicted IoU. ``training_histories`` maps method names to per-epoch dicts
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
    final = Path(output_dir).expanduser()
    if final.exists() and not final.is_dir():
        raise OctSamError(f"--output {final} is a file; give a folder.")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OctSamError(f"Output folder {final} is not empty; choose another --output or pass --overwrite.")

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
        folder = resolve_adapter(str(adapter))
        config = check_adapter_folder(folder)
        check_same_labels(config.labels, labels, str(adapter), str(dataset))
        history = given.get(name) or training_history(folder)
        if config.mode == "prompted" and "prompt" not in name.lower():
            renamed[name] = name = f"{name} (prompted, GT boxes)"
        if any(name == m[0] for m in methods):
            raise OctSamError(f"Two methods are called {name!r}; name them with --adapter NAME=DIR.")
        methods.append((name, config.architecture if config.mode == "automatic" else "prompted", str(folder)))
        if history:
            histories[name] = list(history)

    rank_by = renamed.get(rank_by, rank_by) if rank_by is not None else _default_rank_by(methods)
    if rank_by not in [m[0] for m in methods]:
        raise OctSamError(f"rank_by={rank_by!r} is not one of the methods {[m[0] for m in methods]}.")

    with FolderLock(final, "evaluation"), atomic_folder(final) as tmp:
        summary = _evaluate_and_write(
            methods, data, labels, tmp, dataset, split, pixel_spacing_mm, n_bootstrap, seed, histories, device,
            batch_size, figure_dpi, rank_by,
        )  # fmt: skip
    summary["output_dir"] = str(final)
    if verbose:
        print(summary["text_table"])
        print(f"\n{summary['ci_note']}\nResults, figures and report: {final / 'report.md'}")
    return summary


def _evaluate_and_write(
    methods,
    data,
    labels,
    out: Path,
    dataset,
    split,
    spacing,
    n_bootstrap,
    seed,
    histories,
    device,
    batch_size,
    dpi,
    rank_by,
) -> dict[str, Any]:
    import pandas as pd

    from octsam.evaluation.metrics import PUBLICATION_COLUMNS
    from octsam.evaluation.plots import (
        plot_confusion_matrix,
        plot_metric_bars,
        plot_qualitative_grid,
        plot_training_curves,
    )
    from octsam.evaluation.predict import evaluate_model, evaluate_zero_shot
    from octsam.evaluation.report import comparison_table, write_publication_csv

    kwargs = dict(pixel_spacing_mm=spacing, n_bootstrap=n_bootstrap, seed=seed)
    results, seconds = {}, {}
    for name, kind, source in methods:
        logger.info(f"evaluating {name} on {len(data)} B-scans of the {split} split")
        start = time.perf_counter()
        if kind == "zero-shot":
            result = evaluate_zero_shot(source, data, labels, None, device=device, batch_size=batch_size, **kwargs)
        else:
            result = evaluate_model(source, data, labels, None, method=name, device=device, batch_size=batch_size,
                                    **kwargs)  # fmt: skip
        seconds[name] = round(time.perf_counter() - start, 2)
        from octsam.evaluation.report import write_results

        write_results(result, out, name)
        results[name] = result

    files: dict[str, str] = {}
    if any(_adapts_a_base(kind) for _, kind, _ in methods):  # the publication's SAM table; a U-Net alone has none
        publication_rows = {n: (r.headline["mean_iou"], r.headline["mean_dice"]) for n, r in results.items()}
        files["publication_csv"] = write_publication_csv(publication_rows, out / PUBLICATION_CSV).name
        publication_bg = {n: (r.headline["mean_iou_with_background"], r.headline["mean_dice_with_background"])
                   for n, r in results.items()}  # fmt: skip
        files["publication_csv_with_background"] = write_publication_csv(
            publication_bg, out / PUBLICATION_CSV_WITH_BACKGROUND
        ).name
    table = comparison_table(results)
    table.to_csv(out / "comparison.csv", index=False, float_format="%.6g")
    files["comparison_csv"] = "comparison.csv"
    per_class = pd.concat([r.per_class.assign(method=n) for n, r in results.items()], ignore_index=True)
    per_class = per_class[["method", *[c for c in per_class.columns if c != "method"]]]
    per_class.to_csv(out / "per_class.csv", index=False, float_format="%.6g")
    files["per_class_csv"] = "per_class.csv"

    # Figures.
    figures: dict[str, str] = {}
    figures["metric_bars"] = plot_metric_bars(
        results,
        out / "metric_bars.png",
        title=f"IoU and Dice per class, {split} split\n(error bars: 95% CI, bootstrap over patients)",
        dpi=dpi,
    ).name
    figures["qualitative_grid"] = plot_qualitative_grid(
        _LazyColumn(data, "image"),
        _LazyColumn(data, "mask"),
        {n: r.predictions for n, r in results.items()},
        labels,
        out / "qualitative_grid.png",
        scores={n: r.image_scores("dice") for n, r in results.items()},
        rank_by=rank_by,
        scan_ids=[str(s) for s in data["scan_id"]],
        dpi=dpi,
    ).name
    for name, result in results.items():
        figures[f"confusion {name}"] = plot_confusion_matrix(
            result.confusion, labels, out / f"confusion_{_slug(name)}.png",
            title=f"{name}: pixel confusion on {split} (row-normalised)", dpi=dpi,
        ).name  # fmt: skip
    for name, history in histories.items():
        figures[f"training curves {name}"] = plot_training_curves(
            history, out / f"training_curves_{_slug(name)}.png", class_names=labels, dpi=dpi
        ).name

    settings = next(iter(results.values())).settings
    n_patients, n_images = int(settings["n_patients"]), int(settings["n_images"])
    note = ci_note(n_patients, n_images, n_bootstrap)
    text_table = _headline_table(results, labels)
    class_table = _class_table(results)
    summary: dict[str, Any] = {
        "dataset": str(dataset),
        "split": split,
        "labels": list(labels),
        "n_images": n_images,
        "n_patients": n_patients,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "pixel_spacing_mm": list(spacing) if spacing else None,
        "headline_classes": settings.get("headline_classes"),
        "methods": {},
        "files": files,
        "figures": figures,
        "ci_note": note,
        "text_table": text_table,
        "publication_columns": list(PUBLICATION_COLUMNS),
    }
    for (name, kind, source), result in zip(methods, results.values()):
        entry = result.to_dict()
        entry.update(kind=kind, source=str(source), seconds=seconds[name])
        summary["methods"][name] = entry
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["qualitative_grid_ranked_by"] = rank_by
    (out / "report.md").write_text(_report(summary, methods, text_table, class_table, figures, histories))
    return summary


def _default_rank_by(methods) -> str:
    fine_tuned = [n for n, kind, _ in methods if kind != "zero-shot"]
    adapters = (n for n, kind, _ in methods if kind not in (ZERO_SHOT, "prompted") and _adapts_a_base(kind))
    return next(adapters, fine_tuned[0] if fine_tuned else methods[0][0])


def _adapts_a_base(kind: str) -> bool:
    """Zero-shot, prompted and automatic adapters of a base model (LoRA), not a model of its own (the U-Net):
    ``kind`` is a method's kind, an architecture name for an automatic model (its registry record)."""
    return kind in (ZERO_SHOT, "prompted") or get_base(kind).peft_adapter
