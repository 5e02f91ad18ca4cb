"""Run a stack of single-stream blocks with trimmers attached to some of its layers.

Trimming modes (the ``trim=`` argument of every trim model):

* ``train``  — masked layout, Gumbel-sampled decisions with straight-through gradients;
  the cost is the expectation under the keep probabilities.
* ``masked`` — masked layout, deterministic decisions (what ``eval`` computes, without
  gathering; used to check invariant 1 and for debugging).
* ``eval``   — physical layout: kept tokens gathered, kept heads computed. ``layout="packed"``
  (what ``auto``, the default, picks for all but tiny models: `auto_layout`) packs the kept tokens of all samples and computes each sample's own heads, so
  a sample's cost is what it kept; ``layout="padded"`` pads to the batch's longest sample and
  runs the union of the batch's heads (the cost then counts that padding and those heads).
* ``off``    — no trimmer runs; the model is the untrimmed original (the teacher).

A trimmer at layer ``l`` decides before block ``l`` runs, so block ``l`` already sees only
the kept tokens and heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trim.nn.tokens import TokenSet
from trim.prune.cost import (CostMeter, block_flops, core_pairs, first_token_attention_flops, head_trimmer_flops,
                             token_trimmer_flops)
from trim.prune.evit import EvitTrimmer, block_attention
from trim.prune.trimmers import Trimmer, heads_to_run

TRIM_MODES = ("train", "masked", "eval", "off")
LAYOUTS = ("auto", "packed", "padded")  # how trim="eval" holds the kept tokens
# Packing adds a fixed number of small ops per layer (bookkeeping, one attention call per sample);
# measured on the tiny demo model (width 64, 65 tokens) they cost more than the padding they
# save, on METER-size layers (width 768, 325 tokens) far less. In FLOP-equivalents per layer:
_PACKING_OVERHEAD_FLOPS = 6e7


def auto_layout(width: int, tokens: int) -> str:
    """The layout ``layout="auto"`` picks for a model whose widest stream has ``tokens`` tokens of
    ``width``: packed when a block's work per sample (24 n D^2 FLOPs) dwarfs packing's fixed cost."""
    return "packed" if 24 * tokens * width**2 > _PACKING_OVERHEAD_FLOPS else "padded"


def check_mode(mode: str) -> str:
    if mode not in TRIM_MODES:
        raise ValueError(f"trim={mode!r} is not a trimming mode; choose one of {TRIM_MODES}")
    return mode


def trimmer_decision(mode: str) -> str:
    """How trimmers decide in trimming mode ``mode``: Gumbel samples with straight-through
    gradients in ``train``, a deterministic threshold in every other mode."""
    return "sample" if mode == "train" else "threshold"


@dataclass
class LayerRecord:
    """What one layer kept, per sample: what the evaluator plots and the cost loss reads."""

    tokens: Tensor  # (B,) tokens the block processed (alive, padding excluded)
    heads: Tensor  # (B,) heads each sample kept
    alive: Tensor | None = None  # (B, N0) alive original positions, when asked for (plots)


def start_tokens(x: Tensor, mode: str, *, valid: Tensor | None = None, protect: Tensor | None = None,
                 segment: Tensor | None = None, layout: str = "auto") -> TokenSet:
    """The TokenSet layout a mode runs in (physical only for ``eval``, packed or padded;
    ``auto``: `auto_layout` of this stream's size)."""
    check_mode(mode)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a layout; choose one of {LAYOUTS}")
    if layout == "auto":
        layout = auto_layout(x.shape[-1], x.shape[1])
    # One sample packed is the padded layout with extra bookkeeping: it runs padded (same outputs, same cost).
    packed = mode == "eval" and layout == "packed" and x.shape[0] > 1
    return TokenSet.start(x, valid=valid, protect=protect, segment=segment, physical=mode == "eval",
                          soft=mode == "train", packed=packed)


# (tokens) -> (own pooled feature or None for the default mean, other modality's pooled feature)
Conditioner = Callable[[TokenSet], tuple["Tensor | None", "Tensor | None"]]


def expected_tokens(tokens: TokenSet, prob: Tensor) -> Tensor:
    """Tokens the next block is expected to process: alive and (protected or kept w.p. prob)."""
    p = torch.where(tokens.protect, torch.ones_like(prob), prob)
    return (tokens.keep.to(prob.dtype) * p).sum(1)


@dataclass
class TokenStep:
    tokens: TokenSet  # after pruning
    cost_tokens: Tensor | float | None  # expected count in training, else None (use actual)
    overhead: Tensor | float  # trimmer FLOPs


def trim_tokens(trimmer: Trimmer | None, tokens: TokenSet, mode: str, *, tau: float = 1.0,
                own: Tensor | None = None, other: Tensor | None = None, block: nn.Module | None = None) -> TokenStep:
    """Apply one layer's token trimmer (or nothing) in the given trimming mode; ``block``: the
    block it decides for (EViT reads that block's attention)."""
    if trimmer is None or mode == "off":
        return TokenStep(tokens, None, 0.0)
    if isinstance(trimmer, EvitTrimmer):  # drops and fuses in one step: the count it returns is exact
        if block is None:
            raise ValueError("an EViT trimmer reads its block's attention: pass block=")
        overhead = first_token_attention_flops(block_attention(block), tokens.kept_counts().detach())
        return TokenStep(trimmer(tokens, block), None, overhead)
    decision, prob = trimmer(tokens, other, own=own, decision=trimmer_decision(mode), tau=tau)
    overhead = token_trimmer_flops(trimmer, tokens.kept_counts().detach())
    expected = expected_tokens(tokens, prob) if mode == "train" else None
    return TokenStep(tokens.prune(decision), expected, overhead)


@dataclass
class HeadStep:
    mask: Tensor | None  # (B, H) per-sample head mask, None = all heads
    heads: Tensor | None  # heads computed physically (union over the batch), None = all
    keep: Tensor | None  # (B, H) bool: each sample's own heads (packed layout), None = all
    cost_heads: Tensor | float | None  # expected (train) or computed (eval) heads, None = all
    kept: Tensor  # (B,) heads each sample kept
    overhead: Tensor | float


def trim_heads(trimmer: Trimmer | None, num_heads: int, pooled: Tensor, mode: str, *, tau: float = 1.0,
               other: Tensor | None = None, packed: bool = False, per_sample: bool = True) -> HeadStep:
    """Apply one attention layer's head trimmer (or nothing) in the given trimming mode.

    ``packed``: the tokens are packed. With ``per_sample`` each sample runs its own heads
    (`Attention`'s ``head_keep``) and pays for them alone; without (small layers, see
    `Attention.slices_heads_per_sample`) every head runs and the dropped ones are masked, so the
    cost counts every head. Padded ``eval`` runs the batch's union instead.
    """
    if trimmer is None or mode == "off":
        everything = torch.full((pooled.shape[0],), float(num_heads), device=pooled.device)
        return HeadStep(None, None, None, None, everything, 0.0)
    mask, prob = trimmer(pooled, other, decision=trimmer_decision(mode), tau=tau)
    kept = mask.sum(1)
    overhead = head_trimmer_flops(trimmer)
    if mode == "train":
        return HeadStep(mask, None, None, prob.sum(1), kept, overhead)
    if mode == "masked":
        return HeadStep(mask, None, None, kept, kept, overhead)
    if packed and not per_sample:
        return HeadStep(mask, None, None, None, kept, overhead)
    if packed:
        keep = mask.bool()
        return HeadStep(None, None, None if bool(keep.all()) else keep, kept, kept, overhead)
    heads = heads_to_run(mask)
    return HeadStep(mask, heads, None, float(heads.numel()) if heads is not None else None, kept, overhead)


def token_cost(tokens: TokenSet, step: TokenStep) -> Tensor | float:
    """Tokens a block pays for: expected (train), padded length (padded physical) or alive count."""
    if step.cost_tokens is not None:
        return step.cost_tokens
    padded = tokens.physical and tokens.packing is None
    return float(tokens.x.shape[1]) if padded else tokens.kept_counts().detach()


class TrimmedStack(nn.Module):
    """Blocks plus optional token/head trimmers keyed by layer index."""

    def __init__(self, blocks: list[nn.Module], *, token_trimmers: dict[int, Trimmer] | None = None,
                 head_trimmers: dict[int, Trimmer] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.token_trimmers = nn.ModuleDict({str(k): v for k, v in (token_trimmers or {}).items()})
        self.head_trimmers = nn.ModuleDict({str(k): v for k, v in (head_trimmers or {}).items()})
        for layer in [*self.token_trimmers, *self.head_trimmers]:
            if not 0 <= int(layer) < len(blocks):
                raise ValueError(f"trimmer on layer {layer} but the stack has {len(blocks)} layers (0..{len(blocks) - 1})")

    @property
    def prefix_length(self) -> int:
        """Blocks before the first trimmer: they compute the same in every trimming mode."""
        layers = [int(k) for k in [*self.token_trimmers, *self.head_trimmers]]
        return min(layers, default=len(self.blocks))

    def forward(self, tokens: TokenSet, *, mode: str = "off", other: Tensor | None = None, tau: float = 1.0,
                meter: CostMeter | None = None, records: list[LayerRecord] | None = None,
                condition: Conditioner | None = None, track_alive: bool = False,
                outputs: list[TokenSet] | None = None, prefix: list[Tensor] | None = None,
                resume: bool = False) -> TokenSet:
        """Run every block.

        ``other``: the other modality's pooled feature for cross-modal trimmers, or
        ``condition``: a function giving (own, other) pooled features from the current tokens
        (single-stream models, where both modalities change layer by layer).
        ``outputs`` collects each block's output TokenSet (BridgeTower's bridges read them).
        ``prefix`` receives the values after the `prefix_length` blocks, detached; a pass on the
        same input in another trimming mode can then ``resume`` from them: ``tokens`` holds those
        values and the prefix blocks are counted (cost, records) but not run.
        """
        check_mode(mode)
        if resume and outputs is not None:
            raise ValueError("resume skips the prefix blocks, whose outputs= were asked for; run them instead")
        b = tokens.batch_size
        full_tokens = tokens.kept_counts().detach()
        skip = self.prefix_length if resume else 0
        if prefix is not None and self.prefix_length == 0:
            prefix.append(tokens.x.detach())
        for i, block in enumerate(self.blocks):
            key = str(i)
            own, other_now = condition(tokens) if condition is not None and mode != "off" else (None, other)
            tok = trim_tokens(self.token_trimmers[key] if key in self.token_trimmers else None, tokens, mode,
                              tau=tau, own=own, other=other_now, block=block)
            tokens = tok.tokens
            pooled = tokens.mean() if own is None or key not in self.head_trimmers else own
            head = trim_heads(self.head_trimmers[key] if key in self.head_trimmers else None, _num_heads(block),
                              pooled, mode, tau=tau, other=other_now, packed=tokens.packing is not None,
                              per_sample=tokens.packing is None or _attention(block).slices_heads_per_sample(tokens.packing))
            kept = tokens.kept_counts()
            n_cost = token_cost(tokens, tok)
            if i >= skip:
                tokens = tokens.with_x(block(tokens.x, keep=tokens.block_keep, head_mask=head.mask, heads=head.heads,
                                             packing=tokens.packing, head_keep=head.keep))
            if prefix is not None and i + 1 == self.prefix_length:
                prefix.append(tokens.x.detach())
            if meter is not None:
                pairs = core_pairs(_attention(block), tokens.packing, head_keep=head.keep)
                overhead = tok.overhead + head.overhead
                own = block_flops(block, kept, head.kept) + overhead if mode == "eval" else None
                meter.add(block_flops(block, n_cost, head.cost_heads, pairs=pairs) + overhead,
                          block_flops(block, full_tokens), b, tokens.x.device, own=own)
            if records is not None:
                alive = tokens.alive_positions() if track_alive else None
                records.append(LayerRecord(kept.detach(), head.kept.detach(), alive))
            if outputs is not None:
                outputs.append(tokens)
        return tokens


def _attention(block: nn.Module) -> nn.Module:
    return getattr(block, "attn", None) or getattr(block, "self_attn")


def _num_heads(block: nn.Module) -> int:
    return _attention(block).num_heads
