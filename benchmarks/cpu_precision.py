"""LiteMedSAM on the CPU in fp32 and in bf16: seconds per B-scan and what bf16 changes on the real Duke B-scans.

Zero-shot LiteMedSAM (one ground-truth box per fluid region, one mask per box) on the test splits of the Duke 5-fold
datasets (all 110 B-scans with ``--folds 0 1 2 3 4``), once per precision through ``Segmenter(precision=...)``, the
same path as ``inference.py --precision``. Prints one row per precision: seconds per B-scan (encoder, decoder,
upsampling; reading excluded), mean per-B-scan fluid Dice over the B-scans with fluid, and against fp32 the share of
pixels whose class changed and the largest per-B-scan Dice change.

    python benchmarks/cpu_precision.py                        # folds 0-4, 1 thread; builds the folds if missing
    python benchmarks/cpu_precision.py --folds 0 --threads 2

bf16 is fast only where oneDNN runs it natively (AVX512-BF16 or AMX; the table says whether this CPU does).
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred == 1, truth == 1
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def run(args) -> list[dict]:
    import torch

    from benchmarks.duke_cv import build_folds
    from octsam.data.dataset import load_oct_dataset
    from octsam.evaluation.predict import predict_split
    from octsam.models.fast_attention import enable_fast_attention
    from octsam.models.sam import zero_shot_model, zero_shot_multimask
    from octsam.segmenter import Segmenter

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    build_folds(data, 5, Path(args.raw))
    splits = []
    for fold in args.folds:
        dataset, labels = load_oct_dataset(str(data / f"fold-{fold}"))
        splits.append(dataset["test"])
    rows, reference = [], None
    for precision in args.precisions:
        model = zero_shot_model("litemedsam", labels)
        enable_fast_attention(model)
        segmenter = Segmenter(model, device="cpu", batch_size=1, precision=precision)
        multimask = zero_shot_multimask(model.config)
        preds, refs = [], []
        start = time.perf_counter()
        for split in splits:
            p, r, _, _ = predict_split(segmenter, split, True, multimask, desc=precision)
            preds += list(p)
            refs += list(r)
        seconds = (time.perf_counter() - start) / len(preds)
        with_fluid = [i for i, r in enumerate(refs) if (r == 1).any()]
        scores = np.array([dice(preds[i], refs[i]) for i in with_fluid])
        row = {"precision": precision, "s_per_scan": seconds, "dice": float(scores.mean()), "n": len(with_fluid)}
        row["n_scans"] = len(preds)
        if reference is None:
            reference = (preds, scores)
        else:
            changed = sum(int((a != b).sum()) for a, b in zip(preds, reference[0]))
            row["changed_pixels"] = changed / sum(a.size for a in preds)
            row["max_dice_change"] = float(np.abs(scores - reference[1]).max())
        log(f"{precision}: {row}")
        rows.append(row)
    return rows


def table(rows: list[dict], args) -> str:
    import torch

    from octsam.segmenter import cpu_has_native_bf16

    lines = [
        f"Zero-shot LiteMedSAM on the test splits of Duke folds {', '.join(map(str, args.folds))} "
        f"({rows[0]['n_scans']} B-scans, {rows[0]['n']} with fluid); {cpu_name()}, {args.threads} thread(s), "
        f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; torch {torch.__version__}; "
        f"1-minute load average {os.getloadavg()[0]:.1f}",
        "",
        "| precision | s per B-scan | mean fluid Dice (B-scans with fluid) | pixels changed vs fp32 | largest Dice change |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        changed = f"{100 * r['changed_pixels']:.3f} %" if "changed_pixels" in r else "-"
        worst = f"{r['max_dice_change']:.4f}" if "max_dice_change" in r else "-"
        lines.append(f"| {r['precision']} | {r['s_per_scan']:.3f} | {r['dice']:.4f} | {changed} | {worst} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "outputs" / "duke_cv" / "data"), help="the folds' datasets")
    parser.add_argument("--raw", default=str(REPO.parent / "shared" / "data" / "duke_dme_fluid"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
