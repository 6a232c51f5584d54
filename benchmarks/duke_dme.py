"""Real-data accuracy check on the Duke DME fluid B-scans (10 patients, patient split 6/2/2), on the CPU.

Stages (all by default, each can be run alone with ``--stage``):

1. ``data``: ``python -m dataset_builder folder ...`` -> ``data/duke_dme`` (skipped when it exists);
2. ``unet``: the MONAI U-Net baseline through ``octsam.training.loop`` (``--model unet``);
3. ``sam``: a tiny *randomly initialised* SAM (``octsam.models.sam.save_random_base``; no pretrained SAM can be loaded
   here) with LoRA in automatic mode, through ``octsam.training.loop``;
4. ``evaluate``: ``octsam.evaluation.compare.run_comparison`` on the test split: zero-shot (the same random base with
   ground-truth boxes - meaningless as a baseline, reported because the protocol asks for the row), SAM + LoRA and
   the U-Net, per-class CSVs with patient-bootstrap CIs, the seed-format CSV, figures and ``report.md``.

Wall times of every stage go to ``WORK/timings.json`` and are printed at the end with the hardware.

    python benchmarks/duke_dme.py                       # everything (about 30 min on 2 busy CPU cores)
    python benchmarks/duke_dme.py --stage evaluate      # re-evaluate trained models

A benchmark, not a test: nothing is asserted. Results are in benchmarks/DUKE_RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/duke_dme.py`` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402

RAW = REPO.parent / "shared" / "data" / "duke_dme_fluid"
STAGES = ("data", "unet", "sam", "evaluate")

# The tiny SAM: 256 x 256 input, 8-pixel patches (32 x 32 embedding grid, masks at 128 x 128), 4 ViT layers.
SAM_BASE = dict(
    image_size=256,
    patch_size=8,
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    output_channels=64,
    window_size=8,
    global_attn_indexes=(1, 3),
    decoder_hidden_size=64,
    decoder_mlp_dim=256,
    decoder_heads=4,
    initializer_range=0.02,
)


def common_train_args(args: argparse.Namespace, dataset: Path, out: Path) -> list[str]:
    """Options shared by both models: the same data, splits, augmentation, loss and validation."""
    return [
        "--dataset", str(dataset), "--output-dir", str(out), "--overwrite-output-dir", "true",
        "--num-workers", "0", "--report-to", "none", "--evaluate-test", "false", "--seed", str(args.seed),
        "--early-stopping-patience", "0", "--keep-checkpoints", "0",
        "--dice-weight", str(args.dice_weight), "--ce-weight", str(args.ce_weight),
    ]  # fmt: skip


def unet_args(args: argparse.Namespace, dataset: Path, out: Path) -> list[str]:
    return [
        "--model", "unet", "--unet-image-size", str(args.unet_size),
        "--unet-channels", *[str(c) for c in args.unet_channels],
        "--learning-rate", str(args.unet_lr), "--num-train-epochs", str(args.unet_epochs),
        "--effective-batch-size", str(args.unet_batch), "--per-device-train-batch-size", str(args.unet_batch),
        *common_train_args(args, dataset, out),
    ]  # fmt: skip


def sam_args(args: argparse.Namespace, dataset: Path, base: Path, out: Path) -> list[str]:
    return [
        "--model", "sam", "--base-model", str(base), "--mode", "automatic",
        "--lora-target-modules", "qkv", "proj", "mlp", "--lora-r", "16", "--lora-alpha", "16",
        "--learning-rate", str(args.sam_lr), "--num-train-epochs", str(args.sam_epochs),
        "--effective-batch-size", str(args.sam_batch), "--per-device-train-batch-size", str(args.sam_batch),
        *common_train_args(args, dataset, out),
    ]  # fmt: skip


def timed(name: str, timings: dict, fn, *fn_args) -> None:
    """Run ``fn``; record wall seconds and this process's CPU seconds (the CPU is shared: both matter)."""
    log(f"{name}: start")
    start, cpu_start = time.perf_counter(), time.process_time()
    status = fn(*fn_args)
    timings[name] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    log(f"{name}: {timings[name]}")
    if status not in (None, 0):
        raise SystemExit(f"{name} failed with status {status}")


