"""The main job on an embedded default (`make demo`): synthetic AMD data -> SAM + LoRA and U-Net -> comparison.

Runs offline on a CPU in minutes. It fine-tunes a *small, randomly initialised* SAM (SAM's architecture at reduced
width and input size, since no pretrained weights can be downloaded here), so its numbers show that the workflow
runs end to end, not what pretrained SAM ViT-B reaches; the zero-shot row uses the same random base.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from octsam.errors import OctSamError, cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MARKER = ".octsam-demo"
# The small SAM of the demo: ViT with 4 layers of width 96 on 8 x 8 patches of a 128 x 128 input (a 16 x 16 token
# grid, like SAM's 64 x 64 grid at 1/4 scale). A frozen *random* patch embedding must not lose information, so its
# 8 x 8 x 3 patch values (64 distinct for grey scans) map to 96 dimensions.
DEMO_SAM = dict(
    image_size=128,
    patch_size=8,
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    output_channels=64,
    window_size=4,
    global_attn_indexes=(1, 3),
    decoder_hidden_size=64,
    decoder_mlp_dim=256,
    decoder_heads=4,
)


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
    parser.add_argument("--patients", type=int, default=20, help="synthetic patients (4 B-scans each)")
    parser.add_argument("--no-unet", action="store_true", help="skip the U-Net baseline")
    args = parser.parse_args(argv)
    run(Path(args.output), args.overwrite, args.epochs, args.patients, not args.no_unet)
    return 0


def run(out: Path, overwrite: bool, epochs: int | None, patients: int, unet: bool) -> dict:
    import torch

    from dataset_builder.synthetic import build_synthetic
    from octsam.config import parse_config
    from octsam.evaluation.compare import run_comparison
    from octsam.models.sam import save_random_base
    from octsam.training.loop import train

    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are small: one thread is about as fast as two, and stays fast when other processes
        # compete for the cores (more threads than free cores made each step 20x slower in our measurements).
        torch.set_num_threads(1)
    start = time.time()
    prepare_output(out, overwrite)
    data = out / "data"
    print(f"[1/4] building the synthetic AMD dataset ({patients} patients x 4 B-scans) in {data}")
    build_synthetic("amd", patients, 4, seed=0, output=data, size=256, lesion_scale=2.0)
    base = save_random_base(out / "base_model", seed=0, **DEMO_SAM)
    extra = [] if epochs is None else ["--num-train-epochs", str(epochs)]
    common = ["--dataset", str(data), *extra]

    print("[2/4] fine-tuning the small random SAM with LoRA (automatic mode)")
    sam_args = parse_config(
        ["--config", str(CONFIGS / "demo.yaml"), *common, "--base-model", base, "--output-dir", str(out / "sam_lora")]
    )
    train(*sam_args)
    adapters = {"SAM + LoRA": str(out / "sam_lora" / "best_adapter")}
    histories = {"SAM + LoRA": _history(out / "sam_lora")}
    if unet:
        print("[3/4] training the U-Net baseline (same data, splits, augmentation, loss and metrics)")
        unet_args = parse_config(
            ["--config", str(CONFIGS / "demo_unet.yaml"), *common, "--output-dir", str(out / "unet")]
        )
        train(*unet_args)
        adapters["U-Net"] = str(out / "unet" / "best_adapter")
        histories["U-Net"] = _history(out / "unet")

    print("[4/4] evaluating zero-shot SAM, SAM + LoRA and U-Net on the test split")
    summary = run_comparison(
        dataset=str(data),
        adapters=adapters,
        zero_shot_base=base,
        output_dir=out / "results",
        split="test",
        training_histories=histories,
    )
    minutes = (time.time() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min; results, figures and report.md in {out / 'results'}")
    print("Note: a small randomly initialised SAM - these numbers show the workflow, not pretrained SAM's accuracy.")
    return summary


def _history(run_dir: Path) -> list[dict]:
    import json

    from octsam.training.loop import CHECKPOINT_DIR, list_checkpoints

    ckpts = list_checkpoints(run_dir / CHECKPOINT_DIR)
    return json.loads((ckpts[-1] / "trainer_state.json").read_text())["history"] if ckpts else []


if __name__ == "__main__":
    sys.exit(main())
