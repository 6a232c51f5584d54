"""Fault injection and bad inputs: nothing octsam reads runs code, no fault loses data, every bad input ends in a
message (issue 11). Processes are killed with SIGKILL/SIGTERM at aimed points (a hook that waits there), runs race
for one folder, checkpoint files carry pickle payloads, names are not UTF-8, headers claim huge images, configs and
weights are malformed, and a small tmpfs fills up (where a mount namespace can be made; skipped elsewhere)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_LABELS, write_shape_dataset
from PIL import Image
from safetensors.torch import load_file

from octsam.cli.infer import main as infer_main
from octsam.cli.train import main as train_main
from octsam.errors import OctSamError
from octsam.folders import FolderLock, atomic_folder, remove_stale_staging, staging_path, swap_into_place

ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: Runs a command line with one function replaced by a hook that prints a marker and waits to be killed there
#: (argv: module, function, marker, which call (1-based), then "train"/"build"/"infer" and the CLI's arguments).
HOOK = textwrap.dedent(
    """
    import importlib, sys, time
    module, name, marker, nth, entry, *args = sys.argv[1:]
    target = importlib.import_module(module)
    original = getattr(target, name)
    calls = [0]
    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == int(nth):
            print(marker, flush=True)
            time.sleep(120)
        return original(*a, **k)
    setattr(target, name, hooked)
    if entry == "train":
        from octsam.cli.train import main
    elif entry == "build":
        from dataset_builder.__main__ import main
    elif entry == "evaluate":
        from octsam.cli.evaluate import main
    else:
        from octsam.cli.infer import main
    sys.exit(main(args))
    """
)


def run_args(dataset: str, base: str, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", dataset, "--base_model", base, "--output_dir", str(out), "--num_workers", "0",
        "--report_to", "none", "--effective_batch_size", "2", "--per_device_train_batch_size", "2",
        "--lora_dropout", "0", "--evaluate_test", "false", "--early_stopping_patience", "0",
        "--learning_rate", "5e-3", *extra,
    ]  # fmt: skip


def hooked_process(tmp_path: Path, module: str, function: str, nth: int, entry: str, args: list[str]):
    """Start a CLI in a subprocess, wait (at most 90 s) until it reaches the hooked call; return the process."""
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    proc = subprocess.Popen(
        [sys.executable, str(script), module, function, "REACHED", str(nth), entry, *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if "REACHED" in line:
                return proc
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"the hooked call was not reached: {proc.stderr.read()[-3000:]}")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    return str(write_shape_dataset(tmp_path_factory.mktemp("robust") / "d", (4, 2, 2), seed=5))


@pytest.fixture(scope="module")
def finished_run(small_dataset, tiny_base, tmp_path_factory) -> Path:
    """A complete 2-epoch run (checkpoints epoch-0001, epoch-0002, best_adapter, card)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_main(run_args(small_dataset, tiny_base, out, "--num_train_epochs", "2")) == 0
    return out


