"""Segment every B-scan of a volume and write per-volume outputs (masks, report, ``volumes.csv``) atomically."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from octsam.errors import OctSamError
from octsam.folders import atomic_folder
from octsam.volumes.measure import VolumeMeasures, enface_thickness, measure_volume
from octsam.volumes.report import append_volumes_csv, csv_row, write_report
from octsam.volumes.volume import OctVolume

VOLUMES_CSV = "volumes.csv"
_SAFE = re.compile(r"[^\w.-]+")


@dataclass
class VolumeResult:
    volume: OctVolume
    masks: list[np.ndarray]  # (H, W) uint8 class ids per B-scan
    labels: list[str]
    measures: VolumeMeasures
    probabilities: list[np.ndarray] | None = None  # (K+1, H, W) float16 per B-scan, when asked for


def segment_volume(
    segmenter, volume: OctVolume, labels: list[str] | None = None, return_probabilities: bool = False
) -> VolumeResult:
    """Run ``segmenter`` (anything called as ``segmenter(list_of_uint8_arrays) -> results with .mask``, e.g.
    ``octsam.segmenter.Segmenter``) on every B-scan and measure the volume. ``labels`` default to
    ``segmenter.labels``; ``return_probabilities`` also keeps each B-scan's class probabilities."""
    if labels is None:
        labels = list(getattr(segmenter, "labels", []) or [])
    if not labels or labels[0] != "background":
        raise OctSamError(f"label names must start with 'background', got {labels}")
    bscans = list(volume.bscans)
    results = segmenter(bscans, return_probabilities=True) if return_probabilities else segmenter(bscans)
    if len(results) != volume.n_bscans:
        raise OctSamError(
            f"{volume.source}: the segmenter returned {len(results)} masks for {volume.n_bscans} B-scans"
        )
    masks = []
    for i, r in enumerate(results):
        mask = np.asarray(r.mask)
        if mask.shape != volume.bscans[i].shape:
            raise OctSamError(f"{volume.source}: mask {i} has shape {mask.shape}, B-scan {volume.bscans[i].shape}")
        masks.append(mask.astype(np.uint8, copy=False))
    probabilities = [r.probabilities for r in results] if return_probabilities else None
    return VolumeResult(volume, masks, list(labels), measure_volume(masks, volume, labels), probabilities)


def result_from_masks(volume: OctVolume, masks: list[np.ndarray], labels: list[str]) -> VolumeResult:
    """A ``VolumeResult`` for given masks (reference annotations, or another model's output)."""
    return VolumeResult(volume, list(masks), list(labels), measure_volume(masks, volume, labels))


def volume_folder_name(volume: OctVolume) -> str:
    return _SAFE.sub("_", volume.volume_id).strip("._") or "volume"


def write_volume_outputs(
    result: VolumeResult, out_dir: str | os.PathLike, labels: list[str] | None = None, overwrite: bool = True
) -> Path:
    """Write ``out_dir/<volume_id>/`` (``write_volume_folder``) and append a row to ``out_dir/volumes.csv``.

    Everything for the volume is written in a hidden temporary folder beside it and renamed into place only when
    complete; the CSV row is added after that (and the CSV itself is replaced atomically). On error nothing of this
    volume is left behind. Returns the volume's folder.
    """
    labels = list(labels or result.labels)
    if labels != result.labels:
        raise OctSamError(f"labels {labels} differ from the result's {result.labels}")
    final = write_volume_folder(result, out_dir, overwrite)
    append_volumes_csv(Path(out_dir) / VOLUMES_CSV, csv_row(result.volume, result.measures))
    return final


