"""SAM + LoRA for OCT biomarkers: model construction, the two modes, and the self-describing adapter folder.

Automatic mode (default): every foreground class k gets ``tokens_per_class`` learned prompt tokens, initialised from
SAM's own embedding of a whole-image box prompt (so training starts from "segment the object in this box" rather than
from noise). All K classes go through SAM's pretrained mask decoder in one forward pass (as K prompt sets of the
decoder's point batch), giving one mask logit per class. ``automatic_head: mask_tokens`` instead decodes once with
one learned prompt and reads class k from SAM's k-th multimask output token (SAMed's head; up to 3 classes), training
the decoder's output head (upscaling + hypernetwork MLPs): a third of the decoder work per step, and each class starts
from its own pretrained output token instead of K copies of one prompt. On the CPU demo it learns in 10 epochs what
class tokens did not reach in 15 (benchmarks/results/demo_recipe/).

Class activation (``class_activation``):
- ``softmax`` (default): classes compete. The background logit is fixed at 0 and the K class logits are SAM's mask
  logits, so a pixel is class k when its logit is positive and the largest - the same 0 threshold SAM uses. One class
  per pixel, which fits index masks.
- ``sigmoid``: each class is an independent binary mask (overlaps allowed in probability maps); the index mask takes
  the class with the largest positive logit.

Prompted mode: box and/or point prompts per class instance go through SAM's prompt encoder (frozen) and decoder; the
logits of prompts of the same class are combined by a maximum into that class's logit.

The trained state (LoRA weights, the fully trained mask decoder and the class prompts) lives in PEFT's
``adapter_model.safetensors`` (the decoder and prompts as PEFT ``modules_to_save``); ``octsam_config.json`` records the
base model, mode, labels, input size and normalisation, so loading needs only the folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from octsam.adapter import (
    ADAPTER_CONFIG_NAME,
    CLASS_PROMPTS_MODULE,
    MASK_TOKEN_CLASSES,
    OFFLINE_HINT,
    OctSamConfig,
    check_adapter_folder,
    hub_unreachable,
    resolve_adapter,
)
from octsam.bases import base_for_name, base_of, base_of_model, get_base
from octsam.errors import OctSamError
from octsam.models.contract import BaseHooks, file_sha256
from octsam.safepaths import is_pickle_refusal, pickle_hint

logger = logging.getLogger(__name__)


def make_sam_config(
    image_size: int = 24,
    patch_size: int = 2,
    hidden_size: int = 36,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    output_channels: int = 32,
    window_size: int = 4,
    global_attn_indexes: tuple[int, ...] = (1,),
    decoder_hidden_size: int = 32,
    decoder_mlp_dim: int = 64,
    decoder_heads: int = 4,
    initializer_range: float = 0.02,
):
    """A small SAM architecture for tests and the CPU demo (random weights, ``initializer_range`` set so it learns)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    if image_size % patch_size:
        raise OctSamError(f"image_size {image_size} must be a multiple of patch_size {patch_size}.")
    vision = SamVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        output_channels=output_channels,
        window_size=window_size,
        global_attn_indexes=list(global_attn_indexes),
        mlp_dim=hidden_size * 4,
        num_pos_feats=decoder_hidden_size // 2,
        initializer_range=initializer_range,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=decoder_hidden_size, image_size=image_size, patch_size=patch_size, mask_input_channels=8
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=decoder_hidden_size,
        mlp_dim=decoder_mlp_dim,
        num_attention_heads=decoder_heads,
        iou_head_hidden_dim=decoder_hidden_size,
    )
    if output_channels != decoder_hidden_size:
        raise OctSamError("output_channels must equal decoder_hidden_size (SAM feeds the neck into the decoder).")
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def save_random_base(path: str | os.PathLike, seed: int = 0, **config_kwargs: Any) -> str:
    """Write a randomly initialised SAM (``make_sam_config``) as a local base model folder and return its path."""
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(make_sam_config(**config_kwargs))
    model.save_pretrained(path)
    return str(path)


def encoder_kind(sam: nn.Module) -> str:
    """The registry name of a built base's encoder (``litemedsam`` for LiteMedSAM's TinyViT, ``sam`` for
    transformers' SAM ViT): ``octsam.bases.base_of_model``."""
    return base_of_model(sam).name


