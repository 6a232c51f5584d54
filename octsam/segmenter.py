"""Prediction on B-scans of any size: the one path used by inference, evaluation and the end of training.

from octsam import Segmenter
segmenter = Segmenter.from_pretrained("ORG/octsam-amd")      # or a local adapter folder
results = segmenter(["scan1.png", "scan2.tif"])               # results[0].mask: class ids at native size
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from octsam.data.prompts import Prompt
from octsam.data.samples import image_tensor, input_frame, resize_image, to_uint8_image
from octsam.errors import OctSamError
from octsam.models import load_model
from octsam.models.sam import class_logits_from_prompts, class_probabilities, predict_index_mask


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
        model: torch.nn.Module,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        precision: str = "auto",
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.batch_size = batch_size
        self.compiled = False

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        revision: str | None = None,
        device: str = "auto",
        merge: bool = True,
        fast_attention: bool | str = True,
        batch_size: int = 8,
        base_model: str | None = None,
        compile: bool = False,
        precision: str = "auto",
    ) -> Segmenter:
        """Load an adapter folder or Hub repo; LoRA is merged into the base weights unless ``merge=False``.

        ``fast_attention``: True (mode ``auto``), False (transformers' attention) or an ``octsam.models.fast_attention``
        mode such as ``"fold"``. ``compile``: ``torch.compile`` the image encoder (see ``compile_encoder``).
        ``precision``: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``fp32`` or ``bf16`` (see ``resolve_precision``).
        """
        model = load_model(adapter, revision=revision, base_model=base_model)
        if merge:
            model.merge()
            fuse_for_inference(model)
        if fast_attention and model.config.architecture == "sam":
            from octsam.models.fast_attention import enable_fast_attention

            enable_fast_attention(model, mode="auto" if fast_attention is True else fast_attention)
        segmenter = cls(model, device=device, batch_size=batch_size, precision=precision)
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
        if self.config.architecture != "sam":
            return  # the U-Net baseline is small; nothing to gain
        options = {"freezing": True} if self.device.type == "cpu" else None
        self.model.core.vision_encoder.compile(dynamic=False, options=options)
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

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """A uint8 B-scan -> the model's uint8 input (C, S, S), resized: CPU work that can run ahead of the model."""
        return image_tensor(resize_image(to_uint8_image(image), self.config.image_size, self.config.resize))

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

    def _predict_batch(self, arrays, prompts, return_probabilities: bool, multimask: bool, prepared=None):
        logits = self.class_logits(arrays, prompts, multimask, prepared)
        results: list[SegmentationResult | None] = [None] * len(arrays)
        # B-scans of one size are upsampled together and copied to the host in one transfer (a batch from one
        # device usually shares a size); the per-image arithmetic is the same as one at a time.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(arrays):
            groups.setdefault(tuple(array.shape[:2]), []).append(i)
        for size, indices in groups.items():
            index = torch.tensor(indices, device=logits.device)
            native = self.to_native(logits.index_select(0, index), size)
            masks = predict_index_mask(native).to(torch.uint8).cpu().numpy()
            probs = None
            if return_probabilities:
                probs = class_probabilities(native, self.config.class_activation).half().cpu().numpy()
            for j, i in enumerate(indices):
                results[i] = SegmentationResult(mask=masks[j], probabilities=None if probs is None else probs[j])
        return results

    # ----------------------------------------------------------------- interactive use (octsam.app)
    @torch.inference_mode()
    def embed(self, image) -> torch.Tensor:
        """SAM's image embedding (1, C, g, g) of one B-scan (array or PIL image at native size): encode once, then
        prompt it many times with ``segment_embedding``."""
        if self.config.architecture != "sam":
            raise OctSamError(f"A {self.config.architecture!r} model has no image embedding to prompt.")
        array = to_uint8_image(image)
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
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if prompts is None:
                if self.config.mode == "prompted":
                    raise OctSamError("This model was trained in prompted mode: give a box or point prompt.")
                logits = self.model.decode(embedding)[0].float()
            else:
                logits = self._prompted_logits(embedding, tuple(shape[:2]), prompts, multimask)
        native = self.to_native(logits, tuple(shape[:2]))
        return SegmentationResult(mask=predict_index_mask(native)[0].to(torch.uint8).cpu().numpy())


def fuse_for_inference(model: torch.nn.Module) -> None:
    """Fold BatchNorm into the convolutions of a merged model's TinyViT encoder (LiteMedSAM): faster, same outputs
    up to float round-off; training mode undoes it (``octsam.models.tinyvit.TinyViT.fuse_for_inference``)."""
    from octsam.models.tinyvit import TinyViT

    for module in model.modules():
        if isinstance(module, TinyViT):
            module.fuse_for_inference()


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
