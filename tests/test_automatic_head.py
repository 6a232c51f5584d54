"""The mask_tokens automatic head: one decoder pass, class k from SAM's k-th multimask output token, output head
trained; at most three classes; saved, reloaded, exported and refused on resume like every adapter setting."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LABELS
from test_training import overfit_dataset, run_args  # noqa: F401 (fixture)

from octsam.adapter import OctSamConfig
from octsam.config import parse_config
from octsam.errors import OctSamError
from octsam.models.sam import MASK_TOKEN_HEAD_MODULES, OctSamModel
from octsam.training.loop import train


def head_config(tiny_base: str, **kwargs) -> OctSamConfig:
    settings = dict(labels=TINY_LABELS, base_model=tiny_base, automatic_head="mask_tokens", lora_dropout=0.0,
                    lora_target_modules=["decoder_attention"], train_mask_decoder=False)  # fmt: skip
    return OctSamConfig(**{**settings, **kwargs})


def test_one_decoder_pass_gives_one_logit_map_per_class_from_the_multimask_tokens(tiny_base):
    model = OctSamModel.from_base(head_config(tiny_base)).eval()
    prompts = model.core.octsam_class_prompts()
    assert prompts.shape[0] == 1  # one prompt set shared by the classes
    pixels = torch.randint(0, 255, (2, 1, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.image_embeddings(model.preprocess(pixels))
        logits, iou = model.decode(emb)
        # the same decoder call asked for SAM's multimask output: classes are its output tokens 1..K
        sam = model.core
        grid = emb.shape[-1]
        masks, _ = sam.mask_decoder(
            image_embeddings=emb,
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(2, -1, -1, -1),
            sparse_prompt_embeddings=prompts.unsqueeze(0).expand(2, -1, -1, -1),
            dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                2, -1, grid, grid
            ),
            multimask_output=True,
        )
    assert logits.shape == (2, len(TINY_LABELS) - 1, 48, 48) and iou.shape == (2, len(TINY_LABELS) - 1)
    torch.testing.assert_close(logits, masks[:, 0, : len(TINY_LABELS) - 1])
    assert not torch.equal(logits[:, 0], logits[:, 1])  # distinct output tokens, not copies of one prompt


def test_the_output_head_trains_and_the_rest_of_the_decoder_stays_frozen(tiny_base):
    model = OctSamModel.from_base(head_config(tiny_base))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for module in MASK_TOKEN_HEAD_MODULES:
        assert any(f"{module}." in n for n in trainable), module
    assert not any("output_hypernetworks_mlps.0." in n or "iou_prediction_head" in n for n in trainable)
    assert not any("transformer" in n and "lora_" not in n for n in trainable)  # attention only through LoRA


def test_more_than_three_classes_are_refused_naming_the_option(tiny_base):
    with pytest.raises(OctSamError, match="automatic_head.*at most 3"):
        head_config(tiny_base, labels=["background", "a", "b", "c", "d"])
    head_config(tiny_base, labels=["background", "a", "b", "c", "d"], mode="prompted")  # no head in prompted mode


def test_saved_adapter_reloads_with_the_same_logits(tiny_base, tmp_path):
    model = OctSamModel.from_base(head_config(tiny_base)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    pixels = torch.randint(0, 255, (2, 1, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        reference, _ = model(model.preprocess(pixels))
    model.save_pretrained(tmp_path / "adapter")
    loaded = OctSamModel.from_pretrained(tmp_path / "adapter")
    assert loaded.config.automatic_head == "mask_tokens"
    with torch.no_grad():
        assert torch.equal(loaded(loaded.preprocess(pixels))[0], reference)
        merged = loaded.merge()
        torch.testing.assert_close(merged(merged.preprocess(pixels))[0], reference, rtol=1e-5, atol=1e-5)


def test_an_adapter_without_the_field_is_a_class_token_adapter():
    """Adapters written before the field existed decode with class tokens, as they were trained."""
    assert OctSamConfig(labels=TINY_LABELS).automatic_head == "class_tokens"


def test_training_with_the_head_overfits_and_a_resume_with_another_head_is_refused(
    overfit_dataset,  # noqa: F811
    tiny_base,
    tmp_path,
    capsys,
):
    head = ("--automatic-head", "mask_tokens", "--lora-target-modules", "decoder_attention",
            "--train-mask-decoder", "false")  # fmt: skip
    args = run_args(overfit_dataset, tiny_base, tmp_path / "run", *head, "--learning_rate", "1e-2",
                    "--num_train_epochs", "40", "--early_stopping_patience", "0", "--augment", "false",
                    "--evaluate_test", "false", "--keep_checkpoints", "0")  # fmt: skip
    results = train(*parse_config(args))
    assert results["best_val_mean_dice"] >= 0.9, results
    assert OctSamConfig.from_json_file(tmp_path / "run" / "best_adapter" / "octsam_config.json").automatic_head == (
        "mask_tokens"
    )
    from octsam.cli.train import main

    other = [a if a != "mask_tokens" else "class_tokens" for a in args]
    assert main([*other, "--resume-from-checkpoint", "latest", "--num_train_epochs", "41"]) == 2
    assert "automatic_head" in capsys.readouterr().err


def test_the_head_exports_to_onnx_with_the_same_logits(tiny_base, tmp_path):
    pytest.importorskip("onnxruntime")
    from octsam.export.onnx import export_onnx, load_for_export
    from octsam.export.runtime import OnnxModel

    model = OctSamModel.from_base(head_config(tiny_base))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    folder = export_onnx(tmp_path / "adapter", tmp_path / "onnx")
    torch_model, onnx_model = load_for_export(tmp_path / "adapter"), OnnxModel.load(folder)
    pixels = torch.randint(0, 256, (2, 1, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        emb = torch_model.image_embeddings(torch_model.preprocess(pixels))
        reference, _ = torch_model.decode(emb)
        ours, _ = onnx_model.decode(emb)
    assert ours.shape == reference.shape == (2, len(TINY_LABELS) - 1, 48, 48)
    assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-4