def base_fingerprint(base_model: str) -> str | None:
    """SHA-256 of the base's weights where they are a file here (the packaged LiteMedSAM checkpoint, a local folder's
    ``model.safetensors``); None for a Hub id (its revision identifies it). Asked of the base the name selects."""
    return base_for_name(base_model).implementation.fingerprint(base_model)


def load_base_sam(base_model: str, revision: str | None = None, dtype: torch.dtype | None = None):
    """Build the base a ``--base-model`` name selects (``octsam.bases.base_for_name``): a ``SamModel`` from a
    Hub id or a local folder, or a registered base such as ``litemedsam``."""
    return base_for_name(base_model).implementation.build(base_model, revision, dtype)


class SamHooks(BaseHooks):
    """transformers' SAM ViT bases (the ``sam`` record): any Hub id or local ``SamModel`` folder."""

    def build(self, base_model: str, revision: str | None = None, dtype: torch.dtype | None = None):
        """Load a ``SamModel`` from a Hub id or a local folder, with a clear message when it cannot be found
        offline."""
        from transformers import SamModel

        local = os.path.isdir(base_model)
        offline = not local and hub_unreachable()  # no retries against a host that cannot be reached
        try:
            model = SamModel.from_pretrained(
                base_model, revision=revision, dtype=dtype, attn_implementation="sdpa", local_files_only=offline
            )
        except Exception as err:
            if is_pickle_refusal(err):  # a pickled .bin that torch's weights_only loader refused: nothing ran
                raise OctSamError(
                    f"Cannot load base SAM model {base_model}: its weights are a pickle that does not hold plain "
                    f"tensors (torch refused to load it; nothing in it ran).{pickle_hint(base_model)}"
                ) from err
            if not isinstance(err, OSError):
                raise
            reason = str(err).strip().rstrip(".")
            if local:
                raise OctSamError(f"Cannot load base SAM model from folder {base_model}: {reason}.") from err
            where = "the local Hugging Face cache (the Hub cannot be reached from here)" if offline else "the Hub"
            raise OctSamError(
                f"Cannot load base SAM model {base_model!r} from {where}: {reason}. To use it offline, "
                + OFFLINE_HINT.format(name=base_model)
                + " as --base-model. Without any download, --base-model litemedsam is a pretrained base that "
                "installs with pip."
            ) from err
        _check_input_size(model.config.vision_config)
        return model

    def owns(self, model: nn.Module) -> bool:
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        return isinstance(getattr(model, "vision_encoder", None), SamVisionEncoder)

    def fingerprint(self, base_model: str) -> str | None:
        weights = Path(base_model) / "model.safetensors"
        return file_sha256(weights) if weights.is_file() else None


def _check_input_size(vision_config) -> None:
    size, patch = vision_config.image_size, vision_config.patch_size
    if size % patch:
        raise OctSamError(f"SAM input size {size} is not a multiple of its patch size {patch}.")


def minmax_scale(images: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] over all channels and pixels of (B, C, H, W) (range clamped at ``eps``)."""
    flat = images.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (images - low) / (high - low).clamp(min=eps)


def box_prompt_embedding(sam, image_size: int) -> torch.Tensor:
    """SAM's prompt embedding of a box covering the whole image, shape (2, D): the automatic-mode initialisation."""
    box = torch.tensor([[[0.0, 0.0, image_size - 1.0, image_size - 1.0]]])
    with torch.no_grad():
        emb = sam.prompt_encoder._embed_boxes(box.to(sam.prompt_encoder.no_mask_embed.weight.device))
    return emb[0, 0].float().cpu()


class ClassPrompts(nn.Module):
    """Learned prompt tokens (S, T, D): ``tokens_per_class`` per foreground class (S = K), or one set shared by all
    classes (S = 1, the mask_tokens head)."""

    def __init__(self, num_classes: int, tokens_per_class: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, tokens_per_class, hidden_size))

    def forward(self) -> torch.Tensor:
        return self.weight


# The mask decoder's output head that the mask_tokens head trains (when the whole decoder is not trained anyway):
# the upscaling and the hypernetwork MLPs of the three multimask output tokens.
MASK_TOKEN_HEAD_MODULES = (
    "upscale_conv1",
    "upscale_conv2",
    "upscale_layer_norm",
    *(f"output_hypernetworks_mlps.{k}" for k in range(1, MASK_TOKEN_CLASSES + 1)),
)


def _prompt_sets(cfg: OctSamConfig) -> int:
    """Learned prompt sets of automatic mode: one per class, or one shared by all (mask_tokens head)."""
    return 1 if cfg.automatic_head == "mask_tokens" else cfg.num_labels - 1


