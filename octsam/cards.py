"""Model cards for adapter folders and Hub repos, rendered from ``model_cards/adapter_card.md``.

The card goes through ``huggingface_hub.ModelCard`` / ``ModelCardData``, so its YAML header is the Hub's metadata:
``library_name: peft``, ``base_model``, ``pipeline_tag: image-segmentation``, tags, datasets and the test metrics as
``model-index`` results (per-class Dice and IoU on the test split). PEFT writes its own ``README.md`` on every
``save_pretrained``; ``write_adapter_card`` must run after it, and ``is_octsam_card`` tells the two apart.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from pathlib import Path
from typing import Any

from octsam import __version__
from octsam.adapter import ADAPTER_CONFIG_NAME, OctSamConfig
from octsam.bases import base_of
from octsam.errors import OctSamError
from octsam.protocol import protocol_text
from octsam.textsafe import markdown_text


# Package data (pyproject.toml [tool.setuptools.package-data]): installed with octsam, wheel or editable.
def template_path(name: str) -> Path:
    """A card template: ``model_cards/NAME`` at the repository root in a checkout, ``octsam/model_cards/NAME`` in an
    installed wheel (pyproject.toml maps the root folder into the package)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "model_cards", here.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise OctSamError(
        f"Card template {name} is missing (looked in {here / 'model_cards'} and {here.parent / 'model_cards'}); "
        "reinstall octsam."
    )


