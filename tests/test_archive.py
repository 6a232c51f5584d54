"""Whole archives (issue 21): ``inference.py`` across 2 processes (``torchrun``, gloo on the CPU) writes what one
process writes; a run killed with kill -9 keeps its finished part and ``--resume`` (here in 2 processes) does only
the rest, ending with the outputs of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from test_inference import make_adapter
from test_robustness import ENV, hooked_process, kill

from octsam.cli.infer import main as infer_main
from octsam.infer.archive import JOURNAL_DIR, partial_path, read_journal

#: run.json fields that may differ between two runs of the same inputs: when and how (processes, timings)
RUN_FIELDS = {"created", "timings", "processes", "progress", "device", "seconds"}
ARGUMENT_FIELDS = {"output", "quiet", "resume", "overwrite"}


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "auto")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """9 B-scans (one in a sub-folder, names that sort naturally) and one broken file."""
    folder = tmp_path_factory.mktemp("archive") / "scans"
    (folder / "eye 2").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(9):
        path = folder / ("eye 2" if i == 4 else "") / f"Image {i + 1}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48)).astype(np.uint8)).save(path)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def one_process(adapter, scans, tmp_path_factory) -> Path:
    """The uninterrupted one-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert infer_main(["--adapter", str(adapter), "--input", str(scans), "--output", str(out), "--quiet"]) == 1
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder but run.json, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} | {
        "run.json": b""
    }


def run_record(folder: Path) -> dict:
    record = json.loads((folder / "run.json").read_text())
    record["arguments"] = {k: v for k, v in record["arguments"].items() if k not in ARGUMENT_FIELDS}
    return {k: v for k, v in record.items() if k not in RUN_FIELDS}


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    from test_training import free_port

    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(free_port()), str(REPO_ROOT / "inference.py"), *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def assert_same_run(a: Path, b: Path) -> None:
    assert files(a) == files(b)
    assert run_record(a) == run_record(b)
    assert not partial_path(b).exists() and not (b / JOURNAL_DIR).exists()


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(adapter, scans, one_process, tmp_path):
    """2 processes: each segments its share (5 and 5 of 10 inputs, the broken one included) into one staging folder;
    masks, overlays, summary.csv and run.json (but for timings and process fields) equal the one-process run's."""
    out = tmp_path / "two"
    proc = torchrun(["--adapter", adapter, "--input", scans, "--output", out, "--quiet"])
    assert proc.returncode != 0 and "error: 1 B-scan(s) could not be segmented" in proc.stderr, proc.stderr[-3000:]
    assert_same_run(one_process, out)
    record = json.loads((out / "run.json").read_text())
    assert [(p["index"], p["inputs"]) for p in record["processes"]] == [(0, 5), (1, 5)]
    assert record["progress"]["total"] == 10 and record["progress"]["processes"] == 2
    assert record["failed"] == 1 and "broken.png" in record["failures"][0]["source"]
    timings = record["timings"]
    for key in ("decode_s", "prepare_s", "predict_s", "write_s", "cores_used", "cpus_available"):
        assert timings[key] is not None, key
    assert sorted(p.name for p in out.parent.iterdir()) == ["two"]  # no lock, no staging left


