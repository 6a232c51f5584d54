"""Every option is checked before any work starts (issue 22, item 4): a walk over the one constraint table
(``octsam.options``) - each option of train.py, from a YAML file and from the command line, and each setting of an
adapter's ``octsam_config.json`` - with bad values generated from the table: exit status 2, one message naming the key,
the value's source, and nothing written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from octsam.adapter import OctSamConfig
from octsam.cli.train import main as train_main
from octsam.config import ALL_ARGUMENTS, parse_config
from octsam.errors import OctSamError
from octsam.options import SCHEDULER_TYPES, bad_values

CASES = [
    pytest.param(f.name, value, id=f"{f.name}={value!r}")
    for dc in ALL_ARGUMENTS
    for f in dataclasses.fields(dc)
    for value in bad_values(f)
]


def test_the_table_covers_the_options_that_need_it():
    checked = {f.name for dc in ALL_ARGUMENTS for f in dataclasses.fields(dc) if "check" in f.metadata}
    for name in ("learning_rate", "weight_decay", "early_stopping_patience", "keep_checkpoints", "stop_after_epochs",
                 "max_train_samples", "warmup_ratio", "lr_scheduler_type", "mixed_precision", "unet_channels",
                 "input_mode", "tile_overlap", "tile_scale", "crop_sampling", "crops_per_scan", "foreground_ratio",
                 "lora_dropout", "mode"):  # fmt: skip
        assert name in checked
    assert len(CASES) > 150


@pytest.mark.parametrize("key, value", CASES)
def test_every_bad_option_in_yaml_exits_2_naming_it(key, value, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"dataset": "data/none", key: value}))  # JSON is YAML
    out = tmp_path / "run"
    args = ["--config", str(config)] + ([] if key == "output_dir" else ["--output", str(out)])
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and key in err and "Traceback" not in err, err
    assert str(config) in err or key in ("dataset",), err  # names the file the value came from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--learning-rate", "0"], "learning_rate"),
        (["--learning-rate", "nan"], "learning_rate"),
        (["--weight-decay", "-0.1"], "weight_decay"),
        (["--early-stopping-patience", "-1"], "early_stopping_patience"),
        (["--keep-checkpoints", "-1"], "keep_checkpoints"),
        (["--stop-after-epochs", "-2"], "stop_after_epochs"),
        (["--max-train-samples", "0"], "max_train_samples"),
        (["--dice-weight", "0", "--ce-weight", "0"], "ce_weight"),
        (["--warmup-ratio", "2"], "warmup_ratio"),
        (["--lr-scheduler-type", "cosinus"], "lr_scheduler_type"),
        (["--mixed-precision", "fp32"], "mixed_precision"),
        (["--tile-overlap", "1"], "tile_overlap"),
        (["--crops-per-scan", "0"], "crops_per_scan"),
    ],
)
def test_bad_options_on_the_command_line(argv, key, tmp_path, capsys):
    assert train_main(["--dataset", "data/none", "--output", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert key in err and "the command line" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_the_command_line_overrides_a_bad_file_value(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: d\nlearning_rate: -1\n")
    with pytest.raises(OctSamError, match=f"from {config}"):
        parse_config(["--config", str(config)])
    _, _, train_args = parse_config(["--config", str(config), "--learning-rate", "1e-3"])
    assert train_args.learning_rate == 1e-3


def test_yaml_numbers_written_as_text_still_parse(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: d\nlearning_rate: 1e-4\nunet_channels: [8, 16]\n")  # PyYAML: 1e-4 is a string
    _, _, train_args = parse_config(["--config", str(config)])
    assert train_args.learning_rate == 1e-4


def test_all_shipped_configs_parse():
    from conftest import REPO_ROOT

    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        parse_config(["--config", str(config), "--dataset", "d"])


def test_help_shows_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Allowed: a finite number > 0" in out and "Allowed: one of linear, cosine" in out


def test_scheduler_names_are_transformers():
    from transformers import SchedulerType

    assert set(SCHEDULER_TYPES) == {s.value for s in SchedulerType}


ADAPTER_CASES = [
    pytest.param(f.name, value, id=f"{f.name}={value!r}")
    for f in dataclasses.fields(OctSamConfig)
    if "check" in f.metadata
    for value in bad_values(f)
]


@pytest.mark.parametrize("key, value", ADAPTER_CASES)
def test_every_bad_adapter_setting_is_named_with_its_file(key, value, tmp_path):
    data = dataclasses.asdict(OctSamConfig(labels=["background", "fluid"]))
    data[key] = value
    path = tmp_path / "octsam_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OctSamError) as info:
        OctSamConfig.from_json_file(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_image_mean_of_the_wrong_length(tmp_path):
    data = dataclasses.asdict(OctSamConfig(labels=["background", "fluid"]))
    data["image_mean"] = [1.0, 2.0]
    path = tmp_path / "octsam_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OctSamError, match="image_mean = \\[1.0, 2.0\\].*1 or 3 values"):
        OctSamConfig.from_json_file(path)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--split-fractions", "nan,0.5,0.5"], "finite"),
        (["--split-fractions", "inf,0.5,0.5"], "finite"),
        (["--num-patients", "0"], "--num-patients"),
        (["--folds", "1"], "--folds"),
        (["--seed", "-1"], "--seed"),
        (["--lesion-scale", "0"], "--lesion-scale"),
    ],
)
def test_builder_options_are_checked(argv, needle, tmp_path, capsys):
    from dataset_builder.__main__ import main as build_main

    args = ["synthetic", "--disease", "amd", "--num-patients", "3", "--scans-per-patient", "1", "--size", "64x48",
            "--output", str(tmp_path / "d")]  # fmt: skip
    try:
        code = build_main(args + argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert code == 2 and needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_blank_label_names_are_refused(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dataset_builder.__main__ import main as build_main

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "i" / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "m" / "a.png")
    code = build_main(["folder", "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m"), "--labels",
                       "background, ,fluid", "--output", str(tmp_path / "d")])  # fmt: skip
    assert code == 2 and "blank" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_evaluate_dpi_0(tmp_path, capsys):
    from octsam.cli.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--dataset", "d", "--adapter", "a", "--output", str(tmp_path / "o"), "--dpi", "0"])
    assert exit_.value.code == 2 and "--dpi" in capsys.readouterr().err and not any(tmp_path.iterdir())
