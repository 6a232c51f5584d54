"""Compare methods on one split: zero-shot SAM, fine-tuned SAM + LoRA adapters and the U-Net baseline.

python -m octsam.evaluate --adapter outputs/amd/best_adapter --dataset data/amd --split test --output results/amd
python -m octsam.evaluate --adapter LoRA=outputs/amd/best_adapter --adapter U-Net=outputs/amd_unet/best_adapter \\
    --method zero-shot --dataset data/amd --output results/amd

``run_comparison`` is the one function behind the command (and the demo): it evaluates every method on the same
B-scans with ``octsam.evaluation`` (metrics from ``octsam.metrics``) and writes into ``--output``

- ``sam_lora_performance.csv``: the seed's format ``Method,Mean_IoU,Mean_Dice`` (foreground classes only);
- ``sam_lora_performance_with_background.csv``: the same shape, background averaged in (seed-compatible only);
- ``comparison.csv``: per method the headline means with 95% CIs and the with-background means, labelled;
- ``per_class.csv``: every method x foreground class (Dice, IoU, HD95, pooled values, areas, CIs);
- per method ``{method}_per_class.csv``, ``_per_image.csv``, ``_detection.csv``, ``_confusion.csv``,
  ``_summary.json`` (``octsam.metrics.write_results``);
- figures: ``metric_bars.png``, ``qualitative_grid.png`` (best, median, worst B-scan), ``confusion_{method}.png``,
  ``training_curves_{method}.png`` (when a training history is given or found next to the adapter);
- ``report.md`` tying them together, and ``comparison.json`` (what ``run_comparison`` returns).

The output folder is written to a temporary sibling and moved into place at the end, so a failed run leaves no
half-written results; an existing non-empty folder is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from octsam.errors import OctSamError, cli_main

logger = logging.getLogger("octsam")

ZERO_SHOT = "zero-shot"
SEED_CSV = "sam_lora_performance.csv"
SEED_CSV_WITH_BACKGROUND = "sam_lora_performance_with_background.csv"


# ------------------------------------------------------------------------------------------------ helpers
def parse_adapter_arg(text: str) -> tuple[str | None, str]:
    """``NAME=DIR_OR_REPO`` or ``DIR_OR_REPO`` -> (name or None, adapter). An existing path is never split."""
    if "=" in text and not os.path.exists(text):
        name, adapter = text.split("=", 1)
        if not name.strip() or not adapter.strip():
            raise OctSamError(f"--adapter {text!r}: use NAME=DIR_OR_REPO or DIR_OR_REPO.")
        return name.strip(), adapter.strip()
    return None, text


def parse_spacing(text: str | None) -> tuple[float, float] | None:
    """``"Y,X"`` in mm per pixel -> (y, x)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise OctSamError(
            f"--pixel-spacing-mm {text!r}: give two positive numbers Y,X (mm per pixel), e.g. 0.0039,0.0116"
        )
    return values[0], values[1]


def default_method_name(config) -> str:
    """Seed-style row names: 'U-Net' for the baseline, 'LoRA' for SAM adapters (prompted ones say so)."""
    if config.architecture == "unet":
        return "U-Net"
    return "LoRA (prompted, GT boxes)" if config.mode == "prompted" else "LoRA"


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
    from octsam.metrics import _slug as metrics_slug

    return metrics_slug(name)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ci(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns (readable as plain text too)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


class _LazyColumn(Sequence):
    """``split[i][column]`` as uint8 arrays on demand (the qualitative grid needs only a few B-scans)."""

    def __init__(self, split, column: str):
        self.split, self.column = split, column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index):
        from octsam.transforms import to_uint8_image

        value = self.split[int(index)][self.column]
        return to_uint8_image(value) if self.column == "image" else np.asarray(value, dtype=np.uint8)


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
    from octsam.data import load_oct_dataset
    from octsam.hub import check_adapter_folder, resolve_adapter

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
        if list(config.labels) != list(labels):
            raise OctSamError(
                f"Adapter {adapter} predicts labels {config.labels} but dataset {dataset} has {labels}; evaluate it "
                "on a dataset with the same label set (same names, same order)."
            )
        history = given.get(name) or training_history(folder)
        if config.architecture == "sam" and config.mode == "prompted" and "prompt" not in name.lower():
            renamed[name] = name = f"{name} (prompted, GT boxes)"
        if any(name == m[0] for m in methods):
            raise OctSamError(f"Two methods are called {name!r}; name them with --adapter NAME=DIR.")
        methods.append((name, config.architecture if config.mode == "automatic" else "prompted", str(folder)))
        if history:
            histories[name] = list(history)

    rank_by = renamed.get(rank_by, rank_by) if rank_by is not None else _default_rank_by(methods)
    if rank_by not in [m[0] for m in methods]:
        raise OctSamError(f"rank_by={rank_by!r} is not one of the methods {[m[0] for m in methods]}.")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _evaluate_and_write(
            methods, data, labels, tmp, dataset, split, pixel_spacing_mm, n_bootstrap, seed, histories, device,
            batch_size, figure_dpi, rank_by,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
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

    from octsam.evaluation import evaluate_model, evaluate_zero_shot
    from octsam.metrics import SEED_COLUMNS, comparison_table, write_seed_csv
    from octsam.plots import plot_confusion_matrix, plot_metric_bars, plot_qualitative_grid, plot_training_curves

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
        from octsam.metrics import write_results

        write_results(result, out, name)
        results[name] = result

    files: dict[str, str] = {}
    seed_rows = {n: (r.headline["mean_iou"], r.headline["mean_dice"]) for n, r in results.items()}
    files["seed_csv"] = write_seed_csv(seed_rows, out / SEED_CSV).name
    seed_bg = {n: (r.headline["mean_iou_with_background"], r.headline["mean_dice_with_background"])
               for n, r in results.items()}  # fmt: skip
    files["seed_csv_with_background"] = write_seed_csv(seed_bg, out / SEED_CSV_WITH_BACKGROUND).name
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
        "methods": {},
        "files": files,
        "figures": figures,
        "ci_note": note,
        "text_table": text_table,
        "seed_columns": list(SEED_COLUMNS),
    }
    for (name, kind, source), result in zip(methods, results.values()):
        entry = result.to_dict()
        entry.update(kind=kind, source=str(source), seconds=seconds[name])
        summary["methods"][name] = entry
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["qualitative_grid_ranked_by"] = rank_by
    (out / "report.md").write_text(_report(summary, methods, text_table, class_table, figures, histories))
    return summary


