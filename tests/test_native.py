"""Native-resolution mode: tiles for training, sliding-window inference, prompted windows, TTA and ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS, shape_scan

from octsam.adapter import OctSamConfig
from octsam.data.prompts import Prompt
from octsam.data.samples import SegmentationSamples
from octsam.data.tiles import TileConfig, box_window, foreground_windows, grid_windows, window_pixels
from octsam.errors import OctSamError
from octsam.models.sam import OctSamModel
from octsam.segmenter import Segmenter, average_logits


def _model(tiny_base: str, **config) -> OctSamModel:
    torch.manual_seed(0)  # PEFT draws LoRA A from the global generator: the same A for every model made here
    model = OctSamModel.from_base(OctSamConfig(labels=TINY_LABELS, base_model=tiny_base, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_grid_covers_the_scan_like_monai_and_lesion_tiles_hold_their_lesion():
    windows = grid_windows((496, 768), 256, 0.5)
    assert len(windows) == 15 and (0, 0) in windows and (240, 512) in windows  # last tiles flush with the border
    covered = np.zeros((496, 768), bool)
    for y, x in windows:
        covered[y : y + 256, x : x + 256] = True
    assert covered.all()
    assert grid_windows((100, 120), 256, 0.5) == [(0, 0)]  # smaller than a tile: one (padded) tile
    mask = np.zeros((496, 768), np.uint8)
    mask[400:410, 700:760] = 1
    ((y, x),) = foreground_windows(mask, 256)
    assert mask[y : y + 256, x : x + 256].sum() == mask.sum() and y + 256 <= 496 and x + 256 <= 768


def test_prompt_windows_contain_their_box_and_pad_outside_the_scan():
    y, x, side = box_window((700, 400, 760, 410), (496, 768), 256)
    assert side == 256 and x <= 700 and x + side >= 760 and y <= 400 and y + side >= 410 and x + side <= 768
    y, x, side = box_window((10, 10, 400, 60), (496, 768), 256)  # wider than a tile: a larger square, resized
    assert side >= 390 * 1.125 - 1 and x <= 10 and x + side >= 400
    image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    window = window_pixels(image, -5, 20, 16)
    assert window.shape == (16, 16) and (window[:5] == image.min()).all()
    assert (window[5:, :10] == image[:11, 20:30]).all()


def _split(n=3, size=(40, 48), seed=0):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = {"image": [], "mask": []}
    for _ in range(n):
        image, mask = shape_scan(rng, size)
        rows["image"].append(Image.fromarray(image))
        rows["mask"].append(Image.fromarray(mask))
    return datasets.Dataset.from_dict(
        rows, features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    )


def test_random_crops_are_native_deterministic_and_oversample_foreground():
    split = _split()
    tiles = TileConfig(size=24, crops_per_scan=4, foreground_ratio=1.0)
    data = SegmentationSamples(split, 24, 3, tiles=tiles, seed=5)
    assert len(data) == 12
    first, again = data[7], data[7]
    assert first["pixels"].shape == (1, 24, 24) and first["mask"].shape == (24, 24)
    assert torch.equal(first["pixels"], again["pixels"])  # same key, same crop (any worker, a resumed run)
    assert all((data[i]["mask"] > 0).any() for i in range(len(data)))  # every crop centred on a biomarker
    # a crop is a piece of the scan at its own pixel size (not resized)
    image = np.asarray(split[0]["image"])
    crop = data[0]["pixels"][0].numpy()
    hits = [(y, x) for y in range(40 - 23) for x in range(48 - 23) if (image[y : y + 24, x : x + 24] == crop).all()]
    assert hits


def test_grid_sampling_repeats_its_tiles_and_validation_covers_the_grid():
    split = _split()
    tiles = TileConfig(size=24, overlap=0.5, crop_sampling="grid", crops_per_scan=2, foreground_ratio=0.5)
    data = SegmentationSamples(split, 24, 3, tiles=tiles, seed=1)
    seen = {data[e * len(data) + i]["pixels"].numpy().tobytes() for e in range(6) for i in range(len(data))}
    fixed = sum(len(w) for w in data.scan_windows)
    assert len(seen) <= fixed  # only the fixed tiles ever appear: cacheable embeddings
    validation = SegmentationSamples(split, 24, 3, tiles=tiles, validation=True)
    assert len(validation) == 3 * len(grid_windows((40, 48), 24, 0.5))


def test_native_mode_on_a_tile_sized_scan_equals_the_resized_mode(tiny_base):
    """One tile covering the whole scan: the Gaussian-blended window is that tile's prediction."""
    resized = Segmenter(_model(tiny_base), device="cpu")
    native = Segmenter(_model(tiny_base, input_mode="native"), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (24, 24), dtype=np.uint8)
    a = resized.native_logits([image])[0]
    b = native.native_logits([image])[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_native_mode_segments_any_size_at_native_resolution(tiny_base):
    segmenter = Segmenter(_model(tiny_base, input_mode="native", tile_overlap=0.5), device="cpu", batch_size=3)
    rng = np.random.default_rng(0)
    images = [
        shape_scan(rng, (40, 48))[0],
        shape_scan(rng, (30, 70))[0],
        rng.integers(0, 255, (16, 20), dtype=np.uint8),
    ]
    results = segmenter(images, return_probabilities=True)
    assert [r.mask.shape for r in results] == [(40, 48), (30, 70), (16, 20)]
    assert np.allclose(results[0].probabilities.astype(np.float32).sum(0), 1, atol=1e-2)
    # a scan several tiles wide is segmented whole, at its own size
    wide = np.concatenate([images[0], images[0]], axis=1)
    left = segmenter([wide])[0].mask[:, :20]
    assert left.shape == (40, 20)


def test_prompted_native_decodes_each_prompt_in_its_window(tiny_base):
    segmenter = Segmenter(_model(tiny_base, mode="prompted", input_mode="native"), device="cpu")
    image = shape_scan(np.random.default_rng(0), (40, 96))[0]
    prompt = Prompt(label=1, box=(60.0, 5.0, 75.0, 20.0))
    logits = segmenter.native_logits([image], [[prompt]])[0]
    y, x, side = box_window(prompt.box, (40, 96), 24)
    outside = torch.ones(40, 96, dtype=torch.bool)
    outside[max(y, 0) : y + side, max(x, 0) : x + side] = False
    assert (logits[:, outside] <= -1e3).all()  # nothing outside the prompt's window
    assert (logits[0, ~outside] > -1e3).all()
    # the app's path (encode once, prompt many times) gives the same mask
    prepared = segmenter.embed(image)
    again = segmenter.segment_embedding(prepared, (40, 96), [prompt]).mask
    assert (again == segmenter([image], prompts=[[prompt]])[0].mask).all()
    assert len(prepared.windows) == 1


def test_average_logits_keeps_one_prediction_and_averages_probabilities():
    logits = torch.randn(2, 5, 6)
    for activation in ("softmax", "sigmoid"):
        assert torch.allclose(average_logits([logits, logits], activation), logits, atol=1e-4)
    a, b = torch.tensor([[[2.0]]]), torch.tensor([[[-2.0]]])
    mean = average_logits([a, b], "sigmoid")
    assert abs(torch.sigmoid(mean).item() - 0.5) < 1e-6


def test_flip_tta_and_ensembles(tiny_base, tmp_path):
    model = _model(tiny_base, input_mode="native")
    model.save_pretrained(tmp_path / "a")
    image = shape_scan(np.random.default_rng(2), (40, 48))[0]
    single = Segmenter.from_pretrained(tmp_path / "a", device="cpu", fast_attention=False)
    twice = Segmenter.from_pretrained([tmp_path / "a", tmp_path / "a"], device="cpu", fast_attention=False)
    assert torch.allclose(single.native_logits([image])[0], twice.native_logits([image])[0], atol=1e-4)
    tta = Segmenter.from_pretrained(tmp_path / "a", device="cpu", fast_attention=False, tta="flip")
    plain = single.native_logits([image])[0]
    mirrored = single.native_logits([np.ascontiguousarray(image[:, ::-1])])[0].flip(-1)
    assert torch.allclose(tta.native_logits([image])[0], average_logits([plain, mirrored], "softmax"), atol=1e-4)
    with pytest.raises(OctSamError, match="tta"):
        Segmenter(model, device="cpu", tta="rotate")
    other = _model(tiny_base)  # resize mode
    with pytest.raises(OctSamError, match="input_mode"):
        Segmenter([model, other], device="cpu")


def test_train_native_writes_an_adapter_that_segments_natively(tmp_path, shape_dataset, tiny_base):
    from octsam.cli.train import main

    out = tmp_path / "run"
    status = main([
        "--dataset", shape_dataset, "--base-model", tiny_base, "--output-dir", str(out), "--num-workers", "0",
        "--report-to", "none", "--effective-batch-size", "4", "--per-device-train-batch-size", "4",
        "--num-train-epochs", "2", "--input-mode", "native", "--tile-overlap", "0.5", "--crops-per-scan", "2",
        "--dice-weight", "0.8", "--ce-weight", "0.2", "--lr-scheduler-type", "polynomial", "--warmup-ratio", "0.2",
    ])  # fmt: skip
    assert status == 0
    config = json.loads((out / "best_adapter" / "octsam_config.json").read_text())
    assert config["input_mode"] == "native" and config["tile_overlap"] == 0.5
    results = json.loads((out / "all_results.json").read_text())
    assert results["epochs_trained"] == 2
    mask = Segmenter.from_pretrained(out / "best_adapter", device="cpu")([shape_scan(np.random.default_rng(0))[0]])
    assert mask[0].mask.shape == (40, 48)


def test_bad_native_options_are_refused(tiny_base):
    with pytest.raises(OctSamError, match="input_mode"):
        OctSamConfig(labels=TINY_LABELS, input_mode="tiles")
    with pytest.raises(OctSamError, match="tile_overlap"):
        OctSamConfig(labels=TINY_LABELS, tile_overlap=1.0)
    with pytest.raises(OctSamError, match="tile_scale"):
        OctSamConfig(labels=TINY_LABELS, tile_scale=0)
    from octsam.config import parse_config

    with pytest.raises(OctSamError, match="crop-sampling"):
        parse_config(["--dataset", "x", "--crop-sampling", "sometimes"])


def test_dynunet_baseline_trains_with_deep_supervision_and_reloads(tmp_path, shape_dataset):
    from octsam.cli.train import main
    from octsam.models import load_model
    from octsam.models.dynunet import DeepSupervision, DynUNetSegmenter, deep_supervision_weights

    assert abs(sum(deep_supervision_weights(3)) - 1) < 1e-9
    model = DynUNetSegmenter.create(TINY_LABELS, 32, [8, 16, 32, 64], seed=0)
    logits, extras = model.train()(model.preprocess(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)))
    assert logits.shape == (2, 2, 32, 32) and isinstance(extras, DeepSupervision) and len(extras.logits) == 2
    assert model.eval()(torch.zeros(1, 3, 32, 32))[1] is None  # inference: the main output only

    out = tmp_path / "dyn"
    status = main([
        "--dataset", shape_dataset, "--model", "dynunet", "--unet-image-size", "32", "--unet-channels", "8", "16",
        "32", "64", "--input-mode", "native", "--output-dir", str(out), "--num-workers", "0", "--report-to", "none",
        "--effective-batch-size", "4", "--per-device-train-batch-size", "4", "--num-train-epochs", "2",
    ])  # fmt: skip
    assert status == 0
    loaded = load_model(out / "best_adapter")
    assert isinstance(loaded, DynUNetSegmenter) and loaded.config.input_mode == "native"
    image = shape_scan(np.random.default_rng(4))[0]
    mask = Segmenter(loaded, device="cpu")([image])[0].mask
    assert mask.shape == image.shape
