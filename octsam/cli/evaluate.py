"""``octsam-evaluate`` (``python -m octsam.cli.evaluate``): compare adapters, the U-Net baseline and zero-shot SAM on
one split - per-class tables with patient-bootstrap intervals, the publication-format CSV, figures and report.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from octsam.adapter import check_adapter_folder, resolve_adapter
from octsam.bases import base_of
from octsam.data.contract import parse_pixel_spacing
from octsam.errors import OctSamError, cli_main
from octsam.evaluation.compare import ZERO_SHOT, default_method_name, run_comparison
from octsam.options import Range, arg_type


def parse_adapter_arg(text: str) -> tuple[str | None, str]:
    """``NAME=DIR_OR_REPO`` or ``DIR_OR_REPO`` -> (name or None, adapter). An existing path is never split."""
    if "=" in text and not os.path.exists(text):
        name, adapter = text.split("=", 1)
        if not name.strip() or not adapter.strip():
            raise OctSamError(f"--adapter {text!r}: use NAME=DIR_OR_REPO or DIR_OR_REPO.")
        return name.strip(), adapter.strip()
    return None, text


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="octsam-evaluate",
        description="Evaluate adapters (SAM + LoRA, U-Net baseline) and the zero-shot SAM baseline on one split, "
        "with per-class metrics, patient-bootstrap CIs, the seed-format CSV, figures and report.md.",
        epilog="Example: octsam-evaluate --adapter LoRA=outputs/amd/best_adapter "
        "--adapter U-Net=outputs/amd_unet/best_adapter --method zero-shot --dataset data/amd --output results/amd",
    )
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR_OR_REPO",
                   help="Adapter folder or Hub repo (repeat for several; NAME is its row in the tables; one NAME given "
                   "several times is an ensemble: probabilities averaged).")  # fmt: skip
    p.add_argument("--dataset", default=None, help="Dataset folder (dataset_builder) or Hub dataset id.")
    p.add_argument(
        "--volumes",
        nargs="+",
        default=None,
        metavar="FILE",
        help="Instead of --dataset: annotated volumes (Duke .mat, RETOUCH .mhd folder, eyepy .eye); per eye the "
        "predicted and true biomarker volume in mm³, the error, and over eyes the mean errors and Pearson r.",
    )
    p.add_argument("--spacing", default=None, metavar="AXIAL,LATERAL,BSCAN", help="Volume spacing in mm if missing.")
    p.add_argument("--grader", type=int, default=1, choices=[1, 2], help="Duke .mat: whose annotations (default 1).")
    p.add_argument("--dataset-revision", default=None, help="Hub revision of --dataset.")
    p.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    p.add_argument("--output", required=True, help="Results folder (never replaced without --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing, non-empty --output folder.")
    p.add_argument("--method", action="append", default=[], choices=[ZERO_SHOT],
                   help="Also evaluate the zero-shot baseline (the base with ground-truth boxes, prompted as it was trained).")  # fmt: skip
    p.add_argument("--base-model", default=None, metavar="ID_OR_DIR",
                   help="SAM base for --method zero-shot (default: the base model of the first SAM adapter).")  # fmt: skip
    p.add_argument(
        "--pixel-spacing-mm", default=None, metavar="Y,X", help="Pixel size in mm: HD95 in mm, areas in mm²."
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=["none", "flip"],
        help="Test-time augmentation of every adapter: flip averages with the mirrored B-scan.",
    )
    p.add_argument(
        "--zero-shot-input-mode",
        default="resize",
        choices=["resize", "native"],
        help="Zero-shot row: the B-scan resized into the base's input, or each box decoded in a native-"
        "resolution window around it.",
    )
    p.add_argument("--n-bootstrap", type=int, default=1000, help="Bootstrap resamples of patients (default 1000).")
    p.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="Where to run.")
    p.add_argument("--batch-size", type=int, default=8, help="B-scans per forward pass.")
    p.add_argument("--dpi", type=arg_type(int, Range(10, 2400), "int"), default=150,
                   help="Resolution of the figures, 10 to 2400 (default 150).")  # fmt: skip
    return p


def _zero_shot_base(args: argparse.Namespace, adapters: Mapping[str, str]) -> str | None:
    if ZERO_SHOT not in args.method:
        return None
    if args.base_model:
        return args.base_model
    for folder in adapters.values():
        config = check_adapter_folder(folder[0] if isinstance(folder, list) else folder)
        if base_of(config).has_embeddings:
            return config.base_model
    raise OctSamError("--method zero-shot needs a SAM base: pass --base-model ID_OR_DIR (or a SAM --adapter).")


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``octsam-evaluate`` / ``python -m octsam.cli.evaluate``: 0 done, 2 a usage error (printed without a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from octsam.folders import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C: no lock file or staging folder is left
            return _evaluate(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written (an existing --output is unchanged).", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    if args.n_bootstrap < 1:
        raise OctSamError(f"--n-bootstrap must be at least 1, got {args.n_bootstrap}.")
    if args.batch_size < 1:
        raise OctSamError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.volumes:
        return evaluate_volume_files(args)
    if not args.dataset:
        raise OctSamError("give --dataset DIR_OR_ID (B-scans) or --volumes FILE... (annotated volumes).")
    adapters: dict[str, list[str]] = {}
    for text in args.adapter:
        name, adapter = parse_adapter_arg(text)
        folder = resolve_adapter(adapter)  # once per run: a Hub id is downloaded here, the rest reads the folder
        named = name is not None
        if name is None:
            name = default_method_name(check_adapter_folder(folder))
        if name in adapters and not named:
            raise OctSamError(
                f"Two adapters would both be called {name!r}; name them with --adapter NAME=DIR (the same NAME "
                "given several times makes an ensemble)."
            )
        adapters.setdefault(name, []).append(str(folder))  # one NAME given several times: an ensemble
    adapters = {name: folders[0] if len(folders) == 1 else folders for name, folders in adapters.items()}
    run_comparison(
        args.dataset,
        adapters=adapters,
        zero_shot_base=_zero_shot_base(args, adapters),
        output_dir=args.output,
        split=args.split,
        pixel_spacing_mm=parse_pixel_spacing(args.pixel_spacing_mm),
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        dataset_revision=args.dataset_revision,
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        figure_dpi=args.dpi,
        tta=args.tta,
        zero_shot_input_mode=args.zero_shot_input_mode,
    )
    return 0


def evaluate_volume_files(args: argparse.Namespace) -> int:
    """``--volumes``: one adapter on annotated volumes; writes volumes.json and volumes_eval.csv under --output."""
    import csv
    import json

    from octsam.folders import atomic_folder, check_output_folder
    from octsam.segmenter import Segmenter
    from octsam.volumes.segment import evaluate_volumes

    if len(args.adapter) != 1:
        raise OctSamError("--volumes evaluates one adapter: give exactly one --adapter.")
    _, adapter = parse_adapter_arg(args.adapter[0])
    final = check_output_folder(args.output, args.overwrite)  # before the model is loaded; again under the lock
    segmenter = Segmenter.from_pretrained(resolve_adapter(adapter), device=args.device, batch_size=args.batch_size)
    result = evaluate_volumes(segmenter, args.volumes, spacing=args.spacing, grader=args.grader)
    with atomic_folder(final, lock="evaluation", overwrite=args.overwrite) as tmp:
        (tmp / "volumes.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        with open(tmp / "volumes_eval.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["volume_id", "class", "annotated_bscans", "predicted_mm3", "true_mm3", "error_mm3"])
            for eye in result["eyes"]:
                for name in result["labels"][1:]:
                    writer.writerow([
                        eye["volume_id"], name, eye["annotated_bscans"], eye["predicted_mm3"].get(name),
                        eye["true_mm3"].get(name), eye["error_mm3"].get(name),
                    ])  # fmt: skip
    for name, agreement in result["agreement"].items():
        print(
            f"{name}: {agreement['n']} eyes, mean absolute volume error {agreement['mean_abs_error_mm3']:.4f} mm³, "
            f"mean error {agreement['mean_error_mm3']:+.4f} mm³, Pearson r {agreement['pearson_r']:.3f}"
        )
    print(f"wrote {final / 'volumes.json'} and volumes_eval.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
