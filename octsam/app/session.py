"""The app's state and logic, free of Gradio: open scans, segment, prompt, correct, undo, measure, export.

One ``Session`` per browser tab. It holds the B-scans that were opened, a mask per B-scan, the prompts given per
B-scan, an undo stack per B-scan and a small cache of image embeddings (so a click only runs SAM's prompt encoder
and mask decoder). The ``Segmenter`` is shared by all sessions.

Prompt semantics: the prompts of one class (points and boxes) define that class's region on the B-scan. Each click
re-decodes the class from all of its prompts and the result replaces the class in the mask (other classes keep
their pixels where the new region does not reach). Brush and eraser edit the mask directly; ``undo`` restores the
mask and prompts of the step before.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octsam.colors import class_color, overlay
from octsam.errors import OctSamError
from octsam.segmenter import Prompt, Segmenter
from octsam.textsafe import csv_row

MAX_UNDO = 50
EMBEDDING_CACHE = 32  # B-scans whose image embedding stays in memory (ViT-B: 4 MB each)
POINT_RADIUS = 3
TOOLS = ("point +", "point -", "box", "brush", "eraser")


@dataclass
class Scan:
    """One B-scan: uint8 (H, W) or (H, W, 3); ``spacing_mm`` (axial, lateral) when the file or volume gives it."""

    name: str
    image: np.ndarray
    spacing_mm: tuple[float, float] | None = None
    volume: str | None = None  # volume id, for B-scans that came from a volume
    index_in_volume: int | None = None


@dataclass
class VolumeInfo:
    volume_id: str
    first: int  # index of its first B-scan in Session.scans
    count: int
    localizer: np.ndarray | None = None
    positions: np.ndarray | None = None  # (N, 2, 2) start/end (x, y) in localizer pixels
    bscan_spacing: float | None = None


@dataclass
class Step:
    mask: np.ndarray | None
    prompts: dict[int, dict]


@dataclass
class Session:
    segmenter: Segmenter
    scans: list[Scan] = field(default_factory=list)
    volumes: list[VolumeInfo] = field(default_factory=list)
    current: int = 0
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    # per scan, per class: {"points": [(x, y, 1|0)], "box": (x1, y1, x2, y2) | None}
    prompts: dict[int, dict[int, dict]] = field(default_factory=dict)
    undo_stack: dict[int, list[Step]] = field(default_factory=dict)
    box_corner: tuple[float, float] | None = None  # first click of a box
    embeddings: OrderedDict = field(default_factory=OrderedDict)
    timings: dict[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- basics
    @property
    def labels(self) -> list[str]:
        return self.segmenter.labels

    @property
    def num_classes(self) -> int:
        return len(self.labels) - 1

    @property
    def scan(self) -> Scan:
        if not self.scans:
            raise OctSamError("Open a B-scan first (upload an image, a folder or a volume).")
        return self.scans[self.current]

    @property
    def shape(self) -> tuple[int, int]:
        return self.scan.image.shape[:2]

    def mask(self, index: int | None = None) -> np.ndarray:
        """The current mask of a B-scan (all background until segmented or painted; only B-scans that were
        segmented, prompted or painted have a stored mask, and only those are exported)."""
        index = self.current if index is None else index
        if index not in self.masks:
            return np.zeros(self.scans[index].image.shape[:2], np.uint8)
        return self.masks[index]

    def go_to(self, index: int) -> None:
        if not self.scans:
            raise OctSamError("Open a B-scan first.")
        self.current = int(min(max(int(index), 0), len(self.scans) - 1))
        self.box_corner = None

    # ---------------------------------------------------------------- opening
    def add_scans(self, scans: list[Scan], volumes: list[VolumeInfo] | None = None, replace: bool = True) -> None:
        """Make ``scans`` the open B-scans (or append them); masks, prompts and caches of replaced scans go."""
        if not scans:
            raise OctSamError("Nothing to open: no readable B-scan was given.")
        if replace:
            self.scans, self.volumes = [], []
            self.masks, self.prompts, self.undo_stack = {}, {}, {}
            self.embeddings.clear()
        offset = len(self.scans)
        for v in volumes or []:
            v.first += offset
            self.volumes.append(v)
        self.scans.extend(scans)
        self.current = offset
        self.box_corner = None

    def volume_of(self, index: int | None = None) -> VolumeInfo | None:
        index = self.current if index is None else index
        for v in self.volumes:
            if v.first <= index < v.first + v.count:
                return v
        return None

    # ---------------------------------------------------------------- model
    def embedding(self, index: int | None = None):
        """The cached image embedding of a B-scan (computed on first use; timed as ``encode_s``)."""
        index = self.current if index is None else index
        if index in self.embeddings:
            self.embeddings.move_to_end(index)
            return self.embeddings[index]
        start = time.perf_counter()
        emb = self.segmenter.embed(self.scans[index].image)
        self.timings["encode_s"] = time.perf_counter() - start
        self.embeddings[index] = emb
        while len(self.embeddings) > EMBEDDING_CACHE:
            self.embeddings.popitem(last=False)
        return emb

    def segment(self) -> np.ndarray:
        """Automatic segmentation of the current B-scan (encode + decode; timed as ``segment_s``), replacing its
        mask and clearing its prompts. A prompted adapter cannot do this: it needs prompts."""
        if self.segmenter.config.mode == "prompted":
            raise OctSamError(
                "This adapter was trained in prompted mode: click inside the biomarker (point +) or draw a box."
            )
        start = time.perf_counter()
        if self.segmenter.base.has_embeddings:
            self.embeddings.pop(self.current, None)
            mask = self.segmenter.segment_embedding(self.embedding(), self.shape).mask
        else:
            mask = self.segmenter([self.scan.image])[0].mask
        self.timings["segment_s"] = time.perf_counter() - start
        self._push()
        self.masks[self.current] = mask
        self.prompts[self.current] = {}
        return mask

    def segment_all(self) -> int:
        """Automatic segmentation of every open B-scan that has no mask yet; returns how many were segmented."""
        keep, done = self.current, 0
        try:
            for i in range(len(self.scans)):
                if i not in self.masks:
                    self.current = i
                    self.segment()
                    done += 1
        finally:
            self.current = keep
        return done

    # ---------------------------------------------------------------- prompts and tools
    def _check_class(self, label: int) -> int:
        label = int(label)
        if not 1 <= label <= self.num_classes:
            raise OctSamError(f"Class {label} is not one of 1..{self.num_classes} ({', '.join(self.labels[1:])}).")
        return label

    def _check_xy(self, x: float, y: float) -> tuple[float, float]:
        h, w = self.shape
        if not (0 <= x < w and 0 <= y < h):
            raise OctSamError(f"The click ({x:.0f}, {y:.0f}) lies outside the B-scan ({w} x {h}).")
        return float(x), float(y)

    def click(self, tool: str, label: int, x: float, y: float, radius: int = 5) -> str:
        """Apply ``tool`` at pixel (x, y) of the current B-scan for class ``label``; returns a short status line."""
        x, y = self._check_xy(x, y)
        label = self._check_class(label)
        name = self.labels[label]
        if tool in ("point +", "point -"):
            self.box_corner = None
            return self.add_point(label, x, y, positive=tool == "point +")
        if tool == "box":
            if self.box_corner is None:
                self.box_corner = (x, y)
                return f"box for {name}: first corner ({x:.0f}, {y:.0f}); click the opposite corner"
            (x0, y0), self.box_corner = self.box_corner, None
            return self.set_box(label, (min(x0, x), min(y0, y), max(x0, x), max(y0, y)))
        if tool in ("brush", "eraser"):
            self.box_corner = None
            return self.paint(label, x, y, radius, erase=tool == "eraser")
        raise OctSamError(f"Unknown tool {tool!r}; choose one of {', '.join(TOOLS)}.")

    def add_point(self, label: int, x: float, y: float, positive: bool = True) -> str:
        self._push()
        entry = self.prompts.setdefault(self.current, {}).setdefault(label, {"points": [], "box": None})
        entry["points"].append((x, y, 1 if positive else 0))
        return self._decode(label)

    def set_box(self, label: int, box: tuple[float, float, float, float]) -> str:
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise OctSamError("The box is empty: click two opposite corners.")
        self._push()
        entry = self.prompts.setdefault(self.current, {}).setdefault(label, {"points": [], "box": None})
        entry["box"] = tuple(float(v) for v in box)
        return self._decode(label)

    def class_prompts(self, label: int) -> list[Prompt]:
        entry = self.prompts.get(self.current, {}).get(label)
        if not entry or (not entry["points"] and entry["box"] is None):
            return []
        return [Prompt(label=label, box=entry["box"], points=list(entry["points"]))]

    def _decode(self, label: int) -> str:
        """Re-decode class ``label`` from its prompts and the cached embedding; timed as ``click_s``."""
        if not self.segmenter.model.supports_prompts:
            raise OctSamError("Prompts need a SAM adapter; this is the U-Net baseline. Use the brush instead.")
        embedding = self.embedding()  # cached after the first click on a B-scan
        start = time.perf_counter()
        region = self.segmenter.segment_embedding(embedding, self.shape, self.class_prompts(label)).mask == label
        mask = self.mask().copy()
        mask[mask == label] = 0
        mask[region] = label
        self.masks[self.current] = mask
        self.timings["click_s"] = time.perf_counter() - start
        return f"{self.labels[label]}: {int(region.sum())} px from {self._describe(label)}"

    def _describe(self, label: int) -> str:
        entry = self.prompts[self.current][label]
        pos = sum(1 for p in entry["points"] if p[2] == 1)
        neg = len(entry["points"]) - pos
        return f"{pos} inside / {neg} outside point(s)" + (" and a box" if entry["box"] is not None else "")

    def paint(self, label: int, x: float, y: float, radius: int, erase: bool = False) -> str:
        """Brush: paint a disc of class ``label``; eraser: set pixels of ``label`` in the disc to background."""
        radius = int(max(0, radius))
        self._push()
        h, w = self.shape
        yy, xx = np.ogrid[:h, :w]
        disc = (yy - round(y)) ** 2 + (xx - round(x)) ** 2 <= radius**2
        mask = self.mask().copy()
        if erase:
            disc &= mask == label
            mask[disc] = 0
        else:
            mask[disc] = label
        self.masks[self.current] = mask
        verb = "erased" if erase else "painted"
        return f"{verb} {int(disc.sum())} px of {self.labels[label]} at ({x:.0f}, {y:.0f})"

    def clear_prompts(self) -> None:
        self._push()
        self.prompts[self.current] = {}
        self.box_corner = None

    def _push(self) -> None:
        stack = self.undo_stack.setdefault(self.current, [])
        mask = self.masks.get(self.current)
        prompts = {
            k: {"points": list(v["points"]), "box": v["box"]} for k, v in self.prompts.get(self.current, {}).items()
        }
        stack.append(Step(None if mask is None else mask.copy(), prompts))
        del stack[:-MAX_UNDO]

    def undo(self) -> bool:
        """Restore the mask and prompts of the step before; False when there is nothing to undo."""
        stack = self.undo_stack.get(self.current)
        self.box_corner = None
        if not stack:
            return False
        step = stack.pop()
        if step.mask is None:
            self.masks.pop(self.current, None)
        else:
            self.masks[self.current] = step.mask
        self.prompts[self.current] = step.prompts
        return True

    # ---------------------------------------------------------------- seeing
    def render(self, visible: list[int] | None = None, opacity: float = 0.45, markers: bool = True) -> np.ndarray:
        """RGB overlay of the current B-scan: visible classes only, at ``opacity``, with the prompts drawn."""
        import cv2

        mask = self.mask().copy()
        if visible is not None:
            hidden = [k for k in range(1, self.num_classes + 1) if k not in set(int(v) for v in visible)]
            mask[np.isin(mask, hidden)] = 0
        rgb = overlay(self.scan.image, mask, self.labels, alpha=float(opacity), outline=opacity > 0)
        if not markers:
            return rgb
        size = max(1, round(max(self.shape) / 400))
        for label, entry in self.prompts.get(self.current, {}).items():
            color = class_color(label, self.labels)
            if entry["box"] is not None:
                x1, y1, x2, y2 = (round(v) for v in entry["box"])
                cv2.rectangle(rgb, (x1, y1), (x2, y2), color, size)
            for px, py, positive in entry["points"]:
                center = (round(px), round(py))
                cv2.circle(rgb, center, POINT_RADIUS * size + 1, (255, 255, 255), -1)
                cv2.circle(rgb, center, POINT_RADIUS * size, (0, 200, 0) if positive else (220, 0, 0), -1)
        if self.box_corner is not None:
            cv2.drawMarker(
                rgb, tuple(round(v) for v in self.box_corner), (255, 255, 0), cv2.MARKER_CROSS, 8 * size, size
            )
        return rgb

    def localizer_view(self) -> np.ndarray | None:
        """The volume's localiser with the current B-scan's line drawn (others faint), or None."""
        import cv2

        vol = self.volume_of()
        if vol is None or vol.localizer is None:
            return None
        loc = vol.localizer
        rgb = np.repeat(loc[..., None], 3, axis=2) if loc.ndim == 2 else loc[..., :3].copy()
        rgb = np.ascontiguousarray(rgb)
        if vol.positions is not None:
            thick = max(1, round(max(rgb.shape[:2]) / 300))
            for i, ((x0, y0), (x1, y1)) in enumerate(vol.positions):
                current = vol.first + i == self.current
                color = (0, 255, 0) if current else (90, 90, 140)
                cv2.line(rgb, (round(x0), round(y0)), (round(x1), round(y1)), color, thick * (2 if current else 1))
        return rgb

    def areas(self, spacing_mm: tuple[float, float] | None = None, index: int | None = None) -> list[dict]:
        """Per class: area in pixels, in mm² (with a spacing: the one given, else the scan's), 8-connected parts."""
        import cv2

        index = self.current if index is None else index
        mask = self.mask(index)
        spacing = spacing_mm or self.scans[index].spacing_mm
        rows = []
        for k in range(1, self.num_classes + 1):
            region = (mask == k).astype(np.uint8)
            px = int(region.sum())
            rows.append(
                {
                    "class": self.labels[k],
                    "area_px": px,
                    "area_mm2": px * spacing[0] * spacing[1] if spacing else None,
                    "components": int(cv2.connectedComponents(region, connectivity=8)[0] - 1) if px else 0,
                }
            )
        return rows

    def volume_totals(self, vol: VolumeInfo, spacing_mm: tuple[float, float] | None = None):
        """(B-scans of ``vol`` with a mask, {class: mm³}) - area x B-scan spacing summed over those B-scans - or
        None when no B-scan has a mask or no spacing is known."""
        done = [i for i in range(vol.first, vol.first + vol.count) if i in self.masks]
        spacing = spacing_mm or self.scans[vol.first].spacing_mm
        if not done or spacing is None or not vol.bscan_spacing:
            return None
        totals = np.zeros(self.num_classes)
        for i in done:
            totals += [(self.masks[i] == k).sum() for k in range(1, self.num_classes + 1)]
        voxel = spacing[0] * spacing[1] * vol.bscan_spacing
        return len(done), {n: float(v * voxel) for n, v in zip(self.labels[1:], totals)}

    def volume_measures(self, spacing_mm: tuple[float, float] | None = None) -> str:
        """For a B-scan of a volume: each class's volume in mm³ over the B-scans that have a mask so far, or ''."""
        vol = self.volume_of()
        totals = None if vol is None else self.volume_totals(vol, spacing_mm)
        if totals is None:
            return ""
        done, per_class = totals
        text = ", ".join(f"{n} {v:.4g} mm³" for n, v in per_class.items())
        return f"volume {vol.volume_id} ({done}/{vol.count} B-scans with a mask): {text}"

    # ---------------------------------------------------------------- export
    def export(self, root: str | os.PathLike, spacing_mm: tuple[float, float] | None = None) -> Path:
        """Write every B-scan that has a mask to a new numbered folder under ``root`` (never an existing one):

        ``images/<scan>.png``, ``masks/<scan>.png`` (class index per pixel), ``labels.json`` (index -> name),
        ``report.csv`` (areas per scan and class), ``volumes.csv`` (per volume: mm³ per class, when B-scans came
        from volumes with a spacing), ``overlays/<scan>.png`` and ``README.txt`` with the
        ``python -m dataset_builder folder`` command that turns it into a dataset.
        """
        from PIL import Image

        indices = sorted(i for i, m in self.masks.items() if m is not None)
        if not indices:
            raise OctSamError("Nothing to export yet: segment, prompt or paint a B-scan first.")
        out = new_export_folder(root)
        for sub in ("images", "masks", "overlays"):
            (out / sub).mkdir()
        names = unique_stems([self.scans[i].name for i in indices])
        rows = []
        for i, stem in zip(indices, names):
            scan, mask = self.scans[i], self.masks[i]
            Image.fromarray(scan.image).save(out / "images" / f"{stem}.png")
            Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
            Image.fromarray(overlay(scan.image, mask, self.labels)).save(out / "overlays" / f"{stem}.png")
            spacing = spacing_mm or scan.spacing_mm
            row = {"scan": stem, "source": scan.name, "height": mask.shape[0], "width": mask.shape[1]}
            row["pixel_spacing_mm"] = f"{spacing[0]},{spacing[1]}" if spacing else ""
            for a in self.areas(spacing_mm, index=i):
                row[f"{a['class']}_area_px"] = a["area_px"]
                row[f"{a['class']}_area_mm2"] = "" if a["area_mm2"] is None else f"{a['area_mm2']:.6g}"
                row[f"{a['class']}_components"] = a["components"]
            rows.append(row)
        with open(out / "report.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(csv_row(rows[0])))
            writer.writeheader()
            writer.writerows(csv_row(r) for r in rows)  # text from data never starts a spreadsheet formula
        volume_rows = []
        for vol in self.volumes:
            totals = self.volume_totals(vol, spacing_mm)
            if totals is not None:
                row = {"volume": vol.volume_id, "bscans": vol.count, "bscans_with_mask": totals[0]}
                row.update({f"{n}_mm3": f"{v:.6g}" for n, v in totals[1].items()})
                volume_rows.append(row)
        if volume_rows:  # per eye: biomarker volumes over the B-scans that have a mask
            with open(out / "volumes.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(csv_row(volume_rows[0])))
                writer.writeheader()
                writer.writerows(csv_row(r) for r in volume_rows)
        (out / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(self.labels)}, indent=2) + "\n")
        (out / "README.txt").write_text(
            f"{len(rows)} corrected B-scan mask(s) from octsam's app (labels: {', '.join(self.labels)}).\n"
            "Build a dataset from them with:\n\n"
            f"  python -m dataset_builder folder --images {out / 'images'} --masks {out / 'masks'} "
            f"--labels {','.join(self.labels)} --output DATASET_FOLDER\n"
        )
        return out


def new_export_folder(root: str | os.PathLike) -> Path:
    """Create and return ``root/export-NNN``, the first number not taken: an export never overwrites another."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"export-(\d+)", p.name))]
    n = max(taken, default=0) + 1
    while True:
        path = root / f"export-{n:03d}"
        try:
            path.mkdir()  # atomic: two exports at once cannot get the same folder
            return path
        except FileExistsError:
            n += 1


def unique_stems(names: list[str]) -> list[str]:
    """File-system-safe, unique stems for scan names (``a/b.png`` -> ``b``; clashes get ``_2``, ``_3``)."""
    out, seen = [], set()
    for name in names:
        stem = Path(name).name
        for suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "scan"
        candidate, k = stem, 2
        while candidate in seen:
            candidate, k = f"{stem}_{k}", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out
