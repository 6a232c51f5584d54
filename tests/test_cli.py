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


# ------------------------------------------------------------------------------------------------ one convention
#: ``python -m`` modules beside the console scripts (the scripts' modules are read from pyproject.toml).
PYTHON_M = ["octsam.cli.train", "octsam.cli.infer", "octsam.cli.evaluate", "octsam.cli.hub", "octsam.cli.demo"]
SUBCOMMANDS = {"dataset_builder.__main__": ["synthetic", "folder", "nnunet", "duke-mat", "retouch", "volume"],
               "octsam.cli.hub": ["push"]}  # fmt: skip


def _console_scripts() -> dict[str, str]:
    import tomllib

    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def _help(module: str, argv: list[str], capsys) -> str:
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code in (0, None), module
    return capsys.readouterr().out


def _options(text: str) -> list[str]:
    """The options a --help lists (each line that starts with an option, every spelling on it)."""
    import re

    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith(("  --", "  -h")) and not line.startswith("   "):  # argparse's option lines, not epilogs
            head = re.split(r"\s{2,}", stripped)[0]
            found += re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", head)
    return found


def test_every_command_follows_the_cli_convention(capsys):
    """The README's convention over every console script and python -m module: kebab-case options, each listed
    once; --output/--overwrite for the output folder (never --output-dir in --help); --device from one list;
    --no-flag for switches (never a true/false value except train's documented booleans)."""
    modules = sorted(set(_console_scripts().values()) | set(PYTHON_M))
    assert "octsam.cli.train" in modules and "dataset_builder.__main__" in modules
    for module in modules:
        texts = [_help(module, [], capsys)] + [_help(module, [sub], capsys) for sub in SUBCOMMANDS.get(module, [])]
        for text in texts:
            options = _options(text)
            assert options, module
            assert all("_" not in o for o in options), (module, [o for o in options if "_" in o])
            assert len(options) == len(set(options)), (module, sorted(o for o in options if options.count(o) > 1))
            assert "--output-dir" not in options and "--overwrite-output-dir" not in options, module
            if "--output" in options:
                assert "--overwrite" in options or "--push-to-hub" in options, module
            if "--device" in options:
                line = next(line for line in text.splitlines() if line.strip().startswith("--device"))
                assert "{auto,cuda,mps,cpu}" in line, (module, line)
            assert "--split" not in options or "--split-fractions" not in options, module


def test_train_keeps_the_old_output_spellings_as_hidden_aliases():
    for argv in (["--output", "a", "--overwrite"], ["--output-dir", "a", "--overwrite-output-dir", "true"],
                 ["--output_dir", "a", "--overwrite_output_dir"]):  # fmt: skip
        _, _, train = parse_config(["--dataset", "d", *argv])
        assert (train.output_dir, train.overwrite_output_dir) == ("a", True)
    _, _, train = parse_config(["--dataset", "d", "--output", "a", "--overwrite", "--no-overwrite"])
    assert train.overwrite_output_dir is False


def test_dataset_builder_keeps_split_as_a_hidden_alias():
    from dataset_builder.__main__ import build_parser as builder_parser

    parser = builder_parser()
    args = parser.parse_args(["synthetic", "--disease", "amd", "--num-patients", "2", "--scans-per-patient", "1",
                              "--split", "0.5,0.25,0.25"])  # fmt: skip
    assert args.split == "0.5,0.25,0.25"
    args = parser.parse_args(["synthetic", "--disease", "amd", "--num-patients", "2", "--scans-per-patient", "1"])
    assert args.split == "0.7,0.15,0.15"


def test_python_m_modules_define_main_before_running_it():
    """``if __name__ == "__main__"`` is the last statement of every command module, so ``python -m`` runs a module
    whose functions are all defined (octsam.cli.evaluate --volumes once ended in a NameError)."""
    import ast

    files = [
        REPO_ROOT / (m.replace(".", "/") + ".py") for m in sorted(set(_console_scripts().values()) | set(PYTHON_M))
    ]
    for path in files:
        body = ast.parse(path.read_text()).body
        last = body[-1]
        assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), path
        assert not any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in body[:-1]), path


def test_evaluate_volumes_runs_as_python_m(tmp_path):
    """The --volumes branch of ``python -m octsam.cli.evaluate`` is reached (a missing adapter: exit 2, a message,
    no NameError)."""
    out = subprocess.run(
        [sys.executable, "-m", "octsam.cli.evaluate", "--volumes", str(tmp_path / "eye.mat"), "--adapter",
         str(tmp_path / "no_adapter"), "--adapter", "b", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "NameError" not in out.stderr and "one adapter" in out.stderr
