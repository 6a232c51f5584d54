"""Stream B-scans into a ``DatasetDict``, save it atomically, render its card, and optionally push it to the Hub.

Every source (synthetic, folder, nnunet) hands the writer a list of ``ScanRecord``: ids plus a ``load()`` that
reads or draws one (image, mask) pair on demand. Each split is built with ``Dataset.from_generator``, which writes
Arrow record batches as it goes, so only a few B-scans are in memory at any time. Everything is written inside a
temporary folder next to the output and moved into place only when complete; on any error it is removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import datasets
import huggingface_hub
import numpy as np

from dataset_builder.splits import (
    SplitStats,
    fold_split,
    kfold_patients,
    load_split_file,
    split_patients,
    split_table,
)
from octsam.cards import template_path
from octsam.data.dataset import (
    IGNORE_INDEX,
    LABELS_FILE,
    SPLITS,
    dataset_features,
    labels_description,
    labels_to_id2label,
)
from octsam.errors import OctSamError
from octsam.folders import (
    FolderLock,
    recover,
    remove_stale_staging,
    require_utf8_name,
    staging_path,
    swap_into_place,
)
from octsam.textsafe import markdown_text

logger = logging.getLogger("dataset_builder")

# Package data of octsam (pyproject.toml [tool.setuptools.package-data]), next to the adapter card template.
SPLITS_FILE = "splits.json"
#: What command built the dataset (its options, inputs as absolute paths): a build run again with the same command
#: keeps an output it finds complete instead of refusing it (a K-fold build killed half-way goes on where it stopped).
BUILD_RECORD_FILE = "build.json"
_BUILD_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("build_record", default=None)
WRITER_BATCH_SIZE = 32  # rows per Arrow record batch: bounds the memory held while streaming


@dataclass(frozen=True)
class ScanRecord:
    """One B-scan to write: ids, the foreground classes it contains (for split balancing) and a loader."""

    scan_id: str
    patient_id: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    disease: str
    source: str
    classes: frozenset[int] = frozenset()
    # Optional columns beyond the data contract, as (name, value) pairs (a tuple keeps the record hashable), e.g.
    # (("volume_id", "s01"), ("bscan_index", 30)); their types are given to ``build_dataset(extra_features=...)``.
    extra: tuple[tuple[str, object], ...] = ()


@dataclass
class DatasetMeta:
    """What the dataset card says about the data."""

    pretty_name: str
    description: str
    source: str
    license: str = "unknown"
    citation: str = ""
    command: str = ""


@dataclass
class BuildResult:
    """What a build produced: where, which labels, which patient went where, and the per-split summaries."""

    output: Path | None
    labels: list[str]
    assignment: dict[str, str]
    summaries: dict[str, dict]
    table: str
    repo_id: str | None = None
    card: str = field(default="", repr=False)


def encode_png(array: np.ndarray, noisy: bool = False) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W) or (H, W, 3) RGB array, with OpenCV (faster than Pillow).

    ``noisy`` (B-scans: speckle leaves little for LZ77 to find) uses zlib's run-length strategy, which is faster
    than the default and no larger here; masks use the default strategy at level 1.
    """
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if noisy:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buffer = cv2.imencode(".png", array, params)
    if not ok:
        raise OctSamError(f"could not encode an array of shape {array.shape} as PNG")
    return buffer.tobytes()


