"""The evaluation protocol, written once: what every reported number means.

``octsam.evaluation.metrics`` computes it, ``report.md`` (``octsam.evaluation.report``), the model cards
(``octsam.cards``) and the README say it with these sentences (a test checks the README and the cards against them).
The zero-shot sentence depends on the base: SAM ViT bases (SAM, MedSAM ViT-B) were trained with three masks per
ambiguous prompt and keep the best by predicted IoU; LiteMedSAM was trained with one mask per box and uses that one
(``octsam.models.sam.zero_shot_multimask``). No torch import: cards and ``--help`` stay light.
"""

from __future__ import annotations

METRICS_RULE = (
    "Dice and IoU are computed per foreground class on each B-scan at its native resolution (MONAI) and averaged over "
    "B-scans; a class absent from both the reference and the prediction of a B-scan is left out of that class's "
    "mean (and counted as a true negative in the detection table), one absent from the reference but predicted "
    "scores 0. Pooled values sum the pixels of all B-scans first. Pixels labelled 255 are ignored."
)
HEADLINE_RULE = (
    "Mean Dice / IoU average the per-class means over the classes present in the reference masks of the evaluated "
    "split, the same classes for every method; a class no reference holds is listed per class but enters no mean."
)
BACKGROUND_RULE = (
    "Background is never part of the headline means; a publication-compatible mean with background averaged in is "
    "shown beside them, labelled as such."
)
CI_RULE = (
    "Intervals are 95% percentile bootstrap intervals over patients; a class scored on B-scans of fewer than two "
    "patients gets none (n/a)."
)


def zero_shot_rule(multimask: bool | None = None) -> str:
    """How the zero-shot baseline is prompted: ``multimask`` True for a SAM ViT base, False for LiteMedSAM, None
    to describe both (README)."""
    start = "Zero-shot: the base with no adapter, prompted with one ground-truth box per class instance"
    if multimask is None:
        return (
            f"{start}; a SAM ViT base (SAM, MedSAM ViT-B) keeps the best of its 3 masks by predicted IoU, LiteMedSAM "
            "uses its one mask per box (each base prompted as it was trained)."
        )
    if multimask:
        return f"{start}, keeping the best of SAM's 3 masks by predicted IoU (as the SAM ViT base was trained)."
    return f"{start}, using the base's one mask per box (it was trained with one mask per box, like LiteMedSAM)."


def protocol_text(zero_shot_multimask: bool | None = None, zero_shot: bool = True) -> str:
    """The protocol paragraph: metrics, headline, background and, with ``zero_shot``, the zero-shot baseline (for a
    base that uses ``zero_shot_multimask``, or both kinds when None)."""
    parts = [METRICS_RULE, HEADLINE_RULE, BACKGROUND_RULE]
    if zero_shot:
        parts.append(zero_shot_rule(zero_shot_multimask))
    return " ".join(parts)


def same_text(a: str, b: str) -> bool:
    """Equal up to line breaks and indentation (for checking wrapped Markdown against these sentences)."""
    return " ".join(a.split()) == " ".join(b.split())
