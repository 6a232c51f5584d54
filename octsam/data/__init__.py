"""Data: the dataset contract (``contract``, ``dataset``), augmentation (``augment``), training samples and batches
(``samples``) and prompts (``prompts``).

``from octsam.data import load_oct_dataset`` works as before; the heavy modules are imported on first use.
"""

from octsam.data.contract import COLUMNS, IGNORE_INDEX, IMAGE_SUFFIXES, LABELS_FILE, SPLITS

__all__ = ["COLUMNS", "IGNORE_INDEX", "IMAGE_SUFFIXES", "LABELS_FILE", "SPLITS", "load_oct_dataset", "read_scan"]


def __getattr__(name: str):
    if name in ("load_oct_dataset", "read_scan"):
        from octsam.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'octsam.data' has no attribute {name!r}")
