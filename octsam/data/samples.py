"""Data pipeline: joint image/mask augmentation (albumentations) and resizing on CPU workers, uint8 batches.

Workers produce uint8 (C, S, S) images and uint8 (S, S) masks at the model's input size; the conversion to float,
grey-to-RGB and SAM's normalisation happen on the accelerator (``OctSamModel.preprocess``), which moves 4x (grey:
12x) fewer bytes than float RGB and keeps the workers cheap. Augmentation runs at native size (cheaper than at 1024).

Every random choice for sample ``i`` in epoch ``e`` comes from a generator seeded by (seed, e, i), so a run is
reproducible whatever the number of workers, and a resumed run sees exactly the batches an uninterrupted one would.
The training sampler encodes the epoch in the index it yields (``e * n + i``) so persistent workers need no state.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from octsam.data.augment import AugmentConfig, build_augmentation
from octsam.data.contract import IGNORE_INDEX
from octsam.data.prompts import PromptConfig, instance_prompts
from octsam.data.tiles import TileConfig


def to_uint8_image(image) -> np.ndarray:
    """A PIL image or array -> uint8 (H, W) for grey scans, (H, W, 3) for colour ones (same rules as ``read_scan``)."""
    from octsam.data.dataset import _gray_if_equal, to_uint8

    array = to_uint8(np.asarray(image))
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[:, :, :3]
        array = array[:, :, 0] if array.shape[2] == 1 else _gray_if_equal(array)
    return np.ascontiguousarray(array)


def input_frame(shape: tuple[int, ...], size: int, resize: str = "stretch") -> tuple[float, float, int, int]:
    """Where a B-scan of ``shape`` (H, W, ...) lands in the model's ``size`` x ``size`` input:
    (scale_y, scale_x, valid_h, valid_w). ``stretch``: resized to the square; ``pad``: longest side to ``size``
    (MedSAM's rounding), the rest padded at the right and bottom."""
    height, width = shape[0], shape[1]
    if resize == "pad":
        scale = size / max(height, width)
        return scale, scale, max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))  # >= 1 pixel
    return size / height, size / width, size, size


