"""Inference speed through ``octsam.Segmenter`` (what ``inference.py`` runs): seconds per B-scan and B-scans/s.

SAM ViT-B at 1024 x 1024 (``transformers.SamConfig()`` defaults, random weights saved to a temporary folder as the
base) with a new LoRA adapter (rank 16 on ``qkv``, automatic mode, 1 class) from ``OctSamModel.from_base``. Inputs are
768 x 496 uint8 B-scans already in memory (file decoding and writing are not timed); a timed call covers resize to
1024, normalisation, the forward pass, bilinear upsampling of the logits to native size and the index mask.

- CPU (fp32): LoRA merged (``merge_and_unload``, the default) vs unmerged (``--no-merge``), batch 1 and 8;
- CUDA (bf16 autocast), when a GPU is visible: merged vs unmerged, batch 1 and 16.

Examples::

    python benchmarks/inference_speed.py --quick              # CPU: 2 + 8 B-scans per setting (~4 min on 2 cores)
    python benchmarks/inference_speed.py                      # CPU: 4 + 16 B-scans per setting; plus CUDA if present
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
    from octsam.modeling import OctSamConfig, OctSamModel

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
            if device == "cpu":
                plan = [(1, args.cpu_n1), (8, args.cpu_n8)]
            else:
                plan = [(1, args.gpu_n1), (16, args.gpu_n16)]
            merged_masks = None
            for merge in (True, False):
                segmenter = Segmenter.from_pretrained(adapter, device=device, merge=merge)
                masks_b1 = None
                for batch, n in plan:
                    images = bscans(max(n, batch))
                    log(f"{device} {'merged' if merge else 'unmerged'} batch {batch}: {len(images)} B-scans ...")
                    load_before = os.getloadavg()[0]
                    seconds, cpu_seconds, masks = time_setting(segmenter, images, batch, device)
                    rows.append(
                        {
                            "device": device,
                            "hardware": hardware(device),
                            "lora": "merged" if merge else "unmerged",
                            "batch": batch,
                            "scans": len(images),
                            "s_per_scan": seconds / len(images),
                            "scans_per_s": len(images) / seconds,
                            "cpu_s_per_scan": cpu_seconds / len(images),
                            "load": max(load_before, os.getloadavg()[0]),
                        }
                    )
                    log(
                        f"  {seconds / len(images):.3f} s per B-scan, {len(images) / seconds:.3f} B-scans/s, "
                        f"{cpu_seconds / len(images):.2f} CPU s per B-scan, load average {os.getloadavg()[0]:.1f}"
                    )
                    if masks_b1 is None:
                        masks_b1 = masks
                        if merge:
                            merged_masks = masks
                        else:
                            agree = np.mean([np.mean(a == b) for a, b in zip(merged_masks, masks)])
                            log(f"  unmerged vs merged (batch 1): {100 * agree:.4f}% of mask pixels equal")
                    else:
                        shared = min(len(masks_b1), len(masks))
                        agree = np.mean([np.mean(a == b) for a, b in zip(masks_b1[:shared], masks[:shared])])
                        log(f"  batch {batch} vs batch 1: {100 * agree:.4f}% of mask pixels equal")
                del segmenter
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | hardware | LoRA | batch | B-scans timed | s per B-scan | B-scans/s | CPU s per B-scan | load |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['hardware']} | {r['lora']} | {r['batch']} | {r['scans']} | "
            f"{r['s_per_scan']:.3f} | {r['scans_per_s']:.3f} | {r['cpu_s_per_scan']:.2f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer B-scans (CPU 2 + 8, GPU 16 + 32).")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None, help="Default: cpu (+cuda).")
    parser.add_argument("--base", default=None, help="Base SAM id or folder (default: random ViT-B weights).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores).")
    parser.add_argument("--cpu-n1", type=int, default=None, help="B-scans timed at batch 1 on the CPU.")
    parser.add_argument("--cpu-n8", type=int, default=None, help="B-scans timed at batch 8 on the CPU.")
    parser.add_argument("--gpu-n1", type=int, default=None, help="B-scans timed at batch 1 on the GPU.")
    parser.add_argument("--gpu-n16", type=int, default=None, help="B-scans timed at batch 16 on the GPU.")
    args = parser.parse_args(argv)
    defaults = {"cpu_n1": (2, 4), "cpu_n8": (8, 16), "gpu_n1": (16, 64), "gpu_n16": (32, 128)}
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
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
        "\nCPU s: process CPU time (all threads) per B-scan. load: the 1-minute load average during the setting; "
        f"above the {os.cpu_count()} cores, other processes competed and wall-clock figures are inflated."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
