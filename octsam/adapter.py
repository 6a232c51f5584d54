"""The adapter folder format: what a trained octsam model folder (or Hub repo) holds, and finding one.

An adapter folder is self-describing: ``octsam_config.json`` (``OctSamConfig``: base model, mode, labels, input size,
normalisation, format version) plus the weights of its kind - PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` for SAM + LoRA, ``model.safetensors`` for the U-Net baseline - and a ``README.md`` model
card. This module imports no torch: checking and resolving a folder is cheap.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from octsam import __version__
from octsam.bases import (  # noqa: F401 - the weight file names, importable from here as before
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    UNET_WEIGHTS_NAME,
    base_of,
    get_base,
    registered,
)
from octsam.errors import OctSamError
from octsam.options import All, Choice, Each, Fraction, Length, NonEmpty, OptionError, Range, checked
from octsam.safepaths import pickle_hint

ADAPTER_CONFIG_NAME = "octsam_config.json"
ADAPTER_FORMAT = "octsam-adapter"
ADAPTER_FORMAT_VERSION = 1
CARD_NAME = "README.md"
RUN_RECORD_NAME = "run.json"


def adapter_files() -> tuple[str, ...]:
    """What a Hub download of an adapter fetches (nothing else: no checkpoints): the config, card, run record and
    the weight files of every registered base."""
    weights = dict.fromkeys(name for base in registered() for name in base.weight_files)
    return (ADAPTER_CONFIG_NAME, CARD_NAME, RUN_RECORD_NAME, *weights)


ADAPTER_FILES = adapter_files()  # of the built-in bases

# How a B-scan meets the model's input (OctSamConfig.input_mode; octsam.data.tiles does the work).
INPUT_MODES = ("resize", "native")
# SAM's normalisation (ImageNet mean/std on the 0-255 scale), as in transformers' SamImageProcessor.
SAM_IMAGE_MEAN = (123.675, 116.28, 103.53)
SAM_IMAGE_STD = (58.395, 57.12, 57.375)
CLASS_PROMPTS_MODULE = "octsam_class_prompts"


def __getattr__(name: str):
    """Views of the base registry (``octsam.bases``) under the names this module had before it: LoRA roles,
    input spec and weight files per encoder kind."""
    if name == "LORA_ROLES":
        return {b.name: dict(b.lora_roles) for b in registered() if b.peft_adapter}
    if name == "ENCODER_INPUT":
        return {b.name: {"resize": b.resize, "normalization": b.normalization} for b in registered() if b.peft_adapter}
    if name == "WEIGHT_FILES":
        return {b.architecture: b.weight_files for b in registered() if b.name == b.architecture}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _encoders() -> tuple[str, ...]:
    return tuple(b.name for b in registered() if b.peft_adapter)


# How automatic mode turns the mask decoder into K class outputs (octsam.models.sam): "class_tokens" decodes each class
# with its own learned prompt tokens (K decoder passes); "mask_tokens" decodes once with one learned prompt and reads
# class k from SAM's k-th multimask output token (as SAMed does; at most MASK_TOKEN_CLASSES classes), with the
# decoder's output head (upscaling + hypernetwork MLPs) trained.
AUTOMATIC_HEADS = ("class_tokens", "mask_tokens")
MASK_TOKEN_CLASSES = 3

# The constraint table of an adapter's settings (octsam.options); train.py's options of the same names copy theirs.
ADAPTER_CHECKS = {
    "labels": All((Length(tuple(range(2, 256))), Each(NonEmpty()))),
    "base_model": NonEmpty(),
    "mode": Choice(("automatic", "prompted")),
    "class_activation": Choice(("softmax", "sigmoid")),
    "automatic_head": Choice(AUTOMATIC_HEADS),
    "image_size": Range(1),
    "image_mean": All((Length((1, 3)), Each(Range()))),
    "image_std": All((Length((1, 3)), Each(Range(0, min_open=True)))),
    "tokens_per_class": Range(1),
    "lora_r": Range(1),
    "lora_alpha": Range(1),
    "lora_dropout": Fraction(open_top=True),
    "encoder": Choice(_encoders),
    "resize": Choice(("stretch", "pad")),
    "normalization": Choice(("mean_std", "minmax")),
    "input_mode": Choice(INPUT_MODES),
    "tile_overlap": Fraction(open_top=True),
    "tile_scale": Range(0.05, 8),
    "format_version": Range(1),
}


@checked(ADAPTER_CHECKS)
@dataclass
class OctSamConfig:
    """Everything needed to rebuild a trained model from its folder (saved as ``octsam_config.json``)."""

    labels: list[str]
    base_model: str = "facebook/sam-vit-base"
    base_model_revision: str | None = None
    architecture: str = "sam"
    mode: str = "automatic"
    class_activation: str = "softmax"
    automatic_head: str = "class_tokens"  # adapters written before this field existed used class tokens
    image_size: int = 1024
    image_mean: tuple[float, ...] = SAM_IMAGE_MEAN
    image_std: tuple[float, ...] = SAM_IMAGE_STD
    tokens_per_class: int = 2
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["qkv"])
    train_mask_decoder: bool = True
    # The image encoder kind and how it takes its input (set from the base when an adapter is made):
    # resize "stretch" (to a square, SAM) or "pad" (longest side, zero padding right/bottom, LiteMedSAM/MedSAM);
    # normalization "mean_std" (image_mean / image_std on the 0-255 scale) or "minmax" (each image to [0, 1]).
    encoder: str = "sam"
    resize: str = "stretch"
    normalization: str = "mean_std"
    base_sha256: str | None = None  # of packaged or local base weights; a base with other weights is refused
    # How a B-scan meets the model's square input (octsam.data.tiles): "resize" shrinks or stretches the whole B-scan
    # into it; "native" keeps its own pixel size (times ``tile_scale``) and segments it by a sliding window of
    # ``image_size`` tiles overlapping by ``tile_overlap``, blended with Gaussian weights (MONAI).
    input_mode: str = "resize"
    tile_overlap: float = 0.5
    tile_scale: float = 1.0
    format: str = ADAPTER_FORMAT
    format_version: int = ADAPTER_FORMAT_VERSION
    octsam_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """After every field passed the table (``checked``): the checks that involve several fields."""
        self.labels = list(self.labels)
        if len(set(self.labels)) != len(self.labels):
            raise OptionError("labels", self.labels, "distinct class names")
        if self.labels[0] != "background":
            raise OptionError("labels", self.labels, "'background' first, then at least one biomarker")
        roles = get_base(self.encoder).lora_roles
        unknown = [t for t in self.lora_target_modules if t not in roles]
        if unknown:
            raise OptionError("lora_target_modules", self.lora_target_modules, f"roles of {self.encoder}: "
                              f"{', '.join(sorted(roles))}")  # fmt: skip
        if (
            self.mode == "automatic"
            and self.automatic_head == "mask_tokens"
            and self.num_labels - 1 > MASK_TOKEN_CLASSES
        ):
            raise OptionError(
                "automatic_head", self.automatic_head, f"at most {MASK_TOKEN_CLASSES} biomarker classes (SAM's "
                f"multimask outputs; these labels have {self.num_labels - 1}); use class_tokens for more"
            )  # fmt: skip
        if self.train_mask_decoder and "decoder_attention" in self.lora_target_modules:
            raise OctSamError(
                "lora_target_modules 'decoder_attention' and train_mask_decoder=true both train the mask decoder; "
                "set train_mask_decoder false to use LoRA on the decoder instead."
            )
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> OctSamConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OctSamError(f"Cannot read adapter config {path}: {err}") from err
        if not isinstance(data, dict):
            raise OctSamError(
                f"{path} must hold a JSON object (an octsam adapter config), not a {type(data).__name__}."
            )
        if data.get("format") != ADAPTER_FORMAT:
            raise OctSamError(
                f"{path} is not an octsam adapter (format={data.get('format')!r}); "
                "pass a folder written by octsam's train.py or `python -m octsam.cli.hub push`."
            )
        version = data.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise OctSamError(f"{path}: format_version must be a positive integer, got {version!r}.")
        if version > ADAPTER_FORMAT_VERSION:
            raise OctSamError(
                f"{path} was written by a newer octsam (format_version {data['format_version']} > "
                f"{ADAPTER_FORMAT_VERSION}); upgrade octsam to load it."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OctSamError(f"{path} has unknown keys {unknown}; it was written by another octsam version.")
        if "labels" not in data:
            raise OctSamError(f"{path} has no labels (the class names the adapter was trained for).")
        try:
            return cls(**data)
        except OctSamError as err:
            raise OctSamError(f"{path}: {err}") from None
        except (TypeError, ValueError) as err:
            raise OctSamError(f"{path} is not a valid octsam adapter config: {err}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hub_unreachable() -> bool:
    """True when the Hub cannot be used now: offline mode is set, or its host name does not resolve (no network).

    huggingface_hub retries an unresolvable host for about 20 s per file before failing; callers use this to go
    straight to the local cache (``local_files_only``) and to say how to work offline.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return True
    return False


