"""One CLI convention, a quick and readable --help, offline failures that return at once with the fix."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from octsam.config import build_parser, parse_config
from octsam.errors import OctSamError


def test_train_help_is_kebab_case_with_examples_and_config_first():
    text = build_parser().format_help()
    assert "examples:" in text and "train.py --config configs/amd.yaml" in text
    options = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    assert options[0] == "--config"
    assert all("_" not in option for option in options), [o for o in options if "_" in o]
    assert "--no_" not in text and text.count("--output-dir") >= 1


def test_train_help_imports_no_torch():
    """--help builds the parser from the dataclasses alone (no torch, transformers or albumentations import)."""
    code = "import sys, octsam.cli.train as t; t.build_parser if hasattr(t, 'build_parser') else None; "
    code += "import octsam.config as c; c.build_parser().format_help(); "
    code += "print(sorted(m for m in ('torch', 'transformers', 'albumentations') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_snake_case_aliases_and_booleans(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: somewhere\nlearning_rate: 0.001\n")
    _, data, train = parse_config(["--config", str(config), "--output_dir", "a", "--evaluate-test", "false"])
    assert (data.dataset, train.learning_rate, train.output_dir, train.evaluate_test) == (
        "somewhere",
        1e-3,
        "a",
        False,
    )
    model, data, train = parse_config(["--dataset", "d", "--output-dir", "b", "--no-augment", "--no_fast_attention"])
    assert (train.output_dir, data.augment, model.fast_attention) == ("b", False, False)
    _, data, _ = parse_config(["--dataset", "d", "--hflip-p", "0", "--rotate-p", "0.25"])
    assert (data.hflip_p, data.rotate_p) == (0.0, 0.25)  # every augmentation setting reaches the config


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(OctSamError, match="must be a mapping"):
        parse_config(["--config", str(config)])


def test_a_local_base_is_recorded_absolute(tmp_path, monkeypatch, tiny_base):
    """An adapter trained on a relative base folder still loads when run from another folder."""
    import os

    from octsam.config import ModelArguments, adapter_config

    monkeypatch.chdir(os.path.dirname(tiny_base))
    config = adapter_config(ModelArguments(base_model=os.path.basename(tiny_base)), ["background", "fluid"])
    assert os.path.isabs(config.base_model) and os.path.samefile(config.base_model, tiny_base)
    assert (
        adapter_config(ModelArguments(base_model="org/not-a-folder"), ["background", "a"]).base_model
        == "org/not-a-folder"
    )


def test_unreachable_hub_fails_at_once_with_the_offline_fix(monkeypatch):
    """No network and HF_HUB_OFFLINE unset: octsam sees the host does not resolve and goes straight to the cache."""
    import socket

    from huggingface_hub import constants

    from octsam.adapter import hub_unreachable, resolve_adapter
    from octsam.models.sam import load_base_sam

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub_unreachable()
    calls = []
    import transformers

    real = transformers.SamModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.SamModel, "from_pretrained", spy)
    with pytest.raises(OctSamError, match="HF_HUB_OFFLINE=1") as err:
        load_base_sam("someone/unknown-sam")
    assert calls == [True] and ".." not in str(err.value)
    with pytest.raises(OctSamError, match="HF_HUB_OFFLINE=1"):
        resolve_adapter("someone/unknown-adapter")


def test_workers_are_capped_at_the_cpus(monkeypatch):
    from octsam.training import loop

    monkeypatch.setattr(loop, "available_cpus", lambda: 2)
    assert loop.loader_workers(8) == 2 and loop.loader_workers(1) == 1 and loop.loader_workers(0) == 0


def test_classes_absent_from_training_are_named(shape_dataset):
    from octsam.data.dataset import absent_classes, class_pixel_counts, load_oct_dataset

    dataset, labels = load_oct_dataset(shape_dataset)
    counts = class_pixel_counts(dataset["train"], len(labels))
    assert counts.sum() > 0 and np.all(counts[1:] > 0)
    assert absent_classes(dataset["train"], labels) == []
    assert absent_classes(dataset["train"], [*labels, "srf"]) == ["srf"]
