"""octsam.app: the session logic, a real server driven through gradio_client, and a headless Chromium screenshot.

All offline on the CPU with the tiny random SAM adapters of test_inference.py. The browser tests need
/usr/bin/chromium (`apt-get install -y chromium`) and the Duke B-scans in ../shared/data (or OCTSAM_SHARED_DATA=DIR,
e.g. from a git worktree); they skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import numpy as np
import pytest
from conftest import DUKE_DIR, REPO_ROOT, TINY_LABELS, shape_scan
from PIL import Image
from test_inference import make_adapter

from octsam.app.loading import dataset_scans, open_local, open_uploads
from octsam.app.session import Scan, Session, new_export_folder, unique_stems
from octsam.errors import OctSamError
from octsam.segmenter import Prompt, Segmenter

CHROMIUM = Path("/usr/bin/chromium")
# The Duke B-scans (../shared/data); OCTSAM_SHARED_DATA points elsewhere, e.g. from a git worktree.
DUKE = Path(os.environ["OCTSAM_SHARED_DATA"]) / "duke_dme_fluid" if "OCTSAM_SHARED_DATA" in os.environ else DUKE_DIR


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "auto")


@pytest.fixture(scope="module")
def prompted_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "prompted", mode="prompted", seed=1)


@pytest.fixture(scope="module")
def segmenter(adapter) -> Segmenter:
    return Segmenter.from_pretrained(adapter, device="cpu")


@pytest.fixture(scope="module")
def prompted_segmenter(prompted_adapter) -> Segmenter:
    return Segmenter.from_pretrained(prompted_adapter, device="cpu")


def scans(n: int = 3) -> list[Scan]:
    rng = np.random.default_rng(0)
    return [Scan(f"scan{i}.png", shape_scan(rng)[0]) for i in range(n)]


def session_with(segmenter, n: int = 3) -> Session:
    session = Session(segmenter)
    session.add_scans(scans(n))
    return session


# ------------------------------------------------------------------------------------------ Segmenter additions
@pytest.mark.parametrize("mode", ["automatic", "prompted"])
def test_segment_embedding_equals_a_full_call(mode, segmenter, prompted_segmenter):
    seg = segmenter if mode == "automatic" else prompted_segmenter
    image = scans(1)[0].image
    prompts = [Prompt(1, box=(5, 5, 20, 20), points=[(10, 10, 1)]), Prompt(2, points=[(30, 30, 1), (5, 30, 0)])]
    embedding = seg.embed(image)
    assert embedding.shape[0] == 1
    got = seg.segment_embedding(embedding, image.shape, prompts).mask
    np.testing.assert_array_equal(got, seg([image], prompts=[prompts])[0].mask)
    if mode == "automatic":
        np.testing.assert_array_equal(seg.segment_embedding(embedding, image.shape).mask, seg([image])[0].mask)
    else:
        with pytest.raises(OctSamError, match="prompted mode"):
            seg.segment_embedding(embedding, image.shape)


# ------------------------------------------------------------------------------------------ session logic
def test_clicks_reuse_the_cached_embedding(segmenter, monkeypatch):
    session = session_with(segmenter)
    calls = []
    embed = segmenter.embed
    monkeypatch.setattr(segmenter, "embed", lambda image: calls.append(1) or embed(image))
    session.click("point +", 1, 12, 10)
    session.click("point -", 1, 30, 30)
    session.click("point +", 2, 35, 30)
    assert len(calls) == 1  # one encoding, three decodes
    assert session.timings["click_s"] < 5
    entry = session.prompts[0][1]
    assert entry["points"] == [(12.0, 10.0, 1), (30.0, 30.0, 0)]
    region1 = segmenter.segment_embedding(session.embeddings[0], session.shape, session.class_prompts(1)).mask == 1
    region2 = segmenter.segment_embedding(session.embeddings[0], session.shape, session.class_prompts(2)).mask == 2
    np.testing.assert_array_equal(session.mask() == 2, region2)  # the latest prompted class wins where they meet
    np.testing.assert_array_equal(session.mask() == 1, region1 & ~region2)
    session.go_to(1)
    session.click("point +", 1, 12, 10)
    assert len(calls) == 2  # another B-scan: encoded once


def test_box_takes_two_clicks_and_replaces_the_class(segmenter):
    session = session_with(segmenter)
    message = session.click("box", 2, 40, 36)
    assert "first corner" in message and session.prompts.get(0, {}).get(2) is None
    session.click("box", 2, 26, 22)
    assert session.prompts[0][2]["box"] == (26.0, 22.0, 40.0, 36.0)  # corners ordered
    embedding = session.embedding()
    region = segmenter.segment_embedding(embedding, session.shape, [Prompt(2, box=(26, 22, 40, 36))]).mask == 2
    np.testing.assert_array_equal(session.mask() == 2, region)
    with pytest.raises(OctSamError, match="empty"):
        session.set_box(2, (5, 5, 5, 9))


def test_brush_eraser_undo(segmenter):
    session = session_with(segmenter)
    session.paint(1, 10, 10, 3)
    yy, xx = np.ogrid[:40, :48]
    disc = (yy - 10) ** 2 + (xx - 10) ** 2 <= 9
    np.testing.assert_array_equal(session.mask() == 1, disc)
    session.paint(2, 14, 10, 2)  # overlaps: the brush wins
    assert session.mask()[10, 13] == 2
    before = session.mask().copy()
    session.click("eraser", 1, 10, 10, radius=10)  # erases class 1 only
    assert not (session.mask() == 1).any() and (session.mask() == 2).sum() == (before == 2).sum()
    assert session.undo()
    np.testing.assert_array_equal(session.mask(), before)
    assert session.undo() and session.undo()
    assert 0 not in session.masks  # back to 'never touched': not exported
    assert not session.undo()


def test_undo_restores_prompts_and_segment_clears_them(segmenter):
    session = session_with(segmenter)
    session.segment()
    auto = session.mask().copy()
    np.testing.assert_array_equal(auto, segmenter([session.scan.image])[0].mask)
    session.click("point +", 1, 12, 10)
    session.undo()
    assert session.prompts[0] == {}
    np.testing.assert_array_equal(session.mask(), auto)
    session.click("point +", 1, 12, 10)
    session.segment()
    assert session.prompts[0] == {}


def test_errors_are_octsam_errors(segmenter, prompted_segmenter):
    session = Session(segmenter)
    with pytest.raises(OctSamError, match="Open a B-scan"):
        session.scan  # noqa: B018
    session.add_scans(scans(1))
    with pytest.raises(OctSamError, match="outside"):
        session.click("brush", 1, 100, 5)
    with pytest.raises(OctSamError, match="not one of"):
        session.click("brush", 3, 1, 1)
    with pytest.raises(OctSamError, match="Unknown tool"):
        session.click("lasso", 1, 1, 1)
    with pytest.raises(OctSamError, match="Nothing to export"):
        session.export("/nonexistent-never-created")
    prompted = session_with(prompted_segmenter, 1)
    with pytest.raises(OctSamError, match="prompted mode"):
        prompted.segment()


def test_render_visibility_and_opacity(segmenter):
    session = session_with(segmenter, 1)
    session.paint(1, 10, 10, 4)
    session.paint(2, 30, 30, 4)
    image = np.repeat(session.scan.image[..., None], 3, axis=2)
    full = session.render([1, 2], 0.5)
    assert (full[10, 10] != image[10, 10]).any() and (full[30, 30] != image[30, 30]).any()
    only1 = session.render([1], 0.5)
    np.testing.assert_array_equal(only1[30, 30], image[30, 30])  # class 2 hidden
    np.testing.assert_array_equal(session.render([1, 2], 0.0), image)  # opacity 0: the plain B-scan
    assert full[10, 10, 0] > full[10, 10, 1]  # class 1 is red (octsam.evaluation.plots colours)


def test_areas_in_px_and_mm2(segmenter):
    session = session_with(segmenter, 1)
    session.paint(1, 10, 10, 3)
    rows = session.areas((0.004, 0.01))
    assert rows[0] == {"class": "drusen", "area_px": 29, "area_mm2": pytest.approx(29 * 0.00004), "components": 1}
    assert rows[1]["area_px"] == 0 and session.areas()[0]["area_mm2"] is None
    session.scans[0].spacing_mm = (0.002, 0.002)  # a volume's own spacing is used when none is typed
    assert session.areas()[0]["area_mm2"] == pytest.approx(29 * 4e-6)


def test_export_is_never_overwritten_and_dataset_builder_reads_it(segmenter, tmp_path):
    from dataset_builder.folder import build_folder
    from octsam.data import load_oct_dataset

    session = session_with(segmenter, 4)
    expected = {}
    for i in range(3):  # the 4th B-scan is only looked at: it has no mask and is not exported
        session.go_to(i)
        session.segment()
        session.paint(2, 5 + i, 5, 2)
        expected[f"scan{i}"] = session.mask().copy()
    session.go_to(3)
    first = session.export(tmp_path / "exports", spacing_mm=(0.004, 0.01))
    second = session.export(tmp_path / "exports")
    assert first.name == "export-001" and second.name == "export-002"
    assert sorted(p.name for p in (first / "masks").iterdir()) == ["scan0.png", "scan1.png", "scan2.png"]
    for stem, mask in expected.items():
        np.testing.assert_array_equal(np.asarray(Image.open(first / "masks" / f"{stem}.png")), mask)
        assert (first / "overlays" / f"{stem}.png").is_file()
    assert json.loads((first / "labels.json").read_text()) == {str(i): n for i, n in enumerate(TINY_LABELS)}
    report = (first / "report.csv").read_text().splitlines()
    assert report[0].startswith("scan,source,height,width,pixel_spacing_mm,drusen_area_px,drusen_area_mm2")
    assert len(report) == 4 and "0.004,0.01" in report[1]
    assert "python -m dataset_builder folder" in (first / "README.txt").read_text()
    result = build_folder(first / "images", first / "masks", tmp_path / "ds", labels=",".join(TINY_LABELS))
    dsd, labels = load_oct_dataset(tmp_path / "ds")
    assert labels == TINY_LABELS and result is not None
    got = {row["scan_id"]: np.asarray(row["mask"]) for split in dsd.values() for row in split}
    assert set(got) == set(expected)
    for stem, mask in expected.items():
        np.testing.assert_array_equal(got[stem], mask)


def test_new_export_folder_and_stems(tmp_path):
    (tmp_path / "export-007").mkdir()
    (tmp_path / "export-007" / "keep.txt").write_text("mine")
    assert new_export_folder(tmp_path).name == "export-008"
    assert (tmp_path / "export-007" / "keep.txt").read_text() == "mine"
    assert unique_stems(["a.png", "dir/a.tif", "../../etc/passwd", "x y.PNG"]) == ["a", "a_2", "passwd", "x_y"]


def test_open_uploads_reads_only_the_upload_folder(tmp_path, monkeypatch):
    import octsam.app.loading as loading

    monkeypatch.setattr(loading, "volume_support", lambda: None)  # as where octsam.volumes is missing
    root = tmp_path / "uploads"
    (root / "h1").mkdir(parents=True)
    image = scans(1)[0].image
    Image.fromarray(image).save(root / "h1" / "b.png")
    (root / "h1" / "notes.txt").write_text("not an image")
    (root / "h1" / "broken.png").write_bytes(b"\x89PNG broken")
    outside = tmp_path / "secret.png"
    Image.fromarray(image).save(outside)
    got, volumes, problems = open_uploads(
        [
            root / "h1" / "b.png",
            root / "h1" / "notes.txt",
            root / "h1" / "broken.png",
            outside,
            root / "h1/../../secret.png",
        ],
        root,
    )
    assert [s.name for s in got] == ["b.png"] and volumes == []
    np.testing.assert_array_equal(got[0].image, image)
    text = " | ".join(problems)
    assert len(problems) == 4 and "notes.txt: not an image" in text and "broken.png" in text
    assert text.count("not in the app's upload folder") == 2
    assert str(tmp_path) not in text  # no server paths in the page


def test_open_local_and_dataset_split(shape_dataset, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for s in scans(2):
        Image.fromarray(s.image).save(folder / s.name)
    got, _ = open_local([folder])
    assert [s.name for s in got] == ["scan0.png", "scan1.png"]
    with pytest.raises(OctSamError, match="no such file"):
        open_local([tmp_path / "missing"])
    split = dataset_scans(shape_dataset, "test", list(TINY_LABELS))
    assert len(split) == 4 and split[0].image.shape == (40, 48)
    with pytest.raises(OctSamError, match="lacks scar"):
        dataset_scans(shape_dataset, "test", ["background", "drusen", "scar"])
    with pytest.raises(OctSamError, match="no split"):
        dataset_scans(shape_dataset, "nope", list(TINY_LABELS))


def test_volume_scans_with_localizer(segmenter, monkeypatch, tmp_path):
    """With octsam.volumes present, a volume upload gives one Scan per B-scan and the localiser line moves."""
    from types import SimpleNamespace

    import octsam.app.loading as loading

    bscans = [scans(1)[0].image for _ in range(3)]
    positions = np.array([[[2, 5 + 5 * i], [60, 5 + 5 * i]] for i in range(3)], float)
    vol = SimpleNamespace(
        volume_id="eye1",
        bscans=bscans,
        n_bscans=3,
        pixel_spacing=(0.0039, 0.0114),
        bscan_spacing=0.12,
        localizer=np.full((30, 64), 80, np.uint8),
        bscan_positions=positions,
    )
    fake = SimpleNamespace(is_volume_input=lambda p: p.suffix == ".vol", read_volume=lambda p: [vol])
    monkeypatch.setattr(loading, "volume_support", lambda: fake)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "eye.vol").write_bytes(b"x")
    got, infos, problems = open_uploads([tmp_path / "h" / "eye.vol"], tmp_path)
    assert problems == [] and [s.name for s in got] == ["eye1_b000", "eye1_b001", "eye1_b002"]
    session = Session(segmenter)
    session.add_scans(got, infos)
    session.go_to(1)
    loc = session.localizer_view()
    assert tuple(loc[10, 30]) == (0, 255, 0) and tuple(loc[5, 30]) != (0, 255, 0)
    session.paint(1, 10, 10, 3)
    assert session.areas()[0]["area_mm2"] == pytest.approx(29 * 0.0039 * 0.0114)
    assert session.volume_measures() == (
        f"volume eye1 (1/3 B-scans with a mask): drusen {29 * 0.0039 * 0.0114 * 0.12:.4g} mm³, fluid 0 mm³"
    )
    out = session.export(tmp_path / "exports")
    rows = (out / "volumes.csv").read_text().splitlines()
    assert rows[0] == "volume,bscans,bscans_with_mask,drusen_mm3,fluid_mm3"
    assert rows[1] == f"eye1,3,1,{29 * 0.0039 * 0.0114 * 0.12:.6g},0"


def test_page_handlers_turn_bad_uploads_and_clicks_into_page_messages(segmenter, tmp_path):
    """The page's own handlers, called as Gradio calls them: a text file renamed .png, an empty file, a 100000 x 10
    strip, a .mhd alone whose data file lies outside, and clicks outside the B-scan or with an odd position each
    give a message in the status box (and no exception, so no Gradio error); a good B-scan still opens after them."""
    import types

    pytest.importorskip("gradio")
    from octsam.app.ui import AppConfig, build_app

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "text.png").write_text("not an image")
    (uploads / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((10, 100_000), np.uint8)).save(uploads / "strip.png")
    (uploads / "alone.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\nElementDataFile = /etc/hostname\n"
    )
    Image.fromarray(shape_scan(np.random.default_rng(0))[0]).save(uploads / "good.png")
    demo = build_app(AppConfig({"tiny": segmenter}, tmp_path / "exports", upload_root=uploads))
    handlers = {f.api_name: f.fn for f in demo.fns.values() if isinstance(f.api_name, str)}
    on_select = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_select")
    view = [[1, 2], 0.45, None, None]  # shown classes, opacity, spacing y / x
    for name, expected in [
        ("text.png", "text.png"),
        ("empty.png", "empty.png"),
        ("strip.png", "MAX_SCAN_ASPECT"),
        ("alone.mhd", "does not open"),
    ]:
        out = handlers["open"](None, [str(uploads / name)], *view)
        assert "not opened" in out[2] and expected in out[2], out[2]
    session = handlers["open"](None, [str(uploads / "good.png")], *view)[0]
    assert len(session.scans) == 1
    for x, y in [(-5, 3), (1000, 1000), (float("nan"), 3), ("a", 2)]:
        out = handlers["apply"](session, "point +", 1, x, y, 6, *view)
        assert out[2].startswith("B-scan 1/1") and "⚠" in out[2], out[2]
    for index in [[-3, 5], [480, 2], 5, [7], ["a", "b"], None]:
        out = on_select(session, "point +", 1, 6, *view, types.SimpleNamespace(index=index))
        assert "⚠" in out[2] and ("outside" in out[2] or "click position" in out[2].lower()), (index, out[2])
    assert session.prompts.get(0, {}) == {} and 0 not in session.masks  # no bad click left a prompt
    out = handlers["apply"](None, "point +", 1, 3, 3, 6, *view)
    assert "Open a B-scan first" in out[2]


def test_cli_errors_are_messages_not_tracebacks(adapter, tmp_path, capsys):
    from octsam.app.__main__ import main

    assert main(["--adapter", str(tmp_path / "no-such-adapter")]) == 2
    err = capsys.readouterr().err
    assert "octsam-app:" in err and "Traceback" not in err
    assert main(["--adapter", str(adapter), "--open", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_opens_a_dataset_split(adapter, shape_dataset):
    from octsam.app.__main__ import load, parse_args

    config = load(
        parse_args(["--adapter", str(adapter), "--dataset", shape_dataset, "--device", "cpu", "--limit", "3"])
    )
    assert [s.name for s in config.initial_scans] == ["test-0", "test-1", "test-2"]
    assert config.dataset_labels == TINY_LABELS and "opened 3 of" in config.initial_message


def test_cli_binds_localhost_by_default():
    from octsam.app.__main__ import parse_args

    args = parse_args(["--adapter", "x"])
    assert args.host == "127.0.0.1" and not args.share


# ------------------------------------------------------------------------------------------ a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.fixture(scope="module")
def server(adapter, prompted_adapter, tmp_path_factory):
    """The app as a user starts it (python -m octsam.app) on a free local port, in a subprocess."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "octsam.app", "--adapter", str(adapter), "--adapter", str(prompted_adapter)]
    cmd += ["--port", str(port), "--export-dir", str(root / "exports"), "--device", "cpu", "--max-file-size", "1mb"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, 120)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow  # starting the server takes ~20 s on 2 cores
