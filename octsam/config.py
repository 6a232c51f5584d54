"""Experiment configuration: three dataclasses parsed from one YAML file, overridable on the command line.

``python train.py --config configs/amd.yaml --learning-rate 3e-4`` reads the YAML, rejects keys that no dataclass
knows, and lets each ``--name value`` override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from octsam.adapter import OctSamConfig
from octsam.data.augment import AugmentConfig
from octsam.data.prompts import PromptConfig
from octsam.data.tiles import CROP_SAMPLINGS, TileConfig
from octsam.errors import OctSamError
from octsam.options import (
    MIXED_PRECISIONS,
    SCHEDULER_TYPES,
    All,
    Choice,
    Each,
    Fraction,
    NonEmpty,
    NonNegative,
    OptionError,
    Positive,
    Range,
    checked,
    coerce,
    describe,
)


def _copy_field(source, name: str, help: str):
    """A field with the name, default and constraint of ``source``'s field ``name`` (written once, in ``source``)."""
    original = {f.name: f for f in dataclasses.fields(source)}[name]
    metadata = {"help": help}
    if "check" in original.metadata:
        metadata["check"] = original.metadata["check"]
    if original.default_factory is not dataclasses.MISSING:
        return field(default_factory=original.default_factory, metadata=metadata)
    return field(default=original.default, metadata=metadata)


def _adapter_field(name: str, help: str):
    return _copy_field(OctSamConfig, name, help)


def _architectures() -> tuple[str, ...]:
    from octsam.bases import architectures

    return tuple(architectures())


def _attention_modes() -> tuple[str, ...]:
    from octsam.models import ATTENTION_MODES

    return tuple(ATTENTION_MODES)


# The constraint table of train.py's options (octsam.options): the parser, --help and the checks all read it. The
# adapter's own settings (mode, lora_r, tile_overlap ...) take theirs from OctSamConfig's table (octsam.adapter).
MODEL_CHECKS = {
    "model": Choice(_architectures),
    "base_model": NonEmpty(),
    "attention_mode": Choice(_attention_modes),
    "unet_channels": All((NonEmpty(), Each(Range(1)))),
    "unet_image_size": Range(16),
}
DATA_CHECKS = {
    "max_prompts": Range(1),
    "box_jitter": NonNegative(),
    "min_box_jitter_px": NonNegative(),
    "positive_points": NonNegative(),
    "negative_points": NonNegative(),
    "prompt_types": All((NonEmpty(), Each(Choice(("box", "point", "box+point"))))),
    "hflip_p": Fraction(),
    "rotate_limit": Range(0, 180),
    "rotate_p": Fraction(),
    "brightness_limit": Fraction(),
    "contrast_limit": Fraction(),
    "brightness_contrast_p": Fraction(),
    "crop_sampling": Choice(CROP_SAMPLINGS),
    "crops_per_scan": Range(1),
    "foreground_ratio": Fraction(),
    "num_workers": NonNegative(),
    "max_train_samples": Range(1),
}
TRAIN_CHECKS = {
    "output_dir": NonEmpty(),
    "learning_rate": Positive(),
    "weight_decay": NonNegative(),
    "dice_weight": NonNegative(),
    "ce_weight": NonNegative(),
    "lr_scheduler_type": Choice(SCHEDULER_TYPES),
    "warmup_ratio": Fraction(open_top=True),
    "effective_batch_size": Range(1),
    "per_device_train_batch_size": Range(1),
    "per_device_eval_batch_size": Range(1),
    "num_train_epochs": Range(1),
    "early_stopping_patience": NonNegative(),
    "mixed_precision": Choice(MIXED_PRECISIONS),
    "seed": NonNegative(),
    "logging_steps": Range(1),
    "report_to": Choice(("tensorboard", "trackio", "wandb", "none")),
    "keep_checkpoints": NonNegative(),
    "stop_after_epochs": Range(1),
}


