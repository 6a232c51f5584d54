"""Helpers shared by the benchmark scripts (not a library module: benchmarks are run as scripts)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    """A timestamped progress line on stderr (tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(command: list[str]) -> dict:
    """Where and how a benchmark ran (``env.json`` of a results folder): CPU, GPU, package versions, git commit
    (and whether octsam/, benchmarks/ or configs/ had uncommitted changes), the command and the date."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "monai", "datasets", "numpy", "triton"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "octsam", "benchmarks", "configs"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "versions": versions,
        "python": sys.version.split()[0],
        "git_commit": commit.strip(),
        "git_dirty": bool(dirty),
        "command": " ".join(command),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
