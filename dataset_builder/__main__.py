"""Command line: ``python -m dataset_builder {synthetic,folder,nnunet,duke-mat,retouch,volume} ...`` (also ``octsam-build-dataset``)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from dataset_builder.splits import parse_fractions
from octsam.errors import OctSamError, cli_main
from octsam.folders import printable, sigterm_as_interrupt
from octsam.options import Positive, Range, arg_type

_COUNT = arg_type(int, Range(1), "int")  # the constraint table's types: argparse names the option in its message
_SEED = arg_type(int, Range(0), "int")

EPILOG = """examples:
  python -m dataset_builder synthetic --disease amd --num-patients 20 --scans-per-patient 4 --seed 0 --output data/amd_synth
  python -m dataset_builder folder --images ../shared/data/duke_dme_fluid/images --masks ../shared/data/duke_dme_fluid/masks \\
      --labels background,fluid --patient-regex 'duke_s(\\d+)_' --disease dme --output data/duke_dme
  python -m dataset_builder nnunet --input nnUNet_raw/Dataset501_OCT --patient-regex '^(\\w+?)_' --output data/oct501
load the result with octsam.data.load_oct_dataset(PATH or ORG/NAME)"""


def _size(text: str) -> tuple[int, int] | int:
    try:
        if "x" in text.lower():
            width, height = (int(v) for v in text.lower().split("x"))
            return (width, height)
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 512x496) or a height, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--output", help="dataset folder to write (DatasetDict.save_to_disk); must not exist")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it is an existing dataset folder")
    out.add_argument("--push-to-hub", metavar="ORG/NAME", help="also push the dataset and its card to the Hub")
    out.add_argument("--private", action="store_true", help="create the Hub dataset repo as private")
    sp = common.add_argument_group("split (by patient)")
    sp.add_argument(
        "--split-fractions",
        dest="split",
        default="0.7,0.15,0.15",
        help="train,validation,test fractions of patients (default 0.7,0.15,0.15)",
    )
    # --split is a split name in every other command; the old spelling of the fractions stays accepted, unlisted.
    sp.add_argument("--split", dest="split", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sp.add_argument("--seed", type=_SEED, default=0, help="seed of the split (and of synthetic drawing); default 0")
    sp.add_argument(
        "--split-file", help='JSON {"train": [patient ids], "validation": [...], "test": [...]} to use instead'
    )
    sp.add_argument(
        "--folds",
        type=arg_type(int, Range(2), "int"),
        metavar="K",
        help="patient-level K-fold cross-validation: builds OUTPUT/fold-0 .. fold-(K-1), each patient in exactly one "
        "test fold, the next fold as validation (early stopping), the rest train; folds.json records the folds",
    )
    sp.add_argument("--fold", type=_SEED, metavar="k", help="with --folds: build only fold k into --output")

    parser = argparse.ArgumentParser(
        prog="python -m dataset_builder",
        description="Turn OCT B-scans and masks into an octsam dataset (Hugging Face DatasetDict, split by patient).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="SOURCE")

    syn = sub.add_parser("synthetic", parents=[common], help="realistic synthetic B-scans (demos and tests)")
    syn.add_argument("--disease", required=True, choices=["amd", "macular_hole"])
    syn.add_argument("--num-patients", type=_COUNT, required=True)
    syn.add_argument("--scans-per-patient", type=_COUNT, required=True)
    syn.add_argument(
        "--size", type=_size, help="WIDTHxHEIGHT of every B-scan, or a height (default: vendor-like sizes vary)"
    )
    syn.add_argument(
        "--lesion-scale",
        type=arg_type(float, Positive(), "float"),
        default=1.0,
        help="AMD lesion size factor (default 1 = typical sizes; demo: 2)",
    )

    meta = argparse.ArgumentParser(add_help=False)
    meta.add_argument(
        "--patient-regex", help="regex whose first group is the patient id (default: one patient per file)"
    )
    meta.add_argument("--disease", default="unknown", help="disease name stored with every B-scan, e.g. amd, dme")
    meta.add_argument(
        "--source", dest="source_name", help="source name stored with every B-scan (default: the dataset folder name)"
    )
    meta.add_argument("--license", default="unknown", help="licence id for the dataset card, e.g. cc-by-4.0")
    meta.add_argument("--citation", default="", help="citation text for the dataset card")

    fol = sub.add_parser("folder", parents=[common, meta], help="a folder of images and a folder of masks")
    fol.add_argument("--images", required=True, help="folder of B-scans (PNG, JPEG, TIFF, BMP)")
    fol.add_argument("--masks", required=True, help="folder of masks with the same file names (any extension)")
    fol.add_argument("--labels", help="class names by mask value, e.g. background,fluid (required for index masks)")
    fol.add_argument("--palette", help="colour masks: amd, macular_hole or a JSON file {name: [R, G, B]}")

    nnu = sub.add_parser("nnunet", parents=[common, meta], help="an nnU-Net raw dataset folder")
    nnu.add_argument("--input", required=True, help="folder with dataset.json, imagesTr/, labelsTr/")

    spacing = argparse.ArgumentParser(add_help=False)
    spacing.add_argument(
        "--spacing", metavar="AXIAL,LATERAL,BSCAN", help="spacing in mm, overriding the file's (or the data set's)"
    )
    duke = sub.add_parser(
        "duke-mat", parents=[common, meta, spacing], help="Duke DME .mat volumes (images + manualFluid1/2)"
    )
    duke.add_argument("--input", required=True, help="folder of Duke .mat files (Subject_01.mat ...) or one file")
    duke.add_argument("--grader", type=int, choices=[1, 2], default=1, help="whose fluid masks: manualFluid1 or 2")
    duke.set_defaults(disease="dme")
    ret = sub.add_parser("retouch", parents=[common, meta, spacing], help="RETOUCH volumes (oct.mhd + reference.mhd)")
    ret.add_argument("--input", required=True, help="folder searched for case folders with oct.mhd and reference.mhd")
    vol = sub.add_parser(
        "volume", parents=[common, meta, spacing], help="eyepy .eye volumes with area (pixel) annotations"
    )
    vol.add_argument("--input", required=True, help="an .eye file or a folder of them")
    return parser


def run(args: argparse.Namespace, command: str = "") -> None:
    """Run one parsed command (for ``--folds K`` without ``--fold``: once per fold, into OUTPUT/fold-k)."""
    if args.output is None and args.push_to_hub is None:
        raise OctSamError("pass --output DIR (and/or --push-to-hub ORG/NAME).")
    if args.fold is not None and args.folds is None:
        raise OctSamError("--fold k needs --folds K.")
    if args.folds is not None and args.split_file is not None:
        raise OctSamError("--folds and --split-file both choose the splits; give one.")
    if args.folds is not None and args.fold is None:
        if args.output is None or args.push_to_hub is not None:
            raise OctSamError("--folds K without --fold writes K datasets under --output (no --push-to-hub).")
        root = Path(args.output)
        for fold in range(args.folds):
            one = argparse.Namespace(**{**vars(args), "fold": fold, "output": str(root / f"fold-{fold}")})
            _run_one(one, command)
        _write_folds_file(root, args.folds)
        return
    _run_one(args, command)


def build_record(args: argparse.Namespace) -> dict:
    """What makes two builds the same: every option but where it goes (--output, --overwrite, the Hub), with input
    paths made absolute - as a SHA-256 digest, so no path of this machine is written into the dataset. Written into
    the dataset (``build.json``); the same command run again keeps a complete output with an equal record instead of
    refusing it."""
    import hashlib
    import json

    skip = {"output", "overwrite", "push_to_hub", "private"}
    options = {}
    for key, value in sorted(vars(args).items()):
        if key in skip:
            continue
        if key in ("images", "masks", "input", "split_file") and value is not None:
            value = os.path.abspath(os.path.expanduser(value))
        if key == "palette" and value is not None and os.path.exists(value):
            value = os.path.abspath(value)
        options[key] = list(value) if isinstance(value, tuple) else value
    text = json.dumps(options, sort_keys=True, default=str)
    return {"build_command_sha256": hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()}


def _write_folds_file(root: Path, folds: int) -> None:
    """``folds.json``: every patient's test fold (read back from the folds' own split files), written atomically
    (its presence says the K-fold build is complete)."""
    import json

    fold_of = {}
    for fold in range(folds):
        splits = json.loads((root / f"fold-{fold}" / "splits.json").read_text())
        fold_of.update({patient: fold for patient in splits["test"]})
    table = {"folds": folds, "validation": "the next fold (k + 1 mod K)", "test_fold_of_patient": fold_of}
    tmp = root / f".folds.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        os.replace(tmp, root / "folds.json")
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {folds} folds under {root} (folds.json: each patient's test fold)")


def _run_one(args: argparse.Namespace, command: str) -> None:
    from dataset_builder.writer import built_by, recording

    record = build_record(args)
    if args.output is not None and not args.overwrite and args.push_to_hub is None:
        from octsam.folders import recover

        out = recover(args.output)
        if built_by(out, record):  # the same command finished this output before (a rerun after a kill)
            print(f"{out} was already built by this same command: kept (pass --overwrite to build it again).")
            return
    with recording(record):
        _run_builder(args, command)


def _run_builder(args: argparse.Namespace, command: str) -> None:
    common = dict(
        split=parse_fractions(args.split),
        seed=args.seed,
        split_file=args.split_file,
        folds=(args.folds, args.fold) if args.folds is not None else None,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
        command=command,
    )
    if args.kind == "synthetic":
        from dataset_builder.synthetic import build_synthetic

        result = build_synthetic(
            args.disease,
            args.num_patients,
            args.scans_per_patient,
            output=args.output,
            size=args.size,
            lesion_scale=args.lesion_scale,
            **common,
        )
    elif args.kind == "folder":
        from dataset_builder.folder import build_folder

        result = build_folder(
            args.images,
            args.masks,
            args.output,
            labels=args.labels,
            palette=args.palette,
            patient_regex=args.patient_regex,
            disease=args.disease,
            source=args.source_name,
            license=args.license,
            citation=args.citation,
            **common,
        )
    elif args.kind in ("duke-mat", "retouch", "volume"):
        from dataset_builder import volumes

        extra = {"grader": args.grader} if args.kind == "duke-mat" else {}
        builder = {
            "duke-mat": volumes.build_duke_mat,
            "retouch": volumes.build_retouch,
            "volume": volumes.build_volume_files,
        }[args.kind]
        result = builder(
            args.input,
            args.output,
            spacing=args.spacing,
            patient_regex=args.patient_regex,
            disease=args.disease,
            source=args.source_name,
            license=args.license,
            **({"citation": args.citation} if args.citation else {}),
            **extra,
            **common,
        )
    else:
        from dataset_builder.nnunet import build_nnunet

        result = build_nnunet(
            args.input,
            args.output,
            patient_regex=args.patient_regex,
            disease=args.disease,
            source=args.source_name,
            license=args.license,
            citation=args.citation,
            **common,
        )
    print(result.table)
    print(f"labels: {', '.join(f'{i} {n}' for i, n in enumerate(result.labels))}")
    if result.output is not None:
        print(f"wrote {result.output}")
    if result.repo_id is not None:
        print(f"pushed https://huggingface.co/datasets/{result.repo_id}")


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one message (no traceback) and return exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("datasets").setLevel(logging.WARNING)
    try:
        with sigterm_as_interrupt():
            run(args, command="python -m dataset_builder " + _public_command(argv))
    except KeyboardInterrupt:
        print("interrupted; nothing was written (the partial build was removed).", file=sys.stderr)
        return 130
    return 0


def _public_command(argv: list[str]) -> str:
    """The command for the dataset card, with absolute paths reduced to their last part (no paths of this machine)."""
    shown = []
    for arg in argv:
        if os.path.isabs(os.path.expanduser(arg)):
            arg = os.path.basename(os.path.normpath(arg)) or arg
        shown.append(printable(arg))
    return shlex.join(shown)


if __name__ == "__main__":
    sys.exit(main())
