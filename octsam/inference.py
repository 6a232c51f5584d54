"""Segment new B-scans with a trained adapter: masks, overlays, probabilities, biomarker areas (``inference.py``).

python inference.py --adapter ORG/NAME --input scans/ --output predictions/
python inference.py --adapter runs/amd/best_adapter --input "scans/**/*.tif" --output out --box fluid:120,80,300,160

Per B-scan (at its native size): ``masks/NAME.png`` (class ids), ``overlays/NAME.png`` (class colours, legend below),
and with ``--save-probabilities`` ``probabilities/NAME.npz`` (float16 (K+1, H, W), channel 0 background). For the
run: ``summary.csv`` (per class: area in pixels, in mm² with ``--pixel-spacing-mm``, 8-connected components) and
``run.json`` (adapter and revision, base model, device, dtype, timings, failures). Everything is written to a
temporary folder that replaces ``--output`` at the end, so an interrupted run leaves nothing half-written and an
existing output is only replaced with ``--overwrite``.

Prompts (boxes and points in native pixel coordinates; CLASS is a label name or id): ``--box CLASS:x1,y1,x2,y2``
and ``--point CLASS:x,y[:neg]`` apply to every input B-scan; ``--prompts FILE.json`` gives them per B-scan::

    {"scan1.png": [{"class": "fluid", "box": [120, 80, 300, 160], "points": [[200, 120], [150, 90, 0]]}]}

Each box is one object; a point joins the box of its class that contains it, and the other points of a class form
one more object. Keys match an input's output name, file name or stem.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError, cli_main

#: octsam.fast_attention.MODES, repeated so that ``--help`` needs no torch import (a test keeps them equal).
ATTENTION_MODES = ("auto", "fold", "fold_flash", "bias", "flex", "triton")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LEGEND_FONT_PT = 9
EPILOG = """examples:
  python inference.py --adapter ORG/NAME --input scans/ --output predictions/
  python inference.py --adapter runs/amd/best_adapter --input "scans/**/*.tif" --output out --pixel-spacing-mm 0.0039,0.0114
  python inference.py --adapter ORG/NAME --dataset ORG/oct-data --split test --output out --save-probabilities
  python inference.py --adapter ORG/NAME --input a.png --output out --box fluid:120,80,300,160 --point fluid:200,120

prompts: coordinates are native pixels of each B-scan; CLASS is a label name or id. --box and --point apply to every
input; each box is one object, a point joins the box of its class that contains it, the other points of a class form
one more object. --prompts FILE.json gives prompts per B-scan (keys: output name, file name or stem):
  {"scan1.png": [{"class": "fluid", "box": [120, 80, 300, 160], "points": [[200, 120], [150, 90, 0]]}]}

