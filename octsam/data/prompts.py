"""Box and point prompts from ground-truth masks: one prompt per connected component of each class.

Training jitters each box (up to ``jitter`` of its size, at least ``min_jitter_px``) and samples positive points in
the component and negative points in its box but outside it. The zero-shot baseline and prompted evaluation use the
exact boxes (no jitter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octsam.errors import OctSamError


@dataclass
class InstancePrompts:
    """Prompts of one image, padded to a fixed count ``P``.

    boxes (P, 4) float32 x1,y1,x2,y2; points (P, N, 2) float32 x,y; point_labels (P, N) int64 (1 inside, 0 outside,
    -10 padding); classes (P,) int64 class ids; valid (P,) bool; instance_map (H, W) int16: pixel -> prompt index + 1
    of its component (0 for none), the training target of each prompt.
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    classes: np.ndarray
    valid: np.ndarray
    instance_map: np.ndarray


def connected_instances(mask: np.ndarray, num_labels: int, min_pixels: int = 1) -> list[tuple[int, np.ndarray]]:
    """(class id, boolean component mask) for every 8-connected component of classes 1..num_labels-1."""
    instances = []
    structure = np.ones((3, 3), dtype=bool)
    for k in range(1, num_labels):
        components, count = _ndimage().label(mask == k, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for c in range(1, count + 1):
            if sizes[c] >= min_pixels:
                instances.append((k, components == c))
    return instances


def component_box(component: np.ndarray) -> np.ndarray:
    """Tight box x1, y1, x2, y2 (inclusive pixel coordinates) of a boolean mask."""
    ys = np.flatnonzero(component.any(axis=1))
    xs = np.flatnonzero(component.any(axis=0))
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], dtype=np.float32)


def jitter_box(box: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, jitter: float, min_px: float):
    """Move each side of ``box`` by up to max(jitter x side length, min_px) pixels, kept inside the image."""
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    amp = np.array([max(jitter * width, min_px), max(jitter * height, min_px)] * 2, dtype=np.float32)
    moved = box + rng.uniform(-1, 1, size=4).astype(np.float32) * amp
    moved[[0, 2]] = np.clip(moved[[0, 2]], 0, shape[1] - 1)
    moved[[1, 3]] = np.clip(moved[[1, 3]], 0, shape[0] - 1)
    x1, x2 = sorted(moved[[0, 2]])
    y1, y2 = sorted(moved[[1, 3]])
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def _sample_pixels(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    pick = rng.integers(0, len(ys), size=count)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)


def instance_prompts(
    mask: np.ndarray,
    num_labels: int,
    max_prompts: int,
    rng: np.random.Generator | None = None,
    jitter: float = 0.1,
    min_jitter_px: float = 3.0,
    positive_points: int = 1,
    negative_points: int = 1,
    ignore_index: int = 255,
) -> InstancePrompts:
    """Prompts for up to ``max_prompts`` components of ``mask`` (a random subset when there are more).

    With ``rng=None`` boxes are exact and points deterministic (the first pixel of each region's random order with
    seed 0), as used for evaluation.
    """
    train = rng is not None
    rng = rng if rng is not None else np.random.default_rng(0)
    instances = connected_instances(np.where(mask == ignore_index, 0, mask), num_labels)
    if len(instances) > max_prompts:
        chosen = rng.choice(len(instances), size=max_prompts, replace=False)
        instances = [instances[i] for i in sorted(chosen)]
    n_points = positive_points + negative_points
    boxes = np.zeros((max_prompts, 4), dtype=np.float32)
    boxes[:, 2:] = 1.0
    points = np.zeros((max_prompts, max(n_points, 1), 2), dtype=np.float32)
    point_labels = np.full((max_prompts, max(n_points, 1)), -10, dtype=np.int64)
    classes = np.zeros(max_prompts, dtype=np.int64)
    valid = np.zeros(max_prompts, dtype=bool)
    instance_map = np.zeros(mask.shape, dtype=np.int16)
    for p, (k, component) in enumerate(instances):
        box = component_box(component)
        if train:
            box = jitter_box(box, mask.shape, rng, jitter, min_jitter_px)
        boxes[p], classes[p], valid[p] = box, k, True
        instance_map[component] = p + 1
        pos = _sample_pixels(component, positive_points, rng)
        x1, y1, x2, y2 = box.astype(int)
        outside = np.zeros_like(component)
        outside[y1 : y2 + 1, x1 : x2 + 1] = True
        outside &= ~component
        if not outside.any():
            outside = ~component
        neg = _sample_pixels(outside, negative_points, rng) if negative_points else np.zeros((0, 2), np.float32)
        sampled = np.concatenate([pos, neg])
        points[p, : len(sampled)] = sampled
        point_labels[p, : len(pos)] = 1
        point_labels[p, len(pos) : len(sampled)] = 0
    return InstancePrompts(boxes, points, point_labels, classes, valid, instance_map)


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


@dataclass
class PromptConfig:
    max_prompts: int = 8
    box_jitter: float = 0.1
    min_box_jitter_px: float = 3.0
    positive_points: int = 1
    negative_points: int = 1


@dataclass
class Prompt:
    """One object to segment: class id, an optional box (x1, y1, x2, y2) and points (x, y, 1 inside / 0 outside), in
    native pixel coordinates of the B-scan."""

    label: int
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float, int]] = field(default_factory=list)


def _ndimage():
    from scipy import ndimage  # imported on first use: octsam.config (train.py --help) stays light

    return ndimage
