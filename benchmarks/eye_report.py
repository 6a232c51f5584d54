"""Render the README's example eye report from real B-scans: the 11 annotated Spectralis B-scans of Duke DME
subject 1 (``../shared/data/duke_dme_fluid``) with grader 1's fluid masks as the "prediction".

Only 11 of the volume's 61 B-scans exist there (indices 10-50, uneven), so they are read as a B-scan folder with the
Duke spacing and their mean gap (4 B-scans x 0.123 mm = 0.492 mm): the mm³ shown are an illustration of the report,
not a measurement of this eye.

python benchmarks/eye_report.py [--output benchmarks/eye_report_duke_s01.png]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from octsam.data import read_scan
from octsam.volumes import read_volume
from octsam.volumes.segment import result_from_masks, write_volume_outputs

DUKE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_dme_fluid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DUKE), help="the duke_dme_fluid folder")
    parser.add_argument("--output", default=str(Path(__file__).with_name("eye_report_duke_s01.png")))
    args = parser.parse_args()
    data = Path(args.data)
    names = sorted(p.stem for p in (data / "images").glob("duke_s01_b*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "duke_s01"
        folder.mkdir()
        for name in names:
            shutil.copy(data / "images" / f"{name}.png", folder / f"{name}.png")
        (volume,) = read_volume(folder, spacing="0.00387,0.01133,0.492")
        masks = [read_scan(data / "masks" / f"{name}.png") for name in names]
        result = result_from_masks(volume, masks, ["background", "fluid"])
        out = write_volume_outputs(result, Path(tmp) / "out")
        shutil.copy(out / "report.png", args.output)
    print(
        f"fluid {result.measures.volume_mm3['fluid']:.3f} mm³, {result.measures.lesions['fluid']} lesions -> {args.output}"
    )


if __name__ == "__main__":
    main()
