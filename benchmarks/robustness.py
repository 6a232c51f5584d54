"""Robustness probes: bad inputs and injected faults against the real command lines, with counts (issue 11).

    python benchmarks/robustness.py            # all probes (about 3 minutes on 2 CPU cores)
    python benchmarks/robustness.py --quick    # bad inputs and security probes only (in-process)
    python benchmarks/robustness.py --security # the security probes only
    python benchmarks/robustness.py --out benchmarks/results/robustness   # also keep the raw output there

A bad input is *handled cleanly* when the command ends with the expected exit status, a message that names the
problem (``error:``/``failed:``/``warning:``), no traceback, no code executed from a file it read, and no litter or
partial output. A fault is *survived* when, afterwards, no finished output was lost or altered, nothing half-written
is visible, and the next run succeeds (resumed training is bit-identical to an uninterrupted one). *Data lost* counts
probes where an existing output, dataset or checkpoint changed or disappeared. A security probe *held* when no file
outside what the user named was read (a path inside a file or a symbolic link leading out of its folder is refused
with a message naming it), a hub push sent only the adapter's own files and left the folder unchanged, text from the
data stayed text (no live HTML in cards, no spreadsheet formula in CSV cells), and pickles or hostile headers ended
in a message (issue 22). Everything runs offline on a tiny
random SAM in a temporary folder; the disk-full probes need a small tmpfs (``unshare`` + ``mount``) and are counted
as skipped where it cannot be made.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

HOOK = textwrap.dedent(
    """
    import importlib, signal, sys, time
    # Ctrl-C as from a terminal, even when this script was started in the background (which ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module, name, nth, entry, *args = sys.argv[1:]
    if module != "-":
        target = importlib.import_module(module)
        original = getattr(target, name)
        calls = [0]
        def hooked(*a, **k):
            calls[0] += 1
            if calls[0] == int(nth):
                print("REACHED", flush=True)
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
    print("STARTED", flush=True)
    sys.exit(main(args))
    """
)


# ------------------------------------------------------------------------------------------------ helpers
def tree_digest(path: Path) -> str | None:
    """A digest of every file under ``path`` (names and bytes); None if it does not exist."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode("utf-8", "backslashreplace"))
            h.update(p.read_bytes())
    return h.hexdigest()


def litter(parent: Path) -> list[str]:
    return (
        [
            p.name
            for p in parent.iterdir()
            if p.name.startswith(".")
            and any(t in p.name for t in (".tmp-", ".partial-", ".old-", ".del-", ".octsam.lock"))
        ]
        if parent.is_dir()
        else []
    )  # noqa: E501


def cli(entry: str, args: list[str]) -> tuple[int, str]:
    """Run a command line in this process; return (exit status, stderr + log output). An escaping exception is
    returned as status -1 with its traceback."""
    if entry == "train":
        from octsam.cli.train import main
    elif entry == "build":
        from dataset_builder.__main__ import main
    elif entry == "evaluate":
        from octsam.cli.evaluate import main
    else:
        from octsam.cli.infer import main
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 2
            except BaseException:  # noqa: BLE001 - an escaping exception is what the probe looks for
                code = -1
                err.write(traceback.format_exc())
    finally:
        logging.getLogger().removeHandler(handler)
    return code, err.getvalue()


def clean(code: int, err: str, expect_code: int | tuple, needles: tuple[str, ...], parent: Path | None = None):
    codes = expect_code if isinstance(expect_code, tuple) else (expect_code,)
    problems = []
    if code not in codes:
        problems.append(f"exit {code}, expected {codes}")
    if "Traceback" in err:
        problems.append("traceback")
    for needle in needles:
        if needle not in err:
            problems.append(f"no {needle!r} in the message")
    if parent is not None and litter(parent):
        problems.append(f"litter {litter(parent)}")
    return not problems, "; ".join(problems) or err.strip().splitlines()[-1][:140] if err.strip() else ""