@checked(MODEL_CHECKS)
@dataclass
class ModelArguments:
    model: str = field(
        default="sam",
        metadata={
            "help": "sam (SAM + LoRA), unet (MONAI U-Net baseline) or dynunet (MONAI DynUNet configured like "
            "nnU-Net 2D, deep supervision; unet_channels: features per stage, e.g. 32 64 128 256 512 512)."
        },
    )
    # The adapter's own settings: names and defaults are OctSamConfig's (one source of truth), see adapter_config().
    base_model: str = _adapter_field(
        "base_model",
        "litemedsam (pretrained, offline: installs with pip), or a SamModel Hub id or local folder "
        "(facebook/sam-vit-base|large|huge, wanglab/medsam-vit-base).",
    )
    base_model_revision: str | None = _adapter_field("base_model_revision", "Hub revision of the base model.")
    mode: str = _adapter_field("mode", "automatic (no prompts) or prompted (boxes/points).")
    class_activation: str = _adapter_field(
        "class_activation", "softmax: classes compete (one per pixel); sigmoid: overlapping."
    )
    automatic_head: str = _adapter_field(
        "automatic_head",
        "Automatic mode: class_tokens (learned prompt tokens per class, one decoder pass each) or mask_tokens (one "
        "pass, class k from SAM's k-th multimask output, output head trained; up to 3 classes, 3x cheaper).",
    )
    tokens_per_class: int = _adapter_field(
        "tokens_per_class", "Learned prompt tokens per class (automatic; mask_tokens: of the one shared prompt)."
    )
    lora_r: int = _adapter_field("lora_r", "LoRA rank.")
    lora_alpha: int = _adapter_field("lora_alpha", "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _adapter_field("lora_dropout", "Dropout on the LoRA path.")
    lora_target_modules: list[str] = _adapter_field(
        "lora_target_modules",
        "Roles, for any base: qkv, proj, attention (qkv + proj), mlp (image encoder) and decoder_attention.",
    )
    train_mask_decoder: bool = _adapter_field(
        "train_mask_decoder", "Train the whole mask decoder (--no-train-mask-decoder: keep it frozen)."
    )
    input_mode: str = _adapter_field(
        "input_mode",
        "resize: the whole B-scan shrunk into the model's input; native: tiles of the input's size at the B-scan's "
        "own pixel size, sliding window with Gaussian blending at inference (octsam.data.tiles).",
    )
    tile_overlap: float = _adapter_field("tile_overlap", "Native mode: overlap of the sliding-window tiles, [0, 1).")
    tile_scale: float = _adapter_field(
        "tile_scale", "Native mode: resample B-scans by this factor before tiling (1: their own pixel size)."
    )
    fast_attention: bool = field(
        default=True, metadata={"help": "Exact fast attention for the image encoder (octsam.models.fast_attention)."}
    )
    attention_mode: str = field(
        default="auto",
        metadata={
            "help": "Fast-attention mode: auto (fold on CUDA, bias elsewhere), fold, fold_flash, bias "
            "or triton (fused Triton kernel for global layers)."
        },
    )
    unet_channels: list[int] = field(
        default_factory=lambda: [32, 64, 128, 256, 512], metadata={"help": "U-Net channels per level."}
    )
    unet_image_size: int = field(default=256, metadata={"help": "U-Net input size (square)."})


@checked(DATA_CHECKS)
@dataclass
class DataArguments:
    dataset: str = field(default="", metadata={"help": "Dataset folder (save_to_disk) or Hub dataset repo id."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset."})
    # Prompted mode (names and defaults are PromptConfig's).
    max_prompts: int = _copy_field(PromptConfig, "max_prompts", "Prompted mode: prompts (components) per B-scan.")
    box_jitter: float = _copy_field(PromptConfig, "box_jitter", "Prompted mode: box jitter as a fraction of its size.")
    min_box_jitter_px: float = _copy_field(PromptConfig, "min_box_jitter_px", "Prompted mode: least box jitter (px).")
    positive_points: int = _copy_field(PromptConfig, "positive_points", "Prompted mode: points inside each component.")
    negative_points: int = _copy_field(
        PromptConfig, "negative_points", "Prompted mode: points in the box, outside it."
    )
    prompt_types: list[str] = field(
        default_factory=lambda: ["box", "point", "box+point"],
        metadata={"help": "Prompted mode: prompt kinds drawn per step."},
    )
    # Augmentation (names and defaults are AugmentConfig's).
    augment: bool = field(default=True, metadata={"help": "Augment training B-scans (--no-augment: off)."})
    hflip_p: float = _copy_field(AugmentConfig, "hflip_p", "Probability of a horizontal flip.")
    rotate_limit: float = _copy_field(AugmentConfig, "rotate_limit", "Largest rotation in degrees.")
    rotate_p: float = _copy_field(AugmentConfig, "rotate_p", "Probability of a rotation.")
    brightness_limit: float = _copy_field(AugmentConfig, "brightness_limit", "Largest brightness change.")
    contrast_limit: float = _copy_field(AugmentConfig, "contrast_limit", "Largest contrast change.")
    brightness_contrast_p: float = _copy_field(
        AugmentConfig, "brightness_contrast_p", "Probability of a brightness/contrast change."
    )
    # Native-resolution crops (input_mode: native; names and defaults are TileConfig's).
    crop_sampling: str = _copy_field(
        TileConfig,
        "crop_sampling",
        "Native mode: random (crops_per_scan random crops per B-scan and epoch, foreground oversampled) or grid "
        "(the inference grid's tiles + one per lesion, the same every epoch: cacheable embeddings).",
    )
    crops_per_scan: int = _copy_field(TileConfig, "crops_per_scan", "Native mode, random: crops per B-scan and epoch.")
    foreground_ratio: float = _copy_field(
        TileConfig, "foreground_ratio", "Native mode, random: share of crops centred on a biomarker pixel."
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training scans."})


@checked(TRAIN_CHECKS)
@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints, adapter, results go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a non-empty --output folder afresh."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    dice_weight: float = field(default=1.0, metadata={"help": "Weight of the Dice term of the loss."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term of the loss."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of all steps."})
    effective_batch_size: int = field(
        default=16, metadata={"help": "per-device batch x processes x accumulation (accumulation is derived)."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch per device."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch per device."})
    num_train_epochs: int = field(default=50, metadata={"help": "Maximum epochs."})
    early_stopping_patience: int = field(default=5, metadata={"help": "Epochs without a better val Dice; 0: off."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU unless the launch config says), no, bf16."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (less memory)."})
    compile: bool = field(
        default=True,
        metadata={
            "help": "torch.compile the model on CUDA (on by default there; --no-compile: off). The CPU trains "
            "uncompiled (octsam.speed.plan_speed)."
        },
    )
    cache_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Compute image embeddings once and reuse them every epoch when that is exact: no LoRA on the "
            "image encoder and no augmentation (octsam.training.embedding_cache; not with torch.compile)."
        },
    )
    embedding_cache_dir: str | None = field(
        default=None, metadata={"help": "Also keep cached embeddings in this folder, shared by runs on the same data."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, trackio, wandb or none."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Epoch checkpoints kept besides best and latest."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest or a checkpoint folder."})
    evaluate_test: bool = field(default=True, metadata={"help": "Evaluate the best model on the test split."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the best adapter at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "ORG/NAME for --push-to-hub."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    stop_after_epochs: int | None = field(
        default=None, metadata={"help": "Stop (as if interrupted) after this many epochs; for testing resume."}
    )


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


EPILOG = """examples:
  python train.py --config configs/amd.yaml --dataset data/amd
  python train.py --config configs/amd.yaml --learning-rate 3e-4 --num-train-epochs 20
  python train.py --config configs/amd.yaml --model unet --output outputs/amd_unet
  python train.py --config configs/amd.yaml --resume-from-checkpoint latest
  accelerate launch --config_file accelerate_config.yaml train.py --config configs/amd.yaml

Options are kebab-case like every octsam command, and the run folder is --output (--overwrite to start it afresh)
as in every command that writes one. Accepted as aliases, not listed: the snake_case spelling Hugging Face scripts
use (--learning_rate) and their --output-dir / --overwrite-output-dir. A YAML --config uses the snake_case field
names as keys (output_dir, overwrite_output_dir); the command line overrides it.
Booleans: --flag, --no-flag or --flag true|false."""

_GROUPS = {
    "ModelArguments": "model (SAM + LoRA or the U-Net baseline)",
    "DataArguments": "data, prompts and augmentation",
    "TrainArguments": "training",
}


def _to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option once, in its kebab-case spelling (the snake_case alias is accepted, not listed)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        first = action.option_strings[0]
        if action.nargs == 0:
            return ", ".join(action.option_strings) if first == "-h" else first
        return f"{first} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _format_usage(self, usage, actions, groups, prefix):
        return "usage: train.py --config FILE.yaml [--option value ...]   (all options below)\n\n"


def build_parser() -> argparse.ArgumentParser:
    """The train.py parser, built from the three dataclasses without importing torch or transformers (fast --help)."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune SAM with LoRA (or the MONAI U-Net baseline) on an OCT dataset.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file with any options below.")
    for dc in ALL_ARGUMENTS:
        group = parser.add_argument_group(_GROUPS[dc.__name__])
        for f in dataclasses.fields(dc):
            _add_field(group, f)
    return parser


#: Fields whose option follows the convention of every octsam command rather than the field name (which YAML configs
#: and Hugging Face scripts use, and which stays accepted as a hidden alias).
CLI_NAMES = {"output_dir": "--output", "overwrite_output_dir": "--overwrite"}


def _add_field(group, f: dataclasses.Field) -> None:
    kebab, snake = f"--{f.name.replace('_', '-')}", f"--{f.name}"
    names = list(dict.fromkeys([CLI_NAMES.get(f.name, kebab), kebab, snake]))
    help_text = f.metadata.get("help", "")
    allowed = describe(f)  # the constraint table: what the check accepts is what --help says
    if allowed:
        help_text = f"{help_text} Allowed: {allowed}."
    kind = str(f.type)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if kind == "bool":
        group.add_argument(*names, dest=f.name, type=_to_bool, nargs="?", const=True, default=default,
                           metavar="true|false", help=f"{help_text} (default: {str(default).lower()})")  # fmt: skip
        negatives = [f"--no-{name[2:]}" for name in names if "_" not in name] + [f"--no_{f.name}"]
        group.add_argument(*dict.fromkeys(negatives), dest=f.name, action="store_false", help=argparse.SUPPRESS)
        return
    optional = "None" in kind
    base = kind.replace("| None", "").replace("None |", "").strip()
    nargs = None
    if base.startswith("list["):
        nargs, base = "+", base[5:-1]
    convert = {"str": str, "int": int, "float": float}[base]
    if optional:
        convert = _none_or(convert)
    shown = (
        ""
        if default is None
        else f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    )
    group.add_argument(*names, dest=f.name, type=convert, nargs=nargs, default=default, metavar=f.name.upper(),
                       help=help_text + shown)  # fmt: skip


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def parse_config(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """``--config FILE.yaml`` (optional) plus command-line overrides -> the three argument dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise OctSamError("--config needs a YAML file path.")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise OctSamError(f"Config file {config_path} does not exist.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise OctSamError(f"Config file {config_path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise OctSamError(
                f"Config file {config_path} must be a mapping of option: value, not {type(values).__name__}."
            )
        fields_by_name = {f.name: f for dc in ALL_ARGUMENTS for f in dataclasses.fields(dc)}
        unknown = sorted(set(values) - set(fields_by_name))
        if unknown:
            raise OctSamError(
                f"Unknown config key(s) {unknown} in {config_path}. Known keys: {', '.join(sorted(fields_by_name))}."
            )
        try:  # the file's own types first: a list or null for a number is refused here, naming the file
            values = {key: coerce(fields_by_name[key], value) for key, value in values.items()}
        except OptionError as err:
            raise err.at(config_path) from None
        parser.set_defaults(**values)
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise OctSamError(f"Unknown command-line argument(s) {rest}; run with --help for the options.")
    on_command_line = _given_on_command_line(parser, argv)

    def source(key: str) -> str:
        if key in on_command_line or config_path is None:
            return f"the command line, {CLI_NAMES.get(key, '--' + key.replace('_', '-'))}"
        return config_path if key in values else "the defaults"

    try:
        outputs = []
        for dc in ALL_ARGUMENTS:  # each dataclass checks its fields against the table (octsam.options)
            names = {f.name for f in dataclasses.fields(dc) if f.init}
            outputs.append(dc(**{k: v for k, v in vars(namespace).items() if k in names}))
        model_args, data_args, train_args = outputs
        validate(model_args, data_args, train_args)
    except OptionError as err:
        raise err.at(source(err.key)) from None
    return model_args, data_args, train_args


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The option names (dests) spelled out in ``argv``."""
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


def validate(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """The checks that involve several options (each option alone is checked by its dataclass, from the table)."""
    if not data_args.dataset:
        raise OctSamError("No dataset given: set `dataset:` in the config or pass --dataset DIR_OR_REPO.")
    if train_args.dice_weight == 0 and train_args.ce_weight == 0:
        raise OptionError("ce_weight", 0.0, "not 0 when dice_weight is 0 too (the loss would be 0: nothing learned)")
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise OctSamError("--push-to-hub needs --hub-model-id ORG/NAME.")


def _subset(target, source):
    """``target`` (a dataclass) built from the same-named fields of ``source``."""
    return target(**{f.name: getattr(source, f.name) for f in dataclasses.fields(target) if hasattr(source, f.name)})


def adapter_config(model_args: ModelArguments, labels: list[str]) -> OctSamConfig:
    """The one place an experiment's options become the adapter's ``OctSamConfig``."""
    config = _subset(OctSamConfig, _WithLabels(model_args, labels))
    config.lora_target_modules = list(config.lora_target_modules)
    if os.path.isdir(config.base_model):  # a local base: recorded absolute, so the adapter loads from any folder
        config.base_model = str(Path(config.base_model).resolve())
    return config


def augment_config(data_args: DataArguments) -> AugmentConfig | None:
    return _subset(AugmentConfig, data_args) if data_args.augment else None


def tile_config(config: OctSamConfig, data_args: DataArguments) -> TileConfig | None:
    """How training crops native tiles, or None when the model sees resized B-scans (``input_mode: resize``)."""
    if config.input_mode != "native":
        return None
    return TileConfig(
        size=config.image_size,
        overlap=config.tile_overlap,
        scale=config.tile_scale,
        crop_sampling=data_args.crop_sampling,
        crops_per_scan=data_args.crops_per_scan,
        foreground_ratio=data_args.foreground_ratio,
    )


def prompt_config(data_args: DataArguments) -> PromptConfig:
    return _subset(PromptConfig, data_args)


class _WithLabels:
    def __init__(self, args, labels: list[str]):
        self._args, self.labels = args, labels

    def __getattr__(self, name: str):
        return getattr(self._args, name)