def write_volume_folder(result: VolumeResult, out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``out_dir/<volume_id>/``, staged and swapped into place: ``masks/bscan_NNN.png`` class-index PNGs,
    ``enface/<class>.npy`` thickness maps in mm, ``report.png``, ``report.json`` and, when the result has them,
    ``probabilities/bscan_NNN.npz`` (as ``inference.py`` writes them for B-scans). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / volume_folder_name(result.volume)
    if final.exists() and not overwrite:
        raise OctSamError(f"{final} already exists; pass --overwrite or choose another --output.")
    with atomic_folder(final) as tmp:
        (tmp / "masks").mkdir(parents=True)
        (tmp / "enface").mkdir()
        digits = max(3, len(str(len(result.masks) - 1)))
        for i, mask in enumerate(result.masks):
            if not cv2.imwrite(str(tmp / "masks" / f"bscan_{i:0{digits}d}.png"), mask):
                raise OctSamError(f"could not write the mask of B-scan {i} under {tmp}")
        if result.probabilities is not None:
            (tmp / "probabilities").mkdir()
            for i, probabilities in enumerate(result.probabilities):
                path = tmp / "probabilities" / f"bscan_{i:0{digits}d}.npz"
                np.savez_compressed(path, probabilities=probabilities, labels=np.array(result.labels))
        thickness = result.measures.enface or enface_thickness(
            result.masks, result.volume.pixel_spacing[0], result.labels
        )
        for name, grid in thickness.items():
            np.save(tmp / "enface" / f"{_SAFE.sub('_', name)}.npy", grid.astype(np.float32))
        write_report(result.volume, result.masks, result.measures, tmp)
    return final


def check_unique_folders(volumes) -> None:
    """Refuse volumes that would be written to the same output folder (named by ``volume_folder_name``)."""
    seen: dict[str, str] = {}
    for v in volumes:
        name = volume_folder_name(v)
        if name in seen:
            raise OctSamError(f"two volumes would be written to {name}/: {seen[name]} and {v.source}; rename one.")
        seen[name] = v.source


def evaluate_volumes(segmenter, paths, spacing=None, grader: int = 1) -> dict:
    """Per-volume evaluation on annotated volumes (Duke .mat, RETOUCH, eyepy .eye): predicted vs true mm³ per eye
    and class, and over eyes the mean absolute / signed error and Pearson r (``measure.volume_agreement``).

    Both sides are measured on the same pixels: B-scans without annotation and ignore (255) pixels are left out of
    the prediction too. With partly annotated volumes (Duke: 11 of 61 B-scans) the mm³ are those of the annotated
    B-scans (area x B-scan spacing), not of the whole eye; the comparison stays like for like.
    """
    from octsam.volumes.measure import biomarker_volumes, volume_agreement, volume_errors
    from octsam.volumes.readers import read_annotated_volume

    eyes, predicted, truth = [], [], []
    labels: list[str] | None = None
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        av = read_annotated_volume(path, spacing, grader=grader)
        if labels is None:
            labels = list(av.labels)
        elif av.labels != labels:
            raise OctSamError(f"{path} has labels {av.labels}, the other volumes {labels}.")
        seg_labels = list(getattr(segmenter, "labels", labels) or labels)
        if seg_labels != labels:
            raise OctSamError(f"the model predicts {seg_labels} but {path} is annotated with {labels}.")
        keep = [i for i, a in enumerate(av.annotated) if a]
        results = segmenter([av.volume.bscans[i] for i in keep])
        pred_masks, true_masks = [], []
        for i, r in zip(keep, results):
            ref = av.masks[i]
            pred = np.asarray(r.mask, dtype=np.uint8).copy()
            pred[ref == 255] = 255
            pred_masks.append(pred)
            true_masks.append(ref)
        vol = av.volume
        p = biomarker_volumes(pred_masks, vol.pixel_spacing, vol.bscan_spacing, labels) if keep else {}
        t = biomarker_volumes(true_masks, vol.pixel_spacing, vol.bscan_spacing, labels) if keep else {}
        predicted.append(p)
        truth.append(t)
        eyes.append(
            {
                "volume_id": vol.volume_id,
                "source": vol.source,
                "annotated_bscans": len(keep),
                "predicted_mm3": p,
                "true_mm3": t,
                "error_mm3": volume_errors(p, t),
            }
        )
    if labels is None:
        raise OctSamError("no annotated volumes given to evaluate.")
    return {"labels": labels, "eyes": eyes, "agreement": volume_agreement(predicted, truth, labels)}
