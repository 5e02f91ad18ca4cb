"""Windowed attention layout (ViTDet / SAM): a (B, H, W, C) token grid <-> (B * windows, size², C).

Each function does one move, so a pruning method can sit between them: window-wise token
trimming gathers the kept tokens of every window after `window_partition` (the same count in
each window keeps the tensor rectangular) and scatters them back before `window_unpartition`;
`grid_positions` gives the (row, col) of every token, which the decomposed relative-position
bias (`trim.nn.attention.DecomposedRelPos`) reads, gathered for whatever tokens are kept.

A grid that does not divide by the window size is padded with zero tokens at its bottom and
right. The padding takes part in attention as keys (as in SAM: it is padded after the norm,
so its keys and values are the projection biases) and is cut off again when unpartitioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def padded_size(size: int, window: int) -> int:
    """``size`` rounded up to whole windows."""
    return -(-size // window) * window


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nH * nW, window², C), windows in row-major order, zero-padded to whole windows."""
    b, h, w, c = x.shape
    hp, wp = padded_size(h, window), padded_size(w, window)
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_unpartition(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B * nH * nW, window², C) -> (B, height, width, C), padding removed."""
    hp, wp = padded_size(height, window), padded_size(width, window)
    nh, nw = hp // window, wp // window
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    return x[:, :height, :width] if (hp, wp) != (height, width) else x


def grid_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(height * width, 2) long: the (row, col) of each token of a row-major grid."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], -1)


class WindowGeometry:
    """Where each slot of a windowed (H, W) grid lies: the fixed tables window-wise trimming reads.

    A *slot* is one of the window² places of a window, in row-major order (`window_partition`'s
    order); windows at the bottom and right hold padding slots beyond the grid. ``window=0``
    (every block global) treats the whole grid as one window. Tables are built on first use per
    device and cached.
    """

    def __init__(self, height: int, width: int, window: int) -> None:
        self.height, self.width = height, width
        self.window = window or max(height, width)
        self.rows = padded_size(height, self.window) // self.window
        self.cols = padded_size(width, self.window) // self.window
        self.count = self.rows * self.cols  # windows per image
        self.size = self.window**2  # slots per window
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``real`` (nW, S + 1) bool: the slot holds a grid token; ``local`` (S + 1, 2) and ``image``
        (nW, S + 1, 2) long: its (row, col) in its window and in the grid. The extra last slot is a
        spare that carried padding points at (never real, position (0, 0)); image positions of
        padding slots are clamped into the grid, so a global bias can be gathered for them."""
        if device not in self._tables:
            w, hp, wp = self.window, self.rows * self.window, self.cols * self.window
            coords = grid_positions(hp, wp, device).view(1, hp, wp, 2)
            image = window_partition(coords, w).view(self.count, self.size, 2)
            real = (image[..., 0] < self.height) & (image[..., 1] < self.width)
            image = torch.minimum(image, torch.tensor([self.height - 1, self.width - 1], device=device))
            local = grid_positions(w, w, device)
            spare = torch.zeros(1, 2, dtype=torch.long, device=device)
            self._tables[device] = (F.pad(real, (0, 1)), torch.cat([local, spare]),
                                    torch.cat([image, spare.expand(self.count, 1, 2)], 1))
        return self._tables[device]

    def real_per_window(self, device: torch.device) -> Tensor:
        """(nW,) grid tokens in each window (fewer in padded windows)."""
        return self.tables(device)[0].sum(1)
