"""Training: overfitting in both modes, frozen base, save/load, merge, exact resume, early stopping, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_LABELS, write_shape_dataset
from safetensors.torch import load_file

from octsam.adapter import OctSamConfig
from octsam.cli.train import main
from octsam.config import parse_config
from octsam.errors import OctSamError
from octsam.models.sam import OctSamModel, make_sam_config
from octsam.training.loop import train
from octsam.training.losses import SegmentationLoss


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_args(dataset: str, base: str, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", dataset, "--base_model", base, "--output_dir", str(out), "--num_workers", "0",
        "--report_to", "none", "--effective_batch_size", "2", "--per_device_train_batch_size", "2",
        "--lora_dropout", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def overfit_dataset(tmp_path_factory) -> str:
    return str(write_shape_dataset(tmp_path_factory.mktemp("overfit") / "d", (4, 4, 4), seed=3, same_scans=True))


@pytest.mark.parametrize("mode", ["automatic", "prompted"])
def test_tiny_sam_overfits_a_few_scans(mode, overfit_dataset, tiny_base, tmp_path):
    model_args, data_args, train_args = parse_config(
        run_args(
            overfit_dataset, tiny_base, tmp_path / mode, "--mode", mode, "--learning_rate", "1e-2",
            "--num_train_epochs", "40", "--early_stopping_patience", "0", "--augment", "false",
            "--evaluate_test", "false", "--keep_checkpoints", "0",
        )
    )  # fmt: skip
    results = train(model_args, data_args, train_args)
    assert results["best_val_mean_dice"] >= 0.9, results
    adapter = tmp_path / mode / "best_adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert OctSamConfig.from_json_file(adapter / "octsam_config.json").mode == mode


def _perturbed_model(tiny_base: str, mode: str = "automatic") -> OctSamModel:
    model = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base, mode=mode))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # LoRA B starts at zero: make the adapter non-trivial
    return model.eval()


def test_base_weights_stay_bit_identical(tiny_base):
    model = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base, lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss_fn = SegmentationLoss()
    pixels = torch.randint(0, 255, (2, 1, 24, 24), dtype=torch.uint8)
    target = torch.randint(0, 3, (2, 24, 24))
    for _ in range(3):
        logits, _ = model(model.preprocess(pixels))
        loss = loss_fn(torch.nn.functional.interpolate(logits, size=(24, 24)), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, before in frozen.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any("lora_" in n for n in changed) and any("mask_decoder" in n for n in changed)
    assert any("octsam_class_prompts" in n for n in changed)


@pytest.mark.parametrize("mode", ["automatic", "prompted"])
def test_adapter_save_load_and_merge(tiny_base, tmp_path, mode):
    model = _perturbed_model(tiny_base, mode)
    pixels = torch.randint(0, 255, (2, 1, 24, 24), dtype=torch.uint8)
    boxes = torch.tensor([[[2.0, 3.0, 15.0, 20.0]], [[5.0, 1.0, 22.0, 12.0]]]) if mode == "prompted" else None
    with torch.no_grad():
        reference, _ = model(model.preprocess(pixels), input_boxes=boxes)
    model.save_pretrained(tmp_path / "adapter")
    loaded = OctSamModel.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        again, _ = loaded(loaded.preprocess(pixels), input_boxes=boxes)
        assert torch.equal(reference, again)
        merged = loaded.merge()
        merged_out, _ = merged(merged.preprocess(pixels), input_boxes=boxes)
    assert not hasattr(merged.sam, "peft_config")
    torch.testing.assert_close(merged_out, reference, rtol=1e-5, atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path, tiny_base):
    dataset = str(write_shape_dataset(tmp_path / "d", (5, 3, 2), seed=1))
    common = ("--num_train_epochs", "4", "--early_stopping_patience", "0", "--evaluate_test", "false",
              "--lora_dropout", "0.1", "--learning_rate", "5e-3")  # fmt: skip
    assert main(run_args(dataset, tiny_base, tmp_path / "full", *common)) == 0
    assert main(run_args(dataset, tiny_base, tmp_path / "cut", *common, "--stop_after_epochs", "2")) == 0
    assert json.loads((tmp_path / "cut/checkpoints/epoch-0002/trainer_state.json").read_text())["epoch"] == 2
    assert not (tmp_path / "cut/checkpoints/epoch-0003").exists()
    assert main(run_args(dataset, tiny_base, tmp_path / "cut", *common, "--resume_from_checkpoint", "latest")) == 0
    full = load_file(str(tmp_path / "full/checkpoints/epoch-0004/trainable.safetensors"))
    resumed = load_file(str(tmp_path / "cut/checkpoints/epoch-0004/trainable.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history_full = json.loads((tmp_path / "full/checkpoints/epoch-0004/trainer_state.json").read_text())["history"]
    history_cut = json.loads((tmp_path / "cut/checkpoints/epoch-0004/trainer_state.json").read_text())["history"]
    assert [h["train_loss"] for h in history_full] == [h["train_loss"] for h in history_cut]


def test_early_stopping_stops_after_patience(tmp_path, shape_dataset, tiny_base):
    out = tmp_path / "run"
    args = run_args(shape_dataset, tiny_base, out, "--learning_rate", "1e-30", "--num_train_epochs", "10",
                    "--early_stopping_patience", "2", "--evaluate_test", "false")  # fmt: skip
    model_args, data_args, train_args = parse_config(args)
    results = train(model_args, data_args, train_args)
    # With lr 0 the validation Dice never improves after epoch 1: epochs 2 and 3 use up the patience.
    assert results["stopped_early"] and results["epochs_trained"] == 3 and results["best_epoch"] == 1
    # training speed per epoch, measured by the loop itself, in the results a user reads (no profiler needed)
    on_disk = json.loads((out / "all_results.json").read_text())
    for key in ("train_images_per_s_per_epoch", "train_images_per_s_after_first_step_per_epoch"):
        assert len(on_disk[key]) == 3 and all(v > 0 for v in on_disk[key]), on_disk
    assert "compile_s" not in on_disk  # the CPU trains uncompiled by default
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0001", "epoch-0002", "epoch-0003"]  # best + latest + 2 kept


def test_two_process_data_parallel_run(tmp_path, tiny_base):
    dataset = str(write_shape_dataset(tmp_path / "d", (6, 5, 3), seed=2))  # 5 validation scans: uneven shards
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO_ROOT / "train.py"), *run_args(dataset, tiny_base, out, "--num_train_epochs", "2",
           "--report_to", "tensorboard", "--effective_batch_size", "4")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    state = json.loads((out / "checkpoints/epoch-0002/trainer_state.json").read_text())
    assert [h["val_scans"] for h in state["history"]] == [5, 5]
    assert sorted(p.name for p in (out / "checkpoints/epoch-0002").glob("rng_state_*.safetensors")) == [
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    ]
    writers = {p.name.split(".")[-2] for p in (out / "logs").rglob("events.out.tfevents*")}
    assert len(writers) == 1  # event files carry the writer's pid: only the main process logs
    results = json.loads((out / "all_results.json").read_text())
    assert results["epochs_trained"] == 2 and "test_mean_dice" in results
    assert not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: x\nlearning_rat: 0.1\n")
    with pytest.raises(OctSamError, match="learning_rat"):
        parse_config(["--config", str(config)])


def test_attention_mode_reaches_the_model_and_a_bad_one_is_refused(tmp_path, shape_dataset, tiny_base):
    from octsam.models.fast_attention import fast_attention_mode
    from octsam.training.loop import build_model

    model_args, _, _ = parse_config(run_args(shape_dataset, tiny_base, tmp_path / "o", "--attention_mode", "triton"))
    assert fast_attention_mode(build_model(model_args, list(TINY_LABELS), seed=0)) == "triton"
    with pytest.raises(OctSamError, match="attention-mode"):
        train(*parse_config(run_args(shape_dataset, tiny_base, tmp_path / "o2", "--attention_mode", "fastest")))


def test_missing_split(tmp_path, shape_dataset, tiny_base):
    import datasets

    dsd = datasets.load_from_disk(shape_dataset)
    broken = tmp_path / "broken"
    datasets.DatasetDict({"train": dsd["train"], "test": dsd["test"]}).save_to_disk(str(broken))
    (broken / "id2label.json").write_text((Path(shape_dataset) / "id2label.json").read_text())
    with pytest.raises(OctSamError, match="validation"):
        train(*parse_config(run_args(str(broken), tiny_base, tmp_path / "o")))


def test_resume_with_other_label_count_is_refused(tmp_path, shape_dataset, tiny_base, capsys):
    out = tmp_path / "run"
    args = run_args(shape_dataset, tiny_base, out, "--num_train_epochs", "1", "--evaluate_test", "false")
    assert main(args) == 0
    other = write_shape_dataset(tmp_path / "other", (4, 2, 2))
    (other / "id2label.json").write_text(json.dumps({"0": "background", "1": "drusen", "2": "scar", "3": "fluid"}))
    assert main(run_args(str(other), tiny_base, out, "--resume_from_checkpoint", "latest")) == 2
    err = capsys.readouterr().err
    assert "labels" in err and "4" in err and "Traceback" not in err


def test_output_dir_is_never_overwritten(tmp_path, shape_dataset, tiny_base, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(run_args(shape_dataset, tiny_base, out)) == 2
    assert "--resume-from-checkpoint" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep"


def test_input_size_sam_rejects(tiny_base):
    with pytest.raises(OctSamError, match="multiple of patch_size"):
        make_sam_config(image_size=25, patch_size=2)
    model = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base))
    with pytest.raises(OctSamError, match="24x24"):
        model.preprocess(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_out_of_memory_message(monkeypatch, capsys):
    def oom(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("octsam.training.loop.train", oom)
    monkeypatch.setattr("octsam.cli.train.parse_config", lambda argv: (None, None, None))
    assert main([]) == 3
    err = capsys.readouterr().err
    assert "--per-device-train-batch-size" in err and "--gradient-checkpointing" in err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, shape_dataset, tiny_base, monkeypatch, capsys):
    out = tmp_path / "run"
    args = run_args(shape_dataset, tiny_base, out, "--num_train_epochs", "3", "--evaluate_test", "false",
                    "--early_stopping_patience", "0", "--logging_steps", "1")  # fmt: skip
    original = SegmentationLoss.forward
    calls = {"n": 0}

    def flaky(self, logits, target):
        calls["n"] += 1
        loss = original(self, logits, target)
        return loss * float("nan") if calls["n"] == 6 else loss  # 4 train steps + 1 val batch per epoch

    monkeypatch.setattr(SegmentationLoss, "forward", flaky)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Non-finite loss at optimizer step 5" in err and "epoch-0001" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]


def test_embedding_cache_is_exact_and_only_for_a_frozen_encoder(tiny_base):
    """With LoRA only on the decoder and no augmentation the embeddings are reused (same values); with LoRA on the
    encoder, or with augmentation, nothing is cached."""
    from octsam.training.embedding_cache import enable_embedding_cache

    frozen = OctSamModel.from_base(
        OctSamConfig(
            labels=list(TINY_LABELS),
            base_model=tiny_base,
            lora_target_modules=["decoder_attention"],
            train_mask_decoder=False,
        )
    )
    pixels = frozen.preprocess(torch.randint(0, 255, (3, 1, 24, 24), dtype=torch.uint8))
    expected, _ = frozen(pixels)
    cache = enable_embedding_cache(frozen, augmented=False)
    assert cache is not None
    first, _ = frozen(pixels)
    second, _ = frozen(pixels[[2, 0]])
    assert torch.equal(first, expected) and torch.equal(second, expected[[2, 0]])
    assert (cache.misses, cache.hits) == (3, 2)
    first.sum().backward()  # the decoder still trains
    assert any(p.grad is not None for n, p in frozen.named_parameters() if "lora" in n)
    lora = OctSamModel.from_base(OctSamConfig(labels=list(TINY_LABELS), base_model=tiny_base))
    assert enable_embedding_cache(lora, augmented=False) is None
    assert enable_embedding_cache(frozen, augmented=True) is None


def test_embedding_cache_on_disk_is_shared_between_runs(tiny_base, tmp_path):
    from octsam.training.embedding_cache import enable_embedding_cache

    def frozen_model():
        config = OctSamConfig(
            labels=list(TINY_LABELS),
            base_model=tiny_base,
            lora_target_modules=["decoder_attention"],
            train_mask_decoder=False,
        )
        return OctSamModel.from_base(config)

    pixels = torch.rand(2, 3, 24, 24)
    first = frozen_model()
    cache = enable_embedding_cache(first, augmented=False, directory=tmp_path / "cache")
    expected = first.image_embeddings(pixels)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    second = frozen_model()
    cache = enable_embedding_cache(second, augmented=False, directory=tmp_path / "cache")
    assert torch.equal(second.image_embeddings(pixels), expected) and cache.misses == 0


def test_a_compiled_run_validates_the_same_module_uncompiled():
    """Validation of a compiled run uses the uncompiled module (eval mode would compile a second graph), with the
    same parameter tensors; an uncompiled run validates the training model itself."""
    from accelerate import Accelerator

    from octsam.training.loop import validation_model

    accelerator = Accelerator(cpu=True)
    module = torch.nn.Linear(4, 2)
    compiled = accelerator.prepare(torch.compile(module, backend="eager"))
    plain = accelerator.prepare(torch.nn.Linear(4, 2))
    eval_module = validation_model(accelerator, compiled, compiled=True)
    assert eval_module is module and not isinstance(eval_module, torch._dynamo.eval_frame.OptimizedModule)
    assert validation_model(accelerator, plain, compiled=False) is plain
    x = torch.randn(3, 4)
    torch.testing.assert_close(eval_module(x), compiled(x))


def test_flip_only_augmentation_keeps_the_embedding_cache(tmp_path, shape_dataset, tiny_base, monkeypatch):
    """Flips make at most two images of a B-scan, so a frozen encoder's embeddings stay cached (exactly: keyed by
    the pixels); a rotation or a brightness change turns the cache off."""
    from octsam.data.augment import AugmentConfig
    from octsam.training import embedding_cache

    assert AugmentConfig(rotate_p=0, brightness_contrast_p=0).finite
    assert not AugmentConfig().finite and not AugmentConfig(rotate_p=0).finite
    assert AugmentConfig(rotate_limit=0, brightness_limit=0, contrast_limit=0).finite
    caches = []
    original = embedding_cache.enable_embedding_cache

    def spy(*args, **kwargs):
        caches.append(original(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(embedding_cache, "enable_embedding_cache", spy)
    frozen = ("--lora-target-modules", "decoder_attention", "--train-mask-decoder", "false", "--num_train_epochs",
              "4", "--early_stopping_patience", "0", "--evaluate_test", "false", "--augment", "true", "--hflip-p",
              "0.5")  # fmt: skip
    train(*parse_config(run_args(shape_dataset, tiny_base, tmp_path / "flips", *frozen, "--rotate-p", "0",
                                 "--brightness-contrast-p", "0")))  # fmt: skip
    cache = caches[-1]
    scans = 8 + 4  # train + validation B-scans of the shape dataset
    assert cache is not None and cache.misses <= 8 * 2 + 4 and cache.hits >= 4 * scans - cache.misses
    train(*parse_config(run_args(shape_dataset, tiny_base, tmp_path / "rotations", *frozen)))
    assert caches[-1] is None
