"""Inference speed through ``octsam.Segmenter`` (what ``inference.py`` runs): seconds per B-scan and B-scans/s.

SAM ViT-B at 1024 x 1024 (``transformers.SamConfig()`` defaults, random weights saved to a temporary folder as the
base) with a new LoRA adapter (rank 16 on ``qkv``, automatic mode, 1 class) from ``OctSamModel.from_base``. Inputs are
768 x 496 uint8 B-scans already in memory (file decoding and writing are not timed); a timed call covers resize to
1024, normalisation, the forward pass, bilinear upsampling of the logits to native size and the index mask.

Settings, side by side in one run (``--settings``; the first is the yardstick for the speed-up and the masks):
transformers' default path (PEFT LoRA unmerged, transformers' attention), octsam's default (LoRA merged, fast
attention) and octsam with ``--compile`` (image encoder compiled; on the CPU with inductor's weight freezing).
CPU in fp32 at batch 1; CUDA (bf16 autocast), when a GPU is visible, at batch 1 and 16.

Examples::

    python benchmarks/inference_speed.py --quick              # CPU: 2 B-scans per setting (~5 min on 2 cores)
    python benchmarks/inference_speed.py                      # CPU: 4 B-scans per setting; plus CUDA if present
    python benchmarks/inference_speed.py --devices cuda       # GPU only
    python benchmarks/inference_speed.py --base facebook/sam-vit-base   # real weights (same speed, needs the Hub)

Prints one markdown table with the hardware at the end. A benchmark, not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/inference_speed.py`` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (bf16 autocast)"
    return f"{cpu_name()}, {torch.get_num_threads()} threads (fp32)"


def make_base(folder: Path) -> str:
    """SAM ViT-B at 1024 with random weights (``SamConfig()`` defaults), saved as a local base model."""
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    SamModel(SamConfig()).save_pretrained(folder)
    return str(folder)


def make_adapter(base: str, folder: Path) -> str:
    from octsam.adapter import OctSamConfig
    from octsam.models.sam import OctSamModel

    config = OctSamConfig(labels=["background", "fluid"], base_model=base)
    model = OctSamModel.from_base(config, seed=0)
    with torch.no_grad():  # a non-identity LoRA, as after training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(folder)
    return str(folder)


def bscans(n: int, seed: int = 0, size: tuple[int, int] = (496, 768)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(70, 25, size).clip(0, 255).astype(np.uint8) for _ in range(n)]


def time_setting(
    segmenter, images: list[np.ndarray], batch: int, device: str
) -> tuple[float, float, list[np.ndarray]]:
    """Wall-clock and process CPU seconds for ``images`` in batches of ``batch`` (after a warm-up call), and the
    masks. CPU seconds (all threads of this process) show what the work costs when other processes share the
    cores: on an otherwise idle machine wall-clock is about CPU seconds / threads."""
    segmenter.batch_size = batch
    segmenter(images[: batch if device == "cuda" else 1])  # warm-up: allocator, kernels (autotuning on the GPU)
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = segmenter(images)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, [r.mask for r in results]


#: (label, LoRA merged, fast attention, compiled image encoder): transformers' default path first (the yardstick
#: of issue 6: PEFT LoRA unmerged, transformers' attention, as the seed scripts ran), then octsam's.
SETTINGS = {
    "transformers": ("transformers default (LoRA unmerged, its attention)", False, False, False),
    "transformers-merged": ("transformers attention, LoRA merged", True, False, False),
    "octsam": ("octsam default (merged, fast attention)", True, True, False),
    "octsam-unmerged": ("octsam, LoRA unmerged (--no-merge)", False, True, False),
    "octsam-compile": ("octsam --compile (merged, fast, compiled encoder)", True, True, True),
}


def run(args: argparse.Namespace) -> list[dict]:
    from octsam.segmenter import Segmenter

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        log("no CUDA GPU visible: skipping the GPU rows")
        devices = [d for d in devices if d != "cuda"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="octsam-bench-") as tmp:
        base = args.base or make_base(Path(tmp) / "sam-vit-b-random")
        adapter = make_adapter(base, Path(tmp) / "adapter")
        log(f"base {base}, adapter {adapter}")
        for device in devices:
            batches = args.cpu_batches if device == "cpu" else args.gpu_batches
            reference: dict[int, list[np.ndarray]] = {}  # masks of the first setting, per batch size
            baseline: dict[int, float] = {}
            for key in args.settings:
                label, merge, fast, compiled = SETTINGS[key]
                torch._dynamo.reset()
                segmenter = Segmenter.from_pretrained(
                    adapter, device=device, merge=merge, fast_attention=fast, compile=compiled
                )
                for batch in batches:
                    images = bscans(max(args.scans, batch))
                    log(f"{device} {key} batch {batch}: {len(images)} B-scans ...")
                    load_before = os.getloadavg()[0]
                    seconds, cpu_seconds, masks = time_setting(segmenter, images, batch, device)
                    reference.setdefault(batch, masks)
                    baseline.setdefault(batch, cpu_seconds if device == "cpu" else seconds)
                    agree = np.mean([np.mean(a == b) for a, b in zip(reference[batch], masks)])
                    cost = cpu_seconds if device == "cpu" else seconds
                    rows.append(
                        {
                            "device": device,
                            "hardware": hardware(device),
                            "setting": label,
                            "batch": batch,
                            "scans": len(images),
                            "s_per_scan": seconds / len(images),
                            "scans_per_s": len(images) / seconds,
                            "cpu_s_per_scan": cpu_seconds / len(images),
                            "speedup": baseline[batch] / cost,
                            "agree": agree,
                            "load": max(load_before, os.getloadavg()[0]),
                        }
                    )
                    log(
                        f"  {seconds / len(images):.3f} s per B-scan, {cpu_seconds / len(images):.2f} CPU s per "
                        f"B-scan, {baseline[batch] / cost:.2f}x the first setting, {100 * agree:.4f}% of mask "
                        f"pixels equal to it, load average {os.getloadavg()[0]:.1f}"
                    )
                del segmenter
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | hardware | setting | batch | B-scans timed | s per B-scan | B-scans/s | CPU s per B-scan "
        "| speed-up | mask pixels equal | load |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['hardware']} | {r['setting']} | {r['batch']} | {r['scans']} | "
            f"{r['s_per_scan']:.3f} | {r['scans_per_s']:.3f} | {r['cpu_s_per_scan']:.2f} | {r['speedup']:.2f}x | "
            f"{100 * r['agree']:.3f} % | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer B-scans (CPU 2, GPU 32 per setting).")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None, help="Default: cpu (+cuda).")
    parser.add_argument("--base", default=None, help="Base SAM id or folder (default: random ViT-B weights).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores).")
    parser.add_argument(
        "--settings",
        default="transformers,octsam,octsam-compile",
        help=f"comma-separated, the first is the yardstick; from {', '.join(SETTINGS)}",
    )
    parser.add_argument("--scans", type=int, default=None, help="B-scans timed per setting (default 4, quick 2).")
    parser.add_argument("--cpu-batches", default="1", help="batch sizes on the CPU (comma-separated)")
    parser.add_argument("--gpu-batches", default="1,16", help="batch sizes on the GPU (comma-separated)")
    args = parser.parse_args(argv)
    args.settings = [k.strip() for k in args.settings.split(",") if k.strip()]
    for key in args.settings:
        if key not in SETTINGS:
            parser.error(f"--settings: unknown {key!r}; use {', '.join(SETTINGS)}")
    args.cpu_batches = [int(b) for b in args.cpu_batches.split(",")]
    args.gpu_batches = [int(b) for b in args.gpu_batches.split(",")]
    if args.scans is None:
        args.scans = 2 if args.quick else 4
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = run(args)
    print(
        f"\n{'SAM ViT-B 1024 (random weights)' if args.base is None else args.base} + LoRA r16 (qkv) through "
        "octsam.Segmenter; 768 x 496 B-scans in memory; resize, forward, "
        f"upsampling to native size and index mask timed; torch {torch.__version__}.\n"
    )
    print(table(rows))
    print(
        "\nCPU s: process CPU time (all threads) per B-scan. speed-up: the first setting's CPU s (CPU) or wall s "
        "(GPU) per B-scan over this one's. mask pixels equal: against the first setting's masks. load: the 1-minute "
        f"load average during the setting; above the {os.cpu_count()} cores, other processes competed and "
        "wall-clock figures are inflated. A compiled setting's compilation happens in its untimed warm-up."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
