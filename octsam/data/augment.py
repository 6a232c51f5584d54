"""Training augmentation: flips, small rotations and brightness/contrast on image and mask together
(albumentations), at the B-scan's native size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from octsam.data.contract import IGNORE_INDEX

if TYPE_CHECKING:
    import albumentations as A


@dataclass
class AugmentConfig:
    hflip_p: float = 0.5
    rotate_limit: float = 10.0
    rotate_p: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    brightness_contrast_p: float = 0.5

    @property
    def finite(self) -> bool:
        """True when the augmentation makes only finitely many images of a B-scan - flips alone (no rotation, no
        brightness/contrast change) - so a frozen encoder's embeddings can still be cached exactly: each B-scan and
        its mirror image are encoded once (octsam.training.embedding_cache)."""
        rotates = self.rotate_p > 0 and self.rotate_limit > 0
        shades = self.brightness_contrast_p > 0 and (self.brightness_limit > 0 or self.contrast_limit > 0)
        return not rotates and not shades


def build_augmentation(cfg: AugmentConfig) -> A.Compose:
    """Flips, small rotations (image bilinear, mask nearest, borders filled with ignore) and brightness/contrast."""
    import albumentations as A  # imported here: octsam.config (train.py --help) stays light
    import cv2

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip_p),
            A.Rotate(
                limit=cfg.rotate_limit,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=cfg.rotate_p,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=cfg.brightness_limit, contrast_limit=cfg.contrast_limit, p=cfg.brightness_contrast_p
            ),
        ],
        seed=0,
    )
