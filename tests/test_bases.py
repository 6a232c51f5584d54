"""The base registry and the model contract (issue 18): a new base is one module plus one registry line.

This file is that module: ``ToyEncoder`` is a new image encoder kind (a patchify convolution and one attention
block) behind SAM's prompt encoder and mask decoder, ``ToyHooks`` its code for the registry, and ``TOY`` its record,
registered at test time. It is then trained, saved, loaded, run and evaluated through octsam's normal commands with
nothing else changed.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY_LABELS, shape_scan
from PIL import Image
from torch import nn

from octsam import bases
from octsam.adapter import OctSamConfig
from octsam.bases import Base, base_for_name, base_of, base_of_model, get_base, register, unregister
from octsam.errors import OctSamError
from octsam.models.contract import BaseHooks, SegmentationModel


# ------------------------------------------------------------------------------------------------ the new base
class ToyBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        return tokens + self.proj(F.scaled_dot_product_attention(q, k, v))


class ToyEncoder(nn.Module):
    """(B, 3, 24, 24) -> a (B, 32, 12, 12) image embedding, the grid of the tiny SAM decoder (``make_sam_config``)."""

    def __init__(self, channels: int = 32, patch: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, channels, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList([ToyBlock(channels)])

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs):
        from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

        x = self.patch_embed(pixel_values)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        return SamVisionEncoderOutput(last_hidden_state=tokens.transpose(1, 2).reshape(batch, channels, height, width))


class ToyHooks(BaseHooks):
    def build(self, base_model: str, revision: str | None = None, dtype: torch.dtype | None = None):
        from transformers import SamModel

        from octsam.models.sam import make_sam_config

        with torch.random.fork_rng():  # the same weights every time, whatever the caller's RNG state
            torch.manual_seed(0)
            model = SamModel(make_sam_config())
            model.vision_encoder = ToyEncoder()
        model.name_or_path = base_model
        return model.to(dtype).eval() if dtype is not None else model.eval()

    def owns(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "vision_encoder", None), ToyEncoder)

    def card_description(self, config) -> str | None:
        return "Toy: a one-block test encoder behind SAM's prompt encoder and mask decoder"


TOY = Base(
    name="toy",
    hooks=f"{__name__}:ToyHooks",
    base_names=("toy",),
    resize="pad",
    normalization="minmax",
    lora_roles={"qkv": r"vision_encoder\.blocks\.\d+\.qkv", "proj": r"vision_encoder\.blocks\.\d+\.proj"},
    zero_shot_multimask=False,
    fast_attention=False,
    compiles=False,
    card_tags=("toy",),
)


@pytest.fixture(scope="module")
def toy():
    register(TOY)  # the registry line
    yield TOY
    unregister(TOY.name)


# ------------------------------------------------------------------------------------------------ the registry
def test_records_of_the_built_in_bases():
    assert [b.name for b in bases.registered()][:3] == ["sam", "litemedsam", "unet"]
    assert bases.architectures() == ["sam", "unet", "dynunet"]
    assert base_for_name("litemedsam").name == "litemedsam"
    assert base_for_name("facebook/sam-vit-base").name == "sam"
    assert base_for_name("/some/local/folder").name == "sam"
    lite = get_base("litemedsam")
    assert (lite.resize, lite.normalization, lite.zero_shot_multimask) == ("pad", "minmax", False)
    unet = get_base("unet")
    assert not (unet.has_embeddings or unet.peft_adapter or unet.compiles) and unet.weight_files == (
        "model.safetensors",
    )
    # A U-Net config keeps the default encoder "sam" (as folders written before the registry do): its architecture wins.
    assert base_of(OctSamConfig(labels=TINY_LABELS, architecture="unet", lora_target_modules=[])).name == "unet"
    assert base_of(OctSamConfig(labels=TINY_LABELS, encoder="litemedsam")).name == "litemedsam"
    with pytest.raises(OctSamError, match="Unknown model architecture"):
        base_of(OctSamConfig(labels=TINY_LABELS, architecture="transformer"))
    with pytest.raises(OctSamError, match="registered already"):
        register(Base(name="sam", hooks="octsam.models.sam:SamHooks"))
    with pytest.raises(OctSamError, match="already selects"):
        register(Base(name="other", hooks="x:Y", base_names=("litemedsam",)))
    with pytest.raises(OctSamError, match="resize"):
        Base(name="bad", hooks="x:Y", resize="crop")


def test_the_views_kept_in_the_adapter_module():
    """``octsam.adapter`` still answers LORA_ROLES, ENCODER_INPUT and WEIGHT_FILES (read from the registry)."""
    import octsam.adapter as adapter

    assert set(adapter.LORA_ROLES) == {"sam", "litemedsam"}
    assert adapter.ENCODER_INPUT["litemedsam"] == {"resize": "pad", "normalization": "minmax"}
    assert adapter.WEIGHT_FILES["sam"] == (adapter.PEFT_CONFIG_NAME, adapter.PEFT_WEIGHTS_NAME)
    assert adapter.WEIGHT_FILES["unet"] == ("model.safetensors",)
    assert adapter.ADAPTER_FILES == adapter.adapter_files()


def test_models_implement_the_contract(tiny_base):
    from octsam.models.sam import OctSamModel
    from octsam.models.unet import UNetSegmenter

    sam = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base))
    unet = UNetSegmenter.create(TINY_LABELS, image_size=32, channels=[4, 8, 16])
    for model in (sam, unet):
        assert isinstance(model, SegmentationModel)
        assert base_of(model.config).model_class is type(model)
        pixels = torch.randint(0, 255, (1, 1, model.config.image_size, model.config.image_size), dtype=torch.uint8)
        with torch.no_grad():
            logits = model.class_logits(model.preprocess(pixels))
        assert logits.shape[:2] == (1, 2)
        assert model.trainable_parameters() and all(p.requires_grad for p in model.trainable_parameters())
    assert sam.supports_prompts and not unet.supports_prompts and unet.image_encoder is None
    with pytest.raises(OctSamError, match="no image embedding"):
        unet.image_embeddings(torch.zeros(1, 3, 32, 32))


def test_no_base_name_or_architecture_test_outside_the_models():
    """What a base is and can do is asked of its record: no ``architecture ==`` / ``encoder ==`` test and no
    comparison with a base name outside ``octsam/models`` and the registry."""
    pattern = re.compile(r"\b(architecture|encoder)\s*[!=]=|[!=]=\s*[\"'](sam|litemedsam|unet)[\"']")
    found = []
    for path in sorted((REPO_ROOT / "octsam").rglob("*.py")):
        if path.parent.name == "models" or path.name == "bases.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------ a toy base end to end
def test_a_new_base_trains_saves_loads_infers_and_evaluates(toy, shape_dataset, tmp_path, capsys):
    from octsam.cli.evaluate import main as evaluate_main
    from octsam.cli.infer import main as infer_main
    from octsam.cli.train import main as train_main
    from octsam.models import load_model
    from octsam.segmenter import Segmenter

    run = tmp_path / "run"
    argv = [
        "--dataset", shape_dataset, "--base-model", "toy", "--lora-target-modules", "qkv", "proj",
        "--output-dir", str(run), "--num-workers", "0", "--report-to", "none", "--effective-batch-size", "4",
        "--per-device-train-batch-size", "4", "--num-train-epochs", "2", "--early-stopping-patience", "0",
        "--no-augment", "--lora-dropout", "0", "--learning-rate", "1e-2",
    ]  # fmt: skip
    assert train_main(argv) == 0
    adapter = run / "best_adapter"

    # Saved: the record's input spec and name, its card text and tags.
    config = json.loads((adapter / "octsam_config.json").read_text())
    assert (config["encoder"], config["resize"], config["normalization"]) == ("toy", "pad", "minmax")
    assert (config["base_model"], config["image_size"]) == ("toy", 24)
    card = (adapter / "README.md").read_text()
    assert "Toy: a one-block test encoder" in card and "- toy" in card

    # Loaded: the toy encoder with LoRA on its linears, recognised by its hooks.
    model = load_model(adapter)
    assert isinstance(model.core.vision_encoder, ToyEncoder) and base_of_model(model.core).name == "toy"
    lora = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert lora and all(".blocks.0.qkv" in n or ".blocks.0.proj" in n for n in lora)

    # Inferred: the library API and the command line give the same mask at the native size.
    image, _ = shape_scan(np.random.default_rng(5))
    segmenter = Segmenter.from_pretrained(adapter, device="cpu")
    mask = segmenter([image])[0].mask
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1, 2}
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(image).save(scans / "scan.png")
    assert infer_main(["--adapter", str(adapter), "--input", str(scans), "--output", str(tmp_path / "masks"),
                       "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    assert np.array_equal(np.array(Image.open(tmp_path / "masks" / "masks" / "scan.png")), mask)

    # Evaluated, with its zero-shot baseline (the toy base prompted with one mask per box, as its record says).
    out = tmp_path / "eval"
    assert evaluate_main(["--adapter", f"Toy={adapter}", "--method", "zero-shot", "--dataset", shape_dataset,
                          "--output", str(out), "--n-bootstrap", "10", "--device", "cpu", "--dpi", "50"]) == 0  # fmt: skip
    with (out / "sam_lora_performance.csv").open() as f:
        assert [r["Method"] for r in csv.DictReader(f)] == ["zero-shot", "Toy"]
    assert json.loads((out / "comparison.json").read_text())["methods"]["Toy"]["kind"] == "sam"


def test_an_adapter_of_an_unregistered_base_is_refused_with_its_name(toy, tmp_path):
    config = OctSamConfig(labels=TINY_LABELS, base_model="toy", encoder="toy", lora_target_modules=["qkv"])
    unregister("toy")
    try:
        with pytest.raises(OctSamError, match="option encoder = .toy. is not allowed: one of"):
            OctSamConfig(labels=TINY_LABELS, encoder="toy")
    finally:
        register(TOY)
    assert config.encoder == "toy"
