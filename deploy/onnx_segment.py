#!/usr/bin/env python3
"""Segment OCT B-scans with an octsam ONNX folder - needs only onnxruntime, numpy and Pillow (no torch, no octsam).

    pip install onnxruntime==1.32.0 numpy pillow
    python onnx_segment.py --model MODEL_DIR --input bscan.png [more.png ...] --output masks/

MODEL_DIR is a folder written by ``octsam-export`` (``octsam_onnx.json`` + ``*.onnx``). Each B-scan becomes an index
mask PNG (0 background, k = the k-th label of the spec) at its own size, the same mask as ``octsam``'s ``Segmenter``:

- ``input_mode: resize``: the B-scan is resized into the model's square input (``resize: stretch``, or ``pad``: the
  longest side, padded right/bottom with the image minimum), normalised, encoded and decoded; the logits of the valid
  region are resized back bilinearly. Resizing is OpenCV's (area averaging when shrinking both sides, bilinear
  otherwise), written here in numpy with OpenCV's own fixed-point and float32 arithmetic (the same pixels).
- ``input_mode: native``: tiles of the model's size slide over the B-scan (at ``tile_scale``) with ``tile_overlap``
  and are blended with Gaussian weights (sigma = 0.125 x tile), the grid and weights of MONAI's
  ``sliding_window_inference`` that octsam uses.

The class of a pixel is the largest class logit when it is positive, else background (softmax with a zero background
logit, or sigmoid at 0.5). ``--colour-overlay`` also writes the B-scan with the spec's class colours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPEC_NAME = "octsam_onnx.json"
FORMAT = "octsam-onnx"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- loading
def load_model(folder: Path, threads: int | None = None):
    """The spec and one onnxruntime session per graph."""
    import onnxruntime as ort

    spec_path = folder / SPEC_NAME
    if not spec_path.is_file():
        sys.exit(f"error: {folder} has no {SPEC_NAME}; pass a folder written by octsam-export.")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
        sys.exit(
            f"error: {spec_path} is format {spec.get('format')!r} version {spec.get('format_version')!r}; this "
            f"runner reads {FORMAT} version {FORMAT_VERSION}."
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    sessions = {
        role: ort.InferenceSession(str(folder / name), sess_options=options, providers=["CPUExecutionProvider"])
        for role, name in spec["graphs"].items()
    }
    return spec, sessions


def read_bscan(path: Path) -> np.ndarray:
    """uint8 (H, W) for grey B-scans, (H, W, 3) for colour ones (channels within 2 levels count as grey)."""
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        array = np.asarray(im)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.integer) and array.min() >= 0:
            top = 255 if array.max() <= 255 else 4095 if array.max() <= 4095 else np.iinfo(array.dtype).max
            array = np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        else:
            sys.exit(f"error: {path}: pixel type {array.dtype} is not handled by this runner; use octsam.")
    if array.ndim == 3:
        array = array[..., :3] if array.shape[2] >= 3 else array[..., 0]
    if array.ndim == 3:
        channels = array.astype(np.int16)
        if int((channels.max(axis=2) - channels.min(axis=2)).max(initial=0)) <= 2:
            array = np.rint(channels.mean(axis=2)).astype(np.uint8)
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------- resampling
# OpenCV's uint8 resize as octsam calls it (cv2.resize: INTER_AREA when both sides shrink, else INTER_LINEAR),
# written in numpy with OpenCV's own arithmetic so that the model sees the same pixels.
def _linear_table(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source index and the two 11-bit fixed-point weights per output pixel (``cv::resize`` INTER_LINEAR: float32
    source position with half-pixel centres; columns clamped at the borders, rows clamped only when read)."""
    scale = src / dst
    index = np.zeros(dst, np.int64)
    weights = np.zeros((dst, 2), np.int64)
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(f)
        f = np.float32(f - s)
        if clamp and s < 0:
            f, s = np.float32(0), 0
        if clamp and s >= src - 1:
            f, s = np.float32(0), src - 1
        index[d] = s
        weights[d] = int(np.rint(np.float32(1 - f) * 2048)), int(np.rint(f * 2048))
    return index, weights


