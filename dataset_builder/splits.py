"""Patient-level train/validation/test splits and the per-split summary table.

A patient's B-scans are near-duplicates, so a patient is never in two splits. Within that rule the split tries
to put every biomarker (foreground class) into every split: it draws seeded random patient orders and keeps the
first one that covers the most (split, class) pairs, then the one whose B-scan fractions are closest to the
requested ones.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octsam.data.dataset import SPLITS
from octsam.errors import OctSamError
from octsam.textsafe import markdown_text

logger = logging.getLogger("dataset_builder")

ATTEMPTS = 400


def parse_fractions(text: str | Iterable[float]) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15); all three must be positive (no split may be empty)."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as err:
        raise OctSamError(f"--split {text!r}: expected three numbers like 0.7,0.15,0.15 ({err})") from err
    if len(values) != 3 or any(not math.isfinite(v) or v <= 0 for v in values):
        raise OctSamError(
            f"--split {text!r}: expected three positive, finite fractions for train,validation,test like 0.7,0.15,0.15 "
            "(no split may be empty)."
        )
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def split_patients(
    patient_classes: Mapping[str, Iterable[int]],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    patient_scans: Mapping[str, int] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, str]:
    """Assign each patient to train/validation/test (returns patient -> split), deterministic for ``seed``.

    ``patient_classes`` gives the foreground classes present in each patient's B-scans; ``patient_scans`` the
    number of B-scans per patient (default 1), used to match the requested fractions of B-scans.
    """
    patients = sorted(patient_classes)
    n = len(patients)
    if n < 3:
        raise OctSamError(
            f"a patient-level split needs at least 3 patients, the data has {n} ({', '.join(patients) or 'none'}): "
            "a split would be empty. Add patients, or check --patient-regex (each match's first group is a patient)."
        )
    counts = _patient_counts(fractions, n)
    classes = {p: frozenset(int(c) for c in patient_classes[p] if int(c) != 0) for p in patients}
    scans = {p: int((patient_scans or {}).get(p, 1)) for p in patients}
    all_classes = sorted(set().union(*classes.values()))
    has = np.array([[c in classes[p] for c in all_classes] for p in patients], dtype=bool).reshape(n, len(all_classes))
    best_cover = int(np.minimum(has.sum(axis=0), 3).sum())
    sizes = np.array([scans[p] for p in patients], dtype=np.float64)
    slots = np.repeat(np.arange(3), counts)  # split index of each position in a patient order
    rng = np.random.default_rng(seed)
    best: tuple[tuple[int, float], np.ndarray] | None = None
    for _ in range(ATTEMPTS):
        split_of = np.empty(n, dtype=np.int64)
        split_of[rng.permutation(n)] = slots
        cover = sum(int(has[split_of == s].any(axis=0).sum()) for s in range(3))
        share = np.array([sizes[split_of == s].sum() for s in range(3)]) / sizes.sum()
        score = (cover, -float(np.abs(share - np.asarray(fractions)).sum()))
        if best is None or score > best[0]:
            best = (score, split_of)
        if cover == best_cover and score[1] > -0.05:
            break
    assert best is not None
    assignment = {p: SPLITS[int(best[1][i])] for i, p in enumerate(patients)}
    _warn_missing(assignment, classes, labels)
    return dict(sorted(assignment.items()))


def _patient_counts(fractions: tuple[float, float, float], n: int) -> tuple[int, int, int]:
    val = max(1, round(fractions[1] * n))
    test = max(1, round(fractions[2] * n))
    while n - val - test < 1:
        if val >= test and val > 1:
            val -= 1
        else:
            test -= 1
    return (n - val - test, val, test)


def _warn_missing(
    assignment: Mapping[str, str], classes: Mapping[str, frozenset[int]], labels: Sequence[str] | None = None
) -> None:
    present = {s: set().union(*(classes[p] for p in assignment if assignment[p] == s)) for s in SPLITS}
    wanted = set().union(*classes.values())
    for split in SPLITS:
        missing = sorted(wanted - present[split])
        if missing:
            logger.warning(
                "split %s has no B-scan with class(es) %s: too few patients have them to cover every split.",
                split,
                ", ".join(labels[c] if labels and c < len(labels) else str(c) for c in missing),
            )


def load_split_file(path: str | Path, patients: Iterable[str]) -> dict[str, str]:
    """Read ``{"train": [patient ids], "validation": [...], "test": [...]}`` and check it against the data."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OctSamError(f"cannot read --split-file {path}: {err}") from err
    if not isinstance(table, dict) or set(table) - set(SPLITS):
        raise OctSamError(
            f"--split-file {path} must be a JSON object with keys {', '.join(SPLITS)} and lists of patient ids, "
            f"got keys {', '.join(map(str, table)) if isinstance(table, dict) else type(table).__name__}."
        )
    assignment: dict[str, str] = {}
    for split in SPLITS:
        for patient in table.get(split, []):
            patient = str(patient)
            if patient in assignment and assignment[patient] != split:
                raise OctSamError(
                    f"--split-file {path}: patient {patient} is in both {assignment[patient]} and {split}."
                )
            assignment[patient] = split
    patients = sorted(set(patients))
    unassigned = [p for p in patients if p not in assignment]
    if unassigned:
        raise OctSamError(
            f"--split-file {path} does not assign patient(s) {_listing(unassigned)}; add each to train, validation "
            "or test."
        )
    unknown = sorted(set(assignment) - set(patients))
    if unknown:
        logger.warning("--split-file %s names patient(s) not in the data: %s", path, _listing(unknown))
    assignment = {p: assignment[p] for p in patients}
    empty = [s for s in SPLITS if s not in assignment.values()]
    if empty:
        raise OctSamError(f"--split-file {path}: split(s) {', '.join(empty)} would be empty; give each some patients.")
    return assignment


