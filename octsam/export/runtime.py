"""ONNX Runtime engine: an exported ONNX folder (``octsam.export.onnx``) as a model the ``Segmenter`` runs.

``Segmenter(OnnxModel.load(folder))`` predicts through the one prediction path (resize and native modes, automatic and
prompted, the app's ``embed`` / ``segment_embedding``, volumes): ``OnnxModel`` has the methods the Segmenter calls on
a model - ``config`` (the adapter's ``OctSamConfig``), ``preprocess``, ``image_embeddings``, ``decode``,
``__call__`` (logits, IoU), and no-op ``merge`` / ``to`` / ``eval``. Tensors are torch tensors in and out, converted
to numpy at the ONNX Runtime boundary. ``load_segmenter`` builds a Segmenter for ``--engine torch|onnxruntime``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from octsam.adapter import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, OctSamConfig
from octsam.bases import base_of
from octsam.errors import OctSamError
from octsam.export.spec import (
    ENGINES,
    ONNX_SPEC_NAME,
    ONNX_SUBFOLDER,
    ONNXRUNTIME_INSTALL,
    find_onnx_folder,
    read_spec,
)


def import_onnxruntime():
    """``onnxruntime``, or an error that says how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise OctSamError(
            f"--engine onnxruntime needs the onnxruntime package, which is not installed: `{ONNXRUNTIME_INSTALL}`."
        ) from err
    return onnxruntime