def check_pair(record: ScanRecord, image: np.ndarray, mask: np.ndarray, num_labels: int) -> None:
    """Raise OctSamError when an (image, mask) pair breaks the data contract."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise OctSamError(
            f"{record.scan_id}: image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise OctSamError(f"{record.scan_id}: mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
    if image.shape[:2] != mask.shape:
        raise OctSamError(
            f"{record.scan_id}: image is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]} "
            "(width x height); masks must have the image's size."
        )
    bad = (mask >= num_labels) & (mask != IGNORE_INDEX)
    if bad.any():
        values = ", ".join(map(str, np.unique(mask[bad])[:10]))
        raise OctSamError(
            f"{record.scan_id}: mask value(s) {values} exceed the {num_labels} labels (0..{num_labels - 1}, 255 = ignore); "
            "pass the full --labels list or fix the mask."
        )


def _generate(records: Sequence[ScanRecord], num_labels: int, stats: SplitStats) -> Iterator[dict]:
    for record in records:
        image, mask = record.load()
        check_pair(record, image, mask, num_labels)
        stats.add(record.patient_id, image, mask)
        yield {
            "image": {"bytes": encode_png(image, noisy=True), "path": None},
            "mask": {"bytes": encode_png(mask), "path": None},
            "patient_id": record.patient_id,
            "scan_id": record.scan_id,
            "disease": record.disease,
            "source": record.source,
            **dict(record.extra),
        }


def _unwrap(err: BaseException) -> OctSamError | None:
    """``datasets`` wraps errors raised in a generator; find our own message in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OctSamError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def recording(record: dict) -> Iterator[None]:
    """Within the block every dataset written carries ``record`` in ``build.json`` (see ``built_by``)."""
    token = _BUILD_RECORD.set(record)
    try:
        yield
    finally:
        _BUILD_RECORD.reset(token)


