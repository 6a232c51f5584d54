"""Evaluate models on a dataset split with the evaluation protocol (octsam.evaluation.metrics) (predictions at native resolution).

- fine-tuned adapters (SAM + LoRA, or the U-Net baseline) in automatic mode;
- adapters trained in prompted mode, and the zero-shot baseline, with one exact ground-truth box per class instance
  (the zero-shot baseline is prompted as its base was trained: ``octsam.protocol.zero_shot_rule``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from octsam.data.prompts import instance_prompts
from octsam.data.samples import to_uint8_image
from octsam.segmenter import Prompt, Segmenter

logger = logging.getLogger("octsam")
MAX_EVAL_PROMPTS = 64


def ground_truth_prompts(mask: np.ndarray, num_labels: int) -> list[Prompt]:
    """One exact box per connected component of each foreground class (the zero-shot protocol)."""
    p = instance_prompts(mask, num_labels, MAX_EVAL_PROMPTS, rng=None, positive_points=0, negative_points=0)
    return [
        Prompt(label=int(c), box=tuple(float(v) for v in b)) for b, c, ok in zip(p.boxes, p.classes, p.valid) if ok
    ]


_ACROSS_PROCESSES = contextvars.ContextVar("octsam_predict_across_processes", default=False)


@contextlib.contextmanager
def across_processes():
    """Within this block, under ``accelerate launch``, ``predict_split`` splits a split across the processes (every
    process must then call it: ``octsam-evaluate``); outside it each call predicts the whole split where it runs
    (e.g. the end of training, on the main process only)."""
    token = _ACROSS_PROCESSES.set(True)
    try:
        yield
    finally:
        _ACROSS_PROCESSES.reset(token)


def predict_split(
    segmenter: Segmenter, split, prompted: bool = False, multimask: bool = False, desc: str = "predicting"
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[str]]:
    """Predicted and reference masks, patient ids and scan ids of every B-scan of ``split``. Under ``accelerate
    launch`` each process predicts its contiguous share of the split and every process gets all of them, in the
    split's order (``octsam.infer.archive.Processes``)."""
    from octsam.infer.archive import Processes

    processes = Processes(str(segmenter.device.type))
    if processes.count > 1 and _ACROSS_PROCESSES.get():
        mine = processes.share(list(range(len(split))))
        part = _predict_rows(segmenter, split.select(mine), prompted, multimask, desc) if mine else ([], [], [], [])
        parts = processes.all_gather(part)
        return tuple([item for p in parts for item in p[k]] for k in range(4))
    return _predict_rows(segmenter, split, prompted, multimask, desc)


def _predict_rows(segmenter: Segmenter, split, prompted: bool, multimask: bool, desc: str):
    num_labels = len(segmenter.labels)
    preds, refs, patients, scans = [], [], [], []
    batch = segmenter.batch_size
    for start in tqdm(range(0, len(split), batch), desc=desc, leave=False):
        rows = split[start : start + batch]
        images = [to_uint8_image(i) for i in rows["image"]]
        masks = [np.asarray(m, dtype=np.uint8) for m in rows["mask"]]
        prompts = [ground_truth_prompts(m, num_labels) for m in masks] if prompted else None
        for result in segmenter(images, prompts=prompts, multimask=multimask):
            preds.append(result.mask)
        refs.extend(masks)
        patients.extend(str(p) for p in rows["patient_id"])
        scans.extend(str(s) for s in rows["scan_id"])
    return preds, refs, patients, scans


def evaluate_segmenter(
    segmenter: Segmenter,
    split,
    labels: list[str],
    output_dir: str | Path | None,
    method: str,
    prompted: bool = False,
    multimask: bool = False,
    pixel_spacing_mm: tuple[float, float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
):
    """Predict ``split`` and compute every metric; write the tables to ``output_dir`` when given."""
    from octsam.evaluation.metrics import evaluate_predictions
    from octsam.evaluation.report import write_results
    from octsam.infer.archive import Processes

    preds, refs, patients, scans = predict_split(segmenter, split, prompted, multimask, desc=method)
    if not Processes(str(segmenter.device.type)).is_main:
        return None  # another process of an accelerate launch: the main process computes the metrics once
    result = evaluate_predictions(
        preds,
        refs,
        labels,
        patient_ids=patients,
        scan_ids=scans,
        pixel_spacing_mm=pixel_spacing_mm,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    result.predictions = preds  # kept for figures (qualitative grid)
    if output_dir is not None:
        write_results(result, output_dir, method)
    return result


def evaluate_model(
    adapter: str,
    split,
    labels: list[str],
    output_dir: str | Path | None,
    method: str = "fine-tuned",
    device: str | torch.device = "auto",
    batch_size: int = 8,
    tta: str = "none",
    **kwargs,
):
    """Evaluate an adapter folder or Hub repo (or a list of them: an ensemble, probabilities averaged; ``tta`` as in
    ``Segmenter``); a prompted-mode adapter gets the ground-truth boxes."""
    segmenter = Segmenter.from_pretrained(adapter, batch_size=batch_size, device=_device_name(device), tta=tta)
    if list(segmenter.labels) != list(labels):
        from octsam.errors import OctSamError

        raise OctSamError(
            f"Adapter {adapter} predicts {segmenter.labels} but the dataset has labels {labels}; evaluate it on a "
            "dataset with the same label set."
        )
    prompted = segmenter.config.mode == "prompted"
    return evaluate_segmenter(segmenter, split, labels, output_dir, method, prompted=prompted, **kwargs)


def evaluate_zero_shot(
    base_model: str,
    split,
    labels: list[str],
    output_dir: str | Path | None,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    revision: str | None = None,
    precision: str = "auto",
    input_mode: str = "resize",
    **kwargs,
):
    """The zero-shot baseline: the base with no adapter, one ground-truth box per instance, prompted as the base was
    trained (SAM: best of its 3 masks by predicted IoU; LiteMedSAM: its one mask per box). ``precision`` as in
    ``Segmenter``; ``input_mode`` ``native``: each box is decoded in a native-resolution window around it."""
    from octsam.models.fast_attention import enable_fast_attention
    from octsam.models.sam import zero_shot_model, zero_shot_multimask

    model = zero_shot_model(base_model, labels, revision=revision, input_mode=input_mode)
    enable_fast_attention(model)
    segmenter = Segmenter(model, device=_device_name(device), batch_size=batch_size, precision=precision)
    multimask = zero_shot_multimask(model.config)
    result = evaluate_segmenter(
        segmenter, split, labels, None, "zero-shot", prompted=True, multimask=multimask, **kwargs
    )
    if result is None:  # not the main process of an accelerate launch
        return None
    result.settings["zero_shot_multimask"] = multimask  # report.md says how this base was prompted (octsam.protocol)
    if output_dir is not None:
        from octsam.evaluation.report import write_results

        write_results(result, output_dir, "zero-shot")
    return result


def _device_name(device) -> str:
    """The device to run on; under ``accelerate launch`` this process's own (``cuda:LOCAL_RANK``)."""
    from octsam.infer.archive import Processes

    name = device.type if isinstance(device, torch.device) else device
    return Processes(name).use_device(name)
