"""The models octsam trains and runs: the base registry (``bases``: one record per encoder kind) and the model
contract (``contract``), SAM + LoRA (``sam``; LiteMedSAM's encoder in ``litemedsam`` + ``tinyvit``), the MONAI U-Net
baseline (``unet``), and the exact fast attention for SAM's image encoder (``fast_attention``, ``triton_attention``).

Importing this package imports no torch and nothing of ``octsam.adapter`` (which reads the registry)."""

from __future__ import annotations

import os
import warnings

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
    """Load any octsam model folder or Hub repo with the model class of its base's record (``OctSamModel`` for a
    SAM-family adapter, ``UNetSegmenter`` for the U-Net baseline): an ``octsam.models.contract.SegmentationModel``.

    The adapter is resolved here once (a Hub id is downloaded to the cache); the loaders get the local folder.
    """
    from octsam.adapter import check_adapter_folder, resolve_adapter
    from octsam.bases import base_of

    folder = resolve_adapter(adapter, revision=revision)
    config = check_adapter_folder(folder)
    return base_of(config).model_class.from_pretrained(folder, base_model=base_model, dtype=dtype)