outputs (native size): masks/NAME.png (class ids), overlays/NAME.png (legend below), probabilities/NAME.npz,
summary.csv (area px / mm2 and 8-connected components per class), run.json. Exit status: 0 all segmented, 1 some
B-scans failed (listed), 2 a usage or adapter error.
"""


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class ScanInput:
    """One B-scan to segment: a unique output name (posix, no suffix), where it came from, and how to read it."""

    name: str
    source: str
    read: Callable[[], np.ndarray]


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


def _file_reader(path: Path) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from octsam.data import read_scan

        return read_scan(path)

    return read


def _dataset_inputs(name: str, split: str, revision: str | None) -> list[ScanInput]:
    from octsam.data import load_oct_dataset
    from octsam.data import to_uint8 as data_to_uint8

    dataset, _ = load_oct_dataset(name, revision=revision)
    if split not in dataset:
        raise OctSamError(
            f"Dataset {name} has no split {split!r} (it has {', '.join(dataset)}); pick one with --split."
        )
    rows = dataset[split]
    scan_ids = rows["scan_id"]

    def reader(index: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            image = np.asarray(rows[index]["image"])
            return data_to_uint8(image)

        return read

    return [
        ScanInput(re.sub(r"[^\w.\-]+", "_", str(scan_id)) or f"scan_{i:05d}", f"{name}:{split}[{i}]", reader(i))
        for i, scan_id in enumerate(scan_ids)
    ]


def _is_dataset_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _under(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == f or f in resolved.parents for f in folders)


def collect_inputs(
    inputs: list[str],
    dataset: str | None = None,
    split: str = "test",
    dataset_revision: str | None = None,
    exclude: list[Path] | None = None,
) -> list[ScanInput]:
    """Expand files, folders (recursive), globs and a dataset into B-scans with unique output names.

    A folder holding a ``datasets`` DatasetDict (``dataset_dict.json``) is read as a dataset (``split``); files under
    ``exclude`` (the output folder) are skipped. A path that does not exist stops the run.
    """
    exclude = [p.resolve() for p in exclude or []]
    found: list[tuple[str, str, Callable[[], np.ndarray] | None]] = []
    seen: set[Path] = set()

    def add_file(path: Path, name: str) -> None:
        resolved = path.resolve()
        if resolved in seen or _under(path, exclude):
            return
        seen.add(resolved)
        found.append((name, str(path), None))

    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            if _is_dataset_folder(path):
                found.extend((s.name, s.source, s.read) for s in _dataset_inputs(str(path), split, dataset_revision))
                continue
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise OctSamError(f"Input folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
            for p in files:
                add_file(p, p.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            add_file(path, path.stem)
        elif _has_magic(text):
            parts = Path(text).expanduser().parts
            root = Path(*parts[: next(i for i, part in enumerate(parts) if _has_magic(part))] or ["."])
            matches = sorted(Path(m) for m in glob.glob(str(Path(text).expanduser()), recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise OctSamError(f"--input {text!r} matches no image files ({'/'.join(IMAGE_SUFFIXES)}).")
            for m in matches:
                add_file(m, m.relative_to(root).with_suffix("").as_posix() if m.is_relative_to(root) else m.stem)
        else:
            raise OctSamError(
                f"Input {text} does not exist. Give image files, folders or globs with --input, or a dataset folder "
                "or Hub dataset id with --dataset."
            )
    if dataset:
        found.extend((s.name, s.source, s.read) for s in _dataset_inputs(dataset, split, dataset_revision))
    if not found:
        raise OctSamError("No input B-scans: give --input files/folders/globs or --dataset.")

    scans, used = [], set()
    for name, source, read in found:
        unique, n = name, 1
        while unique.lower() in used:
            n += 1
            unique = f"{name}-{n}"
        used.add(unique.lower())
        scans.append(ScanInput(unique, source, read or _file_reader(Path(source))))
    return scans


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class PromptSpec:
    """Prompts before they are matched to an image: class token (name or id) + box and/or points."""

    label: str
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float, int]] = field(default_factory=list)


def _numbers(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise OctSamError(f"{what}: expected {count} comma-separated numbers, got {text!r}.")
    return values


def parse_box(text: str) -> PromptSpec:
    """``CLASS:x1,y1,x2,y2`` -> a box prompt."""
    label, sep, coords = text.rpartition(":")
    if not sep or not label:
        raise OctSamError(f"--box {text!r}: write it as CLASS:x1,y1,x2,y2 (CLASS a label name or id).")
    x1, y1, x2, y2 = _numbers(coords, 4, f"--box {text!r}")
    if not (x2 > x1 and y2 > y1):
        raise OctSamError(f"--box {text!r}: needs x1 < x2 and y1 < y2 (pixel coordinates of the B-scan).")
    return PromptSpec(label, box=(x1, y1, x2, y2))


def parse_point(text: str) -> PromptSpec:
    """``CLASS:x,y`` (inside the object) or ``CLASS:x,y:neg`` (outside it) -> a point prompt."""
    parts = text.split(":")
    positive = 1
    if len(parts) >= 3 and parts[-1].lower() in ("neg", "pos"):
        positive = 0 if parts[-1].lower() == "neg" else 1
        parts = parts[:-1]
    if len(parts) < 2 or not parts[0]:
        raise OctSamError(f"--point {text!r}: write it as CLASS:x,y or CLASS:x,y:neg.")
    label, coords = ":".join(parts[:-1]), parts[-1]
    x, y = _numbers(coords, 2, f"--point {text!r}")
    return PromptSpec(label, points=[(x, y, positive)])


def _spec_from_json(item: object, where: str) -> list[PromptSpec]:
    if not isinstance(item, dict) or "class" not in item or not ({"box", "points"} & set(item)):
        raise OctSamError(
            f"{where}: each prompt must look like {{'class': 'fluid', 'box': [x1, y1, x2, y2], "
            f"'points': [[x, y], [x, y, 0]]}} (box and/or points), got {item!r}."
        )
    label = str(item["class"])
    box = None
    if item.get("box") is not None:
        box_text = ",".join(str(v) for v in item["box"]) if isinstance(item["box"], list) else str(item["box"])
        box = parse_box(f"{label}:{box_text}").box
    points = []
    for p in item.get("points") or []:
        if not isinstance(p, list) or len(p) not in (2, 3):
            raise OctSamError(f"{where}: a point is [x, y] or [x, y, 0|1], got {p!r}.")
        try:
            points.append((float(p[0]), float(p[1]), int(p[2]) if len(p) == 3 else 1))
        except (TypeError, ValueError) as err:
            raise OctSamError(f"{where}: a point is [x, y] or [x, y, 0|1], got {p!r}.") from err
    return [PromptSpec(label, box=box, points=points)]


def read_prompt_file(path: str) -> dict[str, list[PromptSpec]]:
    """``{"scan name": [prompt, ...]}`` from a JSON file (see the module docstring)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise OctSamError(f"--prompts file {path} does not exist.") from err
    except (OSError, json.JSONDecodeError) as err:
        raise OctSamError(f"--prompts file {path} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise OctSamError(f"--prompts file {path} must hold an object {{'scan name': [prompts]}}.")
    out = {}
    for key, items in data.items():
        if not isinstance(items, list):
            raise OctSamError(f"--prompts file {path}: the value of {key!r} must be a list of prompts.")
        out[str(key)] = [spec for item in items for spec in _spec_from_json(item, f"{path} [{key!r}]")]
    return out


def label_id(token: str, labels: list[str]) -> int:
    """A class given as a name or an id -> its id (1..K)."""
    if token in labels[1:]:
        return labels.index(token)
    if token.isdigit() and 1 <= int(token) < len(labels):
        return int(token)
    choices = ", ".join(f"{i} {name}" for i, name in enumerate(labels) if i)
    raise OctSamError(f"Prompt class {token!r} is not a class of this adapter; use one of: {choices}.")


def build_prompts(specs: list[PromptSpec], labels: list[str], shape: tuple[int, int], name: str) -> list:
    """Group box/point specs into ``Prompt`` objects for one B-scan, checking they lie inside it."""
    from octsam.segmenter import Prompt

    height, width = shape
    prompts: list[Prompt] = []
    loose: dict[int, list[tuple[float, float, int]]] = {}
    for spec in specs:
        label = label_id(spec.label, labels)
        if spec.box is not None:
            x1, y1, x2, y2 = spec.box
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise OctSamError(f"{name}: box {spec.box} lies outside the {width}x{height} B-scan.")
            prompts.append(Prompt(label=label, box=spec.box, points=list(spec.points)))
        else:
            loose.setdefault(label, []).extend(spec.points)
    for label, points in loose.items():
        rest = []
        for x, y, pos in points:
            if not (0 <= x <= width and 0 <= y <= height):
                raise OctSamError(f"{name}: point ({x}, {y}) lies outside the {width}x{height} B-scan.")
            owner = next(
                (p for p in prompts if p.label == label and p.box[0] <= x <= p.box[2] and p.box[1] <= y <= p.box[3]),
                None,
            )
            (owner.points if owner is not None else rest).append((x, y, pos))
        if rest:
            prompts.append(Prompt(label=label, points=rest))
    return prompts


def _file_prompts(prompt_file: dict[str, list[PromptSpec]], scans: list[ScanInput]) -> tuple[dict, list[str]]:
    """Match the prompt file's keys to scans (output name, file name with suffix, or stem); return unmatched keys."""
    by_key: dict[str, str] = {}
    for scan in scans:
        for key in (scan.name, Path(scan.source).name, Path(scan.source).stem, scan.source):
            by_key.setdefault(key, scan.name)
    matched: dict[str, list[PromptSpec]] = {}
    unmatched = []
    for key, specs in prompt_file.items():
        name = by_key.get(key)
        if name is None:
            unmatched.append(key)
        else:
            matched.setdefault(name, []).extend(specs)
    return matched, unmatched


# ------------------------------------------------------------------------------------------------ outputs
def class_areas(mask: np.ndarray, num_labels: int) -> tuple[list[int], list[int]]:
    """Pixels and 8-connected components of each foreground class 1..K of an index mask."""
    import cv2

    areas, components = [], []
    for k in range(1, num_labels):
        region = (mask == k).astype(np.uint8)
        areas.append(int(region.sum()))
        components.append(int(cv2.connectedComponents(region, connectivity=8)[0] - 1) if areas[-1] else 0)
    return areas, components


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, labels: list[str]) -> np.ndarray:
    """``octsam.plots.overlay`` at native size with the class legend in a white strip below (RGB uint8).

    The top-left H x W pixels are exactly the overlay; the canvas is widened only when the legend needs more room
    than a narrow B-scan gives.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from octsam.plots import add_legend, overlay

    blended = overlay(image, mask, labels)
    height, width = blended.shape[:2]
    names = labels[1:]
    entry_px = 34 + 7 * max(len(n) for n in names)
    canvas_w = max(width, entry_px)
    ncol = max(1, min(len(names), canvas_w // entry_px))
    rows = -(-len(names) // ncol)
    strip = 10 + 18 * rows
    canvas_h = height + strip
    dpi = 100
    fig = Figure(figsize=(canvas_w / dpi, canvas_h / dpi), dpi=dpi, facecolor="white")
    ax = fig.add_axes((0, strip / canvas_h, width / canvas_w, height / canvas_h))
    ax.imshow(blended, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    add_legend(
        fig,
        labels,
        loc="lower left",
        bbox_to_anchor=(0, 0),
        ncol=ncol,
        fontsize=LEGEND_FONT_PT,
        handlelength=1.2,
        handleheight=0.9,
        borderaxespad=0.3,
        columnspacing=1.0,
        borderpad=0.2,
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    out = np.ascontiguousarray(rgba[..., :3])
    out[:height, :width] = blended  # exact pixels (the rendered image is the same; this rules out resampling)
    return out


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False)


def prepare_output(output: str, overwrite: bool) -> tuple[Path, Path]:
    """Check ``--output`` and make the temporary folder the run writes into (renamed to ``output`` at the end)."""
    final = Path(output).expanduser()
    if final.exists() and not final.is_dir():
        raise OctSamError(f"--output {final} is a file; give a folder.")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OctSamError(
            f"Output folder {final} is not empty; choose another --output or pass --overwrite to replace it."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return final, tmp


def commit_output(tmp: Path, final: Path) -> None:
    """Move the finished temporary folder to ``final`` (replacing an old one, which --overwrite allowed)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _spacing(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    values = _numbers(text, 2, f"--pixel-spacing-mm {text!r} (Y,X in mm)")
    if min(values) <= 0:
        raise OctSamError(f"--pixel-spacing-mm {text!r}: spacings must be positive (Y,X in mm per pixel).")
    return values[0], values[1]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------------------ run
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inference.py",
        description="Segment OCT B-scans with an octsam adapter: masks, overlays, probabilities and biomarker areas.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--adapter", required=True, help="Adapter folder or Hub repo id (ORG/NAME).")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the adapter.")
    p.add_argument(
        "--base-model",
        "--base_model",
        dest="base_model",
        default=None,
        help="Base SAM to use instead of the adapter's (e.g. a local copy of facebook/sam-vit-base for offline use).",
    )
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="Image files, folders (recursive; a dataset folder is read as one), globs.",
    )
    p.add_argument("--dataset", default=None, help="A datasets dataset folder or Hub dataset id to segment.")
    p.add_argument("--split", default="test", help="Split of --dataset (or of a dataset folder in --input).")
    p.add_argument("--dataset-revision", default=None, help="Hub revision of --dataset.")
    p.add_argument("--output", required=True, help="Output folder (created; never overwritten without --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing, non-empty output folder.")
    p.add_argument("--box", action="append", default=[], metavar="CLASS:x1,y1,x2,y2", help="Box prompt (repeat).")
    p.add_argument("--point", action="append", default=[], metavar="CLASS:x,y[:neg]", help="Point prompt (repeat).")
    p.add_argument("--prompts", default=None, metavar="FILE.json", help="Prompts per B-scan (format below).")
    p.add_argument("--save-probabilities", action="store_true", help="Also write probabilities/NAME.npz.")
    p.add_argument("--pixel-spacing-mm", default=None, metavar="Y,X", help="Pixel size in mm, for areas in mm².")
    p.add_argument("--no-merge", action="store_true", help="Keep LoRA separate (slower; merged is the default).")
    p.add_argument(
        "--batch-size", type=int, default=None, help="B-scans per forward pass (default 16 on CUDA, 1 elsewhere)."
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="Where to run.")
    p.add_argument(
        "--no-fast-attention",
        action="store_true",
        help="Use transformers' own attention instead of octsam's exact fast attention (on by default).",
    )
    p.add_argument(
        "--attention-mode",
        default="auto",
        choices=list(ATTENTION_MODES),
        help="Fast-attention mode (octsam.fast_attention): auto picks per device; flex is FlexAttention (GPU).",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the image encoder (on the CPU with frozen weights): faster for many B-scans, "
        "about a minute of compilation first.",
    )
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns the number of B-scans that failed."""
    import torch
    from tqdm.auto import tqdm

    from octsam import __version__
    from octsam.hub import resolve_adapter
    from octsam.segmenter import Segmenter

    started = time.perf_counter()
    if args.batch_size is not None and args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    spacing = _spacing(args.pixel_spacing_mm)
    cli_specs = [parse_box(b) for b in args.box] + [parse_point(p) for p in args.point]
    prompt_file = read_prompt_file(args.prompts) if args.prompts else {}
    final, tmp = prepare_output(args.output, args.overwrite)
    try:
        scans = collect_inputs(args.input, args.dataset, args.split, args.dataset_revision, exclude=[final, tmp])
        file_specs, unmatched = _file_prompts(prompt_file, scans)
        for key in unmatched:
            print(f"warning: --prompts key {key!r} matches no input B-scan", file=sys.stderr)
        prompted = bool(cli_specs or prompt_file)

        t0 = time.perf_counter()
        folder = resolve_adapter(args.adapter, revision=args.revision)
        segmenter = Segmenter.from_pretrained(
            folder,
            revision=args.revision,
            device=args.device,
            merge=not args.no_merge,
            base_model=args.base_model,
            fast_attention=False if args.no_fast_attention else args.attention_mode,
            compile=args.compile,
        )
        load_s = time.perf_counter() - t0
        batch_size = args.batch_size or (16 if segmenter.device.type == "cuda" else 1)
        segmenter.batch_size = batch_size
        labels = segmenter.labels
        for spec in cli_specs + [s for specs in prompt_file.values() for s in specs]:
            label_id(spec.label, labels)  # a bad class name stops the run before any work
        if segmenter.config.mode == "prompted" and not prompted:
            raise OctSamError(
                f"Adapter {args.adapter} was trained in prompted mode: give prompts with --box CLASS:x1,y1,x2,y2, "
                "--point CLASS:x,y or --prompts FILE.json."
            )

        rows, failures = [], []
        no_prompts = 0
        timings = {"read_s": 0.0, "predict_s": 0.0, "write_s": 0.0}
        bar = tqdm(total=len(scans), unit="scan", desc="segmenting", disable=args.quiet)
        for batch in _batches(scans, batch_size):
            t0 = time.perf_counter()
            ready = []
            for scan in batch:
                try:
                    image = scan.read()
                    prompts = None
                    if prompted:
                        specs = cli_specs + file_specs.get(scan.name, [])
                        no_prompts += not specs
                        prompts = build_prompts(specs, labels, image.shape[:2], scan.source)
                    ready.append((scan, image, prompts))
                except Exception as err:  # noqa: BLE001 - any unreadable B-scan is reported and skipped
                    message = str(err) if isinstance(err, OctSamError) else f"{type(err).__name__}: {err}"
                    failures.append({"scan": scan.name, "source": scan.source, "error": message})
                    bar.update(1)
            timings["read_s"] += time.perf_counter() - t0
            if not ready:
                continue
            t0 = time.perf_counter()
            results = _predict(segmenter, ready, prompted, args.save_probabilities, failures)
            timings["predict_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for (scan, image, _), result in zip(ready, results):
                if result is not None:
                    rows.append(_write_scan(tmp, scan, image, result, labels, spacing))
                bar.update(1)
            timings["write_s"] += time.perf_counter() - t0
        bar.close()

        t0 = time.perf_counter()
        _write_summary(tmp / "summary.csv", rows, failures, labels, spacing)
        timings["write_s"] += time.perf_counter() - t0
        done = len(rows)
        record = {
            "adapter": args.adapter,
            "adapter_revision": args.revision,
            "adapter_folder": str(folder),
            "adapter_commit": folder.name if folder.parent.name == "snapshots" else None,
            "base_model": segmenter.config.base_model,
            "base_model_revision": segmenter.config.base_model_revision,
            "labels": labels,
            "mode": "prompted" if prompted else "automatic",
            "merged": not args.no_merge,
            "attention": "transformers" if args.no_fast_attention else f"octsam fast ({args.attention_mode})",
            "compiled": args.compile,
            "device": str(segmenter.device),
            "device_name": _device_name(segmenter.device),
            "dtype": str(segmenter.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "pixel_spacing_mm": list(spacing) if spacing else None,
            "inputs": len(scans),
            "segmented": done,
            "failed": len(failures),
            "failures": failures,
            "scans_without_prompts": no_prompts if prompted else None,
            "unmatched_prompt_keys": unmatched,
            "timings": {
                "load_s": round(load_s, 3),
                **{k: round(v, 3) for k, v in timings.items()},
                "total_s": round(time.perf_counter() - started, 3),
                "predict_s_per_scan": round(timings["predict_s"] / done, 4) if done else None,
                "scans_per_s": round(done / timings["predict_s"], 3) if done and timings["predict_s"] else None,
            },
            "octsam_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "arguments": {k: v for k, v in vars(args).items()},
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if prompted and no_prompts:
        print(f"warning: {no_prompts} B-scan(s) had no prompt; their masks are empty.", file=sys.stderr)
    print(f"segmented {done} of {len(scans)} B-scan(s) into {final}", file=sys.stderr)
    for failure in failures:
        print(f"failed: {failure['source']}: {failure['error']}", file=sys.stderr)
    return len(failures)


def _device_name(device) -> str:
    """GPU name, or the CPU model as lscpu shows it."""
    import platform

    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _predict(segmenter, ready: list, prompted: bool, probabilities: bool, failures: list) -> list:
    """Segment a batch; if the batch fails, retry each B-scan alone so that one bad scan does not sink the rest."""
    images = [image for _, image, _ in ready]
    prompts = [p for _, _, p in ready] if prompted else None
    try:
        return segmenter(images, prompts=prompts, return_probabilities=probabilities)
    except (OctSamError, RuntimeError, ValueError) as batch_error:
        if len(ready) == 1:
            scan = ready[0][0]
            failures.append({"scan": scan.name, "source": scan.source, "error": str(batch_error)})
            return [None]
    results = []
    for item in ready:
        results.extend(_predict(segmenter, [item], prompted, probabilities, failures))
    return results


def _write_scan(out: Path, scan: ScanInput, image: np.ndarray, result, labels: list[str], spacing) -> dict:
    mask = result.mask
    _save_png(out / "masks" / f"{scan.name}.png", mask)
    _save_png(out / "overlays" / f"{scan.name}.png", overlay_with_legend(image, mask, labels))
    if result.probabilities is not None:
        path = out / "probabilities" / f"{scan.name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, probabilities=result.probabilities, labels=np.array(labels))
    areas, components = class_areas(mask, len(labels))
    row = {"scan": scan.name, "source": scan.source, "height": mask.shape[0], "width": mask.shape[1]}
    for name, area, count in zip(labels[1:], areas, components):
        row[f"{name}_area_px"] = area
        if spacing is not None:
            row[f"{name}_area_mm2"] = round(area * spacing[0] * spacing[1], 6)
        row[f"{name}_components"] = count
    row["status"] = "ok"
    row["error"] = ""
    return row


def _write_summary(path: Path, rows: list[dict], failures: list[dict], labels: list[str], spacing) -> None:
    columns = ["scan", "source", "height", "width"]
    for name in labels[1:]:
        columns += [f"{name}_area_px"] + ([f"{name}_area_mm2"] if spacing else []) + [f"{name}_components"]
    columns += ["status", "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        for failure in failures:
            writer.writerow(
                {"scan": failure["scan"], "source": failure["source"], "status": "failed", "error": failure["error"]}
            )


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Command line entry (``octsam-infer`` / ``python inference.py``): 0 all done, 1 some B-scans failed, 2 a
    usage error (printed without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        failed = run(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130
    if failed:
        print(f"error: {failed} B-scan(s) could not be segmented (listed above and in run.json).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