def _listing(items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------------------------------------------ stats


@dataclass
class SplitStats:
    """Counts gathered while a split streams through the writer."""

    num_labels: int
    scans: int = 0
    patients: set[str] = field(default_factory=set)
    pixels: np.ndarray = field(default=None)  # type: ignore[assignment]  # per class index 0..255
    scans_with: np.ndarray = field(default=None)  # type: ignore[assignment]
    intensity_sum: float = 0.0
    intensity_sq: float = 0.0
    intensity_n: int = 0
    sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pixels = np.zeros(256, dtype=np.int64)
        self.scans_with = np.zeros(256, dtype=np.int64)

    def add(self, patient_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        self.scans += 1
        self.patients.add(patient_id)
        counts = np.bincount(mask.ravel(), minlength=256)
        self.pixels += counts
        self.scans_with += counts > 0
        self.intensity_sum += float(image.sum(dtype=np.uint64))
        self.intensity_sq += float(np.square(image, dtype=np.uint32).sum(dtype=np.uint64))
        self.intensity_n += image.size
        key = f"{image.shape[1]}x{image.shape[0]}"
        self.sizes[key] = self.sizes.get(key, 0) + 1

    def summary(self, labels: list[str]) -> dict:
        mean = self.intensity_sum / max(self.intensity_n, 1)
        std = float(np.sqrt(max(self.intensity_sq / max(self.intensity_n, 1) - mean**2, 0.0)))
        total = int(self.pixels.sum())
        return {
            "scans": self.scans,
            "patients": len(self.patients),
            "pixels": {name: int(self.pixels[i]) for i, name in enumerate(labels)},
            "pixel_fraction": {name: float(self.pixels[i]) / max(total, 1) for i, name in enumerate(labels)},
            "scans_with": {name: int(self.scans_with[i]) for i, name in enumerate(labels)},
            "ignore_pixels": int(self.pixels[255]),
            "intensity_mean": round(mean, 2),
            "intensity_std": round(std, 2),
            "sizes": dict(sorted(self.sizes.items())),
        }


def split_table(summaries: Mapping[str, dict], labels: list[str]) -> str:
    """A Markdown table: B-scans, patients, and pixels (B-scans) per class for each split."""
    header = ["split", "B-scans", "patients"] + [f"{markdown_text(name)} px (scans)" for name in labels]
    rows = []
    for split, s in summaries.items():
        cells = [split, str(s["scans"]), str(s["patients"])]
        cells += [f"{s['pixels'][name]:,} ({s['scans_with'][name]})" for name in labels]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "| " + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def kfold_patients(
    patient_classes: Mapping[str, Iterable[int]],
    folds: int,
    seed: int = 0,
    patient_scans: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Patient -> fold (0..folds-1) for patient-level K-fold cross-validation, deterministic for ``seed``.

    Patients are dealt to folds in a seeded order that puts patients with rarer classes first and each one in the
    fold with the fewest B-scans so far (then fewest patients), so every fold gets about the same number of B-scans
    and, where possible, every class.
    """
    patients = sorted(patient_classes)
    if folds < 2:
        raise OctSamError(f"--folds must be at least 2, got {folds}.")
    if len(patients) < folds:
        raise OctSamError(f"--folds {folds} needs at least {folds} patients; the data has {len(patients)}.")
    classes = {p: frozenset(int(c) for c in patient_classes[p] if int(c) != 0) for p in patients}
    scans = {p: int((patient_scans or {}).get(p, 1)) for p in patients}
    frequency = {c: sum(c in classes[p] for p in patients) for c in set().union(*classes.values())}
    rng = np.random.default_rng(seed)
    shuffled = [patients[i] for i in rng.permutation(len(patients))]
    order = sorted(shuffled, key=lambda p: min((frequency[c] for c in classes[p]), default=len(patients) + 1))
    load = [0] * folds
    members = [0] * folds
    assignment: dict[str, int] = {}
    for patient in order:
        fold = min(range(folds), key=lambda f: (members[f] >= -(-len(patients) // folds), load[f], members[f], f))
        assignment[patient] = fold
        load[fold] += scans[patient]
        members[fold] += 1
    return dict(sorted(assignment.items()))


def fold_split(fold_of: Mapping[str, int], fold: int, folds: int) -> dict[str, str]:
    """The splits of cross-validation fold ``fold``: its patients are the test split, the next fold (``fold + 1``
    mod K) is the validation split used for early stopping, the rest train. Every patient is tested exactly once
    over the K folds, and nothing is chosen on a test fold."""
    if not 0 <= fold < folds:
        raise OctSamError(f"--fold must be in 0..{folds - 1}, got {fold}.")
    validation = (fold + 1) % folds
    return {p: "test" if f == fold else "validation" if f == validation else "train" for p, f in fold_of.items()}
