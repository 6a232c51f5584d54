"""Peak memory (RSS) and time of building a synthetic dataset with dataset_builder's streaming writer.

Each size runs in a fresh process so that its peak RSS is its own. If the build streams, the peak stays flat as the
number of B-scans grows; holding every image and mask in memory would need the last column.

    .venv/bin/python benchmarks/build_memory.py                  # 500 and 5,000 B-scans of 512 x 496
    .venv/bin/python benchmarks/build_memory.py --scans 200 --size 512x496
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANS_PER_PATIENT = 10


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(scans: int, width: int, height: int, workdir: Path) -> dict:
    """Build ``scans`` B-scans in this process; return peak RSS, time and size on disk."""
    sys.path.insert(0, str(ROOT))
    import datasets

    from dataset_builder.synthetic import build_synthetic

    datasets.disable_progress_bars()
    datasets.config.HF_DATASETS_CACHE = str(workdir / "hf_cache")
    before = _rss_mib()
    start = time.perf_counter()
    out = workdir / f"synthetic_{scans}"
    build_synthetic("amd", scans // SCANS_PER_PATIENT, SCANS_PER_PATIENT, seed=0, output=out, size=(width, height))
    seconds = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "scans": scans,
        "rss_start_mib": before,
        "rss_peak_mib": _rss_mib(),
        "seconds": seconds,
        "disk_bytes": disk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, nargs="+", default=[500, 5000], help="dataset sizes to build")
    parser.add_argument("--size", default="512x496", help="WIDTHxHEIGHT of every B-scan (default 512x496)")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed afterwards)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(child(args.scans[0], width, height, Path(args.workdir))))
        return
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="octsam-build-memory-"))
    rows = []
    try:
        for n in args.scans:
            if n % SCANS_PER_PATIENT:
                parser.error(f"--scans must be multiples of {SCANS_PER_PATIENT} (B-scans per patient)")
            cmd = [sys.executable, __file__, "--child", "--scans", str(n), "--size", args.size, "--workdir", str(work)]
            done = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(work / f"synthetic_{n}", ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    per_scan_mib = width * height * 2 / 2**20  # uint8 image + uint8 mask
    print(f"synthetic AMD B-scans, {width} x {height}, {SCANS_PER_PATIENT} per patient, {os.cpu_count()} CPU cores")
    print(
        "| B-scans | peak RSS MiB | RSS after imports MiB | time s | B-scans/s | on disk MiB | all arrays in memory MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['scans']:,} | {r['rss_peak_mib']:.0f} | {r['rss_start_mib']:.0f} | {r['seconds']:.0f} | "
            f"{r['scans'] / r['seconds']:.1f} | {r['disk_bytes'] / 2**20:.0f} | {r['scans'] * per_scan_mib:,.0f} |"
        )


if __name__ == "__main__":
    main()
