"""octsam.colors and octsam.evaluation.plots: fixed colours, overlays, and every figure written as a non-empty PNG of the expected size."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from octsam.colors import class_color, overlay
from octsam.errors import OctSamError
from octsam.evaluation.metrics import evaluate_predictions
from octsam.evaluation.plots import (
    choose_cases,
    legend_handles,
    plot_confusion_matrix,
    plot_metric_bars,
    plot_qualitative_grid,
    plot_training_curves,
)

LABELS = ["background", "drusen", "scar", "fluid"]


def _png(path, size=None):
    """Open a written figure; check it is a real picture (not blank) and, when given, its pixel size."""
    assert path.exists() and path.stat().st_size > 5_000
    image = np.asarray(Image.open(path).convert("RGB"))
    if size is not None:
        assert (image.shape[1], image.shape[0]) == size
    assert image.std() > 5 and len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    return image


def test_class_colors_are_fixed_and_distinct():
    assert class_color(0) == (0, 0, 0)
    assert class_color(1) == (255, 0, 0)
    assert class_color(2) == (0, 255, 0)
    assert class_color(3) == (0, 0, 255)
    assert class_color(255) == (128, 128, 128)
    colors = [class_color(i) for i in range(40)]
    assert len(set(colors)) == 40
    assert all(all(0 <= c <= 255 for c in color) for color in colors)
    with pytest.raises(OctSamError):
        class_color(-1)
    handles = legend_handles(LABELS)
    assert [h.get_label() for h in handles] == LABELS[1:]
    assert tuple(round(255 * c) for c in handles[0].get_facecolor()[:3]) == (255, 0, 0)


def test_overlay_colours_regions_and_keeps_background():
    image = np.full((20, 30), 100, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:15] = 1
    mask[0, :] = 255
    out = overlay(image, mask, LABELS, alpha=0.5)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[18, 20], [100, 100, 100])  # background untouched
    np.testing.assert_array_equal(out[10, 10], [178, 50, 50])  # interior: 50% red over grey 100
    np.testing.assert_array_equal(out[5, 10], [255, 0, 0])  # region border drawn in full colour
    np.testing.assert_array_equal(out[0, 10], [114, 114, 114])  # ignored: grey tint, no outline
    rgb = np.dstack([image, image, image])
    np.testing.assert_array_equal(overlay(rgb, mask, LABELS, alpha=0.5), out)
    with pytest.raises(OctSamError, match="does not match"):
        overlay(image, mask[:10], LABELS)
    with pytest.raises(OctSamError, match="class indices"):
        overlay(image, np.full((20, 30), 7, np.uint8), LABELS)


def _per_class(base, rng):
    values = np.clip(base + rng.normal(0, 0.05, 3), 0.05, 0.95)
    return pd.DataFrame(
        {
            "class_name": LABELS[1:],
            "iou_mean": values * 0.9,
            "iou_ci_low": values * 0.9 - 0.05,
            "iou_ci_high": values * 0.9 + 0.04,
            "dice_mean": values,
            "dice_ci_low": values - 0.05,
            "dice_ci_high": values + 0.04,
        }
    )


def test_metric_bars_from_tables_and_results(tmp_path):
    rng = np.random.default_rng(0)
    tables = {"zero-shot": _per_class(0.3, rng), "LoRA": _per_class(0.85, rng), "U-Net": _per_class(0.75, rng)}
    path = plot_metric_bars(tables, tmp_path / "bars.png", figsize=(8, 6), dpi=100)
    _png(path, (800, 600))
    ref = np.zeros((16, 16), np.uint8)
    ref[4:9, 4:9] = 1
    ref[10:14, 2:6] = 2
    result = evaluate_predictions([ref, np.roll(ref, 1, axis=1)], [ref, ref], LABELS, n_bootstrap=20)
    path = plot_metric_bars({"LoRA": result}, tmp_path / "sub" / "bars_result.png", dpi=80)
    _png(path)
    with pytest.raises(OctSamError):
        plot_metric_bars({}, tmp_path / "none.png")


def _nothing_at_the_edges(path):
    """Clipped text or legend entries run into the border of the PNG; a figure that fits leaves it white."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])  # fmt: skip
    assert (border >= 250).all(), f"{path.name}: something is drawn at the figure border (clipped)"


