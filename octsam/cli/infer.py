"""``inference.py`` / ``octsam-infer``: segment B-scans with an adapter and write masks, overlays and areas."""

from __future__ import annotations

import argparse
import sys

from octsam.errors import cli_main
from octsam.folders import sigterm_as_interrupt
from octsam.infer.run import run
from octsam.models import ATTENTION_MODES
from octsam.speed import COMPILE_MIN_SCANS

EPILOG = """examples:
  python inference.py --adapter ORG/NAME --input scans/ --output predictions/
  python inference.py --adapter runs/amd/best_adapter --input "scans/**/*.tif" --output out --pixel-spacing-mm 0.0039,0.0114
  python inference.py --adapter ORG/NAME --dataset ORG/oct-data --split test --output out --save-probabilities
  python inference.py --adapter ORG/NAME --input a.png --output out --box fluid:120,80,300,160 --point fluid:200,120
  python inference.py --adapter cv/fold-0/best_adapter --adapter cv/fold-1/best_adapter --tta flip --input scans/ --output out
  python inference.py --adapter ORG/NAME --input eye.vol --output out          # also .e2e .fda .img .dcm .mat .mhd
  python inference.py --adapter ORG/NAME --input bscans/ --spacing 0.0039,0.0114,0.12 --output out   # one volume

prompts: coordinates are native pixels of each B-scan; CLASS is a label name or id. --box and --point apply to every
input; each box is one object, a point joins the box of its class that contains it, the other points of a class form
one more object. --prompts FILE.json gives prompts per B-scan (keys: output name, file name or stem):
  {"scan1.png": [{"class": "fluid", "box": [120, 80, 300, 160], "points": [[200, 120], [150, 90, 0]]}]}

outputs (native size): masks/NAME.png (class ids), overlays/NAME.png (legend below), probabilities/NAME.npz,
summary.csv (area px / mm2 and 8-connected components per class), run.json. Exit status: 0 all segmented, 1 some
B-scans failed (listed), 2 a usage or adapter error.

whole archives: `accelerate launch [--num_processes N] inference.py ...` splits the inputs across processes (one
device each) into one output; a run that stops keeps its finished part (.OUTPUT.partial) and --resume continues it.
"""


# ------------------------------------------------------------------------------------------------ run
def build_parser() -> argparse.ArgumentParser:
    """inference.py's options, one ``add_argument`` each (long, and flat on purpose: it is the ``--help`` text)."""
    p = argparse.ArgumentParser(
        prog="inference.py",
        description="Segment OCT B-scans with an octsam adapter: masks, overlays, probabilities and biomarker areas.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="Adapter folder or Hub repo id (ORG/NAME); give it several times for an ensemble (e.g. the folds of a "
        "cross-validation): their probabilities are averaged.",
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=["none", "flip"],
        help="Test-time augmentation: flip averages the prediction with that of the left-right mirrored B-scan.",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the adapter.")
    p.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "onnxruntime"],
        help="torch: the adapter with PyTorch. onnxruntime: --adapter names an ONNX folder from octsam-export (or an "
        "adapter folder / Hub repo with onnx/), run with ONNX Runtime (fp32; same masks).",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="Base SAM to use instead of the adapter's (e.g. a local copy of facebook/sam-vit-base for offline use).",
    )
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="Image files, folders (recursive; a dataset folder is read as one), globs.",
    )
    p.add_argument(
        "--spacing",
        default=None,
        metavar="AXIAL,LATERAL,BSCAN",
        help="Volume spacing in mm, for files that lack it; with it a folder of ordered B-scans is one volume.",
    )
    p.add_argument("--dataset", default=None, help="A datasets dataset folder or Hub dataset id to segment.")
    p.add_argument("--split", default="test", help="Split of --dataset (or of a dataset folder in --input).")
    p.add_argument("--dataset-revision", default=None, help="Hub revision of --dataset.")
    p.add_argument("--output", required=True, help="Output folder (created; never overwritten without --overwrite).")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing, non-empty output folder (and discard an interrupted run's finished part).",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted run into --output: only the B-scans / volumes it did not finish are done, and "
        "the outputs equal an uninterrupted run's (nothing to do if --output is complete).",
    )
    p.add_argument("--box", action="append", default=[], metavar="CLASS:x1,y1,x2,y2", help="Box prompt (repeat).")
    p.add_argument("--point", action="append", default=[], metavar="CLASS:x,y[:neg]", help="Point prompt (repeat).")
    p.add_argument("--prompts", default=None, metavar="FILE.json", help="Prompts per B-scan (format below).")
    p.add_argument("--save-probabilities", action="store_true", help="Also write probabilities/NAME.npz.")
    p.add_argument("--pixel-spacing-mm", default=None, metavar="Y,X", help="Pixel size in mm, for areas in mm².")
    p.add_argument("--no-merge", action="store_true", help="Keep LoRA separate (slower; merged is the default).")
    p.add_argument(
        "--batch-size", type=int, default=None, help="B-scans per forward pass (default 16 on CUDA, 1 elsewhere)."
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="Where to run.")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA, fp32 elsewhere. bf16 on a CPU with AVX512-BF16 or AMX runs LiteMedSAM about 1.8x "
        "faster; masks change slightly (benchmarks/RESULTS.md).",
    )
    p.add_argument(
        "--no-fast-attention",
        action="store_true",
        help="Use transformers' own attention instead of octsam's exact fast attention (on by default).",
    )
    p.add_argument(
        "--attention-mode",
        default="auto",
        choices=list(ATTENTION_MODES),
        help="Fast-attention mode (octsam.models.fast_attention): auto picks per device and layer (CUDA: the Triton "
        "kernel where a layer qualifies, the fold elsewhere; CPU: the bias).",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the image encoder (on the CPU with frozen weights). Default: on with CUDA for more "
        f"than {COMPILE_MIN_SCANS} B-scans (compilation takes tens of seconds once), off otherwise; --no-compile "
        "turns it off.",
    )
    p.add_argument(
        "--read-workers",
        type=int,
        default=None,
        help="Threads that read, decode and resize B-scans ahead of the model (default: CPUs, at most 4).",
    )
    p.add_argument(
        "--write-workers",
        type=int,
        default=None,
        help="Workers that write masks, overlays and areas while the model runs (default: CPUs - 4, 1 to 16).",
    )
    p.add_argument(
        "--writer",
        default="auto",
        choices=["auto", "thread", "process"],
        help="Writer workers as threads or processes (auto: processes with a GPU, threads on the CPU).",
    )
    p.add_argument("--quiet", action="store_true", help="No progress bars (also none while loading weights).")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Command line entry (``octsam-infer`` / ``python inference.py``): 0 all done, 1 some B-scans failed, 2 a
    usage error (printed without a traceback)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume / discard commands in messages
    # one name for messages and run.json; the list for loading (an ensemble when several)
    args.adapters, args.adapter = list(args.adapter), " + ".join(args.adapter)
    if args.quiet:  # also the weight-loading bar and notices of transformers / huggingface_hub
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        with sigterm_as_interrupt():
            failed = run(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130
    if failed:
        print(f"error: {failed} B-scan(s) could not be segmented (listed above and in run.json).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