CARD_MARKER = "octsam-adapter-card"
# Written where the repo id is not known yet; ``octsam.hub.push_adapter`` replaces it with the real one.
REPO_PLACEHOLDER = "ORG/NAME"
TASK_NAME = "OCT biomarker segmentation"
PROTOCOL = protocol_text(zero_shot=False)  # octsam.protocol: the same words as report.md and the README
BASE_TAGS = ["octsam", "segment-anything", "sam", "lora", "peft", "medical-imaging", "oct", "ophthalmology"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id such as ``facebook/sam-vit-base`` (not a local path)."""
    return bool(name) and bool(_REPO_ID.match(name)) and not os.path.exists(name)


def public_name(name: str | None) -> str | None:
    """What a card may say about a base model or dataset: a Hub id as it is, a local path only by its last part
    (a card is published; the author's folders are not)."""
    if not name or is_hub_id(name):
        return name
    last = Path(os.path.normpath(os.path.expanduser(str(name)))).name or str(name)
    return f"{last} (a local folder)"


def is_octsam_card(text: str) -> bool:
    """True when ``text`` is a card written by ``render_adapter_card`` (not PEFT's template)."""
    return f"<!-- {CARD_MARKER} -->" in text


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_ci(stats: dict, key: str) -> str:
    point = stats.get(f"{key}_mean")
    low, high = stats.get(f"{key}_ci_low"), stats.get(f"{key}_ci_high")
    text = _fmt(point)
    if text != "n/a" and low is not None and high is not None:
        text += f" [{_fmt(low, 3)}, {_fmt(high, 3)}]"
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _colour(index: int, labels: list[str]) -> str:
    from octsam.colors import class_color

    r, g, b = class_color(index, labels)
    return f"`#{r:02x}{g:02x}{b:02x}` (RGB {r}, {g}, {b})"


def _eval_results(config: OctSamConfig, metrics: dict, dataset: str | None, model_name: str) -> list:
    """Per-class Dice/IoU (and the foreground means) as ``huggingface_hub.EvalResult``s on the test split."""
    from huggingface_hub import EvalResult

    dataset_type = dataset if is_hub_id(dataset) else "custom"
    dataset_name = dataset or "private OCT test split"
    common = dict(
        task_type="image-segmentation",
        task_name=TASK_NAME,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split="test",
    )
    protocol = {"protocol": "per-image mean over test B-scans, empty-in-both excluded, native resolution"}
    results = []
    per_class = metrics.get("per_class") or {}
    for name in config.labels[1:]:
        stats = per_class.get(name) or {}
        for metric, key in (("dice", "dice_mean"), ("iou", "iou_mean")):
            if _finite(stats.get(key)):
                results.append(
                    EvalResult(
                        **common,
                        metric_type=metric,
                        metric_name=f"{'Dice' if metric == 'dice' else 'IoU'} ({name})",
                        metric_config=name,
                        metric_value=round(float(stats[key]), 4),
                        metric_args=protocol,
                    )
                )
    for metric, key in (("dice", "mean_dice"), ("iou", "mean_iou")):
        if _finite(metrics.get(key)):
            results.append(
                EvalResult(
                    **common,
                    metric_type=f"mean_{metric}",
                    metric_name=f"mean {'Dice' if metric == 'dice' else 'IoU'} (foreground classes)",
                    metric_value=round(float(metrics[key]), 4),
                    metric_args=protocol,
                )
            )
    return results


def card_data(
    config: OctSamConfig,
    metrics: dict | None = None,
    dataset: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
):
    """The card's ``ModelCardData`` (the YAML header the Hub reads)."""
    from huggingface_hub import ModelCardData

    model_name = (repo_id or "").split("/")[-1] or "octsam-" + "-".join(config.labels[1:])
    labels = [name.lower().replace(" ", "-") for name in config.labels[1:]]
    base = base_of(config)
    if not base.peft_adapter:
        tags = [*base.card_tags, *labels]
    else:
        tags = BASE_TAGS + [config.mode] + labels + list(base.card_tags)
    eval_results = _eval_results(config, metrics, dataset, model_name) if metrics else None
    return ModelCardData(
        library_name="peft" if base.peft_adapter else "octsam",
        base_model=config.base_model if base.peft_adapter and is_hub_id(config.base_model) else None,
        pipeline_tag="image-segmentation",
        tags=tags,
        datasets=[dataset] if is_hub_id(dataset) else None,
        license=license,
        metrics=["dice", "iou"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )


def _training_rows(training: dict | None) -> list[tuple[str, str]]:
    """Scalar settings and results of the training run, in the order given (nested values are skipped)."""
    rows = []
    for key, value in (training or {}).items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            value = ", ".join(_fmt(v) for v in value)
        if isinstance(value, (str, int, float, bool)) or value is None:
            rows.append((str(key), _fmt(value)))
    return rows


def render_adapter_card(
    config: OctSamConfig,
    metrics: dict | None = None,
    training: dict | None = None,
    dataset: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The adapter's model card (README.md text).

    ``metrics`` is ``octsam.evaluation.metrics.EvaluationResult.to_dict()`` on the test split (or the ``*_summary.json`` that
    ``write_results`` writes); ``training`` a flat dict of training settings/results; ``dataset`` a Hub dataset id
    or a description; ``repo_id`` the Hub repo the card is for (``ORG/NAME`` is shown while unknown).

    Long because it gathers every field the card template shows (model-index metrics, labels and colours, base,
    training, usage); each field is one plain assignment into the template's context.
    """
    from huggingface_hub import ModelCard

    metrics = metrics or None
    dataset = public_name(dataset)
    if not base_of(config).peft_adapter:
        return _render_unet_card(config, metrics, dataset, repo_id, license)
    base_shown = public_name(config.base_model)
    data = card_data(config, metrics, dataset, repo_id, license)
    biomarkers = ", ".join(markdown_text(n) for n in config.labels[1:])
    model_ref = repo_id or REPO_PLACEHOLDER
    label_rows = [{"index": 0, "name": markdown_text(config.labels[0]), "colour": "not drawn"}] + [
        {"index": i, "name": markdown_text(name), "colour": _colour(i, list(config.labels))}
        for i, name in enumerate(config.labels)
        if i > 0
    ]
    first = config.labels[1]
    if config.mode == "prompted":
        mode_text = "give a box and/or points per object and class; every prompt of a class adds to that class's mask."
        python_prompt = ", prompts=[[Prompt(label=1, box=(120, 80, 300, 160))]]"
        cli_prompt = f" --box {first}:120,80,300,160"
        eval_mode = "one box per connected component of each class, taken from the reference mask"
    else:
        mode_text = (
            "no prompts are needed; each class has learned prompt tokens and one forward pass gives every class."
        )
        python_prompt = ""
        cli_prompt = ""
        eval_mode = "automatic mode (no prompts)"
    activation_text = (
        "classes compete per pixel: softmax with a zero background logit"
        if config.class_activation == "softmax"
        else "an independent sigmoid per class; the largest positive logit wins the pixel"
    )
    metric_rows, mean_dice, mean_iou, n_images, n_patients, protocol = _metric_rows(config, metrics)
    base_model_link = base_of(config).implementation.card_description(config)  # the base's own words, if any
    if base_model_link is None and is_hub_id(config.base_model):
        base_model_link = f"[`{config.base_model}`](https://huggingface.co/{config.base_model})"
    elif base_model_link is None:
        base_model_link = f"`{base_shown}`"
    config_rows = [
        (
            "base model",
            f"`{base_shown}`" + (f" @ `{config.base_model_revision}`" if config.base_model_revision else ""),
        ),
        ("mode", config.mode),
        ("class activation", config.class_activation),
        (
            "input size",
            f"{config.image_size} x {config.image_size} (B-scans are resized, outputs come back at native size)",
        ),
        ("normalisation", f"mean {list(config.image_mean)}, std {list(config.image_std)} (0-255 scale)"),
        ("LoRA", f"rank {config.lora_r}, alpha {config.lora_alpha}, dropout {config.lora_dropout}"),
        ("LoRA targets", ", ".join(config.lora_target_modules)),
        ("mask decoder", "fully trained" if config.train_mask_decoder else "frozen (or LoRA)"),
    ]
    if config.mode == "automatic":
        mask_tokens = config.automatic_head == "mask_tokens"
        config_rows.append(("automatic head", "SAM's multimask output tokens, one per class; output head trained"
                            if mask_tokens else "learned prompt tokens per class"))  # fmt: skip
        config_rows.append(
            ("prompt tokens" if mask_tokens else "prompt tokens per class", str(config.tokens_per_class))
        )
    config_rows.append(("octsam version", config.octsam_version))
    trained_parts = ", ".join(
        part
        for part, on in (
            ("the trained mask decoder", config.train_mask_decoder),
            ("the class prompt tokens", config.mode == "automatic"),
        )
        if on
    )
    training = dict(training or {})
    n_train = training.get("train_scans") or training.get("n_train")
    content = ModelCard.from_template(
        data,
        template_path=str(template_path("adapter_card.md")),
        marker=CARD_MARKER,
        title=f"octsam: SAM + LoRA for {biomarkers} in OCT" + (f" ({repo_id})" if repo_id else ""),
        base_model_link=base_model_link,
        base_model_code=f"`{base_shown}`",
        biomarkers=biomarkers,
        label_list=", ".join(f"{i} {markdown_text(name)}" for i, name in enumerate(config.labels)),
        mode=config.mode,
        mode_text=mode_text,
        activation_text=activation_text,
        label_rows=label_rows,
        model_ref=model_ref,
        python_prompt=python_prompt,
        cli_prompt=cli_prompt,
        metric_rows=metric_rows,
        mean_dice=mean_dice,
        mean_iou=mean_iou,
        n_images=n_images if n_images is not None else "?",
        n_patients=n_patients,
        eval_mode=eval_mode,
        protocol=protocol,
        dataset=markdown_text(dataset) if dataset else dataset,
        dataset_link=f"https://huggingface.co/datasets/{dataset}" if is_hub_id(dataset) else None,
        training_rows=_training_rows(training),
        config_rows=config_rows,
        trained_parts=trained_parts,
        n_train=n_train,
        image_size=config.image_size,
        octsam_version=__version__,
        year=datetime.date.today().year,
    ).content
    if config.mode == "prompted":
        content = content.replace(
            "from octsam.segmenter import Segmenter", "from octsam.segmenter import Prompt, Segmenter", 1
        )
    return content


def write_adapter_card(
    folder: str | os.PathLike,
    config: OctSamConfig | None = None,
    metrics: dict | None = None,
    training: dict | None = None,
    dataset: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``README.md`` into an adapter folder (over PEFT's own card; call it after ``save_pretrained``)."""
    folder = Path(folder)
    if config is None:
        config = OctSamConfig.from_json_file(folder / ADAPTER_CONFIG_NAME)
    text = render_adapter_card(config, metrics, training, dataset, repo_id, license)
    path = folder / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _metric_rows(config: OctSamConfig, metrics: dict | None):
    """The card's per-class rows, foreground means, test-split size and protocol text (with the interval kind)."""
    rows, mean_dice, mean_iou, n_images, n_patients, protocol = [], "n/a", "n/a", None, None, PROTOCOL
    if metrics:
        per_class = metrics.get("per_class") or {}
        for name in config.labels[1:]:
            stats = per_class.get(name) or {}
            rows.append(
                {
                    "name": markdown_text(name),
                    "dice": _with_ci(stats, "dice"),
                    "iou": _with_ci(stats, "iou"),
                    "dice_pooled": _fmt(stats.get("dice_pooled")),
                    "iou_pooled": _fmt(stats.get("iou_pooled")),
                    "n": _fmt(stats.get("dice_n_images")),
                }
            )
        mean_dice, mean_iou = _fmt(metrics.get("mean_dice")), _fmt(metrics.get("mean_iou"))
        settings = metrics.get("settings") or {}
        n_images, n_patients = settings.get("n_images"), settings.get("n_patients")
        if settings.get("confidence") and settings.get("bootstrap_unit"):
            protocol += (
                f" Brackets: {float(settings['confidence']):.0%} percentile bootstrap intervals over "
                f"{settings['bootstrap_unit']}s ({settings.get('n_bootstrap', '?')} resamples)."
            )
    return rows, mean_dice, mean_iou, n_images, n_patients, protocol


def _render_unet_card(config: OctSamConfig, metrics, dataset, repo_id, license) -> str:
    """The U-Net baseline's own card: what it is (no base model, LoRA or prompts) and its files."""
    from huggingface_hub import ModelCard

    rows, mean_dice, mean_iou, n_images, n_patients, protocol = _metric_rows(config, metrics)
    biomarkers = ", ".join(markdown_text(n) for n in config.labels[1:])
    channels = config.extra.get("unet_channels")
    config_rows = [
        ("architecture", "MONAI UNet (2-D, residual units)" + (f", channels {list(channels)}" if channels else "")),
        ("input size", f"{config.image_size} x {config.image_size} (outputs come back at native size)"),
        ("normalisation", f"mean {list(config.image_mean)}, std {list(config.image_std)} (0-255 scale)"),
        ("octsam version", config.octsam_version),
    ]
    return ModelCard.from_template(
        card_data(config, metrics, dataset, repo_id, license),
        template_path=str(template_path("unet_card.md")),
        marker=CARD_MARKER,
        title=f"octsam: U-Net baseline for {biomarkers} in OCT" + (f" ({repo_id})" if repo_id else ""),
        biomarkers=biomarkers,
        label_rows=[{"index": 0, "name": markdown_text(config.labels[0]), "colour": "not drawn"}]
        + [
            {"index": i, "name": markdown_text(n), "colour": _colour(i, list(config.labels))}
            for i, n in enumerate(config.labels)
            if i
        ],
        model_ref=repo_id or REPO_PLACEHOLDER,
        metric_rows=rows,
        mean_dice=mean_dice,
        mean_iou=mean_iou,
        n_images=n_images if n_images is not None else "?",
        n_patients=n_patients,
        protocol=protocol,
        dataset=markdown_text(dataset) if dataset else dataset,
        config_rows=config_rows,
    ).content
