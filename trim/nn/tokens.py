"""Token-set bookkeeping for pruned execution.

A `TokenSet` carries a stream's tokens through a stack of blocks in one of two layouts:

* **masked** (training): every token stays in place; ``keep`` is a float 0/1 mask with
  straight-through gradients. Blocks mask pruned keys and skip their updates.
* **physical** (inference): each sample's alive tokens are gathered to the front and the
  batch is padded to its longest sample; ``keep`` is then the bool validity mask of that
  padding, ``index`` the original position of every carried token. Dropped tokens'
  last values are parked in ``archive`` so dense tasks can scatter them back.

For the same hard decisions both layouts give the same outputs (design invariant 1):
alive tokens see the same keys and receive the same updates in both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, i]] for (B, N, D) x and (B, M) index."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of each sample's kept tokens, in order, padded to the batch maximum.

    Returns ``index`` (B, M) and ``valid`` (B, M) where M = max kept count; padded slots
    point at position 0 and are marked invalid.
    """
    keep = keep.bool()
    counts = keep.sum(1)
    m = int(counts.max()) if keep.numel() else 0
    # A stable sort of "not kept" brings kept positions to the front in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=keep.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


@dataclass
class TokenSet:
    x: Tensor  # (B, N, D) carried tokens
    keep: Tensor  # (B, N) alive mask: float 0/1 (masked) or bool validity (physical)
    protect: Tensor  # (B, N) bool: special tokens that are never pruned
    index: Tensor | None = None  # (B, N) original positions (physical only)
    archive: Tensor | None = None  # (B, N0 + 1, D) last values of every token (physical only)
    segment: Tensor | None = None  # (B, N) modality id of each token (single-stream models)
    # False when every carried token is alive: blocks then need no key mask and no gate, which
    # lets attention take its fastest path (batch size 1 at inference is always gap-free).
    has_gaps: bool = True

    @classmethod
    def start(cls, x: Tensor, *, valid: Tensor | None = None, protect: Tensor | None = None,
              segment: Tensor | None = None, physical: bool = False, soft: bool = True) -> "TokenSet":
        """Begin a stack. ``valid``: padding mask (False = padding), ``protect``: special tokens.

        In physical mode padding is dropped right away (it is never attended to anyway).
        ``soft`` picks the float keep mask of the masked layout (needed for gradients).
        """
        b, n, _ = x.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        protect = torch.zeros_like(valid) if protect is None else protect.bool()
        gaps = not bool(valid.all())
        if not physical:
            return cls(x, valid.to(x.dtype) if soft else valid, protect & valid, segment=segment,
                       has_gaps=soft or gaps)
        tokens = cls(x, valid, protect & valid, index=torch.arange(n, device=x.device).expand(b, n),
                     archive=torch.cat([x, x.new_zeros(b, 1, x.shape[-1])], 1), segment=segment, has_gaps=False)
        return tokens.prune(valid) if gaps else tokens

    @property
    def physical(self) -> bool:
        return self.index is not None

    def with_x(self, x: Tensor) -> "TokenSet":
        return replace(self, x=x)

    def project(self, fn) -> "TokenSet":
        """Map the carried tokens into a new space (e.g. a cross-modal width).

        Dropped tokens' parked values stay behind in the old space, so ``restore()`` is not
        available afterwards; pooled (classification) streams never need it, and projecting
        every dropped token would spend compute the pruning just saved.
        """
        return replace(self, x=fn(self.x), archive=None)

    @property
    def block_keep(self) -> Tensor | None:
        """The ``keep`` argument for blocks: None when no carried token is dead or padding."""
        return self.keep if self.has_gaps else None

    def kept_counts(self) -> Tensor:
        """Alive tokens per sample (B,), as float so expected costs stay differentiable."""
        return self.keep.to(self.x.dtype).sum(1)

    def mean(self, segment: int | None = None) -> Tensor:
        """Mean over alive tokens per sample (B, D), optionally of one segment only;
        padding and pruned tokens excluded."""
        w = self.keep.to(self.x.dtype)
        if segment is not None:
            w = w * (self.segment == segment).to(w.dtype)
        w = w[..., None]
        return (self.x * w).sum(1) / w.sum(1).clamp_min(1.0)

    def alive_positions(self) -> Tensor:
        """(B, N0) bool: which original positions are still alive (for kept-token plots)."""
        if not self.physical:
            return self.keep.bool()
        n0 = int(self.index.max()) + 1 if self.archive is None else self.archive.shape[1] - 1
        alive = torch.zeros(self.x.shape[0], n0 + 1, dtype=torch.bool, device=self.x.device)
        slot = torch.where(self.keep, self.index, torch.full_like(self.index, n0))
        return alive.scatter(1, slot, True)[:, :-1]

    def prune(self, decision: Tensor) -> "TokenSet":
        """Drop tokens whose ``decision`` is 0/False. Protected tokens are always kept."""
        if not self.physical:
            decision = torch.where(self.protect, torch.ones_like(decision), decision.to(self.keep.dtype))
            if self.keep.is_floating_point():
                return replace(self, keep=self.keep * decision)
            keep = self.keep & decision.bool()
            return replace(self, keep=keep, has_gaps=not bool(keep.all()))
        keep = self.keep & (decision.bool() | self.protect)
        archive = None
        if self.archive is not None:
            # Park every carried token's current value; padded slots write to the spare last row.
            slot = torch.where(self.keep, self.index, torch.full_like(self.index, self.archive.shape[1] - 1))
            archive = self.archive.scatter(1, slot[..., None].expand(-1, -1, self.x.shape[-1]), self.x)
        pos, valid = compact(keep)
        segment = None if self.segment is None else self.segment.gather(1, pos)
        return TokenSet(gather_tokens(self.x, pos), valid, self.protect.gather(1, pos) & valid,
                        index=self.index.gather(1, pos), archive=archive, segment=segment,
                        has_gaps=not bool(valid.all()))

    def restore(self) -> Tensor:
        """All original positions (B, N0, D): carried tokens' values, dropped tokens' last values."""
        if not self.physical:
            return self.x
        if self.archive is None:
            raise RuntimeError("this TokenSet was projected (TokenSet.project), so its dropped tokens cannot be "
                               "restored; restore before projecting")
        slot = torch.where(self.keep, self.index, torch.full_like(self.index, self.archive.shape[1] - 1))
        full = self.archive.scatter(1, slot[..., None].expand(-1, -1, self.x.shape[-1]), self.x)
        return full[:, :-1]