def _headline_table(results, labels) -> str:
    header = ["Method", "Mean IoU [95% CI]", "Mean Dice [95% CI]"]
    header += [f"Dice {name} [95% CI]" for name in labels[1:]]
    header += ["IoU / Dice incl. background (seed-compatible)", "B-scans / patients"]
    rows = []
    for name, r in results.items():
        row = [name]
        for key in ("mean_iou", "mean_dice"):
            row.append(_fmt_ci(r.headline[key], *r.headline_ci.get(key, (np.nan, np.nan))))
        for _, c in r.per_class.iterrows():
            row.append(_fmt_ci(c["dice_mean"], c["dice_ci_low"], c["dice_ci_high"]))
        row.append(f"{_fmt(r.headline['mean_iou_with_background'])} / {_fmt(r.headline['mean_dice_with_background'])}")
        row.append(f"{r.settings['n_images']} / {r.settings['n_patients']}")
        rows.append(row)
    return markdown_table(header, rows)


def _class_table(results) -> str:
    header = ["Class", "Method", "Dice [95% CI]", "IoU [95% CI]", "pooled Dice", "HD95 px", "abs. area error px",
              "detection sens / spec"]  # fmt: skip
    rows = []
    names = list(next(iter(results.values())).per_class["class_name"])
    for class_name in names:
        for method, r in results.items():
            c = r.per_class.set_index("class_name").loc[class_name]
            d = r.detection.set_index("class_name").loc[class_name]
            rows.append([
                class_name, method, _fmt_ci(c["dice_mean"], c["dice_ci_low"], c["dice_ci_high"]),
                _fmt_ci(c["iou_mean"], c["iou_ci_low"], c["iou_ci_high"]), _fmt(c["dice_pooled"]),
                _fmt(c["hd95_px_mean"], 1), _fmt(c["area_abs_error_px_mean"], 0),
                f"{_fmt(d['sensitivity'], 2)} / {_fmt(d['specificity'], 2)}",
            ])  # fmt: skip
    return markdown_table(header, rows)