def test_server_open_segment_prompt_correct_export(server, segmenter, prompted_adapter, tmp_path):
    from gradio_client import Client, handle_file

    url, root = server
    client = Client(url, verbose=False)
    view = ([1, 2], 0.45, None, None)  # visible classes, opacity, spacing (axial, lateral)
    rng = np.random.default_rng(0)
    image = shape_scan(rng)[0]
    Image.fromarray(image).save(tmp_path / "bscan.png")
    (tmp_path / "notes.txt").write_text("no image")

    out = client.predict(
        [handle_file(tmp_path / "bscan.png"), handle_file(tmp_path / "notes.txt")], *view, api_name="/open"
    )
    assert "opened 1 B-scan" in out[1] and "notes.txt: not an image" in out[1] and "Traceback" not in out[1]

    start = time.perf_counter()
    out = client.predict(*view, api_name="/segment")
    segment_s = time.perf_counter() - start
    assert "segmented in" in out[1]
    shown = np.asarray(Image.open(out[0]).convert("RGB"))
    assert shown.shape == (40, 48, 3)

    # Expected result, computed here with the same adapter and the same steps.
    local = Session(segmenter)
    local.add_scans([Scan("bscan.png", image)])
    local.segment()
    np.testing.assert_array_equal(shown, local.render([1, 2], 0.45))

    steps = [("point +", 1, 12, 10, 6), ("box", 2, 26, 22, 6), ("box", 2, 40, 36, 6), ("brush", 1, 5, 35, 3)]
    steps += [("eraser", 2, 33, 30, 2)]
    click_s = []
    for tool, label, x, y, radius in steps:
        start = time.perf_counter()
        out = client.predict(tool, label, x, y, radius, *view, api_name="/apply")
        click_s.append(time.perf_counter() - start)
        assert "⚠" not in out[1], out[1]
        local.click(tool, label, x, y, radius)
    assert "last click" in out[2]
    out = client.predict("brush", 2, 20, 20, 4, *view, api_name="/apply")
    out = client.predict(*view, api_name="/undo")
    assert "undone" in out[1]
    out = client.predict("brush", 1, 500, 5, 4, *view, api_name="/apply")
    assert "outside the B-scan" in out[1]  # a message, and the server keeps going
    out = client.predict([handle_file(tmp_path / "notes.txt")], *view, api_name="/open")
    assert "not an image" in out[1] and "B-scan 1/1" in out[1]  # the open B-scan stays

    areas = client.predict(0, [1, 2], 0.45, 0.004, 0.01, api_name="/goto")[3]  # spacing typed in
    rows = {r[0]: r for r in areas["data"]}
    assert rows["drusen"][1] == int((local.mask() == 1).sum())
    assert rows["drusen"][2] == pytest.approx(rows["drusen"][1] * 0.004 * 0.01, rel=1e-4)

    folder, archive = client.predict(0.004, 0.01, api_name="/export")
    folder2, _ = client.predict(None, None, api_name="/export")
    assert Path(folder).parent == root / "exports" and Path(folder2).name == "export-002"
    exported = np.asarray(Image.open(Path(folder) / "masks" / "bscan.png"))
    np.testing.assert_array_equal(exported, local.mask())
    assert (exported == 1).any() and (exported == 2).any()
    assert archive and Path(archive).is_file()

    # Bad adapter ids are a message in the page; a local path typed in the browser is never loaded.
    out = client.predict("no-such-org/no-such-adapter", *view, api_name="/adapter")
    assert "no-such-org/no-such-adapter" in out[1] and "⚠" in out[1]
    out = client.predict("/etc", *view, api_name="/adapter")
    assert "⚠" in out[1] and "Hub repo id" in out[1]
    # The prompted adapter: segmenting needs prompts (a message); a click works.
    out = client.predict(str(prompted_adapter), *view, api_name="/adapter")
    assert "prompted mode" in out[1] and "⚠" not in out[1]
    out = client.predict(*view, api_name="/segment")
    assert "⚠" in out[1] and "prompted mode" in out[1]
    out = client.predict("point +", 1, 12, 10, 6, *view, api_name="/apply")
    assert "drusen:" in out[1] and "⚠" not in out[1]
    print(
        f"\nserver timings (client round trip): segment {1000 * segment_s:.0f} ms, clicks {[round(1000 * c) for c in click_s]} ms"
    )


