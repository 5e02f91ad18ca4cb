"""Self-distillation: the trimmed network learns from itself with trimming off.

* ``kl_logits``: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) for
  single-label heads (NLVR2, ITM); the tau^2 keeps gradient size independent of tau.
* ``bce_sigmoid``: binary cross-entropy of the student's logits against sigmoid(teacher)
  for multi-label heads (VQA, whose targets are soft scores per answer).
* ``hidden_cosine``: 1 - cosine similarity of hidden states, averaged over the tokens
  both passes keep (the teacher keeps all; padding and pruned tokens excluded).
* ``feature_distillation``: bLViT's feature distillation for dense encoders: weight x (1 - cosine
  similarity) of every position's feature vector, weight 2.5 as the paper tuned it.
The teacher is always detached: it is the same weights run with trim="off" under no_grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_logits(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    log_p = F.log_softmax(student / tau, dim=-1)
    q = F.softmax(teacher.detach() / tau, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * tau**2


def bce_sigmoid(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    target = torch.sigmoid(teacher.detach() / tau)
    # Mean over answers then times the class count, the VQA convention for the task loss.
    return F.binary_cross_entropy_with_logits(student / tau, target) * student.shape[-1]


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    cos = F.cosine_similarity(student, teacher.detach(), dim=-1)
    if mask is None:
        return (1 - cos).mean()
    w = mask.to(cos.dtype)
    return ((1 - cos) * w).sum() / w.sum().clamp_min(1.0)


BIG_LITTLE_DISTILL_WEIGHT = 2.5  # bLViT's ablation: the best of the weights it tried


def feature_distillation(student: Tensor, teacher: Tensor, *, weight: float = BIG_LITTLE_DISTILL_WEIGHT,
                         dim: int = 1) -> Tensor:
    """``weight`` * mean over positions of (1 - cos(student, teacher)) along the channel ``dim``.

    For SAM-style encoders: the trimmed or routed model's image embeddings (B, C, H, W)
    (`SamOutput.image_embeddings`) against the same encoder's with trim="off" (the teacher, detached).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "differ in shape; distil the same layer of both encoders")
    return weight * (1 - F.cosine_similarity(student, teacher.detach(), dim=dim)).mean()


LOSSES = {"kl": kl_logits, "bce": bce_sigmoid}