@pytest.fixture
def figures(monkeypatch):
    """The Figure objects the plotting functions save, drawn, for checks on their texts."""
    import octsam.evaluation.plots

    saved, save = [], octsam.evaluation.plots._save

    def keep(fig, path):
        fig.canvas.draw()
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(octsam.evaluation.plots, "_save", keep)
    return saved


def _inside(fig, artist):
    box, frame = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


@pytest.mark.parametrize(("n_classes", "n_methods"), [(1, 1), (1, 4), (3, 1)])
def test_metric_bars_title_and_legend_fit_a_narrow_figure(tmp_path, figures, n_classes, n_methods):
    """One class (or one method) gives the narrowest figure: the title wraps and the legend takes fewer columns."""
    rng = np.random.default_rng(0)
    names = ["zero-shot (random base, GT boxes)", "SAM + LoRA (small random base)", "U-Net (MONAI, 128 x 128)",
             "SAM + LoRA prompted"]  # fmt: skip
    tables = {name: _per_class(0.2 + 0.15 * i, rng).head(n_classes) for i, name in enumerate(names[:n_methods])}
    path = plot_metric_bars(tables, tmp_path / "bars.png", dpi=80)
    _png(path, (440, 592))  # the default size is unchanged: 5.5 x 7.4 inches, the narrowest
    _nothing_at_the_edges(path)
    fig = figures[-1]
    assert fig.get_suptitle() == (
        "Per-class segmentation quality\n(error bars: 95% CI, bootstrap over patients)"
    )  # too wide for one line: broken before the parenthesis
    assert len(fig.legends) == 1 and _inside(fig, fig._suptitle) and _inside(fig, fig.legends[0])
    long_title = "IoU and Dice per class for a deliberately long custom title on the test split of the Duke DME data"
    path = plot_metric_bars(tables, tmp_path / "custom.png", title=long_title, dpi=80)
    _nothing_at_the_edges(path)
    fig = figures[-1]
    assert fig.get_suptitle().replace("\n", " ") == long_title and fig.get_suptitle().count("\n") >= 1
    assert _inside(fig, fig._suptitle)


def test_metric_bars_wide_figure_keeps_one_line_title(tmp_path, figures):
    rng = np.random.default_rng(0)
    tables = {"zero-shot": _per_class(0.3, rng), "LoRA": _per_class(0.85, rng), "U-Net": _per_class(0.75, rng)}
    _nothing_at_the_edges(plot_metric_bars(tables, tmp_path / "bars.png", dpi=80))
    assert figures[-1].get_suptitle() == "Per-class segmentation quality (error bars: 95% CI, bootstrap over patients)"
    assert figures[-1].legends[0]._ncols == 3


def test_choose_cases_skips_nan():
    assert choose_cases([0.5, np.nan, 0.9, 0.1, 0.7]) == {"best": 2, "median": 0, "worst": 3}
    assert choose_cases([np.nan, np.nan]) == {"best": 0, "median": 1, "worst": 1}


def test_qualitative_grid(tmp_path):
    rng = np.random.default_rng(0)
    images, refs = [], []
    for _ in range(5):
        image = (rng.random((62, 96)) * 120 + np.linspace(0, 100, 96)).astype(np.uint8)
        ref = np.zeros((62, 96), np.uint8)
        y, x = rng.integers(5, 40, 2)
        ref[y : y + 12, x : x + 20] = rng.integers(1, 4)
        images.append(image)
        refs.append(ref)
    preds = {"zero-shot": [np.roll(r, 6, axis=1) for r in refs], "LoRA": [np.roll(r, 1, axis=0) for r in refs]}
    scores = {"zero-shot": [0.2, 0.3, np.nan, 0.1, 0.4], "LoRA": [0.8, 0.95, 0.7, np.nan, 0.6]}
    path = plot_qualitative_grid(
        images,
        refs,
        preds,
        LABELS,
        tmp_path / "grid.png",
        scores=scores,
        rank_by="LoRA",
        scan_ids=list("abcde"),
        dpi=60,
    )
    image = _png(path)
    assert image.shape[1] == round((3.2 * 4 + 0.4) * 60)  # four columns: B-scan, ground truth, two methods
    assert image.shape[0] > image.shape[1] / 4 * 3 * 0.5  # three case rows
    path = plot_qualitative_grid(images, refs, preds, LABELS, tmp_path / "grid2.png", cases={"picked": 2}, dpi=50)
    _png(path)
    with pytest.raises(OctSamError, match="cases"):
        plot_qualitative_grid(images, refs, preds, LABELS, tmp_path / "grid3.png")
    with pytest.raises(OctSamError, match="masks"):
        plot_qualitative_grid(images, refs, {"bad": refs[:2]}, LABELS, tmp_path / "grid4.png", cases={"x": 0})


