"""Export a trained octsam model (SAM + LoRA of any base in the registry, or the U-Net baseline) to an ONNX folder.

The folder layout and spec are described in ``octsam.export.spec``. Like SAM's own ``scripts/export_onnx_model.py``
(and samexporter), SAM is cut into the image encoder and the prompt encoder + mask decoder, so that an application
encodes a B-scan once and decodes it per click; an adapter's LoRA is merged first (``OctSamModel.merge``), which is
what breaks the official script on fine-tuned checkpoints (finetune-SAM issue 27), and LiteMedSAM's BatchNorm is
folded into its convolutions (``octsam.segmenter.fuse_for_inference``). Pre- and postprocessing (resize, padding,
normalisation, tiles, upsampling, the class decision) stay outside the graphs and are described in the JSON spec,
so that the same graphs serve every input mode.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript, opset 18). With torch 2.13 both
exporters export transformers' SAM, LiteMedSAM's TinyViT and MONAI's U-Net with outputs within 1e-5 relative of
PyTorch; the TorchScript exporter is deprecated since torch 2.9 (it warns on every call and is slated for removal)
and needs tracing warnings about Python booleans in transformers' attention to be judged safe, while the dynamo
exporter is the one torch maintains, records dynamic dimensions as checked symbolic shapes, and runs onnxscript's
graph optimiser. It exports more slowly (seconds per graph rather than a second), which only an export pays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from octsam import __version__
from octsam.adapter import CLASS_PROMPTS_MODULE
from octsam.bases import base_of
from octsam.errors import OctSamError
from octsam.export.spec import (
    AUTOMATIC_GRAPH,
    ENCODER_GRAPH,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    ONNX_SPEC_NAME,
    PROMPTED_GRAPH,
    UNET_GRAPH,
)

OPSET = 18  # the dynamo exporter's lowest opset (SAM's own script uses 17 with the TorchScript exporter)
EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond 1 GiB (SAM ViT-L/H) go to a .onnx.data file beside the graph
CHECK_TOLERANCE = 1e-4  # relative (to the largest output) difference to PyTorch fp32 allowed at export


class EncoderGraph(nn.Module):
    """The image encoder: normalised pixels (B, 3, S, S) -> image embeddings (B, C, g, g)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_embeddings(pixel_values)


class AutomaticDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder with the learned class tokens: embeddings -> (B, K, h, w) logits, (B, K) IoU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(image_embeddings)


