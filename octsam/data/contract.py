"""The data contract's constants, defined once (no heavy imports: every layer may use them).

A dataset is a ``datasets.DatasetDict`` with the splits below and these columns; masks hold 0 for background, 1..K for
the biomarkers and ``IGNORE_INDEX`` for pixels that no loss or metric counts. Label names travel with the data in
``LABELS_FILE`` (and the dataset card / info description, after ``LABELS_MARKER``).
"""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
COLUMNS: tuple[str, ...] = ("image", "mask", "patient_id", "scan_id", "disease", "source")
LABELS_FILE = "id2label.json"
LABELS_MARKER = "octsam-id2label:"
IGNORE_INDEX = 255
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
