"""Reuse image embeddings across epochs when training cannot change them.

When no parameter of the image encoder is trained (LoRA only on the mask decoder, or a frozen encoder) and the
training B-scans are not augmented, every epoch feeds the encoder the same pixels and gets the same embeddings back.
The image encoder is then by far the largest cost of a step (LiteMedSAM on a CPU: about 1 s per B-scan, the mask
decoder a few ms), so the embeddings are computed once per distinct input and kept in memory. Exact: the cached
tensor is the one the encoder returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("octsam")

DEFAULT_LIMIT_BYTES = 4 * 1024**3


def encoder_is_frozen(model) -> bool:
    """True when no parameter of the image encoder of ``model`` (an ``OctSamModel``) is trained."""
    encoder = model.image_encoder
    return not any(p.requires_grad for p in encoder.parameters())


class EmbeddingCache:
    """Wraps ``vision_encoder.forward`` of a frozen encoder; the key of an input is a hash of its pixel values."""

    def __init__(self, encoder, limit_bytes: int = DEFAULT_LIMIT_BYTES, directory=None, namespace: str = ""):
        self.encoder = encoder
        self.forward = encoder.forward
        self.directory = None if directory is None else Path(directory)
        self.namespace = namespace.encode()
        self.limit_bytes = limit_bytes
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def key(self, pixels: torch.Tensor) -> bytes:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.blake2b(self.namespace + data, digest_size=16).digest()

    def _load(self, key: bytes) -> torch.Tensor | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key.hex()}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["embedding"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            return None

    def _save(self, key: bytes, embedding: torch.Tensor) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key.hex()}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"embedding": embedding.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)

    def __call__(self, pixel_values: torch.Tensor | None = None, **kwargs):
        if pixel_values is None or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return self.forward(pixel_values, **kwargs)
        keys = [self.key(p) for p in pixel_values]
        for k in keys:
            if k not in self.store and (found := self._load(k)) is not None:
                self._keep(k, found.to(pixel_values.device))
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed = {}
        if missing:
            with torch.no_grad():
                out = self.forward(pixel_values[missing], **kwargs).last_hidden_state
            for j, i in enumerate(missing):
                computed[keys[i]] = out[j]
                self._keep(keys[i], out[j])
                self._save(keys[i], out[j])
        embeddings = torch.stack([self.store.get(k, computed.get(k)) for k in keys])
        return _Output(embeddings)

    def _keep(self, key: bytes, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if self.bytes + size <= self.limit_bytes:
            self.store[key] = embedding
            self.bytes += size


class _Output:
    """What ``SamModel`` and octsam read of a vision encoder's output."""

    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state

    def __getitem__(self, index: int):
        return (self.last_hidden_state,)[index]


def enable_embedding_cache(
    model, augmented: bool, limit_bytes: int = DEFAULT_LIMIT_BYTES, directory=None
) -> EmbeddingCache | None:
    """Cache the image embeddings of ``model`` when that is exact: the encoder is frozen and the inputs repeat (no
    augmentation, or one that makes finitely many images, ``AugmentConfig.finite``: flips). Returns the cache (its ``hits``/``misses`` say how much it saved), or None. With ``directory``
    the embeddings are also kept on disk (safetensors, keyed by the base's weights and the pixels), so that runs on
    the same B-scans - cross-validation folds, modes - share them."""
    from octsam.bases import base_of

    if augmented or not base_of(model.config).has_embeddings or not encoder_is_frozen(model):
        return None
    encoder = model.image_encoder
    config = model.config
    namespace = f"{config.encoder}:{config.base_model}:{config.base_sha256}:{config.image_size}:{config.resize}:"
    cache = EmbeddingCache(encoder, limit_bytes, directory, namespace + config.normalization)
    encoder.forward = cache
    logger.info("image encoder frozen and inputs that repeat: embeddings are computed once and reused every epoch")
    return cache
