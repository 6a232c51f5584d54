"""Dice + cross-entropy (MONAI's DiceLoss, which honours an ignore label, plus torch's CE).

MONAI's ``DiceCELoss`` has no ``ignore_index``; its ``DiceLoss`` has, so the CE half is added here with the same
ignore rule (that is the only reason this is not ``DiceCELoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from octsam.data.contract import IGNORE_INDEX


class SegmentationLoss(nn.Module):
    """Loss on class logits (B, K, H, W) against index masks (B, H, W) with 0 = background and 255 = ignore.

    Dice is computed over the batch per class ("batch Dice", as nnU-Net): a per-B-scan Dice would score a class
    that is absent from a scan as a total miss unless its probability is exactly zero everywhere, which pushes small
    biomarkers to vanish.

    ``softmax``: logits get a zero background channel (see ``octsam.models.sam``), soft Dice over foreground classes +
    multi-class CE. ``sigmoid``: per-class soft Dice + binary CE against the one-hot foreground classes.
    """

    def __init__(self, activation: str = "softmax", lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.activation = activation
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        if activation == "softmax":
            self.dice = DiceLoss(
                softmax=True, to_onehot_y=True, include_background=False, ignore_index=IGNORE_INDEX, batch=True
            )
        self.batch_binary_dice = DiceLoss(sigmoid=True, batch=True)
        self.binary_dice = DiceLoss(sigmoid=True)

    def forward(self, class_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        class_logits = class_logits.float()
        target = target.long()
        valid = target != IGNORE_INDEX
        if self.activation == "softmax":
            logits = torch.cat([torch.zeros_like(class_logits[:, :1]), class_logits], dim=1)
            dice = self.dice(logits, target[:, None])
            ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX) if valid.any() else logits.sum() * 0
            return self.lambda_dice * dice + self.lambda_ce * ce
        num_classes = class_logits.shape[1]
        onehot = F.one_hot(torch.where(valid, target, 0), num_classes + 1)[..., 1:].permute(0, 3, 1, 2).float()
        return self.binary(class_logits, onehot, valid[:, None].expand_as(onehot), batch=True)

    def binary(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, batch: bool = False):
        """Sigmoid Dice + BCE on (N, C, H, W) logits and 0/1 targets; pixels where ``valid`` is False are excluded
        (their logit is pushed to -inf and their target to 0, so they add nothing to Dice's sums). ``batch``: Dice
        over the whole batch per class (for classes that may be absent from a B-scan)."""
        logits = logits.float()
        excluded = torch.where(valid, logits, torch.full_like(logits, -1e4))
        dice = (self.batch_binary_dice if batch else self.binary_dice)(excluded, target * valid)
        weight = valid.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp(
            min=1
        )
        return self.lambda_dice * dice + self.lambda_ce * bce


def prompted_loss(
    loss: SegmentationLoss,
    prompt_logits: torch.Tensor,
    instance_map: torch.Tensor,
    prompt_valid: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-prompt binary loss: prompt p's target is its component (``instance_map == p + 1``); padded prompts and
    ignored pixels are excluded. ``prompt_logits`` (B, P, H, W)."""
    batch, prompts = prompt_logits.shape[:2]
    ids = torch.arange(1, prompts + 1, device=instance_map.device).view(1, -1, 1, 1)
    target = (instance_map[:, None] == ids).float()
    sel = prompt_valid.reshape(-1)
    if not sel.any():
        return prompt_logits.sum() * 0
    valid = (mask != IGNORE_INDEX)[:, None].expand_as(target)
    flat = lambda t: t.reshape(batch * prompts, 1, *t.shape[2:])[sel]  # noqa: E731
    return loss.binary(flat(prompt_logits), flat(target), flat(valid))
