"""Write measured tables into README.md between their markers, so that README numbers always come from a run.

    python benchmarks/update_readme.py --demo demo_output/results --cv outputs/duke_cv

``--demo``: the results folder of ``make demo`` (its ``comparison.json`` and ``demo_seconds.txt`` if present);
``--cv``: the work folder of ``benchmarks/duke_cv.py`` (its ``cv_table.md`` and ``cv_results.json``), written into
the block ``--cv-block`` (``duke-cv``: the GPU run; ``duke-cv-cpu``: the CPU run) of README.md and
benchmarks/DUKE_RESULTS.md. Each block is replaced between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; nothing
else in the README changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def _shown(path: Path) -> str:
    """``path`` as the README shows it: relative to the repository when inside it."""
    try:
        return Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return Path(path).as_posix()


def demo_block(results: Path) -> str:
    summary = json.loads((results / "comparison.json").read_text())
    labels = summary["labels"][1:]
    lines = [
        "| Method | Mean Dice [95% CI] | " + " | ".join(f"Dice {n}" for n in labels) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for name, entry in summary["methods"].items():
        mean, (low, high) = entry["mean_dice"], entry["mean_dice_ci"]
        ci = f"[{low:.3f}, {high:.3f}]" if low == low and high == high else "[n/a]"
        per = [entry["per_class"][n]["dice_mean"] for n in labels]
        lines.append(
            f"| {name} | {mean:.3f} {ci} | " + " | ".join("n/a" if v != v else f"{v:.3f}" for v in per) + " |"
        )
    seconds = results.parent / "demo_seconds.txt"
    note = (
        f"\n{summary['n_images']} test B-scans of {summary['n_patients']} patients"
        + (f"; the demo ran {float(seconds.read_text()) / 60:.1f} min" if seconds.is_file() else "")
        + f" (`{_shown(results)}/report.md`)."
    )
    return "\n".join(lines) + "\n" + note


def cv_block(work: Path) -> str:
    table = (work / "cv_table.md").read_text().strip()
    results = json.loads((work / "cv_results.json").read_text())
    return f"{table}\n\n{results['hardware']}; the folds column lists the test folds each row pools."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=None)
    parser.add_argument("--cv", type=Path, default=None)
    parser.add_argument(
        "--cv-block",
        default="duke-cv",
        choices=["duke-cv", "duke-cv-cpu", "duke-native-cpu", "duke-native-gpu"],
        help="duke-native-*: the results folder of benchmarks/duke_native_cv.py (--cv benchmarks/results/RUN)",
    )
    args = parser.parse_args(argv)
    readme = REPO / "README.md"
    text = readme.read_text()
    if args.demo is not None:
        text = replace_block(text, "demo-table", demo_block(args.demo))
    if args.cv is not None:
        text = replace_block(text, args.cv_block, cv_block(args.cv))
        results = REPO / "benchmarks" / "DUKE_RESULTS.md"
        if f"<!-- {args.cv_block}:start -->" in results.read_text():
            results.write_text(replace_block(results.read_text(), args.cv_block, cv_block(args.cv)))
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