def start(tmp: Path, entry: str, args: list[str], hook: tuple[str, str, int] | None = None) -> subprocess.Popen:
    script = tmp / "hook.py"
    script.write_text(HOOK)
    module, name, nth = hook or ("-", "-", 0)
    return subprocess.Popen(
        [sys.executable, str(script), module, name, str(nth), entry, *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, word: str, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if word in line:
                return True
            if not line and proc.poll() is not None:
                return False
    return False


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...); [] for a process gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> set[int]:
    """The processes below ``pid``, found in /proc (Linux)."""
    parents = {int(p.name): int(f[1]) for p in Path("/proc").glob("[0-9]*") if len(f := proc_stat(p.name)) > 1}
    found, todo = set(), [pid]
    while todo:
        above = todo.pop()
        below = [child for child, parent in parents.items() if parent == above]
        found.update(below)
        todo.extend(below)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie - ended, not yet reaped by whoever adopted it - does not)."""
    return proc_stat(pid)[:1] not in ([], ["Z"])


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------ fixtures
class World:
    """Tiny base model, a synthetic dataset, a finished training run, an adapter and some scans."""

    def __init__(self, root: Path):
        from octsam.models.sam import save_random_base

        self.root = root
        self.base = save_random_base(root / "base", seed=0)
        self.dataset = root / "dataset"
        assert cli("build", self.build_args(self.dataset))[0] == 0
        self.run = root / "run"
        code, err = cli("train", self.train_args(self.run, "--num-train-epochs", "2"))
        assert code == 0, err[-2000:]
        self.adapter = self.run / "best_adapter"
        self.scans = root / "scans"
        self.scans.mkdir()
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64), dtype=np.uint8)).save(
                self.scans / f"scan{i}.png"
            )
        self.n = 0

    def fresh(self, name: str = "p") -> Path:
        self.n += 1
        path = self.root / "probes" / f"{self.n:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def build_args(self, out: Path, *extra: str) -> list[str]:
        return ["synthetic", "--disease", "amd", "--num-patients", "4", "--scans-per-patient", "2", "--size",
                "96x64", "--output", str(out), *extra]  # fmt: skip

    def train_args(self, out: Path, *extra: str, dataset: Path | None = None) -> list[str]:
        return ["--dataset", str(dataset or self.dataset), "--base-model", self.base, "--output-dir", str(out),
                "--num-workers", "0", "--report-to", "none", "--effective-batch-size", "2",
                "--per-device-train-batch-size", "2", "--lora-dropout", "0", "--evaluate-test", "false",
                "--early-stopping-patience", "0", "--learning-rate", "5e-3", *extra]  # fmt: skip

    def folder_source(self, tmp: Path, n: int = 4) -> tuple[Path, Path]:
        images, masks = tmp / "images", tmp / "masks"
        images.mkdir()
        masks.mkdir()
        for i in range(n):
            Image.fromarray(np.full((40, 48), 60 + i, np.uint8)).save(images / f"p{i}_scan.png")
            mask = np.zeros((40, 48), np.uint8)
            mask[5:15, 5:15] = 1
            Image.fromarray(mask).save(masks / f"p{i}_scan.png")
        return images, masks


# ------------------------------------------------------------------------------------------------ bad inputs
def bad_inputs(w: World) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    probes = []

    def infer_probe(name, make, expect=2, needles=("error:",)):
        def probe():
            tmp = w.fresh(name)
            inputs, adapter, extra = make(tmp)
            out = tmp / "out"
            code, err = cli("infer", ["--adapter", adapter, "--input", *inputs, "--output", out, "--quiet", *extra])
            ok, why = clean(code, err, expect, needles, tmp)
            if ok and expect == 2 and out.exists() and not (tmp / "keep").exists():
                ok, why = False, "an output folder was written"
            return ok, why

        probes.append((f"inference: {name}", probe))

    def adapter_copy(tmp: Path, edit: Callable[[Path], None]) -> str:
        folder = tmp / "adapter"
        shutil.copytree(w.adapter, folder)
        edit(folder)
        return str(folder)

    def config_edit(change):
        def edit(folder: Path):
            cfg = json.loads((folder / "octsam_config.json").read_text())
            if change == "no-labels":
                del cfg["labels"]
            else:
                cfg.update(change)
            (folder / "octsam_config.json").write_text(json.dumps(cfg))

        return edit

    scan = lambda: str(w.scans / "scan0.png")  # noqa: E731
    infer_probe("input does not exist", lambda t: ([str(t / "nope")], str(w.adapter), []))
    infer_probe("glob matches nothing", lambda t: ([str(t / "*.png")], str(w.adapter), []))
    infer_probe("empty input folder", lambda t: ([str(t)], str(w.adapter), []))
    for label, writer in {
        "decompression-bomb PNG header": lambda p: bomb_png(p),
        "10000 x 10000 PNG header": lambda p: bomb_png(p, 10_000, 10_000),
        "truncated PNG": lambda p: p.write_bytes((w.scans / "scan0.png").read_bytes()[:1000]),
        "zero-byte .png": lambda p: p.write_bytes(b""),
        "text file named .png": lambda p: p.write_text("not an image"),
        "pickle named .png": lambda p: p.write_bytes(pickle.dumps(Payload(p.with_name("PWNED")))),
    }.items():

        def make(t, writer=writer):
            writer(t / "bad.png")
            return [str(t / "bad.png"), scan()], str(w.adapter), []

        infer_probe(label, make, expect=1, needles=("failed:", "bad.png"))

    def non_utf8(t):
        shutil.copy(scan(), t / os.fsdecode(b"bad_\xff.png"))
        return [str(t), scan()], str(w.adapter), []

    infer_probe("non-UTF-8 file name", non_utf8, expect=1, needles=("bad_\\xff", "not valid UTF-8"))

    def volume(t):
        import tifffile

        tifffile.imwrite(t / "vol.tif", np.zeros((5, 32, 32), np.uint8))
        return [str(t / "vol.tif"), scan()], str(w.adapter), []

    infer_probe("multi-page TIFF", volume, expect=1, needles=("failed:", "vol.tif"))

    def dotdot(t):
        (t / "a" / "sub").mkdir(parents=True)
        (t / "x").mkdir()
        shutil.copy(scan(), t / "x" / "s.png")
        shutil.copy(scan(), t / "a" / "sub" / "s.png")
        return [str(t / "a" / "*" / ".." / ".." / "x" / "*.png"), str(t / "a" / "sub" / "s.png")], str(w.adapter), []

    def dotdot_probe():
        tmp = w.fresh("dotdot")
        inputs, adapter, _ = dotdot(tmp)
        out = tmp / "a" / "out"
        code, err = cli("infer", ["--adapter", adapter, "--input", *inputs, "--output", out, "--quiet"])
        files = [p.resolve() for p in out.rglob("*") if p.is_file()]
        inside = all(out.resolve() in p.parents for p in files)
        masks = sorted(p.relative_to(out / "masks") for p in (out / "masks").rglob("*.png")) if out.exists() else []
        ok = code == 0 and inside and len(masks) == 2 and len(list((tmp / "x").iterdir())) == 1
        return ok, f"exit {code}, {len(masks)} masks, all inside: {inside}"

    probes.append(("inference: '..' glob stays inside --output, unique names", dotdot_probe))

    def out_is_file(t):
        (t / "out").write_text("x")
        (t / "keep").write_text("")
        return [scan()], str(w.adapter), []

    infer_probe("--output is a file", out_is_file)

    def out_not_empty(t):
        (t / "out").mkdir()
        (t / "out" / "precious").write_text("x")
        (t / "keep").write_text("")
        return [scan()], str(w.adapter), []

    infer_probe("--output not empty", out_not_empty)

    def out_is_input(where: str, overwrite: bool):
        def make(t):
            folder = t / "out" if where == "is" else t / "out" / "in"
            folder.mkdir(parents=True)
            shutil.copy(scan(), folder / "scan0.png")
            (t / "keep").write_text("")  # --output exists (it holds the input): it must be left as it is
            return [str(folder)], str(w.adapter), ["--overwrite"] if overwrite else []

        return make

    for where in ("is", "holds"):
        for overwrite in (False, True):
            infer_probe(
                f"--output {where} --input{' (--overwrite)' if overwrite else ''}",
                out_is_input(where, overwrite),
                needles=("--output", "--input", "outside"),
            )

    for label, shape in {"100000 x 10 PNG alone": (10, 100_000), "10 x 100000 PNG alone": (100_000, 10)}.items():

        def strip(t, shape=shape):
            Image.fromarray(np.zeros(shape, np.uint8)).save(t / "strip.png")
            return [str(t / "strip.png")], str(w.adapter), []

        infer_probe(label, strip, needles=("strip.png", "MAX_SCAN_ASPECT", "nothing was written"))
    infer_probe("--batch-size 0", lambda t: ([scan()], str(w.adapter), ["--batch-size", "0"]))
    infer_probe("bad --pixel-spacing-mm", lambda t: ([scan()], str(w.adapter), ["--pixel-spacing-mm", "a,b"]))
    infer_probe("bad --box", lambda t: ([scan()], str(w.adapter), ["--box", "fluid:1,2"]))
    infer_probe("--box of an unknown class", lambda t: ([scan()], str(w.adapter), ["--box", "cyst:1,2,10,12"]))
    infer_probe("--prompts file missing", lambda t: ([scan()], str(w.adapter), ["--prompts", str(t / "p.json")]))

    def bad_prompts(t):
        (t / "p.json").write_text("{not json")
        return [scan()], str(w.adapter), ["--prompts", str(t / "p.json")]

    infer_probe("--prompts not JSON", bad_prompts)
    infer_probe("adapter does not exist", lambda t: ([scan()], str(t / "none"), []))
    infer_probe("adapter is a file", lambda t: ([scan()], str(w.scans / "scan0.png"), []))
    for label, change in {
        "labels is an int": {"labels": 3},
        "labels missing": "no-labels",
        "labels null": {"labels": None},
        "labels without background": {"labels": ["fluid", "drusen"]},
        "format_version 'abc'": {"format_version": "abc"},
        "format_version from the future": {"format_version": 99},
        "unknown key": {"colour": "red"},
        "image_std 0": {"image_std": [0, 0, 0]},
        "image_size -1": {"image_size": -1},
        "mode prompted on automatic weights": {"mode": "prompted"},
        "lora_target_modules unknown": {"lora_target_modules": ["everything"]},
    }.items():
        infer_probe(
            f"octsam_config.json {label}",
            lambda t, change=change: ([scan()], adapter_copy(t, config_edit(change)), []),
        )
    for label, edit in {
        "octsam_config.json is a JSON list": lambda f: (f / "octsam_config.json").write_text("[1, 2]"),
        "octsam_config.json is not JSON": lambda f: (f / "octsam_config.json").write_text("{labels:"),
        "octsam_config.json missing": lambda f: (f / "octsam_config.json").unlink(),
        "adapter_model.safetensors truncated": lambda f: (f / "adapter_model.safetensors").write_bytes(
            (f / "adapter_model.safetensors").read_bytes()[:-500]
        ),
        "adapter_model.safetensors missing": lambda f: (f / "adapter_model.safetensors").unlink(),
        "adapter_model.safetensors empty": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
        "adapter_model.safetensors is a pickle": lambda f: (f / "adapter_model.safetensors").write_bytes(
            pickle.dumps(Payload(f.parent / "PWNED"))
        ),
        "adapter_config.json missing": lambda f: (f / "adapter_config.json").unlink(),
    }.items():
        infer_probe(label, lambda t, edit=edit: ([scan()], adapter_copy(t, edit), []))
    # issue 22: damaged files are named as damaged (not "does not fit base model"); every setting is checked
    for label, edit in {
        "adapter_config.json damaged": lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '),
        "octsam_config.json image_mean of the wrong length": config_edit({"image_mean": [1.0, 2.0]}),
        "octsam_config.json tile_overlap 1": config_edit({"tile_overlap": 1.0}),
        "octsam_config.json blank label name": config_edit({"labels": ["background", " "]}),
    }.items():
        needles = ("damaged",) if "damaged" in label else ("is not allowed",)
        infer_probe(label, lambda t, edit=edit: ([scan()], adapter_copy(t, edit), []), needles=needles)

    # ---- dataset builder
    def build_probe(name, make, expect=2, needles=("error:",)):
        def probe():
            tmp = w.fresh(name)
            args, out = make(tmp)
            before = tree_digest(out)
            code, err = cli("build", args)
            ok, why = clean(code, err, expect, needles, tmp)
            if ok and tree_digest(out) != before:
                ok, why = False, "the output changed"
            return ok, why

        probes.append((f"builder: {name}", probe))

    def folder_args(t, *extra, images=None, masks=None):
        src_images, src_masks = w.folder_source(t)
        return [
            "folder", "--images", str(images or src_images), "--masks", str(masks or src_masks), "--labels",
            "background,fluid", "--patient-regex", r"^(p\d+)_", "--output", str(t / "out"), *extra,
        ], t / "out"  # fmt: skip

    build_probe("images folder missing", lambda t: folder_args(t, images=t / "none"))
    # issue 22, item 4
    for label, extra in {
        "split fractions NaN": ["--split-fractions", "nan,0.5,0.5"],
        "split fractions inf": ["--split-fractions", "inf,0.5,0.5"],
        "blank label name": ["--labels", "background, ,fluid"],
        "--folds 1": ["--folds", "1"],
        "--seed negative": ["--seed", "-1"],
    }.items():
        build_probe(label, lambda t, extra=extra: folder_args(t, *extra))

    def evaluate_probe(name, extra, needles=("error:",)):
        def probe():
            tmp = w.fresh(name)
            args = ["--adapter", str(w.adapter), "--dataset", str(w.dataset), "--output", str(tmp / "o"), *extra]
            code, err = cli("evaluate", args)
            ok, why = clean(code, err, 2, needles, tmp)
            if ok and (tmp / "o").exists():
                ok, why = False, "an output folder was written"
            return ok, why

        probes.append((f"evaluation: {name}", probe))

    evaluate_probe("--dpi 0", ["--dpi", "0"], needles=("--dpi",))

    def app_page_messages():
        """The page's handlers as Gradio calls them: bad uploads and odd clicks end in a status-box message."""
        import types

        from octsam.app.ui import AppConfig, build_app
        from octsam.segmenter import Segmenter

        tmp = w.fresh("app-page")
        up = tmp / "uploads"
        up.mkdir()
        (up / "text.png").write_text("not an image")
        (up / "empty.png").write_bytes(b"")
        Image.fromarray(np.zeros((10, 100_000), np.uint8)).save(up / "strip.png")
        (up / "alone.mhd").write_text(
            "ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\nElementDataFile = /etc/hostname\n"
        )
        shutil.copy(scan(), up / "good.png")
        segmenter = Segmenter.from_pretrained(w.adapter, device="cpu")
        demo = build_app(AppConfig({"a": segmenter}, tmp / "exports", upload_root=up))
        fns = {f.api_name: f.fn for f in demo.fns.values() if isinstance(f.api_name, str)}
        select = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_select")
        view = [[1], 0.45, None, None]
        bad = []
        for name in ("text.png", "empty.png", "strip.png", "alone.mhd"):
            try:
                message = fns["open"](None, [str(up / name)], *view)[2]
                if "not opened" not in message or name not in message:
                    bad.append(f"{name}: {message[:80]}")
            except Exception as err:  # noqa: BLE001 - a raise is a Gradio error in the page
                bad.append(f"{name}: raised {type(err).__name__}")
        session = fns["open"](None, [str(up / "good.png")], *view)[0]
        clicks = [("apply", (-5, 3)), ("apply", (10_000, 3)), ("apply", ("a", 2))]
        clicks += [("select", index) for index in ([-3, 5], [900, 2], 5, [7], None)]
        for how, where in clicks:
            try:
                if how == "apply":
                    message = fns["apply"](session, "point +", 1, *where, 6, *view)[2]
                else:
                    message = select(session, "point +", 1, 6, *view, types.SimpleNamespace(index=where))[2]
                if "⚠" not in message:
                    bad.append(f"click {where!r}: {message[:80]}")
            except Exception as err:  # noqa: BLE001
                bad.append(f"click {where!r}: raised {type(err).__name__}")
        n = 4 + len(clicks)
        return not bad, f"{n - len(bad)} of {n} bad uploads / clicks were page messages" + (
            f"; {'; '.join(bad)}" if bad else ""
        )

    probes.append(("app: bad uploads and clicks outside the B-scan are page messages", app_page_messages))

    def with_file(kind):
        def make(t):
            args, out = folder_args(t)
            images, masks = t / "images", t / "masks"
            if kind == "unpaired":
                shutil.copy(images / "p0_scan.png", images / "p7_scan.png")
            elif kind == "size":
                Image.fromarray(np.zeros((30, 30), np.uint8)).save(masks / "p0_scan.png")
            elif kind == "value":
                Image.fromarray(np.full((40, 48), 5, np.uint8)).save(masks / "p0_scan.png")
            elif kind == "non-utf8":
                for f in (images, masks):
                    shutil.copy(f / "p0_scan.png", f / os.fsdecode(b"p5_\xff.png"))
            elif kind == "bomb":
                bomb_png(images / "p5_scan.png")
                shutil.copy(masks / "p0_scan.png", masks / "p5_scan.png")
            elif kind == "huge":
                bomb_png(images / "p5_scan.png", 10_000, 10_000)
                shutil.copy(masks / "p0_scan.png", masks / "p5_scan.png")
            elif kind == "truncated":
                noise = np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)
                Image.fromarray(noise).save(images / "p0_scan.png")
                (images / "p0_scan.png").write_bytes((images / "p0_scan.png").read_bytes()[:900])
            elif kind == "text":
                (images / "p0_scan.png").write_text("hello")
            elif kind in ("wide", "tall"):
                shape = (10, 100_000) if kind == "wide" else (100_000, 10)
                for f in (images, masks):
                    Image.fromarray(np.zeros(shape, np.uint8)).save(f / "p5_scan.png")
            return args, out

        return make

    build_probe("unpaired image", with_file("unpaired"))
    build_probe("mask of another size", with_file("size"))
    build_probe("mask value above the labels", with_file("value"))
    build_probe("non-UTF-8 file name", with_file("non-utf8"), needles=("p5_\\xff", "not valid UTF-8"))
    build_probe("decompression-bomb PNG header", with_file("bomb"), needles=("megapixels",))
    build_probe("10000 x 10000 PNG header", with_file("huge"), needles=("megapixels",))
    build_probe("truncated PNG", with_file("truncated"), needles=("p0_scan",))
    build_probe("text file named .png", with_file("text"), needles=("p0_scan",))
    build_probe("100000 x 10 PNG", with_file("wide"), needles=("p5_scan", "MAX_SCAN_ASPECT"))
    build_probe("10 x 100000 PNG", with_file("tall"), needles=("p5_scan", "MAX_SCAN_ASPECT"))
    build_probe("bad --split", lambda t: folder_args(t, "--split", "0.5,0.6,x"))
    build_probe("--split-file missing", lambda t: folder_args(t, "--split-file", str(t / "s.json")))
    build_probe(
        "invalid --patient-regex",
        lambda t: (folder_args(t)[0][:-4] + ["--patient-regex", "(", "--output", str(t / "out")], t / "out"),
    )  # noqa: E501
    build_probe(
        "labels without background",
        lambda t: (["folder", *folder_args(t)[0][1:5], "--labels", "fluid", "--output", str(t / "out")], t / "out"),
    )  # noqa: E501
    build_probe("unknown --palette", lambda t: folder_args(t, "--palette", "rainbow"))

    def exists(t):
        args, out = folder_args(t)
        out.mkdir()
        (out / "precious").write_text("x")
        return args, out

    build_probe("--output exists", exists)

    def overwrite_foreign(t):
        args, out = exists(t)
        return args + ["--overwrite"], out

    build_probe("--overwrite of a folder that is not a dataset", overwrite_foreign)
    build_probe(
        "synthetic size too small",
        lambda t: (w.build_args(t / "out")[:-2] + ["--size", "8x8", "--output", str(t / "out")], t / "out"),
    )  # noqa: E501

    # ---- training
    def train_probe(name, make, expect=2, needles=("error:",), marker=False):
        def probe():
            tmp = w.fresh(name)
            args, keep = make(tmp)
            before = {p: tree_digest(p) for p in keep}
            code, err = cli("train", args)
            ok, why = clean(code, err, expect, needles, tmp)
            if marker and list(tmp.rglob("PWNED")):
                ok, why = False, "A PICKLE PAYLOAD RAN"
            changed = [p.name for p in keep if tree_digest(p) != before[p]]
            if ok and changed:
                ok, why = False, f"changed {changed}"
            return ok, why

        probes.append((f"training: {name}", probe))

    train_probe("dataset missing", lambda t: (w.train_args(t / "run", dataset=t / "none"), []))

    def yaml(t, text):
        (t / "c.yaml").write_text(text)
        return ["--config", str(t / "c.yaml"), *w.train_args(t / "run")], []

    train_probe("unknown config key", lambda t: yaml(t, "learning_rat: 1\n"))
    # issue 22, item 4: every option is checked against one constraint table (octsam.options) before any work
    for label, extra in {
        "learning rate negative": ["--learning-rate", "-1"],
        "learning rate zero": ["--learning-rate", "0"],
        "learning rate NaN": ["--learning-rate", "nan"],
        "weight decay negative": ["--weight-decay", "-0.1"],
        "patience negative": ["--early-stopping-patience", "-1"],
        "keep_checkpoints negative": ["--keep-checkpoints", "-1"],
        "stop-after-epochs negative": ["--stop-after-epochs", "-1"],
        "max_train_samples 0": ["--max-train-samples", "0"],
        "Dice and CE weights both 0": ["--dice-weight", "0", "--ce-weight", "0"],
        "warm-up ratio 2": ["--warmup-ratio", "2"],
        "unknown scheduler": ["--lr-scheduler-type", "cosinus"],
        "unknown mixed precision": ["--mixed-precision", "fp32"],
        "tile overlap 1": ["--tile-overlap", "1"],
    }.items():
        train_probe(f"option: {label}", lambda t, extra=extra: (w.train_args(t / "run", *extra), []),
                    needles=("is not allowed", "the command line"))  # fmt: skip
    for label, text in {
        "a list for a number": "weight_decay: [1, 2]\n",
        "null for a number": "seed: null\n",
        "empty unet_channels": "model: unet\nunet_channels: []\n",
    }.items():
        train_probe(
            f"option in YAML: {label}", lambda t, text=text: yaml(t, text), needles=("is not allowed", "c.yaml")
        )
    train_probe("config not YAML", lambda t: yaml(t, "a: [\n"))
    train_probe(
        "effective batch over the training split",
        lambda t: (w.train_args(t / "run", "--effective-batch-size", "64"), []),
    )  # noqa: E501
    train_probe(
        "checkpoint does not exist",
        lambda t: (w.train_args(t / "run", "--resume-from-checkpoint", str(t / "none")), []),
    )  # noqa: E501

    def copy_run(t):
        run = t / "run"
        shutil.copytree(w.run, run)
        return run

    def non_empty(t):
        run = copy_run(t)
        return w.train_args(run), [run]

    train_probe("--output-dir not empty", non_empty)

    def overwrite_and_resume(t):
        run = copy_run(t)
        return w.train_args(run, "--overwrite-output-dir", "--resume-from-checkpoint", "latest"), [run]

    train_probe("--overwrite-output-dir with --resume-from-checkpoint latest", overwrite_and_resume)

    def other_run_into_non_empty(t):
        run = copy_run(t)
        (t / "new").mkdir()
        (t / "new" / "x").write_text("x")
        args = w.train_args(t / "new", "--resume-from-checkpoint", str(run / "checkpoints" / "epoch-0002"))
        return args, [run, t / "new"]

    train_probe("resume another run's checkpoint into a non-empty folder", other_run_into_non_empty)

    def best_missing(t):
        ckpt = t / "c" / "checkpoints" / "epoch-0002"
        shutil.copytree(w.run / "checkpoints" / "epoch-0002", ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["best_epoch"] = 1
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        return w.train_args(t / "new", "--num-train-epochs", "3", "--resume-from-checkpoint", str(ckpt)), [ckpt]

    train_probe("resume into a new folder without the best epoch's checkpoint", best_missing, needles=("is missing",))
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                 "trainer_state.json", "octsam_config.json", "rng_state_0.safetensors"):  # fmt: skip

        def payload(t, name=name):
            run = copy_run(t)
            ckpt = run / "checkpoints" / "epoch-0002"
            (ckpt / name).write_bytes(pickle.dumps(Payload(t / "PWNED")))
            return w.train_args(run, "--num-train-epochs", "3", "--resume-from-checkpoint", "latest"), []

        train_probe(f"pickle payload in {name}", payload, needles=(name,), marker=True)

    def legacy(t):
        import torch

        run = copy_run(t)
        ckpt = run / "checkpoints" / "epoch-0002"
        (ckpt / "optimizer.safetensors").unlink()
        for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
            torch.save({"x": Payload(t / "PWNED")}, ckpt / name)
        return w.train_args(run, "--num-train-epochs", "3", "--resume-from-checkpoint", "latest"), []

    train_probe("pickle payloads in legacy .pt files", legacy, needles=("pickle",), marker=True)

    def truncated(t):
        run = copy_run(t)
        f = run / "checkpoints" / "epoch-0002" / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:-300])
        return w.train_args(run, "--num-train-epochs", "3", "--resume-from-checkpoint", "latest"), []

    train_probe("truncated trainable.safetensors", truncated, needles=("trainable.safetensors",))

    def lr_on_resume(t):
        run = copy_run(t)
        return w.train_args(
            run, "--num-train-epochs", "3", "--learning-rate", "0.1", "--resume-from-checkpoint", "latest"
        ), []  # noqa: E501

    train_probe("--learning-rate on resume", lr_on_resume, expect=0, needles=("is ignored",))

    def all_background(t):
        import datasets

        dsd = datasets.load_from_disk(str(w.dataset))
        blank = dsd.map(lambda row: {"mask": Image.fromarray(np.zeros_like(np.asarray(row["mask"])))})
        blank.save_to_disk(str(t / "bg"))
        shutil.copy(w.dataset / "id2label.json", t / "bg" / "id2label.json")
        return w.train_args(t / "run", "--num-train-epochs", "1", dataset=t / "bg"), []

    train_probe("all-background dataset", all_background, expect=0, needles=("no foreground pixel", "Dice stayed 0"))
    return probes