class PromptedDecoderGraph(nn.Module):
    """SAM's prompt encoder + the mask decoder with points as inputs (a box is its two corners, labels 2 and 3).

    The point embedding is transformers' ``SamPromptEncoder._embed_points`` / ``_embed_boxes`` on one list of points:
    shift to the pixel centre, the shared positional encoding, label -1 -> SAM's not-a-point embedding, -10 -> zeros,
    and label k in 0..3 adds point embedding k. With the prompts' points in the order octsam's ``decode`` makes them
    (points, then SAM's padding point or the box corners), the tokens are the ones PyTorch decodes.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        sam = model.core
        self.input_size = int(sam.prompt_encoder.input_image_size)
        self.register_buffer("positional", sam.get_image_wide_positional_embeddings().detach().clone())

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sam = self.model.core
        encoder = sam.prompt_encoder
        coords = (point_coords + 0.5)[None]  # (1, P, N, 2)
        labels = point_labels[None, :, :, None]  # (1, P, N, 1)
        embedding = encoder.shared_embedding(coords, (self.input_size, self.input_size))
        embedding = torch.where(labels == -1, encoder.not_a_point_embed.weight, embedding)
        embedding = torch.where(labels != -10, embedding, torch.zeros_like(embedding))
        for k, point_embed in enumerate(encoder.point_embed):
            embedding = torch.where(labels == k, embedding + point_embed.weight, embedding)
        grid = image_embeddings.shape[-1]
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, grid, grid)
        masks, iou = sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.positional,
            sparse_prompt_embeddings=embedding,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[0, :, 0], iou[0, :, 0]


class UNetGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)[0]


def _class_colors(labels: list[str]) -> list[list[int]]:
    from octsam.colors import class_colors  # the one colour scheme (overlays, figures, app, cards)

    return [list(map(int, c)) for c in class_colors(labels)]


def _export_graph(module: nn.Module, name: str, args: tuple, names: dict, dynamic: dict, path: Path, meta: dict):
    """One graph with the dynamo exporter, its metadata set; an exporter error names the module that failed."""
    module = module.eval()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    # torch.onnx logs a warning per torchvision operator it cannot register (torchvision is not installed here)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")  # the exporter's progress lines and torch.export's deprecation notes
            program = torch.onnx.export(
                module,
                args,
                None,
                input_names=names["inputs"],
                output_names=names["outputs"],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                external_data=size > EXTERNAL_DATA_BYTES,
                verbose=False,
            )
    except Exception as err:  # torch.export / onnxscript raise many kinds
        inner = getattr(module, "model", module)
        what = type(getattr(inner, "core", inner)).__name__
        raise OctSamError(
            f"Exporting the {name} ({type(module).__name__} around {what}) to ONNX failed: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from err
    for key, value in meta.items():
        program.model.metadata_props[key] = str(value)
    program.model.doc_string = f"octsam {__version__}: {name}"
    program.save(str(path), external_data=size > EXTERNAL_DATA_BYTES)


def fuse_graph(source: Path, target: Path) -> bool:
    """Write ``source`` to ``target`` with ONNX Runtime's transformer fusions (``onnxruntime.transformers``'
    ``optimize_model``, fp32 throughout): GELU's erf pattern -> ``Gelu``/``BiasGelu``, LayerNorm and residual +
    LayerNorm -> ``LayerNormalization``/``SkipLayerNormalization``; no attention fusion (SAM's attention has its own
    shapes). The result uses ``com.microsoft`` contrib ops, so it runs on ONNX Runtime only. A graph with external
    weights (over 1 GiB) is copied unchanged (False): the fusion tool's external-data handling is untested here."""
    if source.with_name(source.name + ".data").exists() or source.stat().st_size > EXTERNAL_DATA_BYTES:
        if source != target:
            shutil.copy2(source, target)
        return False
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_embed_layer_norm = False
    options.enable_rotary_embeddings = False
    options.enable_qordered_matmul = False
    with _quiet_onnxruntime_tools():
        fused = optimize_model(str(source), model_type="bert", optimization_options=options, opt_level=0)
        fused.save_model_to_file(str(target))
    return True


@contextlib.contextmanager
def _quiet_onnxruntime_tools():
    """The fusion tool logs each fusion at INFO/WARNING through the root logger's handlers: keep that out of the CLI."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime", "onnx_model", "fusion_base", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fuse_for_onnxruntime(folder: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A copy of an exported ONNX folder with every graph fused by :func:`fuse_graph` (what ``octsam-export
    --fuse-for-onnxruntime`` writes, applied afterwards; checked against the unfused graphs by the benchmark)."""
    folder, target = Path(folder), Path(target)
    shutil.copytree(folder, target)
    spec = json.loads((folder / ONNX_SPEC_NAME).read_text())
    spec["onnxruntime_fusions"] = [role for role, name in spec["graphs"].items()
                                   if fuse_graph(folder / name, target / name)]  # fmt: skip
    (target / ONNX_SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")
    return target


def _relative_difference(ours: np.ndarray, reference: torch.Tensor) -> float:
    ref = reference.detach().float().numpy()
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(ours.astype(np.float32) - ref).max() / scale)


