"""LiteMedSAM on the CPU: PyTorch fp32 vs ONNX Runtime fp32 (fused, int8, the torch-free runner), side by side.

On the 110 Duke DME B-scans (768 x 496), one LiteMedSAM adapter (automatic mode, fluid) is run end to end per B-scan -
reading the PNG, resizing, encoding, decoding, upsampling to the B-scan and the index mask - by each variant in turn
(round robin per B-scan, so that a loaded, shared CPU slows all variants alike):

- ``torch-fp32``: ``Segmenter.from_pretrained`` (LoRA merged, BatchNorm fused, octsam's fast attention), the baseline;
- ``onnxruntime-fp32``: ``Segmenter(OnnxModel.load(folder))`` on the ``octsam-export`` folder (``--engine
  onnxruntime``);
- ``onnxruntime-fp32-fused``: the same folder after ``onnxruntime.transformers``' graph fusions (``optimize_model``,
  fp32: GELU's erf pattern -> ``Gelu``, LayerNorm and residual + LayerNorm -> ``SkipLayerNormalization``; contrib
  ops, so these graphs run on ONNX Runtime only), what ``octsam-export --fuse-for-onnxruntime`` writes; the encoder
  output moved by 1.8e-6 relative, and took 12-15 % less CPU in exploratory runs;
- ``onnxruntime-int8-matmul``: the fused graphs with the weights of the matrix products (``MatMul``/``Gemm``, not
  the convolutions) quantised to int8 by ``quantize_dynamic`` (per tensor, activations quantised per call): ~20 %
  less encoder CPU than fp32-fused in exploratory runs but the embedding moves by up to 0.2 relative, so it changes
  masks; offered only with the pixel agreement and Dice change this benchmark measures;
- ``onnxruntime-int8`` (only with ``--variants``): every graph's weights quantised (convolutions too, per-channel);
  on 4 B-scans it was slower than fp32 and changed 40 % of the pixels (benchmarks/results/onnx_cpu_int8_smoke), so
  it is not offered and not in the default run;
- ``runner-fp32``: ``deploy/onnx_segment.py``'s functions (numpy + onnxruntime, no torch) on the fp32 folder.

``--provider cuda`` (on a GPU machine) runs torch-fp32 on the GPU and the ONNX Runtime variants with
``CUDAExecutionProvider`` (``pip install onnxruntime-gpu`` in place of ``onnxruntime``); the runner stays on the CPU
and is left out. No GPU was lent to the task that wrote this: the CUDA provider has not been measured.

Per variant: seconds per B-scan (median and mean; and the process CPU seconds, which a loaded machine inflates
less than the wall time), pixels identical to torch-fp32, and fluid Dice against the
grader's masks with its change from torch-fp32. The adapter is the pretrained LiteMedSAM with a seeded, perturbed
LoRA on qkv (not a trained adapter: no trained LiteMedSAM adapter is stored here), so Dice is low; what is measured
is how much each engine changes the masks and the time. Writes ``--out``: ``run_log.txt``, ``per_bscan.csv``,
``summary.json``, ``table.md`` and ``env.json`` (CPU, versions, git commit, command, load averages: the CPU is
shared, timings are as noisy as the load says).

    python benchmarks/onnx_cpu.py                    # 110 B-scans, 2 threads, benchmarks/results/onnx_cpu
    python benchmarks/onnx_cpu.py --provider cuda --out benchmarks/results/onnx_cuda   # on a GPU
    python benchmarks/onnx_cpu.py --scans 5 --out /tmp/onnx_smoke --variants torch-fp32,onnxruntime-fp32,onnxruntime-int8
    python benchmarks/onnx_cpu.py --max-minutes 50   # stop measuring after 50 minutes (B-scans interleave patients)

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402

DUKE = REPO.parent / "shared" / "data" / "duke_dme_fluid"
VARIANTS = (
    "torch-fp32",
    "onnxruntime-fp32",
    "onnxruntime-fp32-fused",
    "onnxruntime-int8-matmul",
    "onnxruntime-int8",
    "runner-fp32",
)
DEFAULT_VARIANTS = (
    "torch-fp32",
    "onnxruntime-fp32",
    "onnxruntime-fp32-fused",
    "onnxruntime-int8-matmul",
    "runner-fp32",
)


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    p, t = pred == 1, truth == 1
    total = p.sum() + t.sum()
    return None if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def make_adapter(folder: Path, seed: int = 0) -> Path:
    """The pretrained LiteMedSAM with LoRA (qkv) B weights drawn at random: an adapter whose LoRA is not the identity."""
    import torch

    from octsam.adapter import OctSamConfig
    from octsam.models.sam import OctSamModel

    config = OctSamConfig(labels=["background", "fluid"], base_model="litemedsam", lora_target_modules=["qkv"])
    model = OctSamModel.from_base(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    return folder


def quantise(folder: Path, target: Path) -> Path:
    """A copy of the ONNX folder with every graph's weights in int8 (dynamic quantisation), metadata kept."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(folder, target)
    spec = json.loads((folder / "octsam_onnx.json").read_text())
    for name in spec["graphs"].values():
        quantize_dynamic(folder / name, target / name, weight_type=QuantType.QInt8, per_channel=True)
        model = onnx.load(str(target / name))
        source = {p.key: p.value for p in onnx.load(str(folder / name), load_external_data=False).metadata_props}
        present = {p.key for p in model.metadata_props}
        for key, value in source.items():
            if key not in present:
                model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(target / name))
    spec["quantisation"] = "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, per_channel=True)"
    (target / "octsam_onnx.json").write_text(json.dumps(spec, indent=2))
    return target