def _resize(array: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    if array.shape[0] == height and array.shape[1] == width:
        return array
    if nearest:
        return cv2.resize(array, (width, height), interpolation=cv2.INTER_NEAREST)
    shrink = array.shape[0] > height and array.shape[1] > width
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_image(image: np.ndarray, size: int, resize: str = "stretch") -> np.ndarray:
    """Bilinear resize of a uint8 image into the ``size`` x ``size`` input (area averaging when shrinking).

    ``pad``: the padding takes the image's minimum, so a per-image min-max normalisation maps it to 0 - the same
    as normalising the resized image and padding with zeros (LiteMedSAM's input)."""
    _, _, height, width = input_frame(image.shape, size, resize)
    resized = _resize(image, height, width)
    if (height, width) == (size, size):
        return resized
    out = np.full((size, size, *image.shape[2:]), resized.min(), dtype=image.dtype)
    out[:height, :width] = resized
    return out


def resize_mask(mask: np.ndarray, size: int, resize: str = "stretch") -> np.ndarray:
    """Nearest-neighbour resize of a class mask into the input frame; padding is ignored (``IGNORE_INDEX``)."""
    _, _, height, width = input_frame(mask.shape, size, resize)
    resized = _resize(mask, height, width, nearest=True)
    if (height, width) == (size, size):
        return resized
    out = np.full((size, size), IGNORE_INDEX, dtype=mask.dtype)
    out[:height, :width] = resized
    return out


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) -> uint8 tensor (C, H, W)."""
    return torch.from_numpy(image[None] if image.ndim == 2 else image.transpose(2, 0, 1).copy())


class SegmentationSamples(Dataset):
    """B-scans of one split as uint8 tensors at the model's input size (+ prompts in prompted mode).

    With ``tiles`` (native-resolution mode, ``octsam.data.tiles``) an item is a tile of a B-scan at its own pixel
    size instead of the resized B-scan: ``crops_per_scan`` random crops per B-scan and epoch with foreground
    oversampling, or (``crop_sampling: grid``, and always for validation with ``validation=True``) the fixed tiles of
    the inference grid (plus, when training, one tile centred on each lesion)."""

    def __init__(
        self,
        split,
        image_size: int,
        num_labels: int,
        augment: AugmentConfig | None = None,
        prompts: PromptConfig | None = None,
        seed: int = 0,
        resize: str = "stretch",
        tiles: TileConfig | None = None,
        validation: bool = False,
    ):
        self.split = split
        self.image_size = image_size
        self.num_labels = num_labels
        self.augment = build_augmentation(augment) if augment is not None else None
        self.prompts = prompts
        self.seed = seed
        self.resize = resize
        self.tiles = tiles
        # Fixed tiles: every (scan, y, x) of the inference grid for validation; for grid sampling, per scan its grid
        # tiles and its lesion-centred tiles, from which each epoch draws ``crops_per_scan`` (foreground oversampled).
        self.windows = self.scan_windows = None
        if tiles is not None and validation:
            self.windows = [(i, y, x) for i, found in enumerate(self._fixed_windows()) for y, x, _ in found]
        elif tiles is not None and tiles.crop_sampling == "grid":
            self.scan_windows = self._fixed_windows(with_lesions=True)

    def _fixed_windows(self, with_lesions: bool = False) -> list[list[tuple[int, int, bool]]]:
        """Per scan, its tiles (y, x, holds a biomarker)."""
        from octsam.data.tiles import foreground_windows, grid_windows, rescale

        cfg = self.tiles
        out = []
        for index in range(len(self.split)):
            mask = rescale(_mask_array(self.split[index]["mask"]), cfg.scale, nearest=True)
            found = grid_windows(mask.shape, cfg.size, cfg.overlap)
            if with_lesions:
                found += foreground_windows(mask, cfg.size)
            foreground = (mask > 0) & (mask != IGNORE_INDEX)
            out.append([(y, x, bool(foreground[y : y + cfg.size, x : x + cfg.size].any())) for y, x in
                        dict.fromkeys(found)])  # fmt: skip
        return out

    def __len__(self) -> int:
        if self.windows is not None:
            return len(self.windows)
        return len(self.split) * (self.tiles.crops_per_scan if self.tiles is not None else 1)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        epoch, item = divmod(int(key), len(self))
        if self.windows is not None:
            index, y, x = self.windows[item]
            crop_id = item
        else:
            index, crop_id = divmod(item, self.tiles.crops_per_scan) if self.tiles is not None else (item, 0)
        seed_seq = np.random.SeedSequence([self.seed, epoch, index] + ([crop_id] if self.tiles is not None else []))
        rng = np.random.default_rng(seed_seq)
        if self.scan_windows is not None:
            y, x = self._draw_window(self.scan_windows[index], rng)
        row = self.split[index]
        image = to_uint8_image(row["image"])
        mask = _mask_array(row["mask"])
        if self.augment is not None:
            self.augment.set_random_seed(int(seed_seq.generate_state(1)[0]))
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if self.tiles is None:
            image = resize_image(image, self.image_size, self.resize)
            mask = resize_mask(mask, self.image_size, self.resize)
        else:
            from octsam.data.tiles import crop, pad_to_tile, random_crop, rescale

            size = self.tiles.size
            image, mask = rescale(image, self.tiles.scale), rescale(mask, self.tiles.scale, nearest=True)
            image, mask = pad_to_tile(image, mask, size)
            if self.windows is not None or self.scan_windows is not None:
                image, mask = crop(image, y, x, size), crop(mask, y, x, size)
            else:
                crop_seed = int(seed_seq.generate_state(2)[1] % (2**31))
                image, mask = random_crop(image, mask, size, self.tiles.foreground_ratio, crop_seed)
        sample = {
            "pixels": image_tensor(image),
            "mask": torch.from_numpy(mask.copy()),
            "index": torch.tensor(item),
            "scan": torch.tensor(index),  # the B-scan a tile comes from (validation sums its counts per B-scan)
        }
        if self.prompts is not None:
            cfg = self.prompts
            p = instance_prompts(
                mask,
                self.num_labels,
                cfg.max_prompts,
                rng=rng if self.augment is not None else None,
                jitter=cfg.box_jitter,
                min_jitter_px=cfg.min_box_jitter_px,
                positive_points=cfg.positive_points,
                negative_points=cfg.negative_points,
            )
            sample.update(
                boxes=torch.from_numpy(p.boxes),
                points=torch.from_numpy(p.points),
                point_labels=torch.from_numpy(p.point_labels),
                prompt_classes=torch.from_numpy(p.classes),
                prompt_valid=torch.from_numpy(p.valid),
                instance_map=torch.from_numpy(p.instance_map.astype(np.int64)),
            )
        return sample

    def _draw_window(self, windows: list[tuple[int, int, bool]], rng) -> tuple[int, int]:
        """One of a scan's fixed tiles: with probability ``foreground_ratio`` one holding a biomarker."""
        with_foreground = [w for w in windows if w[2]]
        pool = with_foreground if with_foreground and rng.random() < self.tiles.foreground_ratio else windows
        y, x, _ = pool[int(rng.integers(len(pool)))]
        return y, x


def _mask_array(mask) -> np.ndarray:
    mask = np.asarray(mask, dtype=np.uint8)
    return mask[:, :, 0] if mask.ndim == 3 else mask


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; grey images become 3-channel only when the batch mixes grey and colour scans."""
    if len({s["pixels"].shape[0] for s in samples}) > 1:
        for s in samples:
            if s["pixels"].shape[0] == 1:
                s["pixels"] = s["pixels"].expand(3, -1, -1)
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) and yields ``epoch * n + i`` (see module docstring)."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = range(self.length)
        offset = self.epoch * self.length
        return iter([offset + i for i in order])
