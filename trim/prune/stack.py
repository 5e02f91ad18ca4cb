"""Run a stack of single-stream blocks with trimmers attached to some of its layers.

Trimming modes (the ``trim=`` argument of every trim model):

* ``train``  — masked layout, Gumbel-sampled decisions with straight-through gradients;
  the cost is the expectation under the keep probabilities.
* ``masked`` — masked layout, deterministic decisions (what ``eval`` computes, without
  gathering; used to check invariant 1 and for debugging).
* ``eval``   — physical layout: kept tokens gathered, kept heads sliced. Cost counts the
  padding each sample carries in its batch.
* ``off``    — no trimmer runs; the model is the untrimmed original (the teacher).

A trimmer at layer ``l`` decides before block ``l`` runs, so block ``l`` already sees only
the kept tokens and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trim.nn.tokens import TokenSet
from trim.prune.cost import CostMeter, block_flops, head_trimmer_flops, token_trimmer_flops
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, heads_to_run

TRIM_MODES = ("train", "masked", "eval", "off")


def check_mode(mode: str) -> str:
    if mode not in TRIM_MODES:
        raise ValueError(f"trim={mode!r} is not a trimming mode; choose one of {TRIM_MODES}")
    return mode


def decision_mode(mode: str) -> str:
    return "gumbel" if mode == "train" else "hard"


@dataclass
class LayerRecord:
    """What one layer kept, per sample: what the evaluator plots and the cost loss reads."""

    tokens: Tensor  # (B,) tokens the block processed (alive, padding excluded)
    heads: Tensor  # (B,) heads each sample kept


def start_tokens(x: Tensor, mode: str, *, valid: Tensor | None = None, protect: Tensor | None = None) -> TokenSet:
    """The TokenSet layout a mode runs in (physical only for ``eval``)."""
    check_mode(mode)
    return TokenSet.start(x, valid=valid, protect=protect, physical=mode == "eval", soft=mode == "train")


def expected_tokens(tokens: TokenSet, prob: Tensor) -> Tensor:
    """Tokens the next block is expected to process: alive and (protected or kept w.p. prob)."""
    p = torch.where(tokens.protect, torch.ones_like(prob), prob)
    return (tokens.keep.to(prob.dtype) * p).sum(1)


class TrimmedStack(nn.Module):
    """Blocks plus optional token/head trimmers keyed by layer index."""

    def __init__(self, blocks: list[nn.Module], *, token_trimmers: dict[int, TokenTrimmer] | None = None,
                 head_trimmers: dict[int, HeadTrimmer] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.token_trimmers = nn.ModuleDict({str(k): v for k, v in (token_trimmers or {}).items()})
        self.head_trimmers = nn.ModuleDict({str(k): v for k, v in (head_trimmers or {}).items()})
        for layer in [*self.token_trimmers, *self.head_trimmers]:
            if not 0 <= int(layer) < len(blocks):
                raise ValueError(f"trimmer on layer {layer} but the stack has {len(blocks)} layers (0..{len(blocks) - 1})")

    def forward(self, tokens: TokenSet, *, mode: str = "off", other: Tensor | None = None, tau: float = 1.0,
                meter: CostMeter | None = None,
                records: list[LayerRecord] | None = None) -> TokenSet:
        """Run every block. ``other``: the other modality's pooled feature (cross-modal trimmers)."""
        check_mode(mode)
        b = tokens.x.shape[0]
        full_tokens = tokens.kept_counts().detach()
        for i, block in enumerate(self.blocks):
            key = str(i)
            n_cost, h_cost, extra = None, None, 0.0
            heads_kept = torch.full((b,), float(_num_heads(block)), device=tokens.x.device)
            head_mask = heads = None
            if mode != "off" and key in self.token_trimmers:
                trimmer = self.token_trimmers[key]
                decision, prob = trimmer(tokens, other, mode=decision_mode(mode), tau=tau)
                extra = token_trimmer_flops(trimmer, tokens.kept_counts().detach())
                if mode == "train":
                    n_cost = expected_tokens(tokens, prob)
                tokens = tokens.prune(decision)
            if mode != "off" and key in self.head_trimmers:
                trimmer = self.head_trimmers[key]
                head_mask, prob = trimmer(tokens.mean(), other, mode=decision_mode(mode), tau=tau)
                extra = extra + head_trimmer_flops(trimmer)
                heads_kept = head_mask.sum(1)
                if mode == "train":
                    h_cost = prob.sum(1)
                elif mode == "eval":
                    heads = heads_to_run(head_mask)
                    h_cost = float(heads.numel()) if heads is not None else None
            kept = tokens.kept_counts()
            if n_cost is None:
                # Physical execution pays for the padded length; masked pays for alive tokens.
                n_cost = float(tokens.x.shape[1]) if tokens.physical else kept.detach()
            tokens = tokens.with_x(block(tokens.x, keep=tokens.keep, head_mask=head_mask, heads=heads))
            if meter is not None:
                meter.add(block_flops(block, n_cost, h_cost) + extra, block_flops(block, full_tokens), b,
                          tokens.x.device)
            if records is not None:
                records.append(LayerRecord(kept.detach(), heads_kept.detach()))
        return tokens


def _num_heads(block: nn.Module) -> int:
    attn = getattr(block, "attn", None) or getattr(block, "self_attn")
    return attn.num_heads