def quantise_matmuls(folder: Path, target: Path) -> Path:
    """A copy of the ONNX folder whose MatMul/Gemm weights are int8 (dynamic quantisation, per tensor), then fused as
    ``octsam-export --fuse-for-onnxruntime`` does (quantising first: the fused graph's contrib ops stop the
    quantiser's shape inference)."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from octsam.export.onnx import fuse_for_onnxruntime

    staging = target.with_name(target.name + ".unfused")
    shutil.copytree(folder, staging)
    spec = json.loads((folder / "octsam_onnx.json").read_text())
    for name in spec["graphs"].values():
        quantize_dynamic(
            folder / name, staging / name, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    spec["quantisation"] = "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, MatMul/Gemm only)"
    (staging / "octsam_onnx.json").write_text(json.dumps(spec, indent=2))
    fuse_for_onnxruntime(staging, target)
    shutil.rmtree(staging)
    return target


def load_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_segment", REPO / "deploy" / "onnx_segment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_record(args, started_load) -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    def version(name):
        import importlib.metadata

        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    return {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "loadavg_at_start": list(started_load),
        "loadavg_at_end": list(os.getloadavg()),
        "load_note": "the 2-core machine was shared with other jobs during the run: timings are noisy, the load "
        "averages above say how loaded it was (a quiet machine has a load average near 0)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "transformers": version("transformers"),
        "numpy": np.__version__,
        "octsam_git_commit": commit.strip(),
        "git_dirty": bool(dirty.strip()),
        "gpu": "none (no GPU on this machine: onnxruntime's CUDA provider was not measured)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DUKE), help="Duke DME folder (images/, masks/).")
    p.add_argument("--scans", type=int, default=None, help="Only the first N B-scans (default: all 110).")
    p.add_argument("--threads", type=int, default=2, help="Threads of torch and of ONNX Runtime (default 2).")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"Comma-separated, of {', '.join(VARIANTS)} (default: all but int8, which changes masks).",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="Stop after this many minutes of measuring and report the B-scans done (a loaded, shared CPU).",
    )
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu (default), or cuda: torch on the GPU and ONNX Runtime's CUDAExecutionProvider (needs onnxruntime-gpu).",
    )
    p.add_argument("--adapter", default=None, help="Use this LiteMedSAM adapter folder instead of making one.")
    p.add_argument("--onnx", default=None, help="Use this export of --adapter instead of exporting it again.")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "onnx_cpu"), help="Result folder.")
    args = p.parse_args(argv)
    started_load = os.getloadavg()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.provider == "cuda" and "runner-fp32" in variants:
        variants.remove("runner-fp32")  # the torch-free runner is the CPU deployment
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def note(message: str) -> None:
        log(message)
        log_lines.append(f"[{time.strftime('%H:%M:%S')}] {message}")

    import torch
    from PIL import Image

    from octsam.export.onnx import export_onnx, fuse_for_onnxruntime
    from octsam.export.runtime import OnnxModel, import_onnxruntime
    from octsam.segmenter import Segmenter

    device = "cuda" if args.provider == "cuda" else "cpu"
    providers = ["CPUExecutionProvider"]
    if args.provider == "cuda":
        available = import_onnxruntime().get_available_providers()
        if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
            p.error(f"--provider cuda needs a GPU and onnxruntime-gpu (ONNX Runtime has {', '.join(available)})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    torch.set_num_threads(args.threads)
    # patients interleaved (s01_b10, s02_b10, ...): a run stopped by --max-minutes still covers every patient
    images = sorted((Path(args.data) / "images").glob("*.png"), key=lambda p: (p.stem.split("_b")[-1], p.stem))
    images = images[: args.scans]
    note(f"{len(images)} B-scans, {args.threads} threads, {args.provider}, CPU {cpu_name()}, load {started_load}")
    work = Path(tempfile.mkdtemp(prefix="onnx_cpu_"))
    adapter = Path(args.adapter) if args.adapter else make_adapter(work / "adapter")
    t = time.perf_counter()
    folder = Path(args.onnx) if args.onnx else export_onnx(adapter, work / "onnx")
    export_s = None if args.onnx else time.perf_counter() - t
    spec = json.loads((folder / "octsam_onnx.json").read_text())
    note(
        f"exported in {export_s or 0:.0f} s; export check (max relative difference): {spec['export_check_max_relative_difference']}"
    )

    def ort_engine(onnx_folder: Path):
        model = OnnxModel.load(onnx_folder, providers=providers, threads=args.threads)
        return Segmenter(model, device=device, batch_size=1)

    engines: dict = {}
    if "torch-fp32" in variants:
        engines["torch-fp32"] = Segmenter.from_pretrained(adapter, device=device, batch_size=1, precision="fp32")
    if "onnxruntime-fp32" in variants:
        engines["onnxruntime-fp32"] = ort_engine(folder)
    if "onnxruntime-fp32-fused" in variants:
        t = time.perf_counter()
        fused = fuse_for_onnxruntime(folder, work / "onnx-fused")
        note(f"fused in {time.perf_counter() - t:.0f} s")
        engines["onnxruntime-fp32-fused"] = ort_engine(fused)
    if "onnxruntime-int8-matmul" in variants:
        t = time.perf_counter()
        quantised = quantise_matmuls(folder, work / "onnx-int8-matmul")
        note(f"quantised (MatMul/Gemm) and fused in {time.perf_counter() - t:.0f} s")
        engines["onnxruntime-int8-matmul"] = ort_engine(quantised)
    if "onnxruntime-int8" in variants:
        t = time.perf_counter()
        quantised = quantise(folder, work / "onnx-int8")
        note(f"quantised in {time.perf_counter() - t:.0f} s")
        engines["onnxruntime-int8"] = ort_engine(quantised)
    for variant, engine in engines.items():
        if variant.startswith("onnxruntime"):
            note(f"{variant}: providers {engine.model.providers}")
    runner = None
    if "runner-fp32" in variants:
        runner = load_runner()
        runner_spec, runner_sessions = runner.load_model(folder, args.threads)

    def predict(variant: str, path: Path) -> np.ndarray:
        if variant == "runner-fp32":
            return runner.segment(runner.read_bscan(path), runner_spec, runner_sessions)
        return engines[variant]([path])[0].mask

    for variant in variants:  # warm-up: first calls allocate and pick kernels
        for path in images[:2]:
            predict(variant, path)
    rows = []
    measuring = time.perf_counter()
    done = 0
    for i, path in enumerate(images):
        if args.max_minutes is not None and time.perf_counter() - measuring > 60 * args.max_minutes:
            note(f"stopped after {args.max_minutes:g} minutes (--max-minutes): {i} of {len(images)} B-scans measured")
            break
        done = i + 1
        truth = np.asarray(Image.open(Path(args.data) / "masks" / path.name))
        masks, seconds, cpu = {}, {}, {}
        for variant in variants:
            t, c = time.perf_counter(), time.process_time()
            masks[variant] = predict(variant, path)
            seconds[variant] = time.perf_counter() - t
            cpu[variant] = time.process_time() - c
        reference = masks.get("torch-fp32")
        for variant in variants:
            mask = masks[variant]
            rows.append(
                {
                    "bscan": path.stem,
                    "variant": variant,
                    "seconds": round(seconds[variant], 4),
                    "cpu_seconds": round(cpu[variant], 4),
                    "identical_to_torch_fp32": None if reference is None else float((mask == reference).mean()),
                    "fluid_dice": dice(mask, truth),
                    "fluid_px": int((mask == 1).sum()),
                    "truth_fluid_px": int((truth == 1).sum()),
                }
            )
        if i % 10 == 0 or i == len(images) - 1:
            note(f"{i + 1}/{len(images)} {path.stem}: " + ", ".join(f"{v} {seconds[v]:.3f} s" for v in variants))

    with (out / "per_bscan.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {}
    base_dice = {r["bscan"]: r["fluid_dice"] for r in rows if r["variant"] == "torch-fp32"}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        times = [r["seconds"] for r in mine]
        pairs = [(r["fluid_dice"], base_dice.get(r["bscan"])) for r in mine]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        identical = [r["identical_to_torch_fp32"] for r in mine if r["identical_to_torch_fp32"] is not None]
        summary[variant] = {
            "bscans": len(mine),
            "median_s": round(statistics.median(times), 4),
            "mean_s": round(statistics.fmean(times), 4),
            "p90_s": round(float(np.percentile(times, 90)), 4),
            "median_cpu_s": round(statistics.median(r["cpu_seconds"] for r in mine), 4),
            "identical_pixels_pct": None if not identical else round(100 * float(np.mean(identical)), 4),
            "min_identical_pixels_pct": None if not identical else round(100 * float(np.min(identical)), 4),
            "mean_fluid_dice": round(float(np.mean([a for a, _ in pairs])), 4) if pairs else None,
            "mean_dice_change": round(float(np.mean([a - b for a, b in pairs])), 5) if pairs else None,
            "max_abs_dice_change": round(float(np.max([abs(a - b) for a, b in pairs])), 5) if pairs else None,
        }
    base = summary.get("torch-fp32", {}).get("median_s")
    header = (
        "| variant | s per B-scan (median) | mean | p90 | CPU s per B-scan (median) | speed-up vs torch fp32 | "
        "pixels identical to torch fp32 (mean / worst B-scan) | fluid Dice | Dice change (mean / largest) |"
    )
    lines = [header, "|" + " --- |" * 9]
    for variant, s in summary.items():
        speedup = f"{base / s['median_s']:.2f}x" if base else "-"
        identical = (
            f"{s['identical_pixels_pct']:.3f} % / {s['min_identical_pixels_pct']:.3f} %"
            if s["identical_pixels_pct"] is not None
            else "-"
        )
        change = (
            f"{s['mean_dice_change']:+.5f} / {s['max_abs_dice_change']:.5f}"
            if s["mean_dice_change"] is not None
            else "-"
        )
        lines.append(
            f"| {variant} | {s['median_s']:.3f} | {s['mean_s']:.3f} | {s['p90_s']:.3f} | {s['median_cpu_s']:.3f} | "
            f"{speedup} | {identical} | "
            f"{s['mean_fluid_dice']} | {change} |"
        )
    table = "\n".join(lines)
    env = env_record(args, started_load)
    env["provider"] = args.provider
    if args.provider == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["onnxruntime_providers"] = providers
    env["export_seconds"] = None if export_s is None else round(export_s, 1)
    env["export_check_max_relative_difference"] = spec["export_check_max_relative_difference"]
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(
        f"LiteMedSAM adapter, {done} of {len(images)} Duke B-scans (768 x 496), end to end per B-scan, {args.threads} threads, "
        f"{env['gpu'] if args.provider == 'cuda' else 'CPU only'}, "
        f"{env['cpu']}; load average {started_load[0]:.1f} at start, {env['loadavg_at_end'][0]:.1f} at end.\n\n"
        + table
        + "\n"
    )
    note("done; load average at end " + str(env["loadavg_at_end"]))
    (out / "run_log.txt").write_text("\n".join(log_lines) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
