"""Model folders written by octsam before the base registry (issue 18) still load and predict the same masks.

``tests/fixtures/legacy`` was made once by ``tests/fixtures/make_legacy_adapters.py`` with the code of commit
0012159: a tiny random SAM base, a SAM + LoRA adapter per mode on it, a U-Net baseline, one scan and the masks
each predicted then.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octsam.adapter import check_adapter_folder
from octsam.data.prompts import Prompt
from octsam.segmenter import Segmenter

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
BASE = str(LEGACY / "tiny_sam_base")


def _scan() -> np.ndarray:
    return np.array(Image.open(LEGACY / "scan.png"))


@pytest.mark.parametrize("name", ["sam_automatic", "sam_prompted", "unet"])
@pytest.mark.parametrize("merge", [True, False])
def test_legacy_folder_predicts_the_recorded_mask(name, merge):
    folder = LEGACY / name
    check_adapter_folder(folder)
    base = (
        None if name == "unet" else BASE
    )  # the adapters name their base by a folder relative to where they were made
    segmenter = Segmenter.from_pretrained(folder, device="cpu", base_model=base, merge=merge)
    prompts = None
    if name == "sam_prompted":
        box = tuple(json.loads((LEGACY / "expected.json").read_text())["box"])
        prompts = [[Prompt(label=1, box=box), Prompt(label=2, points=[(38.0, 30.0, 1)])]]
    mask = segmenter([_scan()], prompts=prompts)[0].mask
    expected = np.array(Image.open(folder / "expected_mask.png"))
    assert mask.shape == expected.shape
    assert (mask != expected).sum() == 0 if merge else (mask != expected).mean() < 0.01
    counts = json.loads((LEGACY / "expected.json").read_text())["pixels_per_class"][name]
    assert {str(k): int((expected == k).sum()) for k in range(3)} == counts