def history(run: Path) -> list[dict]:
    """The per-epoch history of a training run (kept in its latest checkpoint's trainer state)."""
    states = sorted((run / "checkpoints").glob("epoch-*/trainer_state.json"))
    return json.loads(states[-1].read_text())["history"] if states else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--dataset", default=str(REPO / "data" / "duke_dme"))
    parser.add_argument("--work", default=str(REPO / "outputs" / "duke_dme"), help="training runs and timings")
    parser.add_argument("--output", default=str(REPO / "results" / "duke_dme"), help="comparison results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-size", type=int, default=256)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--unet-lr", type=float, default=3e-3)
    parser.add_argument("--unet-epochs", type=int, default=100)
    parser.add_argument("--unet-batch", type=int, default=2)
    parser.add_argument("--sam-lr", type=float, default=5e-4)
    parser.add_argument("--sam-epochs", type=int, default=45)
    parser.add_argument("--sam-batch", type=int, default=2)
    parser.add_argument("--dice-weight", type=float, default=1.0, help="loss weights, the same for both models")
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)

    from octsam.cli.train import main as train_main

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dataset, work = Path(args.dataset), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    stages = STAGES if args.stage == "all" else (args.stage,)

    if "data" in stages and not (dataset / "dataset_dict.json").is_file():
        from dataset_builder.__main__ import main as build_main

        timed("build dataset", timings, build_main, [
            "folder", "--images", str(RAW / "images"), "--masks", str(RAW / "masks"),
            "--labels", "background,fluid", "--patient-regex", r"duke_s(\d+)_", "--disease", "dme",
            "--output", str(dataset),
        ])  # fmt: skip
    if "unet" in stages:
        timed("train U-Net", timings, train_main, unet_args(args, dataset, work / "unet"))
    if "sam" in stages:
        from octsam.models.sam import save_random_base

        base = work / "tiny_sam_base"
        save_random_base(base, seed=args.seed, **SAM_BASE)
        timed("train tiny SAM + LoRA", timings, train_main, sam_args(args, dataset, base, work / "sam"))
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")

    if "evaluate" in stages:
        from octsam.evaluation.compare import run_comparison

        start, cpu_start = time.perf_counter(), time.process_time()
        summary = run_comparison(
            str(dataset),
            adapters={
                "SAM + LoRA (tiny, random init)": str(work / "sam" / "best_adapter"),
                "U-Net": str(work / "unet" / "best_adapter"),
            },
            zero_shot_base=str(work / "tiny_sam_base"),
            output_dir=args.output,
            n_bootstrap=args.n_bootstrap,
            seed=args.seed,
            training_histories={
                "SAM + LoRA (tiny, random init)": history(work / "sam"),
                "U-Net": history(work / "unet"),
            },
            overwrite=True,
            rank_by="U-Net",  # the only model here that segments fluid: its best/median/worst cases are informative
        )
        timings["evaluate (all methods)"] = {
            "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(time.process_time() - cpu_start, 1),
        }
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        for method, entry in summary["methods"].items():
            fluid = entry["per_class"]["fluid"]
            print(
                f"{method}: test fluid Dice {fluid['dice_mean']:.3f} [{fluid['dice_ci_low']:.3f}, "
                f"{fluid['dice_ci_high']:.3f}] (per-image mean, 95% patient-bootstrap CI); pooled-pixel Dice "
                f"{fluid['dice_pooled']:.3f} [{fluid['dice_pooled_ci_low']:.3f}, {fluid['dice_pooled_ci_high']:.3f}]"
            )

    print(f"\nhardware: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {_threads()}")
    for name, values in timings.items():
        print(f"{name}: {values}")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