def _lora_config(cfg: OctSamConfig):
    from peft import LoraConfig

    target_modules = get_base(cfg.encoder).lora_pattern(cfg.lora_target_modules)
    modules_to_save = []
    if cfg.train_mask_decoder:
        modules_to_save.append("mask_decoder")
    if cfg.mode == "automatic":
        modules_to_save.append(CLASS_PROMPTS_MODULE)
        if cfg.automatic_head == "mask_tokens" and not cfg.train_mask_decoder:
            modules_to_save.extend(MASK_TOKEN_HEAD_MODULES)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=cfg.base_model,
        revision=cfg.base_model_revision,
    )


def describe_base(config: OctSamConfig, sam: nn.Module) -> OctSamConfig:
    """Record in ``config`` what the base is and how it takes its input: encoder kind, input size, resize and
    normalisation the encoder was trained with, and the fingerprint of its weights."""
    base = base_of_model(sam)
    config.encoder = base.name
    config.image_size = sam.config.vision_config.image_size
    config.resize = base.resize
    config.normalization = base.normalization
    config.base_sha256 = base_fingerprint(config.base_model)
    base.lora_pattern(config.lora_target_modules)  # refuses roles this encoder does not have
    return config


def check_base(config: OctSamConfig, sam: nn.Module, adapter: str) -> None:
    """Refuse a base that is not the one the adapter was trained on (encoder kind, input size, weights)."""
    kind = encoder_kind(sam)
    if kind != config.encoder:
        raise OctSamError(
            f"Adapter {adapter} was trained on a {config.encoder} base but {config.base_model} is a {kind} model; "
            "pass the base it was trained on (base_model in octsam_config.json)."
        )
    if sam.config.vision_config.image_size != config.image_size:
        raise OctSamError(
            f"Adapter {adapter} was trained for input size {config.image_size}, but base model "
            f"{config.base_model} takes {sam.config.vision_config.image_size}; use the base model it was "
            "trained on."
        )
    if config.base_sha256:
        found = base_fingerprint(config.base_model)
        if found is not None and found != config.base_sha256:
            raise OctSamError(
                f"Adapter {adapter} was trained on base weights with SHA-256 {config.base_sha256[:12]}..., but "
                f"{config.base_model} has {found[:12]}...: other weights under the same name. Use the base it was "
                "trained on."
            )


