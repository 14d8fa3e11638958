"""Objectives and schedules of local CPS training.

- Supervised: nnU-Net's Dice+CE (`DC_and_CE_loss` with `MemoryEfficientSoftDiceLoss`, no background
  Dice) wrapped in `DeepSupervisionWrapper` with weights 1/2^i, the lowest head 0, normalised.
- Cross pseudo supervision (Chen et al. 2021): each net is trained on the other's argmax, with no
  gradient through that target; per deep-supervision output, the target being the other net's
  argmax at the same scale, weighted like the supervised loss.
- FedProx: mu/2 * ||w - w_ref||^2 over the trainable parameters.
- Schedules over the global iteration count: CPS weight ramp-up and nnU-Net's poly learning rate.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's weights: 1/2^i, highest resolution first, the lowest output 0, summing to 1."""
    if num_outputs < 1:
        raise ValueError("need at least one output")
    weights = np.array([1 / (2**i) for i in range(num_outputs)])
    if num_outputs > 1:
        weights[-1] = 0
    return weights / weights.sum()


def supervised_loss(num_outputs: int = 5, batch_dice: bool = False, ignore_label: int | None = None) -> nn.Module:
    """Dice+CE with deep supervision, as `nnUNetTrainer._build_loss` builds it (no regions; voxels of
    `ignore_label`, when given, count for neither term).

    Called with (list of logits (b, c, ...), list of targets (b, 1, ...)), highest resolution first.
    """
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, deep_supervision_weights(num_outputs))


class CrossPseudoLoss(nn.Module):
    """loss(student outputs, teacher outputs): the student fits the teacher's hard labels.

    kind "ce": cross-entropy (the original CPS); "dice_ce": nnU-Net's Dice+CE (dual nnU-Net variant).
    Both take lists of logits, highest resolution first (a single tensor is one output); the targets
    are `argmax` of the teacher's outputs, computed without gradient.

    `confidence` > 0: only voxels where the teacher's softmax exceeds it count (FixMatch-style
    pseudo-labels, as the LiQA/CARE winners used them); "ce" averages over all voxels, so a teacher
    confident nowhere teaches nothing, "dice_ce" ignores the others (nnU-Net's ignore label).
    """

    def __init__(self, kind: str = "ce", num_outputs: int = 5, batch_dice: bool = False, confidence: float = 0.0):
        super().__init__()
        if kind not in ("ce", "dice_ce"):
            raise ValueError(f"cps loss must be 'ce' or 'dice_ce', got {kind!r}")
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"cps confidence must be in [0, 1), got {confidence}")
        self.kind = kind
        self.confidence = float(confidence)
        self.weights = tuple(float(w) for w in deep_supervision_weights(num_outputs))
        if kind == "ce":
            from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
            self.loss = RobustCrossEntropyLoss(reduction="none" if self.confidence > 0 else "mean")
        else:  # the unwrapped DC_and_CE_loss; unconfident voxels carry the ignore label
            self.loss = supervised_loss(1, batch_dice, _IGNORE if self.confidence > 0 else None).loss

    def _one(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        target = hard_labels(teacher)
        if self.confidence <= 0:
            return self.loss(student, target)
        confident = confident_mask(teacher, self.confidence)
        if self.kind == "ce":
            return (self.loss(student, target) * confident[:, 0].float()).mean()
        return self.loss(student, torch.where(confident, target, torch.full_like(target, _IGNORE)))

    def forward(self, student: Sequence[torch.Tensor] | torch.Tensor,
                teacher: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        student = [student] if isinstance(student, torch.Tensor) else list(student)
        teacher = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
        weights = self.weights if len(student) == len(self.weights) else (1.0,) + (0.0,) * (len(student) - 1)
        total = student[0].new_zeros(())
        for w, s, t in zip(weights, student, teacher):
            if w == 0:
                continue
            total = total + w * self._one(s, t)
        return total


#: Label of voxels the confident cross term ignores ("dice_ce"); never a class of the nets.
_IGNORE = 2


@torch.no_grad()
def confident_mask(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(b, 1, ...) bool: the teacher's highest softmax probability exceeds `threshold`."""
    return torch.softmax(logits.detach().float(), dim=1).amax(dim=1, keepdim=True) > threshold


@torch.no_grad()
def hard_labels(logits: torch.Tensor) -> torch.Tensor:
    """argmax over classes as (b, 1, ...) int64, without gradient. Two classes: a comparison, which
    gives the same labels (ties go to class 0 like argmax) at a fraction of argmax's CPU cost."""
    logits = logits.detach()
    if logits.shape[1] == 2:
        return (logits[:, 1:2] > logits[:, 0:1]).long()
    return logits.argmax(dim=1, keepdim=True)


def proximal_term(net: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * sum over trainable parameters of ||w - w_ref||^2 (0 when mu is 0)."""
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    total = params[0][1].new_zeros(()) if params else torch.zeros(())
    if mu == 0:
        return total
    for name, p in params:
        if name not in reference:
            raise KeyError(f"proximal reference lacks parameter {name}")
        ref = reference[name].detach().to(device=p.device, dtype=p.dtype)
        total = total + (p - ref).pow(2).sum()
    return 0.5 * mu * total


# --------------------------------------------------------------------------------------------- schedules
def cps_lambda(iteration: int, lambda_max: float, rampup_iterations: int) -> float:
    """lambda_max * exp(-5 (1 - t/T)^2) for t < T, then lambda_max (T = 0: no ramp-up)."""
    if rampup_iterations <= 0 or iteration >= rampup_iterations:
        return float(lambda_max)
    phase = 1.0 - max(iteration, 0) / rampup_iterations
    return float(lambda_max * math.exp(-5.0 * phase * phase))


def poly_lr(initial_lr: float, iteration: int, total_iterations: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule lr0 * (1 - t/total)^0.9 on the global iteration count (0 past the end)."""
    if total_iterations <= 0:
        raise ValueError("total_iterations must be positive")
    frac = min(max(iteration, 0) / total_iterations, 1.0)
    return float(initial_lr * (1.0 - frac) ** exponent)


__all__ = ["deep_supervision_weights", "supervised_loss", "CrossPseudoLoss", "hard_labels", "confident_mask", "proximal_term",
           "cps_lambda", "poly_lr"]
