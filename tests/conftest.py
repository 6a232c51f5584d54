"""Shared fixtures: a tiny random SAM base model and a small shape dataset it can learn (offline, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports huggingface_hub / datasets (they read these once): tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread avoids OpenMP start-up and spin costs that dominate small ops.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# octsam.models.triton_attention's kernels run under Triton's interpreter (NumPy, CPU tensors); Triton reads this when a
# kernel is decorated, i.e. when the module is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import datasets
import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
DUKE_DIR = REPO_ROOT.parent / "shared" / "data" / "duke_dme_fluid"
TINY_LABELS = ["background", "drusen", "fluid"]


def shape_scan(rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A grey scan with a bright rectangle (class 1) and a dark disc on a mid-grey band (class 2)."""
    h, w = size
    image = rng.normal(60, 6, size).clip(0, 255)
    mask = np.zeros(size, np.uint8)
    y0, x0 = rng.integers(4, h // 2 - 4), rng.integers(2, w // 2 - 8)
    image[y0 : y0 + h // 3, x0 : x0 + w // 3] = 220
    mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(h // 2, h - 8), rng.integers(w // 2 + 6, w - 8)
    image[h // 2 - 2 :, w // 2 :] = 140
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
    image[disc] = 10
    mask[disc] = 2
    return image.astype(np.uint8), mask


def write_shape_dataset(path: Path, scans_per_split=(8, 4, 4), seed: int = 0, same_scans: bool = False) -> Path:
    """Three splits of shape scans; ``same_scans`` puts the training scans in every split (overfitting tests)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("train", "validation", "test"), scans_per_split):
        if same_scans:
            rng = np.random.default_rng(seed)
        rows = {k: [] for k in ("image", "mask", "patient_id", "scan_id", "disease", "source")}
        for i in range(n):
            image, mask = shape_scan(rng)
            rows["image"].append(Image.fromarray(image))
            rows["mask"].append(Image.fromarray(mask))
            rows["patient_id"].append(f"{split}-p{i // 2}")
            rows["scan_id"].append(f"{split}-{i}")
            rows["disease"].append("amd")
            rows["source"].append("test-shapes")
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "mask": datasets.Image(),
                **{k: datasets.Value("string") for k in ("patient_id", "scan_id", "disease", "source")},
            }
        )
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    (path / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(TINY_LABELS)}))
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A randomly initialised tiny SAM saved as a local base model (``octsam.models.sam.save_random_base``: vision hidden
    36, 2 layers, 4 heads, input 24, patch 2)."""
    from octsam.models.sam import save_random_base

    return save_random_base(tmp_path_factory.mktemp("base") / "tiny-sam", seed=0)


@pytest.fixture(scope="session")
def shape_dataset(tmp_path_factory) -> str:
    return str(write_shape_dataset(tmp_path_factory.mktemp("data") / "shapes"))


def random_rel_pos_sam(
    image: int = 24,
    window_size: int = 4,
    hidden: int = 36,
    heads: int = 4,
    mlp_dim: int = 72,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A 2-layer SAM (windowed layer, then global layer; patch 2) with random, non-zero relative-position tables,
    so that a wrong attention bias shows (a new SAM's tables are zero)."""
    from transformers import SamConfig, SamModel, SamVisionConfig

    torch.manual_seed(seed)
    vision = SamVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        image_size=image,
        patch_size=2,
        output_channels=32,
        global_attn_indexes=[1],
        window_size=window_size,
        mlp_dim=mlp_dim,
        num_pos_feats=16,
        initializer_range=0.02,
    )
    config = SamConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config={"hidden_size": 32, "image_size": image, "patch_size": 2, "mask_input_channels": 8},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 4, "iou_head_hidden_dim": 32},
    )
    config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    model = SamModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_()
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
