"""The base registry: one record per encoder kind, the one place that says what a base is.

A record (:class:`Base`) is plain data, importable without torch (``octsam.adapter`` and the command lines read it
cheaply): the base's name, how a ``--base-model`` name selects it, its input spec (size comes from the built model;
resize and normalisation here), its LoRA roles, the weight files of its adapter folder, and what it can do (image
embeddings to cache and prompt, SAM's 3 masks for zero-shot, octsam's fast attention, compilation). Its code - build
it, recognise a built model, fingerprint its weights, fuse it for inference, describe it on a card - lives in its own
module, named by ``Base.hooks`` and imported only when used (:class:`octsam.models.contract.BaseHooks`).

Adding a base is one module (the encoder and its hooks) plus one ``register(Base(...))`` line: see README.md, "How to
add a base", and ``tests/test_bases.py``, which adds a toy base from a single test file.

Two families exist: ``architecture="sam"`` (a transformers ``SamModel`` - SAM's prompt encoder and mask decoder behind
the base's image encoder - with a PEFT LoRA adapter, loaded as ``OctSamModel``; the record is chosen by the
``encoder`` field of ``octsam_config.json``) and ``architecture="unet"`` (the MONAI U-Net baseline, a whole model of
its own; chosen by ``architecture``; ``--model dynunet`` builds its DynUNet variant, saved as a U-Net folder). The
record named like a family is that family's default.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from octsam.errors import OctSamError

# Weight files of an adapter folder, by kind (the record lists the ones its folder needs).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
UNET_WEIGHTS_NAME = "model.safetensors"

_DECODER_ATTENTION = r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)"


@dataclass(frozen=True, eq=False)
class Base:
    """What octsam knows about one base without importing it (see the module docstring)."""

    name: str
    """The encoder kind, as ``encoder`` in ``octsam_config.json`` (a family default: also its ``architecture``)."""
    hooks: str
    """``"module:Class"`` of the base's code (an ``octsam.models.contract.BaseHooks``), imported when first used."""
    architecture: str = "sam"
    model: str = "octsam.models.sam:OctSamModel"
    """``"module:Class"`` of the model class (an ``octsam.models.contract.SegmentationModel``) that builds, loads
    and saves models of this base."""
    base_names: tuple[str, ...] = ()
    """``--base-model`` names that select this base; a family default takes every name no other base claims (a Hub
    id or a local folder)."""
    resize: str = "stretch"
    """How a B-scan becomes the square input: "stretch" (SAM) or "pad" (longest side, zero padding right/bottom)."""
    normalization: str = "mean_std"
    """"mean_std" (image_mean / image_std on the 0-255 scale) or "minmax" (each image to [0, 1])."""
    lora_roles: Mapping[str, str] = field(default_factory=dict)
    """LoRA targets by role (``qkv``, ``proj``, ``attention``, ``mlp``, ``decoder_attention``): regexes over the
    module names of the built model, so that a config says "qkv" without knowing an encoder's module names."""
    weight_files: tuple[str, ...] = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    """The files its adapter folder needs besides ``octsam_config.json`` (and all a Hub download fetches of it)."""
    peft_adapter: bool = True
    """Its folder is a PEFT LoRA adapter on a named base model (the card says ``library_name: peft``)."""
    has_embeddings: bool = True
    """It computes an image embedding that prompts decode (cached in training and in the app, ``Segmenter.embed``)."""
    zero_shot_multimask: bool = True
    """Zero-shot takes the best of SAM's 3 masks (SAM was trained so); False: one mask per box (LiteMedSAM)."""
    fast_attention: bool = True
    """octsam's exact fast attention applies (``octsam.models.fast_attention``; it patches SAM ViT attention)."""
    compiles: bool = True
    """Its image encoder is worth ``torch.compile`` (on CUDA by default, ``octsam.speed``)."""
    method_name: str = "LoRA"
    """Its row name in comparison tables (prompted adapters say so after it)."""
    card_tags: tuple[str, ...] = ()
    """Extra Hub tags on its model card."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise OctSamError(f"A base name is lower-case letters, digits, '-' and '_', got {self.name!r}.")
        if self.resize not in ("stretch", "pad"):
            raise OctSamError(f"Base {self.name}: resize must be 'stretch' or 'pad', got {self.resize!r}.")
        if self.normalization not in ("mean_std", "minmax"):
            raise OctSamError(
                f"Base {self.name}: normalization must be 'mean_std' or 'minmax', got {self.normalization!r}."
            )
        for name in ("hooks", "model"):
            if ":" not in getattr(self, name):
                raise OctSamError(f"Base {self.name}: {name} must be 'module:Class', got {getattr(self, name)!r}.")

    @property
    def implementation(self) -> Any:
        """The base's hooks object (its module is imported on first use)."""
        found = _HOOKS.get(self.name)
        if found is None or found[0] != self.hooks:
            found = (self.hooks, _load(self.hooks)())
            _HOOKS[self.name] = found
        return found[1]

    @property
    def model_class(self) -> type:
        """The class that builds, loads and saves models of this base (an ``octsam.models.contract.SegmentationModel``)."""
        return _load(self.model)

    def lora_pattern(self, roles: Iterable[str]) -> str:
        """A PEFT ``target_modules`` regex for ``roles`` (an unknown role is refused, naming the known ones)."""
        roles = list(roles)
        unknown = [r for r in roles if r not in self.lora_roles]
        if unknown:
            raise OctSamError(
                f"lora_target_modules {unknown} do not exist for a {self.name} base; use {sorted(self.lora_roles)}."
            )
        return "^(?:.*\\.)?(?:" + "|".join(f"(?:{self.lora_roles[r]})" for r in roles) + ")$"


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


