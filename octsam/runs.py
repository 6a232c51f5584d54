"""The layout of a training run folder (``train.py --output RUN``), read by training, evaluation and the demo.

RUN/best_adapter (an adapter folder, ``octsam.adapter``'s file names), RUN/checkpoints/epoch-NNNN (a checkpoint:
``octsam.training.checkpoint`` writes its files), RUN/all_results.json. No torch: evaluation and the demo read a run's
history without importing the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
BEST_ADAPTER_DIR = "best_adapter"
RESULTS_FILE = "all_results.json"
CHECKPOINT_GLOB = "epoch-[0-9][0-9][0-9][0-9]"
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under RUN/checkpoints, oldest first."""
    return sorted(p for p in Path(root).glob(CHECKPOINT_GLOB) if (p / TRAINER_STATE).is_file())


def run_history(run_dir: Path) -> list[dict] | None:
    """The per-epoch history of a training run folder (from its latest checkpoint's trainer state); None if none."""
    ckpts = list_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    if not ckpts:
        return None
    try:
        return json.loads((ckpts[-1] / TRAINER_STATE).read_text()).get("history") or None
    except (OSError, json.JSONDecodeError):
        return None