@pytest.mark.slow  # starting the server takes ~20 s on 2 cores
def test_server_rejects_large_uploads(server, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = server
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1_000_000
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="(?i)size|large|exceed") as info:
        client.predict([handle_file(big)], [1, 2], 0.45, None, None, api_name="/open")
    assert "maximum file size" in str(info.value)  # gradio_client checks first; the server checks too:
    import httpx

    with open(big, "rb") as f:
        response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=30)
    assert response.status_code == 413, response.text
    with open(tmp_path / "small.png", "wb") as f:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(f)
    with open(tmp_path / "small.png", "rb") as f:
        response = httpx.post(url + "gradio_api/upload", files={"files": ("small.png", f, "image/png")}, timeout=30)
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------ a real browser
@contextlib.contextmanager
def duke_app(adapter, tmp_path):
    """``python -m octsam.app`` on the first Duke B-scan (segmented at start) on a free port; yields its URL."""
    scan = sorted((DUKE / "images").glob("*.png"))[0]
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "octsam.app", "--adapter", str(adapter), "--open", str(scan), "--auto-segment"]
    cmd += ["--port", str(port), "--export-dir", str(tmp_path / "exports"), "--device", "cpu"]
    url = f"http://127.0.0.1:{port}/"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(url, 120)
            yield url
        finally:
            proc.terminate()
            proc.wait(20)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
