"""Box and point prompts from ground-truth masks: one prompt per connected component of each class.

Training jitters each box (up to ``jitter`` of its size, at least ``min_jitter_px``) and samples positive points in
the component and negative points in its box but outside it. The zero-shot baseline and prompted evaluation use the
exact boxes (no jitter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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
        components, count = ndimage.label(mask == k, structure=structure)
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


def scale_prompts(prompts: InstancePrompts, from_shape: tuple[int, int], to_size: int) -> InstancePrompts:
    """Map box and point coordinates from an image of ``from_shape`` (H, W) to a square input of ``to_size``."""
    sy, sx = to_size / from_shape[0], to_size / from_shape[1]
    scale = np.array([sx, sy, sx, sy], dtype=np.float32)
    return InstancePrompts(
        boxes=prompts.boxes * scale,
        points=prompts.points * scale[:2],
        point_labels=prompts.point_labels,
        classes=prompts.classes,
        valid=prompts.valid,
        instance_map=prompts.instance_map,
    )
