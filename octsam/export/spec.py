"""The ONNX folder format: ``octsam_onnx.json`` (the spec) beside the graphs it names. No torch, no onnxruntime.

An ONNX folder holds:

- ``encoder.onnx``: the image encoder with LoRA merged (LiteMedSAM: BatchNorm fused), ``pixel_values`` (B, 3, S, S)
  float32 already normalised -> ``image_embeddings`` (B, C, g, g);
- ``decoder_automatic.onnx`` (automatic-mode adapters): the prompt encoder + mask decoder with the learned class tokens
  built in, ``image_embeddings`` (B, C, g, g) -> ``class_logits`` (B, K, h, w) and ``iou_predictions`` (B, K);
- ``decoder_prompted.onnx``: SAM's prompt encoder + the adapter's mask decoder with points as dynamic inputs, as
  SAM's own ``scripts/export_onnx_model.py``: ``image_embeddings`` (1, C, g, g), ``point_coords`` (P, N, 2) in
  input-frame pixels and ``point_labels`` (P, N) float (1 positive, 0 negative, 2 / 3 a box's top-left /
  bottom-right corner, -1 SAM's padding point, -10 ignored) -> ``masks`` (P, h, w) and ``iou_predictions`` (P,) - one
  mask per prompt (SAM's ``return_single_mask``); P prompts of one image are decoded at once (SAM's export: P = 1);
- ``unet.onnx`` (the U-Net baseline, one graph): ``pixel_values`` (B, 3, S, S) -> ``class_logits`` (B, K, S, S);
- ``octsam_onnx.json``: format and version, the octsam version, the base and encoder kind, input size, resize,
  normalisation, input mode and tiles, labels, colours, class activation, the output grid, the graphs, and the
  adapter's own ``octsam_config.json`` (``adapter_config``) from which octsam rebuilds its ``OctSamConfig``.

Each graph carries the export's id (``octsam_export_id``) and base fingerprint in its ONNX metadata, so that a graph
copied in from another export is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from octsam.errors import OctSamError

ONNX_SPEC_NAME = "octsam_onnx.json"
ONNX_FORMAT = "octsam-onnx"
ONNX_FORMAT_VERSION = 1
ONNX_SUBFOLDER = "onnx"  # where an adapter folder or Hub repo keeps its ONNX export (octsam-hub push --with-onnx)
ENCODER_GRAPH = "encoder.onnx"
AUTOMATIC_GRAPH = "decoder_automatic.onnx"
PROMPTED_GRAPH = "decoder_prompted.onnx"
UNET_GRAPH = "unet.onnx"
ENCODER_KINDS = ("sam", "litemedsam", "unet")
ONNXRUNTIME_VERSION = "1.32.0"
ONNXRUNTIME_INSTALL = f"pip install onnxruntime=={ONNXRUNTIME_VERSION}"
ENGINES = ("torch", "onnxruntime")


def read_spec(folder: str | os.PathLike) -> dict:
    """The checked spec of an ONNX folder: refused with the reason when it is not one, was written by another octsam
    folder format, names an unknown encoder, or lacks a graph it names."""
    folder = Path(folder)
    path = folder / ONNX_SPEC_NAME
    if not path.is_file():
        hint = ""
        if (folder / "octsam_config.json").is_file():
            hint = (
                " It is an adapter folder: export it first with `octsam-export --adapter "
                f"{folder} --output {folder}/{ONNX_SUBFOLDER}` (or run it with --engine torch)."
            )
        raise OctSamError(f"{folder} has no {ONNX_SPEC_NAME}: it is not an octsam ONNX folder.{hint}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OctSamError(f"Cannot read {path}: {err}") from err
    if not isinstance(spec, dict) or spec.get("format") != ONNX_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise OctSamError(
            f"{path} is not an octsam ONNX spec (format={found!r}); export the adapter with octsam-export."
        )
    version = spec.get("format_version")
    if version != ONNX_FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > ONNX_FORMAT_VERSION
        raise OctSamError(
            f"{folder} was exported by {'a newer' if newer else 'another'} octsam (version "
            f"{spec.get('octsam_version', '?')}, ONNX format_version {version!r}; this octsam reads "
            f"format_version {ONNX_FORMAT_VERSION}): {'upgrade octsam' if newer else 'export the adapter again'} "
            "with `octsam-export`."
        )
    encoder = spec.get("encoder")
    if encoder not in ENCODER_KINDS:
        raise OctSamError(
            f"{folder} was exported for an encoder kind {encoder!r} this octsam does not know "
            f"({', '.join(ENCODER_KINDS)}); export the adapter again with this octsam."
        )
    graphs = spec.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise OctSamError(f"{path} names no graphs; export the adapter again.")
    missing = [name for name in graphs.values() if not (folder / name).is_file()]
    if missing:
        raise OctSamError(f"{folder} lacks {', '.join(missing)} named in {ONNX_SPEC_NAME}; export it again.")
    return spec


def find_onnx_folder(path: str | os.PathLike) -> Path:
    """The ONNX folder itself, or the ``onnx/`` folder inside an adapter folder."""
    path = Path(path)
    if not (path / ONNX_SPEC_NAME).is_file() and (path / ONNX_SUBFOLDER / ONNX_SPEC_NAME).is_file():
        return path / ONNX_SUBFOLDER
    return path
