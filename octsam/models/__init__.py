"""The models octsam trains and runs: SAM + LoRA (``sam``), the MONAI U-Net baseline (``unet``), and the exact fast
attention for SAM's image encoder (``fast_attention``, ``triton_attention``)."""

from __future__ import annotations

import os
import warnings

from octsam.adapter import check_adapter_folder, resolve_adapter

# PEFT reads transformers' deprecated ``is_gradient_checkpointing`` on every wrap; the FutureWarning is theirs to fix
# and says nothing to an octsam user, so it is silenced here (only that message).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

#: Modes of octsam's exact fast attention for SAM's image encoder (``octsam.models.fast_attention``); listed here,
#: without importing torch, so that command lines can offer them in ``--help`` cheaply.
ATTENTION_MODES = ("auto", "fold", "fold_flash", "bias", "triton")


def load_model(
    adapter: str | os.PathLike,
    revision: str | None = None,
    base_model: str | None = None,
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

    return OctSamModel.from_pretrained(folder, base_model=base_model, dtype=dtype)
