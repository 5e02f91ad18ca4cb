"""The window-slot layout: a SAM-style encoder's tokens while window-wise trimming runs.

`WindowSlots` holds a (B, H, W, C) grid as (B, windows, K, C): the K carried slots of every
window (`trim.nn.windows.WindowGeometry`). Every window carries the same K, so the tensors stay
rectangular and a windowed block runs all windows in one batched call, (B * windows, K, C).

* **masked** (training, ``trim="masked"``): every slot is carried (K = window²) and ``keep``
  marks the alive ones (float 0/1 with straight-through gradients in training): dead slots are
  masked as keys and not updated.
* **physical** (``trim="eval"``): only alive slots are carried, ``slot`` names each one's place
  in its window and ``archive`` holds every slot's last value, so pruned tokens go back to the
  grid unchanged (`to_grid`). Samples of a batch that keep different counts are padded to the
  largest (``keep`` is then their validity).

Window padding slots (beyond the grid) are carried like SAM carries them: windowed attention
attends them as keys, their normed value zero (``padding``); global attention never sees them.
`windows` and `image` give the groups a windowed or a global block attends within, and `put`
writes a block's outputs back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from trim.nn.tokens import compact, gather_tokens
from trim.nn.windows import WindowGeometry, window_partition, window_unpartition


@dataclass
class AttentionGroups:
    """(G, N, C) tokens that attend among themselves, with what `WindowBlock.forward_groups` reads."""

    x: Tensor
    positions: Tensor | None  # (G or 1, N, 2) on the attention's grid; None: the whole grid, row-major
    keys: Tensor | None  # (G, N) attendable (alive); None: all
    padding: Tensor | None  # (G, N) bool: window padding slots; None: none
    index: Tensor | None = None  # (B, N) image groups: flat carried slot of each token (spare: B's last)

    @property
    def update(self) -> Tensor | None:
        """Which tokens take a block's output: the alive ones."""
        return self.keys


