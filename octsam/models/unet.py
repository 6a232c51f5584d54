"""MONAI U-Net baseline implementing the model contract (``octsam.models.contract.SegmentationModel``) like
``OctSamModel`` (class logits, preprocess, adapter-like folder), so it trains through the same ``train.py`` and
evaluates with the same command; its registry record is ``unet``."""

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

    supports_prompts = False  # no prompt encoder: automatic only, no zero-shot, no clicks in the app

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

    @classmethod
    def for_training(cls, config: OctSamConfig, model_args, seed: int = 0) -> UNetSegmenter:
        """A new U-Net for the labels of ``config`` (the experiment's adapter config) with its ``ModelArguments``'
        ``unet_image_size`` and ``unet_channels``; it tiles like an adapter does (``input_mode``, ``tile_overlap``,
        ``tile_scale`` of ``config``)."""
        model = cls.create(config.labels, model_args.unet_image_size, model_args.unet_channels, seed=seed)
        for name in ("input_mode", "tile_overlap", "tile_scale"):
            setattr(model.config, name, getattr(config, name))
        model.config.__post_init__()
        return model

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.pixel_mean.device, non_blocking=True).float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return (pixels - self.pixel_mean) / self.pixel_std

    def forward(self, pixel_values: torch.Tensor, **_: object) -> tuple[torch.Tensor, None]:
        return self.net(pixel_values), None

    def class_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values)[0]

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise OctSamError("The U-Net baseline has no image embedding to prompt.")

    def decode(self, embeddings: torch.Tensor, **_: object) -> tuple[torch.Tensor, None]:
        raise OctSamError("The U-Net baseline has no image embedding to prompt.")

    @property
    def image_encoder(self) -> None:
        return None  # small: nothing worth compiling on its own

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

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
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        revision: str | None = None,
        base_model: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> UNetSegmenter:
        """Load a U-Net folder (or Hub repo id); ``base_model`` is ignored (a U-Net has no base)."""
        from octsam.adapter import check_adapter_folder, resolve_adapter

        folder = resolve_adapter(adapter, revision=revision)
        model = cls.from_folder(folder, check_adapter_folder(folder))
        return model if dtype is None else model.to(dtype)

    @classmethod
    def from_folder(cls, folder: Path, config: OctSamConfig) -> UNetSegmenter:
        variant = config.extra.get("unet_variant")
        if variant:  # a subclass's folder (DynUNet): the model class of the record its --model names
            from octsam.bases import get_base

            cls = get_base(variant).model_class
        model = cls(config)
        try:
            load_model(model.net, str(folder / UNET_WEIGHTS_NAME))
        except (OSError, RuntimeError) as err:
            raise OctSamError(f"Cannot load U-Net weights from {folder / UNET_WEIGHTS_NAME}: {err}") from err
        return model.eval()
