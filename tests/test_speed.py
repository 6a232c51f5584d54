"""The default speed plan (octsam.speed.plan_speed) and its flags in both command lines; CPU only, no compilation."""

from __future__ import annotations

import pytest

from octsam.cli.infer import build_parser
from octsam.config import parse_config
from octsam.speed import COMPILE_MIN_SCANS, plan_speed


def test_cuda_defaults_are_the_fastest_exact_path():
    train = plan_speed("cuda", "train")
    assert (train.attention, train.compile) == ("auto", True)
    many = plan_speed("cuda", "infer", num_scans=COMPILE_MIN_SCANS + 1)
    few = plan_speed("cuda", "infer", num_scans=COMPILE_MIN_SCANS)
    assert (many.attention, many.compile) == ("auto", True)
    assert (few.attention, few.compile) == ("auto", False)
    assert plan_speed("cuda", "infer", num_scans=None).compile is False


@pytest.mark.parametrize("device", ["cpu", "mps"])
@pytest.mark.parametrize("task", ["train", "infer"])
def test_other_devices_keep_their_defaults(device, task):
    plan = plan_speed(device, task, num_scans=10_000)
    assert (plan.attention, plan.compile) == ("auto", False)


def test_flags_win_over_the_defaults():
    assert plan_speed("cuda", "train", compile=False).compile is False
    assert plan_speed("cuda", "infer", num_scans=10_000, compile=False).compile is False
    assert plan_speed("cpu", "infer", num_scans=1, compile=True).compile is True  # --compile on the CPU still works
    assert plan_speed("cuda", "train", fast_attention=False).attention is None
    assert plan_speed("cuda", "infer", attention_mode="fold").attention == "fold"
    unet = plan_speed("cuda", "train", architecture="unet")
    assert (unet.attention, unet.compile) == (None, False)
    with pytest.raises(ValueError):
        plan_speed("cuda", "evaluate")


def test_train_compile_flag(tmp_path):
    """train.py: compile on by default (it applies on CUDA only), ``--no_compile`` turns it off."""
    base = ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    assert parse_config(base)[2].compile is True
    assert parse_config([*base, "--no_compile"])[2].compile is False


def test_infer_compile_flags():
    """inference.py: --compile forces, --no-compile refuses, neither leaves it to the plan (None)."""
    parser = build_parser()
    common = ["--adapter", "a", "--output", "o"]
    assert parser.parse_args(common).compile is None
    assert parser.parse_args([*common, "--compile"]).compile is True
    assert parser.parse_args([*common, "--no-compile"]).compile is False
