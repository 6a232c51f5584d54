"""What runs by default: the fast-attention mode and whether ``torch.compile`` is on, decided from the device and
the amount of work (one pure function, so the rule is tested without a GPU).

On CUDA the fastest exact path measured (benchmarks/RESULTS.md, one H200) is the default: attention ``auto``
(the fused Triton kernel in the global layers it handles, the fold in the others) and ``torch.compile`` for
training and for inference of more than ``COMPILE_MIN_SCANS`` B-scans. Everywhere else the defaults are what they
were: attention ``auto`` (the bias through SDPA on the CPU) and no compilation, unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Inference compiles the image encoder by default on CUDA only above this many B-scans: compiling costs tens of
#: seconds once (less with inductor's on-disk cache), a handful of B-scans would only wait for it.
COMPILE_MIN_SCANS = 64


@dataclass(frozen=True)
class SpeedPlan:
    """``attention``: an ``octsam.models.fast_attention`` mode, or None for transformers' own attention.
    ``compile``: ``torch.compile`` on. ``why``: one line for the log."""

    attention: str | None
    compile: bool
    why: str


def plan_speed(
    device_type: str,
    task: str,
    fast_attention: bool = True,
    attention_mode: str = "auto",
    compile: bool | None = None,
    num_scans: int | None = None,
    architecture: str = "sam",
) -> SpeedPlan:
    """The attention mode and compile choice for ``task`` ("train" or "infer") on ``device_type`` ("cuda", "cpu",
    "mps").

    ``compile``: True or False when the user asked; None for the default (on CUDA: always for training, for
    inference when ``num_scans`` > ``COMPILE_MIN_SCANS``; off elsewhere). ``architecture``: the registry name of the
    model's base (``octsam.bases``); one whose record says ``compiles=False`` (the U-Net baseline: small) is
    never compiled by default, and fast attention applies only where its record says so. ``fast_attention`` False
    keeps transformers' attention.
    """
    from octsam.bases import get_base

    if task not in ("train", "infer"):
        raise ValueError(f"task must be train or infer, got {task!r}")
    base = get_base(architecture)
    attention = attention_mode if fast_attention and base.fast_attention else None
    if compile is not None:
        return SpeedPlan(attention, bool(compile), "asked for" if compile else "turned off")
    if device_type != "cuda":
        return SpeedPlan(attention, False, f"not compiled by default on {device_type}")
    if not base.compiles:
        return SpeedPlan(attention, False, f"{architecture} is not compiled by default")
    if task == "train":
        return SpeedPlan(attention, True, "compiled by default for training on CUDA")
    if num_scans is not None and num_scans > COMPILE_MIN_SCANS:
        return SpeedPlan(attention, True, f"compiled by default: {num_scans} B-scans > {COMPILE_MIN_SCANS}")
    return SpeedPlan(attention, False, f"not compiled: {num_scans} B-scans <= {COMPILE_MIN_SCANS}")
