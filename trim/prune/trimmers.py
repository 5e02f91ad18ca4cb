"""SmartTrim's trimmers: which tokens and which heads this input needs.

`TokenTrimmer` scores every token from three views, each projected to a small width
``hidden``: the token itself (``local``), the mean of its own modality's alive tokens
(``global_proj``), and the pooled feature of the *other* modality (``cross``). The sum goes
through GELU and a small MLP to one keep logit per token, so the same image patch can be
kept for one question and dropped for another.

`HeadTrimmer` maps the modality's global feature (and, for cross-attention, the other
modality's pooled feature) to one keep logit per head.

How a keep probability becomes a decision is the ``decision`` argument:

* ``"sample"``: a Gumbel-sigmoid sample, returned as float 0/1 with straight-through
  gradients (what the models' ``trim="train"`` uses);
* ``"threshold"``: keep where the probability exceeds 1/2, deterministic (every other
  trimming mode).

A deterministic decision can be shifted: ``logit_shift`` (0 unless a budget is asked for,
set by `trim.prune.calibrate.logit_shift`) is added to the logits before the threshold, so a
larger shift keeps more. Sampled decisions never see it: training learns the logits
themselves, and the shift is what calibration fits after training (``calibrate.py``).

Both start as no-ops (design invariant 3): the last layer's weights are zero and its bias
is ``init_logit`` > 0, so every token and head is kept until training says otherwise.

`Trimmer` is the base of every module that decides what a layer keeps: these two and the
baselines' replacements (`trim.prune.policies`); `trimmer_modules` finds them all.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from trim.nn.tokens import TokenSet
from trim.prune.gumbel import deterministic, gumbel_sigmoid, straight_through
from trim.prune.routing import BigLittleRouter

DECISIONS = ("sample", "threshold")


def _init_keep_all_output(layer: nn.Linear, init_logit: float) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, init_logit)


def _check_decision(decision: str) -> None:
    if decision not in DECISIONS:
        raise ValueError(f"decision={decision!r}; choose one of {DECISIONS}")


def _shifted(trimmer: nn.Module, logits: Tensor, decision: str) -> Tensor:
    """The logits a decision reads: shifted by the trimmer's ``logit_shift`` when deterministic."""
    shift = getattr(trimmer, "logit_shift", 0.0)
    return logits + shift if decision == "threshold" and shift else logits


def top_k_mask(logits: Tensor, eligible: Tensor, k: Tensor) -> Tensor:
    """Keep the k highest-logit eligible entries per row (k: (B,) long)."""
    scores = logits.masked_fill(~eligible, float("-inf"))
    # Stable: ties (a fresh trimmer's equal logits) go to the earlier token in every layout alike.
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return (rank < k[:, None]) & eligible


class Trimmer(nn.Module):
    """Base of every keep-deciding module (parameter groups, freezing and fresh checkpoint keys follow it)."""


def head_decisions(logits: Tensor, *, decision: str, tau: float, min_keep: int) -> Tensor:
    """Head keep decisions from (B, H) logits: Gumbel samples with straight-through gradients
    (``"sample"``) or ``logit > 0`` as float 0/1 (``"threshold"``); at least ``min_keep`` per row."""
    _check_decision(decision)
    b = logits.shape[0]
    everything = torch.ones_like(logits, dtype=torch.bool)
    sample = gumbel_sigmoid(logits, tau, hard=False) if decision == "sample" else None
    hard = sample > 0.5 if sample is not None else deterministic(logits)
    hard = hard | top_k_mask(logits, everything, torch.full((b,), min_keep, device=logits.device))
    if sample is not None:
        return straight_through(hard, sample)
    return hard.to(logits.dtype)


