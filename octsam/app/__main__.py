"""``python -m octsam.app --adapter ORG/NAME_OR_FOLDER`` (console script ``octsam-app``): start the web app.

Binds 127.0.0.1 unless ``--host`` says otherwise; ``--share`` makes a public Gradio link (only when asked).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from octsam.errors import OctSamError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="octsam-app", description=__doc__.split("\n")[0])
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="adapter folder or Hub repo id; repeat to offer several in the page (the first is the default)",
    )
    p.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "onnxruntime"],
        help="torch: the adapters with PyTorch. onnxruntime: each --adapter names an ONNX folder from octsam-export "
        "(or an adapter folder / Hub repo with onnx/), run with ONNX Runtime (fp32; same masks)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="where to run (default auto)"
    )
    p.add_argument(
        "--open",
        nargs="+",
        default=[],
        metavar="PATH",
        help="B-scan images, folders of them or volume files to open at start (read from this machine)",
    )
    p.add_argument(
        "--auto-segment",
        action="store_true",
        help="segment each B-scan when it is first shown (automatic-mode adapters)",
    )
    p.add_argument("--dataset", help="open the B-scans of an octsam dataset (folder or Hub id) at start")
    p.add_argument("--split", default="test", help="split of --dataset to open (default test)")
    p.add_argument("--limit", type=int, default=None, help="open at most this many B-scans of --dataset")
    p.add_argument(
        "--export-dir",
        default="octsam-exports",
        help="folder under which each export goes to a new export-NNN folder (default ./octsam-exports)",
    )
    p.add_argument("--max-file-size", default="500mb", help="largest upload accepted (default 500mb)")
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    """Load the adapters and the dataset split; OctSamError with a clear message when something is wrong."""
    from octsam.app.loading import dataset_scans, open_local
    from octsam.app.ui import AppConfig
    from octsam.export.runtime import load_segmenter
    from octsam.segmenter import resolve_device

    resolve_device(args.device)  # --device cuda without a GPU: refused before any adapter is loaded
    engine = getattr(args, "engine", "torch")
    adapters = {}
    for name in args.adapter:
        adapters[name] = load_segmenter(engine, name, device=args.device)
    scans, volumes = open_local(args.open) if args.open else ([], [])
    message = f"opened {len(scans)} B-scan(s)" if scans else ""
    first = next(iter(adapters.values()))
    if args.dataset:
        split_scans = dataset_scans(args.dataset, args.split, first.labels, limit=args.limit)
        message = (message + ", " if message else "opened ") + f"{len(split_scans)} of {args.dataset} ({args.split})"
        scans += split_scans
    return AppConfig(
        adapters=adapters,
        export_root=Path(args.export_dir).resolve(),
        initial_scans=scans,
        initial_volumes=volumes,
        auto_segment=args.auto_segment,
        initial_message=message,
        dataset_labels=first.labels if args.dataset else None,
        device=args.device,
        engine=engine,
    )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = load(args)
    except OctSamError as err:
        print(f"octsam-app: {err}", file=sys.stderr)
        return 2
    from octsam.app.ui import build_app

    demo = build_app(config)
    config.export_root.mkdir(parents=True, exist_ok=True)
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        show_error=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