@pytest.mark.slow
def test_kill_9_then_resume_does_only_the_rest(adapter, scans, one_process, tmp_path, capsys):
    """kill -9 while the 6th B-scan is written: the finished B-scans stay in .out.partial with the journal; a run
    without --resume is refused with both commands; --resume with other options is refused; --resume in 2
    processes segments only the missing B-scans and ends with the uninterrupted run's outputs."""
    out = tmp_path / "out"
    argv = ["--adapter", adapter, "--input", scans, "--output", out, "--quiet"]
    proc = hooked_process(tmp_path, "octsam.infer.run", "write_scan", 6, "infer",
                          [*argv, "--write-workers", "1", "--batch-size", "1"])  # fmt: skip
    time.sleep(3)  # the main thread journals the B-scans written before the 6th
    kill(proc)
    partial = partial_path(out)
    assert not out.exists() and partial.is_dir()
    done = {e["scan"] for e in read_journal(partial) if "row" in e}
    assert 1 <= len(done) <= 5, done

    assert infer_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"left {len(done)} finished" in err and "--resume" in err and "--overwrite" in err
    assert infer_main([*map(str, argv), "--resume", "--pixel-spacing-mm", "0.004,0.012"]) == 2
    assert "other options (--pixel-spacing-mm)" in capsys.readouterr().err
    assert partial.is_dir() and not out.exists()

    proc = torchrun([*argv, "--resume"])
    assert "error: 1 B-scan(s) could not be segmented" in proc.stderr, proc.stderr[-3000:]
    assert_same_run(one_process, out)
    progress = json.loads((out / "run.json").read_text())["progress"]
    assert progress["done_before_resume"] == len(done) and progress["this_run"] == 10 - len(done)
    assert progress["done"] == 10
    # a complete output: --resume has nothing to do
    assert infer_main([*map(str, argv), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_interrupted_run_with_nothing_finished_leaves_nothing(adapter, scans, tmp_path, capsys, monkeypatch):
    """Ctrl-C before any B-scan is written: no partial folder is kept (nothing to resume), and the next run starts
    afresh without --resume."""
    import octsam.infer.run as infer_run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    argv = ["--adapter", str(adapter), "--input", str(scans / "Image 1.png"), "--output", str(out), "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(infer_run, "write_scan", interrupt)
        assert infer_main(argv) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert infer_main(argv) == 0 and (out / "masks" / "Image 1.png").is_file()


@pytest.mark.slow
def test_volumes_in_two_processes_equal_one(adapter, tmp_path):
    """Volumes (3 DICOM eyes) across 2 processes: the same eye folders (masks, en-face maps, report.json), the
    same volumes.csv in input order and the same run.json as one process."""
    from test_volumes import write_oct_dicom

    rng = np.random.default_rng(4)
    eyes = [write_oct_dicom(tmp_path / f"eye{i}.dcm", rng.integers(0, 255, (3, 40, 48)).astype(np.uint8))
            for i in range(3)]  # fmt: skip
    argv = ["--adapter", adapter, "--input", *eyes, "--quiet"]
    assert infer_main([*map(str, argv), "--output", str(tmp_path / "one")]) == 0
    proc = torchrun([*argv, "--output", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    same = [k for k in one if not k.endswith("report.png")]  # the rendered figure is compared by its report.json
    assert sorted(one) == sorted(two) and all(one[k] == two[k] for k in same)
    assert run_record(tmp_path / "one") == run_record(tmp_path / "two")
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [p["volumes"] for p in record["processes"]] == [2, 1] and record["segmented"] == 9


@pytest.mark.slow
def test_evaluate_in_two_processes_equals_one(adapter, tiny_base, shape_dataset, tmp_path):
    """octsam-evaluate across 2 processes (an adapter and the zero-shot row): each predicts its share of the split,
    the main process computes the metrics once on all of them; the tables equal a one-process run's."""
    from octsam.cli.evaluate import main as evaluate_main

    argv = ["--adapter", f"LoRA={adapter}", "--method", "zero-shot", "--base-model", tiny_base, "--dataset",
            shape_dataset, "--split", "validation", "--n-bootstrap", "20", "--batch-size", "2", "--dpi", "40"]  # fmt: skip
    assert evaluate_main([*map(str, argv), "--output", str(tmp_path / "one")]) == 0
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    from test_training import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "octsam.cli.evaluate", *map(str, argv), "--output", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    tables = sorted(p.relative_to(one).as_posix() for p in one.rglob("*.csv"))
    assert tables and tables == sorted(p.relative_to(two).as_posix() for p in two.rglob("*.csv"))
    assert all((one / t).read_bytes() == (two / t).read_bytes() for t in tables)

    def summary(folder: Path) -> dict:
        record = json.loads((folder / "comparison.json").read_text())
        for method in record["methods"].values():
            method.pop("seconds")
        return record

    assert summary(one) == summary(two) and summary(one)["n_images"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