class TokenTrimmer(Trimmer):
    """Per-token keep decisions conditioned on the token, its modality and the other modality."""

    def __init__(self, dim: int, other_dim: int | None = None, *, hidden: int | None = None,
                 min_keep: int = 1, init_logit: float = 3.0) -> None:
        super().__init__()
        hidden = hidden or max(dim // 8, 16)
        self.local = nn.Linear(dim, hidden)
        self.global_proj = nn.Linear(dim, hidden, bias=False)
        self.cross = nn.Linear(other_dim, hidden, bias=False) if other_dim else None
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, 1)
        _init_keep_all_output(self.out, init_logit)
        self.min_keep = min_keep
        # Benchmarks and static baselines: keep exactly this fraction of prunable tokens, one
        # fraction for the batch or a (B,) tensor of per-sample fractions.
        self.forced_ratio: float | Tensor | None = None
        self.logit_shift = 0.0  # added to the logits of deterministic decisions (a budget)

    def logits(self, tokens: TokenSet, other: Tensor | None = None, own: Tensor | None = None) -> Tensor:
        own = tokens.mean() if own is None else own
        h = self.local(tokens.x) + tokens.broadcast(self.global_proj(own))
        if self.cross is not None:
            if other is None:
                raise ValueError("this TokenTrimmer is cross-modal: pass the other modality's pooled feature")
            h = h + tokens.broadcast(self.cross(other))
        return tokens.grid(self.out(self.act(self.norm(h))).squeeze(-1))

    def forward(self, tokens: TokenSet, other: Tensor | None = None, *, own: Tensor | None = None,
                decision: str = "threshold", tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """Return (decision (B, N), keep probability (B, N)) over the carried tokens.

        The decision is float 0/1 with straight-through gradients for ``decision="sample"``
        and bool for ``"threshold"``. Special tokens are always 1; padding/dropped tokens are left as they
        are (the TokenSet's mask already excludes them); at least ``min_keep`` prunable tokens
        stay alive per sample. ``own`` overrides the global feature (default: mean of the
        alive tokens), e.g. the mean of the image tokens only in a single-stream model.
        """
        _check_decision(decision)
        logits = _shifted(self, self.logits(tokens, other, own), decision)
        prob = torch.sigmoid(logits)
        alive = tokens.keep.bool()
        prunable = alive & ~tokens.protect
        sample = None
        if self.forced_ratio is not None:
            ratio = torch.as_tensor(self.forced_ratio, dtype=logits.dtype, device=logits.device)
            k = torch.ceil(prunable.sum(1) * ratio).long().clamp_min(min(self.min_keep, 1))
            hard = top_k_mask(logits, prunable, torch.minimum(k, prunable.sum(1)))
        else:
            sample = gumbel_sigmoid(logits, tau, hard=False) if decision == "sample" else None
            hard = sample > 0.5 if sample is not None else deterministic(logits)
            floor = torch.clamp(prunable.sum(1), max=self.min_keep)
            hard = hard | top_k_mask(logits, prunable, floor)
        hard = hard | tokens.protect | ~alive  # never prune special tokens; leave padding to its mask
        if decision == "sample":
            surrogate = prob if sample is None else sample
            return straight_through(hard, torch.where(prunable, surrogate, torch.ones_like(prob))), prob
        return hard, prob


class HeadTrimmer(Trimmer):
    """Per-sample keep decisions over the H heads of one attention layer."""

    def __init__(self, dim: int, num_heads: int, other_dim: int | None = None, *, hidden: int | None = None,
                 min_keep: int = 1, init_logit: float = 3.0) -> None:
        super().__init__()
        hidden = hidden or max(dim // 8, 16)
        self.num_heads = num_heads
        self.global_proj = nn.Linear(dim, hidden)
        self.cross = nn.Linear(other_dim, hidden, bias=False) if other_dim else None
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, num_heads)
        _init_keep_all_output(self.out, init_logit)
        self.min_keep = min_keep
        self.forced_heads: int | Tensor | None = None  # heads to keep: one count, or (B,) per sample
        self.logit_shift = 0.0  # added to the logits of deterministic decisions (a budget)

    def logits(self, pooled: Tensor, other: Tensor | None = None) -> Tensor:
        h = self.global_proj(pooled)
        if self.cross is not None:
            if other is None:
                raise ValueError("this HeadTrimmer conditions on the other modality: pass its pooled feature")
            h = h + self.cross(other)
        return self.out(self.act(h))

    def forward(self, pooled: Tensor, other: Tensor | None = None, *, decision: str = "threshold",
                tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """Return (head mask (B, H) float, keep probability (B, H)); straight-through for
        ``decision="sample"``."""
        _check_decision(decision)
        logits = _shifted(self, self.logits(pooled, other), decision)
        prob = torch.sigmoid(logits)
        if self.forced_heads is not None:
            b = logits.shape[0]
            k = torch.as_tensor(self.forced_heads, device=logits.device).long().expand(b).clamp(1, self.num_heads)
            return top_k_mask(logits, torch.ones_like(logits, dtype=torch.bool), k).to(logits.dtype), prob
        return head_decisions(logits, decision=decision, tau=tau, min_keep=self.min_keep), prob


def heads_to_run(head_mask: Tensor) -> Tensor | None:
    """Union of kept heads over the batch (physical slicing), or None when all are kept."""
    union = head_mask.bool().any(0)
    return None if bool(union.all()) else union.nonzero().squeeze(1)


def trimmer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every token and head trimmer (any `Trimmer`) and big.LITTLE router in
    ``model``: the one definition of "a trimmer" that parameter groups, freezing and checkpoint
    loading use."""
    for name, module in model.named_modules():
        if isinstance(module, (Trimmer, BigLittleRouter)):
            yield name, module
