"""``octsam-export --adapter ORG/NAME_OR_FOLDER --output DIR``: an adapter (or the U-Net) as an ONNX folder.

Also ``python -m octsam.cli.export``. The folder (``octsam.export.spec``) holds the image encoder with LoRA merged, the
prompt encoder + mask decoder in automatic and prompted form, and ``octsam_onnx.json``; run it with
``inference.py --engine onnxruntime --adapter DIR`` or, without torch or octsam, ``deploy/onnx_segment.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from octsam.errors import cli_main

EPILOG = """examples:
  octsam-export --adapter runs/amd/best_adapter --output runs/amd/best_adapter/onnx
  octsam-export --adapter ORG/NAME --output octsam-amd-onnx --overwrite
  python inference.py --engine onnxruntime --adapter octsam-amd-onnx --input scans/ --output predictions/
  python deploy/onnx_segment.py --model octsam-amd-onnx --input scan.png --output scan_mask.png   # torch-free

ONNX Runtime's CUDA provider has not been measured (no GPU was lent); on a GPU with onnxruntime-gpu:
  python benchmarks/onnx_cpu.py --provider cuda --out benchmarks/results/onnx_cuda
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="octsam-export",
        description="Export an octsam adapter (SAM + LoRA, LoRA merged) or U-Net to an ONNX folder for ONNX Runtime.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--adapter", required=True, help="Adapter folder or Hub repo id (ORG/NAME).")
    p.add_argument("--output", required=True, help="ONNX folder to write (written beside it and renamed into place).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing, non-empty output folder.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the adapter.")
    p.add_argument("--base-model", default=None, help="Local copy of the adapter's base (e.g. for offline use).")
    p.add_argument(
        "--fuse-for-onnxruntime",
        action="store_true",
        help="Also apply ONNX Runtime's fp32 graph fusions (GELU, LayerNorm; onnxruntime.transformers): faster on "
        "ONNX Runtime's CPU, still checked against PyTorch, but the graphs then run on ONNX Runtime only.",
    )
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from octsam.export.onnx import export_onnx
    from octsam.export.spec import ONNX_SPEC_NAME

    folder = export_onnx(
        args.adapter,
        args.output,
        overwrite=args.overwrite,
        revision=args.revision,
        base_model=args.base_model,
        fuse=args.fuse_for_onnxruntime,
    )
    spec = json.loads((folder / ONNX_SPEC_NAME).read_text())
    checks = ", ".join(f"{k} {v:.1e}" for k, v in spec["export_check_max_relative_difference"].items())
    print(f"exported {args.adapter} to {folder}: {', '.join(spec['graphs'].values())}, {ONNX_SPEC_NAME}")
    print(f"largest relative difference to PyTorch fp32: {checks} ({spec['export_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