class OctSamModel(nn.Module):
    """SAM with a LoRA adapter and the parts a mode trains; ``forward`` gives mask logits at SAM's low resolution.

    Implements ``octsam.models.contract.SegmentationModel`` for every SAM-family base of the registry."""

    supports_prompts = True  # SAM's prompt encoder: boxes and points, in prompted mode and zero-shot

    def __init__(self, sam: nn.Module, config: OctSamConfig):
        super().__init__()
        self.sam = sam  # a peft.PeftModel while training; a plain SamModel after ``merge``
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, -1, 1, 1), persistent=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_base(cls, config: OctSamConfig, seed: int = 0, dtype: torch.dtype | None = None) -> OctSamModel:
        """A new adapter on the base model named in ``config`` (LoRA initialised, class prompts from SAM)."""
        from peft import get_peft_model

        sam = load_base_sam(config.base_model, config.base_model_revision, dtype=dtype)
        describe_base(config, sam)
        cls._attach_class_prompts(sam, config)
        if config.mode == "automatic":
            generator = torch.Generator().manual_seed(seed)
            init = box_prompt_embedding(sam, config.image_size)
            prompts = getattr(sam, CLASS_PROMPTS_MODULE)
            noise = torch.randn(prompts.weight.shape, generator=generator) * 0.02 * init.std()
            with torch.no_grad():
                prompts.weight.copy_(init.expand_as(prompts.weight) + noise)
        sam.requires_grad_(False)
        peft_model = get_peft_model(sam, _lora_config(config))
        # No loss supervises SAM's IoU-prediction head: keep it frozen (DDP also requires every trained tensor to get
        # a gradient).
        for name, param in peft_model.named_parameters():
            if "iou_prediction_head" in name:
                param.requires_grad_(False)
        return cls(peft_model, config)

    @classmethod
    def for_training(cls, config: OctSamConfig, model_args, seed: int = 0) -> OctSamModel:
        """A new adapter for ``config`` (``octsam.config.adapter_config`` of the experiment), with the fast attention
        its ``ModelArguments`` ask for."""
        model = cls.from_base(config, seed=seed)
        if model_args.fast_attention and base_of(model.config).fast_attention:
            from octsam.models.fast_attention import enable_fast_attention

            enable_fast_attention(model, mode=model_args.attention_mode)
        return model

    @staticmethod
    def _attach_class_prompts(sam: nn.Module, config: OctSamConfig) -> None:
        if config.mode == "automatic":
            hidden = sam.config.prompt_encoder_config.hidden_size
            sam.add_module(CLASS_PROMPTS_MODULE, ClassPrompts(_prompt_sets(config), config.tokens_per_class, hidden))

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        revision: str | None = None,
        base_model: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> OctSamModel:
        """Load an adapter folder (or Hub repo id, via ``octsam.adapter.resolve_adapter``) onto its base model."""
        from peft import PeftModel

        folder = resolve_adapter(adapter, revision=revision)
        config = check_adapter_folder(folder)
        if not issubclass(cls, base_of(config).model_class):
            raise OctSamError(
                f"{folder} holds a {config.architecture!r} model; load it with octsam.models.load_model()."
            )
        if base_model is not None:
            config.base_model = base_model
        sam = load_base_sam(config.base_model, config.base_model_revision, dtype=dtype)
        check_base(config, sam, str(adapter))
        cls._attach_class_prompts(sam, config)
        try:
            peft_model = PeftModel.from_pretrained(sam, str(folder))
        except (RuntimeError, ValueError, KeyError) as err:
            raise OctSamError(
                f"Adapter {adapter} does not fit base model {config.base_model}: {err}. Pass the base model it was "
                "trained on (see base_model in octsam_config.json)."
            ) from err
        peft_model.eval()
        return cls(peft_model, config)

    # ----------------------------------------------------------------- helpers
    @property
    def core(self) -> nn.Module:
        """The underlying ``SamModel`` (LoRA layers injected in place, or merged)."""
        from peft import PeftModel

        return self.sam.base_model.model if isinstance(self.sam, PeftModel) else self.sam

    @property
    def image_encoder(self) -> nn.Module:
        """The base's image encoder (what ``torch.compile`` and gradient checkpointing act on)."""
        return self.core.vision_encoder

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"

    def merge(self) -> OctSamModel:
        """Fold LoRA into the base weights (``merge_and_unload``) for faster inference; returns self."""
        from peft import PeftModel

        if isinstance(self.sam, PeftModel):
            self.sam = self.sam.merge_and_unload()
        return self

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) with C in {1, 3} -> normalised float (B, 3, S, S) on the model's device and dtype.

        ``normalization`` "mean_std": SAM's (x - mean) / std on the 0-255 scale; "minmax": each image to [0, 1] over
        all its pixels (LiteMedSAM; a padded input is padded with its minimum, so the padding maps to 0).
        """
        if pixels.shape[-1] != self.config.image_size or pixels.shape[-2] != self.config.image_size:
            raise OctSamError(
                f"Input of size {tuple(pixels.shape[-2:])} given to a model that takes "
                f"{self.config.image_size}x{self.config.image_size}; resize first (octsam.data.samples)."
            )
        pixels = pixels.to(self.pixel_mean.device, non_blocking=True).float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        dtype = next(self.core.vision_encoder.parameters()).dtype
        if self.config.normalization == "minmax":
            return minmax_scale(pixels).to(dtype)
        return ((pixels - self.pixel_mean) / self.pixel_std).to(dtype)

    # ----------------------------------------------------------------- forward
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.core.vision_encoder(pixel_values).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_boxes: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and predicted IoU.

        Without prompts (automatic mode): logits (B, K, h, w), one per foreground class.
        With prompts: ``input_boxes`` (B, P, 4) and/or ``input_points`` (B, P, N, 2) with ``input_labels`` (B, P, N)
        in input-pixel coordinates; logits (B, P, M, h, w) with M = 3 when ``multimask_output`` else 1.
        """
        return self.decode(
            self.image_embeddings(pixel_values), input_boxes, input_points, input_labels, multimask_output
        )

    def class_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Automatic-mode class logits (B, K, h, w)."""
        return self(pixel_values)[0]

    def decode(
        self,
        embeddings: torch.Tensor,
        input_boxes: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sam = self.core
        batch = embeddings.shape[0]
        positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype).expand(batch, -1, -1, -1)
        prompted = input_boxes is not None or input_points is not None
        if prompted:
            sparse, dense = sam.prompt_encoder(
                input_points=input_points, input_labels=input_labels, input_boxes=input_boxes, input_masks=None
            )
        else:
            if not hasattr(sam, CLASS_PROMPTS_MODULE):
                raise OctSamError("This adapter was trained in prompted mode: give box or point prompts.")
            prompts = getattr(sam, CLASS_PROMPTS_MODULE)()
            sparse = prompts.unsqueeze(0).expand(batch, -1, -1, -1)
            grid = embeddings.shape[-1]
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, grid, grid)
            # mask_tokens: one prompt set, and the multimask outputs (tokens 1-3) are the classes
            multimask_output = self.config.automatic_head == "mask_tokens"
        masks, iou = sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse.to(embeddings.dtype),
            dense_prompt_embeddings=dense.to(embeddings.dtype),
            multimask_output=multimask_output,
        )
        if not prompted:
            if multimask_output:
                classes = self.config.num_labels - 1
                return masks[:, 0, :classes], iou[:, 0, :classes]
            return masks[:, :, 0], iou[:, :, 0]
        return masks, iou

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the adapter folder: PEFT weights + ``octsam_config.json`` (the card is written by ``octsam.cards.write_adapter_card``)."""
        from peft import PeftModel

        if not isinstance(self.sam, PeftModel):
            raise OctSamError("A merged model cannot be saved as an adapter; save before merge().")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # SAM has no token vocabulary to resize: False keeps PEFT from asking the Hub for the base's config.json
        # (a request for a name like "litemedsam", and a warning offline).
        self.sam.save_pretrained(str(folder), save_embedding_layers=False)
        self.config.to_json_file(folder / ADAPTER_CONFIG_NAME)
        return folder