def _check_graph(path: Path, feeds: dict, references: list[torch.Tensor], name: str) -> float:
    """Run the written graph with ONNX Runtime on the export's example inputs; the largest relative difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {k: v.detach().numpy() for k, v in feeds.items()})
    diff = max(_relative_difference(o, r) for o, r in zip(outputs, references))
    if not diff <= CHECK_TOLERANCE:
        raise OctSamError(
            f"The exported {name} differs from PyTorch by {diff:.2e} (relative), more than {CHECK_TOLERANCE:g}; "
            "the export is not used."
        )
    return diff


def load_for_export(adapter, revision: str | None = None, base_model: str | None = None):
    """The model of an adapter folder or Hub repo, merged and fused for inference, in fp32 on the CPU, with
    transformers' own attention (octsam's fast attention is a PyTorch runtime choice, not part of the model)."""
    from octsam.models import load_model
    from octsam.segmenter import fuse_for_inference

    model = load_model(adapter, revision=revision, base_model=base_model)
    model.merge()
    fuse_for_inference(model)
    return model.float().eval()


def _example_pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def export_model(model, folder: Path, export_id: str, fuse: bool = False) -> dict:
    """Write the graphs of a loaded (merged) model into ``folder``; the spec's graph and check entries. ``fuse``:
    each graph is rewritten by :func:`fuse_graph` before its check against PyTorch."""
    config = model.config
    size = config.image_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    meta = {
        "octsam_export_id": export_id,
        "octsam_base_sha256": config.base_sha256 or "",
        "octsam_version": __version__,
    }
    checks: dict[str, float] = {}
    graphs: dict[str, str] = {}
    fused: list[str] = []

    def written(role: str, path: Path) -> None:
        if fuse and fuse_graph(path, path):
            fused.append(role)

    pixels = _example_pixels(2, size)
    if not base_of(config).peft_adapter:  # a whole network (the U-Net), no SAM parts
        graph = UNetGraph(model)
        path = folder / UNET_GRAPH
        _export_graph(
            graph,
            "U-Net",
            (pixels,),
            {"inputs": ["pixel_values"], "outputs": ["class_logits"]},
            {"pixel_values": {0: batch}},
            path,
            meta,
        )
        written("unet", path)
        with torch.inference_mode():
            reference = graph(_example_pixels(3, size, 1))
        checks["unet"] = _check_graph(path, {"pixel_values": _example_pixels(3, size, 1)}, [reference], "U-Net")
        return {"graphs": {"unet": UNET_GRAPH}, "checks": checks, "output_grid": size, "fused": fused}

    encoder = EncoderGraph(model)
    _export_graph(
        encoder,
        "image encoder",
        (pixels,),
        {"inputs": ["pixel_values"], "outputs": ["image_embeddings"]},
        {"pixel_values": {0: batch}},
        folder / ENCODER_GRAPH,
        meta,
    )
    graphs["encoder"] = ENCODER_GRAPH
    written("encoder", folder / ENCODER_GRAPH)
    check_pixels = _example_pixels(3, size, 1)
    with torch.inference_mode():
        embeddings = encoder(check_pixels)
    checks["encoder"] = _check_graph(
        folder / ENCODER_GRAPH, {"pixel_values": check_pixels}, [embeddings], "image encoder"
    )
    with torch.inference_mode():
        example_embeddings = encoder(pixels)

    output_grid = None
    if hasattr(model.core, CLASS_PROMPTS_MODULE):
        automatic = AutomaticDecoderGraph(model)
        _export_graph(
            automatic,
            "mask decoder with class tokens",
            (example_embeddings,),
            {"inputs": ["image_embeddings"], "outputs": ["class_logits", "iou_predictions"]},
            {"image_embeddings": {0: batch}},
            folder / AUTOMATIC_GRAPH,
            meta,
        )
        graphs["decoder_automatic"] = AUTOMATIC_GRAPH
        written("decoder_automatic", folder / AUTOMATIC_GRAPH)
        with torch.inference_mode():
            logits, iou = automatic(embeddings)
        output_grid = int(logits.shape[-1])
        checks["decoder_automatic"] = _check_graph(
            folder / AUTOMATIC_GRAPH, {"image_embeddings": embeddings}, [logits, iou], "automatic mask decoder"
        )

    prompted = PromptedDecoderGraph(model)
    prompts, points = torch.export.Dim("prompts", min=1, max=4096), torch.export.Dim("points", min=1, max=4096)
    coords = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[3.0, 4.0], [size - 5.0, size - 2.0]]])
    labels = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    _export_graph(
        prompted,
        "prompt encoder + mask decoder",
        (example_embeddings[:1], coords, labels),
        {"inputs": ["image_embeddings", "point_coords", "point_labels"], "outputs": ["masks", "iou_predictions"]},
        {"image_embeddings": None, "point_coords": {0: prompts, 1: points}, "point_labels": {0: prompts, 1: points}},
        folder / PROMPTED_GRAPH,
        meta,
    )
    graphs["decoder_prompted"] = PROMPTED_GRAPH
    written("decoder_prompted", folder / PROMPTED_GRAPH)
    check_coords = torch.tensor(
        [[[5.0, 6.0], [size / 2, size / 3], [0.0, 0.0]], [[size / 4, 2.0], [1.0, 1.0], [size - 1.0, size / 2]]]
    )
    check_labels = torch.tensor([[1.0, 0.0, -1.0], [-10.0, 2.0, 3.0]])
    with torch.inference_mode():
        masks, iou = prompted(embeddings[:1], check_coords, check_labels)
    output_grid = output_grid or int(masks.shape[-1])
    checks["decoder_prompted"] = _check_graph(
        folder / PROMPTED_GRAPH,
        {"image_embeddings": embeddings[:1], "point_coords": check_coords, "point_labels": check_labels},
        [masks, iou],
        "prompted mask decoder",
    )
    return {
        "graphs": graphs,
        "checks": checks,
        "output_grid": output_grid,
        "embedding_shape": list(embeddings.shape[1:]),
        "fused": fused,
    }


def build_spec(config, exported: dict, export_id: str, source: str) -> dict:
    """The ``octsam_onnx.json`` of an export: everything a runner needs besides the graphs."""
    from dataclasses import asdict

    encoder = config.encoder if base_of(config).peft_adapter else base_of(config).name
    spec = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "octsam_version": __version__,
        "export_id": export_id,
        "exported_from": source,
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__.split('+')[0]}, opset {OPSET}",
        "architecture": config.architecture,
        "encoder": encoder,
        "base_model": config.base_model,
        "base_sha256": config.base_sha256,
        "mode": config.mode,
        "labels": list(config.labels),
        "colors": _class_colors(list(config.labels)),
        "class_activation": config.class_activation,
        "input_size": config.image_size,
        "resize": config.resize,
        "normalization": config.normalization,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "input_mode": config.input_mode,
        "tile_size": config.image_size,
        "tile_overlap": config.tile_overlap,
        "tile_scale": config.tile_scale,
        "output_grid": exported["output_grid"],
        "graphs": exported["graphs"],
        "export_check_max_relative_difference": exported["checks"],
        "adapter_config": asdict(config),
    }
    if "embedding_shape" in exported:
        spec["embedding_shape"] = exported["embedding_shape"]
    return spec


def _prepare_output(output: Path, overwrite: bool) -> Path:
    if output.exists() and not output.is_dir():
        raise OctSamError(f"--output {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OctSamError(f"--output {output} exists and is not empty; pass --overwrite to replace it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, output: Path) -> None:
    """Replace ``output`` by ``tmp`` with renames (an old folder is removed only after the new one is in place)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:6]}"
        output.rename(old)
    try:
        tmp.rename(output)
    except OSError:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
    model=None,
    fuse: bool = False,
) -> Path:
    """Export an adapter folder or Hub repo (or an already loaded ``model``) to the ONNX folder ``output``.

    The folder is written next to ``output`` and renamed into place, so ``output`` is either the old folder or the
    complete new one; an existing non-empty ``output`` is refused without ``overwrite``. Each graph is run with ONNX
    Runtime against PyTorch before the folder is kept (``CHECK_TOLERANCE``). ``fuse``: the graphs get ONNX Runtime's
    fp32 fusions (:func:`fuse_graph`; faster on ONNX Runtime, not portable to other runtimes) before that check.
    """
    output = Path(output).expanduser()
    tmp = _prepare_output(output, overwrite)
    try:
        started = time.perf_counter()
        if model is None:
            model = load_for_export(adapter, revision=revision, base_model=base_model)
        export_id = uuid.uuid4().hex
        with torch.inference_mode(False), torch.no_grad():
            exported = export_model(model, tmp, export_id, fuse=fuse)
        spec = build_spec(model.config, exported, export_id, str(adapter))
        if fuse:
            spec["onnxruntime_fusions"] = exported["fused"]
        spec["export_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / ONNX_SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
