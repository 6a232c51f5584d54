"""MONAI U-Net baseline with the same interface as ``OctSamModel`` (class logits, preprocess, adapter-like folder),
so it trains through the same ``train.py`` and evaluates with the same command."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from octsam.adapter import ADAPTER_CONFIG_NAME, UNET_WEIGHTS_NAME, OctSamConfig
from octsam.errors import OctSamError

# Grey B-scans scaled to about [-2, 2]; repeated over the 3 input channels like SAM's input.
UNET_MEAN = (127.5, 127.5, 127.5)
UNET_STD = (63.75, 63.75, 63.75)
FOREGROUND_PRIOR = 0.01
"""A new U-Net's foreground probability per pixel and class (its output bias)."""


class UNetSegmenter(nn.Module):
    """MONAI ``UNet`` (2D, residual units) predicting K class logits; background is the fixed 0 logit, as in SAM."""

    VARIANT = "unet"  # recorded as extra["unet_variant"] by subclasses (octsam.models.dynunet)
    NETWORK = "monai.networks.nets.UNet"

    def __init__(self, config: OctSamConfig):
        super().__init__()
        self.config = config
        self.net = self._build_net(tuple(config.extra.get("unet_channels", (32, 64, 128, 256, 512))))
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, -1, 1, 1), persistent=False)

    def _build_net(self, channels: tuple[int, ...]) -> nn.Module:
        from monai.networks.nets import UNet

        net = UNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=self.config.num_labels - 1,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=2,
        )
        # Every pixel starts as background (foreground probability about 1 %, the prior initialisation of Lin et al.
        # 2017): with a zero output bias half the pixels start as each class, and Dice + CE then sat 10-25 epochs on
        # an all-fluid plateau on the Duke data (benchmarks/DUKE_RESULTS.md), long enough for early stopping to end
        # the run there. The last convolution adds its bias to the output (MONAI's residual unit sums it with the
        # identity).
        last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        nn.init.constant_(last.bias, -math.log(1 / FOREGROUND_PRIOR - 1))
        return net

    @classmethod
    def create(cls, labels: list[str], image_size: int, channels: list[int], seed: int = 0) -> UNetSegmenter:
        depth = len(channels) - 1
        if image_size % (2**depth):
            raise OctSamError(f"unet_image_size {image_size} must be divisible by 2^{depth} for {channels}.")
        config = OctSamConfig(
            labels=labels,
            architecture="unet",
            base_model=cls.NETWORK,
            image_size=image_size,
            image_mean=UNET_MEAN,
            image_std=UNET_STD,
            lora_target_modules=[],
            train_mask_decoder=False,
            extra={
                "unet_channels": list(channels),
                **({} if cls.VARIANT == "unet" else {"unet_variant": cls.VARIANT}),
            },
        )
        torch.manual_seed(seed)
        return cls(config)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.pixel_mean.device, non_blocking=True).float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return (pixels - self.pixel_mean) / self.pixel_std

    def forward(self, pixel_values: torch.Tensor, **_: object) -> tuple[torch.Tensor, None]:
        return self.net(pixel_values), None

    def parameter_summary(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        return f"trainable parameters: {total:,} of {total:,} (100.00%)"

    def merge(self) -> UNetSegmenter:
        return self

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # save_model keeps one copy of tensors a network shares between modules (DynUNet's skip layers)
        save_model(self.net, str(folder / UNET_WEIGHTS_NAME))
        self.config.to_json_file(folder / ADAPTER_CONFIG_NAME)
        return folder

    @classmethod
    def from_folder(cls, folder: Path, config: OctSamConfig) -> UNetSegmenter:
        if config.extra.get("unet_variant") == "dynunet":
            from octsam.models.dynunet import DynUNetSegmenter

            cls = DynUNetSegmenter
        model = cls(config)
        try:
            load_model(model.net, str(folder / UNET_WEIGHTS_NAME))
        except (OSError, RuntimeError) as err:
            raise OctSamError(f"Cannot load U-Net weights from {folder / UNET_WEIGHTS_NAME}: {err}") from err
        return model.eval()
