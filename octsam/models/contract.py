"""The model contract: what training, inference, evaluation and the app may ask of any octsam model, and what a
base's own module provides to the registry (``octsam.bases``).

``SegmentationModel`` is implemented by ``OctSamModel`` (SAM-family bases + LoRA) and ``UNetSegmenter`` (the
baseline); code outside ``octsam/models`` asks the model (``supports_prompts``) or its record
(``octsam.bases.base_of(config)``) instead of testing an architecture name. ``BaseHooks`` is the code half of
a registry record; a new base subclasses it and overrides what differs. No torch import here.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from octsam.adapter import OctSamConfig


@runtime_checkable
class SegmentationModel(Protocol):
    """A model that maps B-scans to K class logits (background is the fixed 0 logit), saved as an adapter folder.

    - ``preprocess(pixels)``: uint8 (B, C, S, S) at ``config.image_size`` -> the model's normalised float input.
    - ``forward(pixel_values, ...)`` -> ``(logits, iou)``: automatic-mode logits (B, K, h, w); ``iou`` is None for a
      model without prompts. Prompted calls (SAM family) take ``input_boxes`` / ``input_points`` / ``input_labels``.
    - ``class_logits(pixel_values)``: the automatic-mode class logits (B, K, h, w) alone.
    - ``image_embeddings(pixel_values)`` and ``decode(embeddings, ...)``: the two halves of ``forward`` for a model
      whose record has ``has_embeddings`` (encode once, decode per prompt); others raise ``OctSamError``.
    - ``trainable_parameters()``; ``parameter_summary()``: one line for the log.
    - ``merge()``: fold adapters into the weights for inference (returns self).
    - ``save_pretrained(folder)``; ``from_pretrained(folder_or_hub_id, revision=None, base_model=None, dtype=None)``;
      ``for_training(config, model_args, seed)``: a new model for an experiment (``octsam.config.adapter_config``
      of its ``ModelArguments``, and those arguments).
    - ``image_encoder``: the module worth ``torch.compile`` (None when there is none).
    """

    config: OctSamConfig
    supports_prompts: ClassVar[bool]

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def forward(self, pixel_values: torch.Tensor, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def class_logits(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def decode(self, embeddings: torch.Tensor, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def parameter_summary(self) -> str: ...

    def merge(self) -> SegmentationModel: ...

    def save_pretrained(self, folder: str | os.PathLike) -> Path: ...

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        revision: str | None = None,
        base_model: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SegmentationModel: ...

    @classmethod
    def for_training(cls, config: OctSamConfig, model_args: Any, seed: int = 0) -> SegmentationModel: ...

    @property
    def image_encoder(self) -> torch.nn.Module | None: ...


class BaseHooks:
    """The code of one base (``octsam.bases.Base.hooks`` names a subclass): what a SAM-family base's module
    provides to build and recognise it. The defaults fit a base with nothing to add (the U-Net baseline, whose model
    class is all of it); override what differs."""

    def build(self, base_model: str, revision: str | None = None, dtype: torch.dtype | None = None) -> Any:
        """The base model named ``base_model`` (SAM family: a transformers ``SamModel``, in eval mode)."""
        raise NotImplementedError(f"{type(self).__name__} builds no base model")

    def owns(self, model: Any) -> bool:
        """Whether a built base model (not wrapped by PEFT) is this base (an ``isinstance`` test on its encoder)."""
        return False

    def fingerprint(self, base_model: str) -> str | None:
        """SHA-256 of the base's weights where they are a file here, recorded in an adapter and checked on load;
        None when the name identifies them (a Hub id and its revision)."""
        return None

    def fuse_for_inference(self, model: Any) -> None:
        """Make a merged model faster for inference with the same outputs (e.g. fold BatchNorm); default: nothing."""

    def card_description(self, config: OctSamConfig) -> str | None:
        """Markdown naming the base on a model card (its package, licence, checksum); None: the card links
        ``config.base_model``."""
        return None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, cached per path, size and modification time (for ``BaseHooks.fingerprint``)."""
    stat = os.stat(path)
    return _sha256(os.fspath(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