# ------------------------------------------------------------------------------------------------ 1. no code runs
def test_no_torch_load_without_weights_only():
    """No torch.load anywhere in the repository (library, CLIs, benchmarks, tests) without weights_only=True."""
    offenders = []
    for path in REPO_ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("build", "dist") for part in path.relative_to(REPO_ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "load":
                owner = getattr(getattr(node.func, "value", None), "id", "")
                if owner != "torch":
                    continue
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


class Payload:
    """Unpickling this creates ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


CHECKPOINT_FILES = [
    "trainable.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "trainer_state.json",
    "octsam_config.json",
    "rng_state_0.safetensors",
    "legacy .pt files",
]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_pickle_payload_in_a_checkpoint_never_runs(name, finished_run, small_dataset, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "epoch-0002"
    marker = tmp_path / "PWNED"
    if name == "legacy .pt files":  # a checkpoint in the old pickle format, every file a payload
        (ckpt / "optimizer.safetensors").unlink()
        for legacy in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
            torch.save({"state": Payload(marker)}, ckpt / legacy)
    else:
        (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
    args = run_args(small_dataset, tiny_base, out, "--num_train_epochs", "3", "--resume_from_checkpoint", str(ckpt))
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err and "error:" in err
    expected = "pickle" if name.startswith("legacy") else name
    assert expected in err, err


# ------------------------------------------------------------------------------------------------ 2-4. run folders
@pytest.mark.slow
def test_kill_9_during_checkpoint_write_then_resume_is_bit_identical(small_dataset, tiny_base, tmp_path):
    reference = tmp_path / "reference"
    assert train_main(run_args(small_dataset, tiny_base, reference, "--num_train_epochs", "3")) == 0
    out = tmp_path / "killed"
    args = run_args(small_dataset, tiny_base, out, "--num_train_epochs", "3")
    proc = hooked_process(tmp_path, "octsam.training.checkpoint", "save_optimizer", 2, "train", args)
    kill(proc)
    ckpts = out / "checkpoints"
    assert (ckpts / "epoch-0002.tmp").is_dir() and not (ckpts / "epoch-0002").exists()  # killed half-way
    assert (ckpts / "epoch-0001" / "trainer_state.json").is_file()
    # the dead run's lock file is still there; the kernel freed its flock, so the next run takes it over
    assert (out.parent / ".killed.octsam.lock").is_file()
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert not (ckpts / "epoch-0002.tmp").exists() and not (out.parent / ".killed.octsam.lock").exists()
    for epoch in ("epoch-0002", "epoch-0003"):
        assert tensors_equal(
            ckpts / epoch / "trainable.safetensors", reference / "checkpoints" / epoch / "trainable.safetensors"
        )


def test_sigterm_during_training_keeps_the_last_checkpoint(small_dataset, tiny_base, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) half-way through writing epoch 2's checkpoint, delivered to this process."""
    from octsam.training import checkpoint

    original, calls = checkpoint.save_optimizer, []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_optimizer", terminated)
    out = tmp_path / "run"
    assert train_main(run_args(small_dataset, tiny_base, out, "--num_train_epochs", "3")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]  # the half-written one is gone
    assert not (out.parent / ".run.octsam.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only installed while training


def test_overwrite_starts_empty_and_latest_is_this_runs(finished_run, small_dataset, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # an old run that reached epoch 2
    (out / "old-notes.txt").write_text("old run")
    short = ("--num_train_epochs", "2", "--seed", "7")
    assert (
        train_main(
            run_args(small_dataset, tiny_base, out, *short, "--overwrite_output_dir", "--stop_after_epochs", "1")
        )
        == 0
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    assert not (out / "old-notes.txt").exists() and not list(out.parent.glob(".run.*old*"))
    assert train_main(run_args(small_dataset, tiny_base, out, *short, "--resume_from_checkpoint", "latest")) == 0
    state = json.loads((out / "checkpoints/epoch-0002/trainer_state.json").read_text())
    assert len(state["history"]) == 2 and json.loads((out / "all_results.json").read_text())["epochs_trained"] == 2
    # resuming "latest" while discarding the folder it is in cannot both happen
    capsys.readouterr()
    assert (
        train_main(
            run_args(small_dataset, tiny_base, out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")
        )
        == 2
    )
    assert "pass only one" in capsys.readouterr().err
    assert (out / "checkpoints/epoch-0002").is_dir()


def test_resume_into_a_new_folder(finished_run, small_dataset, tiny_base, tmp_path, capsys):
    new = tmp_path / "new"
    ckpt = finished_run / "checkpoints" / "epoch-0002"
    args = run_args(small_dataset, tiny_base, new, "--num_train_epochs", "3", "--resume_from_checkpoint", str(ckpt))
    assert train_main(args) == 0
    assert (new / "best_adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((new / "all_results.json").read_text())["epochs_trained"] == 3
    # without the best epoch's checkpoint next to it, it is refused before any training
    lonely = tmp_path / "copy" / "checkpoints" / "epoch-0002"
    shutil.copytree(ckpt, lonely)
    state = json.loads((lonely / "trainer_state.json").read_text())
    state["best_epoch"] = 1
    (lonely / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    other = tmp_path / "other"
    assert (
        train_main(
            run_args(
                small_dataset, tiny_base, other, "--num_train_epochs", "3", "--resume_from_checkpoint", str(lonely)
            )
        )
        == 2
    )
    assert "epoch-0001 is missing" in capsys.readouterr().err and not (other / "checkpoints").exists()


def test_a_second_run_into_a_locked_folder_is_refused(small_dataset, tiny_base, tmp_path, capsys):
    """Another process holds each folder: training, a dataset build and inference are refused, naming it."""
    from dataset_builder.__main__ import main as build_main

    folders = {k: tmp_path / k for k in ("run", "data", "pred")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from octsam.folders import FolderLock\n"
         "locks = [FolderLock(p, 'training').acquire() for p in sys.argv[1:]]\nprint('held', flush=True)\n"
         "time.sleep(120)", *map(str, folders.values())],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert train_main(run_args(small_dataset, tiny_base, folders["run"])) == 2
        assert build_main(["synthetic", "--disease", "amd", "--num-patients", "3", "--scans-per-patient", "1",
                           "--size", "64x64", "--output", str(folders["data"])]) == 2  # fmt: skip
        assert infer_main(["--adapter", "x", "--input", "y", "--output", str(folders["pred"])]) == 2
        err = capsys.readouterr().err
        assert err.count(f"pid {holder.pid}") == 3 and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    assert not any(f.exists() for f in folders.values())


def test_concurrent_dataset_builds_one_wins(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "dataset_builder", "synthetic", "--disease", "amd", "--num-patients", "3",
           "--scans-per-patient", "2", "--size", "96x64", "--output", str(out)]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    # one build writes; each other one is refused while it holds the lock (2), or, started after it finished, finds
    # the output built by this same command and keeps it (0)
    assert sum("wrote" in stdout for stdout, _, _ in results) == 1, results
    for stdout, stderr, code in results:
        assert "Traceback" not in stderr
        assert code == 2 or "wrote" in stdout or "already built by this same command" in stdout, results
    assert (out / "dataset_dict.json").is_file() and not list(tmp_path.glob(".data.*"))


# ------------------------------------------------------------------------------------------------ 8-9. builds
def build_args(out: Path, *extra: str) -> list[str]:
    return ["synthetic", "--disease", "amd", "--num-patients", "3", "--scans-per-patient", "2", "--size", "96x64",
            "--output", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_dataset_build_loses_nothing_and_leaves_no_litter(sig, tmp_path):
    from dataset_builder.__main__ import main as build_main

    out = tmp_path / "data"
    assert build_main(build_args(out, "--seed", "1")) == 0
    before = sorted(p.name for p in out.rglob("*"))
    proc = hooked_process(tmp_path, "dataset_builder.writer", "check_pair", 3, "build", build_args(out, "--overwrite"))
    code, err = kill(proc, sig)
    assert sorted(p.name for p in out.rglob("*")) == before  # the old dataset is untouched
    partial = list(tmp_path.glob(".data.partial-*"))
    if sig == signal.SIGTERM:
        assert code == 130 and "interrupted" in err and "Traceback" not in err and not partial
    else:
        assert partial  # litter of the killed process, removed by the next build
    assert build_main(build_args(out, "--overwrite")) == 0
    assert not list(tmp_path.glob(".data.*")) and (out / "dataset_dict.json").is_file()


def test_ctrl_c_in_dataset_builder(tmp_path, monkeypatch, capsys):
    from dataset_builder import writer
    from dataset_builder.__main__ import main as build_main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "check_pair", interrupt)
    assert build_main(build_args(tmp_path / "data")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims a huge image (a 'decompression bomb')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def folder_source(root: Path, n: int = 4) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 48), 60 + i, np.uint8)).save(images / f"p{i}_scan.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[5:15, 5:15] = 1
        Image.fromarray(mask).save(masks / f"p{i}_scan.png")
    return images, masks


@pytest.mark.parametrize("case", ["bomb", "too-large", "non-utf8", "wide", "tall"])
def test_builder_refuses_bad_files_by_name(case, tmp_path, capsys):
    from dataset_builder.__main__ import main as build_main

    images, masks = folder_source(tmp_path / "src")
    if case == "bomb":
        bomb_png(images / "p9_scan.png")
        shutil.copy(masks / "p0_scan.png", masks / "p9_scan.png")
    elif case == "too-large":
        bomb_png(images / "p9_scan.png", 10_000, 10_000)
        shutil.copy(masks / "p0_scan.png", masks / "p9_scan.png")
    elif case in ("wide", "tall"):  # 100000 x 10 / 10 x 100000: no B-scan (MAX_SCAN_ASPECT)
        shape = (10, 100_000) if case == "wide" else (100_000, 10)
        Image.fromarray(np.zeros(shape, np.uint8)).save(images / "p9_scan.png")
        Image.fromarray(np.zeros(shape, np.uint8)).save(masks / "p9_scan.png")
    else:
        name = os.fsdecode(b"p9_\xff\xfe.png")
        shutil.copy(images / "p0_scan.png", images / name)
        shutil.copy(masks / "p0_scan.png", masks / name)
    out = tmp_path / "data"
    code = build_main(["folder", "--images", str(images), "--masks", str(masks), "--labels", "background,fluid",
                       "--patient-regex", r"^(p\d+)_", "--output", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert "p9_" in err
    if case in ("wide", "tall"):
        assert "MAX_SCAN_ASPECT" in err and "100000" in err, err
    else:
        assert ("megapixels" in err) if case != "non-utf8" else ("not valid UTF-8" in err and "\\xff" in err)
    assert not list(tmp_path.glob(".data.*"))


# ------------------------------------------------------------------------------------------------ 5-7. inference
@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    from test_inference import make_adapter

    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "auto")


def test_inference_skips_bad_files_and_keeps_the_rest(adapter, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(src / "good.png")
    shutil.copy(src / "good.png", src / os.fsdecode(b"bad_\xff.png"))
    bomb_png(src / "bomb.png")
    bomb_png(src / "huge.png", 10_000, 10_000)
    out = tmp_path / "out"
    assert infer_main(["--adapter", str(adapter), "--input", str(src), "--output", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad_\\xff" in err and err.count("megapixels per B-scan") == 2
    rows = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert sum(",ok," in r for r in rows) == 1 and sum(",failed," in r for r in rows) == 3
    assert (out / "masks" / "good.png").is_file()


def test_inference_dotdot_glob_stays_inside_output(adapter, tmp_path, capsys):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    for folder in (tmp_path / "x", tmp_path / "a" / "sub"):
        Image.fromarray(np.full((40, 48), 90, np.uint8)).save(folder / "scan.png")
    out = tmp_path / "a" / "out"
    pattern = str(tmp_path / "a" / "*" / ".." / ".." / "x" / "*.png")
    assert infer_main(["--adapter", str(adapter), "--input", pattern, str(tmp_path / "a" / "sub" / "scan.png"),
                       "--output", str(out), "--quiet"]) == 0  # fmt: skip
    written = [p.resolve() for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.parents for p in written)
    masks = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png"))
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert len(masks) == 2 and len(set(masks)) == 2 and masks == overlays
    assert not (tmp_path / "x" / "scan.png.png").exists() and len(list((tmp_path / "x").iterdir())) == 1


def test_safe_output_names():
    from octsam.infer.inputs import safe_output_name

    assert safe_output_name("../../x/scan", "f") == "x/scan"
    assert safe_output_name("/abs/./scan", "f") == "abs/scan"
    assert safe_output_name("..", "f") == "f"
    assert safe_output_name(".hidden/a", "f") == "hidden/a"
    assert safe_output_name(os.fsdecode(b"bad_\xff"), "f") == "bad__xff"


@pytest.mark.parametrize(
    "change",
    [
        {"labels": 3},
        {"labels": None},
        {"labels": "missing"},
        {"format_version": "abc"},
        {"image_std": [0, 0, 0]},
        {"mode": "prompted"},
        "json-list",
        "truncated-weights",
        "missing-weights",
    ],
    ids=lambda c: c if isinstance(c, str) else "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_malformed_adapters_give_one_message(change, adapter, tmp_path, capsys):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "octsam_config.json").read_text())
    weights = broken / "adapter_model.safetensors"
    if change == "json-list":
        (broken / "octsam_config.json").write_text("[1, 2]")
    elif change == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif change == "missing-weights":
        weights.unlink()
    else:
        if change.get("labels") == "missing":
            del config["labels"]
        else:
            config.update(change)
        (broken / "octsam_config.json").write_text(json.dumps(config))
    src = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(src)
    code = infer_main(["--adapter", str(broken), "--input", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(broken) in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 10-11
def test_silent_acceptances_are_said(small_dataset, tiny_base, finished_run, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="octsam")
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert train_main(run_args(small_dataset, tiny_base, out, "--num_train_epochs", "3", "--learning_rate", "1e-1",
                               "--resume_from_checkpoint", "latest")) == 0  # fmt: skip
    assert "--learning-rate 0.1 is ignored" in caplog.text
    assert train_main(run_args(small_dataset, tiny_base, tmp_path / "big", "--effective_batch_size", "8")) == 2
    assert "larger than the training split (4 scans)" in capsys.readouterr().err
    import datasets

    dsd = datasets.load_from_disk(str(write_shape_dataset(tmp_path / "shapes", (4, 2, 2), seed=2)))
    blank = dsd.map(lambda row: {"mask": Image.fromarray(np.zeros_like(np.asarray(row["mask"])))})
    empty = tmp_path / "bg"
    blank.save_to_disk(str(empty))
    (empty / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(TINY_LABELS)}))
    caplog.clear()
    assert train_main(run_args(str(empty), tiny_base, tmp_path / "bgrun", "--num_train_epochs", "1")) == 0
    assert "no foreground pixel" in caplog.text and "validation Dice stayed 0" in caplog.text


def test_cards_hold_no_local_paths(finished_run):
    card = (finished_run / "best_adapter" / "README.md").read_text()
    assert str(finished_run.parent) not in card and "/tmp" not in card


# ------------------------------------------------------------------------------------------------ folders
def test_folder_lock_stale_and_live(tmp_path):
    folder = tmp_path / "out"
    lock = FolderLock(folder, "test")
    lock.path.write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "what": "crashed run"}))
    with lock:  # nobody holds its flock: stale, taken over
        assert lock.took_over["what"] == "crashed run"
        with pytest.raises(OctSamError, match="in use by another octsam test"):
            FolderLock(folder, "other").acquire()
    assert not lock.path.exists()
    FolderLock(folder).acquire().release()


def test_swap_killed_between_renames_is_restored(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "data.txt").write_text("precious")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{dead.stdout.strip()}-deadbeef"
    os.replace(final, aside)  # what a swap killed after its first rename leaves
    remove_stale_staging(tmp_path, "out")
    assert (final / "data.txt").read_text() == "precious"
    live = staging_path(final)  # ours, alive: never removed
    live.mkdir()
    remove_stale_staging(tmp_path, "out")
    assert live.is_dir()
    with atomic_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    swap_into_place(live, final)
    assert not live.exists()


# ------------------------------------------------------------------------------------------------ disk full
def _tmpfs_available() -> str | None:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return "no unshare(1): cannot mount a small tmpfs"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


FILL = textwrap.dedent(
    """
    import sys, os
    from octsam.training import checkpoint
    original = checkpoint.save_checkpoint
    def fill_after_first(*a, **k):
        path = original(*a, **k)
        if path.name == "epoch-0001":  # now fill the disk: epoch 2's checkpoint cannot be written
            with open(os.path.join(sys.argv[1], "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        return path
    checkpoint.save_checkpoint = fill_after_first
    import octsam.training.loop as loop
    loop.save_checkpoint = fill_after_first
    from octsam.cli.train import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_disk_full_during_training_build_and_inference(small_dataset, tiny_base, adapter, tmp_path):
    reason = _tmpfs_available()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "fill.py").write_text(FILL)
    train = " ".join(map(str, run_args(small_dataset, tiny_base, mnt / "run", "--num_train_epochs", "2")))
    build = " ".join(build_args(mnt / "data"))
    scan = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(scan)
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {mnt} && "
        f"{sys.executable} {tmp_path / 'fill.py'} {mnt} {train}; echo TRAIN=$?; "
        f"cp -r {mnt}/run {tmp_path}/saved; "
        f"{sys.executable} -m dataset_builder {build}; echo BUILD=$?; "
        f"{sys.executable} {REPO_ROOT / 'inference.py'} --adapter {adapter} --input {scan} --output {mnt}/pred "
        f"--quiet; echo INFER=$?; ls -a {mnt}"
    )
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "TRAIN=2" in out and "BUILD=2" in out and "INFER=2" in out, out[-3000:]
    assert "Traceback" not in out and out.count("disk is full") == 3, out[-3000:]
    assert ".data" not in proc.stdout and "pred" not in proc.stdout  # nothing half-written, no litter
    saved = tmp_path / "saved"
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["epoch-0001"]
    args = run_args(small_dataset, tiny_base, saved, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest")
    assert train_main(args) == 0  # the checkpoint before the full disk resumes


# ------------------------------------------------------------------------------------------------ 8. security (issue 22)
def _robustness_module():
    """benchmarks/robustness.py as a module (its probes and its /proc helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("octsam_robustness", REPO_ROOT / "benchmarks" / "robustness.py")
    robustness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robustness)
    return robustness


def _robustness_world(adapter, tiny_base, tmp_path):
    """benchmarks/robustness.py and its World on this module's fixtures instead of the benchmark's trained world."""
    robustness = _robustness_module()
    world = robustness.World.__new__(robustness.World)
    world.root, world.base, world.adapter, world.n = tmp_path, tiny_base, adapter, 0
    world.scans = tmp_path / "scans"
    world.scans.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64), dtype=np.uint8)).save(
            world.scans / f"scan{i}.png"
        )
    return robustness, world


def test_security_probes_hold(adapter, tiny_base, tmp_path):
    """The security group of benchmarks/robustness.py on this module's tiny adapter: paths inside files and symbolic
    links that lead out of their folder, the app's .mhd upload, hub push allow-list / dry run / failed push, label
    names in cards and CSV cells, pickled weights, hostile NIfTI/DICOM/VOL headers."""
    robustness, world = _robustness_world(adapter, tiny_base, tmp_path)
    results = [(name, *probe()) for name, probe in robustness.security(world)]
    failed = [f"{name}: {why}" for name, held, why in results if not held]
    assert len(results) >= 19 and not failed, "\n".join(failed)


def test_issue_22_bad_input_probes_are_clean(adapter, tiny_base, tmp_path):
    """The issue-22 bad-input probes of benchmarks/robustness.py: an --output that is or holds the --input is refused
    naming both; a 100000 x 10 / 10 x 100000 B-scan is refused by name, leaving no output folder (inference) or no
    dataset (builder); the app's page turns bad uploads and clicks outside the B-scan into messages."""
    robustness, world = _robustness_world(adapter, tiny_base, tmp_path)
    wanted = ("--output is --input", "--output holds --input", "100000", "app: bad uploads")
    probes = [(name, probe) for name, probe in robustness.bad_inputs(world) if any(w in name for w in wanted)]
    results = [(name, *probe()) for name, probe in probes]
    failed = [f"{name}: {why}" for name, ok, why in results if not ok]
    assert len(results) == 9 and not failed, "\n".join(failed)


# ------------------------------------------------------------------------------------------------ 9. restartable (issue 22, item 5)
def _dead_pid() -> str:
    return subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_swap_cut_between_renames_is_never_replaced_by_the_next_run(tmp_path, capsys):
    """The old output a cut swap left aside is put back *before* the next run looks at its output: without
    --overwrite that run is refused (it used to pass the check, restore the old copy and then swap over it)."""
    from dataset_builder.__main__ import main as build_main

    final = tmp_path / "out"
    final.mkdir()
    (final / "data.txt").write_text("precious")
    os.replace(final, tmp_path / f".out.old-{_dead_pid()}-deadbeef")
    with pytest.raises(OctSamError, match="not empty"):
        with atomic_folder(final, overwrite=False) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _tree(final) == {"data.txt": b"precious"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    data = tmp_path / "data"
    assert build_main(build_args(data, "--seed", "1")) == 0
    before = _tree(data)
    os.replace(data, tmp_path / f".data.old-{_dead_pid()}-deadbeef")
    capsys.readouterr()
    assert build_main(build_args(data, "--seed", "2")) == 2  # another command: refused, the old dataset is back
    assert "already exists" in capsys.readouterr().err
    assert _tree(data) == before and not list(tmp_path.glob(".data.*"))


def test_overwritten_run_is_never_put_back(tmp_path, monkeypatch):
    """--overwrite moves the old run aside as .NAME.del-*: a kill before the new folder exists must not let the next
    run (--resume-from-checkpoint latest) find and resume the old run's checkpoints."""
    from octsam import folders

    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", killed)
    with pytest.raises(KeyboardInterrupt):
        folders.move_aside_and_empty(run)
    monkeypatch.undo()
    (aside,) = tmp_path.iterdir()
    os.replace(aside, aside.with_name(aside.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")))  # its run died
    folders.remove_stale_staging(tmp_path, "run")
    assert list(tmp_path.iterdir()) == []


def test_killed_kfold_build_goes_on_when_run_again(tmp_path, capsys):
    """kill -9 inside fold 1 of a 3-fold build: the same command (no --overwrite) keeps the finished fold 0, rebuilds
    fold 1 over its .fold-1.partial-* and stale lock, and writes folds.json."""
    from dataset_builder.__main__ import main as build_main

    root = tmp_path / "cv"
    args = build_args(root, "--folds", "3", "--scans-per-patient", "1")
    proc = hooked_process(tmp_path, "dataset_builder.writer", "check_pair", 5, "build", args)  # 3 scans per fold
    kill(proc)
    assert (root / "fold-0" / "dataset_dict.json").is_file() and not (root / "folds.json").exists()
    assert list(root.glob(".fold-1.*"))  # the killed fold's workspace and lock
    fold0 = _tree(root / "fold-0")
    assert build_main(args) == 0
    out = capsys.readouterr().out
    assert "already built by this same command" in out and "wrote 3 folds" in out
    assert _tree(root / "fold-0") == fold0
    assert (root / "folds.json").is_file() and sorted(p.name for p in root.iterdir()) == [
        "fold-0", "fold-1", "fold-2", "folds.json"
    ]  # fmt: skip
    assert build_main(args) == 0  # complete: the same command again changes nothing
    assert build_main(build_args(root, "--folds", "3", "--seed", "4")) == 2  # another command: refused
    assert "already exists" in capsys.readouterr().err


def test_finished_build_run_again_is_kept(tmp_path, capsys):
    from dataset_builder.__main__ import main as build_main

    out = tmp_path / "data"
    assert build_main(build_args(out)) == 0
    before = _tree(out)
    assert build_main(build_args(out)) == 0  # e.g. killed after its swap, before it could say so
    assert "already built by this same command" in capsys.readouterr().out and _tree(out) == before


def test_read_only_output_folder_is_a_message(small_dataset, tiny_base, adapter, tmp_path):
    reason = _tmpfs_available()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    scan = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(scan)
    train = " ".join(map(str, run_args(small_dataset, tiny_base, mnt / "run", "--num_train_epochs", "1")))
    script = (
        f"mount -t tmpfs -o size=1m,ro tmpfs {mnt} && "
        f"{sys.executable} -m dataset_builder {' '.join(build_args(mnt / 'data'))}; echo BUILD=$?; "
        f"{sys.executable} {REPO_ROOT / 'train.py'} {train}; echo TRAIN=$?; "
        f"{sys.executable} {REPO_ROOT / 'inference.py'} --adapter {adapter} --input {scan} --output {mnt}/pred "
        f"--quiet; echo INFER=$?"
    )
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "BUILD=2" in out and "TRAIN=2" in out and "INFER=2" in out, out[-3000:]
    assert "Traceback" not in out and out.count("read-only") == 3, out[-3000:]


def test_sigterm_during_evaluation_leaves_no_lock_or_staging(small_dataset, adapter, tmp_path):
    out = tmp_path / "o"
    args = ["--adapter", str(adapter), "--dataset", small_dataset, "--output", str(out), "--n-bootstrap", "10",
            "--device", "cpu"]  # fmt: skip
    proc = hooked_process(tmp_path, "octsam.evaluation.compare", "_evaluate_and_write", 1, "evaluate", args)
    code, err = kill(proc, signal.SIGTERM)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook.py"]


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_while_a_write_hangs_stops_promptly(writer, adapter, tmp_path, capsys):
    """SIGTERM to inference.py --overwrite while a writer hangs in the 2nd B-scan's write (120 s): the run stops
    within seconds (it waited for the hung writer, then was killed after 60 s) with status 130 and no traceback,
    the old output is untouched, no lock is left and no writer outlives it (a surviving writer process would hold
    the pipes that ``communicate`` reads to the end); the same command with --resume then completes the run."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48), 60 + 20 * i, np.uint8)).save(scans / f"scan{i}.png")
    out = tmp_path / "pred"
    argv = ["--adapter", str(adapter), "--input", str(scans), "--output", str(out), "--quiet", "--writer", writer,
            "--write-workers", "1", "--batch-size", "1"]  # fmt: skip
    assert infer_main(argv) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = hooked_process(tmp_path, "octsam.infer.run", "write_scan", 2, "infer", [*argv, "--overwrite"])
    started = time.monotonic()
    code, err = kill(proc, signal.SIGTERM)
    seconds = time.monotonic() - started
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert seconds < 15, f"stopping took {seconds:.1f} s"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if "lock" in p.name or ".tmp-" in p.name]
    assert infer_main([*argv, "--resume"]) == 0, capsys.readouterr().err[-3000:]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"scan{i}.png" for i in range(3)]
    assert not list(tmp_path.glob(".pred*"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the writer processes in /proc")
def test_kill_9_while_a_writer_process_hangs_leaves_no_writer(adapter, tmp_path):
    """kill -9 to inference.py --writer process while its writer hangs in the 2nd B-scan's write (120 s): every
    writer process ends within seconds. A forked writer holds its own copy of the write end of the pipe it reads its
    work from, so it never sees end-of-file and, before the fix, stayed alive (adopted by init) for the whole 120 s,
    holding the pipes of whoever started the run."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48), 60 + 20 * i, np.uint8)).save(scans / f"scan{i}.png")
    argv = ["--adapter", str(adapter), "--input", str(scans), "--output", str(tmp_path / "pred"), "--quiet",
            "--writer", "process", "--write-workers", "2", "--batch-size", "1"]  # fmt: skip
    procfs = _robustness_module()  # descendants() and running(): the benchmark's /proc helpers
    proc = hooked_process(tmp_path, "octsam.infer.run", "write_scan", 2, "infer", argv)
    writers: set[int] = set()
    try:
        writers = procfs.descendants(proc.pid)
        assert len(writers) >= 2, writers
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(procfs.running, writers)):
            time.sleep(0.1)
        assert not [pid for pid in writers if procfs.running(pid)], "writer processes outlived kill -9 of inference.py"
    finally:
        proc.kill()
        for pid in writers:
            if procfs.running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()  # not read to the end: a writer left alive would hold them open
        proc.stderr.close()
        proc.wait(10)


# ------------------------------------------------------------------------------------------------ 10. messages that name the real problem
@pytest.mark.parametrize("damage", ["peft-config-not-json", "peft-config-not-lora", "tensor-header-shape"])
def test_damaged_adapter_files_are_named_not_blamed_on_the_base(damage, adapter, tmp_path, capsys):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    peft_config = broken / "adapter_config.json"
    if damage == "peft-config-not-json":
        peft_config.write_text('{"peft_type": "LORA", "r": ')
    elif damage == "peft-config-not-lora":
        peft_config.write_text(json.dumps({**json.loads(peft_config.read_text()), "peft_type": "PROMPT_TUNING"}))
    else:  # one tensor's shape in the header no longer fits its bytes
        weights = broken / "adapter_model.safetensors"
        data = weights.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [s * 2 for s in header[key]["shape"]]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (length - len(text)) if len(text) <= length else b""
        assert len(text) == length
        weights.write_bytes(data[:8] + text + data[8 + length :])
    src = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(src)
    code = infer_main(["--adapter", str(broken), "--input", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "damaged" in err and "does not fit base model" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_resume_with_another_unet_size_is_refused(small_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    unet = ["--model", "unet", "--unet_channels", "4", "8", "--unet_image_size", "32", "--num_train_epochs", "2"]
    args = run_args(small_dataset, "unused", run, *unet, "--stop_after_epochs", "1")
    assert train_main(args) == 0
    capsys.readouterr()
    for change in (["--unet_image_size", "64"], ["--unet_channels", "4", "8", "16"]):
        resumed = run_args(small_dataset, "unused", run, *unet, *change, "--resume_from_checkpoint", "latest")
        assert train_main(resumed) == 2
        err = capsys.readouterr().err
        assert "another network" in err and ("image_size 32 -> 64" in err or "unet_channels" in err), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001"]


def test_refused_build_leaves_no_output_folder(tmp_path, capsys):
    """A build refused under its lock (too few patients to split) leaves neither --output nor the missing folders
    above it (made for its lock file)."""
    from dataset_builder.__main__ import main as build_main

    images, masks = folder_source(tmp_path / "src", n=2)
    out = tmp_path / "new" / "deeper" / "data"
    code = build_main(["folder", "--images", str(images), "--masks", str(masks), "--labels", "background,fluid",
                       "--output", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "at least 3 patients" in err and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()


def test_empty_validation_split_is_named(tmp_path, capsys):
    dataset = write_shape_dataset(tmp_path / "d", (4, 0, 2), seed=1)
    args = run_args(str(dataset), "unused", tmp_path / "run", "--model", "unet", "--unet_channels", "4", "8",
                    "--unet_image_size", "32")  # fmt: skip
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "empty 'validation' split" in err and "list index" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
