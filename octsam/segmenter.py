"""Prediction on B-scans of any size: the one path used by inference, evaluation and the end of training.

from octsam import Segmenter
segmenter = Segmenter.from_pretrained("ORG/octsam-amd")      # or a local adapter folder
results = segmenter(["scan1.png", "scan2.tif"])               # results[0].mask: class ids at native size
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from octsam.bases import base_of
from octsam.data.prompts import Prompt
from octsam.data.samples import image_tensor, input_frame, resize_image, to_uint8_image
from octsam.data.tiles import box_window, rescale, window_pixels
from octsam.errors import OctSamError
from octsam.models import load_model
from octsam.models.sam import class_logits_from_prompts, class_probabilities, predict_index_mask, upsample_logits


@dataclass
class SegmentationResult:
    mask: np.ndarray  # (H, W) uint8 class ids at the B-scan's native size
    probabilities: np.ndarray | None = None  # (K+1, H, W) float16, channel 0 background, when asked for


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OctSamError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(device)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of inference: ``auto`` is bf16 on CUDA and fp32 elsewhere; ``bf16`` on a CPU pays off only
    with native bf16 (AVX512-BF16 or AMX: LiteMedSAM 1.8x faster on such a CPU, benchmarks/RESULTS.md)."""
    if precision not in PRECISIONS:
        raise OctSamError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "--precision bf16 on a CPU without AVX512-BF16 or AMX is emulated and usually slower than fp32.",
            stacklevel=2,
        )
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Segmenter:
    """Batched prediction with a loaded model; outputs at each B-scan's native size."""

    def __init__(
        self,
        model: torch.nn.Module | list[torch.nn.Module],
        device: str | torch.device = "auto",
        batch_size: int = 8,
        precision: str = "auto",
        tta: str = "none",
    ):
        """``model``: a loaded model, or several (an ensemble, e.g. the folds of a cross-validation: their
        probabilities are averaged; they must share labels, mode and input). ``tta``: ``none`` or ``flip`` (the
        mean with the left-right mirrored B-scan)."""
        if tta not in TTA_MODES:
            raise OctSamError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}.")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_precision(precision, self.device)
        members = list(model) if isinstance(model, (list, tuple)) else [model]
        if not members:
            raise OctSamError("A Segmenter needs at least one model.")
        check_ensemble([m.config for m in members])
        self.members = [m.to(self.device).eval() for m in members]
        self.model = self.members[0]
        self.config = self.model.config
        self.base = base_of(self.config)  # the registry record: what this model's base can do
        self.batch_size = batch_size
        self.tta = tta
        self.compiled = False

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike | list,
        revision: str | None = None,
        device: str = "auto",
        merge: bool = True,
        fast_attention: bool | str = True,
        batch_size: int = 8,
        base_model: str | None = None,
        compile: bool = False,
        precision: str = "auto",
        tta: str = "none",
    ) -> Segmenter:
        """Load an adapter folder or Hub repo - or a list of them, an ensemble whose probabilities are averaged
        (e.g. the 5 folds of a cross-validation); LoRA is merged into the base weights unless ``merge=False``.

        ``fast_attention``: True (mode ``auto``), False (transformers' attention) or an ``octsam.models.fast_attention``
        mode such as ``"fold"``. ``compile``: ``torch.compile`` the image encoder (see ``compile_encoder``).
        ``precision``: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``fp32`` or ``bf16`` (see ``resolve_precision``).
        ``tta``: ``none`` or ``flip`` (see ``__init__``).
        """
        models = []
        for name in adapter if isinstance(adapter, (list, tuple)) else [adapter]:
            model = load_model(name, revision=revision, base_model=base_model)
            if merge:
                model.merge()
                fuse_for_inference(model)
            if fast_attention and base_of(model.config).fast_attention:
                from octsam.models.fast_attention import enable_fast_attention

                enable_fast_attention(model, mode="auto" if fast_attention is True else fast_attention)
            models.append(model)
        segmenter = cls(models, device=device, batch_size=batch_size, precision=precision, tta=tta)
        if compile:
            segmenter.compile_encoder()
        return segmenter

    def compile_encoder(self) -> None:
        """``torch.compile`` the image encoder in place (state-dict keys unchanged), for inference only.

        On the CPU inductor also *freezes* the weights (constant-folds them and pre-packs them for oneDNN): SAM
        ViT-B took 12.2 instead of 12.7 s per B-scan on 2 cores (benchmarks/RESULTS.md). The first batch of each
        new batch size would compile again (about a minute for ViT-B on 2 cores), so a short last batch is padded to
        ``batch_size``; it pays for many B-scans, not for one.
        """
        if not self.base.compiles or self.model.image_encoder is None:
            return  # e.g. the U-Net baseline: small, nothing to gain
        options = {"freezing": True} if self.device.type == "cpu" else None
        for model in self.members:
            model.image_encoder.compile(dynamic=False, options=options)
        self.compiled = True

    def segment_volume(self, volume):
        """Segment every B-scan of an ``octsam.volumes.OctVolume`` and measure it per eye (mm³ per biomarker, 3-D
        lesions, en-face maps, ETDRS sectors): an ``octsam.volumes.segment.VolumeResult``."""
        from octsam.volumes.segment import segment_volume

        return segment_volume(self, volume)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def __call__(
        self,
        images: list,
        prompts: list[list[Prompt] | None] | None = None,
        return_probabilities: bool = False,
        multimask: bool = False,
        prepared: list[torch.Tensor] | None = None,
    ) -> list[SegmentationResult]:
        """Segment ``images`` (paths, PIL images or arrays). ``prompts`` gives a list of ``Prompt`` per image
        (prompted mode); ``multimask`` picks the best of SAM's 3 masks by predicted IoU (zero-shot protocol).
        ``prepared``: ``prepare(image)`` of each image, done ahead (e.g. in reader threads), else done here."""
        from octsam.data.dataset import read_scan

        arrays = [to_uint8_image(read_scan(i) if isinstance(i, (str, os.PathLike)) else i) for i in images]
        if prompts is None and self.config.mode == "prompted":
            raise OctSamError("This model was trained in prompted mode: give a box or point prompt per image.")
        results = []
        for start in range(0, len(arrays), self.batch_size):
            batch = arrays[start : start + self.batch_size]
            batch_prompts = prompts[start : start + self.batch_size] if prompts is not None else None
            batch_prepared = prepared[start : start + self.batch_size] if prepared is not None else None
            results.extend(self._predict_batch(batch, batch_prompts, return_probabilities, multimask, batch_prepared))
        return results

    @property
    def native(self) -> bool:
        """Whether the model sees native-resolution tiles (``input_mode: native``) rather than the resized B-scan."""
        return getattr(self.config, "input_mode", "resize") == "native"

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """A uint8 B-scan -> the model's uint8 input, CPU work that can run ahead of the model: (C, S, S) resized
        into the input, or in native mode (C, H', W') at the B-scan's own pixel size times ``tile_scale``."""
        array = to_uint8_image(image)
        if self.native:
            return image_tensor(rescale(array, self.config.tile_scale))
        return image_tensor(resize_image(array, self.config.image_size, self.config.resize))

    @torch.inference_mode()
    def class_logits(
        self, arrays: list[np.ndarray], prompts=None, multimask: bool = False, prepared: list | None = None
    ) -> torch.Tensor:
        """(B, K, h, w) class logits at the model's output resolution for a batch of uint8 images."""
        tensors = list(prepared) if prepared is not None else [self.prepare(a) for a in arrays]
        channels = max(t.shape[0] for t in tensors)
        count = len(tensors)
        if self.compiled and count < self.batch_size:
            # The compiled encoder is specialised to one batch size: a short (last) batch is padded with copies of
            # its last image instead of compiling again, and their outputs are dropped.
            tensors += [tensors[-1]] * (self.batch_size - count)
        pixels = torch.stack([t.expand(channels, -1, -1) for t in tensors]).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pixel_values = self.model.preprocess(pixels)
            if prompts is None:
                logits, _ = self.model(pixel_values)
                return logits[:count].float()
            embeddings = self.model.image_embeddings(pixel_values)[:count]
            return torch.cat(
                [
                    self._prompted_logits(embeddings[i : i + 1], arrays[i].shape[:2], prompts[i], multimask)
                    for i in range(len(arrays))
                ]
            )

    def _prompted_logits(self, embedding, shape, prompts: list[Prompt] | None, multimask: bool) -> torch.Tensor:
        num_classes = self.config.num_labels - 1
        grid = embedding.shape[-1] * 4
        if not prompts:
            return embedding.new_full((1, num_classes, grid, grid), -1e4).float()
        sy, sx, _, _ = input_frame(shape, self.config.image_size, self.config.resize)
        for p in prompts:
            if not 1 <= p.label <= num_classes:
                raise OctSamError(f"Prompt class {p.label} is not one of 1..{num_classes} ({self.labels[1:]}).")
        outputs, classes = [], []
        # SAM's prompt encoder takes boxes for all prompts of a call or for none: run the two groups separately.
        for group in ([p for p in prompts if p.box is not None], [p for p in prompts if p.box is None]):
            if not group:
                continue
            boxes = points = labels = None
            if group[0].box is not None:
                boxes = torch.tensor([[[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in (p.box for p in group)]])
            n_points = max(len(p.points) for p in group)
            if n_points:
                points = torch.zeros(1, len(group), n_points, 2)
                labels = torch.full((1, len(group), n_points), -10, dtype=torch.long)
                for j, p in enumerate(group):
                    for n, (x, y, lab) in enumerate(p.points):
                        points[0, j, n] = torch.tensor([x * sx, y * sy])
                        labels[0, j, n] = int(lab)
            logits, iou = self.model.decode(
                embedding,
                input_boxes=None if boxes is None else boxes.to(self.device),
                input_points=None if points is None else points.to(self.device),
                input_labels=None if labels is None else labels.to(self.device),
                multimask_output=multimask,
            )
            best = iou.argmax(dim=-1)  # (1, P): best of the 3 masks by predicted IoU (or the only one)
            logits = torch.gather(logits, 2, best[:, :, None, None, None].expand(-1, -1, 1, *logits.shape[-2:]))
            outputs.append(logits[:, :, 0].float())
            classes.extend(p.label for p in group)
        logits = torch.cat(outputs, dim=1)
        classes_t = torch.tensor([classes], device=logits.device)
        return class_logits_from_prompts(logits, classes_t, torch.ones_like(classes_t, dtype=torch.bool), num_classes)

    def to_native(self, logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(B, K, h, w) logits in the model's input frame -> (B, K, H, W) on the B-scan: the valid region (all of it
        when stretched, the unpadded part when padded) resized bilinearly."""
        size = self.config.image_size
        _, _, height, width = input_frame(shape, size, self.config.resize)
        if (height, width) != (size, size):
            if logits.shape[-1] != size:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            logits = logits[..., :height, :width]
        return F.interpolate(logits, size=tuple(shape), mode="bilinear", align_corners=False)

    def native_logits(
        self, arrays: list[np.ndarray], prompts=None, multimask: bool = False, prepared: list | None = None
    ) -> list[torch.Tensor]:
        """(K, H, W) class logits of each uint8 B-scan at its native size - the one path of every prediction: the
        resized B-scan (``input_mode: resize``) or a Gaussian-blended sliding window of native tiles (``native``),
        averaged over the ensemble's models and the flipped B-scan (``tta``) as probabilities."""
        outputs = []
        for model in self.members:
            with self._member(model):
                outputs.append(self._model_native_logits(arrays, prompts, multimask, prepared))
                if self.tta == "flip":
                    flipped = [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
                    flipped_prompts = None if prompts is None else [flip_prompts(p, a.shape[1]) for p, a in
                                                                    zip(prompts, arrays)]  # fmt: skip
                    mirrored = self._model_native_logits(flipped, flipped_prompts, multimask, None)
                    outputs.append([m.flip(-1) for m in mirrored])
        if len(outputs) == 1:
            return outputs[0]
        activation = self.config.class_activation
        return [average_logits([out[i] for out in outputs], activation) for i in range(len(arrays))]

    def _model_native_logits(self, arrays, prompts, multimask: bool, prepared) -> list[torch.Tensor]:
        if self.native:
            return self._tile_logits(arrays, prompts, multimask, prepared)
        logits = self.class_logits(arrays, prompts, multimask, prepared)
        # B-scans of one size are upsampled together (a batch from one device usually shares a size)
        out: list[torch.Tensor | None] = [None] * len(arrays)
        for size, indices in _groups_by_size(arrays).items():
            index = torch.tensor(indices, device=logits.device)
            native = self.to_native(logits.index_select(0, index), size)
            for j, i in enumerate(indices):
                out[i] = native[j]
        return out

    @contextlib.contextmanager
    def _member(self, model):
        current = self.model
        self.model = model
        try:
            yield
        finally:
            self.model = current

    # ----------------------------------------------------------------- native-resolution tiles
    @torch.inference_mode()
    def _tile_logits(self, arrays, prompts, multimask: bool, prepared) -> list[torch.Tensor]:
        """Native mode: a sliding window of ``image_size`` tiles (MONAI, Gaussian blending, ``tile_overlap``) over
        each B-scan, or in prompted mode one window around each prompt; logits back at the native size."""
        from monai.inferers import sliding_window_inference

        size = self.config.image_size
        tensors = list(prepared) if prepared is not None else [self.prepare(a) for a in arrays]
        out: list[torch.Tensor | None] = [None] * len(arrays)
        if prompts is not None:
            for i in range(len(arrays)):
                out[i] = self._prompted_windows(tensors[i], prompts[i], multimask, {})
        else:
            for _, indices in _groups_by_size(tensors, lambda t: tuple(t.shape[-2:])).items():
                channels = max(tensors[i].shape[0] for i in indices)
                pixels = torch.stack([tensors[i].expand(channels, -1, -1) for i in indices]).to(self.device).float()
                logits = sliding_window_inference(
                    pixels,
                    roi_size=(size, size),
                    sw_batch_size=self.batch_size,
                    predictor=self._predict_tiles,
                    overlap=self.config.tile_overlap,
                    mode="gaussian",
                    padding_mode="constant",
                    cval=float(pixels.amin()),
                )
                for j, i in enumerate(indices):
                    out[i] = logits[j]
        return [self._from_scaled(o, a.shape[:2]) for o, a in zip(out, arrays)]

    def _from_scaled(self, logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(shape):
            return logits
        return F.interpolate(logits[None], size=tuple(shape), mode="bilinear", align_corners=False)[0]

    def _predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """(n, C, S, S) tiles (uint8 values as float) -> (n, K, S, S) float class logits."""
        count = tiles.shape[0]
        if self.compiled and count < self.batch_size:  # the compiled encoder is specialised to one batch size
            tiles = torch.cat([tiles, tiles[-1:].expand(self.batch_size - count, -1, -1, -1)])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits, _ = self.model(self.model.preprocess(tiles))
        return upsample_logits(logits[:count].float(), tuple(tiles.shape[-2:]))

    def _prompted_windows(self, pixels: torch.Tensor, prompts, multimask: bool, cache: dict) -> torch.Tensor:
        """Prompted native mode: each prompt is decoded in a window around it (``octsam.data.tiles.box_window``);
        windows are encoded once (``cache``: window -> embedding) and a class's windows combine by a maximum."""
        size, scale = self.config.image_size, self.config.tile_scale
        height, width = pixels.shape[-2:]
        num_classes = self.config.num_labels - 1
        canvas = torch.full((num_classes, height, width), -1e4, device=self.device)
        image = pixels.permute(1, 2, 0).numpy() if pixels.shape[0] == 3 else pixels[0].numpy()
        for prompt in prompts or []:
            scaled = scale_prompt(prompt, scale)
            y, x, side = box_window(prompt_extent(scaled), (height, width), size)
            if (y, x, side) not in cache:
                window = window_pixels(image, y, x, side)
                if side != size:
                    window = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA)
                tensor = image_tensor(window)[None].to(self.device)
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                    cache[(y, x, side)] = self.model.image_embeddings(self.model.preprocess(tensor))
            local = shift_prompt(scaled, -x, -y, size / side)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self._prompted_logits(cache[(y, x, side)], (size, size), [local], multimask)
            logits = upsample_logits(logits.float(), (side, side))[0]
            ys, xs = max(y, 0), max(x, 0)
            ye, xe = min(y + side, height), min(x + side, width)
            region = canvas[:, ys:ye, xs:xe]
            torch.maximum(region, logits[:, ys - y : ye - y, xs - x : xe - x], out=region)
        return canvas

    def _predict_batch(self, arrays, prompts, return_probabilities: bool, multimask: bool, prepared=None):
        logits = self.native_logits(arrays, prompts, multimask, prepared)
        results = []
        for native in logits:
            mask = predict_index_mask(native[None])[0].to(torch.uint8).cpu().numpy()
            probs = None
            if return_probabilities:
                probs = class_probabilities(native[None], self.config.class_activation)[0].half().cpu().numpy()
            results.append(SegmentationResult(mask=mask, probabilities=probs))
        return results

    # ----------------------------------------------------------------- interactive use (octsam.app)
    @torch.inference_mode()
    def embed(self, image) -> torch.Tensor:
        """SAM's image embedding (1, C, g, g) of one B-scan (array or PIL image at native size): encode once, then
        prompt it many times with ``segment_embedding``."""
        if not self.base.has_embeddings:
            raise OctSamError(f"A {self.config.architecture!r} model has no image embedding to prompt.")
        array = to_uint8_image(image)
        if self.native or len(self.members) > 1 or self.tta != "none":
            return PreparedScan(array, self.prepare(array))  # windows are encoded (once each) as prompts need them
        pixels = image_tensor(resize_image(array, self.config.image_size, self.config.resize))[None].to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model.image_embeddings(self.model.preprocess(pixels))

    @torch.inference_mode()
    def segment_embedding(
        self,
        embedding: torch.Tensor,
        shape: tuple[int, int],
        prompts: list[Prompt] | None = None,
        multimask: bool = False,
    ) -> SegmentationResult:
        """The mask of a B-scan of native ``shape`` (H, W) from its cached ``embed`` output, without re-encoding:
        automatic mode when ``prompts`` is None, else the prompts (as in ``__call__``)."""
        if isinstance(embedding, PreparedScan):
            return self._segment_prepared(embedding, tuple(shape[:2]), prompts, multimask)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if prompts is None:
                if self.config.mode == "prompted":
                    raise OctSamError("This model was trained in prompted mode: give a box or point prompt.")
                logits = self.model.decode(embedding)[0].float()
            else:
                logits = self._prompted_logits(embedding, tuple(shape[:2]), prompts, multimask)
        native = self.to_native(logits, tuple(shape[:2]))
        return SegmentationResult(mask=predict_index_mask(native)[0].to(torch.uint8).cpu().numpy())

    def _segment_prepared(self, scan: PreparedScan, shape, prompts, multimask: bool) -> SegmentationResult:
        if prompts is None and self.config.mode == "prompted":
            raise OctSamError("This model was trained in prompted mode: give a box or point prompt.")
        if prompts is not None and self.native and len(self.members) == 1 and self.tta == "none":
            logits = self._from_scaled(self._prompted_windows(scan.pixels, prompts, multimask, scan.windows), shape)
        else:
            logits = self.native_logits([scan.array], None if prompts is None else [prompts], multimask,
                                        None if self.tta != "none" else [scan.pixels])[0]  # fmt: skip
        return SegmentationResult(mask=predict_index_mask(logits[None])[0].to(torch.uint8).cpu().numpy())


@dataclass
class PreparedScan:
    """What ``Segmenter.embed`` keeps of a B-scan when one embedding does not describe it (native tiles, an
    ensemble, test-time augmentation): the B-scan, its model input, and the embeddings of the prompt windows."""

    array: np.ndarray
    pixels: torch.Tensor
    windows: dict = field(default_factory=dict)


TTA_MODES = ("none", "flip")
_ENSEMBLE_KEYS = ("labels", "mode", "class_activation", "input_mode", "image_size", "resize", "tile_scale")


def check_ensemble(configs) -> None:
    """Models averaged together must predict the same classes from the same input."""
    first = configs[0]
    for config in configs[1:]:
        differ = [k for k in _ENSEMBLE_KEYS if getattr(config, k, None) != getattr(first, k, None)]
        if differ:
            raise OctSamError(
                "The adapters of an ensemble must share labels, mode and input; they differ in "
                + ", ".join(f"{k} ({getattr(first, k, None)!r} vs {getattr(config, k, None)!r})" for k in differ)
                + "."
            )


def _groups_by_size(items, shape_of=lambda a: tuple(a.shape[:2])) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_of(item), []).append(i)
    return groups


def average_logits(logits: list[torch.Tensor], activation: str, eps: float = 1e-6) -> torch.Tensor:
    """Class logits of several predictions (models of an ensemble, flipped copies) averaged as probabilities and
    returned as the logits of that mean, so that every later step (index mask, probabilities) is unchanged."""
    stacked = torch.stack([lg.float() for lg in logits])
    if activation == "softmax":
        zeros = torch.zeros_like(stacked[:, :1])
        probs = torch.softmax(torch.cat([zeros, stacked], dim=1), dim=1).mean(0).clamp_min(eps)
        return probs[1:].log() - probs[:1].log()
    probs = torch.sigmoid(stacked).mean(0).clamp(eps, 1 - eps)
    return probs.log() - (1 - probs).log()


def flip_prompts(prompts, width: int):
    """Prompts of a B-scan of ``width`` mirrored left-right (for flip test-time augmentation)."""
    if prompts is None:
        return None
    out = []
    for p in prompts:
        box = None if p.box is None else (width - 1 - p.box[2], p.box[1], width - 1 - p.box[0], p.box[3])
        out.append(Prompt(label=p.label, box=box, points=[(width - 1 - x, y, lab) for x, y, lab in p.points]))
    return out


def scale_prompt(prompt: Prompt, scale: float) -> Prompt:
    if scale == 1:
        return prompt
    box = None if prompt.box is None else tuple(v * scale for v in prompt.box)
    return Prompt(label=prompt.label, box=box, points=[(x * scale, y * scale, lab) for x, y, lab in prompt.points])


def shift_prompt(prompt: Prompt, dx: float, dy: float, zoom: float = 1.0) -> Prompt:
    """A prompt moved by (dx, dy) and then scaled by ``zoom`` (into a window's input frame)."""
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        box = ((x0 + dx) * zoom, (y0 + dy) * zoom, (x1 + dx) * zoom, (y1 + dy) * zoom)
    points = [((x + dx) * zoom, (y + dy) * zoom, lab) for x, y, lab in prompt.points]
    return Prompt(label=prompt.label, box=box, points=points)


def prompt_extent(prompt: Prompt) -> tuple[float, float, float, float]:
    """The box of a prompt, or the bounding box of its points."""
    if prompt.box is not None:
        return prompt.box
    xs = [x for x, _, _ in prompt.points]
    ys = [y for _, y, _ in prompt.points]
    return min(xs), min(ys), max(xs), max(ys)


def fuse_for_inference(model: torch.nn.Module) -> None:
    """What a merged model's base does to run faster with the same outputs up to float round-off (its registry
    hooks: LiteMedSAM folds BatchNorm into TinyViT's convolutions; training mode undoes it)."""
    base_of(model.config).implementation.fuse_for_inference(model)


def device_name(device) -> str:
    """GPU name, or the CPU model as lscpu shows it."""
    import platform

    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