@pytest.mark.skipif(not (DUKE / "images").is_dir(), reason=f"Duke B-scans not found at {DUKE}")
def test_chromium_shows_overlay_and_legend(adapter, tmp_path):
    chrome = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    chrome += ["--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
    chrome += ["--window-size=1600,1000", "--virtual-time-budget=15000"]
    with duke_app(adapter, tmp_path) as url:
        shot = tmp_path / "app.png"
        run = subprocess.run(
            [*chrome, f"--user-data-dir={tmp_path / 'chrome1'}", f"--screenshot={shot}", url],
            capture_output=True,
            timeout=120,
        )
        assert shot.is_file(), run.stderr.decode()[-2000:]
        dom = subprocess.run(
            [*chrome, f"--user-data-dir={tmp_path / 'chrome2'}", "--dump-dom", url], capture_output=True, timeout=120
        ).stdout.decode()
    # DOM: the legend with the adapter's label names, the B-scan view holding an image, the timing line.
    assert 'id="octsam-legend-items"' in dom
    for name in TINY_LABELS[1:]:
        assert name in dom
    view = dom[dom.index('id="octsam-view"') :][:4000]
    assert "<img" in view
    assert "segmented in" in dom
    # Pixels: the page shows class colours (red drusen / blue fluid over a grey B-scan) somewhere.
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    reddish = (r > 120) & (r > g + 60) & (r > b + 60)
    bluish = (b > 120) & (b > r + 60) & (b > g + 60)
    assert reddish.sum() > 200 and bluish.sum() > 200, (reddish.sum(), bluish.sum())
    keep = os.environ.get("OCTSAM_APP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


class Chrome:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ending
    in NUL on fds 3/4), so no websocket library is needed."""

    def __init__(self, user_data_dir: Path, width: int = 1600, height: int = 1000):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        args += ["--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
        args += [f"--window-size={width},{height}", f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe"]
        shell = " ".join(args) + f" 3<&{to_chrome_r} 4>&{from_chrome_w}"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + shell],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.session = None

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            import select

            ready, _, _ = select.select([self._from_chrome], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self._buffer += chunk
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_js(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(expression)

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_image(self, x: float, y: float, selector: str = "#octsam-view img", seconds: float = 60) -> None:
        """Click at (x, y) once the element there is the loaded image, on two checks in a row. Gradio covers the
        whole page with a translucent loading overlay while an event runs; a click on it is lost (a CI failure)."""
        probe = (
            f"(() => {{ const e = document.elementFromPoint({x}, {y}); const img = document.querySelector('{selector}');"
            " return !!img && e === img && img.complete && img.naturalWidth > 0; })()"
        )
        deadline, hits = time.monotonic() + seconds, 0
        while hits < 2:
            hits = hits + 1 if self.js(probe) else 0
            if time.monotonic() > deadline:
                top = self.js(
                    f"(() => {{ const e = document.elementFromPoint({x}, {y}); return e ? e.outerHTML.slice(0, 300) : null; }})()"
                )
                raise TimeoutError(f"the image at ({x:.0f}, {y:.0f}) stayed covered by: {top}")
            time.sleep(0.25)
        self.click(x, y)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


STATUS_JS = "document.querySelector('#octsam-status textarea')?.value || ''"
IMG_RECT_JS = (
    "(() => { const r = document.querySelector('#octsam-view img')?.getBoundingClientRect();"
    " return r && r.width > 0 ? [r.x, r.y, r.width, r.height] : null; })()"
)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
@pytest.mark.skipif(not (DUKE / "images").is_dir(), reason=f"Duke B-scans not found at {DUKE}")
def test_chromium_clicks_prompt_and_paint(adapter, tmp_path):
    """Real mouse clicks on the B-scan in a real browser: a point prompt, then a brush stroke, then undo."""
    with duke_app(adapter, tmp_path) as url:
        chrome = Chrome(tmp_path / "chrome")
        try:
            chrome.open(url)
            x, y, w, h = chrome.wait_js(IMG_RECT_JS)
            assert "segmented in" in chrome.wait_js(STATUS_JS)
            chrome.click_image(x + w * 0.5, y + h * 0.5)  # tool 'point +', class 1 (the defaults)
            status = chrome.wait_js(f"(() => {{ const s = {STATUS_JS}; return s.includes('inside') ? s : ''; }})()")
            assert "drusen:" in status and "1 inside / 0 outside point(s)" in status
            assert "last click" in chrome.js("document.querySelector('#octsam-timing').innerText")
            chrome.js("[...document.querySelectorAll('label')].find(l => l.innerText.trim() == 'brush').click()")
            time.sleep(0.5)  # the radio's change reaches the page before the click
            chrome.click_image(x + w * 0.25, y + h * 0.25)
            status = chrome.wait_js(f"(() => {{ const s = {STATUS_JS}; return s.includes('painted') ? s : ''; }})()")
            # The click landed on the B-scan pixel under the mouse: a quarter of the way in (768 x 496 Duke B-scan).
            import re

            px, py = map(int, re.search(r"painted \d+ px of drusen at \((\d+), (\d+)\)", status).groups())
            assert abs(px - 192) <= 2 and abs(py - 124) <= 2, status
            chrome.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() == 'Undo').click()")
            assert chrome.wait_js(f"(() => {{ const s = {STATUS_JS}; return s.includes('undone') ? s : ''; }})()")
            chrome.screenshot(tmp_path / "clicked.png")
            keep = os.environ.get("OCTSAM_APP_CLICK_SCREENSHOT")
            if keep:
                shutil.copy(tmp_path / "clicked.png", keep)
        finally:
            chrome.close()