# ------------------------------------------------------------------------------------------------ security
SECRET = b"PRIVATE-SERVER-FILE " * 1200  # 24000 bytes: enough for the 4 x 30 x 40 uint16 volume of retouch_case


def retouch_case(folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sitk.WriteImage(
        sitk.GetImageFromArray(rng.integers(0, 4000, (4, 30, 40)).astype(np.uint16)), str(folder / "oct.mhd")
    )
    ref = np.zeros((4, 30, 40), np.uint8)
    ref[1, 5:10, 5:10] = 1
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(folder / "reference.mhd"))
    return folder


def point_mhd(header: Path, target: str) -> None:
    lines = [f"ElementDataFile = {target}" if line.startswith("ElementDataFile") else line
             for line in header.read_text().splitlines()]  # fmt: skip
    header.write_text("\n".join(lines) + "\n")


def security(w: World) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """Issue 22: nothing read from outside what the user named, nothing uploaded by accident, text from data escaped
    where it lands, pickles and hostile headers refused with a message. Each returns (held, detail)."""
    probes = []

    def refused(name, entry, make, needles=("outside its folder",)):
        """A command that must end with exit 2, a message with ``needles``, no output and no secret in it."""

        def probe():
            tmp = w.fresh(name)
            args, out = make(tmp)
            code, err = cli(entry, args)
            ok, why = clean(code, err, 2, needles, tmp)
            if ok and out is not None and out.exists():
                ok, why = False, "an output was written"
            if SECRET[:20].decode() in err:
                ok, why = False, "the secret file's bytes reached the output"
            return ok, why

        probes.append((f"{entry}: {name}", probe))

    def secret(tmp: Path) -> Path:
        (tmp / "secret.bin").write_bytes(SECRET)
        return tmp / "secret.bin"

    def infer_args(tmp, inputs):
        return ["--adapter", str(w.adapter), "--input", *map(str, inputs), "--output", str(tmp / "out"), "--quiet"]

    def mhd_outside(how):
        def make(tmp):
            path = secret(tmp)
            case = retouch_case(tmp / "cases" / "TRAIN001")
            (case / "oct.raw").unlink()
            if how == "symlink":
                (case / "oct.raw").symlink_to(path)
                target = "oct.raw"
            else:
                target = "../../secret.bin" if how == "dotdot" else str(path)
            point_mhd(case / "oct.mhd", target)
            return infer_args(tmp, [case]), tmp / "out"

        return make

    refused("RETOUCH .mhd ElementDataFile '../../secret'", "infer", mhd_outside("dotdot"))
    refused("RETOUCH .mhd ElementDataFile an absolute path", "infer", mhd_outside("absolute"))
    refused("RETOUCH .mhd data file a symbolic link leading out", "infer", mhd_outside("symlink"))

    def builder_reference_outside(tmp):
        (tmp / "secret.bin").write_bytes(bytes(4 * 30 * 40))  # zeros: valid labels, only the check can refuse it
        case = retouch_case(tmp / "RETOUCH" / "Spectralis" / "TRAIN001")
        point_mhd(case / "reference.mhd", "../../../secret.bin")
        args = ["retouch", "--input", str(tmp / "RETOUCH"), "--spacing", "0.0039,0.0117,0.047", "--output"]
        return [*args, str(tmp / "out")], tmp / "out"

    refused("RETOUCH reference.mhd pointing outside its case", "build", builder_reference_outside)

    def heyex_xml(tmp):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "secret.png")
        (tmp / "export").mkdir()
        (tmp / "export" / "scan.xml").write_text(
            "<HEDX><BODY><Patient><Study><Series><Image><ImageData><ExamURL>../secret.png</ExamURL></ImageData>"
            "</Image></Series></Study></Patient></BODY></HEDX>"
        )
        return infer_args(tmp, [tmp / "export" / "scan.xml"]), tmp / "out"

    refused("HEYEX XML image reference '../secret.png'", "infer", heyex_xml)

    def input_folder_link(tmp):
        (tmp / "in").mkdir()
        shutil.copy(w.scans / "scan0.png", tmp / "in" / "a.png")
        (tmp / "private").mkdir()
        shutil.copy(w.scans / "scan1.png", tmp / "private" / "p.png")
        (tmp / "in" / "linked").symlink_to(tmp / "private", target_is_directory=True)
        return infer_args(tmp, [tmp / "in"]), tmp / "out"

    refused("input folder holding a symbolic link to another folder", "infer", input_folder_link)

    def builder_folder_link(tmp):
        args, out = folder_args_for(tmp)
        (tmp / "private").mkdir()
        Image.fromarray(np.full((40, 48), 9, np.uint8)).save(tmp / "private" / "x.png")
        (tmp / "images" / "p9_scan.png").symlink_to(tmp / "private" / "x.png")
        shutil.copy(tmp / "masks" / "p0_scan.png", tmp / "masks" / "p9_scan.png")
        return args, out

    def folder_args_for(tmp):
        images, masks = w.folder_source(tmp)
        return ["folder", "--images", str(images), "--masks", str(masks), "--labels", "background,fluid",
                "--patient-regex", r"^(p\d+)_", "--output", str(tmp / "out")], tmp / "out"  # fmt: skip

    refused("images folder holding a symbolic link leading out", "build", builder_folder_link)

    def nnunet_link(tmp):
        nn = tmp / "nn"
        (nn / "imagesTr").mkdir(parents=True)
        (nn / "labelsTr").mkdir()
        (nn / "dataset.json").write_text('{"labels": {"background": 0, "fluid": 1}, "file_ending": ".png"}')
        for i in range(4):
            Image.fromarray(np.full((16, 16), 60 + i, np.uint8)).save(nn / "imagesTr" / f"c{i}_0000.png")
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(nn / "labelsTr" / f"c{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "secret.png")
        (nn / "labelsTr" / "c9.png").symlink_to(tmp / "secret.png")
        shutil.copy(nn / "imagesTr" / "c0_0000.png", nn / "imagesTr" / "c9_0000.png")
        return ["nnunet", "--input", str(nn), "--output", str(tmp / "out")], tmp / "out"

    refused("nnU-Net labelsTr holding a symbolic link leading out", "build", nnunet_link)

    def app_mhd_alone():
        from octsam.app.loading import open_uploads

        tmp = w.fresh("app-mhd")
        root = tmp / "uploads"
        (root / "other").mkdir(parents=True)
        target = secret(root / "other")
        case = retouch_case(root / "h1")
        held = []
        for text in (str(target), "../other/secret.bin", "oct.raw"):
            point_mhd(case / "oct.mhd", text)
            scans, volumes, problems = open_uploads([case / "oct.mhd"], root)
            held.append(not scans and not volumes and len(problems) == 1 and "oct.mhd" in problems[0])
        return all(held), f"refused {sum(held)} of 3 header-only uploads (absolute, '..', beside it)"

    probes.append(("app: an uploaded .mhd alone opens no file of the server's", app_mhd_alone))

    # ---- hub push
    def hub_folder(tmp: Path) -> Path:
        folder = tmp / "adapter"
        shutil.copytree(w.adapter, folder)
        (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
        for name in ("credentials.json", "id_rsa", "token.txt", "pytorch_model.bin", "notes/x.pkl"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("do not send")
        secret(tmp)
        (folder / "link.json").symlink_to(tmp / "secret.bin")
        return folder

    def hub_push():
        from huggingface_hub import HfApi

        from octsam.cli.hub import main as hub_main

        tmp = w.fresh("hub")
        folder = hub_folder(tmp)
        before = tree_digest(folder)
        sent, calls = [], []
        original = HfApi.create_repo, HfApi.create_commit

        def create_commit(self, **kwargs):
            sent.extend(op.path_in_repo for op in kwargs["operations"])
            return "https://huggingface.co/x/y/commit/0"

        try:
            HfApi.create_repo = lambda self, *a, **k: calls.append("create_repo")
            HfApi.create_commit = create_commit
            with contextlib.redirect_stdout(io.StringIO()) as out:
                dry = hub_main(["push", str(folder), "octsam-test/x", "--dry-run"])
            dry_ok = dry == 0 and not calls and not sent and "credentials.json" in out.getvalue()
            with contextlib.redirect_stdout(io.StringIO()):
                code = hub_main(["push", str(folder), "octsam-test/x"])
        finally:
            HfApi.create_repo, HfApi.create_commit = original
        allowed = ["README.md", "adapter_config.json", "adapter_model.safetensors", "octsam_config.json"]
        ok = dry_ok and code == 0 and sorted(sent) == allowed and tree_digest(folder) == before
        return (
            ok,
            f"dry run sends nothing: {dry_ok}; sent {sorted(sent)}; folder unchanged {tree_digest(folder) == before}",
        )

    probes.append(("hub push: only the adapter's files (no credentials, keys, pickles, links); --dry-run", hub_push))

    def hub_offline():
        from octsam.cli.hub import main as hub_main

        tmp = w.fresh("hub-offline")
        folder = hub_folder(tmp)
        before = tree_digest(folder)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = hub_main(["push", str(folder), "octsam-test/x"])  # HF_HUB_OFFLINE=1: the push fails
        ok = code == 2 and "Traceback" not in err.getvalue() and tree_digest(folder) == before
        return ok, f"exit {code}; folder unchanged: {tree_digest(folder) == before}"

    probes.append(("hub push that fails (offline) changes nothing in the folder", hub_offline))

    # ---- text from data
    hostile = "<img src=x onerror=alert(1)>"

    def dataset_card_html():
        tmp = w.fresh("card")
        images, masks = w.folder_source(tmp)
        args = ["folder", "--images", str(images), "--masks", str(masks), "--labels", f"background,{hostile}",
                "--patient-regex", r"^(p\d+)_", "--output", str(tmp / "out")]  # fmt: skip
        code, err = cli("build", args)
        import re

        body = re.sub(r"```.*?```", "", (tmp / "out" / "README.md").read_text().split("---", 2)[2], flags=re.S)
        ok = code == 0 and "<img" not in body and "&lt;img" in body
        return ok, f"exit {code}; live HTML in the card: {'<img' in body}"

    probes.append(("builder: label '<img src=x onerror=...>' in the dataset card", dataset_card_html))

    def model_card_html():
        from octsam.adapter import OctSamConfig
        from octsam.cards import render_adapter_card

        config = OctSamConfig.from_json_file(w.adapter / "octsam_config.json")
        config.labels = ["background", hostile, "fluid"]
        body = render_adapter_card(config).split("---", 2)[2]
        return "<img" not in body, f"live HTML in the model card: {'<img' in body}"

    probes.append(("model card: label '<img src=x onerror=...>'", model_card_html))

    def summary_formulas():
        import csv

        tmp = w.fresh("csv")
        for name in ("=1+1", "@SUM(A1)", "+cmd", "-2+3"):
            shutil.copy(w.scans / "scan0.png", tmp / f"{name}.png")
        code, err = cli("infer", ["--adapter", w.adapter, "--input", tmp, "--output", tmp / "out", "--quiet"])
        rows = list(csv.reader((tmp / "out" / "summary.csv").open())) if code == 0 else []
        live = [c for row in rows for c in row if c.startswith(("=", "+", "-", "@"))]
        ok = code == 0 and len(rows) == 5 and not live
        return ok, f"exit {code}; cells a spreadsheet would run: {live}"

    probes.append(("inference: scan names '=1+1', '@SUM(A1)', '+cmd', '-2+3' in summary.csv", summary_formulas))

    # ---- pickles and hostile headers
    def pickled_base(tmp):
        base = tmp / "base"
        shutil.copytree(w.base, base)
        (base / "model.safetensors").unlink()
        (base / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(tmp / "PWNED")))
        return [*infer_args(tmp, [w.scans / "scan0.png"]), "--base-model", str(base)], tmp / "out"

    refused("base model folder with a pickled pytorch_model.bin", "infer", pickled_base, needles=("pickle format",))

    def pickled_adapter(tmp):
        folder = tmp / "adapter"
        shutil.copytree(w.adapter, folder)
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(tmp / "PWNED")))
        args = infer_args(tmp, [w.scans / "scan0.png"])
        args[1] = str(folder)
        return args, tmp / "out"

    refused("adapter folder with adapter_model.bin instead of .safetensors", "infer", pickled_adapter,
            needles=("pickle format",))  # fmt: skip

    def nifti_bomb(tmp):
        import gzip

        import nibabel

        nn = tmp / "nn"
        (nn / "imagesTr").mkdir(parents=True)
        (nn / "labelsTr").mkdir()
        (nn / "dataset.json").write_text('{"labels": {"background": 0, "fluid": 1}, "file_ending": ".nii.gz"}')
        header = nibabel.Nifti1Image(np.zeros((4, 4, 1), np.uint8), np.eye(4)).header
        header.set_data_shape((30000, 30000, 1))
        raw = gzip.compress(header.binaryblock + bytes(68))
        (nn / "imagesTr" / "c0_0000.nii.gz").write_bytes(raw)
        (nn / "labelsTr" / "c0.nii.gz").write_bytes(raw)
        return ["nnunet", "--input", str(nn), "--output", str(tmp / "out")], tmp / "out"

    refused("tiny NIfTI whose header declares 30000 x 30000", "build", nifti_bomb, needles=("MAX_SCAN_PIXELS",))

    def dicom_bomb(tmp):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        from octsam.volumes.readers import OCT_SOP_CLASS

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OCT_SOP_CLASS, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, OCT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
        ds.NumberOfFrames, ds.Rows, ds.Columns = 1000, 60000, 60000
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(64)
        ds.save_as(tmp / "bomb.dcm", enforce_file_format=True)
        return infer_args(tmp, [tmp / "bomb.dcm"]), tmp / "out"

    refused("DICOM whose header declares 1000 frames of 60000 x 60000", "infer", dicom_bomb,
            needles=("MAX_VOLUME_VOXELS",))  # fmt: skip

    def vol_bomb(tmp):
        import struct

        (tmp / "bomb.vol").write_bytes(b"HSF-OCT-103 " + struct.pack("<3I", 60000, 5000, 60000) + bytes(4096))
        return infer_args(tmp, [tmp / "bomb.vol"]), tmp / "out"

    refused("HEYEX VOL whose header declares 5000 B-scans of 60000 x 60000", "infer", vol_bomb,
            needles=("5000 B-scans of 60000 x 60000",))  # fmt: skip
    return probes