def default_providers(device: str | torch.device = "cpu") -> list[str]:
    """ONNX Runtime's execution providers for a device: CUDA first where asked for and available, the CPU always."""
    ort = import_onnxruntime()
    device = torch.device(device) if isinstance(device, str) and device != "auto" else device
    want_cuda = device == "auto" or getattr(device, "type", None) == "cuda"
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An exported ONNX folder run by ONNX Runtime, with the model interface ``Segmenter`` uses (see module doc)."""

    def __init__(self, folder: Path, spec: dict, config: OctSamConfig, sessions: dict):
        self.folder = folder
        self.spec = spec
        self.config = config
        self.sessions = sessions
        self.pixel_mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(config.image_std).view(1, -1, 1, 1)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        base_model: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> OnnxModel:
        """Load an ONNX folder (or an adapter folder holding one in ``onnx/``). Refused with the reason: a folder of
        another ONNX format version, for another base (``base_model`` given and different, or graphs of different
        exports), or without onnxruntime installed."""
        ort = import_onnxruntime()
        folder = find_onnx_folder(folder)
        spec = read_spec(folder)
        config = _config_from_spec(spec, folder)
        if base_model is not None and base_model != spec.get("base_model"):
            raise OctSamError(
                f"{folder} was exported for base {spec.get('base_model')!r}, not {base_model!r}: an ONNX folder holds "
                "its base's weights, so --base-model cannot change them; export the adapter again on that base."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        sessions = {}
        for role, name in spec["graphs"].items():
            try:
                session = ort.InferenceSession(str(folder / name), sess_options=options, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception kinds
                raise OctSamError(f"ONNX Runtime cannot load {folder / name}: {err}") from err
            meta = session.get_modelmeta().custom_metadata_map
            if meta.get("octsam_export_id") != spec.get("export_id"):
                raise OctSamError(
                    f"{folder / name} comes from another export than {ONNX_SPEC_NAME} (export id "
                    f"{meta.get('octsam_export_id')!r} vs {spec.get('export_id')!r}; base SHA-256 "
                    f"{meta.get('octsam_base_sha256') or '-'} vs {spec.get('base_sha256') or '-'}): a graph of "
                    "another adapter or base was copied in; export the adapter again."
                )
            sessions[role] = session
        return cls(folder, spec, config, sessions)

    # ----------------------------------------------------------------- no-ops of a torch module
    def to(self, *args, **kwargs) -> OnnxModel:
        return self

    def eval(self) -> OnnxModel:
        return self

    def merge(self) -> OnnxModel:
        return self  # LoRA was merged at export

    def parameter_summary(self) -> str:
        return f"ONNX folder {self.folder} ({', '.join(self.spec['graphs'].values())})"

    @property
    def supports_prompts(self) -> bool:
        """Whether clicks and boxes can be decoded (the app asks): the folder has the prompted decoder graph."""
        return "decoder_prompted" in self.sessions

    @property
    def providers(self) -> list[str]:
        return next(iter(self.sessions.values())).get_providers()

    # ----------------------------------------------------------------- the model interface
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S), C in {1, 3} -> normalised float32 (B, 3, S, S) (as ``OctSamModel.preprocess``)."""
        size = self.config.image_size
        if base_of(self.config).peft_adapter and (pixels.shape[-1] != size or pixels.shape[-2] != size):
            raise OctSamError(
                f"Input of size {tuple(pixels.shape[-2:])} given to a model that takes {size}x{size}; resize first "
                "(octsam.data.samples)."
            )
        pixels = pixels.float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if self.config.normalization == "minmax":
            flat = pixels.flatten(1)
            low = flat.min(dim=1).values.view(-1, 1, 1, 1)
            high = flat.max(dim=1).values.view(-1, 1, 1, 1)
            return (pixels - low) / (high - low).clamp(min=1e-8)
        return (pixels - self.pixel_mean.to(pixels.device)) / self.pixel_std.to(pixels.device)

    def _run(self, role: str, feeds: dict[str, torch.Tensor], device) -> list[torch.Tensor]:
        session = self.sessions.get(role)
        if session is None:
            raise OctSamError(f"The ONNX folder {self.folder} has no {role} graph.")
        arrays = {k: np.ascontiguousarray(v.detach().float().cpu().numpy()) for k, v in feeds.items()}
        return [torch.from_numpy(o).to(device) for o in session.run(None, arrays)]

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not base_of(self.config).has_embeddings:
            raise OctSamError(f"A {self.config.architecture!r} model has no image embedding.")
        return self._run("encoder", {"pixel_values": pixel_values}, pixel_values.device)[0]

    def __call__(self, pixel_values: torch.Tensor, input_boxes=None, input_points=None, input_labels=None,
                 multimask_output: bool = False):  # fmt: skip
        return self.forward(pixel_values, input_boxes, input_points, input_labels, multimask_output)

    def forward(self, pixel_values, input_boxes=None, input_points=None, input_labels=None, multimask_output=False):
        """Logits and predicted IoU as ``OctSamModel.forward`` (the U-Net: class logits and None)."""
        if not base_of(self.config).peft_adapter:
            return self._run("unet", {"pixel_values": pixel_values}, pixel_values.device)[0], None
        embeddings = self.image_embeddings(pixel_values)
        return self.decode(embeddings, input_boxes, input_points, input_labels, multimask_output)

    def decode(
        self,
        embeddings: torch.Tensor,
        input_boxes: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``OctSamModel.decode``: automatic (B, K, h, w) logits without prompts; with prompts (B, P, 1, h, w)
        logits and (B, P, 1) IoU from the prompted graph (boxes become corner points labelled 2 and 3, and without a
        box SAM's padding point is added, as transformers' prompt encoder does)."""
        device = embeddings.device
        if input_boxes is None and input_points is None:
            if "decoder_automatic" not in self.sessions:
                raise OctSamError("This adapter was trained in prompted mode: give box or point prompts.")
            logits, iou = self._run("decoder_automatic", {"image_embeddings": embeddings}, device)
            return logits, iou
        if multimask_output:
            raise OctSamError(
                "The ONNX folder holds the single-mask prompted decoder (SAM's export with return_single_mask); "
                "multimask output (the zero-shot protocol) runs with --engine torch."
            )
        batch = embeddings.shape[0]
        masks, ious = [], []
        for b in range(batch):
            coords, labels = prompt_points(
                None if input_boxes is None else input_boxes[b],
                None if input_points is None else input_points[b],
                None if input_labels is None else input_labels[b],
            )
            mask, iou = self._run(
                "decoder_prompted",
                {"image_embeddings": embeddings[b : b + 1], "point_coords": coords, "point_labels": labels},
                device,
            )
            masks.append(mask[:, None])
            ious.append(iou[:, None])
        return torch.stack(masks), torch.stack(ious)


def prompt_points(boxes, points, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's prompts -> SAM's ONNX inputs: ``point_coords`` (P, N, 2) and float ``point_labels`` (P, N).

    ``boxes`` (P, 4), ``points`` (P, n, 2) and ``labels`` (P, n) in the input frame, as ``OctSamModel.decode`` takes
    them. The points come first, then the box corners (labels 2, 3), or, without boxes, SAM's padding point (0, 0)
    labelled -1 - the order and tokens of transformers' ``SamPromptEncoder``.
    """
    count = (boxes if boxes is not None else points).shape[0]
    coords = [torch.zeros(count, 0, 2)]
    kinds = [torch.zeros(count, 0)]
    if points is not None:
        coords.append(points.detach().float().cpu().reshape(count, -1, 2))
        kinds.append(labels.detach().float().cpu().reshape(count, -1))
    if boxes is not None:
        coords.append(boxes.detach().float().cpu().reshape(count, 2, 2))
        kinds.append(torch.tensor([2.0, 3.0]).expand(count, 2))
    else:
        coords.append(torch.zeros(count, 1, 2))
        kinds.append(torch.full((count, 1), -1.0))
    return torch.cat(coords, dim=1), torch.cat(kinds, dim=1)


def _config_from_spec(spec: dict, folder: Path) -> OctSamConfig:
    data = spec.get("adapter_config")
    if not isinstance(data, dict) or data.get("format") != ADAPTER_FORMAT:
        raise OctSamError(f"{folder / ONNX_SPEC_NAME} has no adapter_config; export the adapter again.")
    if data.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise OctSamError(
            f"{folder} holds an adapter config of format_version {data.get('format_version')!r}, this octsam reads "
            f"{ADAPTER_FORMAT_VERSION}; export the adapter again with this octsam."
        )
    try:
        return OctSamConfig(**data)
    except TypeError as err:
        raise OctSamError(
            f"{folder / ONNX_SPEC_NAME}: its adapter_config was written by another octsam version ({err}); export the "
            "adapter again."
        ) from None
    except OctSamError as err:
        raise OctSamError(f"{folder / ONNX_SPEC_NAME}: {err}") from None


def resolve_onnx_folder(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """A local ONNX folder (or an adapter folder with ``onnx/``), or a Hub repo's ``onnx/`` folder (downloaded once
    through huggingface_hub's cache, only that folder)."""
    if os.path.isdir(adapter):
        return find_onnx_folder(adapter)
    if os.path.exists(adapter):
        raise OctSamError(f"{adapter} is a file; pass the ONNX folder written by octsam-export.")
    from huggingface_hub import snapshot_download

    from octsam.adapter import hub_unreachable

    try:
        snapshot = snapshot_download(
            str(adapter),
            revision=revision,
            allow_patterns=[f"{ONNX_SUBFOLDER}/*"],
            local_files_only=hub_unreachable(),
        )
    except Exception as err:  # offline and not cached, missing repo, no access
        raise OctSamError(
            f"Cannot find the ONNX folder {adapter!r} locally or as {ONNX_SUBFOLDER}/ of a Hub repo "
            f"({type(err).__name__}: {err})."
        ) from err
    return Path(snapshot) / ONNX_SUBFOLDER


def load_segmenter(engine: str, adapter, revision: str | None = None, base_model: str | None = None, **kwargs):
    """The ``Segmenter`` of ``--engine``: ``torch`` is ``Segmenter.from_pretrained(adapter, ...)`` with all
    ``kwargs``; ``onnxruntime`` runs the ONNX folder ``adapter`` names (a folder from ``octsam-export``, an adapter
    folder with ``onnx/``, or a Hub repo with ``onnx/``), with the Segmenter's ``device``, ``batch_size``,
    ``precision`` (fp32 only) and ``tta``; the PyTorch-only options (merge, fast attention, compile) do not apply."""
    from octsam.segmenter import Segmenter

    if engine not in ENGINES:
        raise OctSamError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    if engine == "torch":
        return Segmenter.from_pretrained(adapter, revision=revision, base_model=base_model, **kwargs)
    if kwargs.get("precision", "auto") == "bf16":
        raise OctSamError("--engine onnxruntime runs the exported fp32 graphs; drop --precision bf16.")
    device = kwargs.get("device", "auto")
    names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]  # several: an ensemble
    models = [
        OnnxModel.load(resolve_onnx_folder(name, revision), base_model=base_model, providers=default_providers(device))
        for name in names
    ]
    model = models[0]
    torch_device = "cuda" if "CUDAExecutionProvider" in model.providers else "cpu"
    return Segmenter(
        models if len(models) > 1 else model,
        device=torch_device,
        batch_size=kwargs.get("batch_size", 8),
        precision="fp32",
        tta=kwargs.get("tta", "none"),
    )
