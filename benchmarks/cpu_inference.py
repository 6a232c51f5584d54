"""CPU inference, LiteMedSAM vs SAM ViT-B: encoder seconds per image and ``inference.py`` seconds per B-scan.

For each base (LiteMedSAM at 256 with its pretrained weights; SAM ViT-B at 1024 with random weights, ``SamConfig()``
defaults, the same speed as real ones) a tiny adapter is made with ``OctSamModel.from_base`` (automatic mode, one
class, non-identity LoRA) and saved. Then:

- encoder: ``Segmenter.from_pretrained(adapter, device="cpu")`` (LoRA merged; LiteMedSAM's TinyViT with BatchNorm
  folded and channels-last, SAM with octsam's fast attention), the image encoder alone on one input, the minimum
  of ``--repeats`` calls after a warm-up;
- end to end: ``python inference.py --adapter A --input DIR --output OUT --device cpu`` on ``--scans`` synthetic
  768 x 496 PNGs, in a fresh process pinned to ``--threads`` cores with ``taskset``. ``s/B-scan`` is run.json's
  ``segment_s`` / B-scans (read PNG, resize, encode, decode, upsample the logits, write mask, overlay and areas;
  excludes start-up and model loading, shown as the process's wall time); the minimum over ``--repeats`` runs.

    python benchmarks/cpu_inference.py                       # 2 threads, 8 B-scans, 2 runs per base
    python benchmarks/cpu_inference.py --bases litemedsam --scans 16

Prints a markdown table with the hardware and load average. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402

BASES = {"litemedsam": "LiteMedSAM (TinyViT, 256)", "vit-b": "SAM ViT-B (1024, random weights)"}


def make_adapter(base: str, folder: Path) -> str:
    from octsam.adapter import OctSamConfig
    from octsam.models.sam import OctSamModel

    if base == "vit-b":
        from transformers import SamConfig, SamModel

        torch.manual_seed(0)
        SamModel(SamConfig()).save_pretrained(folder / "base")
        base = str(folder / "base")
    model = OctSamModel.from_base(OctSamConfig(labels=["background", "fluid"], base_model=base), seed=0)
    with torch.no_grad():  # a non-identity LoRA, as after training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(folder / "adapter")
    return str(folder / "adapter")


def write_bscans(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = rng.normal(70, 25, (496, 768)).clip(0, 255).astype(np.uint8)  # 768 wide, 496 high
        Image.fromarray(array).save(folder / f"bscan_{i:03d}.png")


@torch.inference_mode()
def encoder_seconds(adapter: str, repeats: int, precision: str = "fp32") -> float:
    from octsam.segmenter import Segmenter

    segmenter = Segmenter.from_pretrained(adapter, device="cpu", precision=precision)
    image = np.random.default_rng(0).normal(70, 25, (496, 768)).clip(0, 255).astype(np.uint8)
    pixel_values = segmenter.model.preprocess(segmenter.prepare(image)[None])
    bf16 = segmenter.dtype == torch.bfloat16

    def encode(pixels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return segmenter.model.image_embeddings(pixels)

    encode(pixel_values)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode(pixel_values)
        best = min(best, time.perf_counter() - start)
    return best


def end_to_end(adapter: str, inputs: Path, output: Path, threads: int, precision: str = "fp32") -> tuple[float, dict]:
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    command = ["taskset", "-c", cores, sys.executable, str(REPO / "inference.py"), "--adapter", adapter]
    command += ["--input", str(inputs), "--output", str(output), "--device", "cpu", "--overwrite", "--quiet"]
    command += ["--precision", precision]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((output / "run.json").read_text())["timings"]


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="octsam-cpu-bench-") as tmp:
        inputs = Path(tmp) / "bscans"
        write_bscans(inputs, args.scans)
        for base in args.bases:
            log(f"{base}: making the adapter ...")
            adapter = make_adapter(base, Path(tmp) / base)
            load = [os.getloadavg()[0]]
            encoder = encoder_seconds(adapter, args.repeats, args.precision)
            log(f"{base}: encoder {encoder:.3f} s/image")
            best = None
            for r in range(args.repeats):
                load.append(os.getloadavg()[0])
                wall, timings = end_to_end(adapter, inputs, Path(tmp) / f"out-{base}", args.threads, args.precision)
                per_scan = timings["segment_s"] / args.scans
                log(f"{base}: run {r + 1}: {per_scan:.3f} s/B-scan, process {wall:.1f} s, load {load[-1]:.1f}")
                if best is None or per_scan < best[0]:
                    best = (per_scan, wall, timings)
            rows.append(
                {
                    "base": BASES[base],
                    "encoder_s": encoder,
                    "scan_s": best[0],
                    "predict_s": best[2]["predict_s_per_scan"],
                    "process_s": best[1],
                    "load_s": best[2]["load_s"],
                    "load": max(load + [os.getloadavg()[0]]),
                }
            )
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.scans} synthetic 768 x 496 PNGs; {cpu_name()}; {args.threads} threads (taskset); {args.precision}; "
        f"batch 1; minimum of {args.repeats} runs",
        "",
        "| base | encoder s/image | inference.py s/B-scan | of which model (predict) | process wall s "
        "(incl. start-up, model load) | model load s | threads | load average (1 min, max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['encoder_s']:.3f} | {r['scan_s']:.3f} | {r['predict_s']:.3f} | "
            f"{r['process_s']:.1f} | {r['load_s']:.1f} | {args.threads} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", default="litemedsam,vit-b", help=f"comma-separated, from {', '.join(BASES)}")
    parser.add_argument("--scans", type=int, default=8, help="synthetic B-scans per inference.py run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (and cores for taskset)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the minimum is reported")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="inference.py --precision (bf16: native only)"
    )
    args = parser.parse_args(argv)
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    for base in args.bases:
        if base not in BASES:
            parser.error(f"--bases: unknown {base!r}; use {', '.join(BASES)}")
    torch.set_num_threads(args.threads)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    rows = run(args)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