def _report(summary, methods, text_table, class_table, figures, histories) -> str:
    kinds = {name: kind for name, kind, _ in methods}
    lines = [
        f"# Evaluation on `{summary['dataset']}` ({summary['split']} split)",
        "",
        f"Protocol: every method segments the same {summary['n_images']} B-scans of {summary['n_patients']} test "
        "patients, and Dice and IoU are computed per foreground class per B-scan with MONAI, then averaged over "
        "B-scans (a class absent in both truth and prediction of a B-scan is left out of that class's mean; "
        "background is not in the headline means; pixels labelled 255 are ignored). "
        "Zero-shot SAM gets one ground-truth box per class instance and keeps the best of its 3 masks by predicted "
        "IoU, fine-tuned SAM adapters run in the mode they were trained for (automatic: no prompts; prompted: the "
        "same boxes), and the U-Net baseline is trained through the same train.py, data, splits, loss and metrics.",
        "",
        "## Results",
        "",
        text_table,
        "",
        "The seed-compatible columns average the background class in as well; they are shown only to compare with "
        "figures published that way (the seed publication's) and are not the headline.",
        "",
        "Methods: "
        + "; ".join(
            f"**{name}**: "
            + {
                "zero-shot": "base SAM, no adapter, ground-truth boxes",
                "sam": "SAM + LoRA adapter, automatic mode",
                "prompted": "SAM + LoRA adapter, prompted mode with ground-truth boxes",
                "unet": "MONAI U-Net baseline",
            }.get(kinds[name], kinds[name])
            + f" (`{summary['methods'][name]['source']}`)"
            for name in summary["methods"]
        )
        + ".",
        "",
        "## Per class",
        "",
        class_table,
        "",
        "HD95: 95th-percentile Hausdorff distance in pixels, over B-scans where the class is in both truth and "
        "prediction. Detection: B-scans where the class is present (sensitivity) or absent (specificity) in the truth "
        "and the prediction agrees.",
        "",
        "## Confidence intervals",
        "",
        summary["ci_note"],
        "",
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
    lines += [
        "## Files",
        "",
        f"- `{SEED_CSV}`: `Method,Mean_IoU,Mean_Dice` (the seed's format), foreground classes only;",
        f"- `{SEED_CSV_WITH_BACKGROUND}`: the same with background averaged in (seed-compatible, not the headline);",
        "- `comparison.csv`, `per_class.csv`: all methods with CIs; `METHOD_per_image.csv`, `METHOD_detection.csv`, "
        "`METHOD_confusion.csv`, `METHOD_summary.json` per method; `comparison.json`: everything above.",
        "",
    ]
    return "\n".join(lines)


def _default_rank_by(methods) -> str:
    fine_tuned = [n for n, kind, _ in methods if kind != "zero-shot"]
    return next((n for n, kind, _ in methods if kind == "sam"), fine_tuned[0] if fine_tuned else methods[0][0])


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m octsam.evaluate",
        description="Evaluate adapters (SAM + LoRA, U-Net baseline) and the zero-shot SAM baseline on one split, "
        "with per-class metrics, patient-bootstrap CIs, the seed-format CSV, figures and report.md.",
        epilog="Example: python -m octsam.evaluate --adapter LoRA=outputs/amd/best_adapter "
        "--adapter U-Net=outputs/amd_unet/best_adapter --method zero-shot --dataset data/amd --output results/amd",
    )
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR_OR_REPO",
                   help="Adapter folder or Hub repo (repeat for several; NAME is its row in the tables).")  # fmt: skip
    p.add_argument("--dataset", required=True, help="Dataset folder (dataset_builder) or Hub dataset id.")
    p.add_argument("--dataset-revision", default=None, help="Hub revision of --dataset.")
    p.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    p.add_argument("--output", required=True, help="Results folder (never replaced without --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing, non-empty --output folder.")
    p.add_argument("--method", action="append", default=[], choices=[ZERO_SHOT],
                   help="Also evaluate the zero-shot SAM baseline (ground-truth boxes, best of 3 masks).")  # fmt: skip
    p.add_argument("--base-model", default=None, metavar="ID_OR_DIR",
                   help="SAM base for --method zero-shot (default: the base model of the first SAM adapter).")  # fmt: skip
    p.add_argument(
        "--pixel-spacing-mm", default=None, metavar="Y,X", help="Pixel size in mm: HD95 in mm, areas in mm²."
    )
    p.add_argument("--n-bootstrap", type=int, default=1000, help="Bootstrap resamples of patients (default 1000).")
    p.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="Where to run.")
    p.add_argument("--batch-size", type=int, default=8, help="B-scans per forward pass.")
    p.add_argument("--dpi", type=int, default=150, help="Resolution of the figures (default 150).")
    return p


def _zero_shot_base(args: argparse.Namespace, adapters: Mapping[str, str]) -> str | None:
    if ZERO_SHOT not in args.method:
        return None
    if args.base_model:
        return args.base_model
    from octsam.hub import check_adapter_folder, resolve_adapter

    for adapter in adapters.values():
        config = check_adapter_folder(resolve_adapter(adapter))
        if config.architecture == "sam":
            return config.base_model
    raise OctSamError("--method zero-shot needs a SAM base: pass --base-model ID_OR_DIR (or a SAM --adapter).")


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``octsam-evaluate`` / ``python -m octsam.evaluate``: 0 done, 2 a usage error (printed without a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n_bootstrap < 1:
        raise OctSamError(f"--n-bootstrap must be at least 1, got {args.n_bootstrap}.")
    if args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    adapters: dict[str, str] = {}
    for text in args.adapter:
        name, adapter = parse_adapter_arg(text)
        if name is None:
            from octsam.hub import check_adapter_folder, resolve_adapter

            name = default_method_name(check_adapter_folder(resolve_adapter(adapter)))
        if name in adapters:
            raise OctSamError(f"Two adapters would both be called {name!r}; name them with --adapter NAME=DIR.")
        adapters[name] = adapter
    run_comparison(
        args.dataset,
        adapters=adapters,
        zero_shot_base=_zero_shot_base(args, adapters),
        output_dir=args.output,
        split=args.split,
        pixel_spacing_mm=parse_spacing(args.pixel_spacing_mm),
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        dataset_revision=args.dataset_revision,
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        figure_dpi=args.dpi,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