def built_by(output: Path, record: dict) -> bool:
    """True if ``output`` is a complete dataset written by the command ``record`` describes."""
    try:
        found = json.loads((output / BUILD_RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == json.loads(json.dumps(record)) and (output / "dataset_dict.json").is_file()


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; even then only replace a dataset folder or an empty one.
    An old output a killed swap left aside is put back first (and so refused, never replaced)."""
    recover(output)
    if not output.exists():
        return
    if not overwrite:
        raise OctSamError(
            f"output {output} already exists; pass --overwrite to replace it or choose another --output."
        )
    if output.is_file() or (any(output.iterdir()) and not (output / "dataset_dict.json").is_file()):
        raise OctSamError(f"refusing to overwrite {output}: it is not a dataset folder written by dataset_builder.")


def assign_splits(
    records: Sequence[ScanRecord],
    fractions: tuple[float, float, float],
    seed: int,
    split_file: str | Path | None,
    labels: Sequence[str] | None = None,
    folds: tuple[int, int] | None = None,
) -> dict[str, str]:
    """Patient -> split, from ``split_file`` or a balanced seeded split (see ``splits.split_patients``)."""
    if not records:
        raise OctSamError("no B-scans to write: the source produced no image/mask pairs.")
    classes: dict[str, set[int]] = {}
    scans: dict[str, int] = {}
    for r in records:
        classes.setdefault(r.patient_id, set()).update(r.classes)
        scans[r.patient_id] = scans.get(r.patient_id, 0) + 1
    if split_file is not None:
        return load_split_file(split_file, classes)
    if folds is not None:
        count, fold = folds
        return fold_split(kfold_patients(classes, count, seed, scans), fold, count)
    return split_patients(classes, fractions, seed, scans, labels=labels)


def build_dataset(
    records: Sequence[ScanRecord],
    labels: list[str],
    output: str | Path | None,
    meta: DatasetMeta,
    *,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    split_file: str | Path | None = None,
    folds: tuple[int, int] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    extra_features: dict[str, datasets.Value] | None = None,
) -> BuildResult:
    """Split ``records`` by patient, stream them into a DatasetDict at ``output`` and/or push it to the Hub.

    ``extra_features``: types of optional columns beyond the data contract (e.g. ``volume_id``, ``bscan_index``)
    that every record carries in ``ScanRecord.extra``; the contract's columns are always written."""
    if output is None and push_to_hub is None:
        raise OctSamError("nowhere to write: pass --output DIR and/or --push-to-hub ORG/NAME.")
    blank = [i for i, name in enumerate(labels or []) if not isinstance(name, str) or not name.strip()]
    if blank:
        raise OctSamError(f"label names must not be blank: --labels {','.join(map(str, labels))!r} has an empty name "
                          f"at position {blank[0]}; e.g. --labels background,fluid")  # fmt: skip
    if not labels or labels[0] != "background":
        raise OctSamError(f"label names must start with 'background', got {labels}; e.g. --labels background,fluid")
    extra_features = dict(extra_features or {})
    _check_extra(records, extra_features)
    out = Path(output).expanduser().resolve() if output is not None else None
    settings = (meta, split, seed, split_file, folds, overwrite, push_to_hub, private, token, extra_features)
    if out is None:
        return _build(records, labels, None, *settings)
    require_utf8_name(out)
    created = _missing_ancestors(out.parent)  # made for the lock file: removed again if the build is refused
    try:
        with FolderLock(out, "dataset build"):
            return _build(records, labels, out, *settings)
    except BaseException:
        for folder in reversed(created):
            _rmdir_if_empty(folder)
        raise


def _build(
    records, labels, out, meta, split, seed, split_file, folds, overwrite, push_to_hub, private, token, extra_features
) -> BuildResult:
    if out is not None:
        check_output(out, overwrite)
    assignment = assign_splits(records, split, seed, split_file, labels, folds)

    parent = out.parent if out is not None else Path(tempfile.gettempdir())
    created = _missing_ancestors(parent)
    parent.mkdir(parents=True, exist_ok=True)
    name = out.name if out is not None else "dataset"
    remove_stale_staging(parent, name)
    tmp = staging_path(parent / name, "partial")  # the build's workspace: its cache and the dataset, swapped out
    try:
        tmp.mkdir()
        final_dir = tmp / "dataset"
        summaries = _write(records, labels, assignment, tmp / "cache", final_dir, extra_features)
        table = split_table(summaries, labels)
        card = render_card(labels, summaries, meta, repo_id=push_to_hub)
        (final_dir / "README.md").write_text(str(card))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if out is not None:
            swap_into_place(final_dir, out)  # an existing out only with --overwrite (check_output)
        if push_to_hub is not None:
            push_dataset(out if out is not None else final_dir, push_to_hub, private=private, token=token)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            _rmdir_if_empty(folder)
        ours = _unwrap(err)
        if ours is not None and ours is not err:
            raise ours from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(out, list(labels), assignment, summaries, table, push_to_hub, str(card))


def _check_extra(records: Sequence[ScanRecord], extra_features: dict) -> None:
    """Every record's extra columns must be exactly ``extra_features``' names, none of them a contract column."""
    clash = sorted(set(extra_features) & set(dataset_features()))
    if clash:
        raise OctSamError(f"extra column(s) {', '.join(clash)} would replace columns of the data contract.")
    expected = sorted(extra_features)
    for record in records:
        if sorted(name for name, _ in record.extra) != expected:
            raise OctSamError(
                f"{record.scan_id}: extra columns {sorted(name for name, _ in record.extra)} differ from the "
                f"dataset's {expected}; every B-scan must carry the same columns."
            )


def _write(
    records: Sequence[ScanRecord],
    labels: list[str],
    assignment: dict[str, str],
    cache: Path,
    final_dir: Path,
    extra_features: dict | None = None,
) -> dict[str, dict]:
    features = dataset_features()
    features.update(extra_features or {})
    stats = {s: SplitStats(len(labels)) for s in SPLITS}
    final_dir.mkdir(parents=True)
    for split in SPLITS:
        chosen = [r for r in records if assignment[r.patient_id] == split]
        part = datasets.Dataset.from_generator(
            _generate,
            features=features,
            cache_dir=str(cache),
            # a tuple, not a list: datasets would treat a list as shards and call the generator once per record
            gen_kwargs={"records": tuple(chosen), "num_labels": len(labels), "stats": stats[split]},
            split=datasets.NamedSplit(split),
            fingerprint=f"octsam-{split}-{uuid.uuid4().hex}",
            writer_batch_size=WRITER_BATCH_SIZE,
        )
        part.info.description = labels_description(labels)
        _adopt(part, final_dir / split)
        del part
    (final_dir / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}))
    check = datasets.load_from_disk(str(final_dir))  # memory-mapped: checks the layout without reading pixels
    for split in SPLITS:
        if check[split].num_rows != stats[split].scans:
            raise RuntimeError(f"wrote {check[split].num_rows} rows for {split}, expected {stats[split].scans}")
    del check
    (final_dir / LABELS_FILE).write_text(json.dumps(labels_to_id2label(labels), indent=2) + "\n")
    split_lists = {s: sorted(p for p, v in assignment.items() if v == s) for s in SPLITS}
    (final_dir / SPLITS_FILE).write_text(json.dumps(split_lists, indent=2) + "\n")
    record = _BUILD_RECORD.get()
    if record is not None:
        (final_dir / BUILD_RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {s: stats[s].summary(labels) for s in SPLITS}


def _adopt(part: datasets.Dataset, folder: Path) -> None:
    """Move a split's Arrow cache files into ``save_to_disk``'s layout instead of copying them.

    ``Dataset.save_to_disk`` would re-read and re-write every row (about 0.75 GB of extra peak RSS from memory-mapped
    pages for 1,000 B-scans of 512 x 496); the files ``from_generator`` wrote are already in the same Arrow format,
    so they are renamed and the two small JSON files ``save_to_disk`` writes are written the same way.
    """
    folder.mkdir()
    files = [Path(f["filename"]) for f in part.cache_files]
    names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    state = {
        key: part.__dict__[key]
        for key in ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")
    }
    state["_split"] = str(part.split)
    state["_data_files"] = [{"filename": name} for name in names]
    info = asdict(part.info)
    for src, name in zip(files, names):
        os.replace(src, folder / name)
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


def _missing_ancestors(path: Path) -> list[Path]:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return list(reversed(missing))


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ card


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def render_card(labels: list[str], summaries: dict[str, dict], meta: DatasetMeta, repo_id: str | None = None):
    """The dataset card (``huggingface_hub.DatasetCard``) rendered from ``model_cards/dataset_card.md``."""
    template = template_path("dataset_card.md")
    total = sum(s["scans"] for s in summaries.values())
    card_data = huggingface_hub.DatasetCardData(
        license=meta.license,
        pretty_name=meta.pretty_name,
        task_categories=["image-segmentation"],
        tags=["oct", "ophthalmology", "medical-imaging", "retina", "octsam"],
        size_categories=[_size_category(total)],
    )
    return huggingface_hub.DatasetCard.from_template(
        card_data,
        template_path=str(template),
        labels=list(enumerate(labels)),
        summaries=summaries,
        table=split_table(summaries, labels),
        total_scans=total,
        total_patients=sum(s["patients"] for s in summaries.values()),
        meta=meta,
        repo_id=repo_id,
        labels_file=LABELS_FILE,
        splits_file=SPLITS_FILE,
        md=markdown_text,  # text from the data (labels, names, sources) stays text in the card
    )


# ------------------------------------------------------------------------------------------------- hub


def push_dataset(dataset_dir: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> None:
    """Push a built dataset folder to the Hub dataset repo ``repo_id``.

    The card, ``id2label.json`` and ``splits.json`` go first in one commit; ``DatasetDict.push_to_hub`` then
    uploads the parquet shards and adds its ``configs``/``dataset_info`` metadata to that card.
    """
    try:
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        operations = [
            huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(dataset_dir / name))
            for name in ("README.md", LABELS_FILE, SPLITS_FILE)
        ]
        api.create_commit(
            repo_id, operations, commit_message="Add dataset card and label names (octsam)", repo_type="dataset"
        )
        dsd = datasets.load_from_disk(str(dataset_dir))
        dsd.push_to_hub(repo_id, private=private, token=token, commit_message="Upload OCT dataset (octsam)")
    except OctSamError:
        raise
    except Exception as err:  # noqa: BLE001 - auth, network and permission errors get one message
        raise OctSamError(
            f"pushing to Hub dataset {repo_id!r} failed: {err}. Log in with `hf auth login` (or set HF_TOKEN) "
            "with write access, and check the ORG/NAME."
        ) from err
    logger.info("pushed to https://huggingface.co/datasets/%s", repo_id)