# ------------------------------------------------------------------------------------------------ faults
def faults(w: World, reference: Path) -> list[tuple[str, Callable[[], tuple[bool, str, bool]]]]:
    """Each returns (survived, detail, data lost)."""
    from safetensors.torch import load_file

    def same_weights(a: Path, b: Path) -> bool:
        x, y = load_file(str(a)), load_file(str(b))
        return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)

    probes = []
    three = ("--num-train-epochs", "3")

    references = {3: reference}

    def reference_for(epochs: int) -> Path:
        if epochs not in references:
            references[epochs] = w.root / f"reference-{epochs}"
            assert cli("train", w.train_args(references[epochs], "--num-train-epochs", str(epochs)))[0] == 0
        return references[epochs]

    def train_fault(name, sig, hook=None, delay=None):
        epochs = 3 if hook else 8  # random kills: a longer run, so that they land inside it

        def probe():
            tmp = w.fresh(name)
            run = tmp / "run"
            args = w.train_args(run, "--num-train-epochs", str(epochs))
            proc = start(tmp, "train", args, hook)
            if hook:
                wait_for(proc, "REACHED")
            else:  # a random moment after the first checkpoint: mid-step, mid-validation or mid-write
                deadline = time.monotonic() + 300
                while not (run / "checkpoints" / "epoch-0001").is_dir() and proc.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                time.sleep(delay)
            code, err = stop(proc, sig)
            if sig != signal.SIGKILL and code not in (130, 0):
                return False, f"exit {code}: {err.strip()[-200:]}", False
            if "Traceback" in err:
                return False, "traceback", False
            ckpts = sorted((run / "checkpoints").glob("epoch-[0-9][0-9][0-9][0-9]")) if run.exists() else []
            resume = ["--resume-from-checkpoint", "latest"] if ckpts else []
            if run.exists() and not ckpts:
                resume = ["--overwrite-output-dir"]
            code, err = cli("train", [*args, *resume])
            last = f"checkpoints/epoch-{epochs:04d}/trainable.safetensors"
            ok = code == 0 and (run / last).is_file() and same_weights(run / last, reference_for(epochs) / last)
            ok = ok and not list((run / "checkpoints").glob("*.tmp")) and not litter(tmp)
            where = ckpts[-1].name if ckpts else "scratch"
            return ok, f"killed after {where} of {epochs}, resumed: exit {code}, bit-identical {ok}", False

        probes.append((f"training: {name}", probe))

    train_fault(
        "kill -9 during the epoch-2 checkpoint write",
        signal.SIGKILL,
        ("octsam.training.checkpoint", "save_optimizer", 2),
    )
    train_fault(
        "kill -9 during the epoch-1 checkpoint write",
        signal.SIGKILL,
        ("octsam.training.checkpoint", "save_rng_state", 1),
    )
    train_fault(
        "kill -9 while writing best_adapter", signal.SIGKILL, ("octsam.training.loop", "write_atomic_folder", 2)
    )
    rng = random.Random(11)
    for i in range(3):
        train_fault(f"kill -9 at a random time #{i + 1}", signal.SIGKILL, delay=rng.uniform(0, 1.0))
    train_fault(
        "SIGTERM during a checkpoint write", signal.SIGTERM, ("octsam.training.checkpoint", "save_optimizer", 2)
    )
    train_fault("SIGINT (Ctrl-C) during training", signal.SIGINT, ("octsam.training.checkpoint", "save_optimizer", 1))

    def build_fault(name, sig, overwrite):
        def probe():
            tmp = w.fresh(name)
            out = tmp / "data"
            if overwrite:
                assert cli("build", w.build_args(out, "--seed", "3"))[0] == 0
            before = tree_digest(out)
            proc = start(tmp, "build", w.build_args(out, *(["--overwrite"] if overwrite else [])),
                         ("dataset_builder.writer", "check_pair", 3))  # fmt: skip
            wait_for(proc, "REACHED")
            code, err = stop(proc, sig)
            lost = tree_digest(out) != before
            if "Traceback" in err or (sig != signal.SIGKILL and code != 130):
                return False, f"exit {code}: {err.strip()[-200:]}", lost
            code2, _ = cli("build", w.build_args(out, "--overwrite"))
            ok = not lost and code2 == 0 and (out / "dataset_dict.json").is_file() and not litter(tmp)
            return ok, f"old output intact: {not lost}; next build exit {code2}; litter {litter(tmp)}", lost

        probes.append((f"builder: {name}", probe))

    build_fault("kill -9 mid-build", signal.SIGKILL, False)
    build_fault("kill -9 mid-build with --overwrite", signal.SIGKILL, True)
    build_fault("SIGTERM mid-build with --overwrite", signal.SIGTERM, True)
    build_fault("SIGINT mid-build", signal.SIGINT, False)

    def infer_fault(name, sig, overwrite):
        def probe():
            tmp = w.fresh(name)
            out = tmp / "pred"
            base = ["--adapter", str(w.adapter), "--input", str(w.scans), "--output", str(out), "--quiet"]
            if overwrite:
                assert cli("infer", base)[0] == 0
            before = tree_digest(out)
            proc = start(tmp, "infer", [*base, *(["--overwrite"] if overwrite else [])],
                         ("octsam.infer.run", "write_scan", 2))  # fmt: skip
            wait_for(proc, "REACHED")
            code, err = stop(proc, sig)
            lost = tree_digest(out) != before
            if "Traceback" in err or (sig != signal.SIGKILL and code != 130):
                return False, f"exit {code}: {err.strip()[-200:]}", lost
            code2, _ = cli("infer", [*base, "--overwrite"])
            ok = not lost and code2 == 0 and not litter(tmp)
            return ok, f"old output intact: {not lost}; next run exit {code2}; litter {litter(tmp)}", lost

        probes.append((f"inference: {name}", probe))

    infer_fault("kill -9 while writing", signal.SIGKILL, False)
    infer_fault("kill -9 while writing with --overwrite", signal.SIGKILL, True)
    infer_fault("SIGTERM while writing with --overwrite", signal.SIGTERM, True)

    def writers_die_with_the_run():
        tmp = w.fresh("writers")
        args = ["--adapter", str(w.adapter), "--input", str(w.scans), "--output", str(tmp / "pred"), "--quiet",
                "--writer", "process", "--write-workers", "2", "--batch-size", "1"]  # fmt: skip
        proc = start(tmp, "infer", args, ("octsam.infer.run", "write_scan", 2))  # a writer hangs in a write
        writers: set[int] = set()
        try:
            if not wait_for(proc, "REACHED"):
                return False, "the hanging write was not reached", False
            writers = descendants(proc.pid)
            proc.kill()
            proc.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(map(running, writers)):
                time.sleep(0.1)
            left = sorted(pid for pid in writers if running(pid))
            return not left and len(writers) >= 2, f"{len(writers)} writers, alive 10 s after kill -9: {left}", False
        finally:
            proc.kill()
            for pid in writers:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
            proc.stdout.close()  # not read to the end: a writer left alive would hold them open
            proc.stderr.close()
            proc.wait(10)

    if Path("/proc/self/stat").exists():  # the writers are found in /proc
        probes.append(("inference --writer process: kill -9 while a writer hangs, no writer outlives it",
                       writers_die_with_the_run))  # fmt: skip

    def concurrent(name, entry, make, n):
        def probe():
            tmp = w.fresh(name)
            args, out = make(tmp)
            procs = [start(tmp, entry, args) for _ in range(n)]
            results = [(p.communicate(timeout=300), p.returncode) for p in procs]
            codes = sorted(code for _, code in results)
            clean_ = all("Traceback" not in err for (_, err), _ in results)
            ok = codes == [0] + [2] * (n - 1) and clean_ and not litter(tmp)
            return ok, f"exit codes {codes}", False

        probes.append((f"{name}", probe))

    concurrent(
        "3 concurrent dataset builds into one --output", "build", lambda t: (w.build_args(t / "data"), t / "data"), 3
    )  # noqa: E501
    concurrent(
        "2 concurrent trainings into one --output-dir",
        "train",
        lambda t: (w.train_args(t / "run", "--num-train-epochs", "1"), t / "run"),
        2,
    )  # noqa: E501
    concurrent(
        "2 concurrent inference runs into one --output",
        "infer",
        lambda t: (
            ["--adapter", str(w.adapter), "--input", str(w.scans), "--output", str(t / "pred"), "--quiet"],
            t / "pred",
        ),
        2,
    )  # noqa: E501

    def overwrite_then_resume():
        tmp = w.fresh("overwrite")
        run = tmp / "run"
        shutil.copytree(w.run, run)
        code1, _ = cli(
            "train", w.train_args(run, *three, "--seed", "1", "--overwrite-output-dir", "--stop-after-epochs", "1")
        )  # noqa: E501
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        code2, _ = cli("train", w.train_args(run, *three, "--seed", "1", "--resume-from-checkpoint", "latest"))
        hist = json.loads((run / "checkpoints/epoch-0003/trainer_state.json").read_text())["history"]
        ok = code1 == 0 and names == ["epoch-0001"] and code2 == 0 and len(hist) == 3
        return ok, f"after overwrite {names}; resumed to {len(hist)} epochs", False

    probes.append(("training: --overwrite-output-dir over a longer run, then resume latest", overwrite_then_resume))

    def resume_new_folder():
        tmp = w.fresh("newfolder")
        code, err = cli(
            "train",
            w.train_args(tmp / "new", *three, "--resume-from-checkpoint", str(w.run / "checkpoints/epoch-0002")),
        )  # noqa: E501
        ok = code == 0 and (tmp / "new/best_adapter/adapter_model.safetensors").is_file()
        return ok, f"exit {code}", False

    probes.append(("training: resume into a new folder", resume_new_folder))

    def swap_killed():
        from octsam.folders import remove_stale_staging

        tmp = w.fresh("swap")
        out = tmp / "pred"
        assert (
            cli("infer", ["--adapter", str(w.adapter), "--input", str(w.scans), "--output", str(out), "--quiet"])[0]
            == 0
        )  # noqa: E501
        before = tree_digest(out)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        os.replace(out, tmp / f".pred.old-{dead.stdout.strip()}-00000000")  # a swap killed between its renames
        remove_stale_staging(tmp, "pred")
        ok = tree_digest(out) == before
        return ok, f"old output restored: {ok}", not ok

    probes.append(("any command: killed between the two renames of a swap", swap_killed))

    def swap_killed_then_next_build():
        tmp = w.fresh("swapnext")
        out = tmp / "data"
        assert cli("build", w.build_args(out, "--seed", "1"))[0] == 0
        before = tree_digest(out)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        os.replace(out, tmp / f".data.old-{dead.stdout.strip()}-00000000")  # a swap killed between its renames
        code, err = cli("build", w.build_args(out, "--seed", "2"))  # another build, without --overwrite
        kept = tree_digest(out) == before
        ok = kept and code == 2 and "already exists" in err and not litter(tmp)
        return ok, f"old output kept: {kept}; next build (no --overwrite) exit {code}", not kept

    probes.append(("builder: swap cut between its renames, then another build without --overwrite",
                   swap_killed_then_next_build))  # fmt: skip

    def kfold_killed():
        tmp = w.fresh("kfold")
        root = tmp / "cv"
        args = w.build_args(root, "--folds", "3")
        proc = start(tmp, "build", args, ("dataset_builder.writer", "check_pair", 10))  # inside fold 1 (8 scans each)
        wait_for(proc, "REACHED")
        stop(proc, signal.SIGKILL)
        fold0 = tree_digest(root / "fold-0")
        code, err = cli("build", args)  # the same command, no --overwrite
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        ok = (
            code == 0
            and names == ["fold-0", "fold-1", "fold-2", "folds.json"]
            and tree_digest(root / "fold-0") == fold0
        )
        return (
            ok,
            f"same command again: exit {code}, {names}",
            fold0 is not None and tree_digest(root / "fold-0") != fold0,
        )

    probes.append(("builder: kill -9 inside a K-fold build, then the same command", kfold_killed))

    def evaluate_sigterm():
        tmp = w.fresh("evalterm")
        args = ["--adapter", str(w.adapter), "--dataset", str(w.dataset), "--output", str(tmp / "o"), "--n-bootstrap",
                "10", "--device", "cpu"]  # fmt: skip
        proc = start(tmp, "evaluate", args, ("octsam.evaluation.compare", "_evaluate_and_write", 1))
        wait_for(proc, "REACHED")
        code, err = stop(proc, signal.SIGTERM)
        left = sorted(p.name for p in tmp.iterdir() if p.name != "hook.py")
        ok = code == 130 and "Traceback" not in err and not left
        return ok, f"exit {code}, left {left}", False

    probes.append(("evaluation: SIGTERM while writing", evaluate_sigterm))

    def read_only():
        tmp = w.fresh("readonly")
        mnt = tmp / "ro"
        mnt.mkdir()
        if shutil.which("unshare") is None:
            return None, "no unshare", False
        train = " ".join(w.train_args(mnt / "run", "--num-train-epochs", "1"))
        script = (
            f"mount -t tmpfs -o size=1m,ro tmpfs {mnt} || exit 99; "
            f"{sys.executable} -m dataset_builder {' '.join(w.build_args(mnt / 'data'))}; echo BUILD=$?; "
            f"{sys.executable} {REPO / 'train.py'} {train}; echo TRAIN=$?; "
            f"{sys.executable} {REPO / 'inference.py'} --adapter {w.adapter} --input {w.scans} --output {mnt}/pred "
            f"--quiet; echo INFER=$?"
        )
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if proc.returncode == 99:
            return None, "cannot mount a tmpfs here", False
        out = proc.stdout + proc.stderr
        codes = all(f"{k}=2" in out for k in ("BUILD", "TRAIN", "INFER"))
        ok = codes and "Traceback" not in out and out.count("read-only") == 3
        return ok, f"exit codes 2: {codes}, messages {out.count('read-only')} of 3", False

    probes.append(("read-only output folder (training, build, inference)", read_only))

    def disk_full():
        tmp = w.fresh("diskfull")
        mnt = tmp / "mnt"
        mnt.mkdir()
        if shutil.which("unshare") is None:
            return None, "no unshare", False
        fill = tmp / "fill.py"
        fill.write_text(
            textwrap.dedent("""
            import os, sys
            from octsam.training import checkpoint
            import octsam.training.loop as loop
            original = checkpoint.save_checkpoint
            def fill_after_first(*a, **k):
                path = original(*a, **k)
                if path.name == "epoch-0001":
                    with open(os.path.join(sys.argv[1], "filler"), "wb") as f:
                        try:
                            while True:
                                f.write(b"\\0" * 65536)
                                f.flush()
                        except OSError:
                            pass
                return path
            loop.save_checkpoint = fill_after_first
            from octsam.cli.train import main
            sys.exit(main(sys.argv[2:]))
        """)
        )
        train = " ".join(w.train_args(mnt / "run", *three))
        script = (
            f"mount -t tmpfs -o size=16m tmpfs {mnt} || exit 99; "
            f"{sys.executable} {fill} {mnt} {train}; echo TRAIN=$?; cp -r {mnt}/run {tmp}/saved; "
            f"{sys.executable} -m dataset_builder {' '.join(w.build_args(mnt / 'data'))}; echo BUILD=$?; "
            f"{sys.executable} {REPO / 'inference.py'} --adapter {w.adapter} --input {w.scans} --output {mnt}/pred "
            f"--quiet; echo INFER=$?; ls -a {mnt}"
        )
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if proc.returncode == 99:
            return None, "cannot mount a tmpfs here", False
        out = proc.stdout + proc.stderr
        messages = out.count("disk is full") == 3 and "Traceback" not in out
        codes = all(f"{k}=2" in out for k in ("TRAIN", "BUILD", "INFER"))
        saved = tmp / "saved"
        kept = sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["epoch-0001"]
        code, _ = cli("train", w.train_args(saved, *three, "--resume-from-checkpoint", "latest"))
        final = saved / "checkpoints/epoch-0003/trainable.safetensors"
        exact = code == 0 and same_weights(final, reference / "checkpoints/epoch-0003/trainable.safetensors")
        no_litter = ".data" not in proc.stdout and "pred" not in proc.stdout
        ok = messages and codes and kept and exact and no_litter
        return ok, f"messages {messages}, exit codes {codes}, checkpoint kept {kept}, exact resume {exact}", not kept

    probes.append(("disk full (16 MB tmpfs) in training, build and inference", disk_full))
    return probes


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bad inputs and security probes only (no faults)")
    parser.add_argument("--security", action="store_true", help="the security probes only (issue 22)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--out",
        type=Path,
        help="also write the raw output to this folder: probes.log (one line per probe, as printed), summary.txt, "
        "results.json (every probe's outcome) and env.json (CPU, versions, git commit, command, seconds)",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.NOTSET)
    root = Path(tempfile.mkdtemp(prefix="octsam-robustness-"))
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    probe_lines: list[str] = []
    summary: list[str] = []

    def report(line: str, lines: list[str]) -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        world = World(root)
        results = {"bad inputs handled cleanly": [], "faults survived": []}
        lost = []
        for name, probe in [] if args.security else bad_inputs(world):
            try:
                ok, why = probe()
            except Exception as err:  # noqa: BLE001
                ok, why = False, f"probe crashed: {type(err).__name__}: {err}"
            results["bad inputs handled cleanly"].append((name, ok, why))
            report(f"{'ok  ' if ok else 'FAIL'} {name}: {why}", probe_lines)
        results["security held"] = []
        for name, probe in security(world):
            try:
                ok, why = probe()
            except Exception as err:  # noqa: BLE001
                ok, why = False, f"probe crashed: {type(err).__name__}: {err}"
            results["security held"].append((name, ok, why))
            report(f"{'ok  ' if ok else 'FAIL'} {name}: {why}", probe_lines)
        skipped = []
        if not (args.quick or args.security):
            reference = root / "reference"
            assert cli("train", world.train_args(reference, "--num-train-epochs", "3"))[0] == 0
            for name, probe in faults(world, reference):
                try:
                    ok, why, data_lost = probe()
                except Exception as err:  # noqa: BLE001
                    ok, why, data_lost = False, f"probe crashed: {type(err).__name__}: {err}", False
                if ok is None:
                    skipped.append((name, why))
                    report(f"skip {name}: {why}", probe_lines)
                    continue
                results["faults survived"].append((name, ok, why))
                if data_lost:
                    lost.append(name)
                report(f"{'ok  ' if ok else 'FAIL'} {name}: {why}", probe_lines)
        print()
        for label, rows in results.items():
            if rows:
                report(f"{label}: {sum(ok for _, ok, _ in rows)} of {len(rows)}", summary)
        if skipped:
            report(f"skipped (no tmpfs): {len(skipped)}", summary)
        report(f"data lost: {'nowhere' if not lost else ', '.join(lost)}", summary)
        seconds = time.perf_counter() - started
        report(f"({seconds:.0f} s)", summary)
        failed = sum(not ok for rows in results.values() for _, ok, _ in rows)
        if args.out is not None:
            write_results(args.out, probe_lines, summary, results, skipped, lost, seconds, load_at_start)
        return 1 if failed or lost else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def write_results(out: Path, probe_lines, summary, results, skipped, lost, seconds: float, load_at_start) -> None:
    """The raw output of a run (``--out``): what was printed, every probe's outcome and where it ran."""
    from benchmarks.common import environment

    env = environment([Path(sys.executable).name, *sys.argv])  # before writing: git_dirty is about the code run
    out.mkdir(parents=True, exist_ok=True)
    (out / "probes.log").write_text("\n".join(probe_lines) + "\n")
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    record = {
        group: [{"probe": name, "ok": bool(ok), "detail": why} for name, ok, why in rows]
        for group, rows in results.items()
    }
    record["skipped"] = [{"probe": name, "detail": why} for name, why in skipped]
    record["data_lost"] = lost
    record["counts"] = {group: [sum(bool(ok) for _, ok, _ in rows), len(rows)] for group, rows in results.items()}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    env.update(
        {
            "seconds": round(seconds, 1),
            "loadavg_at_start": [round(x, 2) for x in load_at_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
    )
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