_BASES: dict[str, Base] = {}
_HOOKS: dict[str, tuple[str, Any]] = {}


def register(base: Base, replace: bool = False) -> Base:
    """Add ``base`` to the registry (``replace=True`` overwrites a record of the same name)."""
    if base.name in _BASES and not replace:
        raise OctSamError(f"A base called {base.name!r} is registered already.")
    for name in base.base_names:
        for other in _BASES.values():
            if other.name != base.name and name in other.base_names:
                raise OctSamError(f"--base-model {name!r} already selects the {other.name} base.")
    _BASES[base.name] = base
    _HOOKS.pop(base.name, None)
    return base


def unregister(name: str) -> None:
    """Remove a record (tests that register a base of their own)."""
    _BASES.pop(name, None)
    _HOOKS.pop(name, None)


def registered() -> list[Base]:
    """Every record, in registration order."""
    return list(_BASES.values())


def get_base(name: str) -> Base:
    try:
        return _BASES[name]
    except KeyError:
        raise OctSamError(f"Unknown base {name!r}; known: {', '.join(_BASES)}.") from None


def architectures() -> list[str]:
    """The model families (``--model``): the records named like their architecture."""
    return [b.name for b in _BASES.values() if b.name == b.architecture]


def base_of(config: Any) -> Base:
    """The record of a model config (``OctSamConfig``): its ``encoder`` within its family, else the family default
    (a U-Net config keeps the default ``encoder`` "sam", written before this registry)."""
    record = _BASES.get(config.encoder)
    if record is not None and record.architecture == config.architecture:
        return record
    record = _BASES.get(config.architecture)
    if record is None or record.architecture != config.architecture:
        raise OctSamError(
            f"Unknown model architecture {config.architecture!r} (encoder {config.encoder!r}); known: "
            f"{', '.join(architectures())}."
        )
    return record


def base_for_name(base_model: str, architecture: str = "sam") -> Base:
    """The record a ``--base-model`` name selects: the base that claims the name, else the family default."""
    for record in _BASES.values():
        if base_model in record.base_names and record.architecture == architecture:
            return record
    return get_base(architecture)


def base_of_model(model: Any, architecture: str = "sam") -> Base:
    """The record of a built base model (the encoder ``isinstance`` tests live in each base's ``owns`` hook): a
    base of the family that owns it, else the family default."""
    for record in _BASES.values():
        if record.architecture == architecture and record.name != architecture and record.implementation.owns(model):
            return record
    return get_base(architecture)


# ---------------------------------------------------------------------------------------------- the built-in bases
register(
    Base(
        name="sam",
        hooks="octsam.models.sam:SamHooks",
        lora_roles={
            "qkv": r"vision_encoder\.layers\.\d+\.attn\.qkv",
            "proj": r"vision_encoder\.layers\.\d+\.attn\.proj",
            "attention": r"vision_encoder\.layers\.\d+\.attn\.(?:qkv|proj)",
            "mlp": r"vision_encoder\.layers\.\d+\.mlp\.lin[12]",
            "decoder_attention": _DECODER_ATTENTION,
        },
    )
)
register(
    Base(
        name="litemedsam",
        hooks="octsam.models.litemedsam:LiteMedSamHooks",
        base_names=("litemedsam",),
        resize="pad",
        normalization="minmax",
        # TinyViT's stage 0 is convolutional (MBConv) and has neither attention nor MLP; stages 1-3 have both.
        lora_roles={
            "qkv": r"vision_encoder\.tinyvit\.layers\.\d+\.blocks\.\d+\.attn\.qkv",
            "proj": r"vision_encoder\.tinyvit\.layers\.\d+\.blocks\.\d+\.attn\.proj",
            "attention": r"vision_encoder\.tinyvit\.layers\.\d+\.blocks\.\d+\.attn\.(?:qkv|proj)",
            "mlp": r"vision_encoder\.tinyvit\.layers\.\d+\.blocks\.\d+\.mlp\.fc[12]",
            "decoder_attention": _DECODER_ATTENTION,
        },
        zero_shot_multimask=False,  # LiteMedSAM (like MedSAM) was trained with one mask per box
        card_tags=("litemedsam", "medsam"),
    )
)
_UNET = dict(  # what the CNN baselines are and can do: whole models of their own, automatic only
    weight_files=(UNET_WEIGHTS_NAME,),
    peft_adapter=False,
    has_embeddings=False,
    zero_shot_multimask=False,
    fast_attention=False,
    compiles=False,  # small: nothing to gain
    method_name="U-Net",
    card_tags=("octsam", "unet", "monai", "medical-imaging", "oct", "ophthalmology"),
)
register(
    Base(
        name="unet",
        hooks="octsam.models.contract:BaseHooks",  # nothing to build or recognise: the model is all of it
        architecture="unet",
        model="octsam.models.unet:UNetSegmenter",
        **_UNET,
    )
)
# ``--model dynunet`` (nnU-Net-like DynUNet): its folders are U-Net folders (architecture "unet", extra unet_variant
# "dynunet"), which the unet record's model class loads as a DynUNetSegmenter.
register(
    Base(
        name="dynunet",
        hooks="octsam.models.contract:BaseHooks",
        architecture="dynunet",
        model="octsam.models.dynunet:DynUNetSegmenter",
        **_UNET,
    )
)
