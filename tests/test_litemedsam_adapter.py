"""LiteMedSAM as an octsam base: the same adapter format, modes, merge and evaluation as transformers' SAM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DUKE_DIR, TINY_LABELS

from octsam.adapter import OctSamConfig
from octsam.errors import OctSamError
from octsam.models.sam import OctSamModel, zero_shot_model, zero_shot_multimask
from octsam.segmenter import Prompt, Segmenter


@pytest.fixture(scope="module")
def lite_adapter(tmp_path_factory):
    config = OctSamConfig(labels=list(TINY_LABELS), base_model="litemedsam", lora_target_modules=["attention", "mlp"])
    model = OctSamModel.from_base(config, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("lite") / "adapter"
    model.save_pretrained(folder)
    return folder


def bscan(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (62, 96)).astype(np.uint8)


def test_adapter_records_the_base_and_its_input(lite_adapter):
    saved = json.loads((lite_adapter / "octsam_config.json").read_text())
    assert saved["encoder"] == "litemedsam" and saved["image_size"] == 256
    assert (saved["resize"], saved["normalization"]) == ("pad", "minmax")
    assert len(saved["base_sha256"]) == 64


def test_adapter_records_the_base_and_its_input_quietly(recwarn, tmp_path):
    """The new adapter's PEFT config names the base octsam records, and creating and saving it warns nothing (PEFT
    warned 'renamed to None' on creation and looked the base up on the Hub when saving)."""
    config = OctSamConfig(labels=list(TINY_LABELS), base_model="litemedsam", lora_target_modules=["qkv"])
    model = OctSamModel.from_base(config, seed=0)
    assert model.sam.peft_config["default"].base_model_name_or_path == "litemedsam"
    model.save_pretrained(tmp_path / "adapter")  # no Hub lookup of the base's config.json (PEFT warned offline)
    noisy = ("base_model_name_or_path", "Could not find a config file")
    assert [str(w.message) for w in recwarn if any(n in str(w.message) for n in noisy)] == []


def test_round_trip_and_merge_are_exact(lite_adapter):
    images = [bscan(0), bscan(1)]
    unmerged = Segmenter.from_pretrained(lite_adapter, device="cpu", merge=False)
    merged = Segmenter.from_pretrained(lite_adapter, device="cpu")
    a, b = unmerged.class_logits(images), merged.class_logits(images)
    assert a.shape == (2, 2, 256, 256)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    results = merged(images)
    assert results[0].mask.shape == (62, 96)


def test_a_base_with_other_weights_is_refused(lite_adapter, tmp_path):
    config = json.loads((lite_adapter / "octsam_config.json").read_text())
    config["base_sha256"] = "0" * 64
    (lite_adapter / "octsam_config.json").write_text(json.dumps(config))
    try:
        with pytest.raises(OctSamError, match="other weights under the same name"):
            OctSamModel.from_pretrained(lite_adapter)
    finally:
        config["base_sha256"] = None
        (lite_adapter / "octsam_config.json").write_text(json.dumps(config))


def test_padded_frame_prompts_and_outputs():
    """A box drawn on the B-scan lands on the same place of the padded 256 frame, and zero-shot uses one mask."""
    model = zero_shot_model("litemedsam", ["background", "fluid"])
    assert not zero_shot_multimask(model.config) and model.config.resize == "pad"
    image = np.full((124, 192), 30, np.uint8)
    image[40:70, 60:120] = 200
    segmenter = Segmenter(model, device="cpu")
    (result,) = segmenter([image], prompts=[[Prompt(label=1, box=(58, 38, 122, 72))]])
    inside = result.mask[45:65, 70:110].mean()
    outside = result.mask[:, :40].mean() + result.mask[100:, :].mean()
    assert inside > 0.8 and outside < 0.05


@pytest.mark.skipif(not DUKE_DIR.is_dir(), reason="the Duke data is not beside the repository")
def test_zero_shot_segments_real_fluid():
    """On a real Duke B-scan with its true fluid boxes, zero-shot LiteMedSAM overlaps the truth well."""
    from PIL import Image

    from octsam.evaluation.predict import ground_truth_prompts

    image = np.asarray(Image.open(DUKE_DIR / "images" / "duke_s01_b25.png"))
    truth = np.asarray(Image.open(DUKE_DIR / "masks" / "duke_s01_b25.png"))
    segmenter = Segmenter(zero_shot_model("litemedsam", ["background", "fluid"]), device="cpu")
    (result,) = segmenter([image], prompts=[ground_truth_prompts(truth, 2)], multimask=False)
    pred, ref = result.mask == 1, truth == 1
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice > 0.6