OFFLINE_HINT = (
    "download it once where there is internet with `hf download {name}` and set HF_HUB_OFFLINE=1 here, "
    "or pass the downloaded folder"
)


def resolve_adapter(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """A local adapter folder as it is, or a Hub repo id downloaded once through huggingface_hub's cache (HF_HOME,
    HF_HUB_OFFLINE and ``revision`` are honoured; only the files an adapter uses are fetched)."""
    adapter = str(adapter)
    if os.path.isdir(adapter):
        return Path(adapter)
    if os.path.exists(adapter):
        raise OctSamError(f"Adapter {adapter} is a file; pass the adapter folder that holds {ADAPTER_CONFIG_NAME}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = hub_unreachable()
    try:
        return Path(
            snapshot_download(
                adapter,
                revision=revision,
                repo_type="model",
                allow_patterns=list(adapter_files()),
                local_files_only=offline,
            )
        )
    except HFValidationError as err:
        raise OctSamError(
            f"Adapter {adapter!r} is neither an existing local folder nor a valid Hub repo id (ORG/NAME)."
        ) from err
    except Exception as err:  # offline and not cached, missing repo, no access
        at = f" --revision {revision}" if revision else ""
        where = "in the local Hugging Face cache (the Hub cannot be reached from here)" if offline else "on the Hub"
        raise OctSamError(
            f"Cannot find adapter {adapter!r}{' at revision ' + revision if revision else ''} as a local folder or "
            f"{where} ({type(err).__name__}). Check the path or repo id; for a private repo log in with "
            f"`hf auth login`; to use it offline, " + OFFLINE_HINT.format(name=f"{adapter}{at}") + "."
        ) from err


def check_adapter_folder(folder: str | os.PathLike) -> OctSamConfig:
    """The folder's ``OctSamConfig`` after checking it holds everything the loader needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OctSamError(f"Adapter folder {folder} does not exist.")
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise OctSamError(
            f"{folder} has no {ADAPTER_CONFIG_NAME}: it is not an octsam adapter folder (a plain PEFT or transformers "
            "checkpoint cannot be used without the labels and input size that file records). Pass the best_adapter "
            "folder that train.py writes."
        )
    config = OctSamConfig.from_json_file(folder / ADAPTER_CONFIG_NAME)
    base = base_of(config)
    missing = [name for name in base.weight_files if not (folder / name).is_file()]
    if missing:
        raise OctSamError(
            f"Adapter folder {folder} lacks {', '.join(missing)}; save it again with train.py.{pickle_hint(folder)}"
        )
    if base.peft_adapter:
        check_peft_config(folder / PEFT_CONFIG_NAME)
    for name in base.weight_files:
        if name.endswith(".safetensors"):
            keys = safetensors_keys(folder / name)
            if base.peft_adapter:
                has_prompts = any(CLASS_PROMPTS_MODULE in k for k in keys)
                if has_prompts != (config.mode == "automatic"):
                    trained = "automatic" if has_prompts else "prompted"
                    raise OctSamError(
                        f"Adapter folder {folder}: octsam_config.json says mode {config.mode!r} but {name} holds "
                        f"{trained}-mode weights ({'with' if has_prompts else 'without'} class prompt tokens); "
                        "fix the mode in octsam_config.json or use the folder train.py wrote."
                    )
    return config


def check_peft_config(path: Path) -> None:
    """PEFT's ``adapter_config.json`` must be a LoRA config: a damaged one is named as such (PEFT would fail later
    with a message that blames the base model)."""
    if not path.is_file():
        return  # the weight-file check names what is missing
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("peft_type") != "LORA":
            raise ValueError(f"peft_type is {data.get('peft_type')!r}, not 'LORA'")
        r = data.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r is {r!r}, not a positive integer")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise OctSamError(
            f"{path} is damaged ({err}); it is not the LoRA config train.py writes. Copy or download the adapter "
            "again."
        ) from None


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def check_same_labels(adapter_labels, dataset_labels, adapter: str, dataset: str) -> None:
    """An adapter can only be scored on (or applied to) a dataset with its label set: same names, same order."""
    if list(adapter_labels) != list(dataset_labels):
        raise OctSamError(
            f"Adapter {adapter} predicts labels {list(adapter_labels)} but dataset {dataset} has "
            f"{list(dataset_labels)}; use a dataset with the same label set (same names, same order)."
        )


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file after checking its header and length (no torch, nothing executed):
    a truncated or foreign file is refused with a message naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            length = struct.unpack("<Q", head)[0]
            if length > min(size - 8, 100_000_000):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, stop = (int(v) for v in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])  # a dtype not listed here: only its byte range is checked
            if not 0 <= start <= stop or (width is not None and stop - start != count * width):
                raise ValueError(f"tensor {key!r}: its dtype, shape and byte range disagree (damaged header)")
            end = max(end, stop)
        if 8 + length + end > size:
            raise ValueError(f"the tensors need {8 + length + end} bytes, the file has {size} (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise OctSamError(
            f"{path} is not a complete safetensors file ({err}); download or copy the adapter again."
        ) from None
    return [k for k in header if k != "__metadata__"]
