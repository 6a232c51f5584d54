"""End-to-end inference: ``inference.py`` on a folder of synthetic 768 x 496 PNG B-scans, time per B-scan by stage.

Writes ``--scans`` synthetic B-scans (speckled layers, ~480 KB PNGs; ``benchmarks.throughput.fake_bscan``, 32
distinct ones repeated) to a temporary folder, builds a random adapter (LoRA r16 on ``qkv``, 4 classes) on a
random base (``vit-base``: SAM ViT-B at 1024, ``SamConfig()`` defaults; ``tiny``: the tests' 2-layer SAM, where the
model costs almost nothing and the table shows what reading and writing alone sustain; or ``--base`` any SamModel
folder/Hub id), runs ``octsam.cli.infer.main`` as a user would and reads ``run.json``.

Table: per B-scan, reading (decode + resize, summed over the reader threads), prediction (main thread: model,
upsampling, index mask), writing (mask PNG, overlay + legend PNG, areas, summed over the writer threads), the main
thread's waits for readers and writers, B-scans/s overall and in steady state (after the first batch, which holds
the compilation of a compiled run), model load and compile seconds; then one B-scan's writer cost by part.

    python benchmarks/end_to_end.py --model tiny --scans 64                 # CPU, seconds: reader/writer bound
    python benchmarks/end_to_end.py --model vit-base --scans 4 --device cpu # CPU, ~1-2 min on 2 cores
    python benchmarks/end_to_end.py --model vit-base --scans 2000           # H100/H200: the issue-13 figure

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402

LABELS = ["background", "intraretinal fluid", "subretinal fluid", "PED"]


def write_scans(folder: Path, count: int) -> None:
    """``count`` synthetic 768 x 496 B-scans as PNGs named ``bscan_00001.png`` ... (32 distinct images)."""
    import cv2

    from benchmarks.throughput import fake_bscan

    rng = np.random.default_rng(0)
    distinct = [cv2.imencode(".png", fake_bscan(rng)[0])[1].tobytes() for _ in range(min(32, count))]
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: (folder / f"bscan_{i + 1:05d}.png").write_bytes(distinct[i % len(distinct)]), range(count)
            )
        )


def make_base(model: str, folder: Path) -> str:
    import torch
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    if model == "tiny":
        from octsam.models.sam import make_sam_config

        config = make_sam_config()
    else:
        config = SamConfig()
    SamModel(config).save_pretrained(folder)
    return str(folder)


def make_adapter(base: str, folder: Path) -> str:
    import torch

    from octsam.adapter import OctSamConfig
    from octsam.models.sam import OctSamModel

    model = OctSamModel.from_base(OctSamConfig(labels=LABELS, base_model=base), seed=0)
    with torch.no_grad():  # a non-identity LoRA and a decoder that predicts some of every class
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(folder)
    return str(folder)


def writer_parts(reps: int = 5) -> list[tuple[str, float]]:
    """CPU ms of each part of writing one 768 x 496 B-scan with 3 classes (process CPU time, one thread)."""
    import io

    import cv2
    from PIL import Image

    from benchmarks.throughput import fake_bscan
    from octsam.colors import overlay
    from octsam.infer.outputs import PNG_LEVEL, class_areas, overlay_with_legend

    image, blob = fake_bscan(np.random.default_rng(1))
    mask = blob.copy()
    mask[300:340, 100:200], mask[50:60, 600:700] = 2, 3
    rendered = overlay_with_legend(image, mask, LABELS)

    def cpu_ms(fn) -> float:
        fn()
        t = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - t) / reps * 1e3

    def cv2_png(a):
        return cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])

    def pil_png(a):
        return Image.fromarray(a).save(io.BytesIO(), format="PNG")

    return [
        ("class overlay (numpy + OpenCV erosion)", cpu_ms(lambda: overlay(image, mask, LABELS))),
        ("overlay + legend strip (cached)", cpu_ms(lambda: overlay_with_legend(image, mask, LABELS))),
        (f"overlay PNG, OpenCV zlib level {PNG_LEVEL} (written)", cpu_ms(lambda: cv2_png(rendered))),
        ("overlay PNG, PIL default level 6 (before)", cpu_ms(lambda: pil_png(rendered))),
        (f"mask PNG, OpenCV level {PNG_LEVEL}", cpu_ms(lambda: cv2_png(mask))),
        ("areas + components (OpenCV)", cpu_ms(lambda: class_areas(mask, len(LABELS)))),
    ]


def hardware(device: str) -> str:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{cpu_name()}, {cpus} CPUs"
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; {cpu}"
    return cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "vit-base"], default="tiny")
    p.add_argument("--base", default=None, help="a SamModel folder or Hub id to use as the base instead")
    p.add_argument("--scans", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--extra", default="", help="more inference.py options, e.g. '--no-compile --write-workers 2'")
    p.add_argument("--keep", default=None, help="write the outputs here instead of a temporary folder")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    from octsam.cli.infer import main as infer_main

    with tempfile.TemporaryDirectory(prefix="octsam-e2e-") as tmp:
        tmp = Path(tmp)
        log(f"writing {args.scans} synthetic 768x496 PNG B-scans")
        write_scans(tmp / "scans", args.scans)
        base = args.base or make_base(args.model, tmp / "base")
        adapter = make_adapter(base, tmp / "adapter")
        out = Path(args.keep) if args.keep else tmp / "out"
        cli = ["--adapter", adapter, "--input", str(tmp / "scans"), "--output", str(out), "--overwrite", "--quiet"]
        cli += ["--device", args.device] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        cli += args.extra.split()
        log("inference.py " + " ".join(cli))
        t0 = time.perf_counter()
        code = infer_main(cli)
        wall = time.perf_counter() - t0
        record = json.loads((out / "run.json").read_text())
    t = record["timings"]
    ms = lambda v: "-" if v is None else f"{1e3 * v:.1f}"  # noqa: E731 (seconds -> ms)
    done = record["segmented"]
    per = lambda key: t[key] / done if done else None  # noqa: E731
    lines = [
        f"End to end, `inference.py` on {args.scans} synthetic 768 x 496 PNG B-scans, base "
        f"{args.base or args.model} (random weights), {record['device_name']}; {hardware(record['device'])}; "
        f"batch {record['batch_size']}, {record['read_workers']} reader / {record['write_workers']} writer threads, "
        f"attention {record['attention']}, compiled {record['compiled']} ({record['compile_reason']}), "
        f"exit status {code}, {wall:.1f} s wall in all, 1-minute load average {os.getloadavg()[0]:.1f}:",
        "",
        "| B-scans | read ms/scan (CPU) | predict ms/scan | write ms/scan (CPU) | wait read ms/scan "
        "| wait write ms/scan | B-scans/s | steady B-scans/s | write CPU share | load s | compile s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    segment_per_scan = t["segment_s"] / done if done else None
    share = t["write_cpu_s_per_scan"] / segment_per_scan if done and segment_per_scan else None
    lines.append(
        f"| {done} | {ms(t['read_s_per_scan'])} ({ms(t['read_cpu_s_per_scan'])}) | {ms(t['predict_s_per_scan'])} | "
        f"{ms(t['write_s_per_scan'])} ({ms(t['write_cpu_s_per_scan'])}) | "
        f"{ms(per('wait_read_s'))} | {ms(per('wait_write_s'))} | {t['scans_per_s']} | {t['steady_scans_per_s']} | "
        f"{'-' if share is None else f'{share:.1%}'} | {t['load_s']:.1f} | "
        f"{ms(t['compile_s'] and t['compile_s'] / 1e3)} |"
    )
    lines += [
        "",
        "read / write ms/scan: work summed over the reader / writer workers, wall (and the workers' own CPU time, "
        "which other load on the machine does not inflate); predict: the main thread; wait: the main thread blocked "
        "on readers / writers; write CPU share: write CPU ms over the wall ms per B-scan (segment_s / B-scans).",
        "",
        "One B-scan's writer cost by part (process CPU ms, one thread):",
        "",
        "| part | CPU ms |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {value:.1f} |" for name, value in writer_parts()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
