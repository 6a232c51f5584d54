"""Zero-shot LiteMedSAM on the Duke DME fluid B-scans with ground-truth boxes: a check of octsam's LiteMedSAM.

For every B-scan with fluid: LiteMedSAM's preprocessing (``octsam.models.litemedsam.preprocess_image``), one box per
connected fluid region of the ground truth ((x_min, y_min, x_max + 1, y_max + 1) in B-scan pixels, scaled into the
256-pixel frame), ``multimask_output=False`` (LiteMedSAM was trained with one mask per box), each box's 256 x 256
logits cropped to the valid region and upsampled to the B-scan, thresholded at 0, union over the boxes. Prints the
mean and median per-B-scan Dice over the B-scans with fluid (78), the same over patients 03-10 (62 B-scans), and
per-patient means. Reference (the package's own model code, same protocol): mean 0.646, median 0.652 over 78
B-scans; 0.645 over the 62 of patients 03-10.

Measured with this script (2 busy CPU threads): 4-connected regions (the default) mean 0.6461, median 0.6516 over
78; 0.6452 over the 62 of patients 03-10 (995 s at load ~7). 8-connected regions: 0.6417 / 0.6482; 0.6419 (574 s).

    python benchmarks/litemedsam_zero_shot.py [--data ../shared/data/duke_dme_fluid] [--connectivity 4] [--csv out.csv]

A benchmark, not a test: nothing is asserted. About 2-4 s per B-scan on one CPU core (the image encoder).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/litemedsam_zero_shot.py`` from anywhere
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from benchmarks.common import cpu_name, log  # noqa: E402
from octsam.models.litemedsam import (  # noqa: E402
    build_litemedsam,
    postprocess_logits,
    preprocess_image,
    scale_boxes,
)

RAW = REPO.parent / "shared" / "data" / "duke_dme_fluid"


def region_boxes(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """(N, 4) boxes (x_min, y_min, x_max + 1, y_max + 1), one per connected region of ``mask > 0``."""
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, _ = ndimage.label(mask > 0, structure=structure)
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s is not None]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / total) if total else 1.0


@torch.no_grad()
def predict(model, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Union of LiteMedSAM's single-mask predictions for ``boxes`` (B-scan pixels) -> bool (H, W)."""
    pixels, valid = preprocess_image(image)
    embedding = model.get_image_embeddings(pixels)
    prompts = scale_boxes(boxes, image.shape[:2])[None]  # (1, N, 4) in the 256 frame
    out = model(image_embeddings=embedding, input_boxes=prompts, multimask_output=False)
    logits = postprocess_logits(out.pred_masks[0, :, 0], valid, image.shape[:2])  # (N, H, W)
    return (logits > 0).any(dim=0).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=RAW, help="folder with images/, masks/ (Duke DME fluid)")
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=(4, 8),
        default=4,
        help="pixel connectivity of regions (4: scipy.ndimage.label's default)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N B-scans with fluid (smoke test)")
    parser.add_argument("--csv", type=Path, default=None, help="write per-B-scan Dice here")
    args = parser.parse_args(argv)

    if not (args.data / "masks").is_dir():
        parser.error(f"{args.data} has no masks/ folder; pass the Duke DME fluid folder with --data")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build_litemedsam()
    log(f"LiteMedSAM built in {time.perf_counter() - start:.1f} s; {args.threads} threads on {cpu_name()}")

    rows = []
    names = sorted(p.stem for p in (args.data / "masks").glob("*.png"))
    for name in names:
        truth = np.asarray(Image.open(args.data / "masks" / f"{name}.png")) > 0
        if not truth.any():
            continue
        if args.limit is not None and len(rows) >= args.limit:
            break
        image = np.asarray(Image.open(args.data / "images" / f"{name}.png").convert("L"))
        boxes = region_boxes(truth, args.connectivity)
        t0 = time.perf_counter()
        pred = predict(model, image, boxes)
        patient = int(re.match(r"duke_s(\d+)_b\d+", name)[1])
        rows.append({"name": name, "patient": patient, "boxes": len(boxes), "dice": dice(pred, truth)})
        log(f"{name}: {len(boxes)} boxes, Dice {rows[-1]['dice']:.3f} ({time.perf_counter() - t0:.1f} s)")
    wall = time.perf_counter() - start
    if not rows:
        parser.error(f"no B-scan with fluid under {args.data}")

    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def summary(selected: list[dict]) -> str:
        values = [r["dice"] for r in selected]
        return (
            f"mean {statistics.fmean(values):.4f}, median {statistics.median(values):.4f} over {len(values)} B-scans"
        )

    print(f"\nzero-shot LiteMedSAM, GT boxes ({args.connectivity}-connected regions), multimask_output=False")
    print(f"all patients:   {summary(rows)}   (reference: mean 0.646, median 0.652 over 78)")
    later = [r for r in rows if 3 <= r["patient"] <= 10]
    if later:
        print(f"patients 03-10: {summary(later)}   (reference: mean 0.645 over 62)")
    for patient in sorted({r["patient"] for r in rows}):
        values = [r["dice"] for r in rows if r["patient"] == patient]
        print(f"  patient {patient:02d}: mean {statistics.fmean(values):.4f} over {len(values)}")
    print(f"wall time {wall:.0f} s ({args.threads} threads, {cpu_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
