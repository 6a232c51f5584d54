"""Native-resolution tiles: training crops at the B-scan's own pixel size, and the sliding-window grid of inference.

A 768 x 496 B-scan shrunk into LiteMedSAM's 256 px input loses two thirds of its pixels in each direction, and SAM's
decoder predicts at a quarter of its input, so a mask pixel then covers about 12 x 12 native pixels and small cysts
vanish. In ``input_mode: native`` (``OctSamConfig``) the model sees ``image_size`` x ``image_size`` tiles of the
B-scan at its own pixel size (times ``tile_scale``), as nnU-Net trains on patches:

- training draws crops with foreground oversampling (MONAI ``RandCropByPosNegLabel``: a share ``foreground_ratio`` of
  the crops is centred on a biomarker pixel) - or, with ``crop_sampling: grid``, uses fixed crops (the inference grid
  plus one crop centred on each lesion), which repeat every epoch so that a frozen encoder's embeddings can be cached;
- inference slides a window over the whole B-scan with overlap and Gaussian blending (MONAI
  ``sliding_window_inference``, in ``octsam.segmenter``); :func:`grid_windows` is that same grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from octsam.data.contract import IGNORE_INDEX

CROP_SAMPLINGS = ("random", "grid")


@dataclass
class TileConfig:
    """How training draws native-resolution crops (the tile size is the model's ``image_size``)."""

    size: int
    overlap: float = 0.5
    scale: float = 1.0
    crop_sampling: str = "random"
    crops_per_scan: int = 4
    foreground_ratio: float = 0.5


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """The (H, W) of a B-scan of ``shape`` resampled by ``scale`` (1: unchanged)."""
    if scale == 1:
        return int(shape[0]), int(shape[1])
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def rescale(image: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    """Resample a B-scan (or, with ``nearest``, a class mask) by ``scale``."""
    height, width = scaled_shape(image.shape, scale)
    if (height, width) == image.shape[:2]:
        return image
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return cv2.resize(image, (width, height), interpolation=interpolation)


def pad_to_tile(image: np.ndarray, mask: np.ndarray | None, size: int):
    """Pad a B-scan smaller than a tile at the right and bottom (image: its minimum; mask: ignored)."""
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return image, mask
    new_h, new_w = max(height, size), max(width, size)
    padded = np.full((new_h, new_w, *image.shape[2:]), image.min(), dtype=image.dtype)
    padded[:height, :width] = image
    if mask is not None:
        out = np.full((new_h, new_w), IGNORE_INDEX, dtype=mask.dtype)
        out[:height, :width] = mask
        mask = out
    return padded, mask


def grid_windows(shape: tuple[int, ...], size: int, overlap: float) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the sliding-window tiles over a B-scan of ``shape`` (padded to at least one tile):
    the grid of MONAI's ``sliding_window_inference`` with the same overlap."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    image_size = (max(int(shape[0]), size), max(int(shape[1]), size))
    interval = _get_scan_interval(image_size, (size, size), 2, (overlap, overlap))
    return [(int(s[0].start), int(s[1].start)) for s in dense_patch_slices(image_size, (size, size), interval)]


def foreground_windows(mask: np.ndarray, size: int) -> list[tuple[int, int]]:
    """One tile per lesion (connected component of any biomarker), centred on it and kept inside the B-scan."""
    height, width = mask.shape
    foreground = ((mask > 0) & (mask != IGNORE_INDEX)).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    windows = []
    for label in range(1, count):
        cx, cy = centroids[label]
        y = int(np.clip(round(cy - size / 2), 0, max(height - size, 0)))
        x = int(np.clip(round(cx - size / 2), 0, max(width - size, 0)))
        windows.append((y, x))
    return list(dict.fromkeys(windows))


def crop(array: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(array[y : y + size, x : x + size])


def random_crop(image: np.ndarray, mask: np.ndarray, size: int, foreground_ratio: float, seed: int):
    """One ``size`` x ``size`` crop of a (padded) B-scan and its mask; with probability ``foreground_ratio`` it is
    centred on a biomarker pixel (MONAI ``RandCropByPosNegLabel``, which keeps the crop inside the B-scan)."""
    import torch
    from monai.transforms import RandCropByPosNegLabel

    foreground = ((mask > 0) & (mask != IGNORE_INDEX))[None]
    channels = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    stacked = np.concatenate([channels, mask[None]], axis=0)
    cropper = RandCropByPosNegLabel(
        spatial_size=(size, size), pos=foreground_ratio, neg=1.0 - foreground_ratio, num_samples=1
    )
    cropper.set_random_state(seed=seed)
    with warnings.catch_warnings():  # a B-scan without biomarkers: MONAI warns and crops anywhere, as meant here
        warnings.simplefilter("ignore")
        out = cropper(torch.from_numpy(stacked), label=torch.from_numpy(foreground))[0]
    out = np.asarray(out)
    crop_image = out[0] if image.ndim == 2 else out[:-1].transpose(1, 2, 0)
    return np.ascontiguousarray(crop_image.astype(image.dtype)), np.ascontiguousarray(out[-1].astype(mask.dtype))


def box_window(box: tuple[float, float, float, float], shape: tuple[int, int], size: int) -> tuple[int, int, int]:
    """A square window (y, x, side) around a prompt's box (x0, y0, x1, y1) for prompted native mode: a tile of the
    model's size centred on the box, or for a box larger than a tile a square around it with 12.5 % margin (then
    resized into the model's input); kept inside the B-scan where it fits."""
    x0, y0, x1, y1 = box
    extent = max(x1 - x0, y1 - y0)
    side = int(max(size, np.ceil(extent * 1.125)))
    height, width = shape
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    y = int(np.clip(round(cy - side / 2), min(0, height - side), max(height - side, 0)))
    x = int(np.clip(round(cx - side / 2), min(0, width - side), max(width - side, 0)))
    return y, x, side


def window_pixels(image: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` window of ``image`` at (y, x); parts outside the B-scan take its minimum."""
    height, width = image.shape[:2]
    if 0 <= y and 0 <= x and y + side <= height and x + side <= width:
        return np.ascontiguousarray(image[y : y + side, x : x + side])
    out = np.full((side, side, *image.shape[2:]), image.min(), dtype=image.dtype)
    ys, xs = max(y, 0), max(x, 0)
    ye, xe = min(y + side, height), min(x + side, width)
    out[ys - y : ye - y, xs - x : xe - x] = image[ys:ye, xs:xe]
    return out