def class_logits_from_prompts(
    logits: torch.Tensor, prompt_classes: torch.Tensor, prompt_valid: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-prompt logits (B, P, h, w) -> per-class logits (B, K, h, w) by a maximum over a class's prompts.

    ``prompt_classes`` (B, P) holds class ids 1..K; classes without a prompt get a large negative logit.
    """
    batch, _, height, width = logits.shape
    out = logits.new_full((batch, num_classes, height, width), -1e4)
    for k in range(1, num_classes + 1):
        sel = (prompt_classes == k) & prompt_valid
        if sel.any():
            masked = torch.where(sel[:, :, None, None], logits, logits.new_tensor(-1e4))
            out[:, k - 1] = masked.max(dim=1).values
    return out


def class_probabilities(class_logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, K, H, W) class logits -> (B, K+1, H, W) probabilities, channel 0 = background."""
    if activation == "softmax":
        zeros = torch.zeros_like(class_logits[:, :1])
        return torch.softmax(torch.cat([zeros, class_logits], dim=1).float(), dim=1)
    probs = torch.sigmoid(class_logits.float())
    background = (1 - probs).prod(dim=1, keepdim=True)
    return torch.cat([background, probs], dim=1)


def predict_index_mask(class_logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) class ids: the largest positive logit wins, else background (same rule for
    softmax with a zero background logit and for sigmoid with a 0.5 threshold)."""
    best, index = class_logits.max(dim=1)
    return torch.where(best > 0, index + 1, torch.zeros_like(index))


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) logits to ``size`` (H, W)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def zero_shot_model(
    base_model: str, labels: list[str], revision: str | None = None, input_mode: str = "resize"
) -> OctSamModel:
    """The base SAM with no adapter, for the zero-shot baseline (prompted mode only), with the input its encoder
    was trained with; ``input_mode`` ``native`` decodes each prompt in a native-resolution window around it."""
    sam = load_base_sam(base_model, revision)
    config = OctSamConfig(
        labels=labels,
        base_model=base_model,
        base_model_revision=revision,
        mode="prompted",
        lora_target_modules=[],  # no adapter: nothing of the base is changed
        train_mask_decoder=False,
        input_mode=input_mode,
    )
    describe_base(config, sam)
    return OctSamModel(sam.eval(), config)


def zero_shot_multimask(config: OctSamConfig) -> bool:
    """Whether zero-shot uses SAM's best of 3 masks: SAM was trained with multimask output for ambiguous prompts,
    LiteMedSAM (like MedSAM) with one mask per box, so each base is prompted as it was trained."""
    return base_of(config).zero_shot_multimask
