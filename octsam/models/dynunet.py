"""The strong CNN baseline: MONAI ``DynUNet`` configured like nnU-Net's 2-D U-Net, with deep supervision.

nnU-Net 2D for 256 x 256 patches: six stages (3 x 3 convolutions, stride 2 from the second, instance norm, leaky ReLU),
32 -> 512 features (capped), transposed-convolution upsampling, and deep supervision on the decoder's higher
resolutions with weights halving per level (the lowest ones left out), all normalised to sum 1. It trains on the same
native crops, folds and augmentation as the adapters and is evaluated by the same sliding window (its folder records
``input_mode`` like an adapter's). ``unet_channels`` sets the features per stage (``[16, 32, 64, 128, 256, 256]`` is a
quarter of the compute for a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from octsam.models.unet import FOREGROUND_PRIOR, UNetSegmenter

NNUNET_2D_FEATURES = (32, 64, 128, 256, 512, 512)
DEEP_SUPERVISION_LEVELS = 3


@dataclass
class DeepSupervision:
    """The extra outputs of a deep-supervised forward pass: logits of the decoder's lower levels (upsampled to the
    output size by MONAI) and their loss weights; the training loop adds ``sum(w * loss(l))`` to the main loss."""

    logits: list[torch.Tensor]
    weights: list[float]
    main_weight: float


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights: 1, 1/2, 1/4, ... for the main output and each deeper level, normalised to sum 1."""
    raw = [0.5**i for i in range(levels + 1)]
    return [w / sum(raw) for w in raw]


class DynUNetSegmenter(UNetSegmenter):
    """``UNetSegmenter`` (same folder, preprocessing and (logits, extras) forward) with a DynUNet network."""

    VARIANT = "dynunet"
    NETWORK = "monai.networks.nets.DynUNet"

    def _build_net(self, channels: tuple[int, ...]) -> nn.Module:
        from monai.networks.nets import DynUNet

        strides = [1] + [2] * (len(channels) - 1)
        levels = min(DEEP_SUPERVISION_LEVELS, len(channels) - 2)
        net = DynUNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=self.config.num_labels - 1,
            kernel_size=[3] * len(channels),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(channels),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=levels > 0,
            deep_supr_num=max(levels, 1),
            res_block=False,
        )
        # every head starts at a 1 % foreground prior (see octsam.models.unet)
        for head in [net.output_block, *getattr(net, "deep_supervision_heads", [])]:
            conv = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.constant_(conv.bias, -math.log(1 / FOREGROUND_PRIOR - 1))
        self.levels = levels
        return net

    def forward(self, pixel_values: torch.Tensor, **_: object):
        out = self.net(pixel_values)
        if out.dim() == 5:  # training with deep supervision: (B, 1 + levels, K, H, W)
            weights = deep_supervision_weights(out.shape[1] - 1)
            extras = DeepSupervision([out[:, i] for i in range(1, out.shape[1])], weights[1:], weights[0])
            return out[:, 0], extras
        return out, None