def _resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR for uint8 (H, W[, C]): fixed-point rows, then its vectorised vertical pass."""
    h, w = image.shape[:2]
    xs, xw = _linear_table(w, width, clamp=True)
    ys, yw = _linear_table(h, height, clamp=False)
    pixels = image.astype(np.int64)
    extra = (None,) * (image.ndim - 2)
    rows = (
        pixels[:, xs] * xw[(slice(None), 0, *extra)]
        + pixels[:, np.minimum(xs + 1, w - 1)] * xw[(slice(None), 1, *extra)]
    )
    top, bottom = rows[np.clip(ys, 0, h - 1)], rows[np.clip(ys + 1, 0, h - 1)]
    b0, b1 = yw[(slice(None), 0, None, *extra)], yw[(slice(None), 1, None, *extra)]
    out = (((b0 * (top >> 4)) >> 16) + ((b1 * (bottom >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def _area_table(src: int, dst: int) -> list[list[tuple[int, float]]]:
    """(source index, float32 weight) per output pixel: OpenCV's ``computeResizeAreaTab``."""
    scale = src / dst
    table = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        entries = []
        if s1 - f1 > 1e-3:
            entries.append((s1 - 1, np.float32((s1 - f1) / cell)))
        for s in range(s1, s2):
            entries.append((s, np.float32(1.0 / cell)))
        if f2 - s2 > 1e-3:
            entries.append((s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
        table.append(entries)
    return table


def _resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_AREA for shrinking uint8 (H, W[, C]): float32 sums in its order, rounded half to even; integer
    factors take its fast path (2 x 2: (sum + 2) >> 2)."""
    h, w = image.shape[:2]
    if h % height == 0 and w % width == 0:
        fy, fx = h // height, w // width
        blocks = image.astype(np.int64).reshape(height, fy, width, fx, *image.shape[2:]).sum(axis=(1, 3))
        if fy == fx == 2:
            return ((blocks + 2) >> 2).astype(np.uint8)
        return np.clip(np.rint(blocks.astype(np.float32) * np.float32(1.0 / (fy * fx))), 0, 255).astype(np.uint8)
    pixels = image.astype(np.float32)
    xtab = _area_table(w, width)
    depth = max(len(e) for e in xtab)
    rows = np.zeros((h, width, *image.shape[2:]), np.float32)
    for k in range(depth):  # buf[dx] += S[si] * alpha, entries in OpenCV's order
        cols = [d for d, e in enumerate(xtab) if len(e) > k]
        src = [xtab[d][k][0] for d in cols]
        alpha = np.array([xtab[d][k][1] for d in cols], np.float32)[(slice(None), *((None,) * (image.ndim - 2)))]
        rows[:, cols] = rows[:, cols] + pixels[:, src] * alpha
    out = np.zeros((height, width, *image.shape[2:]), np.float32)
    for d, entries in enumerate(_area_table(h, height)):
        total = np.zeros((width, *image.shape[2:]), np.float32)
        for s, beta in entries:  # sum += beta * buf, in float32
            total = total + np.float32(beta) * rows[s]
        out[d] = total
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """octsam's image resize: OpenCV's area averaging when both sides shrink, else its bilinear."""
    if image.shape[:2] == (height, width):
        return image
    if image.shape[0] > height and image.shape[1] > width:
        return _resize_area(image, height, width)
    return _resize_linear(image, height, width)


def _linear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of torch's ``interpolate(mode="bilinear", align_corners=False)`` along one side."""
    scale = src / dst
    weights = np.zeros((dst, src), np.float32)
    for d in range(dst):
        f = max((d + 0.5) * scale - 0.5, 0.0)
        s = min(int(f), src - 1)
        frac = f - s
        nxt = min(s + 1, src - 1)
        weights[d, s] += 1.0 - frac
        weights[d, nxt] += frac
    return weights


def resize_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w) -> (K, H, W) bilinear, half-pixel centres (torch ``interpolate``, ``align_corners=False``)."""
    if logits.shape[-2:] == (height, width):
        return logits
    wy = _linear_weights(logits.shape[1], height)
    wx = _linear_weights(logits.shape[2], width)
    return np.einsum("hy,kyx,wx->khw", wy, logits.astype(np.float32), wx, optimize=True)


# ----------------------------------------------------------------------------------------------- the model
def normalise(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (B, C, S, S) -> float32 (B, 3, S, S) as the encoder was trained: per image min-max to [0, 1], or
    (x - mean) / std on the 0-255 scale."""
    pixels = pixels.astype(np.float32)
    if pixels.shape[1] == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    if spec["normalization"] == "minmax":
        low = pixels.reshape(len(pixels), -1).min(axis=1).reshape(-1, 1, 1, 1)
        high = pixels.reshape(len(pixels), -1).max(axis=1).reshape(-1, 1, 1, 1)
        return (pixels - low) / np.maximum(high - low, 1e-8)
    mean = np.asarray(spec["image_mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["image_std"], np.float32).reshape(1, -1, 1, 1)
    return (pixels - mean) / std


def class_logits(sessions: dict, pixel_values: np.ndarray) -> np.ndarray:
    """Normalised (B, 3, S, S) -> (B, K, h, w) class logits (automatic mode, or the U-Net)."""
    if "unet" in sessions:
        return sessions["unet"].run(None, {"pixel_values": pixel_values})[0]
    if "decoder_automatic" not in sessions:
        sys.exit("error: this model was trained in prompted mode; this runner segments automatic-mode models only.")
    embeddings = sessions["encoder"].run(None, {"pixel_values": pixel_values})[0]
    return sessions["decoder_automatic"].run(None, {"image_embeddings": embeddings})[0]


def to_tensor(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> (C, H, W)."""
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


def segment_resized(image: np.ndarray, spec: dict, sessions: dict) -> np.ndarray:
    """(K, H, W) logits of a B-scan resized into the model's input (``input_mode: resize``)."""
    size = spec["input_size"]
    height, width = image.shape[:2]
    if spec["resize"] == "pad":
        scale = size / max(height, width)
        valid_h, valid_w = int(height * scale + 0.5), int(width * scale + 0.5)
    else:
        valid_h = valid_w = size
    resized = resize_uint8(image, valid_h, valid_w)
    if (valid_h, valid_w) != (size, size):
        padded = np.full((size, size, *image.shape[2:]), resized.min(), np.uint8)
        padded[:valid_h, :valid_w] = resized
        resized = padded
    logits = class_logits(sessions, normalise(to_tensor(resized)[None], spec))[0]
    if (valid_h, valid_w) != (size, size):
        logits = resize_logits(logits, size, size)[:, :valid_h, :valid_w]
    return resize_logits(logits, height, width)


def gaussian_importance(size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(mode="gaussian")``: separable Gaussian, peak 1, clamped at its minimum."""
    x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
    g = np.exp(x**2 / (-2 * (size * sigma_scale) ** 2)).astype(np.float32)
    weights = g[:, None] * g[None, :]
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def scan_starts(length: int, size: int, overlap: float) -> list[int]:
    """Tile starts along one side, as MONAI's ``_get_scan_interval`` + ``dense_patch_slices``."""
    interval = size if length == size else max(int(size * (1 - overlap)), 1)
    count = math.ceil(length / interval)
    last = next((d for d in range(count) if d * interval + size >= length), None)
    count = last + 1 if last is not None else 1
    return [i * interval - max(i * interval + size - length, 0) for i in range(count)]


def segment_tiled(image: np.ndarray, spec: dict, sessions: dict, batch: int = 4) -> np.ndarray:
    """(K, H, W) logits of a B-scan by Gaussian-blended native-resolution tiles (``input_mode: native``)."""
    size, scale = spec["tile_size"], spec["tile_scale"]
    height, width = image.shape[:2]
    scaled = image
    if scale != 1:
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        scaled = resize_uint8(image, new_h, new_w)
    pixels = to_tensor(scaled).astype(np.float32)
    h, w = pixels.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:  # symmetric padding with the image minimum, as MONAI's constant padding with cval
        pad = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        pixels = np.pad(pixels, pad, constant_values=float(pixels.min()))
    full_h, full_w = pixels.shape[-2:]
    weights = gaussian_importance(size)
    windows = [(y, x) for y in scan_starts(full_h, size, spec["tile_overlap"])
               for x in scan_starts(full_w, size, spec["tile_overlap"])]  # fmt: skip
    num_classes = len(spec["labels"]) - 1
    total = np.zeros((num_classes, full_h, full_w), np.float32)
    count = np.zeros((full_h, full_w), np.float32)
    for start in range(0, len(windows), batch):
        group = windows[start : start + batch]
        tiles = np.stack([pixels[:, y : y + size, x : x + size] for y, x in group])
        logits = class_logits(sessions, normalise(tiles, spec))
        for (y, x), tile in zip(group, logits):
            total[:, y : y + size, x : x + size] += resize_logits(tile, size, size) * weights
            count[y : y + size, x : x + size] += weights
    logits = (total / count)[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w]
    return resize_logits(logits, height, width)


def index_mask(logits: np.ndarray) -> np.ndarray:
    """(K, H, W) logits -> uint8 class ids: the largest positive logit wins, else background."""
    best = logits.argmax(axis=0)
    return np.where(logits.max(axis=0) > 0, best + 1, 0).astype(np.uint8)


def segment(image: np.ndarray, spec: dict, sessions: dict) -> np.ndarray:
    if spec["input_mode"] == "native":
        return index_mask(segment_tiled(image, spec, sessions))
    return index_mask(segment_resized(image, spec, sessions))


def colour_overlay(image: np.ndarray, mask: np.ndarray, colors: list, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.astype(np.float32)
    palette = np.asarray(colors, np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[mask[fg]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="ONNX folder from octsam-export.")
    p.add_argument("--input", required=True, nargs="+", type=Path, help="B-scan images (PNG, TIFF, JPEG, BMP).")
    p.add_argument("--output", required=True, type=Path, help="Folder for the masks (NAME.png), or one .png file.")
    p.add_argument("--colour-overlay", action="store_true", help="Also write NAME_overlay.png with class colours.")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own).")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.input if not path.is_file()]
    if missing:
        sys.exit(f"error: input file(s) not found: {', '.join(missing)}")
    spec, sessions = load_model(args.model, args.threads)
    single = args.output.suffix.lower() == ".png"
    if single and len(args.input) != 1:
        sys.exit("error: --output NAME.png takes one --input; give a folder for several.")
    if not single:
        args.output.mkdir(parents=True, exist_ok=True)
    for path in args.input:
        image = read_bscan(path)
        mask = segment(image, spec, sessions)
        target = args.output if single else args.output / f"{path.stem}.png"
        Image.fromarray(mask).save(target)
        if args.colour_overlay:
            overlay = colour_overlay(image, mask, spec["colors"])
            Image.fromarray(overlay).save(target.with_name(f"{target.stem}_overlay.png"))
        counts = np.bincount(mask.ravel(), minlength=len(spec["labels"]))
        areas = ", ".join(f"{name} {int(n)} px" for name, n in zip(spec["labels"][1:], counts[1:]))
        print(f"{path} -> {target} ({areas})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
