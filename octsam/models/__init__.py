"""The models octsam trains and runs: SAM + LoRA (``sam``), the MONAI U-Net baseline (``unet``), and the exact fast
attention for SAM's image encoder (``fast_attention``, ``triton_attention``)."""

from __future__ import annotations

import os

from octsam.adapter import check_adapter_folder, resolve_adapter

#: Modes of octsam's exact fast attention for SAM's image encoder (``octsam.models.fast_attention``); listed here,
#: without importing torch, so that command lines can offer them in ``--help`` cheaply.
ATTENTION_MODES = ("auto", "fold", "fold_flash", "bias", "triton")


def load_model(
    adapter: str | os.PathLike,
    revision: str | None = None,
    base_model: str | None = None,
    is_trainable: bool = False,
    dtype=None,
):
    """Load any octsam model folder or Hub repo: a SAM adapter (``OctSamModel``) or the U-Net baseline.

    The adapter is resolved here once (a Hub id is downloaded to the cache); the loaders get the local folder.
    """
    folder = resolve_adapter(adapter, revision=revision)
    config = check_adapter_folder(folder)
    if config.architecture == "unet":
        from octsam.models.unet import UNetSegmenter

        return UNetSegmenter.from_folder(folder, config)
    from octsam.models.sam import OctSamModel

    return OctSamModel.from_pretrained(folder, base_model=base_model, is_trainable=is_trainable, dtype=dtype)
