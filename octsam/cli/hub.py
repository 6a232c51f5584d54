"""``octsam-hub push FOLDER ORG/NAME``: share a trained adapter folder on the Hugging Face Hub (with its card)."""

from __future__ import annotations

import argparse
import sys

from octsam.errors import cli_main
from octsam.hub import push_adapter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octsam-hub", description="Share octsam adapters on the Hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser(
        "push",
        help="Upload an adapter folder to a Hub model repo: its adapter files only (listed first), never other "
        "files, links or pickles.",
    )
    push.add_argument("folder", help="Adapter folder (e.g. runs/amd/best_adapter).")
    push.add_argument("repo_id", help="Hub repo id ORG/NAME (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--revision", default=None, help="Branch to push to (created if missing; default main).")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN).")
    push.add_argument("--commit-message", default="Upload octsam adapter", help="Commit message.")
    push.add_argument("--no-card", action="store_true", help="Upload README.md as it is (no octsam card).")
    push.add_argument(
        "--onnx",
        "--with-onnx",
        dest="onnx",
        action="store_true",
        help="Also send the onnx/ folder of an ONNX export (`octsam-export --adapter FOLDER --output FOLDER/onnx`).",
    )
    push.add_argument(
        "--dry-run", action="store_true", help="List the files a push would send and send nothing (no login needed)."
    )
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``octsam-hub push DIR ORG/NAME`` (also ``python -m octsam.cli.hub``); user errors print without a traceback."""
    args = build_parser().parse_args(argv)
    url = push_adapter(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        card=not args.no_card,
        include_onnx=args.onnx,
        dry_run=args.dry_run,
        show=print,
    )
    if args.dry_run:
        print(f"dry run: nothing was sent to https://huggingface.co/{args.repo_id}")
    else:
        print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
