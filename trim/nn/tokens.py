"""Token-set bookkeeping for pruned execution.

A `TokenSet` carries a stream's tokens through a stack of blocks in one of two layouts:

* **masked** (training): every token stays in place; ``keep`` is a float 0/1 mask with
  straight-through gradients. Blocks mask pruned keys and skip their updates.
* **physical** (inference): each sample's alive tokens are gathered to the front in their
  original order; ``keep`` is the (B, M) bool validity mask of that grid, ``index`` the
  original position of every carried token. Dropped tokens' last values are parked in
  ``archive`` so dense tasks can scatter them back. The values ``x`` are held either

  - **padded**: (B, M, D), every sample padded to the batch's longest (a batch pays for its
    most expensive member), or
  - **packed**: (1, T, D), the kept tokens of all samples one after another (T = total kept),
    described by a `Packing`. Norms, MLPs and projections then cost exactly the sum of what
    each sample kept; attention runs per sample (`trim.nn.attention`).

  Per-token bookkeeping (``keep``, ``protect``, ``index``, ``segment``) stays on the (B, M)
  grid in both: it is small, and the trimmers' per-sample rules (top-k, minimum kept) are
  row operations on it. `TokenSet.broadcast` and `TokenSet.grid` move per-sample and
  per-token values between the layouts.

For the same hard decisions all layouts give the same outputs (design invariant 1):
alive tokens see the same keys and receive the same updates in each.
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
class Packing:
    """Where each sample's tokens sit in a packed (1, T, D) tensor: sample ``b`` holds rows
    ``offsets[b]:offsets[b + 1]``, in the order of its grid row."""

    lengths: list[int]  # tokens per sample (Python ints: attention loops over them)
    offsets: Tensor  # (B + 1,) long, cumulative; int32 copies feed varlen kernels
    rows: Tensor  # (B, M) long: packed row of each valid grid slot (0 for padding slots)
    sample: Tensor  # (T,) long: the sample of each packed row

    @classmethod
    def from_valid(cls, valid: Tensor) -> "Packing":
        """The packing of a (B, M) grid whose valid slots are each row's first ``lengths[b]``."""
        counts = valid.sum(1)
        lengths = counts.tolist()
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long, device=valid.device)
        offsets[1:] = counts.cumsum(0)
        slots = torch.arange(valid.shape[1], device=valid.device)
        rows = torch.where(valid, offsets[:-1, None] + slots, torch.zeros_like(slots))
        sample = torch.repeat_interleave(torch.arange(len(lengths), device=valid.device), counts)
        return cls(lengths, offsets, rows, sample)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of each sample (from the Python lengths: no device sync per call)."""
        out, start = [], 0
        for n in self.lengths:
            out.append((start, start + n))
            start += n
        return out


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
    packing: Packing | None = None  # set when x is packed (1, T, D) (physical only)
    positions: int = 0  # original positions N0 (index points into them; tokens past them were appended)

    @classmethod
    def start(cls, x: Tensor, *, valid: Tensor | None = None, protect: Tensor | None = None,
              segment: Tensor | None = None, physical: bool = False, soft: bool = True,
              packed: bool = False) -> "TokenSet":
        """Begin a stack. ``valid``: padding mask (False = padding), ``protect``: special tokens.

        In physical mode padding is dropped right away (it is never attended to anyway), and
        ``packed`` holds the values packed rather than padded.
        ``soft`` picks the float keep mask of the masked layout (needed for gradients).
        """
        b, n, _ = x.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        protect = torch.zeros_like(valid) if protect is None else protect.bool()
        gaps = not bool(valid.all())
        if not physical:
            return cls(x, valid.to(x.dtype) if soft else valid, protect & valid, segment=segment, has_gaps=gaps,
                       positions=n)
        tokens = cls(x, valid, protect & valid, index=torch.arange(n, device=x.device).expand(b, n),
                     archive=torch.cat([x, x.new_zeros(b, 1, x.shape[-1])], 1), segment=segment, has_gaps=False,
                     positions=n)
        tokens = tokens.prune(valid) if gaps else tokens
        return tokens.packed() if packed else tokens

    def packed(self) -> "TokenSet":
        """This physical token set with its values packed (1, T, D) instead of padded."""
        if self.packing is not None:
            return self
        if not self.physical:
            raise ValueError("only a physical (gathered) TokenSet can be packed")
        packing = Packing.from_valid(self.keep)
        return replace(self, x=self.x[self.keep][None], packing=packing, has_gaps=False)

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    def grid(self, values: Tensor | None = None) -> Tensor:
        """Per-token values in this set's layout (default: ``x``; or a module's output on ``x``) on the
        (B, M, ...) grid; padding slots hold row 0's."""
        values = self.x if values is None else values
        if self.packing is None:
            return values
        return values[0][self.packing.rows]

    def pack(self, grid_values: Tensor) -> Tensor:
        """(B, M, ...) grid values in this set's layout: packed (1, T, ...) or as they are."""
        if self.packing is None:
            return grid_values
        return grid_values[self.keep][None]

    def broadcast(self, per_sample: Tensor) -> Tensor:
        """(B, K) per-sample values, one per token, ready to add to a module's output on ``x``."""
        if self.packing is None:
            return per_sample[:, None]
        return per_sample[self.packing.sample][None]

    def first(self) -> Tensor:
        """(B, D) each sample's first carried token ([CLS]: protected, so always carried first)."""
        if self.packing is None:
            return self.x[:, 0]
        return self.x[0, self.packing.offsets[:-1]]

    def take(self, full: Tensor) -> Tensor:
        """Values at this set's carried tokens, in its layout, from (B, N0, D) values of every position."""
        if not self.physical:
            return full
        return self.pack(gather_tokens(full, self.index))

    @property
    def physical(self) -> bool:
        return self.index is not None

    def with_x(self, x: Tensor) -> "TokenSet":
        """The same tokens with new values (in this set's layout)."""
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
        count = w.sum(1, keepdim=True).clamp_min(1.0)
        if self.packing is None:
            return (self.x * w[..., None]).sum(1) / count
        weighted = self.x[0] * self.pack(w)[0, :, None]
        total = weighted.new_zeros(self.batch_size, self.x.shape[-1]).index_add_(0, self.packing.sample, weighted)
        return total / count

    def alive_positions(self) -> Tensor:
        """(B, N0) bool: which original positions are still alive (for kept-token plots)."""
        if not self.physical:
            return self.keep.bool()[:, :self.positions or None]
        n0 = self.positions
        alive = torch.zeros(self.batch_size, n0 + 1, dtype=torch.bool, device=self.x.device)
        slot = torch.where(self.keep, self.index, torch.full_like(self.index, n0))
        return alive.scatter(1, slot, True)[:, :-1]

    def prune(self, decision: Tensor) -> "TokenSet":
        """Drop tokens whose ``decision`` is 0/False. Protected tokens are always kept."""
        if not self.physical:
            decision = torch.where(self.protect, torch.ones_like(decision), decision.to(self.keep.dtype))
            if self.keep.is_floating_point():  # decisions carry gradients: blocks must see the mask
                return replace(self, keep=self.keep * decision, has_gaps=True)
            keep = self.keep & decision.bool()
            return replace(self, keep=keep, has_gaps=not bool(keep.all()))
        keep = self.keep & (decision.bool() | self.protect)
        archive = None
        if self.archive is not None:
            # Park every carried token's current value; padded slots write to the spare last row.
            slot = torch.where(self.keep, self.index, torch.full_like(self.index, self.archive.shape[1] - 1))
            archive = self.archive.scatter(1, slot[..., None].expand(-1, -1, self.x.shape[-1]), self.grid())
        pos, valid = compact(keep)
        segment = None if self.segment is None else self.segment.gather(1, pos)
        pruned = TokenSet(self.x, valid, self.protect.gather(1, pos) & valid, index=self.index.gather(1, pos),
                          archive=archive, segment=segment, has_gaps=not bool(valid.all()), positions=self.positions)
        if self.packing is None:
            return replace(pruned, x=gather_tokens(self.x, pos))
        # Kept rows of the packed values, sample after sample, each in its original order.
        rows = self.packing.rows.gather(1, pos)[valid]
        return replace(pruned, x=self.x[:, rows], packing=Packing.from_valid(valid), has_gaps=False)

    def append(self, values: Tensor, alive: Tensor, segment: int | None = None) -> "TokenSet":
        """One more token per sample, after its carried ones (EViT's fused token): ``values`` (B, D),
        ``alive`` (B,) bool, whether each sample gets it; ``segment`` its modality id (single-stream).

        It has no original position (its ``index`` is the spare slot ``positions``), so `restore`
        and `alive_positions` leave it out; it is not protected (a later trimmer may drop it).
        """
        b, d = self.batch_size, self.x.shape[-1]
        values = values.to(self.x.dtype)
        seg = None if self.segment is None else torch.full((b, 1), segment or 0, dtype=self.segment.dtype,
                                                          device=self.segment.device)
        if not self.physical:
            keep = torch.cat([self.keep, alive.to(self.keep.dtype)[:, None]], 1)
            return replace(self, x=torch.cat([self.x, values[:, None]], 1), keep=keep,
                           protect=torch.cat([self.protect, torch.zeros_like(self.protect[:, :1])], 1),
                           segment=None if seg is None else torch.cat([self.segment, seg], 1),
                           has_gaps=self.has_gaps or not bool(keep.bool().all()))
        # Physical grids are compact (each row's valid slots first): the new token goes to slot counts[b].
        counts = self.keep.sum(1)[:, None]
        grid = torch.cat([self.grid(), self.x.new_zeros(b, 1, d)], 1).scatter(1, counts[..., None].expand(-1, 1, d),
                                                                                values[:, None])
        index = torch.cat([self.index, torch.zeros_like(self.index[:, :1])], 1).scatter(1, counts, self.positions)
        keep = torch.arange(grid.shape[1], device=grid.device) < counts + alive.long()[:, None]
        if seg is not None:
            seg = torch.cat([self.segment, seg], 1).scatter(1, counts, seg)
        tokens = TokenSet(grid, keep, torch.cat([self.protect, torch.zeros_like(self.protect[:, :1])], 1), index=index,
                          archive=self.archive, segment=seg, has_gaps=not bool(keep.all()), positions=self.positions)
        return tokens.packed() if self.packing is not None else tokens

    def restore(self) -> Tensor:
        """All original positions (B, N0, D): carried tokens' values, dropped tokens' last values."""
        if not self.physical:
            return self.x[:, :self.positions or None]
        if self.archive is None:
            raise RuntimeError("this TokenSet was projected (TokenSet.project), so its dropped tokens cannot be "
                               "restored; restore before projecting")
        slot = torch.where(self.keep, self.index, torch.full_like(self.index, self.archive.shape[1] - 1))
        full = self.archive.scatter(1, slot[..., None].expand(-1, -1, self.x.shape[-1]), self.grid())
        return full[:, :-1]
