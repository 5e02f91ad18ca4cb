"""SAM's mask losses, per predicted mask: focal + dice on the mask logits, MSE of the predicted IoU.

SAM (Kirillov et al. 2023, sec. 3 and appendix A) supervises masks with a 20:1 linear combination
of focal loss and dice loss, and trains the IoU head with the mean squared error between its
prediction and the IoU of the predicted mask with the ground truth. With several output masks for
an ambiguous prompt only the lowest-loss mask is backpropagated (`select_best`).

Resolution: the decoder predicts low-resolution logits (4 x the patch grid, 256 px for a 1024-px
SAM); the targets are *downsampled* to that size (`downsample_targets`: the fraction of each cell
the object covers), rather than the logits upsampled to the image: 16x cheaper at 1024 px, and a
cell's soft target says how much of it the object covers. The IoU target thresholds both at 1/2.

Every function returns one value per mask (shape of the logits without the two pixel dimensions),
so callers can weight, select and average over valid objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FOCAL_GAMMA = 2.0  # the sigmoid focal loss's (RetinaNet) exponent


def downsample_targets(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., H, W) 0/1 masks -> float (..., h, w): the fraction of each output cell inside the mask."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="area")
    return flat.reshape(*lead, *size)


def focal_loss(logits: Tensor, targets: Tensor, alpha: float | None = None, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Sigmoid focal loss, mean over pixels: alpha_t (1 - p_t)^gamma BCE(logits, targets).

    ``alpha`` weighs the object's pixels (``1 - alpha`` the background's); None weighs both alike.
    """
    logits, targets = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = (1 - p_t) ** gamma * ce
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2 |p t| + s) / (|p| + |t| + s) with p = sigmoid(logits); ``smooth`` keeps empty masks finite."""
    p, t = torch.sigmoid(logits.float()).flatten(-2), targets.float().flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def iou_target(logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of the predicted mask (logit > 0) with the target (>= 1/2), no gradient; 1 when both are empty."""
    with torch.no_grad():
        pred, gt = (logits > 0).flatten(-2), (targets >= 0.5).flatten(-2)
        inter, union = (pred & gt).sum(-1).float(), (pred | gt).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_losses(logits: Tensor, iou_pred: Tensor, targets: Tensor, *, focal_weight: float, dice_weight: float,
                focal_alpha: float | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per mask: (focal_weight * focal + dice_weight * dice, IoU-head MSE, the unweighted parts).

    ``logits`` (..., M, h, w) against ``targets`` (..., h, w), broadcast over the M masks;
    ``iou_pred`` (..., M).
    """
    targets = targets.unsqueeze(-3).expand_as(logits)
    focal, dice = focal_loss(logits, targets, focal_alpha), dice_loss(logits, targets)
    actual = iou_target(logits, targets)
    iou_mse = (iou_pred.float() - actual) ** 2
    return focal_weight * focal + dice_weight * dice, iou_mse, {"focal": focal, "dice": dice, "iou": actual}


def select_best(mask_loss: Tensor) -> Tensor:
    """(..., M) -> (...) index of the lowest-loss mask: SAM backpropagates only that one."""
    return mask_loss.detach().argmin(-1)


def valid_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the ``valid`` entries (padding objects excluded); 0 when none is valid."""
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


class PromptRounds:
    """The losses of one step's prompt rounds (box, click, refinements) on the same objects.

    ``add`` scores a round's masks (B, K, M, h, w) and IoU predictions (B, K, M), keeps the
    lowest-loss mask of each object (the only one when M = 1) and returns its logits (B, K, h, w)
    for the next click. The step's terms are means over rounds of means over valid objects.
    """

    def __init__(self, targets: Tensor, valid: Tensor, *, focal_weight: float, dice_weight: float,
                 focal_alpha: float | None) -> None:
        self.targets, self.valid = targets, valid
        self.weights = dict(focal_weight=focal_weight, dice_weight=dice_weight, focal_alpha=focal_alpha)
        self.mask_losses: list[Tensor] = []
        self.iou_losses: list[Tensor] = []
        self.logged: dict[str, float] = {}

    def add(self, name: str, logits: Tensor, iou_pred: Tensor) -> Tensor:
        loss, iou_mse, parts = mask_losses(logits, iou_pred, self.targets, **self.weights)
        best = select_best(loss)[..., None]

        def chosen(values: Tensor) -> Tensor:
            return valid_mean(values.gather(-1, best).squeeze(-1), self.valid)

        self.mask_losses.append(chosen(loss))
        self.iou_losses.append(valid_mean(iou_mse.mean(-1), self.valid))  # every mask's IoU prediction learns
        for part in ("focal", "dice"):
            self.logged[f"loss/{part}/{name}"] = float(chosen(parts[part]).detach())
        self.logged[f"train_miou/{name}"] = float(chosen(parts["iou"]).detach())
        index = best[..., None, None].expand(*logits.shape[:-3], 1, *logits.shape[-2:])
        return logits.gather(-3, index).squeeze(-3)

    def mask_term(self) -> Tensor:
        return torch.stack(self.mask_losses).mean()

    def iou_term(self) -> Tensor:
        return torch.stack(self.iou_losses).mean()