def test_training_curves_accept_the_training_history(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e + 0.1,
            "val_mean_dice": 0.8 * (1 - 0.7**e),
            "val_dice_per_class": [0.7 * (1 - 0.7**e), 0.9 * (1 - 0.7**e), float("nan")],
            "lr": 1e-4,
            "val_scans": 12,
        }
        for e in range(1, 9)
    ]
    path = plot_training_curves(history, tmp_path / "curves.png", class_names=LABELS, figsize=(9, 3.5), dpi=100)
    _png(path, (900, 350))
    _png(plot_training_curves(history[:1], tmp_path / "one.png", dpi=60))  # a single epoch still plots
    with pytest.raises(OctSamError, match="empty"):
        plot_training_curves([], tmp_path / "empty.png")


def test_training_curves_optional_title(tmp_path, figures):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_mean_dice": 0.1 * e} for e in (1, 2, 3)]
    plain = _png(plot_training_curves(history, tmp_path / "plain.png", dpi=60))
    assert figures[-1].get_suptitle() == ""  # no title by default: the figure is as before
    titled = _png(plot_training_curves(history, tmp_path / "titled.png", dpi=60, title="SAM + LoRA"))
    assert figures[-1].get_suptitle() == "SAM + LoRA" and titled.shape == plain.shape
    assert not np.array_equal(plain, titled)
    long_title = "SAM + LoRA (small random base) on synthetic AMD data: 20 patients x 4 B-scans, patient-level split"
    path = plot_training_curves(history, tmp_path / "long.png", figsize=(5, 3.5), dpi=60, title=long_title)
    _nothing_at_the_edges(path)
    assert figures[-1].get_suptitle().replace("\n", " ") == long_title and "\n" in figures[-1].get_suptitle()
    assert _inside(figures[-1], figures[-1]._suptitle)


def test_confusion_matrix(tmp_path):
    confusion = np.array([[9000, 50, 20, 30], [40, 300, 5, 0], [10, 2, 200, 1], [0, 0, 0, 0]])
    path = plot_confusion_matrix(confusion, LABELS, tmp_path / "cm.png", figsize=(6, 5), dpi=100)
    _png(path, (600, 500))
    with pytest.raises(OctSamError, match="does not match"):
        plot_confusion_matrix(confusion, LABELS[:3], tmp_path / "bad.png")


def test_colours_follow_the_label_name_and_stay_distinct():
    from octsam.colors import class_colors

    amd = class_colors(["background", "drusen", "scar", "fluid"])
    duke = class_colors(["background", "fluid"])
    assert amd[3] == duke[1] == (0, 0, 255)  # fluid is blue whatever its index
    assert amd[1] == (255, 0, 0) and amd[2] == (0, 255, 0)
    many = class_colors(
        ["background", "drusen", "cnvm", "fce", "erm", "srf", "vmt", "ped", "irf", "hyperreflective_foci", "rpe"]
    )
    distances = [
        sum((a - b) ** 2 for a, b in zip(many[i], many[j])) ** 0.5
        for i in range(1, len(many))
        for j in range(i + 1, len(many))
    ]
    assert len(set(many)) == len(many) and min(distances) > 60


def test_one_colour_scheme_for_every_output():
    """Overlays, the eye report, the app and the cards colour a class alike (by label name, from octsam.colors), and
    none of them imports the evaluation figures for it."""
    import ast
    from pathlib import Path

    import octsam
    from octsam.colors import class_colors
    from octsam.volumes.report import label_colours

    labels = ["background", "IRF", "fluid", "drusen", "my lesion"]
    rgb = class_colors(labels)
    assert label_colours(labels) == [tuple(c / 255 for c in rgb[k]) for k in range(1, len(labels))]
    assert label_colours(["background", "fluid"]) == [(0.0, 0.0, 1.0)]  # fluid is blue in the eye report too
    root = Path(octsam.__file__).parent
    for path in [*root.glob("infer/*.py"), *root.glob("app/*.py"), *root.glob("volumes/*.py"), root / "cards.py"]:
        imported = [n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
        assert not any((m or "").startswith("octsam.evaluation") for m in imported), path