@dataclass
class WindowSlots:
    x: Tensor  # (B, nW, K, C)
    geometry: WindowGeometry
    slot: Tensor | None = None  # (B, nW, K) long: window slot of each carried token (S: none); None = all, in order
    keep: Tensor | None = None  # (B, nW, K): alive (float 0/1 in training, bool); None = every carried slot
    archive: Tensor | None = None  # (B, nW, S + 1, C) physical: last value of every slot, plus a spare
    physical: bool = False

    @classmethod
    def start(cls, grid: Tensor, geometry: WindowGeometry, *, physical: bool, soft: bool) -> "WindowSlots":
        """Slots of a (B, H, W, C) grid, all alive. ``soft``: a float keep mask (gradients reach it)."""
        b, c = grid.shape[0], grid.shape[-1]
        x = window_partition(grid, geometry.window).view(b, geometry.count, geometry.size, c)
        if physical:
            return cls(x, geometry, physical=True)
        keep = torch.ones(x.shape[:3], dtype=grid.dtype if soft else torch.bool, device=grid.device)
        return cls(x, geometry, keep=keep)

    # -- what is carried ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[:3])  # type: ignore[return-value]

    def alive(self) -> Tensor:
        """(B, nW, K) bool: carried slots that are alive."""
        if self.keep is None:
            return torch.ones(self.shape, dtype=torch.bool, device=self.x.device)
        return self.keep > 0 if self.keep.is_floating_point() else self.keep

    def real(self) -> Tensor:
        """(B or 1, nW, K) bool: carried slots that hold a grid token (not window padding)."""
        real = self.geometry.tables(self.x.device)[0]
        if self.slot is None:
            return real[None, :, :-1]
        return real[None].expand(self.x.shape[0], -1, -1).gather(2, self.slot)

    def _table(self, which: int) -> Tensor:
        """Positions of the carried slots, (B or 1, nW, K, 2): 1 in the window, 2 in the image."""
        table = self.geometry.tables(self.x.device)[which]
        if which == 1:
            table = table.expand(self.geometry.count, -1, -1)
        if self.slot is None:
            return table[None, :, :-1]
        b = self.x.shape[0]
        return table[None].expand(b, -1, -1, -1).gather(2, self.slot[..., None].expand(-1, -1, -1, 2))

    # -- groups a block attends within -------------------------------------------------------
    def windows(self) -> AttentionGroups:
        """Each window's carried slots, (B * nW, K, C): a windowed block's groups."""
        b, nw, k = self.shape
        flat = b * nw
        padding = ~self.real()
        positions = None if self.slot is None else self._table(1).reshape(flat, k, 2)
        return AttentionGroups(self.x.reshape(flat, k, -1), positions,
                               None if self.keep is None else self.keep.reshape(flat, k),
                               padding.expand(b, -1, -1).reshape(flat, k) if bool(padding.any()) else None)

    def image(self) -> AttentionGroups:
        """Each image's alive grid tokens, (B, R, C) (padded to the batch's largest R): a global block's group."""
        b, nw, k = self.shape
        real = self.real().expand(b, -1, -1).reshape(b, nw * k)
        if self.slot is None:  # masked layout: every slot carried, so the grid tokens sit at fixed places
            index = real[:1].nonzero()[:, 1][None].expand(b, -1)
            valid = None
        else:
            index, valid = compact(real & self.alive().reshape(b, nw * k))
            index = torch.where(valid, index, torch.full_like(index, nw * k))  # padding entries -> the spare
            valid = None if bool(valid.all()) else valid
        flat = torch.cat([self.x.reshape(b, nw * k, -1), self.x.new_zeros(b, 1, self.x.shape[-1])], 1)
        positions = torch.cat([self._table(2).expand(b, -1, -1, -1).reshape(b, nw * k, 2),
                               self.x.new_zeros(b, 1, 2, dtype=torch.long)], 1)
        keys = valid
        if self.keep is not None and self.slot is None:
            keys = self.keep.reshape(b, nw * k).gather(1, index)
        return AttentionGroups(gather_tokens(flat, index), positions.gather(1, index[..., None].expand(-1, -1, 2)),
                               keys, None, index)

    def put(self, groups: AttentionGroups, y: Tensor) -> "WindowSlots":
        """These slots with a block's outputs ``y`` on ``groups`` (from `windows` or `image`) written back."""
        if groups.index is None:
            return replace(self, x=y.view_as(self.x))
        b, nw, k, c = self.x.shape
        flat = torch.cat([self.x.reshape(b, nw * k, c), y.new_zeros(b, 1, c)], 1)
        flat = flat.scatter(1, groups.index[..., None].expand(-1, -1, c), y)
        return replace(self, x=flat[:, :-1].view_as(self.x))

    # -- pruning and the way back ------------------------------------------------------------
    def prune(self, keep: Tensor) -> "WindowSlots":
        """Keep the carried slots where ``keep`` (B, nW, K) is nonzero: the same count in every window.

        Masked: ``keep`` (float with straight-through gradients, or bool) multiplies the alive
        mask. Physical: the kept slots are gathered, each window's in slot order; the others'
        values are parked in the archive.
        """
        if not self.physical:
            if self.keep.is_floating_point():
                return replace(self, keep=self.keep * keep.to(self.keep.dtype))
            return replace(self, keep=self.keep & keep.bool())
        b, nw, k, c = self.x.shape
        s = self.geometry.size
        archive = self._archived()
        pos, valid = compact(keep.bool().reshape(b * nw, k))
        slot = self._slots().reshape(b * nw, k).gather(1, pos)
        slot = torch.where(valid, slot, torch.full_like(slot, s)).view(b, nw, -1)
        x = gather_tokens(self.x.reshape(b * nw, k, c), pos).view(b, nw, -1, c)
        valid = valid.view(b, nw, -1)
        return replace(self, x=x, slot=slot, keep=None if bool(valid.all()) else valid, archive=archive)

    def to_grid(self) -> Tensor:
        """The (B, H, W, C) grid: carried slots' values, pruned ones' last values, padding cut off."""
        b, nw, _, c = self.x.shape
        g = self.geometry
        full = self.x if self.slot is None else self._archived()[:, :, :-1]
        return window_unpartition(full.reshape(b * nw, g.size, c), g.window, g.height, g.width)

    def _slots(self) -> Tensor:
        if self.slot is not None:
            return self.slot
        return torch.arange(self.geometry.size, device=self.x.device).expand(self.shape)

    def _archived(self) -> Tensor:
        """The archive with the carried slots' current values written in."""
        b, nw, k, c = self.x.shape
        if self.slot is None:
            return torch.cat([self.x, self.x.new_zeros(b, nw, 1, c)], 2)
        return self.archive.scatter(2, self.slot[..., None].expand(-1, -1, -1, c), self.x)
